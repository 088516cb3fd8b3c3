"""PNG plots of a collected run (matplotlib, Agg backend): each function returns PNG bytes, or None if no data."""

from __future__ import annotations

import io as _io
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..artifacts import CurateMetrics, PruneReport
    from .tables import Recovery


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = _io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    _plt().close(fig)
    return buf.getvalue()


def metrics_per_variant(data: dict) -> bytes | None:
    """One bar panel per metric: value per variant, dense dashed as the reference."""
    cols, rows = data["columns"], data["rows"]
    if not cols or not rows:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(cols), figsize=(2.2 + 2.8 * len(cols), 3.8 + 0.12 * len(rows)), squeeze=False)
    for ax, c in zip(axes[0], cols):
        vals = [r.values.get(c.key) for r in rows]
        errs = [r.stderr.get(c.key) or 0 for r in rows]
        ys = range(len(rows))
        ax.barh(
            list(ys),
            [v if v is not None else 0 for v in vals],
            xerr=errs,
            color=["#888" if r.name == "dense" else ("#d62728" if r.name == "pruned_tgd" else "#1f77b4") for r in rows],
            capsize=2,
        )
        ax.set_yticks(list(ys))
        ax.set_yticklabels([r.label for r in rows] if ax is axes[0][0] else [""] * len(rows), fontsize=8)
        ax.invert_yaxis()
        if data["dense"] is not None and data["dense"].values.get(c.key) is not None:
            ax.axvline(data["dense"].values[c.key], color="k", ls="--", lw=1)
        ax.set_title(
            c.label.replace(" ", "\n", 1) + ("\n(higher is better)" if c.higher_better else "\n(lower is better)"),
            fontsize=8,
        )
    return _png(fig)


def score_histograms(curations: dict[str, Path]) -> bytes | None:
    """Selection-score histogram of selected vs rest, one panel per curation with scores (SAE, embedding)."""
    import pyarrow.parquet as pq

    tables = {}
    for label, folder in curations.items():
        path = folder / "scores.parquet"
        if path.is_file():
            t = pq.read_table(path, columns=["score", "selected"]).to_pydict()
            if len(set(t["score"])) > 1:
                tables[label] = t
    if not tables:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(tables), figsize=(4.5 * len(tables), 3.2), squeeze=False)
    for ax, (label, t) in zip(axes[0], tables.items()):
        sel = [s for s, k in zip(t["score"], t["selected"]) if k]
        rest = [s for s, k in zip(t["score"], t["selected"]) if not k]
        lo, hi = min(t["score"]), max(t["score"])
        bins = [lo + (hi - lo) * i / 40 for i in range(41)]
        ax.hist(rest, bins=bins, alpha=0.6, label=f"rest ({len(rest)})", color="#999")
        ax.hist(sel, bins=bins, alpha=0.8, label=f"selected ({len(sel)})", color="#d62728")
        ax.set_yscale("log")
        ax.set_xlabel("score (max cosine to a seed)")
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=8)
    return _png(fig)


def sae_curves(metrics: CurateMetrics | None) -> bytes | None:
    """FVU, L0 and dead fraction over SAE training steps, per hook layer."""
    sae = metrics.sae_curation.sae if metrics is not None and metrics.sae_curation is not None else {}
    layers = {k: v.curves for k, v in sae.items() if v.curves.get("step")}
    if not layers:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for layer, c in layers.items():
        for ax, key in zip(axes, ("fvu", "l0", "dead_fraction")):
            ax.plot(c["step"], c[key], label=layer)
    for ax, key in zip(axes, ("FVU (reconstruction)", "L0 (active latents / token)", "dead latent fraction")):
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    return _png(fig)


def kept_widths(prunes: dict[str, PruneReport | None]) -> bytes | None:
    """Shapes before/after (layers, heads, KV heads, MLP width) and per-layer importance mass kept."""
    reports = {k: v for k, v in prunes.items() if v}
    if not reports:
        return None
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 3.4))
    keys = ("layers", "attention_heads", "kv_heads", "mlp_width")
    first = next(iter(reports.values()))
    width = 0.8 / (len(reports) + 1)
    xs = range(len(keys))
    a.bar([x for x in xs], [1.0] * len(keys), width, label="dense", color="#999")
    for i, (label, p) in enumerate(reports.items(), 1):
        a.bar(
            [x + i * width for x in xs],
            [getattr(p.shapes_after, k) / getattr(first.shapes_before, k) for k in keys],
            width,
            label=f"{label} (−{100 * p.parameters.ratio:.0f}% params)",
        )
    a.set_xticks([x + width * len(reports) / 2 for x in xs])
    a.set_xticklabels([f"{k}\n{getattr(first.shapes_before, k)}" for k in keys], fontsize=8)
    a.set_ylabel("kept fraction")
    a.set_title("kept widths (dense size under each label)", fontsize=9)
    a.set_ylim(0, 1.35)  # headroom so the legend never hides a bar
    a.legend(fontsize=7, loc="upper center", ncol=min(len(reports) + 1, 3))
    for label, p in reports.items():
        rows = [r for r in p.importance_summary if not r.dropped]
        b.plot(
            [r.layer for r in rows],
            [r.scores.get("heads_kept_score_fraction") for r in rows],
            marker="o",
            ms=3,
            label=f"{label}: heads",
        )
        b.plot(
            [r.layer for r in rows],
            [r.scores.get("channels_kept_score_fraction") for r in rows],
            marker="s",
            ms=3,
            ls="--",
            label=f"{label}: MLP channels",
        )
    b.set_xlabel("layer")
    b.set_ylabel("importance mass kept")
    b.set_title("per-layer importance kept", fontsize=9)
    b.legend(fontsize=7)
    return _png(fig)


def ratio_sweep(sweep: list[dict]) -> bytes | None:
    """Domain NLL vs pruning ratio (no recovery)."""
    if len(sweep) < 2:
        return None
    tasks = sorted({t for s in sweep for t in s["results"]})
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for t in tasks:
        pts = [(s["achieved"], s["results"][t]) for s in sweep if t in s["results"]]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=t)
    ax.set_xlabel("fraction of parameters removed")
    ax.set_ylabel("NLL")
    ax.set_title("domain NLL vs pruning ratio (no recovery)", fontsize=9)
    ax.legend(fontsize=8)
    return _png(fig)


def train_curve(points: list) -> tuple[list[float], str]:
    """The per-step training figure to draw beside the held-out loss, and its legend text: the step's CE (the
    held-out loss's measure); in runs written before `ce` was recorded, the step's loss, named as the objective
    when a KD or hidden-state term is mixed into it (it is then not comparable with the held-out CE)."""
    if all(p.ce is not None for p in points):
        return [p.ce for p in points], "train CE"
    terms = ["KD"] if any(p.kd is not None for p in points) else []
    terms += ["hidden"] if any(p.hidden is not None for p in points) else []
    return [p.loss for p in points], f"train objective (CE + {' + '.join(terms)})" if terms else "train CE"


def recovery_curves(recovers: dict[str, Recovery | None]) -> bytes | None:
    """Per-step training CE and per-epoch held-out CE (response tokens, nats) of each recovery."""
    histories = {k: v.metrics.train for k, v in recovers.items() if v and v.metrics.train.train_loss}
    if not histories:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for label, train in histories.items():
        values, what = train_curve(train.train_loss)
        (line,) = ax.plot([p.step for p in train.train_loss], values, label=f"{label} {what}")
        spe = max(1, train.total_steps or 1) / max(1e-9, max(p.epoch for p in train.eval_loss) or 1)
        ax.plot(
            [p.epoch * spe for p in train.eval_loss],
            [p.loss for p in train.eval_loss],
            ls="--",
            marker="o",
            color=line.get_color(),
            label=f"{label} held-out CE",
        )
    ax.set_xlabel("step")
    ax.set_ylabel("nats / response token")
    ax.set_title("recovery fine-tuning: training per step, held-out CE per epoch", fontsize=9)
    ax.legend(fontsize=7)
    return _png(fig)
