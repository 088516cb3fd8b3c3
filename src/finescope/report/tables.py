"""Collect a run directory (pipeline.json + stage folders) into plain data, and render tables as Markdown/HTML.

Stage files are read through their types in finescope/artifacts.py (a file that is absent is a stage that has not
run; an incomplete one is an error naming the file and the field)."""

from __future__ import annotations

import dataclasses
import html
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..artifacts import (
    CurateFeatures,
    CurateMetrics,
    EvalResults,
    PipelineManifest,
    PruneMetrics,
    PruneReport,
    RecoverMetrics,
    SharedLatent,
)
from ..storage import CONFIG, METRICS

LOWER_IS_BETTER = {"nll", "perplexity", "looping", "cut_off"}
"""Metrics where less is better: NLL and perplexity, and the `answers:` tasks' shares of looping and cut-off replies."""


@dataclass
class Column:
    key: str
    label: str
    higher_better: bool


@dataclass
class Row:
    name: str
    label: str
    pruned: bool
    data: str
    recovery: str
    params: int | None
    values: dict[str, float | None] = field(default_factory=dict)
    stderr: dict[str, float | None] = field(default_factory=dict)
    n: dict[str, int] = field(default_factory=dict)
    chance: dict[str, float | None] = field(default_factory=dict)
    """A random guess's value per column, from the results file (None: not recorded, or not an accuracy)."""
    examples: dict[str, list[dict]] = field(default_factory=dict)
    """Task → the first answers an `answers:` task kept in its results (question, reference, answer, checks)."""


def _stage_config(folder: Path) -> dict[str, Any]:
    """The resolved config a stage folder records in config.json ({} when there is none)."""
    try:
        data = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data.get("config", {}) if isinstance(data, dict) else {}


DATA_NAMES = {
    "sae": "FineScope",
    "random": "Random",
    "full": "Full pool",
    "embedding": "embedding kNN",
    "dsir": "DSIR (hashed n-grams)",
}


def _data_name(data: str | None, prune: str | None) -> str:
    if data is None:
        return "–"
    name = DATA_NAMES.get(data) or (f"FineScope ({data.split(':', 1)[1]})" if data.startswith("sae:") else data)
    return f"{name}; generic calib." if prune == "generic" else name


def results_of(folder: Path) -> EvalResults | None:
    return EvalResults.read_if_exists(folder / EvalResults.FILE)


def _warn_unknown_variants(run_dir: Path, variants: dict) -> None:
    """A pipeline.json variant that finescope does not define (edited by hand, or from another version) is
    reported as written, with a warning naming it."""
    from ..variants import VARIANTS

    unknown = [n for n in variants if n not in VARIANTS and not n.startswith("sweep@")]
    if unknown:
        warnings.warn(
            f"{run_dir / PipelineManifest.FILE}: unknown variant(s) {', '.join(map(repr, unknown[:5]))} (finescope "
            f"defines {', '.join(VARIANTS)}); reported as written, without their description",
            stacklevel=2,
        )


def collect(run_dir: Path) -> dict:
    """Everything the report shows, from files only."""
    run_dir = Path(run_dir)
    manifest = PipelineManifest.read_if_exists(run_dir / PipelineManifest.FILE) or PipelineManifest()
    columns: dict[str, Column] = {}
    rows: list[Row] = []
    sweep: list[dict] = []
    _warn_unknown_variants(run_dir, manifest.variants)
    for name, v in manifest.variants.items():
        stages = {s: run_dir / p for s, p in v.stages.items()}
        res = results_of(stages["eval"]) if "eval" in stages else None
        if name.startswith("sweep@"):
            if res:
                sweep.append(_sweep_point(name, stages, res))
            continue
        row = Row(
            name,
            v.label,
            v.prune is not None,
            _data_name(v.data, v.prune),
            v.recovery.upper() if v.recovery else "–",
            res.model.parameters if res else None,
        )
        for r in res.results if res else []:
            key = f"{r.task}|{r.variant}|{r.metric}"
            columns.setdefault(key, Column(key, f"{r.task} {r.metric}", r.metric not in LOWER_IS_BETTER))
            row.values[key], row.stderr[key], row.n[key], row.chance[key] = r.value, r.stderr, r.n, r.chance
            if isinstance(r.extra.get("examples"), list):
                row.examples[r.task] = r.extra["examples"]
        rows.append(row)
    # Two scoring variants of one task and metric: say which is which.
    labels = [c.label for c in columns.values()]
    for c in columns.values():
        if labels.count(c.label) > 1:
            c.label += f" [{c.key.split('|')[1]}]"
    return {
        "run_dir": run_dir,
        "manifest": manifest,
        "columns": list(columns.values()),
        "rows": rows,
        "sweep": sorted(sweep, key=lambda s: s["ratio"]),
        "dense": next((r for r in rows if r.name == "dense"), None),
        "stages": stage_summaries(run_dir, manifest),
    }


def _sweep_point(name: str, stages: dict[str, Path], res: EvalResults) -> dict:
    """A `sweep@<ratio>` variant: the ratio asked for, the ratio achieved, and its results per task."""
    ratio = float(name.split("@", 1)[1])
    prune_metrics = PruneMetrics.read_if_exists(stages["prune"] / PruneMetrics.FILE) if "prune" in stages else None
    achieved = (prune_metrics.ratio_achieved if prune_metrics else ratio) if ratio else 0.0
    results: dict[str, float | None] = {}
    for r in res.results:
        results.setdefault(r.task, r.value)  # a task's first result: the NLL of an nll: task, not its top-1
    return {"ratio": ratio, "achieved": achieved, "results": results}


def stage_summaries(run_dir: Path, manifest: PipelineManifest) -> list[dict]:
    """One entry per stage folder used by the run: stage, folder, seconds, the variants that use it."""
    used: dict[str, list[str]] = {}
    for name, v in manifest.variants.items():
        for p in v.stages.values():
            used.setdefault(p, []).append(name)
    out = []
    for rel, names in used.items():
        folder = run_dir / rel
        stage = rel.split("/", 1)[0]
        secs = manifest.stage_seconds.get(rel)
        if secs is None:
            secs = _stage_seconds(stage, folder)
        out.append(
            {"stage": stage, "folder": rel, "seconds": secs, "variants": names, "done": (folder / "DONE").is_file()}
        )
    order = {"curate": 0, "prune": 1, "recover": 2, "eval": 3}
    return sorted(out, key=lambda e: (order.get(e["stage"], 9), e["folder"]))


def _stage_seconds(stage: str, folder: Path) -> float | None:
    """Wall time a stage recorded itself (when the pipeline did not time it, e.g. a stage run by hand)."""
    if stage == "curate":
        cm = CurateMetrics.read_if_exists(folder / METRICS)
        return cm.timings_s.get("total") if cm else None
    if stage == "prune":
        pm = PruneMetrics.read_if_exists(folder / METRICS)
        return pm.wall_time_s if pm else None
    if stage == "recover":
        rm = RecoverMetrics.read_if_exists(folder / METRICS)
        return rm.seconds.get("total") if rm else None
    if stage == "eval":
        res = results_of(folder)
        return res.wall_s if res else None
    return None


# ================================================================================================ formatting


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def relative(row: Row, dense: Row | None, col: Column) -> str:
    """% of dense for a higher-is-better metric (none when dense is at chance: `at_chance`); the difference to
    dense for NLL."""
    if dense is None or row is dense:
        return ""
    v, d = row.values.get(col.key), dense.values.get(col.key)
    if v is None or d is None:
        return ""
    if col.higher_better:
        return f"{100 * v / d:.0f}%" if d and not at_chance(dense, col) else ""
    return f"{v - d:+.2f}"


def chance_reason(dense: Row, col: Column) -> str | None:
    """Why the dense value of a ↑ column cannot serve as a reference (None when it can): no value, no chance level
    recorded, not distinguishable from chance — the lower end of the one-sided 95 % Wilson interval of the dense
    value over its n questions is at or below the task's chance level (1/choices for multiple choice, 0 for generated
    answers, code and top-1; recorded in the results file) —, or too few hits (`few_counts`)."""
    v, n, chance = dense.values.get(col.key), dense.n.get(col.key), dense.chance.get(col.key)
    if v is None or not n:
        return "no dense value"
    if chance is None:
        return f"no chance level recorded ({OLD_RESULTS})"
    if wilson_lower(v, n) <= chance:
        return f"dense {fmt(v)} is not distinguishable from chance {chance:.3g} at n = {n}"
    return few_counts(dense, col)


MIN_HITS = 5
"""A ↑ metric whose dense value counts fewer hits than this over its n questions (v·n < 5, the usual bound for a
proportion's normal approximation) gives no % of dense: 0 of 60 against dense's 2 of 60 is "0 %" by two questions."""


def few_counts(dense: Row, col: Column) -> str | None:
    """Why a % of dense would be a ratio of a few counts (dense scores under `MIN_HITS` of its n), or None."""
    v, n = dense.values.get(col.key), dense.n.get(col.key)
    if v is None or not n or v * n >= MIN_HITS:
        return None
    return f"dense {fmt(v)} is {v * n:.0f} of {n}: a % of dense would be a ratio of a few counts"


def above_chance(dense: Row, col: Column) -> bool:
    """The dense value of a ↑ column is distinguishable from its task's chance level (`chance_reason`)."""
    return chance_reason(dense, col) is None


def at_chance(dense: Row, col: Column) -> bool:
    """The dense value of a ↑ column is known to be at or below chance: a chance level is recorded and the dense
    value is not distinguishable from it. (A file without a chance level cannot tell: its % stays.)"""
    return dense.chance.get(col.key) is not None and bool(dense.n.get(col.key)) and not above_chance(dense, col)


def mean_percent(row: Row, dense: Row | None, columns: list[Column]) -> float | None:
    """Mean % of dense over the higher-is-better ones of `columns` (None when there are none or dense is 0); the
    results table passes the columns of `summary_columns`."""
    if dense is None:
        return None
    vals = [
        100 * v / d
        for c in columns
        if c.higher_better and (v := row.values.get(c.key)) is not None and (d := dense.values.get(c.key))
    ]
    return sum(vals) / len(vals) if vals else None


CHANCE_Z = 1.6449
"""z of a one-sided 95 % interval."""
SUMMARY_HEADER = "mean % of dense (↑ metrics above chance)"
OLD_RESULTS = "results from an older finescope: delete that eval folder and rerun"


def wilson_lower(p: float, n: int, z: float = CHANCE_Z) -> float:
    """Lower end of the one-sided Wilson score interval of a proportion `p` observed over `n` trials."""
    p = min(max(p, 0.0), 1.0)
    z2 = z * z
    centre = p + z2 / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return (centre - half) / (1 + z2 / n)


def summary_columns(data: dict) -> tuple[list[Column], list[tuple[Column, str]]]:
    """The ↑ columns the "mean % of dense" summary averages, and those it leaves out with the reason.

    A column counts when its *dense* value is distinguishable from its task's chance level (recorded in the
    results file: 1/choices for multiple choice, 0 for generated answers, code and top-1): the lower end of the
    one-sided 95 % Wilson interval of the dense value over its n questions lies above chance. A pass@1 averaged
    over several samples per problem, and top-1 over tokens, are treated as n Bernoulli trials (n = problems,
    documents: the conservative count). A results file without a chance level (written before finescope
    recorded it) cannot be checked, so its columns are left out rather than trusted."""
    dense = data["dense"]
    used: list[Column] = []
    left: list[tuple[Column, str]] = []
    for c in data["columns"]:
        if not c.higher_better or dense is None:
            continue
        reason = chance_reason(dense, c)
        if reason is None:
            used.append(c)
        else:
            left.append((c, reason))
    return used, left


def summary_note(data: dict) -> str | None:
    """One sentence for under the results table: which metrics the mean % of dense averages and why the others
    are left out (None when the table has no such column)."""
    if data["dense"] is None or not any(c.higher_better for c in data["columns"]):
        return None
    used, left = summary_columns(data)
    rule = (
        "distinguishable from chance (the lower end of its one-sided 95 % Wilson interval lies above the task's "
        f"chance level) and counts at least {MIN_HITS} hits"
    )
    why = "; left out: " + "; ".join(f"{c.label} — {reason}" for c, reason in left) if left else ""
    if not used:
        return f"Mean % of dense: – for every variant, as no ↑ metric's dense value is {rule}{why}."
    names = ", ".join(c.label for c in used)
    return f"Mean % of dense: averaged over {names}, the ↑ metrics whose dense value is {rule}{why}."


def results_table(data: dict) -> tuple[list[str], list[list[str]]]:
    """Header and body of the results table: Model | Pruned | Data | Recovery | Params | metrics (% of dense) |
    mean % of dense over the ↑ metrics whose dense value is above chance (`summary_columns`, `summary_note`)."""
    cols, dense = data["columns"], data["dense"]
    header = ["Variant", "Pruned", "Data", "Recovery", "Params (M)"]
    header += [c.label + (" ↑" if c.higher_better else " ↓") for c in cols]
    has_pct = dense is not None and any(c.higher_better for c in cols)
    summary = summary_columns(data)[0] if has_pct else []
    if has_pct:
        header.append(SUMMARY_HEADER)
    body = []
    for r in data["rows"]:
        line = [r.label, "✓" if r.pruned else "✗", r.data, r.recovery, f"{r.params / 1e6:.1f}" if r.params else "–"]
        for c in cols:
            rel = relative(r, dense, c)
            line.append(fmt(r.values.get(c.key)) + (f" ({rel})" if rel else ""))
        if has_pct:
            mp = mean_percent(r, dense, summary)
            line.append("reference" if r is dense else (f"{mp:.0f}%" if mp is not None else "–"))
        body.append(line)
    return header, body


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(esc, row)) + " |" for row in body]
    return "\n".join(lines) + "\n"


def html_table(header: list[str], body: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def timings_table(data: dict) -> tuple[list[str], list[list[str]]]:
    body = [
        [
            s["stage"],
            s["folder"],
            fmt(s["seconds"], 0) if s["seconds"] is not None else "–",
            "yes" if s["done"] else "no",
            ", ".join(s["variants"]),
        ]
        for s in data["stages"]
    ]
    total = sum(s["seconds"] or 0 for s in data["stages"])
    body.append(["total", "", f"{total:.0f}", "", ""])
    return ["Stage", "Folder", "Seconds", "Done", "Used by"], body


# ================================================================================================ evidence


def main_folder(
    data: dict, stage: str, prefer: tuple[str, ...] = ("pruned_tgd", "pruned", "pruned_sft", "dense_curated")
) -> Path | None:
    """The stage folder of the run's headline variant (FineScope first), else of any variant that has one."""
    variants = data["manifest"].variants
    names = [n for n in prefer if n in variants] + [n for n in variants if n not in prefer]
    for n in names:
        rel = variants[n].stages.get(stage)
        if rel:
            return data["run_dir"] / rel
    return None


@dataclass
class SelectionEvidence:
    """What the report shows of one curation."""

    metrics: CurateMetrics | None
    """None while the curation has not finished."""
    latents: dict[str, list[SharedLatent]]
    """Per layer: the top shared latents, each with its first snippets (text whitespace-folded, cut)."""
    selected: list[dict]
    """The first selected records: rank, id, source, score, nearest_seed, text (folded, cut)."""
    config: dict[str, Any]
    """The curation's resolved config."""


def selection_evidence(curate: Path, latents: int = 8, snippets: int = 2, records: int = 8) -> SelectionEvidence:
    """Top shared SAE latents with snippets, a sample of selected records, and the selection statistics."""
    features = CurateFeatures.read_if_exists(curate / CurateFeatures.FILE) or CurateFeatures()
    shown = {
        layer: [
            dataclasses.replace(
                f,
                top_pool_snippets=[
                    dataclasses.replace(s, text=" ".join(s.text.split())[:160]) for s in f.top_pool_snippets[:snippets]
                ],
            )
            for f in feats[:latents]
        ]
        for layer, feats in features.layers.items()
    }
    return SelectionEvidence(
        metrics=CurateMetrics.read_if_exists(curate / CurateMetrics.FILE),
        latents=shown,
        selected=_first_selected(curate / "selected.jsonl", records),
        config=_stage_config(curate),
    )


def _first_selected(path: Path, records: int) -> list[dict]:
    selected: list[dict] = []
    if path.is_file():
        with open(path, encoding="utf-8") as f:
            for line in f:
                if len(selected) >= records:
                    break
                r = json.loads(line)
                text = r.get("text") or f"{r.get('instruction', '')} → {r.get('response', '')}"
                selected.append(
                    {
                        "rank": r.get("rank"),
                        "id": r.get("id"),
                        "source": r.get("source"),
                        "score": r.get("score"),
                        "nearest_seed": r.get("nearest_seed"),
                        "text": " ".join(text.split())[:220],
                    }
                )
    return selected


def prune_report(prune: Path) -> PruneReport | None:
    return PruneReport.read_if_exists(prune / PruneReport.FILE)


@dataclass
class Recovery:
    """A recover stage folder as the report shows it: its metrics and the recipe in its config."""

    metrics: RecoverMetrics
    recipe: dict[str, Any]
    """The stage's resolved RecoverConfig as its config.json records it ({} when there is none)."""

    @property
    def eval_loss_first(self) -> float | None:
        ev = self.metrics.train.eval_loss
        return ev[0].loss if ev else None

    @property
    def eval_loss_last(self) -> float | None:
        ev = self.metrics.train.eval_loss
        return ev[-1].loss if ev else None


def recovery_mode(m: RecoverMetrics) -> str:
    """What a recovery trained on and how: `tgd`, `sft`, plus KD (α, τ, direction, scope), full fine-tuning and
    added data when used."""
    parts = [m.mode]
    if m.kd is not None:
        scope = ", every token" if m.kd.scope == "all" else ""
        parts.append(f"KD α={m.kd.weight:g} τ={m.kd.temperature:g} {m.kd.loss}{scope}")
    if m.adapter != "lora":
        parts.append(f"{m.adapter} fine-tuning")
    if m.data is not None and (m.data.next_ranked or m.data.replay):
        parts.append(f"+{m.data.next_ranked} next-ranked, +{m.data.replay} replay records")
    return " + ".join(parts)


def recovery(recover: Path) -> Recovery | None:
    m = RecoverMetrics.read_if_exists(recover / RecoverMetrics.FILE)
    if m is None:
        return None
    cfg = _stage_config(recover)
    return Recovery(metrics=m, recipe=cfg)
