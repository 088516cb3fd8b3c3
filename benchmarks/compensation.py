"""Compensation at prune time (prune/compensate.py) on the embedded SmolLM2-135M-Instruct: domain NLL of the pruned
model before any training, per importance × compensation mode (× ridge), and per shape allocation (the split of the
ratio between attention heads, MLP channels and whole blocks). Prints one JSON object.

    .venv/bin/python benchmarks/compensation.py --data runs/default/curate/selected.jsonl        # ~10 min on CPU
    .venv/bin/python benchmarks/compensation.py --importance taylor --modes none,refit --ridges 0.001,0.01,0.1
    .venv/bin/python benchmarks/compensation.py --importance flap --modes refit --attention-ratios auto,0,0.667 --depths 0,2

Two disjoint GSM8K test subsets, so that a lever is chosen on one and reported on the other:
  tune   — 64 test solutions that are not among the eval's `nll:math` questions (rows 661…, skipping those);
  report — exactly the eval's `nll:math --limit 60` questions (`select_subset(1319, 60)`).
NLL: token-mean NLL of the solution given its question (chat template), on the response tokens.
Calibration: 64 records × 128 tokens as plain text on --data (default: 64 of the default pool's maths records, a
fixed set, not a curation), the default preset's settings when the re-fit was chosen; the preset now reads them
chat-formatted (`--calib-loss response --calib-length 256`). The machine's reference throughput (plain forward) is
printed.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from finescope import assets  # noqa: E402
from finescope.corpora import MATH_SETS, default_pool_path  # noqa: E402
from finescope.data import read_records  # noqa: E402
from finescope.evaluate.tasks import select_subset  # noqa: E402
from finescope.modeling import load  # noqa: E402
from finescope.prune import compensate  # noqa: E402
from finescope.prune.importance import calibration_batches, compute_scores  # noqa: E402
from finescope.prune.run import Compensation, plan_kept, prune_model  # noqa: E402
from finescope.prune.solver import solve  # noqa: E402
from finescope.prune.structure import model_shapes  # noqa: E402
from prune import nll  # noqa: E402  (benchmarks/prune.py: token-mean response NLL)
from reference import reference_throughput  # noqa: E402


def gsm8k_subsets(tune_n: int, report_n: int) -> dict[str, list[dict]]:
    rows = [json.loads(line) for line in assets.data_path("gsm8k").read_text().splitlines() if line.strip()]
    report_idx = select_subset(len(rows), report_n)
    taken = set(report_idx)
    tune_idx = [i for i in range(len(rows) // 2 + 1, len(rows)) if i not in taken][:tune_n]
    recs = [{"id": str(i), "instruction": r["question"], "response": r["answer"]} for i, r in enumerate(rows)]
    return {"tune": [recs[i] for i in tune_idx], "report": [recs[i] for i in report_idx]}


def calibration_records(path: str | None, n: int, seed: int) -> tuple[list[dict], str]:
    if path:
        return list(read_records(path)), f"{path}"
    rows = [r for r in read_records(default_pool_path()) if r.get("source", "").removeprefix("evals/") in MATH_SETS]
    return random.Random(seed).sample(rows, n), f"{n} of the default pool's maths records (seed {seed})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="calibration records (default: a fixed set of pool maths records)")
    ap.add_argument("--ratio", type=float, default=0.35)
    ap.add_argument("--importance", default="taylor,wanda_sp,flap")
    ap.add_argument("--modes", default="none,bias,refit,bias_refit")
    ap.add_argument("--ridges", default="0.01", help="refit ridges to try (comma-separated)")
    ap.add_argument("--inputs", default="dense", help="dense (one shot), pruned (block by block), or both")
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-length", type=int, default=128)
    ap.add_argument(
        "--calib-loss",
        default="text",
        choices=["text", "response"],
        help="prune.calib_loss: each record as plain text, or chat-formatted (the form the eval and recovery read)",
    )
    ap.add_argument(
        "--attention-ratios",
        default="auto",
        help="the shapes' split between attention and MLP: fractions of query heads removed per layer "
        "(prune.attention_ratio; the MLP width takes up the rest of the ratio), comma-separated; auto = the solver's "
        "balanced choice",
    )
    ap.add_argument("--depths", default="0", help="whole blocks dropped (prune.depth), comma-separated")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", default=None, help="folder: save each pruned model there (for recovery runs)")
    ap.add_argument("--model", default="default", help="the model to prune (default: the embedded SmolLM2)")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="the cheapest mode (the test suite runs it on a tiny model): wanda_sp importance, modes none and "
        "refit, 4 calibration records of 32 tokens",
    )
    args = ap.parse_args()

    if args.smoke:
        args.importance, args.modes, args.calib_samples, args.calib_length = "wanda_sp", "none,refit", 4, 32
    handle = load(args.model, device="cpu")
    dense, tok = handle.model, handle.tokenizer
    shapes = model_shapes(handle.adapter, dense)
    plans = [
        solve(shapes, args.ratio, attention_ratio=None if a == "auto" else float(a), depth=int(d))
        for d in args.depths.split(",")
        for a in args.attention_ratios.split(",")
    ]
    subsets = gsm8k_subsets(64, 60)
    evals = {
        name: calibration_batches(tok, recs, samples=len(recs), length=256, batch_size=8, seed=0, loss_on="response")[0]
        for name, recs in subsets.items()
    }
    records, source = calibration_records(args.data, args.calib_samples, args.seed)
    batches, info = calibration_batches(
        tok,
        records,
        samples=args.calib_samples,
        length=args.calib_length,
        batch_size=8,
        seed=args.seed,
        loss_on=args.calib_loss,
    )
    result: dict = {
        "model": "SmolLM2-135M-Instruct (embedded default)" if args.model == "default" else args.model,
        "reference_forward_tok_s": reference_throughput(dense),
        "threads": torch.get_num_threads(),
        "ratio_target": args.ratio,
        "params_after": plans[0].params_after,
        "calibration": {"source": source, "loss_on": args.calib_loss, **info},
        "nll_data": "GSM8K test solutions given their questions, response tokens; tune: 64 rows outside the eval's "
        "subset; report: the eval's nll:math --limit 60 rows",
        "dense": {name: nll(dense, b) for name, b in evals.items()},
        "pruned": [],
    }
    print(f"dense {result['dense']}", file=sys.stderr, flush=True)
    for importance in args.importance.split(","):
        depth_importance = "block_influence" if any(p.depth for p in plans) else None  # the stage's default
        scores = compute_scores(
            handle.adapter, batches, importance, depth_importance=depth_importance, seed=args.seed, desc=importance
        )
        for plan in plans:
            shape = {
                "heads": plan.heads,
                "intermediate": plan.intermediate,
                "depth": plan.depth,
                "params_after": plan.params_after,
            }
            kept = plan_kept(handle.adapter, scores, plan, "query")
            stats = None  # gathered once (with the second moments, which every mode can read) per importance × shape
            for mode in args.modes.split(","):
                ridges = [float(r) for r in args.ridges.split(",")] if compensate.needs_gram(mode) else [0.0]
                for inputs in args.inputs.split(",") if mode != "none" else ["dense"]:
                    for ridge in ridges:
                        model: Any = copy.deepcopy(dense)  # a transformers model (save_pretrained), not a bare Module
                        h = type("Handle", (), {})()
                        h.model, h.adapter = model, type(handle.adapter)(model)
                        t0 = time.perf_counter()
                        comp = None
                        if mode != "none" and inputs == "pruned":
                            comp = Compensation(mode, ridge, inputs="pruned", batches=batches)
                        elif mode != "none":
                            if stats is None:
                                stats = compensate.gather(
                                    handle.adapter, batches, kept, "bias_refit", desc="statistics"
                                )
                            comp = Compensation(mode, ridge, stats)
                        prune_model(h, scores, plan, "query", comp)
                        seconds = time.perf_counter() - t0
                        row = {"importance": importance, "mode": mode, "inputs": inputs, "ridge": ridge, **shape}
                        row.update({"seconds": round(seconds, 1), **{name: nll(model, b) for name, b in evals.items()}})
                        result["pruned"].append(row)
                        print(json.dumps(row), file=sys.stderr, flush=True)
                        if args.save:
                            out = os.path.join(
                                args.save, f"{importance}-{mode}-{inputs}-{ridge:g}-h{plan.heads}-i{plan.intermediate}"
                            )
                            model.save_pretrained(out)
                            tok.save_pretrained(out)
                        del model
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
