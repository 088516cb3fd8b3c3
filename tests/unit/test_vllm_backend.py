"""--generation-backend vllm: refused in one line without vLLM or CUDA; with them, `generate` hands the engine the
same tokenized prompts and maps its outputs to the rows transformers gives. vLLM itself is not installed here:
the mapping is tested against a stand-in of its API (`LLM.generate`, `SamplingParams`, outputs with token_ids and
finish_reason) that decodes greedily with the tiny transformers model."""

from __future__ import annotations

import importlib.machinery
import sys
import types

import pytest
import torch

from finescope import vllm_backend
from finescope.config import EvalConfig, RecoverConfig
from finescope.generation import generate


def test_refused_without_vllm(tmp_path, tiny_model_dirs):
    from finescope.evaluate.run import run as eval_run
    from finescope.recover.run import run as recover_run

    with pytest.raises(vllm_backend.VllmUnavailable, match="vllm package is not installed"):
        vllm_backend.check_available()
    cfg = EvalConfig(model=str(tiny_model_dirs["llama"]), tasks=["gsm8k"], limit=2, generation_backend="vllm")
    with pytest.raises(vllm_backend.VllmUnavailable, match="--generation-backend vllm"):
        eval_run(cfg, tmp_path / "eval")
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "Say hi", "response": "hi"}\n')
    rcfg = RecoverConfig(
        student=str(tiny_model_dirs["llama"]), teacher=str(tiny_model_dirs["llama"]), data=str(data),
        generation_backend="vllm",
    )  # fmt: skip
    with pytest.raises(vllm_backend.VllmUnavailable, match="--generation-backend vllm"):
        recover_run(rcfg, tmp_path / "recover")
    assert not (tmp_path / "eval").exists() and not (tmp_path / "recover").exists()


def test_refused_under_several_ranks_before_anything_else(monkeypatch):
    """vLLM's offline engine cannot live inside a rank of a torch.distributed world (it builds its own)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(vllm_backend.VllmUnavailable, match="cannot run inside a torchrun / accelerate launch rank"):
        vllm_backend.check_available()


class _Params:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def _fake_vllm(calls: list) -> types.ModuleType:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    class LLM:
        def __init__(self, model, dtype, seed, gpu_memory_utilization):
            calls.append(("init", model, dtype, gpu_memory_utilization))
            self.model = AutoModelForCausalLM.from_pretrained(model).eval()
            self.tok = AutoTokenizer.from_pretrained(model)

        def generate(self, prompts, params, use_tqdm=False):
            calls.append(("generate", len(prompts), params))
            outs = []
            for prompt, p in zip(prompts, params):
                ids = torch.tensor([prompt["prompt_token_ids"]])
                with torch.no_grad():
                    new = self.model.generate(
                        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=p.max_tokens,
                        do_sample=False, eos_token_id=p.stop_token_ids, pad_token_id=0,
                    )[0, ids.shape[1]:].tolist()  # fmt: skip
                stopped = any(t in (p.stop_token_ids or []) for t in new)
                for k in range(1, len(new) + 1):  # like vLLM: stop once the generated text holds a stop string
                    if any(x in self.tok.decode(new[:k], skip_special_tokens=True) for x in p.stop or []):
                        new, stopped = new[:k], True
                        break
                sample = types.SimpleNamespace(token_ids=new, finish_reason="stop" if stopped else "length")
                outs.append(types.SimpleNamespace(outputs=[sample] * p.n))
            return outs

    mod = types.ModuleType("vllm")
    mod.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    mod.LLM, mod.SamplingParams = LLM, _Params  # type: ignore[attr-defined]
    return mod


def test_engine_rows_match_transformers(tiny_model_dirs, chat_tokenizer, monkeypatch):
    from transformers import AutoModelForCausalLM

    calls: list = []
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm(calls))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setenv("FINESCOPE_VLLM_GPU_MEMORY", "0.3")
    monkeypatch.setattr(vllm_backend, "CHUNK", 4)  # 7 prompts in batches of 2: two engine calls
    folder = str(tiny_model_dirs["llama"])
    engine = vllm_backend.VllmEngine(folder, dtype="auto", seed=0)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    prompts = [f"Question {i}: what is {i} + {i}?" * (1 + i % 3) for i in range(7)]
    kw = dict(max_new_tokens=6, stop=["e"], batch_size=2)
    seen: list[list[int]] = []
    got = generate(engine, chat_tokenizer, prompts, on_batch=lambda idx, _: seen.append(idx), **kw)
    want = generate(model, chat_tokenizer, prompts, **kw)
    assert got == want
    assert sorted(i for idx in seen for i in idx) == list(range(7))  # every batch reported once
    assert calls[0] == ("init", folder, "bfloat16", 0.3)
    sizes = [c[1] for c in calls if c[0] == "generate"]
    assert sizes == [4, 3]  # CHUNK // batch_size = 2 batches per call
    p = calls[1][2][0]
    assert p.stop == ["e"] and p.temperature == 0.0 and p.seed is None and p.max_tokens == 6
    calls.clear()
    generate(engine, chat_tokenizer, prompts[:2], max_new_tokens=3, temperature=0.7, seed=5, num_samples=2)
    sampled = calls[0][2]
    assert sorted(q.seed for q in sampled) == [5, 6] and all(q.n == 2 for q in sampled)  # seed + prompt index
