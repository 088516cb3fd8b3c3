"""Evaluate stage on the embedded data and the real SmolLM2-135M-Instruct (slow: tens of questions)."""

from __future__ import annotations

import json
import math

import pytest

from finescope.evaluate.code_exec import Limits, run_program
from finescope.evaluate.tasks import MMLU_CATEGORIES, humaneval_program, load_humaneval, load_mmlu, resolve_task


@pytest.mark.slow
def test_packaged_mmlu_matches_the_category_map():
    docs = load_mmlu()
    assert len(docs) == 14042  # the two stray header rows are gone
    assert {d["subject"] for d in docs} == set(MMLU_CATEGORIES)
    sizes = {g: len(resolve_task(f"mmlu:{g}").docs()) for g in ("stem", "humanities", "social_sciences", "other")}
    assert sum(sizes.values()) == 14042
    # lm-eval's mmlu_<group> sizes (its map files anatomy under stem; Hendrycks' categories.py under other).
    assert sizes == {"stem": 3153, "humanities": 4705, "social_sciences": 3077, "other": 3107}


@pytest.mark.slow
def test_humaneval_canonical_solutions_pass_and_empty_ones_fail():
    docs = load_humaneval()[:12]
    for d in docs:
        assert run_program(humaneval_program(d, d["canonical_solution"]), Limits(timeout_s=10)).passed, d["id"]
    assert not run_program(humaneval_program(docs[0], "    pass\n"), Limits(timeout_s=10)).passed


@pytest.mark.slow
def test_eval_stage_on_smollm2(tmp_path):
    from finescope.config import EvalConfig
    from finescope.evaluate.run import run

    cfg = EvalConfig(
        model="default",
        tasks=["mmlu:anatomy", "nll:math", "gsm8k", "answers:math"],
        limit=4,
        shots=1,
        mmlu_scoring="both",
        max_new_tokens=40,
        batch_size=4,
    )
    report = json.loads(run(cfg, tmp_path / "results.json").read_text())
    res = {(r["task"], r["variant"]): r for r in report["results"]}
    nll = res[("nll:math", "response tokens")]
    # A trained model is far better than uniform guessing over 49,152 tokens (log V ≈ 10.8 nats).
    assert 0.3 < nll["value"] < 4.0 and nll["perplexity"] == pytest.approx(math.exp(nll["value"]))
    for variant in ("letter", "cloze"):
        r = res[("mmlu:anatomy", variant)]
        assert r["n"] == 4 and r["shots"] == 1 and 0.0 <= r["value"] <= 1.0
    assert res[("gsm8k", "1-shot cot")]["n"] == 4
    # The dense model's own chat replies: real sentences, not loops (its loops start later than 40 tokens).
    answers = [r for r in report["results"] if r["task"] == "answers:math"]
    assert [r["metric"] for r in answers] == ["exact_match", "looping", "cut_off"]
    assert all(r["n"] == 4 for r in answers) and answers[1]["value"] == 0.0
    examples = answers[0]["examples"]
    assert len(examples) == 3 and examples[0]["question"].startswith("Janet")  # GSM8K test row 0
    assert all(len(e["answer"].split()) >= 5 and not e["looping"] for e in examples)
