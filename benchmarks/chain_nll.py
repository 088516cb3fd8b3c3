"""Domain NLL along each variant's chain of finished runs: every model a chain's prune and recover stages wrote
(iterative pruning's steps included), scored on the two disjoint GSM8K subsets of `benchmarks/compensation.py`
(`tune`: 64 test rows outside the eval's subset, choose settings here; `report`: the eval's 60 `nll:math` rows, quote
these), beside the run's own eval figure. Prints one JSON object (and writes it to --out).

    # one-shot (the default run) against 2-step iterative pruning at the same recovery budget:
    .venv/bin/finescope run --config configs/default.yaml --run-dir runs/iter2 variants=pruned_kd \\
        prune_schedule=0.175,0.35
    .venv/bin/python benchmarks/chain_nll.py --run one-shot=runs/default --run iter2=runs/iter2 \\
        --variant pruned_kd --out benchmarks/results/iterative_prune.json

Per run: for each stage of the variant's chain that holds a model (`prune@1`, `recover@1`, …, `prune`, `recover`),
its parameters and tune/report NLL (response tokens, records cut at 256 tokens: not the eval's own figure, so
compare rows with each other), then the eval stage's `nll:math` NLL and top-1. The dense model is scored once.
The machine's reference throughput (plain SmolLM2 forward, tok/s in this process) is printed with the figures.

`--model NAME=DIR` (repeatable) scores model folders on their own, e.g. the prune stages of one run directory at
several calibration sizes (docs/results.md §2.5):

    .venv/bin/python benchmarks/chain_nll.py --model c64=runs/x/prune/<a>/model --model c256=runs/x/prune/<b>/model
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from compensation import gsm8k_subsets  # noqa: E402
from distill_terms import domain_nll  # noqa: E402
from finescope.artifacts import EvalResults, PipelineManifest  # noqa: E402
from finescope.modeling import load  # noqa: E402
from reference import reference_throughput  # noqa: E402


def chain_models(run_dir: Path, variant: str) -> dict[str, Path]:
    """Stage name → model folder, in chain order, for the stages of `variant` that wrote a model."""
    manifest = PipelineManifest.read(run_dir / PipelineManifest.FILE)
    if variant not in manifest.variants:
        raise SystemExit(f"{run_dir}/pipeline.json: no variant {variant!r} (has {', '.join(manifest.variants)})")
    stages = manifest.variants[variant].stages
    return {s: run_dir / p / "model" for s, p in stages.items() if s.split("@")[0] in ("prune", "recover")}


def eval_figures(run_dir: Path, variant: str, task: str) -> dict[str, float | None]:
    stages = PipelineManifest.read(run_dir / PipelineManifest.FILE).variants[variant].stages
    res = EvalResults.read(run_dir / stages["eval"] / EvalResults.FILE)
    out: dict[str, float | None] = {"parameters": res.model.parameters}
    for r in res.results:
        if r.task == task:
            out[r.metric] = r.value
    return out


def parameters(model_dir: Path) -> int:
    handle = load(str(model_dir), dtype="float32", device="cpu")
    return sum(p.numel() for p in handle.model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="append", default=[], help="NAME=RUN_DIR of a finished run (repeatable)")
    ap.add_argument("--model", action="append", default=[], help="NAME=MODEL_DIR: a model folder (repeatable)")
    ap.add_argument("--variant", default="pruned_kd")
    ap.add_argument("--task", default="nll:math", help="the eval task whose figures are copied beside")
    ap.add_argument("--tune", type=int, default=64)
    ap.add_argument("--report", type=int, default=60)
    ap.add_argument("--dense", default="default", help="the dense model, scored once as the reference")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not args.run and not args.model:
        ap.error("give at least one --run NAME=RUN_DIR or --model NAME=MODEL_DIR")
    evals = gsm8k_subsets(args.tune, args.report)
    dense = load(args.dense, dtype="float32", device="cpu")
    out: dict = {"reference_tok_s": reference_throughput(dense.model), "variant": args.variant, "task": args.task}
    del dense
    out["dense"] = domain_nll(args.dense, evals)
    out["runs"] = {}
    for item in args.run:
        name, _, path = item.partition("=")
        run_dir = Path(path).expanduser().resolve()
        chain = {}
        for stage, model in chain_models(run_dir, args.variant).items():
            chain[stage] = {"model": str(model), "parameters": parameters(model), **domain_nll(model, evals)}
            print(f"{name} {stage}: {chain[stage]}", file=sys.stderr, flush=True)
        out["runs"][name] = {
            "run": str(run_dir),
            "chain": chain,
            "eval": eval_figures(run_dir, args.variant, args.task),
        }
    out["models"] = {}
    for item in args.model:
        name, _, path = item.partition("=")
        model = Path(path).expanduser().resolve()
        out["models"][name] = {"model": str(model), "parameters": parameters(model), **domain_nll(model, evals)}
        print(f"{name}: {out['models'][name]}", file=sys.stderr, flush=True)
    text = json.dumps(out, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
