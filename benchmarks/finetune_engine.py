"""One-process fine-tuning on transformers.Trainer vs the plain loop it replaced, side by side on the embedded
SmolLM2-135M-Instruct: seconds per optimiser step and held-out loss. Prints one JSON object.

    git worktree add /tmp/finescope-loop 165ba64      # the last commit with the plain loop
    .venv/bin/python benchmarks/finetune_engine.py --base-src /tmp/finescope-loop

Both engines fine-tune the same LoRA (rank 32, the recover defaults) on the same examples (the packaged evals
maths sets, instruction + answer, chat template) with the same global batch, in fresh subprocesses that alternate
(base, new, base, new, …) so that machine noise hits both; the JSON gives each round and the medians. The
examples are shuffled differently by the two engines (their own seeded samplers), so the held-out losses agree
to the noise of the data order, not exactly. Reference: tokens/s of a plain forward in the same process
(`reference_forward_tok_s`): read the ratio, not the seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1] + "/src")
sys.path.insert(0, sys.argv[2])
import torch
torch.manual_seed(0)
import finescope
from finescope.modeling import load
from finescope.recover.finetune import TrainSettings, build_examples, split_records
try:
    from finescope.recover.trainer import fine_tune
    engine = "trainer"
except ImportError:
    from finescope.recover.finetune import fine_tune
    engine = "loop"
from recover import evals_math_records
args = json.loads(sys.argv[3])
handle = load("default")
ids = torch.randint(100, 20000, (8, 128))
with torch.no_grad():
    handle.model(input_ids=ids[:2, :16])
    t = time.perf_counter(); handle.model(input_ids=ids); ref = ids.numel() / (time.perf_counter() - t)
records = evals_math_records(args["records"])
train_recs, held_recs = split_records(records, 0.1, 0)
train, _ = build_examples(handle.tokenizer, train_recs, 256)
held, _ = build_examples(handle.tokenizer, held_recs, 256)
s = TrainSettings(lr=2e-4, batch_size=args["batch_size"], micro_batch_size=args["micro_batch_size"],
                  epochs=args["epochs"], seed=0)
_, h = fine_tune(handle.model, train, held, s, pad_id=handle.tokenizer.pad_token_id)
print(json.dumps({"engine": engine, "finescope": finescope.__file__, "seconds_per_step": h["seconds_per_step"],
                  "seconds": h["seconds"], "total_steps": h["total_steps"], "train_tokens": sum(len(e.input_ids) for e in train),
                  "held_out_loss": [e["loss"] for e in h["eval_loss"]], "reference_forward_tok_s": round(ref, 1)}))
"""


def run(src: Path, args: argparse.Namespace) -> dict:
    settings = json.dumps(
        {"records": args.records, "batch_size": args.batch_size, "micro_batch_size": args.micro, "epochs": args.epochs}
    )
    env = {**os.environ, "FINESCOPE_PROGRESS": "0"}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(src), str(ROOT / "benchmarks"), settings],
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{src}: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-src", required=True, help="a checkout of the plain-loop code (git worktree)")
    ap.add_argument("--records", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    rounds = []
    for i in range(args.rounds):
        for name, src in (("base", Path(args.base_src)), ("new", ROOT)):
            r = run(src, args)
            print(f"[finetune_engine] round {i + 1} {name}: {json.dumps(r)}", file=sys.stderr, flush=True)
            rounds.append({"which": name, **r})
    med = {w: statistics.median(r["seconds_per_step"] for r in rounds if r["which"] == w) for w in ("base", "new")}
    ref = statistics.median(r["reference_forward_tok_s"] for r in rounds)
    last = {w: [r for r in rounds if r["which"] == w][-1] for w in ("base", "new")}
    print(
        json.dumps(
            {
                "model": "SmolLM2-135M-Instruct (embedded default), LoRA rank 32",
                "settings": vars(args),
                "engines": {w: last[w]["engine"] for w in last},
                "median_seconds_per_step": med,
                "time_ratio_new_over_base": round(med["new"] / med["base"], 3),
                "held_out_loss_final": {w: last[w]["held_out_loss"][-1] for w in last},
                "held_out_loss_start": {w: last[w]["held_out_loss"][0] for w in last},
                "reference_forward_tok_s": ref,
                "rounds": rounds,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
