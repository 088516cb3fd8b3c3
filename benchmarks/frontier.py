"""The size/quality frontier of the embedded default (SmolLM2-135M-Instruct): prune at several ratios with the default
preset's prune settings (importance, compensation, ridge, calibration size) on the default run's curated data, and
measure each pruned model, before any training, on the eval's own NLL tasks. Prints one JSON object (and writes it to
--out); `finescope report RUN --frontier FILE` draws it.

    .venv/bin/python benchmarks/frontier.py --data runs/default/curate/<folder>/selected.jsonl \
        --out benchmarks/results/frontier.json                                  # ~5 min on 2 CPU cores

Per ratio: parameters (achieved ratio), `nll:math` NLL and top-1 token accuracy on exactly the eval's 60 GSM8K rows
(`eval.limit` 60, the same scoring code as `finescope eval`, so dense matches the run's dense row), and the off-domain
`nll:code` on 60 HumanEval rows; dense is the reference. Prune + compensation only: no recovery. The importance scores
are computed once on the calibration batches (they do not depend on the ratio); the compensation statistics are
gathered per ratio (they depend on what is kept), as `finescope prune` does (benchmarks/compensation.py helpers).
The machine's reference throughput (plain forward tok/s in this process) is printed with the figures.

**After recovery** (`--run DIR`, repeatable): the frontier read from finished `finescope run` directories, one per
ratio, each with the `pruned` variant and a recovered one (`--variant`, default `pruned_kd`: the default's recipe), e.g.
`finescope run --run-dir runs/r0.2 variants=dense,pruned,pruned_kd prune.ratio=0.2`. Nothing is pruned or scored
here: every figure is the run's own eval stage (same tasks, rows and scoring as the table of its report), dense from
its dense eval, the recovered figures under each point's "recovered". Runs of different models or eval settings are
refused.

`--curves FILE` folds in benchmarks/data_curves.py's JSON (recovery data source × volume × seed: the learning
curves and seed spreads of curated vs random vs generic recovery data) under "curves": those are recovery runs of
minutes each, resumable, so they are measured by their own benchmark rather than re-run here.
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from finescope import storage  # noqa: E402
from finescope.config import PipelineConfig, load_config  # noqa: E402
from finescope.data import read_records  # noqa: E402
from finescope.evaluate.perplexity import domain_nll  # noqa: E402
from finescope.evaluate.tasks import resolve_task, select_subset  # noqa: E402
from finescope.hashing import file_sha256  # noqa: E402
from finescope.modeling import load  # noqa: E402
from finescope.prune import compensate  # noqa: E402
from finescope.prune.importance import calibration_batches, compute_scores  # noqa: E402
from finescope.prune.run import Compensation, plan_kept, prune_model  # noqa: E402
from finescope.prune.solver import solve  # noqa: E402
from finescope.prune.structure import model_shapes  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference import reference_throughput  # noqa: E402  (benchmarks/reference.py)

ROOT = Path(__file__).resolve().parents[1]
DOMAIN, OFF_DOMAIN = "nll:math", "nll:code"


def default_data() -> str:
    """The default run's curated records (runs/default/curate/*/selected.jsonl), or a one-line refusal."""
    found = sorted(glob.glob(str(ROOT / "runs" / "default" / "curate" / "*" / "selected.jsonl")))
    if len(found) != 1:
        sys.exit(
            f"frontier: --data: give the default run's curated records (found {len(found)} candidates under "
            f"{ROOT / 'runs/default/curate'}; `make run` writes one)"
        )
    return found[0]


def measure(model, tok, docs: dict[str, list[dict]], batch_size: int) -> dict:
    """NLL and top-1 of `model` on each task's eval subset (the eval's own scoring)."""
    out = {}
    for task, recs in docs.items():
        m, _ = domain_nll(model, tok, recs, batch_size=batch_size, desc=task)
        out[task] = {"nll": round(m["nll"], 4), "top1": round(m["top1"], 4), "tokens": m["tokens"]}
    return out


def eval_figures(run_dir: Path, stage: str, tasks: tuple[str, ...]) -> dict:
    """An eval stage's parameters and {task: {"nll", "top1"}} of `tasks`, from its results.json."""
    from finescope.artifacts import EvalResults

    res = EvalResults.read(run_dir / stage / EvalResults.FILE)
    out: dict = {"parameters": res.model.parameters}
    for r in res.results:
        if r.task in tasks and r.metric in ("nll", "top1"):
            out.setdefault(r.task, {})[r.metric] = r.value
            out[r.task]["n"] = r.n
    return out


def from_runs(run_dirs: list[str], variant: str) -> dict:
    """The frontier of finished pipeline runs, one per ratio: pruned and `variant` (recovered) per ratio, dense once."""
    from finescope.artifacts import PipelineManifest

    points: list[dict] = []
    dense: dict | None = None
    seen: dict = {}
    for spec in run_dirs:
        run_dir = Path(spec).expanduser().resolve()
        manifest = PipelineManifest.read(run_dir / PipelineManifest.FILE)
        missing = [v for v in ("dense", "pruned", variant) if v not in manifest.variants]
        if missing:
            sys.exit(
                f"frontier: {run_dir}/pipeline.json: no variant {', '.join(map(repr, missing))}; run it with "
                f"variants=dense,pruned,{variant}"
            )
        cfg = manifest.config
        same = {"model": cfg["model"], "eval": {k: cfg["eval"][k] for k in ("tasks", "limit", "mmlu_scoring")}}
        if seen and same != seen:
            sys.exit(f"frontier: {run_dir}: another model or eval setting than the first run ({same} vs {seen})")
        seen = same
        stages = {v: manifest.variants[v].stages for v in ("dense", "pruned", variant)}
        tasks = (DOMAIN, OFF_DOMAIN)
        d = eval_figures(run_dir, stages["dense"]["eval"], tasks)
        if dense is not None and abs(d[DOMAIN]["nll"] - dense[DOMAIN]["nll"]) > 1e-3:
            sys.exit(
                f"frontier: {run_dir}: its dense {DOMAIN} NLL {d[DOMAIN]['nll']:.4f} differs from the first run's "
                f"{dense[DOMAIN]['nll']:.4f}: not the same dense model or eval"
            )
        dense = dense or d
        pruned = eval_figures(run_dir, stages["pruned"]["eval"], tasks)
        recovered = eval_figures(run_dir, stages[variant]["eval"], tasks)
        wall = manifest.stage_seconds or {}
        points.append(
            {
                "ratio": cfg["prune"]["ratio"],
                "ratio_achieved": round(1 - pruned["parameters"] / dense["parameters"], 4),
                **pruned,
                "recovered": {
                    "variant": variant,
                    "label": manifest.variants[variant].label,
                    **{k: v for k, v in recovered.items() if k != "parameters"},
                    "recover_seconds": wall.get(stages[variant].get("recover", "")),
                },
                "run": str(run_dir),
            }
        )
        print(json.dumps(points[-1]), file=sys.stderr, flush=True)
    assert dense is not None  # run_dirs is not empty
    cfg0 = PipelineManifest.read(Path(run_dirs[0]).expanduser().resolve() / PipelineManifest.FILE).config
    return {
        "model": str(seen["model"]),
        "reference_forward_tok_s": None,
        "reference_note": "figures read from finished runs; each run's machine and wall time are in its own records",
        "prune": {
            **{k: cfg0["prune"].get(k) for k in ("importance", "compensation", "refit_ridge", "calib_samples")},
            "recovery": "none",
        },
        "recovered_variant": variant,
        "tasks": {DOMAIN: {"role": "domain", "n": dense[DOMAIN]["n"]}, OFF_DOMAIN: {"role": "off_domain"}},
        "domain_task": DOMAIN,
        "off_domain_task": OFF_DOMAIN,
        "dense": dense,
        "points": sorted(points, key=lambda p: p["ratio"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="calibration records (default: runs/default/curate/*/selected.jsonl)")
    ap.add_argument("--ratios", default="0.1,0.2,0.35,0.5")
    ap.add_argument("--preset", default=str(ROOT / "configs" / "default.yaml"), help="prune/eval settings from here")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--curves", default=None, help="benchmarks/data_curves.py JSON to fold in under 'curves'")
    ap.add_argument(
        "--run",
        action="append",
        default=[],
        metavar="RUN_DIR",
        help="a finished `finescope run` (variants dense, pruned and --variant) at one ratio; repeat per ratio: the "
        "frontier after recovery, read from the runs' eval stages (nothing is pruned here)",
    )
    ap.add_argument("--variant", default="pruned_kd", help="--run: the recovered variant drawn beside pruned")
    args = ap.parse_args()
    curves = None
    if args.curves:
        try:
            curves = json.loads(Path(args.curves).read_text())
        except (OSError, ValueError) as e:
            sys.exit(f"frontier: --curves {args.curves}: not a data_curves.py JSON ({e})")
        if not isinstance(curves, dict) or "points" not in curves:
            sys.exit(f"frontier: --curves {args.curves}: missing field 'points' (not a data_curves.py JSON)")

    if args.run:
        from finescope import FinescopeError

        try:
            recovered = from_runs(args.run, args.variant)
        except FinescopeError as e:  # a folder that is not a finished run: one line, nothing written
            sys.exit(f"frontier: --run: {e}")
        if curves is not None:
            recovered["curves"] = curves
        text = json.dumps(recovered, indent=2)
        print(text)
        if args.out:
            storage.write_atomic(Path(args.out), text + "\n")
        return

    cfg = load_config(PipelineConfig, args.preset)
    pc, ec = cfg.prune, cfg.eval
    data = args.data or default_data()
    ratios = [float(r) for r in args.ratios.split(",")]
    t_start = time.perf_counter()
    handle = load("default", device="cpu")
    dense, tok = handle.model, handle.tokenizer
    shapes = model_shapes(handle.adapter, dense)
    docs = {}
    for task in (DOMAIN, OFF_DOMAIN):
        rows = resolve_task(task).docs()
        docs[task] = [rows[i] for i in select_subset(len(rows), ec.limit)]
    records = list(read_records(data))
    batches, calib = calibration_batches(
        tok,
        records,
        samples=pc.calib_samples,
        length=pc.calib_length,
        batch_size=pc.batch_size,
        seed=pc.seed,
        source=data,
        loss_on=pc.calib_loss,
    )
    result: dict = {
        "model": "SmolLM2-135M-Instruct (embedded default)",
        "reference_forward_tok_s": reference_throughput(dense),
        "threads": torch.get_num_threads(),
        "prune": {
            "importance": pc.importance,
            "compensation": pc.compensation,
            "refit_ridge": pc.refit_ridge,
            "head_mode": pc.head_mode,
            "calib_samples": pc.calib_samples,
            "calib_length": pc.calib_length,
            "calib_loss": pc.calib_loss,
            "recovery": "none",
        },
        "calibration": {"file": data, "sha256": file_sha256(Path(data)), "records": len(records), **calib},
        "tasks": {
            DOMAIN: {"role": "domain", "n": len(docs[DOMAIN]), "what": "GSM8K test solutions given their questions"},
            OFF_DOMAIN: {"role": "off_domain", "n": len(docs[OFF_DOMAIN]), "what": "HumanEval canonical solutions"},
        },
        "domain_task": DOMAIN,
        "off_domain_task": OFF_DOMAIN,
        "dense": {"parameters": sum(p.numel() for p in dense.parameters()), **measure(dense, tok, docs, ec.batch_size)},
        "points": [],
    }
    if curves is not None:
        result["curves"] = curves
    print(f"dense {json.dumps(result['dense'])}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    scores = compute_scores(handle.adapter, batches, pc.importance, seed=pc.seed, desc=pc.importance)
    scores_s = time.perf_counter() - t0
    for ratio in ratios:
        t0 = time.perf_counter()
        plan = solve(shapes, ratio, head_mode=pc.head_mode, mlp_multiple=pc.mlp_multiple)
        comp = None
        if pc.compensation != "none":
            kept = plan_kept(handle.adapter, scores, plan, pc.head_mode)
            stats = compensate.gather(handle.adapter, batches, kept, pc.compensation, desc="compensation")
            comp = Compensation(pc.compensation, pc.refit_ridge, stats)
        model = copy.deepcopy(dense)
        h = type("Handle", (), {})()
        h.model, h.adapter = model, type(handle.adapter)(model)
        prune_model(h, scores, plan, pc.head_mode, comp)
        prune_s = time.perf_counter() - t0
        point = {
            "ratio": ratio,
            "ratio_achieved": round(plan.ratio_achieved, 4),
            "parameters": sum(p.numel() for p in model.parameters()),
            "prune_seconds": round(prune_s, 1),  # plan, compensation statistics and slicing; not the scores
            **measure(model, tok, docs, ec.batch_size),
        }
        result["points"].append(point)
        print(json.dumps(point), file=sys.stderr, flush=True)
        if args.out:  # the points so far, so that a run cut short still leaves a readable frontier
            storage.write_atomic(Path(args.out), json.dumps(result, indent=2) + "\n")
        del model
    result["scores_seconds"] = round(scores_s, 1)
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        storage.write_atomic(Path(args.out), text + "\n")


if __name__ == "__main__":
    main()
