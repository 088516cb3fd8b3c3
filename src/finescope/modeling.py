"""Load causal LMs and expose their structure through one architecture adapter.

`load(spec)` accepts "default" (the embedded SmolLM2-135M-Instruct), a local HF folder, a Hub id (when online),
or a `.gguf` file (converted once into a plain HF folder in the asset cache). The adapter gives every stage the
same view of Llama, Qwen2, Qwen3, Mistral and Gemma3 models: decoder layers, attention and MLP projections,
head counts, and a truncated forward that stops after block ℓ (the blocks above it are never computed).

    from finescope.modeling import load
    h = load("default")                     # ModelHandle(model, tokenizer, adapter, source)
    x = h.tokenizer(["2 + 2 ="], return_tensors="pt")
    hid = h.adapter.hidden_after(15, **x)   # (batch, seq, hidden) after block 15 of 30

CLI: `finescope info default`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import FinescopeError

# model_type → human name. Gemma3 multimodal checkpoints (model_type "gemma3") use their text decoder.
SUPPORTED: dict[str, str] = {
    "llama": "Llama",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "mistral": "Mistral",
    "gemma3_text": "Gemma3",
    "gemma3": "Gemma3",
}


class ModelError(FinescopeError):
    """A model cannot be found, loaded, or is of an unsupported architecture."""


# ================================================================================================ adapter


@dataclass
class AttentionParts:
    q_proj: nn.Linear
    k_proj: nn.Linear
    v_proj: nn.Linear
    o_proj: nn.Linear
    q_norm: nn.Module | None = None
    k_norm: nn.Module | None = None


@dataclass
class MlpParts:
    gate_proj: nn.Linear
    up_proj: nn.Linear
    down_proj: nn.Linear


class _StopForward(Exception):
    """Raised by the hook on the last requested block so nothing above it is computed."""


def check_supported(config: Any, where: str = "") -> str:
    """The family name of `config`, or ModelError listing the supported ones."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        names = ", ".join(sorted(set(SUPPORTED.values())))
        prefix = f"{where}: " if where else ""
        raise ModelError(f"{prefix}unsupported architecture {model_type!r}; supported: {names}")
    return SUPPORTED[model_type]


class ArchAdapter:
    """Uniform access to the parts of a supported decoder-only model (HF module layout)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.family = check_supported(model.config)
        self.config = model.config.get_text_config()
        inner = model.model
        # Multimodal Gemma3 keeps its text decoder one level down.
        self.decoder: nn.Module = getattr(inner, "language_model", inner)
        if not hasattr(self.decoder, "layers"):
            raise ModelError(f"{type(model).__name__}: no decoder layers found")

    # -------------------------------------------------------------------------------------- shapes
    @property
    def layers(self) -> nn.ModuleList:
        return self.decoder.layers

    @property
    def num_layers(self) -> int:
        return len(self.decoder.layers)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return getattr(self.config, "num_key_value_heads", None) or self.num_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.hidden_size // self.num_heads

    @property
    def intermediate_size(self) -> int:
        return self.config.intermediate_size

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    @property
    def lm_head(self) -> nn.Module | None:
        return self.model.get_output_embeddings()

    # -------------------------------------------------------------------------------------- parts
    def attention(self, i: int) -> AttentionParts:
        a = self.layers[i].self_attn
        return AttentionParts(a.q_proj, a.k_proj, a.v_proj, a.o_proj,
                              getattr(a, "q_norm", None), getattr(a, "k_norm", None))

    def mlp(self, i: int) -> MlpParts:
        m = self.layers[i].mlp
        return MlpParts(m.gate_proj, m.up_proj, m.down_proj)

    # -------------------------------------------------------------------------------------- truncated forward
    def hidden_states_at(
        self,
        layers: list[int],
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **_: Any,
    ) -> dict[int, torch.Tensor]:
        """Residual-stream hidden states after each block in `layers` (0-based), from one forward that stops
        at the highest of them: blocks above it, the final norm and the LM head are never computed."""
        if not layers:
            raise ValueError("layers must not be empty")
        for layer in layers:
            if not 0 <= layer < self.num_layers:
                raise ModelError(f"layer {layer} out of range: the model has blocks 0..{self.num_layers - 1}")
        captured: dict[int, torch.Tensor] = {}
        last = max(layers)

        def make_hook(idx: int):
            def hook(_module, _args, output):
                captured[idx] = output[0] if isinstance(output, tuple) else output
                if idx == last:
                    raise _StopForward

            return hook

        handles = [self.layers[i].register_forward_hook(make_hook(i)) for i in sorted(set(layers))]
        try:
            self.decoder(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                         use_cache=False)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        return {i: captured[i] for i in layers}

    def hidden_after(self, layer: int, input_ids=None, attention_mask=None, inputs_embeds=None, **kw) -> torch.Tensor:
        """Hidden state after block `layer` (0-based), computing no block above it."""
        return self.hidden_states_at([layer], input_ids, attention_mask, inputs_embeds, **kw)[layer]


# ================================================================================================ loading


@dataclass
class ModelHandle:
    model: nn.Module
    tokenizer: Any
    adapter: ArchAdapter
    source: str
    """The folder the weights were loaded from (or the Hub id)."""


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def default_dtype(device: str | torch.device | None = None) -> torch.dtype:
    """fp32 on CPU; bf16 on GPUs that support it (fp16 otherwise)."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _parse_dtype(dtype: str | torch.dtype | None, device) -> torch.dtype:
    if dtype in (None, "auto"):
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ModelError(f"dtype {dtype!r}: must be one of auto, {', '.join(names)}")
    return names[dtype]


def resolve_model_path(spec: str | os.PathLike) -> str:
    """A model spec → a local HF folder (converting .gguf and "default" on first use), or a Hub id."""
    spec_str = os.fspath(spec)
    if spec_str == "default":
        from .assets import default_model_dir

        return str(default_model_dir())
    path = Path(spec_str).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"{path}: no such GGUF file")
        return str(gguf_cached_folder(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path}: not a model folder (no config.json)")
        return str(path)
    if path.exists():
        raise ModelError(f"{path}: not a model folder or .gguf file")
    if spec_str.startswith((".", "/", "~")) or spec_str.count("/") > 1:
        raise ModelError(f"{path}: no such model folder")
    return spec_str  # a Hub id


def load(
    spec: str | os.PathLike = "default",
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str | None = None,
    with_tokenizer: bool = True,
) -> ModelHandle:
    """Load a supported causal LM and its tokenizer; the architecture is checked before any weight is read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    source = resolve_model_path(spec)
    local = Path(source).is_dir()
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=local)
    except OSError as e:
        if local:
            raise ModelError(f"{source}: unreadable config.json ({e})") from None
        raise ModelError(
            f"{source!r} is not a local folder or .gguf file, and the Hugging Face Hub could not provide it "
            f"(offline? HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '')!r}); pass a local model folder"
        ) from None
    check_supported(config, source)
    tokenizer = _load_tokenizer(source, local) if with_tokenizer else None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = _parse_dtype(dtype, None if device == "auto" else device)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "local_files_only": local}
    if device == "auto":
        kwargs["device_map"] = "auto"
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if device != "auto":
        model.to(device)
    model.eval()
    return ModelHandle(model=model, tokenizer=tokenizer, adapter=ArchAdapter(model), source=source)


def _load_tokenizer(source: str, local: bool):
    from transformers import AutoTokenizer

    if local and not any((Path(source) / f).is_file() for f in _TOKENIZER_FILES):
        raise ModelError(f"{source}: model folder has no tokenizer ({', '.join(_TOKENIZER_FILES[:2])}); "
                         "save the tokenizer next to the weights")
    tok = AutoTokenizer.from_pretrained(source, local_files_only=local)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


# ================================================================================================ GGUF


def gguf_to_hf_folder(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Path:
    """Convert a GGUF file into a plain `save_pretrained` folder (dequantized weights, safetensors, tokenizer).

    A model loaded with `gguf_file=` is flagged quantized, and `save_pretrained`/`Trainer` refuse it; so the
    weights are dequantized by transformers, copied into a model built from the config without the
    quantization entry, and saved once.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .io import atomic_dir, progress, write_json_atomic

    gguf_path = Path(gguf_path)
    folder, name = str(gguf_path.parent), gguf_path.name
    steps = progress(total=4, desc=f"convert {name}", unit="step")
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    check_supported(config, str(gguf_path))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    steps.update(1)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    steps.update(1)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    # Tied LM heads appear as "missing" and are restored by tie_weights; anything else is a real mismatch.
    real_missing = [k for k in missing if not (k.startswith("lm_head") and config.tie_word_embeddings)]
    if real_missing or unexpected:
        raise ModelError(f"{gguf_path}: weights do not match the config (missing {real_missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    model.tie_weights()
    model.generation_config = quantized.generation_config
    if model.generation_config.eos_token_id is None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    del quantized
    steps.update(1)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / "finescope_source.json", {"converted_from": str(gguf_path.resolve()),
                                                          "dtype": str(dtype).replace("torch.", "")})
    steps.update(1)
    steps.close()
    return Path(out_dir)


def gguf_cached_folder(gguf_path: Path) -> Path:
    """The HF folder converted from `gguf_path`, in the asset cache, keyed by path, size and mtime."""
    from .assets import home

    st = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    out = home() / "models" / f"gguf-{gguf_path.stem}-{key}"
    if not (out / "config.json").is_file():
        gguf_to_hf_folder(gguf_path, out)
    return out


# ================================================================================================ info


def model_info(handle: ModelHandle) -> dict[str, Any]:
    """Parameter counts and shapes of a loaded model."""
    a, model = handle.adapter, handle.model
    total = sum(p.numel() for p in model.parameters())
    embed = a.embed_tokens.weight.numel()
    head = a.lm_head
    tied = head is not None and head.weight is a.embed_tokens.weight
    head_params = 0 if head is None or tied else head.weight.numel()
    dtype = next(model.parameters()).dtype
    return {
        "source": handle.source,
        "architecture": type(model).__name__,
        "family": a.family,
        "parameters": total,
        "non_embedding_parameters": total - embed - head_params,
        "layers": a.num_layers,
        "hidden_size": a.hidden_size,
        "attention_heads": a.num_heads,
        "kv_heads": a.num_kv_heads,
        "head_dim": a.head_dim,
        "mlp_width": a.intermediate_size,
        "vocab_size": a.vocab_size,
        "tied_embeddings": tied,
        "dtype": str(dtype).replace("torch.", ""),
    }


def format_info(info: dict[str, Any]) -> str:
    def millions(n: int) -> str:
        return f"{n / 1e6:.1f}M ({n:,})"

    rows = [
        ("model", info["source"]),
        ("architecture", f"{info['architecture']} ({info['family']})"),
        ("parameters", millions(info["parameters"])),
        ("non-embedding", millions(info["non_embedding_parameters"])),
        ("layers", info["layers"]),
        ("hidden size", info["hidden_size"]),
        ("heads / KV heads", f"{info['attention_heads']} / {info['kv_heads']}"),
        ("head_dim", info["head_dim"]),
        ("MLP width", info["mlp_width"]),
        ("vocab", f"{info['vocab_size']:,}" + (" (tied embeddings)" if info["tied_embeddings"] else "")),
        ("dtype", info["dtype"]),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
