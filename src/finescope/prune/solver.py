"""Width solver: uniform per-layer shapes whose total parameter count hits a target pruning ratio.

The target is the fraction of *total* parameters removed (embeddings included, tied weights counted once), the
paper's ~35%. Every layer keeps the same shape, so the result is a standard config. Attention is coarse (query
heads per KV group, or whole KV groups); the MLP width (a multiple of `mlp_multiple`) is fine and takes up the
rest, so the achieved ratio is within one MLP granule of the target (`granule` = the parameters of one
`mlp_multiple` step in every layer, as a fraction of the total). Among attention choices that reach the target,
the one whose removed fraction is closest to the MLP's is taken: LLM-Pruner prunes attention and MLP at the
same in-layer ratio, and this is the nearest uniform-shape equivalent.

    from finescope.prune.solver import solve
    plan = solve(shapes, 0.35)          # PrunePlan(heads=6, kv_heads=3, intermediate=752, …) on SmolLM2
"""

from __future__ import annotations

from collections.abc import Callable

from .. import FinescopeError
from ..artifacts import PrunePlan
from .structure import Shapes, count_after


class SolverError(FinescopeError):
    """The requested ratio or shapes cannot be reached with uniform layer shapes."""


def _round_multiple(width: float, multiple: int, full: int) -> list[int]:
    """Candidate MLP widths around `width`: multiples of `multiple` in [multiple, full], plus `full` itself."""
    lo = max(multiple, min(full, int(width // multiple) * multiple))
    hi = min(full, lo + multiple)
    cands = {lo, hi}
    if width >= full - multiple:
        cands.add(full)
    return sorted(cands)


def _attention_options(shapes: Shapes, head_mode: str, attention_ratio: float | None) -> list[tuple[int, int]]:
    """(heads, kv_heads) choices, each a uniform GQA layout."""
    g, kv = shapes.group_size, shapes.kv_heads
    if head_mode == "query":
        opts = [(q * kv, kv) for q in range(1, g + 1)]
    else:
        opts = [(k * g, k) for k in range(1, kv + 1)]
    if attention_ratio is None:
        return opts
    want = shapes.heads * (1 - attention_ratio)
    return [min(opts, key=lambda o: (abs(o[0] - want), -o[0]))]


def _plan(
    shapes: Shapes, depth: int, heads: int, kv: int, width: int, target: float | None, granule: float
) -> PrunePlan:
    layers = shapes.layers - depth
    after = count_after(shapes, layers=layers, heads=heads, kv_heads=kv, intermediate=width)
    removed = shapes.total - after
    return PrunePlan(
        layers=layers,
        heads=heads,
        kv_heads=kv,
        head_dim=shapes.head_dim,
        intermediate=width,
        depth=depth,
        params_before=shapes.total,
        params_after=after,
        ratio_target=target,
        ratio_achieved=removed / shapes.total,
        non_embedding_ratio=removed / shapes.non_embedding,
        attention_removed=1 - heads / shapes.heads,
        mlp_removed=1 - width / shapes.intermediate,
        granule=granule,
    )


def solve(
    shapes: Shapes,
    ratio: float,
    *,
    head_mode: str = "query",
    attention_ratio: float | None = None,
    mlp_ratio: float | None = None,
    mlp_multiple: int = 8,
    depth: int = 0,
) -> PrunePlan:
    """Uniform shapes removing `ratio` of all parameters (± one granule), or SolverError naming nearby ratios."""
    _check_request(shapes, ratio, head_mode, depth, mlp_multiple)
    layers = shapes.layers - depth
    attn_opts = _attention_options(shapes, head_mode, attention_ratio)
    widths_for, granule = _mlp_widths(shapes, ratio, layers, head_mode, mlp_ratio, mlp_multiple)
    if attention_ratio is not None and mlp_ratio is not None:
        (h, kv), (w,) = attn_opts[0], widths_for(*attn_opts[0])
        return _plan(shapes, depth, h, kv, w, None, granule)

    # For each attention choice, the MLP width closest to the target; then the best-balanced choice among those.
    plans = [
        min(
            (_plan(shapes, depth, h, kv, w, ratio, granule) for w in widths_for(h, kv)),
            key=lambda p: abs(p.ratio_achieved - ratio),
        )
        for h, kv in attn_opts
    ]
    feasible = [p for p in plans if abs(p.ratio_achieved - ratio) <= granule + 1e-12 and p.params_after < shapes.total]
    if not feasible:
        widths = None if mlp_ratio is None else widths_for(0, 0)
        raise SolverError(_unreachable_message(shapes, ratio, attn_opts, layers, mlp_multiple, depth, granule, widths))
    # Closest in-layer balance first (LLM-Pruner's equal attention/MLP ratio), then closest to the target.
    return min(
        feasible, key=lambda p: (round(abs(p.attention_removed - p.mlp_removed), 6), abs(p.ratio_achieved - ratio))
    )


def _check_request(shapes: Shapes, ratio: float, head_mode: str, depth: int, mlp_multiple: int) -> None:
    if not 0 < ratio < 1:
        raise SolverError(f"ratio = {ratio}: must be in (0, 1)")
    if head_mode not in ("query", "kv_group"):
        raise SolverError(f"head_mode = {head_mode!r}: must be query or kv_group")
    if not 0 <= depth < shapes.layers:
        raise SolverError(
            f"depth = {depth}: must be in [0, {shapes.layers - 1}] (the model has {shapes.layers} blocks)"
        )
    if mlp_multiple > shapes.intermediate:
        raise SolverError(f"mlp_multiple = {mlp_multiple}: larger than the MLP width {shapes.intermediate}")


def _mlp_widths(
    shapes: Shapes, ratio: float, layers: int, head_mode: str, mlp_ratio: float | None, mlp_multiple: int
) -> tuple[Callable[[int, int], list[int]], float]:
    """The MLP widths worth trying for each attention choice (heads, kv heads), and the plan's granule: one
    `mlp_multiple` step of MLP width in every layer, or one attention step when the MLP width is fixed."""
    I = shapes.intermediate
    if mlp_ratio is not None:
        width = (
            I if mlp_ratio == 0 else min(I, max(mlp_multiple, round(I * (1 - mlp_ratio) / mlp_multiple) * mlp_multiple))
        )
        # With the MLP width fixed, attention is the only freedom: its step is the granule.
        step = (
            shapes.kv_heads * shapes.per_query_head
            if head_mode == "query"
            else shapes.group_size * shapes.per_query_head + shapes.per_kv_head
        )
        return (lambda h, kv: [width]), layers * step / shapes.total

    def widths_for(h: int, kv: int) -> list[int]:
        target_after = shapes.total * (1 - ratio)
        base = count_after(shapes, layers=layers, heads=h, kv_heads=kv, intermediate=I)
        channels = (base - target_after) / (layers * shapes.per_channel)
        return _round_multiple(I - channels, mlp_multiple, I)

    return widths_for, layers * mlp_multiple * shapes.per_channel / shapes.total


def reachable_ratios(shapes: Shapes, attn_opts, layers: int, mlp_multiple: int, widths=None) -> list[float]:
    """Every total-parameter ratio reachable with these attention options and MLP widths (sorted)."""
    if widths is None:
        widths = sorted(set(range(mlp_multiple, shapes.intermediate + 1, mlp_multiple)) | {shapes.intermediate})
    out = {
        1 - count_after(shapes, layers=layers, heads=h, kv_heads=kv, intermediate=w) / shapes.total
        for h, kv in attn_opts
        for w in widths
    }
    return sorted(r for r in out if r > 0)


def _unreachable_message(shapes, ratio, attn_opts, layers, mlp_multiple, depth, granule, widths) -> str:
    ratios = reachable_ratios(shapes, attn_opts, layers, mlp_multiple, widths)
    below = [r for r in ratios if r < ratio]
    above = [r for r in ratios if r > ratio]
    near = []
    if below:
        near.append(f"{max(below):.4f}")
    if above:
        near.append(f"{min(above):.4f}")
    where = f" with depth = {depth}" if depth else ""
    return (
        f"ratio = {ratio}: unreachable with uniform layer shapes{where} (granule {granule:.4f}); "
        f"nearest reachable: {' or '.join(near) or 'none'} (reachable range "
        f"{ratios[0]:.4f}…{ratios[-1]:.4f})"
        if ratios
        else f"ratio = {ratio}: nothing can be pruned with these settings"
    )
