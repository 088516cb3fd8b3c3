"""Seed sets degraded on purpose, as users write them (issue 29): the seed-degradation rows of `curate.py`.

Pure Python. `degrade(seeds, variant)` returns a new list of seed records:
- `clean`: the seeds as written (10 per domain);
- `off_topic`: the last seed replaced by one about cooking (OFF_TOPIC), so one of the ten is off-topic;
- `three`: the first three seeds only;
- `terse`: every seed in another phrasing style than the pool: its instruction and its response each cut to keywords
  (lower-cased, stop words and punctuation dropped, at most TERSE_WORDS words, as typed into a search box; a seed
  record needs both fields).
"""

from __future__ import annotations

import re

VARIANTS = ("clean", "off_topic", "three", "terse")
OFF_TOPIC = {
    "instruction": "What is the best way to keep fresh basil from wilting after buying it?",
    "response": "Trim the stems and stand the bunch in a glass of water at room temperature, loosely covered with a bag.",
}
TERSE_WORDS = 6
STOP_WORDS = frozenset(
    "a an the of to in on at for by with from and or but if then than that this these those is are was were be been"
    " being do does did how what which who whom whose why when where can could should would will may might must i you"
    " he she it we they my your its our their me him her us them there here as into about between after before over"
    " under up down out not no yes so such each every any all some more most other s".split()
)
_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9'$%.+/-]*")


def terse(text: str, words: int = TERSE_WORDS) -> str:
    """Keywords of a text: its words without stop words, lower-cased, trailing punctuation stripped, the first `words`."""
    out = []
    for w in _WORD.findall(text):
        w = w.lower().rstrip(".'")
        if w and w not in STOP_WORDS:
            out.append(w)
    return " ".join(out[:words])


def degrade(seeds: list[dict], variant: str) -> list[dict]:
    """The seed set `variant` (VARIANTS) makes of `seeds` (records with instruction and response)."""
    if variant == "clean":
        return [dict(s) for s in seeds]
    if variant == "off_topic":
        return [dict(s) for s in seeds[:-1]] + [{"id": "off-topic-seed", **OFF_TOPIC}]
    if variant == "three":
        return [dict(s) for s in seeds[:3]]
    if variant == "terse":
        return [
            {"id": s.get("id", f"seed-{i}"), "instruction": terse(s["instruction"]), "response": terse(s["response"])}
            for i, s in enumerate(seeds)
        ]
    raise SystemExit(f"--seed-variants: unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
