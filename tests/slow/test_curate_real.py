"""Slow: curate a small real pool with SmolLM2 (math word problems vs news) from the embedded assets."""

from __future__ import annotations

import json
import random

import pytest

from finescope.config import CurateConfig
from finescope.corpora import MATH_SETS, default_pool_path
from finescope.curate.run import run
from finescope.data import read_records

pytestmark = pytest.mark.slow

WORD_PROBLEM_SETS = (
    "algebra_word_problems",
    "arithmetical_puzzles",
    "math_for_5th-grader",
    "multistep-word-problems",
    "probabilities-word-problems",
    "probability_questions",
    "simple_math",
)


def test_curate_small_real_pool(tmp_path, monkeypatch):
    monkeypatch.setenv("FINESCOPE_PROGRESS", "0")
    rows = list(read_records(default_pool_path()))
    rng = random.Random(0)
    math_sources = {f"evals/{s}" for s in MATH_SETS}
    # The seeds are word problems: the domain sample is the pool's word-problem sets (pool v2's other maths sets,
    # e.g. matrix dimensions or bare equations, are maths but not what the seeds describe).
    word_problems = {f"evals/{s}" for s in WORD_PROBLEM_SETS}
    math = rng.sample([r for r in rows if r["source"] in word_problems], 12)
    news = rng.sample([r for r in rows if r["source"].startswith("bbc/")], 12)
    other = rng.sample([r for r in rows if r["source"].startswith("evals/") and r["source"] not in math_sources], 6)
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps(r) + "\n" for r in math + news + other))
    cfg = CurateConfig(
        pool=str(pool),
        seeds="preset:math",
        top_m=6,
        reference_samples=48,
        coord_samples=8,
        max_length=48,
        sae_steps=300,
        sae_batch_size=128,
        batch_size=8,
    )
    out = run(cfg, tmp_path / "curate")
    selected = [json.loads(line) for line in (out / "selected.jsonl").read_text().splitlines()]
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(selected) == 6 and metrics["layers"] == [26]
    assert metrics["sae"]["layer26"]["fvu"] < 0.9
    math_hits = sum(r["source"] in math_sources for r in selected)
    assert math_hits >= 5, [r["source"] for r in selected]
    assert json.loads((out / "features.json").read_text())["layer26"]
