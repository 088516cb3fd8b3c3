"""Streaming pools: peak memory of the curate stage (SAE method) against pool size, and resume after a kill.
Prints one JSON object (progress goes to stderr).

    .venv/bin/python benchmarks/scale.py                         # 20k and 200k records, kill at 20k (CPU: ~15 min)
    .venv/bin/python benchmarks/scale.py --sizes 2000,20000 --kill-size 20000

A tiny random Llama (2 blocks, hidden 64, SmolLM2's tokenizer) encodes synthetic short records (one sentence of
random words, 12-30 tokens): the model is small so that what grows with the pool (reading, tokenising, shards,
scores, selection, scores.parquet) is what the figures show, not the forward. Each size runs `finescope curate`
in a fresh process with a cold stage cache, and that process reports its own peak RSS (VmHWM). Goal: peak
RSS at the largest size ≤ 1.2 × at the smallest.

Kill and resume: the curate of `--kill-size` records is killed (SIGKILL) once about a third of its pool-encoding
shards are on disk, then rerun; the rerun's shard files are compared with the ones the killed run left (same
file, same modification time = reused), so the JSON shows how many shards the rerun computed.

Reference: tokens/s of a plain forward of the tiny model in this process, beside records/s of each run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = (
    "the a of to and in is for on with as by at from that this it be are was were an or not but which their "
    "river market engine theory garden number season report court patient code value signal budget league "
    "village protein contract circuit harvest lecture planet ticket voltage recipe museum verdict tariff"
).split()

WRAPPER = Path(__file__).resolve().parent / "rss_wrapper.py"


def tiny_model(folder: Path) -> Path:
    """A 2-block random Llama with SmolLM2's tokenizer, saved once."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from finescope.modeling import load

    tok = load("default").tokenizer
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_pool(path: Path, n: int, seed: int = 0) -> Path:
    if path.is_file():
        return path
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 20)))
            f.write(json.dumps({"id": f"r{i}", "text": f"{words.capitalize()}.", "source": "synthetic"}) + "\n")
    return path


def reference_throughput(model: Path) -> float:
    from reference import reference_throughput as ref  # benchmarks/reference.py

    return ref(model)


def curate_cmd(work: Path, model: Path, pool: Path, out: Path) -> tuple[list[str], Path]:
    wrapper = WRAPPER
    reference = write_pool(work / "reference.jsonl", 400, seed=1)
    seeds = work / "seeds.jsonl"
    seeds.write_text(json.dumps({"text": "The court heard the contract verdict."}) + "\n")
    args = [
        "curate",
        "--model", str(model), "--pool", str(pool), "--seeds", str(seeds), "--reference", str(reference),
        "--num-coords", "16", "--sae-expansion", "4", "--sae-k", "4", "--sae-steps", "100",
        "--coord-samples", "16", "--reference-samples", "200", "--top-m", "100",
        "--max-length", "32", "--batch-size", "64", "--out", str(out),
    ]  # fmt: skip
    return [sys.executable, str(wrapper), *args], wrapper


def run_size(work: Path, model: Path, n: int, src: str | None = None) -> dict:
    """`finescope curate` on n records in a fresh process (with the code at `src`/src when given)."""
    pool = write_pool(work / f"pool-{n}.jsonl", n)
    out = work / (f"curate-{n}" if src is None else f"curate-{n}-base")
    shutil.rmtree(out, ignore_errors=True)  # a previous benchmark's finished stage would be skipped at once
    home = Path(tempfile.mkdtemp(prefix="home-", dir=work))
    cmd, _ = curate_cmd(work, model, pool, out)
    rss_file = work / f"rss-{n}.json"
    env = {**os.environ, "FINESCOPE_HOME": str(home), "RSS_FILE": str(rss_file), "FINESCOPE_PROGRESS": "0"}
    if src is not None:
        env["PYTHONPATH"] = str(Path(src) / "src")
    print(f"[scale] curate {n:,} records{' (base)' if src else ''}", file=sys.stderr, flush=True)
    t = time.perf_counter()
    subprocess.run(cmd, env=env, check=True)
    wall = time.perf_counter() - t
    metrics = json.loads((out / "metrics.json").read_text())
    encode = next(v for k, v in metrics["timings_s"].items() if k.startswith("encode_pool"))
    return {
        "records": n,
        "peak_rss_mib": round(json.loads(rss_file.read_text())["peak_rss_mib"], 1),
        "wall_s": round(wall, 1),
        "stage_s": round(metrics["timings_s"]["total"], 1),
        "records_per_s_stage": round(n / metrics["timings_s"]["total"], 1),
        "records_per_s_encode": round(n / encode, 1),
        "selected": metrics["selected"],
    }


def kill_and_resume(work: Path, model: Path, n: int) -> dict:
    pool = write_pool(work / f"pool-{n}.jsonl", n)
    out = work / f"curate-kill-{n}"
    shutil.rmtree(out, ignore_errors=True)  # a previous benchmark's finished stage would be skipped at once
    home = Path(tempfile.mkdtemp(prefix="home-", dir=work))
    cmd, _ = curate_cmd(work, model, pool, out)
    env = {
        **os.environ,
        "FINESCOPE_HOME": str(home),
        "RSS_FILE": str(work / "rss-kill.json"),
        "FINESCOPE_PROGRESS": "0",
    }
    shards_total = -(-n // (16 * 64))
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    target = max(1, shards_total // 3)

    def enc_shards() -> list[Path]:
        return sorted(home.glob("cache/curate/enc-*/shard-*.safetensors"))

    while len(enc_shards()) < target and proc.poll() is None:
        time.sleep(0.2)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {p: p.stat().st_mtime_ns for p in enc_shards()}
    print(f"[scale] killed with {len(before)}/{shards_total} shards on disk; rerunning", file=sys.stderr, flush=True)
    t = time.perf_counter()
    subprocess.run(cmd, env=env, check=True)
    wall = time.perf_counter() - t
    after = enc_shards()
    reused = sum(1 for p in after if before.get(p) == p.stat().st_mtime_ns)
    return {
        "records": n,
        "shards_total": len(after),
        "shards_on_disk_when_killed": len(before),
        "shards_reused_by_rerun": reused,
        "shards_computed_by_rerun": len(after) - reused,
        "rerun_wall_s": round(wall, 1),
        "rerun_finished": (out / "DONE").is_file(),
    }


def versus_base(work: Path, model: Path, sizes: list[int], base: str, rounds: int) -> dict:
    """Stage seconds and peak RSS of the base code and this code, alternated per size; medians and ratios."""
    out: dict = {"base_src": base}
    for n in sizes:
        runs: dict[str, list[dict]] = {"base": [], "new": []}
        for _ in range(rounds):
            runs["base"].append(run_size(work, model, n, src=base))
            runs["new"].append(run_size(work, model, n))
        med = {k: statistics.median(r["stage_s"] for r in v) for k, v in runs.items()}
        rss = {k: statistics.median(r["peak_rss_mib"] for r in v) for k, v in runs.items()}
        out[str(n)] = {
            "stage_s_median": med,
            "stage_time_ratio_new_over_base": round(med["new"] / med["base"], 3),
            "peak_rss_mib_median": rss,
            "stage_s_rounds": {k: [r["stage_s"] for r in v] for k, v in runs.items()},
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="20000,200000")
    ap.add_argument("--kill-size", type=int, default=20000)
    ap.add_argument("--out", default="runs/bench-scale")
    ap.add_argument(
        "--base-src",
        help="a checkout of earlier code (git worktree): each size runs with it too, alternated, and the JSON "
        "gives the stage-time ratio new / base (medians of --rounds)",
    )
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    work = Path(args.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    model = tiny_model(work / "tiny-llama")
    sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    runs = [run_size(work, model, n) for n in sizes]
    result = {
        "model": "tiny random Llama (2 blocks, hidden 64) with SmolLM2's tokenizer",
        "reference_forward_tok_s": reference_throughput(model),
        "runs": runs,
        "peak_rss_ratio_largest_to_smallest": round(runs[-1]["peak_rss_mib"] / runs[0]["peak_rss_mib"], 3),
        "goal_peak_rss_ratio": 1.2,
    }
    if args.base_src:
        result["versus_base"] = versus_base(work, model, sizes, args.base_src, args.rounds)
    if args.kill_size:
        result["kill_and_resume"] = kill_and_resume(work, model, args.kill_size)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
