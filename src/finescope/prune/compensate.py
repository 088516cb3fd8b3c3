"""Compensation at prune time: the kept part of each `o_proj` / `down_proj` takes over what the removed heads and
channels contributed, measured on the calibration data, before any training.

For one projection y = W x + b whose input columns split into kept K and removed R, over the calibration tokens
(statistics of the *dense* model's inputs: a forward pass of their own, or the importance pass's):

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

    stats = gather(adapter, batches, kept, mode)       # one shot: every rank its share, summed over ranks
    # or, inside the importance pass where the full matrices fit (full_bytes): Collector(adapter, mode).stats(kept)
    updates = solve(adapter, kept, stats, mode, ridge) # per layer, before slicing
    ... slice ...
    apply(adapter, kept, updates, mode)                # after slicing

    sequential(adapter, batches, kept, mode, ridge, slice_layer, desc=...)  # block by block (inputs "pruned")
    finish(adapter, mode)

The modes are declared once, in `PruneConfig.compensation`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import FinescopeError, distributed
from ..modeling import ArchAdapter
from ..progress import progress
from .structure import head_rows


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


def stats_bytes(n: int, kept: int, mode: str) -> int:
    """Bytes of one projection's float64 accumulators: Σ x (n), and Σ x x_Kᵀ (n × K) for a re-fit."""
    return 8 * (n + (n * kept if needs_gram(mode) else 0))


def passes(sizes: list[int], budget: int) -> list[list[int]]:
    """Indices of `sizes` (in order) grouped so each group's total stays within `budget`; a single item larger
    than the budget makes a group of its own. One group = one statistics pass over the calibration data."""
    groups: list[list[int]] = []
    total = 0
    for i, size in enumerate(sizes):
        if not groups or total + size > budget:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += size
    return groups


def _hook(sums: dict, cross: dict, key: tuple[int, str], cols: torch.Tensor | None, mode: str, mask: dict):
    """A forward pre-hook adding this batch's real tokens to Σ x and, for a re-fit, Σ x x_Kᵀ (every column when
    `cols` is None: the full Σ x xᵀ)."""

    def fn(_m, args):
        x = args[0].detach()[mask["m"].to(args[0].device).bool()].float()  # (real tokens, features)
        if key not in sums:
            sums[key] = torch.zeros(x.shape[-1], dtype=torch.float64, device=x.device)
            if needs_gram(mode):
                width = x.shape[-1] if cols is None else len(cols)
                cross[key] = torch.zeros(x.shape[-1], width, dtype=torch.float64, device=x.device)
        sums[key] += x.sum(0).double()
        if needs_gram(mode):
            cross[key] += (x.T @ (x if cols is None else x.index_select(1, cols.to(x.device)))).double()

    return fn


def _sum_over_ranks(adapter: ArchAdapter, cols: dict, stats: Stats, mode: str) -> Stats:
    """Several ranks: each rank's sums (of its share of the batches) added up on every rank."""
    if distributed.ranks().world <= 1:
        return stats
    device = next(adapter.model.parameters()).device
    what = "prune compensation statistics (sum over ranks)"
    count = int(distributed.all_reduce_sum(torch.tensor([float(stats.count)]), what)[0])
    sums, cross = dict(stats.sums), dict(stats.cross)
    for layer, by_name in cols.items():
        for name, kc in by_name.items():
            n = _linear(adapter, layer, name).in_features
            key = (layer, name)
            at = sums[key].device if key in sums else device
            sums[key] = distributed.all_reduce_sum(sums.get(key, torch.zeros(n, dtype=torch.float64, device=at)), what)
            if needs_gram(mode):
                zero = torch.zeros(n, len(kc), dtype=torch.float64, device=at)
                cross[key] = distributed.all_reduce_sum(cross.get(key, zero), what)
    return Stats(count=count, sums=sums, cross=cross)


def gather(
    adapter: ArchAdapter,
    batches: list[dict],
    kept: dict,
    mode: str,
    *,
    desc: str = "compensation",
    memory_gib: float = 4.0,
) -> Stats:
    """Forward passes of the dense model over this rank's calibration batches; sums over ranks.

    The float64 accumulators of a re-fit grow as width² per layer (SmolLM2-135M: ~0.4 GiB in all; an 8B Llama:
    ~34 GiB), so the projections are gathered in as many passes as keep them within `memory_gib` on the device,
    each pass hooking its own projections; the sums are the same, bit for bit, whatever the number of passes.
    (Where every projection's full Σ x xᵀ fits, `Collector` gathers them inside the importance pass instead.)"""
    model = adapter.model
    device = next(model.parameters()).device
    d = adapter.head_dim
    cols = {row["layer"]: _kept_columns(row, d) for row in kept["layers"]}
    keys = [(layer, name) for layer, by_name in cols.items() for name in by_name]
    sizes = [
        stats_bytes(_linear(adapter, layer, name).in_features, len(cols[layer][name]), mode) for layer, name in keys
    ]
    groups = passes(sizes, int(memory_gib * 2**30))
    sums: dict[tuple[int, str], torch.Tensor] = {}
    cross: dict[tuple[int, str], torch.Tensor] = {}
    mask: dict[str, torch.Tensor] = {}
    count = 0
    ranks = distributed.ranks()
    mine = [batches[i] for i in ranks.mine(len(batches))]
    for g, group in enumerate(groups):
        handles = []
        for layer, name in (keys[i] for i in group):
            idx = torch.tensor(cols[layer][name], dtype=torch.long)
            handles.append(
                _linear(adapter, layer, name).register_forward_pre_hook(
                    _hook(sums, cross, (layer, name), idx, mode, mask)
                )
            )
        tag = f" pass {g + 1}/{len(groups)}" if len(groups) > 1 else ""
        count = 0
        try:
            with torch.no_grad():
                for batch in progress(mine, desc=desc + tag + ranks.tag, unit="batch"):
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
        if len(groups) > 1:  # this pass's accumulators leave the device before the next pass fills its own
            for layer, name in (keys[i] for i in group):
                if (layer, name) in sums:
                    sums[(layer, name)] = sums[(layer, name)].cpu()
                if (layer, name) in cross:
                    cross[(layer, name)] = cross[(layer, name)].cpu()
    return _sum_over_ranks(adapter, cols, Stats(count=count, sums=sums, cross=cross), mode)


def full_bytes(adapter: ArchAdapter, mode: str) -> int:
    """Bytes of `Collector`'s accumulators: Σ x and the full Σ x xᵀ of every layer's o_proj and down_proj."""
    return sum(
        stats_bytes(n, n, mode)
        for i in range(adapter.num_layers)
        for n in (adapter.attention(i).o_proj.in_features, adapter.mlp(i).down_proj.in_features)
    )


class Collector:
    """`gather`'s statistics taken during another pass over the calibration batches (the importance pass), so the
    dense model runs over them once, not twice.

    The kept columns are not known until the scores are, so a re-fit keeps the full Σ x xᵀ of every projection
    (n × n instead of n × K: use only where `full_bytes` fits the memory budget; SmolLM2-135M ~0.6 GiB) and
    `stats(kept)` takes the kept columns. Call `observe(batch)` before each forward of a batch; `close()` removes
    the hooks. Equal to `gather`'s statistics up to float32 rounding (the products are summed in another order).

        collector = Collector(adapter, "refit")
        scores = compute_scores(adapter, batches, "flap", on_batch=collector.observe)
        collector.close()
        stats = collector.stats(plan_kept(adapter, scores, plan, "query"))   # sums over ranks
    """

    def __init__(self, adapter: ArchAdapter, mode: str):
        self.adapter, self.mode, self.count = adapter, mode, 0
        self.sums: dict[tuple[int, str], torch.Tensor] = {}
        self.cross: dict[tuple[int, str], torch.Tensor] = {}
        self.mask: dict[str, torch.Tensor] = {}
        self.handles = [
            _linear(adapter, layer, name).register_forward_pre_hook(
                _hook(self.sums, self.cross, (layer, name), None, mode, self.mask)
            )
            for layer in range(adapter.num_layers)
            for name in ("o", "down")
        ]

    def observe(self, batch: dict) -> None:
        self.mask["m"] = batch["attention_mask"]
        self.count += int(batch["attention_mask"].sum())

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def stats(self, kept: dict) -> Stats:
        """The statistics of the kept columns, summed over ranks. Single use: each full matrix is released as its
        columns are taken (the peak stays the full matrices plus one projection's kept columns), and the
        collector is emptied."""
        self.close()
        cols = {row["layer"]: _kept_columns(row, self.adapter.head_dim) for row in kept["layers"]}
        keys = [(layer, name) for layer, by_name in cols.items() for name in by_name]
        cross = {}
        if needs_gram(self.mode):
            for layer, name in keys:
                full = self.cross.pop((layer, name), None)  # absent on a rank that saw no batch
                if full is not None:
                    cross[(layer, name)] = full.index_select(1, torch.tensor(cols[layer][name], device=full.device))
                    del full
        sums = {key: self.sums[key] for key in keys if key in self.sums}
        count = self.count
        self.sums, self.cross, self.count = {}, {}, 0
        return _sum_over_ranks(self.adapter, cols, Stats(count=count, sums=sums, cross=cross), self.mode)


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
    *,
    pruned_total: torch.Tensor | None = None,
    pruned_gram: torch.Tensor | None = None,
) -> Update:
    """The compensated kept weights and bias of one projection, in float64.

    The target is the dense output W x + b on the dense inputs x; the fit reads the pruned model's kept inputs
    p (x_K itself when `pruned_*` are None: the one-shot form of the module's table). `total` = Σ x (n),
    `cross` = Σ x pᵀ (n × K), `pruned_total` = Σ p (K), `pruned_gram` = Σ p pᵀ (K × K). With S = E[p pᵀ] and
    D = E[x pᵀ] (centred for an intercept), W'_K = W_K + (W D − W_K S)(S + λI)⁻¹: the least-squares fit, written
    as a correction of W_K so that it vanishes when nothing is removed and p = x_K."""
    k = torch.tensor(kept_cols, dtype=torch.long)
    w = weight.detach().double().cpu()
    w_k = w.index_select(1, k)
    b = bias.detach().double().cpu() if bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    n = max(count, 1)
    mu = total.double().cpu() / n
    mu_p = pruned_total.double().cpu() / n if pruned_total is not None else mu.index_select(0, k)
    nothing_removed = len(kept_cols) == w.shape[1] and pruned_total is None
    new_w, new_b = w_k, b
    if not nothing_removed and needs_gram(mode):
        assert cross is not None
        d = cross.double().cpu() / n  # E[x pᵀ], n × K
        s = pruned_gram.double().cpu() / n if pruned_gram is not None else d.index_select(0, k)
        if needs_bias(mode):  # centred: the intercept takes the means
            d = d - torch.outer(mu, mu_p)
            s = s - torch.outer(mu_p, mu_p)
        lam = ridge * float(torch.diagonal(s).mean().clamp_min(1e-12))
        a = s + lam * torch.eye(len(kept_cols), dtype=torch.float64)
        rhs = w @ d - w_k @ s  # out × K
        new_w = w_k + torch.linalg.solve(a, rhs.T).T  # a is symmetric
    if not nothing_removed and needs_bias(mode):
        new_b = b + w @ mu - new_w @ mu_p  # the dense output's mean, matched
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


def apply(adapter: ArchAdapter, kept: dict, updates: dict[tuple[int, str], Update], mode: str) -> None:
    """Write the updates into the sliced model (layers renumbered after dropped blocks), then `finish`."""
    for new_idx, row in enumerate(kept["layers"]):
        for name in ("o", "down"):
            lin = _linear(adapter, new_idx, name)
            upd = updates[(row["layer"], name)]
            lin.weight.data.copy_(upd.weight.to(lin.weight.dtype))
            if upd.bias is not None:
                _zero_bias(lin)
                lin.bias.data.copy_(upd.bias.to(lin.bias.dtype))
    finish(adapter, mode)


_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _projections(adapter: ArchAdapter, i: int) -> dict[str, nn.Linear]:
    attn, mlp = adapter.attention(i), adapter.mlp(i)
    return {n: getattr(attn if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else mlp, n) for n in _PROJECTIONS}


def biased(adapter: ArchAdapter) -> set[str]:
    """The projections of block 0 that have a bias (read on the dense model, before compensation)."""
    return {n for n, lin in _projections(adapter, 0).items() if lin.bias is not None}


def added_parameters(adapter: ArchAdapter, had_bias: set[str]) -> int:
    """Bias parameters compensation added: those of projections that had none in the dense model."""
    return sum(
        lin.bias.numel()
        for i in range(adapter.num_layers)
        for n, lin in _projections(adapter, i).items()
        if n not in had_bias and lin.bias is not None
    )


# ================================================================================================ sequential


def _real(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x.detach()[mask.to(x.device).bool()].float()  # (real tokens, features)


def _block_inputs(adapter: ArchAdapter, batches: list[dict]) -> tuple[list[torch.Tensor], list[list[tuple]]]:
    """Per batch: the hidden states entering block 0, and every block's call (args, kwargs) of one dense forward
    (positions, masks, rotary tables: they do not depend on the weights, so the pruned blocks reuse them)."""
    model = adapter.model
    device = next(model.parameters()).device
    calls: list[list[tuple]] = []
    first: list[torch.Tensor] = []
    current: dict[int, tuple] = {}

    def hook(i: int):
        def fn(_m, args, kwargs):
            current[i] = (args, dict(kwargs))

        return fn

    handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(adapter.layers)]
    try:
        with torch.no_grad():
            for b in batches:
                current.clear()
                model(
                    input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device), use_cache=False
                )
                args0, kwargs0 = current[0]
                first.append((args0[0] if args0 else kwargs0["hidden_states"]).detach())
                calls.append([current[i] for i in range(len(adapter.layers))])
    finally:
        for h in handles:
            h.remove()
    return first, calls


def _run_block(block: nn.Module, hidden: torch.Tensor, call: tuple) -> torch.Tensor:
    args, kwargs = call
    if args:
        out = block(hidden, *args[1:], **kwargs)
    else:
        out = block(**{**kwargs, "hidden_states": hidden})
    return out[0] if isinstance(out, tuple) else out


class _Capture:
    """The inputs of one Linear over the real tokens of the batch being run."""

    def __init__(self, lin: nn.Linear):
        self.x: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        self.handle = lin.register_forward_pre_hook(self._hook)

    def _hook(self, _m, args):
        assert self.mask is not None
        self.x = _real(args[0], self.mask)

    def close(self) -> None:
        self.handle.remove()


def sequential(
    adapter: ArchAdapter, batches: list[dict], kept: dict, mode: str, ridge: float, slice_layer, *, desc: str
) -> None:
    """Slice and compensate block by block, fitting each kept o_proj / down_proj on the inputs the pruned model
    itself gives it (earlier blocks already pruned and compensated) against the dense block's output on the dense
    stream: the fit also takes back the error carried in from earlier blocks (SlimGPT's layer-wise order).

    Per block: one dense forward of the block and three of the pruned one (o_proj's inputs, then down_proj's after
    o_proj is compensated, then the block's output), over all calibration batches: about four model forwards in
    all. One extra block is held in memory (the dense copy of the block being cut). Blocks in
    `kept["dropped_blocks"]` advance the dense stream only; `slice_layer(layer, row)` cuts block `layer` in place
    (original numbering: blocks are dropped after this)."""
    import copy

    d = adapter.head_dim
    masks = [b["attention_mask"] for b in batches]
    dense_h, calls = _block_inputs(adapter, batches)
    pruned_h = [h.clone() for h in dense_h]
    rows = {row["layer"]: row for row in kept["layers"]}
    with torch.no_grad():
        for i in progress(range(len(adapter.layers)), desc=desc, unit="block"):
            block = adapter.layers[i]
            if i not in rows:  # a dropped block: the dense stream goes through it, the pruned one skips it
                dense_h = [_run_block(block, h, c[i]) for h, c in zip(dense_h, calls)]
                continue
            dense_block = copy.deepcopy(block)
            slice_layer(i, rows[i])
            cols = _kept_columns(rows[i], d)
            names = {"o": ("self_attn", "o_proj"), "down": ("mlp", "down_proj")}
            dense_in: dict[str, list[torch.Tensor]] = {"o": [], "down": []}
            caps = {n: _Capture(getattr(getattr(dense_block, a), p)) for n, (a, p) in names.items()}
            next_dense = []
            for h, c, m in zip(dense_h, calls, masks):
                for cap in caps.values():
                    cap.mask = m
                next_dense.append(_run_block(dense_block, h, c[i]))
                for n, cap in caps.items():
                    assert cap.x is not None
                    dense_in[n].append(cap.x)
            for cap in caps.values():
                cap.close()
            for n in ("o", "down"):
                lin = _linear(adapter, i, n)
                dense_lin = _linear_of(dense_block, n)
                cap = _Capture(lin)
                total = cross = p_total = p_gram = None
                count = 0
                for h, c, m, x in zip(pruned_h, calls, masks, dense_in[n]):
                    cap.mask = m
                    _run_block(block, h, c[i])
                    assert cap.x is not None
                    p = cap.x.double()
                    xd = x.double()
                    total = xd.sum(0) if total is None else total + xd.sum(0)
                    p_total = p.sum(0) if p_total is None else p_total + p.sum(0)
                    if needs_gram(mode):
                        cross = xd.T @ p if cross is None else cross + xd.T @ p
                        p_gram = p.T @ p if p_gram is None else p_gram + p.T @ p
                    count += p.shape[0]
                cap.close()
                assert total is not None and p_total is not None
                upd = solve_layer(
                    dense_lin.weight,
                    dense_lin.bias,
                    cols[n],
                    total,
                    cross,
                    count,
                    mode,
                    ridge,
                    pruned_total=p_total,
                    pruned_gram=p_gram,
                )
                lin.weight.data.copy_(upd.weight.to(lin.weight.dtype))
                if upd.bias is not None:
                    _zero_bias(lin)
                    lin.bias.data.copy_(upd.bias.to(lin.bias.dtype))
            pruned_h = [_run_block(block, h, c[i]) for h, c in zip(pruned_h, calls)]
            dense_h = next_dense
            del dense_block, dense_in


def _linear_of(block: nn.Module, name: str) -> nn.Linear:
    return block.self_attn.o_proj if name == "o" else block.mlp.down_proj  # type: ignore[union-attr,return-value]


def finish(adapter: ArchAdapter, mode: str) -> None:
    """After compensation: with a bias mode, every projection the config's bias fields govern gets a bias (zero
    where compensation set none) and the fields are turned on, so stock transformers loads the biases."""
    if not needs_bias(mode):
        return
    for i in range(adapter.num_layers):
        for lin in _projections(adapter, i).values():
            _zero_bias(lin)
    for cfg in {id(c): c for c in (adapter.config, adapter.hf.config.get_text_config())}.values():
        cfg.mlp_bias = True
        cfg.attention_bias = True
