"""Coupled structures of a decoder model, their parameter counts, and in-place slicing to uniform shapes.

Three kinds of coupled group, the same in every supported family (Llama, Qwen2, Qwen3, Mistral, Gemma3):

- a **query head** h: rows h·d…(h+1)·d of q_proj (and its bias) + the same columns of o_proj;
- a **KV group** g: rows of k_proj and v_proj (and biases) + every query head that attends through it;
- an **MLP channel** j: row j of gate_proj and up_proj + column j of down_proj.

q_norm/k_norm act on head_dim, which is never cut; neither is the hidden size, so embeddings, norms, RoPE and
tied LM heads stay intact. Whole decoder blocks can be dropped (`layer_idx` renumbered, `layer_types` sliced)
so generation with a KV cache still works. After slicing, `rewrite_config` writes the counts into the config;
the result loads with stock `AutoModelForCausalLM.from_pretrained`.

    from finescope.prune.structure import model_shapes, prune_attention, prune_mlp, drop_blocks
    shapes = model_shapes(handle.adapter, handle.model)
    drop_blocks(handle.adapter, [7, 12])
    prune_attention(handle.adapter, layer, kept_heads, kept_kv); prune_mlp(handle.adapter, layer, kept_channels)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..modeling import ArchAdapter


@dataclass(frozen=True)
class Shapes:
    """Parameter accounting of a model with uniform layers: what each coupled unit costs."""

    total: int
    """All parameters (tied weights counted once)."""
    embedding: int
    """Input embedding + untied LM head."""
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    per_query_head: int
    """Parameters of one query head (q rows + bias, o columns), per layer."""
    per_kv_head: int
    """Parameters of one KV head alone (k and v rows + biases), per layer."""
    per_channel: int
    """Parameters of one MLP channel (gate/up rows + biases, down column), per layer."""
    per_block: int
    """Parameters of one whole decoder block."""

    @property
    def group_size(self) -> int:
        """Query heads per KV group."""
        return self.heads // self.kv_heads

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding


def _numel(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def _bias(lin: nn.Linear) -> int:
    return 1 if lin.bias is not None else 0


def model_shapes(adapter: ArchAdapter, model: nn.Module) -> Shapes:
    """Read the coupled-unit costs off layer 0 (all layers have the same shapes)."""
    a, m, d = adapter.attention(0), adapter.mlp(0), adapter.head_dim
    hidden = a.q_proj.in_features
    embed = adapter.embed_tokens.weight
    head = adapter.lm_head
    embedding = embed.numel() + (0 if head is None or head.weight is embed else head.weight.numel())
    return Shapes(
        total=sum(p.numel() for p in model.parameters()),
        embedding=embedding,
        layers=adapter.num_layers,
        heads=a.q_proj.out_features // d,
        kv_heads=a.k_proj.out_features // d,
        head_dim=d,
        intermediate=m.gate_proj.out_features,
        per_query_head=d * (hidden + _bias(a.q_proj)) + a.o_proj.out_features * d,
        per_kv_head=2 * d * hidden + d * (_bias(a.k_proj) + _bias(a.v_proj)),
        per_channel=hidden * 2 + _bias(m.gate_proj) + _bias(m.up_proj) + m.down_proj.out_features,
        per_block=_numel(adapter.layers[0]),
    )


def count_after(shapes: Shapes, *, layers: int, heads: int, kv_heads: int, intermediate: int) -> int:
    """Total parameters of the model with `layers` blocks of the given uniform widths."""
    removed_blocks = shapes.layers - layers
    per_layer_removed = (
        (shapes.heads - heads) * shapes.per_query_head
        + (shapes.kv_heads - kv_heads) * shapes.per_kv_head
        + (shapes.intermediate - intermediate) * shapes.per_channel
    )
    return shapes.total - removed_blocks * shapes.per_block - layers * per_layer_removed


# ================================================================================================ slicing


def _index(idx, device) -> torch.Tensor:
    return torch.as_tensor(sorted(int(i) for i in idx), dtype=torch.long, device=device)


def slice_linear(lin: nn.Linear, *, rows=None, cols=None) -> nn.Linear:
    """A new Linear keeping output rows `rows` and input columns `cols` (None = all); bias follows the rows."""
    w = lin.weight.data
    if rows is not None:
        w = w.index_select(0, _index(rows, w.device))
    if cols is not None:
        w = w.index_select(1, _index(cols, w.device))
    new = nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None, device=w.device, dtype=w.dtype)
    new.weight.data.copy_(w)
    if lin.bias is not None:
        b = lin.bias.data if rows is None else lin.bias.data.index_select(0, _index(rows, w.device))
        new.bias.data.copy_(b)
    new.weight.requires_grad_(lin.weight.requires_grad)
    return new


def head_rows(heads, head_dim: int) -> list[int]:
    """Row (or column) indices covered by the given heads."""
    return [h * head_dim + k for h in sorted(heads) for k in range(head_dim)]


def prune_attention(adapter: ArchAdapter, layer: int, kept_heads: list[int], kept_kv: list[int]) -> None:
    """Keep query heads `kept_heads` and KV heads `kept_kv` of one layer (ids in the current numbering).

    Every kept query head must attend through a kept KV head, with the same count per kept group, because
    transformers maps query head i to KV head i // (heads/kv_heads).
    """
    d = adapter.head_dim
    attn: Any = adapter.layers[layer].self_attn  # the HF attention module; its attributes are per-architecture
    parts = adapter.attention(layer)
    heads_now, kv_now = parts.q_proj.out_features // d, parts.k_proj.out_features // d
    group = heads_now // kv_now
    kept_heads, kept_kv = sorted(kept_heads), sorted(kept_kv)
    per_group = [sum(1 for h in kept_heads if h // group == g) for g in kept_kv]
    if sum(per_group) != len(kept_heads) or len(set(per_group)) != 1 or per_group[0] == 0:
        raise ValueError(f"layer {layer}: kept query heads {kept_heads} are not an equal share of KV heads {kept_kv}")
    attn.q_proj = slice_linear(parts.q_proj, rows=head_rows(kept_heads, d))
    attn.k_proj = slice_linear(parts.k_proj, rows=head_rows(kept_kv, d))
    attn.v_proj = slice_linear(parts.v_proj, rows=head_rows(kept_kv, d))
    attn.o_proj = slice_linear(parts.o_proj, cols=head_rows(kept_heads, d))
    attn.num_key_value_groups = len(kept_heads) // len(kept_kv)
    for name, value in (("num_heads", len(kept_heads)), ("num_key_value_heads", len(kept_kv))):
        if hasattr(attn, name):
            setattr(attn, name, value)


def prune_mlp(adapter: ArchAdapter, layer: int, kept: list[int]) -> None:
    """Keep MLP channels `kept` of one layer (gate/up rows, down columns)."""
    mlp: Any = adapter.layers[layer].mlp  # the HF MLP module
    parts = adapter.mlp(layer)
    mlp.gate_proj = slice_linear(parts.gate_proj, rows=kept)
    mlp.up_proj = slice_linear(parts.up_proj, rows=kept)
    mlp.down_proj = slice_linear(parts.down_proj, cols=kept)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(kept)


def drop_blocks(adapter: ArchAdapter, drop: list[int]) -> None:
    """Remove whole decoder blocks; renumber `layer_idx` (the KV-cache slot) and slice per-layer config lists."""
    drop_set = set(drop)
    cfg = adapter.config
    keep = [i for i in range(adapter.num_layers) if i not in drop_set]
    if not keep:
        raise ValueError("cannot drop every decoder block")
    layers = adapter.layers
    kept_modules = [layers[i] for i in keep]
    adapter.decoder.layers = nn.ModuleList(kept_modules)
    for new_idx, block in enumerate(kept_modules):
        for module in (block, getattr(block, "self_attn", None)):
            if module is not None and hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    for name in ("layer_types",):
        value = getattr(cfg, name, None)
        if isinstance(value, (list, tuple)) and len(value) == len(layers):
            setattr(cfg, name, [value[i] for i in keep])
    if hasattr(cfg, "max_window_layers") and isinstance(cfg.max_window_layers, int):
        # Qwen2: layers below max_window_layers use full attention; keep the count of such kept layers.
        cfg.max_window_layers = sum(1 for i in keep if i < cfg.max_window_layers)
    cfg.num_hidden_layers = len(keep)


def rewrite_config(adapter: ArchAdapter) -> dict:
    """Write the model's current uniform shapes into its config (explicit head_dim); return them."""
    d = adapter.head_dim
    parts, mlp = adapter.attention(0), adapter.mlp(0)
    new = {
        "num_hidden_layers": adapter.num_layers,
        "num_attention_heads": parts.q_proj.out_features // d,
        "num_key_value_heads": parts.k_proj.out_features // d,
        "head_dim": d,
        "intermediate_size": mlp.gate_proj.out_features,
    }
    for i in range(adapter.num_layers):
        a, m = adapter.attention(i), adapter.mlp(i)
        got = (a.q_proj.out_features // d, a.k_proj.out_features // d, m.gate_proj.out_features)
        if got != (new["num_attention_heads"], new["num_key_value_heads"], new["intermediate_size"]):
            raise ValueError(f"layer {i} has shapes {got}, not the uniform {new}")
    cfg = adapter.config
    for k, v in new.items():
        setattr(cfg, k, v)
    top = adapter.hf.config
    if top is not cfg:  # multimodal wrapper: keep the text config it serialises in sync
        text = top.get_text_config()
        for k, v in new.items():
            setattr(text, k, v)
    return new
