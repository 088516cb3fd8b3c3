"""Benchmark: the dense model on every MMLU slice (letter and cloze), GSM8K, HumanEval and nll:math; prints JSON.

    python benchmarks/eval.py                              # full sets (hours on a 2-core CPU)
    python benchmarks/eval.py --mmlu 20 --gsm8k 10 --humaneval 10 --nll 50   # a documented subset
    python benchmarks/eval.py --only humaneval,nll                           # two of the full sets

Each figure carries n, stderr and wall time; for a subset, `full_set_estimate_s` extrapolates the wall time of
the whole task linearly (questions evenly spaced through the task, so lengths are representative).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Literal

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--mmlu", type=int, default=0, help="questions per MMLU slice (0 = all)")
    ap.add_argument("--gsm8k", type=int, default=0, help="GSM8K problems (0 = all 1,319)")
    ap.add_argument("--humaneval", type=int, default=0, help="HumanEval problems (0 = all 164)")
    ap.add_argument("--nll", type=int, default=0, help="GSM8K solutions for nll:math (0 = all 1,319)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--only", default="mmlu,gsm8k,humaneval,nll", help="which of mmlu,gsm8k,humaneval,nll to run")
    args = ap.parse_args()
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    unknown = only - {"mmlu", "gsm8k", "humaneval", "nll"}
    if unknown:
        ap.error(f"--only: unknown {', '.join(sorted(unknown))}; choose from mmlu, gsm8k, humaneval, nll")

    import torch

    from finescope.config import EvalConfig
    from finescope.evaluate.run import evaluate_task, model_identity
    from finescope.evaluate.tasks import resolve_task
    from finescope.modeling import load

    start = time.perf_counter()
    handle = load(args.model)
    plan: list[tuple[str, int, Literal["letter", "cloze", "both"]]]
    plan = [(f"mmlu:{g}", args.mmlu, "both") for g in ("stem", "humanities", "social_sciences", "other")]
    plan += [("gsm8k", args.gsm8k, "cloze"), ("humaneval", args.humaneval, "cloze"), ("nll:math", args.nll, "cloze")]
    plan = [p for p in plan if p[0].split(":")[0] in only]
    results = []
    for name, limit, scoring in plan:
        task = resolve_task(name)
        total = len(task.docs())
        cfg = EvalConfig(
            model=args.model,
            tasks=[name],
            limit=min(limit, total),
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            mmlu_scoring=scoring,
            allow_code_execution=True,
        )
        for res, _ in evaluate_task(task, handle, cfg):
            res.pop("by_subject", None)
            res["task_size"] = total
            if res["n"] < total:
                res["full_set_estimate_s"] = round(res["wall_s"] * total / res["n"])
            results.append(res)
            print(json.dumps(res), file=sys.stderr, flush=True)
    print(
        json.dumps(
            {
                "model": model_identity(handle),
                "machine": {
                    "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                },
                "limits": {
                    k: v
                    for k, v in (
                        ("mmlu_per_slice", args.mmlu or "all"),
                        ("gsm8k", args.gsm8k or "all"),
                        ("humaneval", args.humaneval or "all"),
                        ("nll_math", args.nll or "all"),
                    )
                    if k.split("_")[0] in only
                },
                "results": results,
                "wall_s": round(time.perf_counter() - start, 1),
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
