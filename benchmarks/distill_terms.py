"""Recovery recipes side by side on a finished default run: the `pruned_kd` stage's recipe as it ran, and the same
with more loss terms (hidden-state distillation) or other settings, over several seeds (LoRA init, dropout, data
order and the held-out split). Domain NLL on two disjoint GSM8K test subsets: `tune` (64 rows outside the eval's
subset; choose recipes here) and `report` (the eval's 60 `nll:math` rows; quote these). Prints one JSON object.

    .venv/bin/python benchmarks/distill_terms.py --run runs/default --work /tmp/distill-terms \
        --recipe kd: --recipe kd+h1:hidden_weight=1 --recipe kd+cos10:hidden_weight=10,hidden_loss=cosine --seeds 0

`--recipe NAME:KEY=VALUE,...` overrides fields of the run's kd recover config (any `RecoverConfig` field; several
--recipe flags). Stages land in <work>/<name>-s<seed> and are resumed (a finished one is only re-evaluated).
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

import torch  # noqa: E402

from compensation import gsm8k_subsets  # noqa: E402
from finescope.config import RecoverConfig, apply_overrides, from_dict  # noqa: E402
from finescope.modeling import load  # noqa: E402
from finescope.prune.importance import calibration_batches  # noqa: E402
from finescope.recover.run import run  # noqa: E402
from finescope.storage import read_json  # noqa: E402
from prune import nll  # noqa: E402
from reference import reference_throughput  # noqa: E402


def kd_stage(run_dir: Path) -> Path:
    """The run's `pruned_kd` recover stage: the one its last `finescope run` used (pipeline.json), else the only
    finished one; a run directory holding several (a config changed between runs) and no record refuses."""
    record = read_json(run_dir / "pipeline.json") if (run_dir / "pipeline.json").is_file() else {}
    named = record.get("variants", {}).get("pruned_kd", {}).get("stages", {}).get("recover")
    if named and (run_dir / named / "DONE").is_file():
        return run_dir / named
    stages = sorted(p for p in (run_dir / "recover").glob("*-kd-*") if (p / "DONE").is_file())
    if not stages:
        raise SystemExit(f"{run_dir}/recover: no finished kd stage (run `finescope run` with the pruned_kd variant)")
    if len(stages) > 1:
        raise SystemExit(
            f"{run_dir}/recover: {len(stages)} finished kd stages ({', '.join(p.name for p in stages)}) and no "
            f"pipeline.json naming the run's own; re-run `finescope run` there or move the others aside"
        )
    return stages[0]


def parse_recipe(text: str) -> tuple[str, list[str]]:
    name, _, rest = text.partition(":")
    return name, [kv.strip() for kv in rest.split(",") if kv.strip()]


@torch.no_grad()
def domain_nll(model_dir: str | Path, evals: dict[str, list[dict]]) -> dict[str, float]:
    handle = load(str(model_dir), dtype="float32", device="cpu")
    out = {}
    for name, recs in evals.items():
        batches = calibration_batches(
            handle.tokenizer, recs, samples=len(recs), length=256, batch_size=8, seed=0, loss_on="response"
        )[0]
        out[name] = round(nll(handle.model, batches), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a finished run directory with a pruned_kd stage")
    ap.add_argument("--work", required=True)
    ap.add_argument("--recipe", action="append", default=[], help="NAME:key=value,... (repeatable)")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--tune", type=int, default=64)
    ap.add_argument("--report", type=int, default=60)
    args = ap.parse_args()
    base_stage = kd_stage(Path(args.run))
    base_cfg = from_dict(RecoverConfig, read_json(base_stage / "config.json")["config"])
    evals = gsm8k_subsets(args.tune, args.report)
    teacher = load(base_cfg.teacher or "default", dtype="float32", device="cpu")
    ref = reference_throughput(teacher.model)
    del teacher
    result: dict = {
        "run": args.run,
        "kd_stage": str(base_stage),
        "reference_tok_s": ref,
        "dense": domain_nll("default", evals),
        "student_before": domain_nll(base_cfg.student, evals),
        "recipes": {},
    }
    for text in args.recipe or ["kd:"]:
        name, overrides = parse_recipe(text)
        runs = []
        for seed in [int(s) for s in args.seeds.split(",")]:
            cfg = apply_overrides(base_cfg, [*overrides, f"seed={seed}"], where="--recipe")
            out = Path(args.work) / f"{name}-s{seed}"
            t = time.perf_counter()
            stage = run(cfg, out)
            seconds = round(time.perf_counter() - t, 1)
            metrics = read_json(stage / "metrics.json")
            runs.append(
                {
                    "seed": seed,
                    "seconds": seconds,
                    "finetune_s": metrics["seconds"].get("finetune"),
                    **domain_nll(stage / "model", evals),
                }
            )
            print(json.dumps({"recipe": name, **runs[-1]}), file=sys.stderr, flush=True)
        summary = {
            k: {"mean": round(statistics.mean(r[k] for r in runs), 4), "min": min(r[k] for r in runs),
                "max": max(r[k] for r in runs)}
            for k in ("tune", "report")
        }  # fmt: skip
        result["recipes"][name] = {"overrides": overrides, "runs": runs, **summary}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
