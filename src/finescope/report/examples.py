"""A few answers side by side: for each `answers:` task of the run, the first questions it asked, the reference
answer, dense's reply and the picked compact model's (`answer.pick`), each marked right / loops / cut at the cap.
The replies come from the results files (an `answers:` task keeps its first answers there), so the report loads
no model. Evidence a person can read: a compact model that loops or stops mid-sentence shows here before any
metric says so."""

from __future__ import annotations

from .answer import pick
from .tables import Row

CHARS = 600
"""A reply or reference longer than this is shortened (…) in the report; the results file has it whole."""


def _short(text: str) -> str:
    text = text.strip()
    return text if len(text) <= CHARS else text[:CHARS].rstrip() + " …"


def marks(example: dict) -> str:
    """'right', 'wrong', 'loops', 'cut at the cap', joined: what the eval's checks said of one reply."""
    out = []
    if "right" in example:
        out.append("right" if example["right"] else "wrong")
    if example.get("looping"):
        out.append("loops")
    if example.get("cut_off"):
        out.append("cut at the cap")
    return ", ".join(out) or "ended"


def blocks(data: dict) -> list[tuple]:
    """One section with, per `answers:` task, each example question and the replies of dense and the pick; none
    when no variant has examples."""
    dense: Row | None = data["dense"]
    ans = pick(data)
    shown = [r for r in (dense, ans.row if ans else None) if r is not None]
    tasks = [t for t in dict.fromkeys(t for r in shown for t in r.examples)]
    if not tasks:
        return []
    out: list[tuple] = [("h2", "Answers side by side")]
    for task in tasks:
        rows = [r for r in shown if task in r.examples]
        by_id = [{e.get("id"): e for e in r.examples[task]} for r in rows]
        ids = list(dict.fromkeys(i for m in by_id for i in m))
        for n, qid in enumerate(ids, 1):
            first = next(m[qid] for m in by_id if qid in m)
            out.append(("h3", f"{task}, question {n} (`{qid}`)"))
            out.append(("pre", _short(str(first.get("question", "")))))
            if first.get("reference"):
                out.append(("p", "Reference:"))
                out.append(("pre", _short(str(first["reference"]))))
            for r, m in zip(rows, by_id):
                if qid in m:
                    out.append(("p", f"`{r.label}` ({marks(m[qid])}):"))
                    out.append(("pre", _short(str(m[qid].get("answer", ""))) or "(empty)"))
    out.append(
        (
            "note",
            "Greedy replies in the model's chat template, as the `answers:` task asked them (its token cap is in the "
            "results table's variant); the task's looping and cut-off shares over all its questions are columns of "
            "the results table. Replies longer than 600 characters are shortened here.",
        )
    )
    return out
