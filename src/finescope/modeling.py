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

import contextlib
import functools
import json
import os
import pickle
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import torch
from torch import nn

from . import FinescopeError, assets, distributed
from .data import check_input_path
from .hashing import sha256_hex
from .messages import flat, one_line, quote
from .progress import progress
from .storage import atomic_dir, write_json_atomic

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

    def __init__(self, message: str = ""):
        super().__init__(flat(message))


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
        raise ModelError(f"{prefix}unsupported architecture {quote(model_type, 80)}; supported: {names}")
    return SUPPORTED[model_type]


class ArchAdapter:
    """Uniform access to the parts of a supported decoder-only model (HF module layout)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.family = check_supported(self.hf.config)
        self.config: Any = self.hf.config.get_text_config()
        inner = self.hf.model
        # Multimodal Gemma3 keeps its text decoder one level down.
        self.decoder: nn.Module = getattr(inner, "language_model", inner)
        if not hasattr(self.decoder, "layers"):
            raise ModelError(f"{type(model).__name__}: no decoder layers found")

    @property
    def hf(self) -> Any:
        """`model`, duck-typed: torch types the attributes of a Hugging Face model (`config`, `model`, its
        getters) as Tensor | Module, so the adapter reads them untyped."""
        return self.model

    # -------------------------------------------------------------------------------------- shapes
    @property
    def layers(self) -> nn.ModuleList:
        # HF decoders keep their blocks in an nn.ModuleList; torch types the lookup as Tensor | Module.
        return cast(nn.ModuleList, self.decoder.layers)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

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
        return self.hf.get_input_embeddings()

    @property
    def lm_head(self) -> nn.Linear | None:
        """The output projection (an nn.Linear in every supported family), or None when the model has none."""
        return self.hf.get_output_embeddings()

    # -------------------------------------------------------------------------------------- parts
    def attention(self, i: int) -> AttentionParts:
        a: Any = self.layers[i].self_attn  # the HF attention module; its projections are per-architecture attributes
        return AttentionParts(
            a.q_proj, a.k_proj, a.v_proj, a.o_proj, getattr(a, "q_norm", None), getattr(a, "k_norm", None)
        )

    def mlp(self, i: int) -> MlpParts:
        m: Any = self.layers[i].mlp  # the HF MLP module
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
        at the highest of them: blocks above it, the final norm and the LM head are never computed. They come
        back on the inputs' device."""
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
            self.decoder(
                input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, use_cache=False
            )
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        # Spread over GPUs (device_map="auto"), a block's output stays on that block's GPU: hand every hidden state
        # back where the inputs are, as the model's own output would be.
        given = input_ids if input_ids is not None else inputs_embeds
        return {i: captured[i] if given is None else captured[i].to(given.device) for i in layers}

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
    generator: Any = None
    """An engine that generates instead of `model.generate` (a `vllm_backend.VllmEngine`), or None."""


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def default_dtype(device: str | torch.device | None = None) -> torch.dtype:
    """bf16 on GPUs that support it; fp32 elsewhere: on the CPU, and on GPUs without bf16 (V100, T4), where fp16
    would overflow in some families (Gemma 3) and train without a loss scaler."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _parse_dtype(dtype: str | torch.dtype | None, device) -> torch.dtype:
    if dtype in (None, "auto"):
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in names:
        raise ModelError(f"dtype {dtype!r}: must be one of auto, {', '.join(names)}")
    return names[dtype]


def resolve_model_path(spec: str | os.PathLike) -> str:
    """A model spec → a local HF folder (converting .gguf and "default" on first use), or a Hub id."""
    spec_str = os.fspath(spec)
    if spec_str == "default":
        return str(embedded_model("smollm2"))
    path = Path(spec_str).expanduser()
    what = "model folder or .gguf file"
    if path.suffix.lower() == ".gguf":
        if not os.path.lexists(path):
            raise ModelError(f"{path}: no such GGUF file")
        check_input_path(path, want="file", what=".gguf file", error=ModelError)
        _check_gguf_magic(path)
        return str(gguf_cached_folder(path))
    if os.path.lexists(path):
        st_dir = path.is_dir()
        check_input_path(path, what=what, error=ModelError)  # a symlink loop, a dangling link, a FIFO …
        if st_dir:
            config = path / "config.json"
            if not os.path.lexists(config):
                raise ModelError(f"{path}: not a model folder (no config.json)")
            check_input_path(config, want="file", what="config.json", error=ModelError)
            return str(path)
        raise ModelError(f"{path}: not a model folder or .gguf file")
    if spec_str.startswith((".", "/", "~")) or spec_str.count("/") > 1:
        raise ModelError(f"{path}: no such model folder")
    return spec_str  # a Hub id


def _check_gguf_magic(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelError(f"{path}: cannot read it ({e.strerror or e}); check its permissions") from None
    if magic != b"GGUF":
        raise ModelError(
            f"{path}: not a GGUF file (it does not start with the GGUF magic bytes); pass a real .gguf "
            "file or a Hugging Face model folder"
        )


def _check_device(spec: Any, device: str | None) -> None:
    """Refuse a device that does not exist here before anything is loaded."""
    if device == "auto" and distributed.launched_world() > 1:
        raise ModelError(
            f"{os.fspath(spec)}: device 'auto' spreads one model over every GPU, but this process is one of "
            f"{distributed.launched_world()} ranks, each with its own GPU; leave --device unset (or run one process)"
        )
    if device in (None, "auto"):
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ModelError(f"device {quote(device, 60)}: not a device name; use cpu, cuda, cuda:N, mps or auto") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ModelError(
                f"{os.fspath(spec)}: device {quote(device, 60)} requested, but CUDA is not available "
                f"({why}); use --device cpu, or leave --device unset to use a GPU when there is one"
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ModelError(
                f"{os.fspath(spec)}: device {quote(device, 60)} requested, but this machine has "
                f"{count} CUDA device(s) (cuda:0..cuda:{count - 1})"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ModelError(f"{os.fspath(spec)}: device 'mps' requested, but MPS is not available; use --device cpu")


def _reraise_fatal(e: BaseException) -> None:
    """Out-of-memory and our own errors pass through the 'cannot load' wrappers unchanged."""
    if isinstance(e, (FinescopeError, MemoryError, torch.OutOfMemoryError)):
        raise e


def _read_local_config(folder: Path) -> dict:
    """config.json of a local model folder, checked before transformers sees it: valid JSON, an object, a
    model_type string of a supported family."""
    path = folder / "config.json"
    fix = "fix it, or re-save the model with save_pretrained"
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ModelError(f"{path}: cannot read it ({e.strerror or e}); check its permissions") from None
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise ModelError(f"{path}: not UTF-8 text (byte {e.start}); {fix}") from None
    except json.JSONDecodeError as e:
        raise ModelError(f"{path}: invalid JSON (line {e.lineno} column {e.colno}: {e.msg}); {fix}") from None
    except RecursionError:
        raise ModelError(f"{path}: JSON nested too deeply to read; {fix}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object, got {type(data).__name__}; {fix}")
    model_type = data.get("model_type")
    names = ", ".join(sorted(SUPPORTED))
    if model_type is None:
        raise ModelError(f"{path}: no 'model_type' field (it names the architecture: {names}); {fix}")
    if not isinstance(model_type, str):
        raise ModelError(f"{path}: field 'model_type' must be a string ({names}), got {quote(model_type, 80)}")
    check_supported(SimpleNamespace(model_type=model_type), str(folder))
    return data


def _check_safetensors(folder: Path) -> None:
    """Open (header only) every safetensors file transformers would load, so a truncated or corrupt one is named."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if os.path.lexists(index):
        check_input_path(index, want="file", what="safetensors index", error=ModelError)
        try:
            weight_map = json.loads(index.read_bytes().decode("utf-8-sig"))["weight_map"]
            names = sorted({v for v in weight_map.values()})
            if not all(isinstance(n, str) for n in names):
                raise TypeError("file names must be strings")
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise ModelError(
                f"{index}: not a valid safetensors index ({type(e).__name__}: {one_line(e, 200)}); "
                "re-save the model with save_pretrained"
            ) from None
        files = [folder / n for n in names]
    elif os.path.lexists(folder / "model.safetensors"):
        files = [folder / "model.safetensors"]
    else:
        return
    for file in files:
        check_input_path(file, want="file", what="safetensors file", error=ModelError)
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except Exception as e:
            _reraise_fatal(e)
            raise ModelError(
                f"{file}: not a readable safetensors file ({one_line(e, 200)}); it is truncated or "
                "corrupt: re-save the model with save_pretrained or download it again"
            ) from None


def _weights_error(source: str, local: bool, e: Exception) -> ModelError:
    """A one-line ModelError for a failed from_pretrained: names the weights file; never repeats torch's advice to
    unpickle arbitrary code."""
    folder = Path(source)
    safetensors = sorted(folder.glob("*.safetensors")) if local else []
    bins = sorted(folder.glob("pytorch_model*.bin")) if local else []
    text = str(e)
    if isinstance(e, pickle.UnpicklingError) or "weights_only" in text or "Weights only load failed" in text:
        named = bins[0] if len(bins) == 1 else folder / "pytorch_model*.bin" if bins else source
        return ModelError(
            f"{named}: a pickle checkpoint that holds more than tensors, so it cannot be loaded "
            "safely; finescope loads only safetensors files and weights-only pickles: convert it to "
            "safetensors (where you trust its source) and pass that folder"
        )
    files = safetensors or bins
    named = files[0] if len(files) == 1 else source
    return ModelError(
        f"{named}: cannot load the model weights ({type(e).__name__}: {one_line(text, 200)}); the "
        "folder must be written by save_pretrained with no truncated file (re-save or re-download it)"
    )


def load(
    spec: str | os.PathLike = "default",
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str | None = None,
    with_tokenizer: bool = True,
) -> ModelHandle:
    """Load a supported causal LM and its tokenizer; the architecture is checked before any weight is read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    _check_device(spec, device)
    source = resolve_model_path(spec)
    local = Path(source).is_dir()
    if local:
        _read_local_config(Path(source))
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=local)
    except OSError as e:
        if local:
            raise ModelError(f"{Path(source) / 'config.json'}: unreadable ({one_line(e, 200)})") from None
        raise ModelError(
            f"{quote(source)} is not a local folder or .gguf file, and the Hugging Face Hub could not provide it "
            f"(offline? HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '')!r}); pass a local model folder"
        ) from None
    except Exception as e:
        _reraise_fatal(e)
        where = Path(source) / "config.json" if local else quote(source)
        raise ModelError(
            f"{where}: invalid model config ({type(e).__name__}: {one_line(e, 200)}); fix it, or re-save "
            "the model with save_pretrained"
        ) from None
    check_supported(config, source)
    tokenizer = _load_tokenizer(source, local) if with_tokenizer else None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = _parse_dtype(dtype, None if device == "auto" else device)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "local_files_only": local}
    if device == "auto":
        kwargs["device_map"] = "auto"
    if local:
        _check_safetensors(Path(source))
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except Exception as e:
        _reraise_fatal(e)
        raise _weights_error(source, local, e) from None
    if device != "auto":
        # transformers declares `to` with functools.wraps(nn.Module.to), so mypy sees the unbound signature.
        model.to(device)  # type: ignore[arg-type]
    model.eval()
    return ModelHandle(model=model, tokenizer=tokenizer, adapter=ArchAdapter(model), source=source)


def _load_tokenizer(source: str, local: bool):
    from transformers import AutoTokenizer

    if local and not any((Path(source) / f).is_file() for f in _TOKENIZER_FILES):
        raise ModelError(
            f"{source}: model folder has no tokenizer ({', '.join(_TOKENIZER_FILES[:2])}); "
            "save the tokenizer next to the weights"
        )
    try:
        tok = AutoTokenizer.from_pretrained(source, local_files_only=local)
    except Exception as e:
        _reraise_fatal(e)
        named: Any = source
        if local:  # name the tokenizer file that is not valid JSON, when one is
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                file = Path(source) / name
                try:
                    if file.is_file():
                        json.loads(file.read_bytes().decode("utf-8-sig"))
                except (OSError, ValueError, RecursionError):
                    named = file
                    break
        raise ModelError(
            f"{named}: cannot load the tokenizer ({type(e).__name__}: {one_line(e, 200)}); re-save the "
            "tokenizer with save_pretrained next to the weights"
        ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


# ================================================================================================ GGUF


@contextlib.contextmanager
def _quiet_gguf_bar() -> Iterator[None]:
    """transformers' GGUF loader draws a plain tqdm bar of its own (not its logging bar, which `finescope`'s CLI
    turns off in a log), with cursor codes and a line per redraw: off a terminal it is disabled here, our own
    4-step conversion bar stands for it."""
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        yield
        return
    original = getattr(gguf_utils, "tqdm", None)
    if sys.stderr.isatty() or original is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def gguf_to_hf_folder(
    gguf_path: str | os.PathLike, out_dir: str | os.PathLike, dtype: torch.dtype = torch.float32
) -> Path:
    """Convert a GGUF file into a plain `save_pretrained` folder (dequantized weights, safetensors, tokenizer).

    A model loaded with `gguf_file=` is flagged quantized, and `save_pretrained`/`Trainer` refuse it; so the
    weights are dequantized by transformers, copied into a model built from the config without the
    quantization entry, and saved once.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    folder, name = str(gguf_path.parent), gguf_path.name
    # The metadata is read and checked before the bar is drawn: a bad file fails with nothing but its error.
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    check_supported(config, str(gguf_path))
    steps = progress(total=4, desc=f"convert {name}", unit="step")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    steps.update(1)
    with _quiet_gguf_bar():
        quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    steps.update(1)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    # Tied LM heads appear as "missing" and are restored by tie_weights; anything else is a real mismatch.
    real_missing = [k for k in missing if not (k.startswith("lm_head") and config.tie_word_embeddings)]
    if real_missing or unexpected:
        raise ModelError(
            f"{gguf_path}: weights do not match the config (missing {real_missing[:3]}, unexpected {unexpected[:3]})"
        )
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
        write_json_atomic(
            tmp / "finescope_source.json",
            {"converted_from": str(gguf_path.resolve()), "dtype": str(dtype).replace("torch.", "")},
        )
    steps.update(1)
    steps.close()
    return Path(out_dir)


def gguf_cached_folder(gguf_path: Path) -> Path:
    """The HF folder converted from `gguf_path`, in the asset cache, keyed by path, size and mtime."""
    st = gguf_path.stat()
    key = sha256_hex(f"{gguf_path.resolve()}|{st.st_size}|{st.st_mtime_ns}", 12)
    out = assets.home() / "models" / f"gguf-{gguf_path.stem}-{key}"
    if not (out / "config.json").is_file():
        try:
            gguf_to_hf_folder(gguf_path, out)
        except Exception as e:
            _reraise_fatal(e)
            raise ModelError(
                f"{gguf_path}: cannot convert this GGUF file ({type(e).__name__}: {one_line(e, 200)}); it "
                "may be truncated, or its architecture or quantization is not one transformers reads"
            ) from None
    return out


def embedded_model(key: str = "smollm2") -> Path:
    """The HF folder of an embedded model (`smollm2` = the default model, or `gemma3`), converted on first use."""
    out = assets.model_folder(key)
    if not (out / "config.json").is_file():
        gguf = assets.model_gguf(key)
        print(
            f"model: converting the embedded {assets.EMBEDDED_MODELS[key]} from GGUF into {out} (once; about two "
            "minutes on 2 CPU cores)",
            file=sys.stderr,
            flush=True,
        )
        gguf_to_hf_folder(gguf, out)
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
