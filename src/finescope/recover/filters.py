"""Filters on teacher rewrites, each with a counted reason; a rejected rewrite falls back to the original response.

Reasons, checked in this order (the first that applies is recorded):
    empty           nothing but whitespace (or under 2 characters)
    cut_off         the teacher hit `max_new_tokens` before ending its turn
    leakage         the rewrite talks about the template ("reference answer", "your response", "### Instruction", …)
    degenerate      repetition loops (few distinct word 4-grams, a line repeated 4+ times, a 30-char run, a loop
                    at the end: `generation.loops_at_end`)
    answer_mismatch the original has a checkable answer (final number, or an option letter for multiple choice)
                    and the rewrite's differs or is missing

    from finescope.recover.filters import apply_filters
    rows, counts = apply_filters(records, rewrites)   # rows = distilled.jsonl records
"""

from __future__ import annotations

import re
from collections import Counter
from fractions import Fraction

from ..generation import is_degenerate

REASONS = ("accepted", "empty", "cut_off", "leakage", "degenerate", "answer_mismatch")

# SDFT drops rewrites that mention the template; lower-case substrings.
LEAKAGE_PHRASES = (
    "reference answer",
    "reference response",
    "the reference",
    "your response",
    "my response is based",
    "### instruction",
    "### response",
    "### reference",
    "using the reference",
    "as a guide",
)


def leaks_template(text: str) -> bool:
    low = text.lower()
    return any(p in low for p in LEAKAGE_PHRASES)


# ------------------------------------------------------------------------------------------------ answers

_NUM = r"-?\$?\s?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?"
_MARKED_NUMBER = (
    re.compile(r"####\s*(" + _NUM + r")"),
    re.compile(r"\\boxed\{\s*(" + _NUM + r")\s*\}"),
    re.compile(r"\[\s*(" + _NUM + r")\s*\]"),
    re.compile(r"answer\s*(?:is|:|=)\s*:?\s*(" + _NUM + r")", re.I),
)
_LETTER = (
    re.compile(r"(?i:answer)\s*(?:is|:)\s*:?\s*(?:\\textbf\{)?\(?\s*([A-E])\s*\)?(?![A-Za-z])"),
    re.compile(r"\\boxed\{\s*(?:\\textbf\{)?\(?([A-E])\)?"),
)
_OPTIONS = re.compile(r"(?:^|\n|\s)\(?[A-E][\).:]\s", re.M)


def _to_number(s: str) -> Fraction | None:
    s = s.replace("$", "").replace(",", "").replace(" ", "")
    try:
        if "/" in s:
            num, den = s.split("/")
            return Fraction(num) / Fraction(den)
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def _last(patterns, text: str) -> str | None:
    """The last match of the first pattern that matches at all."""
    for pat in patterns:
        found = pat.findall(text)
        if found:
            return found[-1]
    return None


def expected_answer(instruction: str, response: str) -> tuple[str, object] | None:
    """The checkable answer of an original pair: ("letter", "B") for multiple choice, ("number", Fraction)
    for an explicitly marked or bare number; None when the response has nothing checkable."""
    options = len(_OPTIONS.findall(instruction)) >= 2
    if options:
        letter = _last(_LETTER, response)
        if letter is None and re.fullmatch(r"\s*\(?([A-E])\)?\.?\s*", response):
            letter = re.sub(r"[^A-E]", "", response.upper())
        if letter:
            return "letter", letter.upper()
    marked = _last(_MARKED_NUMBER, response)
    if marked is None and re.fullmatch(r"\s*" + _NUM + r"\s*\.?\s*", response):
        marked = response.strip().rstrip(".")
    if marked is not None:
        value = _to_number(marked)
        if value is not None:
            return "number", value
    return None


def rewrite_answer(kind: str, text: str) -> object | None:
    """The rewrite's answer of the given kind: marked forms first, else the last number / parenthesised letter."""
    if kind == "letter":
        letter = _last(_LETTER, text)
        if letter is None:
            found = re.findall(r"\(([A-E])\)", text)
            letter = found[-1] if found else None
        return letter.upper() if letter else None
    marked = _last(_MARKED_NUMBER, text)
    if marked is None:
        found = re.findall(_NUM, text)
        marked = found[-1] if found else None
    return _to_number(marked) if marked is not None else None


def answers_agree(instruction: str, original: str, rewrite: str) -> bool | None:
    """True/False when the original has a checkable answer, None when it has none."""
    expected = expected_answer(instruction, original)
    if expected is None:
        return None
    kind, value = expected
    return rewrite_answer(kind, rewrite) == value


# ------------------------------------------------------------------------------------------------ verdicts


def check_rewrite(rec: dict, rewrite: str, cut_off: bool = False, *, answer_check: bool = True) -> str:
    """The filter verdict for one rewrite of an instruction record: "accepted" or the first rejection reason."""
    text = rewrite.strip()
    if len(text) < 2:
        return "empty"
    if cut_off:
        return "cut_off"
    if leaks_template(text) and not leaks_template(rec["instruction"] + "\n" + rec["response"]):
        return "leakage"
    if is_degenerate(text):
        return "degenerate"
    if answer_check and answers_agree(rec["instruction"], rec["response"], text) is False:
        return "answer_mismatch"
    return "accepted"


def apply_filters(
    records: list[dict],
    rewrites: dict[str, dict] | None,
    *,
    answer_check: bool = True,
    not_rewritten: frozenset[str] = frozenset(),
) -> tuple[list[dict], dict[str, int]]:
    """distilled.jsonl rows and counts per reason.

    Each instruction row keeps `original` and `rewrite` (None without a teacher), `used` ("rewrite" or
    "original") and `reason`; `response` holds the text used, so the file is itself a record file. Text records
    pass through as language-modelling data (`used` = "text"). `rewrites=None` means no teacher (plain SFT).
    `not_rewritten`: ids the teacher was not asked to rewrite because their prompt fills the training length
    (reason "prompt_too_long", the original kept; training drops them).
    """
    counts: Counter = Counter()
    rows = []
    for rec in records:
        if "instruction" not in rec:
            rows.append({**rec, "used": "text", "reason": "text_record"})
            counts["text_record"] += 1
            continue
        if rewrites is None:
            reason, rewrite = "no_teacher", None
        elif rec["id"] in not_rewritten:
            reason, rewrite = "prompt_too_long", None
        else:
            got = rewrites.get(rec["id"])
            if got is None:
                raise KeyError(f"no rewrite for record {rec['id']!r}")
            rewrite = got["rewrite"]
            reason = check_rewrite(rec, rewrite, got.get("cut_off", False), answer_check=answer_check)
        counts[reason] += 1
        used = "rewrite" if reason == "accepted" else "original"
        rows.append(
            {
                **rec,
                "response": rewrite if used == "rewrite" else rec["response"],
                "original": rec["response"],
                "rewrite": rewrite,
                "used": used,
                "reason": reason,
            }
        )
    return rows, dict(counts)
