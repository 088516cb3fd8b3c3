"""Slow: prune the real embedded SmolLM2-135M-Instruct at the paper's 35% with a few calibration records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finescope.config import PruneConfig
from finescope.prune.run import run

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])  # bf16: the GPU default, run on the CPU here
def test_prune_smollm2_to_35_percent(tmp_path, dtype):
    data = tmp_path / "math.jsonl"
    rows = [
        {"instruction": f"What is {a} + {b}?", "response": f"{a} + {b} = {a + b}. The answer is {a + b}."}
        for a, b in [(12, 30), (7, 8), (45, 55), (3, 9), (100, 23), (64, 36), (19, 1), (8, 8)]
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = run(
        PruneConfig(
            model="default", data=str(data), ratio=0.35, calib_samples=8, calib_length=64, batch_size=4, dtype=dtype
        ),
        tmp_path / "prune",
    )
    report = json.loads((out / "report.json").read_text())
    after = report["shapes_after"]
    assert (after["layers"], after["attention_heads"], after["kv_heads"], after["head_dim"]) == (30, 6, 3, 64)
    assert after["mlp_width"] % 8 == 0 and after["mlp_width"] < 1536
    assert abs(report["parameters"]["ratio"] - 0.35) <= report["plan"]["granule"] / 2 + 1e-9
    assert report["parameters"]["non_embedding_ratio"] > 0.35
    assert report["verification"]["logits_match"] and report["verification"]["cache_matches_no_cache"]
    assert report["calibration"]["records"] == 8 and report["calibration_loss"] > 0
    assert len(report["kept"]) == 30 and all(len(r["heads"]) == 6 for r in report["kept"])


def test_bf16_prune_of_the_quick_preset_passes_its_reload_check(tmp_path):
    """The quick preset's curated records (from the embedded default pool) and prune settings in bf16: the
    verification's KV-cache check used to run in bf16, where greedy tokens with and without the cache part on this
    model ("generation after reload is broken" on a correct model); it runs in float32 now."""
    data = Path(__file__).parent / "fixtures" / "quick_calibration.jsonl"
    cfg = PruneConfig(
        model="default", data=str(data), ratio=0.35, calib_samples=16, calib_length=64, batch_size=8, dtype="bfloat16"
    )
    report = json.loads((run(cfg, tmp_path / "prune") / "report.json").read_text())
    assert report["verification"]["logits_match"] and report["verification"]["cache_matches_no_cache"]
