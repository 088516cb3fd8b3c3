"""1 vs N processes, stage by stage, on the embedded SmolLM2-135M-Instruct: wall time, throughput ratio and
per-process peak RSS of each stage command run plainly (1 process) and under `torchrun --nproc-per-node N`.
Prints one JSON object (progress goes to stderr).

    .venv/bin/python benchmarks/ranks.py                       # N = 2, small sizes (CPU: ~15 min)
    .venv/bin/python benchmarks/ranks.py --processes 2 --pool 400 --questions 40

Every stage runs on the same inputs twice, each time with a cold stage cache (its own FINESCOPE_HOME, which
links the shared model and data assets but not cache/), so neither run reuses the other's work:
- curate: SAE curation of a `--pool`-record sample of the embedded pool (sharded: pool harvest/encoding);
- prune: taylor importance over the curation's selection (sharded: calibration batches, all-reduced);
- recover: teacher rewrites of the selection + LoRA (sharded: rewrites; the fine-tuning is data-parallel on
  transformers.Trainer, DDP, with the same global batch);
- eval: nll:math and gsm8k on `--questions` questions (sharded: question batches, gathered).
The 1-process output of curate and prune feeds both runs of the next stage, so the stages are compared on
identical inputs. "same_output" says whether the N-process output equals the 1-process one (the selected records
and their order, the prune plan, distilled.jsonl, eval values within 1e-5 relative): one process computes with two
BLAS threads and each of two ranks with one, so float sums differ in their last digits. For recover the JSON also
gives both runs' held-out loss after training (`held_out_loss`): with LoRA dropout, each rank draws its own masks
and the last, uneven step of an epoch is padded by accelerate, so the two differ by more than float noise.

Reference: tokens/s of a plain forward of the model in this process (`reference_forward_tok_s`): machines differ
~3x, so read the ratios, not the seconds. On a 2-core machine N processes share the same two cores: the ratio
shows the overhead of the distributed path, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RSS_WRAPPER = Path(__file__).resolve().parent / "rss_wrapper.py"


def reference_throughput() -> float:
    from reference import reference_throughput as ref  # benchmarks/reference.py

    return ref()


def cold_home(root: Path) -> Path:
    """A FINESCOPE_HOME that shares the model and data assets with ~/.cache/finescope but has its own cache/."""
    from finescope import assets

    shared = assets.home()
    home = Path(tempfile.mkdtemp(prefix="home-", dir=root))
    for entry in shared.iterdir():
        if entry.name != "cache":
            (home / entry.name).symlink_to(entry)
    return home


def run_stage(stage: str, cfg: dict, out: Path, processes: int, work: Path) -> dict:
    """Run `finescope <stage>` with `processes` ranks; wall time and each rank's peak RSS."""
    config = work / f"{out.name}.yaml"
    config.write_text(yaml.safe_dump(cfg))
    rss_dir = Path(tempfile.mkdtemp(prefix="rss-", dir=work))
    wrapper = RSS_WRAPPER
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    cmd = [*launcher, str(wrapper), stage, "--config", str(config), "--out", str(out)]
    env = {**os.environ, "FINESCOPE_HOME": str(cold_home(work)), "RSS_DIR": str(rss_dir)}
    print(f"[ranks] {stage} × {processes}: {' '.join(cmd[-5:])}", file=sys.stderr, flush=True)
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{stage} with {processes} processes failed:\n{proc.stderr[-3000:]}")
    ranks = sorted((json.loads(p.read_text()) for p in rss_dir.glob("rank*.json")), key=lambda r: r["rank"])
    return {"wall_s": round(wall, 1), "peak_rss_mib_per_rank": [r["peak_rss_mib"] for r in ranks]}


def same_output(stage: str, one: Path, many: Path) -> bool:
    if stage == "curate":  # the same records in the same order (scores may differ in the last float digits)
        ids = [[json.loads(x)["id"] for x in (d / "selected.jsonl").read_text().splitlines()] for d in (one, many)]
        return ids[0] == ids[1]
    if stage == "prune":
        kept = [json.loads((d / "report.json").read_text())["kept"] for d in (one, many)]
        return kept[0] == kept[1]
    if stage == "recover":
        return (one / "distilled.jsonl").read_text() == (many / "distilled.jsonl").read_text()
    values = [[r["value"] for r in json.loads((d / "results.json").read_text())["results"]] for d in (one, many)]
    return all(abs(a - b) <= 1e-5 * max(1.0, abs(a)) for a, b in zip(*values))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--pool", type=int, default=400, help="pool records the curation encodes")
    ap.add_argument("--questions", type=int, default=40, help="questions per eval task")
    ap.add_argument("--stages", default="curate,prune,recover,eval")
    ap.add_argument("--out", default="runs/bench-ranks")
    args = ap.parse_args()
    root = Path(args.out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="work-", dir=root))
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    n = args.processes

    configs = {
        "curate": dict(
            pool="default",
            pool_sample=args.pool,
            seeds="preset:math",
            reference_samples=128,
            coord_samples=16,
            sae_steps=300,
            top_m=48,
            max_length=96,
        ),
        "prune": dict(model="default", data=str(root / "curate-1" / "selected.jsonl"), ratio=0.35, calib_samples=32),
        "recover": dict(
            student=str(root / "prune-1" / "model"),
            teacher="default",
            data=str(root / "curate-1" / "selected.jsonl"),
            max_new_tokens=48,
            rewrite_batch_size=8,
            epochs=1.0,
            batch_size=16,
            micro_batch_size=8,
            max_length=256,
        ),
        "eval": dict(model="default", tasks=["nll:math", "gsm8k"], limit=args.questions, max_new_tokens=64),
    }
    result: dict = {
        "model": "SmolLM2-135M-Instruct (embedded default)",
        "processes": n,
        "cpu_count": os.cpu_count(),
        "reference_forward_tok_s": reference_throughput(),
        "stages": {},
    }
    for stage in stages:
        runs = {}
        for procs in (1, n):
            out = root / f"{stage}-{procs}"
            if out.exists():
                import shutil

                shutil.rmtree(out)
            runs[procs] = run_stage(stage, configs[stage], out, procs, work)
        result["stages"][stage] = {
            "one_process": runs[1],
            f"{n}_processes": runs[n],
            "throughput_ratio": round(runs[1]["wall_s"] / runs[n]["wall_s"], 3),
            "same_output": same_output(stage, root / f"{stage}-1", root / f"{stage}-{n}"),
        }
        if stage == "recover":
            losses = [
                json.loads((root / f"recover-{k}" / "metrics.json").read_text())["train"]["eval_loss"][-1]["loss"]
                for k in (1, n)
            ]
            result["stages"][stage]["held_out_loss"] = {"one_process": losses[0], f"{n}_processes": losses[1]}
            result["stages"][stage]["held_out_loss_rel_diff"] = round(abs(losses[1] - losses[0]) / losses[0], 5)
        print(f"[ranks] {stage}: {json.dumps(result['stages'][stage])}", file=sys.stderr, flush=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
