"""Does curation pay? The recovery data source as an axis, on a finished default run: its `pruned_kd` stage's recipe
(KD over every token at the run's α, LoRA, the run's epochs, same student, same settings) re-run on data from three
sources at equal tokens, over several seeds, at several volumes. Domain NLL on the two disjoint GSM8K subsets of
distill_terms.py (`tune`: 64 rows outside the eval's subset; `report`: the eval's 60 `nll:math` rows). Prints one
JSON object (and writes it to --out after every point, so a run cut short leaves what it finished);
`frontier.py --curves FILE` folds it into the frontier's JSON.

    FINESCOPE_HOME=... OMP_NUM_THREADS=1 .venv/bin/python benchmarks/data_curves.py --run runs/default \
        --work /tmp/curves --point curated:200:0,1,2 --point random:200:0,1,2 --point curated:800:0 \
        --out benchmarks/results/data_curves.json             # one point ≈ one default KD recovery × volume/200

`--point SOURCE:M:SEEDS` (repeatable). The volume is set by the curation: M = the curation's top M pool records
(`recover_top_m` M, exactly the pipeline's recipe; M 200 is the default run's own stage), and T = the tokens those
records give the student (prompt + response through the chat template, cut at max_length, the held-out tenth
included). The other sources draw records until they reach T tokens:
- `curated`: the curation's top M (the run's selected.jsonl plus the next-ranked pool records);
- `random`: records of the same scored pool sample (the curation's scores.parquet ids), shuffled with the seed;
- `generic`: the reference corpus (`default_reference_texts()`: Wikipedia, OpenWebText, BBC News; the text the
  run's generic calibration and SAE training read), shuffled with the seed, as text records.
Added records overlapping an embedded benchmark (a word 13-gram; the recover stage's own decontamination) are
dropped before counting. Epochs stay at the recipe's (1 in the default since session 37, 2 before) at every volume:
more tokens means more distinct records.
The seed is the recipe's `seed` (LoRA init, dropout, data order, held-out split) and, for random and generic, the
subset. Each point reports how many of its records are maths (the pool's GSM8K / MATH / maths-eval sources).
Stages land in <work>/<source>-m<M>-s<seed>/stage and are resumed; their NLLs are kept in nll.json beside them. A
curated point at the run's own M and seed is the run's `pruned_kd` stage itself (its DONE certifies the same
config): it is scored, not trained again.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from transformers import AutoTokenizer  # noqa: E402

from compensation import gsm8k_subsets  # noqa: E402
from distill_terms import domain_nll, kd_stage  # noqa: E402
from finescope import FinescopeError, decontam, storage  # noqa: E402
from finescope.config import RecoverConfig, apply_overrides, from_dict  # noqa: E402
from finescope.corpora import MATH_SETS, default_reference_texts, resolve_records_path  # noqa: E402
from finescope.data import read_records, record_text  # noqa: E402
from finescope.modeling import load, resolve_model_path  # noqa: E402
from finescope.recover.finetune import build_examples  # noqa: E402
from finescope.recover.run import run  # noqa: E402
from finescope.recover.sources import training_records  # noqa: E402
from finescope.stage_protocol import is_done  # noqa: E402
from finescope.storage import read_json  # noqa: E402
from reference import reference_throughput  # noqa: E402

SOURCES = ("curated", "random", "generic")


def is_maths(rec: dict) -> bool:
    return rec.get("source", "").removeprefix("evals/") in MATH_SETS


def parse_point(text: str) -> tuple[str, int, list[int]]:
    parts = text.split(":")
    if len(parts) != 3 or parts[0] not in SOURCES:
        raise SystemExit(f"data_curves: --point {text!r}: want SOURCE:M:SEEDS with SOURCE one of {', '.join(SOURCES)}")
    try:
        m, seeds = int(parts[1]), [int(s) for s in parts[2].split(",")]
    except ValueError:
        raise SystemExit(
            f"data_curves: --point {text!r}: M and SEEDS must be integers (e.g. random:200:0,1,2)"
        ) from None
    if m < 1:
        raise SystemExit(f"data_curves: --point {text!r}: M must be at least 1")
    return parts[0], m, seeds


def tokens_of(tok, recs: list[dict], max_length: int) -> list[int]:
    """Tokens each record gives the student (0 for a record whose prompt alone fills max_length)."""
    out = []
    for r in recs:
        ex, _ = build_examples(tok, [r], max_length)
        out.append(len(ex[0].input_ids) if ex else 0)
    return out


def draw(candidates: list[dict], target: int, tok, max_length: int, index) -> list[dict]:
    """Candidates in order, those overlapping evaluation data skipped, until their tokens reach `target`."""
    picked, total = [], 0
    for r in candidates:
        if total >= target:
            break
        if decontam.overlaps(record_text(r), index):
            continue
        n = tokens_of(tok, [r], max_length)[0]
        if n:
            picked.append(r)
            total += n
    if total < target:
        raise SystemExit(f"data_curves: only {total} tokens available, {target} asked (fewer records than M needs)")
    return picked


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a finished run directory with a pruned_kd stage")
    ap.add_argument("--work", required=True)
    ap.add_argument("--point", action="append", default=[], help="SOURCE:M:SEEDS (repeatable)")
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE override of the kd config (smoke tests)")
    ap.add_argument("--tune", type=int, default=64)
    ap.add_argument("--report", type=int, default=60)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--plan", action="store_true", help="only draw each point's data (records, maths, tokens)")
    args = ap.parse_args()
    points = [parse_point(p) for p in args.point or ["curated:200:0"]]
    base_stage = kd_stage(Path(args.run))
    base_cfg = apply_overrides(
        from_dict(RecoverConfig, read_json(base_stage / "config.json")["config"]), args.set, where="--set"
    )
    selected = Path(base_cfg.data)
    work = Path(args.work)
    (work / "data").mkdir(parents=True, exist_ok=True)
    import pyarrow.parquet as pq

    pool_ids = pq.read_table(selected.parent / "scores.parquet", columns=["id"]).to_pydict()["id"]
    pool_spec = read_json(selected.parent / "config.json")["config"]["pool"]
    pool = {r["id"]: r for r in read_records(resolve_records_path(pool_spec, "pool"))}
    sample = [pool[i] for i in pool_ids]
    index = decontam.eval_ngrams()
    tok = AutoTokenizer.from_pretrained(str(resolve_model_path(base_cfg.teacher or "default")))
    result: dict = {
        "run": args.run,
        "kd_stage": str(base_stage),
        "recipe": {
            k: getattr(base_cfg, k) for k in ("kd_weight", "kd_scope", "epochs", "lora_rank", "lr", "batch_size")
        },
        "threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or None,
        "pool_sample": {"records": len(sample), "maths": sum(map(is_maths, sample))},
        "generic_corpus": "default_reference_texts(): Wikipedia, OpenWebText, BBC News",
        "volumes": {},
        "points": {},
    }
    evals = gsm8k_subsets(args.tune, args.report)
    if not args.plan:  # the reference figures, kept in the work folder: a resumed run does not score them again
        base = work / "reference.json"
        if not base.is_file():
            teacher = load(base_cfg.teacher or "default", dtype="float32", device="cpu")
            ref = {
                "reference_tok_s": reference_throughput(teacher.model),
                "dense": domain_nll("default", evals),
                "student_before": domain_nll(base_cfg.student, evals),
            }
            del teacher
            storage.write_atomic(base, json.dumps(ref) + "\n")
        result.update(read_json(base))
        print(json.dumps({k: result[k] for k in ("reference_tok_s", "pool_sample", "dense", "student_before")}),
              file=sys.stderr, flush=True)  # fmt: skip

    def write() -> None:
        if args.out:
            storage.write_atomic(Path(args.out), json.dumps(result, indent=1) + "\n")

    for source, m, seeds in points:
        curated_cfg = apply_overrides(base_cfg, [f"recover_top_m={m}"], where="--point")
        try:  # e.g. an M above the number of records the curation scored: its one-line refusal
            curated, _ = training_records(curated_cfg, list(read_records(selected)))
        except FinescopeError as e:
            raise SystemExit(f"data_curves: --point {source}:{m}: {e}") from None
        target = sum(tokens_of(tok, curated, base_cfg.max_length))
        result["volumes"][str(m)] = {"tokens": target, "records": len(curated), "maths": sum(map(is_maths, curated))}
        key = f"{source}:{m}"
        runs = result["points"].get(key, {}).get("runs", [])  # a point may be named again with other seeds
        for seed in seeds:
            name = f"{source}-m{m}-s{seed}"
            if source == "curated":
                cfg, recs = apply_overrides(curated_cfg, [f"seed={seed}"], where="--point"), curated
            else:
                cands = sample if source == "random" else [
                    {"id": f"generic-{i}", "text": t, "source": "generic"} for i, t in enumerate(default_reference_texts())
                ]  # fmt: skip
                cands = list(cands)
                random.Random(seed).shuffle(cands)
                recs = draw(cands, target, tok, base_cfg.max_length, index)
                data = work / "data" / f"{name}.jsonl"
                if not data.is_file():
                    storage.write_atomic(data, "".join(json.dumps(r) + "\n" for r in recs))
                cfg = apply_overrides(base_cfg, [f"data={data}", "recover_top_m=0", f"seed={seed}"], where="--point")
            data_stats = {
                "seed": seed,
                "records": len(recs),
                "maths": sum(map(is_maths, recs)),
                "tokens": sum(tokens_of(tok, recs, base_cfg.max_length)),
            }
            if args.plan:  # the data only: no training
                runs.append(data_stats)
                print(json.dumps({"point": key, **data_stats}), file=sys.stderr, flush=True)
                result["points"][key] = {"source": source, "m": m, "tokens": target, "runs": runs}
                write()
                continue
            out = work / name
            out.mkdir(parents=True, exist_ok=True)
            t = time.perf_counter()
            # the run's own stage when the point is its very recipe (curated, its M and its seed): read, not re-trained
            stage = base_stage if is_done(base_stage, cfg) else run(cfg, out / "stage")
            seconds = round(time.perf_counter() - t, 1)
            metrics = read_json(stage / "metrics.json")
            cached = out / "nll.json"
            nll = read_json(cached) if cached.is_file() else domain_nll(stage / "model", evals)
            storage.write_atomic(cached, json.dumps(nll) + "\n")
            runs.append(
                {
                    **data_stats,
                    "seconds": seconds,  # 0 for a stage finished before (resumed)
                    "stage_s": metrics["seconds"].get("total"),
                    "finetune_s": metrics["seconds"].get("finetune"),
                    "train_steps": metrics["train"]["total_steps"],
                    **nll,
                }
            )
            print(json.dumps({"point": key, **runs[-1]}), file=sys.stderr, flush=True)
            summary = {
                k: {
                    "mean": round(statistics.mean(r[k] for r in runs), 4),
                    "sd": round(statistics.stdev(r[k] for r in runs), 4) if len(runs) > 1 else None,
                    "min": min(r[k] for r in runs),
                    "max": max(r[k] for r in runs),
                }
                for k in ("tune", "report")
            }
            result["points"][key] = {"source": source, "m": m, "tokens": target, "runs": runs, **summary}
            write()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
