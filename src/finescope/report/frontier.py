"""The size/quality frontier in the report: a JSON file written by `benchmarks/frontier.py` (pruned models at several
ratios, before any training, and dense; with `--run`, each ratio's recovered model too), drawn as domain NLL against
parameters with dense as the reference line and the run's own pick marked, and told in one sentence per ratio.

The report takes `finescope report RUN --frontier FILE`, else `RUN/frontier.json` when there is one. A file that is
not JSON or lacks a field is refused in one line naming the file and the field."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import FinescopeError

FILE = "frontier.json"


class FrontierError(FinescopeError):
    """A frontier file that cannot be used: missing, not JSON, or without a field the report needs."""


@dataclass
class Quality:
    nll: float
    top1: float | None


@dataclass
class Point:
    ratio: float
    parameters: int
    domain: Quality
    off_domain: Quality | None
    recovered: Quality | None = None
    """The domain quality of the same pruned model after the frontier's recovery (`Frontier.recovered_label`)."""
    recovered_off_domain: Quality | None = None


@dataclass
class Frontier:
    path: Path
    domain_task: str
    off_domain_task: str | None
    dense: Point
    points: list[Point]
    """Sorted by parameters, largest first."""
    recovery: str
    """What the points had after pruning ("none": prune + compensation only)."""
    throughput: float | None
    """The measuring machine's plain forward tok/s."""
    recovered_label: str | None = None
    """The recovery of the points' `recovered` figures (e.g. "FineScope + KD"); None: the file has none."""


def _field(path: Path, data: Any, where: str, key: str, kind: str, required: bool = True) -> Any:
    name = f"{where}.{key}" if where else key
    if not isinstance(data, dict):
        raise FrontierError(f"{path}: field {where or '(top level)'!r} should be an object; not a frontier file")
    if key not in data or data[key] is None:
        if not required:
            return None
        raise FrontierError(f"{path}: missing field {name!r}; write it with benchmarks/frontier.py --out")
    value = data[key]
    ok = {
        "number": isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
        "positive": isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0,
        "string": isinstance(value, str) and bool(value),
        "list": isinstance(value, list) and bool(value),
        "object": isinstance(value, dict),
    }[kind]
    if not ok:
        want = {"positive": "a positive number", "list": "a non-empty list"}.get(kind, f"a {kind}")
        raise FrontierError(f"{path}: field {name!r} should be {want}, not {json.dumps(value)[:40]}")
    return value


def _quality(path: Path, data: Any, where: str, task: str, required: bool = True) -> Quality | None:
    q = _field(path, data, where, task, "object", required)
    if q is None:
        return None
    at = f"{where}.{task}" if where else task
    nll = _field(path, q, at, "nll", "number")
    top1 = _field(path, q, at, "top1", "number", required=False)
    return Quality(float(nll), float(top1) if top1 is not None else None)


def _point(path: Path, data: Any, where: str, domain: str, off: str | None, ratio: float | None) -> Point:
    r = ratio if ratio is not None else float(_field(path, data, where, "ratio", "number"))
    rec = _field(path, data, where, "recovered", "object", required=False) if ratio is None else None
    at = f"{where}.recovered"
    return Point(
        ratio=r,
        parameters=int(_field(path, data, where, "parameters", "positive")),
        domain=_quality(path, data, where, domain),  # type: ignore[arg-type]
        off_domain=_quality(path, data, where, off, required=False) if off else None,
        recovered=_quality(path, rec, at, domain) if rec is not None else None,
        recovered_off_domain=_quality(path, rec, at, off, required=False) if rec is not None and off else None,
    )


def read(path: str | Path) -> Frontier:
    """Read and check a frontier file (`benchmarks/frontier.py --out`)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FrontierError(f"{path}: no such frontier file (write one with benchmarks/frontier.py --out)") from None
    except (OSError, ValueError) as e:
        reason = " ".join(str(e).split())[:120]
        raise FrontierError(f"{path}: not a readable JSON file ({reason})") from None
    domain = _field(path, data, "", "domain_task", "string")
    off = _field(path, data, "", "off_domain_task", "string", required=False)
    dense = _point(path, _field(path, data, "", "dense", "object"), "dense", domain, off, 0.0)
    raw = _field(path, data, "", "points", "list")
    points = [_point(path, p, f"points[{i}]", domain, off, None) for i, p in enumerate(raw)]
    prune = data.get("prune") if isinstance(data.get("prune"), dict) else {}
    tput = data.get("reference_forward_tok_s")
    labels = [p["recovered"].get("label") or p["recovered"].get("variant") for p in raw if p.get("recovered")]
    return Frontier(
        path=path,
        domain_task=domain,
        off_domain_task=off,
        dense=dense,
        points=sorted(points, key=lambda p: -p.parameters),
        recovery=str(prune.get("recovery", "none")),
        throughput=float(tput) if isinstance(tput, (int, float)) and not isinstance(tput, bool) else None,
        recovered_label=str(labels[0]) if labels else None,
    )


def find(run_dir: Path, given: str | Path | None) -> Frontier | None:
    """The frontier the report draws: the file given, else `<run>/frontier.json` when present, else None."""
    if given is not None:
        return read(given)
    own = Path(run_dir) / FILE
    return read(own) if own.exists() else None


def sentences(f: Frontier) -> list[str]:
    """One sentence per ratio: the share of dense quality it keeps (top-1 as % of dense; NLL as × dense and the
    perplexity ratio)."""
    d = f.dense
    out = []
    for p in f.points:
        size = f"{p.parameters / 1e6:.1f}M parameters, {100 * p.parameters / d.parameters:.0f}% of dense"
        nll = (
            f"{f.domain_task} NLL {p.domain.nll:.3f} = {p.domain.nll / d.domain.nll:.2f}× dense's "
            f"{d.domain.nll:.3f} (perplexity {math.exp(p.domain.nll - d.domain.nll):.2f}× dense)"
        )
        top1 = ""
        if p.domain.top1 is not None and d.domain.top1:
            top1 = f"{100 * p.domain.top1 / d.domain.top1:.0f}% of dense top-1 token accuracy and "
        off = ""
        if p.off_domain is not None and d.off_domain is not None and d.off_domain.nll > 0:
            off = f"; off-domain {f.off_domain_task} NLL {p.off_domain.nll / d.off_domain.nll:.2f}× dense"
        when = " before any training" if p.recovered is not None else ""
        after = ""
        if p.recovered is not None:
            r = p.recovered
            kept = (
                f", {100 * r.top1 / d.domain.top1:.0f}% of dense top-1" if r.top1 is not None and d.domain.top1 else ""
            )
            after = f" After {f.recovered_label}: NLL {r.nll:.3f} = {r.nll / d.domain.nll:.2f}× dense{kept}"
            ro = p.recovered_off_domain
            if ro is not None and d.off_domain is not None and d.off_domain.nll > 0:
                after += f"; off-domain {ro.nll / d.off_domain.nll:.2f}× dense"
            after += "."
        out.append(f"Ratio {p.ratio:g} ({size}) keeps {top1}has {nll}{off}{when}.{after}")
    return out


def plot(f: Frontier, marks: list[tuple[str, int, float]]) -> bytes:
    """Domain NLL against parameters: the frontier's points (ratio labels), dense as a dashed horizontal line at its
    NLL (and a point at its size), and each of `marks` (label, parameters, NLL: the run's own variants) as a star."""
    from .plots import _plt, _png

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    xs = [p.parameters / 1e6 for p in f.points]
    ys = [p.domain.nll for p in f.points]
    label = "pruned" + (" + compensation, no recovery" if f.recovery == "none" else f" + {f.recovery}")
    ax.plot(xs, ys, marker="o", color="#1f77b4", label=f"frontier: {label}")
    for p, x, y in zip(f.points, xs, ys):
        ax.annotate(f"r={p.ratio:g}", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    rec = [(p.parameters / 1e6, p.recovered.nll) for p in f.points if p.recovered is not None]
    if rec:
        ax.plot(
            *zip(*rec),
            marker="D",
            color="#8c564b",
            label=f"frontier: {f.recovered_label} (same pruned models, recovered)",
        )
    ax.axhline(f.dense.domain.nll, color="k", ls="--", lw=1, label=f"dense ({f.dense.domain.nll:.3f})")
    ax.plot([f.dense.parameters / 1e6], [f.dense.domain.nll], marker="s", color="k", ls="")
    colours = ["#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
    for i, (name, params, nll) in enumerate(marks):
        ax.plot(
            [params / 1e6], [nll], marker="*", ms=14, ls="", color=colours[i % len(colours)], label=f"this run: {name}"
        )
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel(f"{f.domain_task} NLL (lower is better)")
    ax.set_title("size / quality frontier", fontsize=9)
    ax.legend(fontsize=7)
    return _png(fig)
