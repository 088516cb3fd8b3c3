"""Compensation at prune time: the kept part of each `o_proj` / `down_proj` takes over what the removed heads and
channels contributed, measured on the calibration data, before any training.

For one projection y = W x + b whose input columns split into kept K and removed R, over the calibration tokens
(statistics of the *dense* model's inputs, one forward pass, no gradients):

| mode         | new weights W'_K                      | new bias b'                         | anchor            |
|--------------|----------------------------------------|-------------------------------------|-------------------|
| `bias`       | W_K                                    | b + W_R μ_R                         | FLAP              |
| `refit`      | W_K + W_R G_RK (G_KK + λI)⁻¹           | b                                   | SlimGPT / ZipLM   |
| `bias_refit` | W_K + W_R C_RK (C_KK + λI)⁻¹ = W_K + W_R M | b + W_R (μ_R − M μ_K)             | both              |

μ is the mean input, G = E[x xᵀ] the second moment and C = G − μ μᵀ the covariance; λ = `refit_ridge` ×
mean(diag) of the kept block. `refit` is the least-squares fit of the dense output with no intercept,
`bias_refit` with one (the intercept goes into the bias): both minimise E‖W x + b − (W'_K x_K + b')‖² on the
calibration tokens, up to the ridge. Writing the fit as a correction of W_K (not a fresh W'_K) makes it exact when
nothing is removed (R empty: W' = W), whatever λ.

A bias needs a field that stock transformers reads: Llama configs have `mlp_bias` and `attention_bias` (turned on
here; the gate/up and q/k/v biases that come with them are zero). Qwen2, Qwen3, Mistral and Gemma3 have no bias on
`down_proj`, so `bias` and `bias_refit` are refused there in one line; `refit` changes weights only and works
for every family. Dropped blocks (depth pruning) are not compensated.

    stats = gather(adapter, batches, kept, mode)       # every rank its share, summed over ranks
    update = solve(adapter, kept, stats, mode, ridge)  # per layer, before slicing
    ... slice ...
    apply(adapter, update)                             # after slicing
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import FinescopeError, distributed
from ..modeling import ArchAdapter
from ..progress import progress
from .structure import head_rows

COMPENSATIONS = ("none", "bias", "refit", "bias_refit")


class CompensationError(FinescopeError):
    """Compensation cannot run for this model or these settings."""


def needs_bias(mode: str) -> bool:
    return mode in ("bias", "bias_refit")


def needs_gram(mode: str) -> bool:
    return mode in ("refit", "bias_refit")


def check_supported(config, mode: str) -> None:
    """Refuse a bias mode for a family whose config has no bias field for down_proj and o_proj."""
    if not needs_bias(mode):
        return
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    missing = [f for f in ("mlp_bias", "attention_bias") if not hasattr(cfg, f)]
    if missing:
        raise CompensationError(
            f"compensation={mode}: {type(cfg).__name__} has no {' / '.join(missing)} field, so stock transformers "
            "would not load a bias on down_proj / o_proj; use compensation=refit (weights only)"
        )


def min_tokens_for(mlp_width: int, attention_width: int, mode: str) -> int:
    """Calibration tokens the re-fit needs at least: the widest kept input of o_proj / down_proj (fewer tokens
    than columns leave the kept inputs' second moment rank-deficient: the fit is then the ridge's, not the data's)."""
    return max(mlp_width, attention_width) if needs_gram(mode) else 0


def _kept_columns(row: dict, head_dim: int) -> dict[str, list[int]]:
    return {"o": head_rows(row["heads"], head_dim), "down": sorted(row["channels"])}


def _linear(adapter: ArchAdapter, layer: int, name: str) -> nn.Linear:
    return adapter.attention(layer).o_proj if name == "o" else adapter.mlp(layer).down_proj


@dataclass
class Stats:
    """Per (original layer, "o" | "down"): the sum of inputs and, for a re-fit, Σ x x_Kᵀ (all rows × kept)."""

    count: int
    sums: dict[tuple[int, str], torch.Tensor]
    cross: dict[tuple[int, str], torch.Tensor]


def gather(adapter: ArchAdapter, batches: list[dict], kept: dict, mode: str, *, desc: str = "compensation") -> Stats:
    """One forward pass of the dense model over this rank's calibration batches; sums over ranks."""
    model = adapter.model
    device = next(model.parameters()).device
    d = adapter.head_dim
    cols = {row["layer"]: _kept_columns(row, d) for row in kept["layers"]}
    sums: dict[tuple[int, str], torch.Tensor] = {}
    cross: dict[tuple[int, str], torch.Tensor] = {}
    mask: dict[str, torch.Tensor] = {}
    handles = []

    def hook(key: tuple[int, str], kept_cols: torch.Tensor):
        def fn(_m, args):
            x = args[0].detach()[mask["m"].to(args[0].device).bool()].float()  # (real tokens, features)
            if key not in sums:
                sums[key] = torch.zeros(x.shape[-1], dtype=torch.float64, device=x.device)
                if needs_gram(mode):
                    cross[key] = torch.zeros(x.shape[-1], len(kept_cols), dtype=torch.float64, device=x.device)
            sums[key] += x.sum(0).double()
            if needs_gram(mode):
                cross[key] += (x.T @ x.index_select(1, kept_cols.to(x.device))).double()

        return fn

    for layer, by_name in cols.items():
        for name, kc in by_name.items():
            idx = torch.tensor(kc, dtype=torch.long)
            handles.append(_linear(adapter, layer, name).register_forward_pre_hook(hook((layer, name), idx)))
    count = 0
    ranks = distributed.ranks()
    mine = [batches[i] for i in ranks.mine(len(batches))]
    try:
        with torch.no_grad():
            for batch in progress(mine, desc=desc + ranks.tag, unit="batch"):
                mask["m"] = batch["attention_mask"]
                count += int(batch["attention_mask"].sum())
                model(
                    input_ids=batch["input_ids"].to(device),
                    attention_mask=batch["attention_mask"].to(device),
                    use_cache=False,
                )
    finally:
        for h in handles:
            h.remove()
    if ranks.world > 1:
        what = "prune compensation statistics (sum over ranks)"
        count = int(distributed.all_reduce_sum(torch.tensor([float(count)]), what)[0])
        for layer, by_name in cols.items():
            for name, kc in by_name.items():
                n = _linear(adapter, layer, name).in_features
                key = (layer, name)
                sums[key] = distributed.all_reduce_sum(
                    sums.get(key, torch.zeros(n, dtype=torch.float64, device=device)), what
                )
                if needs_gram(mode):
                    zero = torch.zeros(n, len(kc), dtype=torch.float64, device=device)
                    cross[key] = distributed.all_reduce_sum(cross.get(key, zero), what)
    return Stats(count=count, sums=sums, cross=cross)


@dataclass
class Update:
    """New weights (kept columns) and bias of one projection, in the original layer numbering."""

    weight: torch.Tensor
    bias: torch.Tensor | None


def solve_layer(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    kept_cols: list[int],
    total: torch.Tensor,
    cross: torch.Tensor | None,
    count: int,
    mode: str,
    ridge: float,
) -> Update:
    """The compensated kept weights and bias of one projection (see the module's table), in float64."""
    n = weight.shape[1]
    kept_set = set(kept_cols)
    removed = [j for j in range(n) if j not in kept_set]
    w = weight.detach().double().cpu()
    k = torch.tensor(kept_cols, dtype=torch.long)
    r = torch.tensor(removed, dtype=torch.long)
    w_k, w_r = w.index_select(1, k), w.index_select(1, r)
    b = bias.detach().double().cpu() if bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    mu = total.double().cpu() / max(count, 1)
    mu_k, mu_r = mu.index_select(0, k), mu.index_select(0, r)
    new_w, new_b = w_k, b
    if removed and needs_gram(mode):
        assert cross is not None
        g = cross.double().cpu() / max(count, 1)  # E[x x_Kᵀ], all rows × kept
        g_kk, g_rk = g.index_select(0, k), g.index_select(0, r)
        if needs_bias(mode):  # covariance: the intercept takes the means
            g_kk = g_kk - torch.outer(mu_k, mu_k)
            g_rk = g_rk - torch.outer(mu_r, mu_k)
        lam = ridge * float(torch.diagonal(g_kk).mean().clamp_min(1e-12))
        a = g_kk + lam * torch.eye(len(kept_cols), dtype=torch.float64)
        m = torch.linalg.solve(a, g_rk.T).T  # R × K: C_RK (C_KK + λI)⁻¹
        new_w = w_k + w_r @ m
        if needs_bias(mode):
            new_b = b + w_r @ (mu_r - m @ mu_k)
    elif removed and needs_bias(mode):
        new_b = b + w_r @ mu_r
    return Update(weight=new_w, bias=new_b if (needs_bias(mode) or bias is not None) else None)


def solve(adapter: ArchAdapter, kept: dict, stats: Stats, mode: str, ridge: float) -> dict[tuple[int, str], Update]:
    """Every kept layer's compensated o_proj / down_proj, computed on the dense model (before slicing)."""
    out = {}
    for row in kept["layers"]:
        for name, kc in _kept_columns(row, adapter.head_dim).items():
            lin = _linear(adapter, row["layer"], name)
            key = (row["layer"], name)
            out[key] = solve_layer(
                lin.weight, lin.bias, kc, stats.sums[key], stats.cross.get(key), stats.count, mode, ridge
            )
    return out


def _zero_bias(lin: nn.Linear) -> None:
    if lin.bias is None:
        lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device))


def apply(adapter: ArchAdapter, kept: dict, updates: dict[tuple[int, str], Update], mode: str) -> int:
    """Write the updates into the sliced model (layers renumbered after dropped blocks); with a bias mode, turn on
    the config's bias fields and give every projection they govern a bias. Returns the parameters added."""
    before = sum(p.numel() for p in adapter.model.parameters())
    for new_idx, row in enumerate(kept["layers"]):
        for name in ("o", "down"):
            lin = _linear(adapter, new_idx, name)
            upd = updates[(row["layer"], name)]
            lin.weight.data.copy_(upd.weight.to(lin.weight.dtype))
            if upd.bias is not None:
                _zero_bias(lin)
                lin.bias.data.copy_(upd.bias.to(lin.bias.dtype))
        if needs_bias(mode):
            attn, mlp = adapter.attention(new_idx), adapter.mlp(new_idx)
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                _zero_bias(lin)
    if needs_bias(mode):
        for cfg in {id(c): c for c in (adapter.config, adapter.hf.config.get_text_config())}.values():
            cfg.mlp_bias = True
            cfg.attention_bias = True
    return sum(p.numel() for p in adapter.model.parameters()) - before
