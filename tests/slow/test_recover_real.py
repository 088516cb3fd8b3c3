"""Slow: the recover stage on the real SmolLM2-135M-Instruct (teacher and student) with a handful of math records."""

from __future__ import annotations

import json

import pytest

from finescope import assets
from finescope.config import RecoverConfig
from finescope.recover.filters import REASONS
from finescope.recover.run import run

pytestmark = pytest.mark.slow


def _math_records(n: int) -> list[dict]:
    """evals' simple_math rows (system + user chat turns, "ideal" answer) as instruction records."""
    path = assets.package_file("evals", "evals/registry/data/simple_math/simple_math.jsonl")
    rows = [json.loads(l) for l in open(path, encoding="utf-8") if l.strip()][:n]
    out = []
    for i, row in enumerate(rows):
        turns = {m["role"]: m["content"] for m in row["input"]}
        out.append(
            {
                "id": f"sm{i}",
                "system": turns.get("system", ""),
                "instruction": turns["user"],
                "response": row["ideal"] if isinstance(row["ideal"], str) else row["ideal"][0],
            }
        )
    return out


def test_recover_on_smollm2(tmp_path):
    from transformers import AutoModelForCausalLM

    from finescope.modeling import resolve_model_path

    data = tmp_path / "math.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _math_records(4)), encoding="utf-8")
    dense = resolve_model_path("default")
    cfg = RecoverConfig(
        teacher="default",
        student=dense,
        data=str(data),
        max_new_tokens=32,
        rewrite_batch_size=4,
        lora_rank=8,
        lora_alpha=16,
        lr=2e-4,
        batch_size=4,
        micro_batch_size=2,
        max_length=192,
        epochs=1.0,
        eval_fraction=0.25,
    )
    out = run(cfg, tmp_path / "recover")
    rows = [json.loads(l) for l in (out / "distilled.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["rewrite"].strip() for r in rows)
    assert all(r["reason"] in REASONS for r in rows)
    assert all(r["response"] == (r["rewrite"] if r["used"] == "rewrite" else r["original"]) for r in rows)
    metrics = json.loads((out / "metrics.json").read_text())
    assert sum(metrics["filters"]["counts"].values()) == 4 and metrics["rewrite"]["mean_new_tokens"] > 0
    # answered now, or read back from the teacher-answer cache when an earlier run asked the same prompts
    assert metrics["rewrite"]["generated"] + metrics["rewrite"]["from_cache"] == 4
    train = metrics["train"]
    assert train["eval_loss_merged"] == pytest.approx(train["eval_loss"][-1]["loss"], rel=1e-3)
    merged = AutoModelForCausalLM.from_pretrained(out / "model")
    assert merged.config.num_hidden_layers == 30 and not any("lora" in k for k in merged.state_dict())
