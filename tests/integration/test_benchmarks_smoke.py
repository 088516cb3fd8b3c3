"""Every benchmark runs: its cheapest mode (`--smoke`, or its own smallest flags) on a tiny model, in a fresh process
as a user runs it, and its stdout is the one JSON object it promises. What is measured is not checked here (a
benchmark's figures are read by people, not asserted); that the script still runs against today's code is.

A benchmark that cannot be run cheaply is listed in NOT_SMOKED with the reason; a new file in benchmarks/ must be
added to one of the lists below (test_every_benchmark_is_smoke_run_or_says_why_not)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"

# name → arguments after the script; "{tiny}" is a saved tiny random Llama (tests/conftest.py), "{tmp}" a fresh folder.
SMOKE = {
    "dead_rank": ["--smoke"],
    "generation_stops": ["--smoke"],
    "prune": ["--smoke", "--model", "{tiny}"],
    "compensation": ["--smoke", "--model", "{tiny}", "--attention-ratios", "auto,0", "--depths", "0,1"],
    "eval": ["--model", "{tiny}", "--only", "nll", "--nll", "2", "--batch-size", "2", "--max-new-tokens", "4"],
    "curate": [
        "--pool-only",
        "--pool",
        "test",
        "--pool-size",
        "40",
        "--out",
        "{tmp}/bench-curate",
    ],  # builds both pools
    "recover_samples": ["--distilled", "{tmp}/distilled.jsonl", "--model", "tiny={tiny}", "--n", "1"]
    + ["--max-new-tokens", "4", "--gsm8k", "1"],
    "cache_integrity": ["--shard-mib", "1", "--repeats", "1", "--cache", "{tmp}"],
    "embed_order": ["--smoke", "--model", "{tiny}", "--repeats", "2"],
    "answers": ["--model", "tiny={tiny}", "--rows", "1001", "--max-new-tokens", "4"],
    "loss_memory": ["--positions", "8", "--repeats", "1", "--model", "{tiny}"],
    "teacher_at_loops": ["--teacher", "{tiny}", "--student", "{tiny}", "--samples", "{tmp}/samples.jsonl"],
}
NOT_SMOKED = {
    "recover": "prunes, has the teacher rewrite and trains SFT and TGD students: minutes even at its smallest",
    "ranks": "runs all four stages twice, once under torchrun, on the real model: ~15 min at its smallest sizes",
    "finetune_engine": "compares against a checkout of the retired plain training loop (--base-src, commit 165ba64)",
    "curate_budget": "runs `finescope curate` of the default config with cold caches beside a base checkout",
    "scale": "kills a 20k-record curate mid-encoding and measures peak RSS against pool size: minutes by design",
    "frontier": "prunes the real SmolLM2 at four ratios and scores each on two tasks: tens of minutes on a CPU",
    "distill_terms": "re-runs a finished default run's pruned_kd recovery per recipe and seed: minutes each",
    "chain_nll": "scores real-model runs or model folders on 124 GSM8K rows: minutes per model on a CPU",
    "data_curves": "re-runs a finished default run's pruned_kd recovery per data source, volume and seed: minutes each",
    "kd_batch_time": "re-runs a finished default run's pruned_kd recovery at two batch sizes, repeatedly: minutes each",
}
HELPERS = {
    "labelled_pool": "the labelled pools of curate.py",
    "seed_variants": "the degraded seed sets of curate.py --seed-variants",
    "rss_wrapper": "peak RSS of a command (scale, ranks)",
    "reference": "the reference throughput every benchmark prints beside its timings",
}


def test_every_benchmark_is_smoke_run_or_says_why_not():
    names = {p.stem for p in BENCH.glob("*.py")}
    assert names == set(SMOKE) | set(NOT_SMOKED) | set(HELPERS), names ^ (set(SMOKE) | set(NOT_SMOKED) | set(HELPERS))
    assert not set(SMOKE) & set(NOT_SMOKED)


@pytest.mark.parametrize("name", sorted(SMOKE))
def test_benchmark_smoke_run_prints_one_json_object(name, tiny_model_dirs, tmp_path):
    (tmp_path / "distilled.jsonl").write_text(
        json.dumps(
            {"id": "r0", "instruction": "What is 2 + 3?", "original": "5", "rewrite": "2 + 3 = 5.", "used": "rewrite"}
        )
        + "\n"
    )
    loop = "1. 2. 3. " + "4. 4. 4. " * 10
    (tmp_path / "samples.jsonl").write_text(
        "".join(
            json.dumps({"id": i, "question": "What is 2 + 3?", "answer": a, "looping": lp, "cut_off": lp}) + "\n"
            for i, a, lp in (("q0", loop, True), ("q1", "5", False))
        )
    )
    args = [a.format(tiny=tiny_model_dirs["llama"], tmp=tmp_path) for a in SMOKE[name]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FINESCOPE_PROGRESS": "0"}
    proc = subprocess.run(
        [sys.executable, str(BENCH / f"{name}.py"), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert isinstance(result, dict) and result, proc.stdout[-2000:]
