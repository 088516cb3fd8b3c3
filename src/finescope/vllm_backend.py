"""The optional vLLM generation backend (`--generation-backend vllm`): teacher rewrites (recover) and the
generative benchmarks (eval) through `vllm.LLM` instead of `model.generate`, when vLLM and a CUDA GPU are present.

    check_available()                                   # a one-line error without vLLM or CUDA
    engine = VllmEngine(resolve_model_path("default"), dtype="bfloat16", seed=0)
    outs = generation.generate(engine, tokenizer, prompts, max_new_tokens=64)   # the same call as for a model

`generation.generate` hands an engine the prompts it owns (its rank's batches under several ranks), tokenized as
for transformers (so BOS handling is the same), and gets back the same `{"text", "new_tokens", "cut_off"}` rows:
the stop tokens and stop sequences are passed to vLLM and the text is cut again by our own rule. Sampling is
seeded per prompt (`seed + prompt index`), so completions do not depend on how vLLM batches. vLLM takes
`FINESCOPE_VLLM_GPU_MEMORY` (default 0.5) of the GPU memory, leaving the rest to the transformers model of the
same stage (log-likelihood tasks, the student). Prompts go to vLLM in chunks of `CHUNK` so that a resumable
caller (`on_batch`, the teacher's partial file) loses at most one chunk when killed.

Never run on a real GPU by the session that wrote it (none was lent): tested against a stand-in of the `vllm`
API (tests/unit/test_vllm_backend.py); `benchmarks/gpu_check.sh` exercises it where vLLM is installed.
"""

from __future__ import annotations

import gc
import importlib.util
import os
from typing import Any

from . import FinescopeError

BACKENDS = ("transformers", "vllm")
CHUNK = 512


class VllmUnavailable(FinescopeError):
    """`--generation-backend vllm` on a machine without vLLM or CUDA."""


def check_available() -> None:
    """Refuse the vLLM backend, in one line, where it cannot run."""
    import torch

    from . import distributed

    if distributed.launched_world() > 1:
        # vLLM's offline engine sets up its own process group: inside a rank of a larger torch.distributed world it
        # stops at "world_size (N) is not equal to tensor_model_parallel_size (1) x ..." (vllm-project/vllm#9875).
        raise VllmUnavailable(
            "--generation-backend vllm: vLLM's engine cannot run inside a torchrun / accelerate launch rank; run "
            "this stage as one process (vLLM batches on the GPU itself) or with --generation-backend transformers"
        )
    if importlib.util.find_spec("vllm") is None:
        raise VllmUnavailable(
            "--generation-backend vllm: the vllm package is not installed (pip install vllm, on a CUDA machine); "
            "use --generation-backend transformers"
        )
    if not torch.cuda.is_available():
        raise VllmUnavailable(
            "--generation-backend vllm: vLLM needs a CUDA GPU and this machine has none; "
            "use --generation-backend transformers"
        )


def gpu_memory_fraction() -> float:
    raw = os.environ.get("FINESCOPE_VLLM_GPU_MEMORY", "0.5")
    try:
        value = float(raw)
    except ValueError:
        raise VllmUnavailable(f"FINESCOPE_VLLM_GPU_MEMORY: {raw!r} is not a fraction") from None
    if not 0 < value <= 1:
        raise VllmUnavailable(f"FINESCOPE_VLLM_GPU_MEMORY: must be in (0, 1], got {raw!r}")
    return value


def _engine_dtype(dtype: str) -> str:
    """Our "auto" as the transformers path reads it on a GPU (`modeling.default_dtype`): bf16 where the GPU has
    it, float32 elsewhere."""
    if dtype != "auto":
        return dtype
    from .modeling import default_dtype

    return str(default_dtype("cuda")).replace("torch.", "")


class VllmEngine:
    """A `vllm.LLM` over a local model folder, usable wherever `generation.generate` takes a model."""

    is_vllm = True

    def __init__(self, source: str, *, dtype: str = "auto", seed: int = 0):
        import torch
        import vllm

        check_available()
        self.source = source
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.device_count() > local_rank:
            torch.cuda.set_device(local_rank)  # one engine per rank, on the rank's own GPU
        self.llm = vllm.LLM(
            model=source,
            dtype=_engine_dtype(dtype),
            seed=seed,
            gpu_memory_utilization=gpu_memory_fraction(),
        )
        self.generation_config = _generation_config(source)
        self.training = False

    # `generation.generate` toggles these on a transformers model; an engine has no training mode.
    def eval(self) -> VllmEngine:
        return self

    def train(self, mode: bool = True) -> VllmEngine:
        return self

    def complete(
        self,
        rows: list[list[int]],
        *,
        indices: list[int],
        max_new_tokens: int,
        num_samples: int,
        temperature: float,
        top_p: float,
        seed: int,
        stop: list[str],
        stop_ids: set[int],
    ) -> list[list[tuple[list[int], str]]]:
        """Per prompt (token ids; `indices` its position in the caller's list, for the sampling seed), its
        samples' (generated token ids, vLLM finish reason)."""
        import vllm

        params = [
            vllm.SamplingParams(
                n=num_samples,
                max_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p if temperature > 0 else 1.0,
                seed=seed + i if temperature > 0 else None,
                stop=stop or None,
                stop_token_ids=sorted(stop_ids) or None,
                skip_special_tokens=True,
            )
            for i in indices
        ]
        prompts: list[Any] = [{"prompt_token_ids": ids} for ids in rows]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        return [[(list(c.token_ids), str(c.finish_reason)) for c in o.outputs] for o in outs]

    def close(self) -> None:
        """Free the engine's GPU memory (before a transformers model needs it)."""
        import torch

        self.llm = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _generation_config(source: str):
    try:
        from transformers import GenerationConfig

        return GenerationConfig.from_pretrained(source)
    except (OSError, ValueError):
        return None
