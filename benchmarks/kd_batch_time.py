"""What a smaller KD batch costs: the fine-tuning time of a finished run's `pruned_kd` recovery at two batch
settings, side by side on the same student, data and teacher-target cache, alternating (A, B, A, B, …), one epoch
each. The optimiser steps differ (batch 16: N/16 per epoch, batch 4: N/4), the forward/backward passes over the
records are the same. Prints one JSON object with each run's fine-tuning seconds, the medians and their ratio, and
the reference throughput (plain forward, same process) before and after.

    FINESCOPE_HOME=<the run's home> .venv/bin/python benchmarks/kd_batch_time.py --run runs/default \
        --work /tmp/kd-batch-time --a 16:8 --b 4:4 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from distill_terms import kd_stage  # noqa: E402
from finescope.config import RecoverConfig, apply_overrides, from_dict  # noqa: E402
from finescope.recover.run import run  # noqa: E402
from finescope.storage import read_json  # noqa: E402
from reference import reference_throughput  # noqa: E402


def batch(text: str) -> tuple[int, int]:
    size, _, micro = text.partition(":")
    try:
        return int(size), int(micro or size)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: want BATCH:MICRO, e.g. 16:8") from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a finished run directory with a pruned_kd stage")
    ap.add_argument("--work", required=True)
    ap.add_argument("--a", type=batch, default=(16, 8), help="BATCH:MICRO of the first setting [16:8]")
    ap.add_argument("--b", type=batch, default=(4, 4), help="BATCH:MICRO of the second setting [4:4]")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--epochs", type=float, default=1.0)
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error(f"--repeats {args.repeats}: want at least 1 (each repeat times both settings once)")
    if args.epochs <= 0:
        ap.error(f"--epochs {args.epochs}: want a positive number of epochs")
    stage = kd_stage(Path(args.run))
    base = from_dict(RecoverConfig, read_json(stage / "config.json")["config"])
    out: dict = {"kd_stage": str(stage), "epochs": args.epochs, "reference_tok_s_before": reference_throughput()}
    runs = []
    for i in range(args.repeats):
        for size, micro in (args.a, args.b):
            cfg = apply_overrides(
                base,
                [f"batch_size={size}", f"micro_batch_size={micro}", f"epochs={args.epochs}"],
                where="kd_batch_time",
            )
            t = time.perf_counter()
            done = run(cfg, Path(args.work) / f"r{i}-b{size}-m{micro}")
            seconds = read_json(done / "metrics.json")["seconds"]
            runs.append(
                {
                    "batch": size,
                    "micro": micro,
                    "finetune_s": seconds["finetune"],
                    "stage_s": round(time.perf_counter() - t, 1),
                }
            )
            print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    out["runs"] = runs
    out["reference_tok_s_after"] = reference_throughput()
    medians = {}
    for size, micro in (args.a, args.b):
        medians[f"{size}:{micro}"] = statistics.median(
            r["finetune_s"] for r in runs if (r["batch"], r["micro"]) == (size, micro)
        )
    out["median_finetune_s"] = medians
    a, b = medians[f"{args.a[0]}:{args.a[1]}"], medians[f"{args.b[0]}:{args.b[1]}"]
    out["ratio_b_over_a"] = round(b / a, 3)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
