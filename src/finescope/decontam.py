"""Evaluation-data overlap: a record overlaps when it shares a word 13-gram with an embedded benchmark (GSM8K test,
MMLU test, HumanEval), the contamination test of the GPT-3 paper (Brown et al. 2020, appendix C); a text shorter
than 13 words overlaps when it appears whole. Used to keep what recovery adds to the curated set (next-ranked
records, generic replay) free of evaluation data.

    index = eval_ngrams()
    clean = [r for r in records if not overlaps(record_text(r), index)]
"""

from __future__ import annotations

import functools
import gzip
import json
import re
from collections.abc import Iterator
from pathlib import Path

from . import assets

N = 13
BENCHMARKS = ("gsm8k", "mmlu", "humaneval")
_WORD = re.compile(r"\w+")


def ngrams(text: str, n: int = N) -> set[str]:
    """Lower-cased word n-grams of `text`; a shorter text is one gram of all its words."""
    words = _WORD.findall(text.lower())
    if len(words) < n:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def _strings(value) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)


def _rows(path: Path) -> Iterator[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def benchmark_texts(name: str) -> Iterator[str]:
    """Every string field of every row of an embedded benchmark (questions, choices, answers, prompts)."""
    for row in _rows(assets.data_path(name)):
        yield from _strings(row)


@functools.cache
def eval_ngrams() -> frozenset[str]:
    """The 13-grams of every embedded benchmark (built once per process; a few seconds)."""
    grams: set[str] = set()
    for name in BENCHMARKS:
        for text in benchmark_texts(name):
            grams |= ngrams(text)
    return frozenset(grams)


def overlaps(text: str, index: frozenset[str] | set[str]) -> bool:
    words = _WORD.findall(text.lower())
    if len(words) < N:
        return " ".join(words) in index
    return any(" ".join(words[i : i + N]) in index for i in range(len(words) - N + 1))
