"""Prune benchmark on the embedded SmolLM2-135M-Instruct: domain NLL by importance × calibration source, stage
wall time and peak RSS, dense-vs-pruned forward latency, parameter ratio. Prints one JSON object.

    nice -n 5 .venv/bin/python benchmarks/prune.py                       # defaults below (CPU: ~25 min)
    .venv/bin/python benchmarks/prune.py --importance taylor,magnitude --calib-samples 16 --nll-samples 32

Calibration sources (same record count each):
  curated  — a fixed math set, not a curation (pass --curated for a curate stage's selected.jsonl): the default
             pool's maths records (every row of the evals registry's maths sets, `corpora.MATH_SETS`; until pool
             v1 these were BIG-bench elementary_math_qa problems, which the package index no longer serves);
  generic  — BBC news articles + Wikipedia snippets (text records);
  random   — a uniform sample of a mixed pool (those maths records, Wikipedia, OpenWebText, BBC news).
Domain NLL: token-mean NLL of GSM8K *test* solutions given their question (chat template), on the response
tokens. GSM8K test serves only as held-out text for NLL here, never as calibration data.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from finescope import assets  # noqa: E402
from finescope.corpora import MATH_SETS, default_pool_path  # noqa: E402
from finescope.data import read_records  # noqa: E402
from finescope.modeling import load  # noqa: E402
from finescope.prune.importance import calibration_batches, compute_scores  # noqa: E402
from finescope.prune.run import prune_model  # noqa: E402
from finescope.prune.solver import solve  # noqa: E402
from finescope.prune.structure import model_shapes  # noqa: E402
from reference import token_ids  # noqa: E402  (benchmarks/reference.py)


def math_records(n: int, seed: int, skip: int = 0) -> list[dict]:
    """`n` of the default pool's maths records (instruction → answer), after the first `skip` in pool order."""
    rows = [
        {"id": r["id"], "instruction": r["instruction"], "response": r["response"]}
        for r in read_records(default_pool_path())
        if r.get("source", "").removeprefix("evals/") in MATH_SETS
    ]
    rows = rows[skip:]
    return random.Random(seed).sample(rows, min(n, len(rows)))


def text_records(name: str, n: int, seed: int) -> list[dict]:
    path = assets.data_path(name)
    if name in ("wikipedia", "openwebtext"):  # schelling_point rows: the snippet is under key "0"
        recs = [
            {"id": f"{name}-{i}", "text": json.loads(line)["0"]}
            for i, line in enumerate(path.read_text().splitlines())
            if line.strip()
        ]
    else:
        recs = list(read_records(path))
    return random.Random(seed).sample(recs, n)


def calibration_sets(n: int, seed: int, curated_file: str | None = None) -> dict[str, list[dict]]:
    curated = random.Random(seed).sample(list(read_records(curated_file)), n) if curated_file else math_records(n, seed)
    generic = text_records("bbc_news", n // 2, seed) + text_records("wikipedia", n - n // 2, seed)
    pool = (
        math_records(1500, seed + 1)
        + text_records("wikipedia", 1000, seed + 1)
        + text_records("openwebtext", 1000, seed + 1)
        + text_records("bbc_news", 2000, seed + 1)
    )
    return {"curated": curated, "generic": generic, "random": random.Random(seed).sample(pool, n)}


def gsm8k_nll_batches(tokenizer, n: int, length: int) -> list[dict]:
    rows = [json.loads(line) for line in assets.data_path("gsm8k").read_text().splitlines() if line.strip()][:n]
    recs = [{"id": str(i), "instruction": r["question"], "response": r["answer"]} for i, r in enumerate(rows)]
    return calibration_batches(tokenizer, recs, samples=n, length=length, batch_size=8, seed=0, loss_on="response")[0]


@torch.no_grad()
def nll(model, batches) -> float:
    total, count = 0.0, 0
    for b in batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
        labels = b["labels"][:, 1:]
        total += float(
            torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
            )
        )
        count += int((labels != -100).sum())
    return total / count


@torch.no_grad()
def latency_ratio(dense, pruned, tokens: int = 256, batch: int = 4, repeats: int = 5) -> dict:
    ids = token_ids(dense, (batch, tokens))
    times: dict[str, list[float]] = {"dense": [], "pruned": []}
    for m in (dense, pruned):
        m(input_ids=ids)  # warm-up
    for _ in range(repeats):  # alternate, so load from other processes hits both alike
        for name, m in (("dense", dense), ("pruned", pruned)):
            t0 = time.perf_counter()
            m(input_ids=ids)
            times[name].append(time.perf_counter() - t0)
    d, p = statistics.median(times["dense"]), statistics.median(times["pruned"])
    return {"dense_s": d, "pruned_s": p, "ratio": p / d, "batch": batch, "tokens": tokens, "repeats": repeats}


def stage_run(records: list[dict], ratio: float, calib_samples: int, calib_length: int) -> dict:
    """The real `finescope prune` in a child process: its report gives wall time and peak RSS."""
    with tempfile.TemporaryDirectory(prefix="finescope-bench-") as tmp:
        data = Path(tmp) / "curated.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in records))
        out = Path(tmp) / "prune"
        cmd = [
            sys.executable,
            "-m",
            "finescope.cli",
            "prune",
            "--model",
            "default",
            "--data",
            str(data),
            "--ratio",
            str(ratio),
            "--calib-samples",
            str(calib_samples),
            "--calib-length",
            str(calib_length),
            "--out",
            str(out),
        ]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"finescope prune failed: {proc.stderr.strip()[-500:]}")
        report = json.loads((out / "report.json").read_text())
    return {
        "command_wall_s": wall,
        "stage_wall_time": report["wall_time"],
        "peak_rss_mib": report["peak_memory_mib"]["rss"],
        "verification": report["verification"],
        "shapes_after": report["shapes_after"],
        "parameters": report["parameters"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.35)
    ap.add_argument("--importance", default="taylor,taylor2,taylor_mix,magnitude,wanda_sp,flap,random")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-length", type=int, default=128)
    ap.add_argument("--nll-samples", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--curated", default=None, help="a curate stage's selected.jsonl (default: a fixed math set, not a curation)"
    )
    ap.add_argument("--skip-stage-run", action="store_true")
    ap.add_argument("--model", default="default", help="the model to prune (default: the embedded SmolLM2)")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="the cheapest mode (the test suite runs it on a tiny model): magnitude importance, 4 calibration "
        "records of 32 tokens, 4 NLL samples, no stage run",
    )
    args = ap.parse_args()
    if args.smoke:
        args.importance, args.calib_samples, args.calib_length, args.nll_samples = "magnitude", 4, 32, 4
        args.skip_stage_run = True
    torch.manual_seed(args.seed)

    handle = load(args.model, device="cpu")
    dense, tok = handle.model, handle.tokenizer
    shapes = model_shapes(handle.adapter, dense)
    plan = solve(shapes, args.ratio)
    nll_batches = gsm8k_nll_batches(tok, args.nll_samples, 256)
    sources = calibration_sets(args.calib_samples, args.seed, args.curated)
    calib = {
        name: calibration_batches(
            tok, recs, samples=args.calib_samples, length=args.calib_length, batch_size=4, seed=args.seed
        )
        for name, recs in sources.items()
    }
    result = {
        "model": "SmolLM2-135M-Instruct (embedded default)" if args.model == "default" else args.model,
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "ratio_target": args.ratio,
        "plan": plan.to_json(),
        "calibration": {name: info for name, (_, info) in calib.items()},
        "calibration_sources": {
            "curated": (
                f"curate stage output {args.curated}"
                if args.curated
                else "fixed math set, not a curation: the default pool's maths records (evals maths sets)"
            ),
            "generic": "BBC news articles + Wikipedia snippets",
            "random": "uniform sample of a mixed pool: pool maths records 1500, Wikipedia 1000, OpenWebText 1000, BBC 2000",
        },
        "domain_nll_data": f"GSM8K test solutions given the question, first {args.nll_samples}, response tokens",
        "dense_domain_nll": nll(dense, nll_batches),
        "domain_nll": {},
    }
    pruned_example = None
    for importance in args.importance.split(","):
        row = {}
        # magnitude and random do not read the calibration data: one run stands for every source.
        names = ["curated"] if importance in ("magnitude", "random") else list(calib)
        for name in names:
            model = copy.deepcopy(dense)
            h = type("Handle", (), {})()
            h.model = model
            h.adapter = type(handle.adapter)(model)
            t0 = time.perf_counter()
            scores = compute_scores(h.adapter, calib[name][0], importance, seed=args.seed, desc=f"{importance}/{name}")
            prune_model(h, scores, plan, "query")
            seconds = time.perf_counter() - t0
            row[name] = nll(model, nll_batches)
            row[f"{name}_prune_s"] = seconds
            print(f"{importance:<10} {name:<8} NLL {row[name]:.3f} ({seconds:.0f} s)", file=sys.stderr, flush=True)
            if importance == "taylor" and name == "curated":
                pruned_example = model
            else:
                del model
        if "generic" in row:
            row["curated_over_generic"] = row["curated"] / row["generic"]
        result["domain_nll"][importance] = row
    if pruned_example is None:
        pruned_example = copy.deepcopy(dense)
        h = type("Handle", (), {})()
        h.model, h.adapter = pruned_example, type(handle.adapter)(pruned_example)
        prune_model(h, compute_scores(h.adapter, calib["curated"][0], "magnitude"), plan, "query")
    result["latency"] = latency_ratio(dense, pruned_example)
    result["parameter_ratio_kept"] = plan.params_after / plan.params_before
    if not args.skip_stage_run:
        result["stage"] = stage_run(sources["curated"], args.ratio, args.calib_samples, args.calib_length)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
