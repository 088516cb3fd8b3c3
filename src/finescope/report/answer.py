"""The answer the report leads with: which compact model to take, where it is, its size, and its domain and
off-domain quality against dense.

Which tasks are domain: every task of `eval.tasks` except those the run's config names in `eval.off_domain` (the
default preset: `nll:code`, text no pool contains, next to the maths tasks). The headline metric of a task is its
first result (the NLL of an `nll:` task; the accuracy of a multiple-choice one), skipped when its dense value is at
chance (`tables.above_chance`): a variant cannot be told apart by a metric the dense model only guesses at. The
pick is the compact variant (pruned, with results) best on the first domain task with a usable headline metric; a
tie goes to the smaller model, then to the earlier row."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from .tables import Column, Row, above_chance, chance_reason, few_counts, fmt


@dataclass
class Answer:
    row: Row
    """The variant to take."""
    model_dir: Path | None
    """Its model folder (None when the variant has neither a recover nor a prune stage)."""
    domain: list[Column]
    """The domain tasks' columns (headline first)."""
    off_domain: list[Column]
    """The off-domain tasks' columns."""
    headline: Column
    """The column the pick was made on."""


def task_roles(data: dict) -> tuple[list[str], list[str]]:
    """(domain tasks, off-domain tasks) in `eval.tasks` order; a task only in the results (a run whose config has no
    eval section) counts as domain."""
    ev = data["manifest"].config.get("eval") or {}
    off = [str(t) for t in ev.get("off_domain") or []]
    tasks = [str(t) for t in ev.get("tasks") or []]
    for c in data["columns"]:
        task = c.key.split("|", 1)[0]
        if task not in tasks:
            tasks.append(task)
    return [t for t in tasks if t not in off], [t for t in tasks if t in off]


def _columns_of(data: dict, tasks: list[str]) -> list[Column]:
    return [c for t in tasks for c in data["columns"] if c.key.split("|", 1)[0] == t]


def headline_column(data: dict, tasks: list[str]) -> Column | None:
    """The first task's first metric whose dense value says something (↓ metrics always; ↑ ones above chance)."""
    dense = data["dense"]
    for task in tasks:
        cols = [c for c in data["columns"] if c.key.split("|", 1)[0] == task]
        for c in cols[:1]:
            if dense is not None and dense.values.get(c.key) is None:
                continue
            if not c.higher_better or (dense is not None and above_chance(dense, c)):
                return c
    return None


def model_dir(data: dict, name: str) -> Path | None:
    stages = data["manifest"].variants[name].stages
    stage = stages.get("recover") or stages.get("prune")
    return data["run_dir"] / stage / "model" if stage else None


def pick(data: dict) -> Answer | None:
    """The compact variant to take, or None (no compact variant with a result on a usable domain metric)."""
    domain, off = task_roles(data)
    head = headline_column(data, domain)
    if head is None:
        return None
    candidates = [
        (i, r)
        for i, r in enumerate(data["rows"])
        if r.pruned and r.values.get(head.key) is not None and model_dir(data, r.name) is not None
    ]
    if not candidates:
        return None
    sign = -1 if head.higher_better else 1

    def key(item: tuple[int, Row]) -> tuple:
        i, r = item
        value = r.values[head.key]
        assert value is not None  # candidates have one
        return (sign * value, r.params or 0, i)

    row = min(candidates, key=key)[1]
    return Answer(row, model_dir(data, row.name), _columns_of(data, domain), _columns_of(data, off), head)


def versus_dense(row: Row, dense: Row | None, col: Column) -> str:
    """How a value compares with dense: × dense and the difference for ↓ metrics (NLL); % of dense for ↑ metrics
    whose dense value is above chance with enough hits (`tables.chance_reason`); otherwise why there is none."""
    v = row.values.get(col.key)
    d = dense.values.get(col.key) if dense is not None else None
    if v is None or d is None or dense is None:
        return "–"
    if not col.higher_better:
        ppl = f"; perplexity {math.exp(v - d):.2f}× dense" if col.key.endswith("|nll") else ""
        return f"{v / d:.2f}× dense ({v - d:+.2f}{ppl})" if d > 0 else f"{v - d:+.2f}"
    reason = chance_reason(dense, col)
    if reason is not None and reason == few_counts(dense, col):
        return f"no % of dense: {reason}"
    if reason is not None:
        chance = dense.chance.get(col.key)
        return f"no % of dense: dense {fmt(d)} is at chance ({chance:.3g})" if chance is not None else "–"
    return f"{100 * v / d:.0f}% of dense" if d else "–"


def blocks(data: dict) -> list[tuple]:
    """The report's first section: the answer in a paragraph and a small table (domain and off-domain metrics of the
    pick against dense)."""
    ans = pick(data)
    if ans is None:
        return [
            ("h2", "Answer"),
            ("p", "No compact model to recommend yet: no pruned variant has a result on a domain task (see Results)."),
        ]
    r, dense = ans.row, data["dense"]
    size = f"{r.params / 1e6:.1f}M parameters" if r.params else "parameters unknown"
    if r.params and dense is not None and dense.params:
        size += f" ({100 * r.params / dense.params:.0f}% of dense {dense.params / 1e6:.1f}M)"
    where = f"`{ans.model_dir}`" + ("" if ans.model_dir and ans.model_dir.is_dir() else " (not on disk)")
    parts = [
        f"**Take `{r.label}`** (variant `{r.name}`): {size}, the best compact variant on {ans.headline.label}. "
        f"Model folder: {where}."
    ]
    h = ans.headline
    parts.append(
        f"Domain ({h.label}): {fmt(r.values.get(h.key))} against dense {fmt(dense.values.get(h.key) if dense else None)}"
        f" — {versus_dense(r, dense, h)}."
    )
    off_head = headline_column(data, task_roles(data)[1])
    if off_head is not None:
        parts.append(
            f"Off-domain ({off_head.label}): {fmt(r.values.get(off_head.key))} against dense "
            f"{fmt(dense.values.get(off_head.key) if dense else None)} — {versus_dense(r, dense, off_head)}."
        )
    else:
        parts.append("Off-domain: no task declared (`eval.off_domain` in the run's config).")
    rows = [
        [
            c.key.split("|", 1)[0],
            role,
            c.label.split(" ", 1)[1] + (" ↑" if c.higher_better else " ↓"),
            fmt(dense.values.get(c.key) if dense else None),
            fmt(r.values.get(c.key)),
            versus_dense(r, dense, c),
        ]
        for role, cols in (("domain", ans.domain), ("off-domain", ans.off_domain))
        for c in cols
    ]
    return [
        ("h2", "Answer"),
        ("p", " ".join(parts)),
        ("table", ["task", "role", "metric", "dense", r.label, "vs dense"], rows),
        (
            "note",
            "Picked among the pruned variants by the first domain task's first metric (an NLL: lower is better); "
            "a ↑ metric whose dense value is at chance gets no % of dense. Domain tasks are the run's `eval.tasks` "
            "except those in `eval.off_domain`.",
        ),
    ]
