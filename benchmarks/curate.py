"""Curate benchmark: selection quality on a labelled pool, and pool-encoding throughput vs a bare truncated forward.

Prints one JSON object (progress and a one-line summary per method go to stderr).

Pools (`benchmarks/labelled_pool.py`, where every source and rule is listed; `--pool tuning|test`), built from the
packaged data with labels from each record's source, six domains (math, law, medicine, code, finance, security):
- `tuning` (default; the pool the curation levers were chosen on), 2,237 records: relevant math 240, law 239,
  medicine 240, code 239 (evals maths, tort-law, MedMCQA/clinical-trial and code sets), finance 139 (options and
  futures sets), security 140 (CISSP questions); 1,000 distractors sharing surface form (figures 250, legal_news 150,
  health_news 100, tech_news 150, exam_qa 150, general_text 200);
- `test` (issue 29: selection quality on data it was not tuned on), 1,580 records from other evals sets of the same
  domains (medicine: rows of the tuning pool's sets it did not sample) and other distractor slices (778), none of
  them in the tuning pool (checked by text; the JSON's "pool" block counts the candidates dropped for it).
Evaluation data never enters: candidates sharing a word 13-gram with the MMLU test, GSM8K test or HumanEval are
dropped (32 us_tort_law rows are MMLU professional-law questions), as are texts overlapping a seed set. The
JSON's "pool" block gives the counts of the pool actually built (per domain, kind and source, drops, shortfalls);
`--pool-size N` scales every count by N / the pool's nominal total.

Seeds: tuning pool, the presets `preset:math|law|medicine|code` (src/finescope/seeds/) and
benchmarks/seeds_tuning/{finance,security}.jsonl; test pool, benchmarks/seeds_test/<domain>.jsonl (10 each, written
for it). All written by us, never evaluation data. `--seed-variants clean,off_topic,three,terse` runs every method
again with each seed set degraded as `seed_variants.py` says (one off-topic seed; three seeds; keywords only).

Methods: one list of (name, CurateConfig overrides), `method_variants`: SAE with each --selectors coordinate
selector (default jacobian, the paper's), MiniLM embedding kNN, random, hybrid (reciprocal-rank fusion of the first SAE
variant and embedding kNN) and DSIR when the installed finescope
has it (`"dsir" in SELECTION_METHODS`; otherwise it is skipped with a note in the JSON). --methods
picks by name ("sae" = every SAE variant); --set KEY=VALUE applies a CurateConfig override to every variant (a variant's own
settings, such as a lever's, win over it).

Metrics per method × domain, from one ranking (each curate run keeps max(M, R) records; selection is a stable
top-k, so the top M is a prefix of the top R):
- precision@M (M = --top-m, default 100) and R-precision (precision at R = the domain's relevant records in the
  pool), each with a 95% Wilson score interval on the count of hits out of M (or R). The interval treats the
  M picks as independent draws, an approximation for a top-M list from a fixed pool;
- the mean over domains, with the Wilson interval of the hits pooled over domains (M, or ~R, picks each);
- the kinds of the top M (which distractors a method confuses with the domain);
- time per method: per domain the curate stage's own wall time ("time_s", its metrics.json total, also when a
  finished stage is reused) and their sum, with this call's wall time and the stage's timing breakdown. The
  pool encoding of an SAE variant depends on the pool, the SAE and the encoding settings, not the seeds: the
  first domain pays for coordinates, SAE and pool encoding (unless $FINESCOPE_HOME/cache/curate already has
  them), the other domains reuse the cached encoding. The embedding method re-embeds the pool for each domain.

Stage folders live under --out/<pool digest>/, so a changed pool never reuses a finished stage of another pool;
rerunning with the same settings reuses finished stages (their "reused" flag is true and "wall_s" ~0; "time_s"
stays the time the stage took when it ran).

Throughput (quoted in the README): tokens/s of pool encoding (forward to ℓ + SAE encode + pooling + shard write)
vs a bare forward to ℓ, on the first 200 pool texts with the first SAE variant's math SAE; measured when an SAE
variant ran.

    .venv/bin/python benchmarks/curate.py --pool-only                       # pool composition only (no model)
    .venv/bin/python benchmarks/curate.py                                   # everything (SAE jacobian, embedding, random, dsir)
    .venv/bin/python benchmarks/curate.py --methods embedding,random        # the baselines only
    .venv/bin/python benchmarks/curate.py --pool test --methods sae,embedding,hybrid \
        --seed-variants clean,off_topic,three,terse --skip-throughput       # seed degradation on the test pool
    .venv/bin/python benchmarks/curate.py --pool-size 400 --selectors jacobian,random --sae-steps 500
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from finescope import storage
from finescope.config import CurateConfig, apply_overrides
from finescope.registry import SELECTION_METHODS
from labelled_pool import (
    DOMAINS,
    POOLS,
    build_labelled_pool,
    label_of,
    nominal_size,
    seed_records,
    seeds_spec,
    write_pool,
)
from seed_variants import VARIANTS, degrade

Z95 = 1.959964


# SAE scoring levers (issue: "scoring levers, each an option, each measured"), applied to the first selector's SAE.
# Scoring-only levers re-score the cached pool encodings in seconds; pooling, fields, layers and coordinates encode
# (and, for layers and coordinates, train an SAE) anew.
LEVERS: dict[str, dict] = {
    "center": {"latent_weighting": "center"},
    "idf": {"latent_weighting": "idf"},
    "zscore": {"latent_weighting": "zscore"},
    "paper": {"latent_weighting": "none", "seed_top_k": 1},
    "paper-procedure": {"layer_depth": 0.5, "latent_weighting": "none", "seed_top_k": 1},
    "top1": {"seed_top_k": 1},
    "top3": {"seed_top_k": 3},
    "top5": {"seed_top_k": 5},
    "none": {"latent_weighting": "none"},
    "max": {"pooling": "max"},
    "mean+max": {"pooling": "mean+max"},
    "response": {"encode_fields": "response"},
    "layer8": {"layers": [8]},
    "layer22": {"layers": [22]},
    "layers8,15,22": {"layers": [8, 15, 22]},
    "layers15,22": {"layers": [15, 22]},
    "layer19": {"layers": [19]},
    "layer26": {"layers": [26]},
    "len64": {"max_length": 64},
    "len128": {"max_length": 128},
    "all-coords": {"num_coords": 576},
    "pool-sae": {"sae_data": "pool+reference"},
    "steps3000": {"sae_steps": 3000},
    "steps6000": {"sae_steps": 6000},
}


def lever_overrides(spec: str) -> dict:
    """Overrides of a lever combination "a&b&c" (names of LEVERS)."""
    out: dict = {}
    for name in spec.split("&"):
        if name not in LEVERS:
            raise SystemExit(f"--levers: unknown lever {name!r}; known: {', '.join(LEVERS)}")
        out.update(LEVERS[name])
    return out


def method_variants(
    selectors: list[str], levers: tuple[str, ...] | list[str] = ()
) -> tuple[list[tuple[str, dict]], dict[str, str]]:
    """(variants, skipped): every method variant as (name, CurateConfig overrides), and the ones left out and why.

    Add a variant (say an SAE scoring knob) as one more (name, overrides) pair here."""
    variants = [(f"sae:{s}", {"method": "sae", "selector": s}) for s in selectors]
    if selectors:
        base = variants[0][1]
        variants += [(f"sae:{selectors[0]}+{spec}", {**base, **lever_overrides(spec)}) for spec in levers]
    variants += [("embedding", {"method": "embedding"}), ("random", {"method": "random"})]
    if "hybrid" in SELECTION_METHODS:
        variants.append(("hybrid", {"method": "hybrid", "selector": selectors[0] if selectors else "jacobian"}))
    skipped = {}
    if "dsir" in SELECTION_METHODS:
        variants.append(("dsir", {"method": "dsir"}))
    else:
        skipped["dsir"] = "this finescope's CurateConfig.method has no 'dsir' (SELECTION_METHODS lacks it)"
    return variants, skipped


def pick_methods(variants: list[tuple[str, dict]], spec: str, skipped: dict[str, str]) -> list[tuple[str, dict]]:
    """The variants named in --methods ("all", or names; "sae" = every sae:<selector>)."""
    if spec == "all":
        return variants
    names = [n.strip() for n in spec.split(",") if n.strip()]
    known = [n for n, _ in variants]
    for n in names:
        if n not in skipped and not any(k == n or k.startswith(n + ":") for k in known):
            raise SystemExit(f"--methods: unknown method {n!r}; known: {', '.join(known + ['sae'])}")
    return [(k, o) for k, o in variants if any(k == n or k.startswith(n + ":") for n in names)]


def wilson(hits: int, n: int, z: float = Z95) -> list[float]:
    """95% Wilson score interval of a proportion hits / n."""
    if n == 0:
        return [0.0, 1.0]
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def proportion(hits: int, n: int) -> dict:
    return {"value": round(hits / max(1, n), 4), "hits": hits, "n": n, "ci95": wilson(hits, n)}


def score_selection(selected: list[dict], domain: str, m: int, r: int) -> dict:
    """precision@M and R-precision of a ranked selection, with the kinds of its top M."""
    hits = [label_of(x.get("source")) == domain for x in selected]
    m_eff = min(m, len(hits))
    return {
        "precision_at_m": proportion(sum(hits[:m_eff]), m_eff),
        "r_precision": proportion(sum(hits[:r]), r),
        "top_m_kinds": dict(Counter(x.get("kind", "?") for x in selected[:m_eff]).most_common()),
    }


def pooled_mean(cells: dict[str, dict], key: str) -> dict:
    """Mean over domains of a proportion, with the Wilson interval of the hits pooled over domains."""
    hits = sum(c[key]["hits"] for c in cells.values())
    n = sum(c[key]["n"] for c in cells.values())
    return {
        "value": round(statistics.mean(c[key]["value"] for c in cells.values()), 4),
        "pooled_hits": hits,
        "pooled_n": n,
        "ci95": wilson(hits, n),
    }


def seed_sets(pool: str, variant: str, root: Path) -> dict[str, str]:
    """domain → the seeds spec of the pool's seed set degraded by `variant` (a file under root/ unless clean)."""
    if variant == "clean":
        return {d: seeds_spec(pool, d) for d in DOMAINS}
    out = {}
    for d in DOMAINS:
        path = root / f"seeds-{pool}-{variant}" / f"{d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_pool(degrade(seed_records(pool, d), variant), path)
        out[d] = str(path)
    return out


def run_variant(
    name: str, overrides: dict, args, pool_path: Path, stage_root: Path, relevant: dict, seeds: dict[str, str]
) -> dict:
    from finescope.curate import run as curate_run

    cells, times = {}, {}
    for domain in relevant:
        settings = dict(
            model=args.model,
            pool=str(pool_path),
            seeds=seeds[domain],
            top_m=max(args.top_m, relevant[domain]),
            reference_samples=args.reference_samples,
            coord_samples=args.coord_samples,
            max_length=args.max_length,
            sae_steps=args.sae_steps,
            seed=args.seed,
        )
        cfg = CurateConfig(**settings)
        if args.set:
            cfg = apply_overrides(cfg, args.set, where="--set")
        cfg = dataclasses.replace(cfg, **overrides)  # the variant's own settings win (a lever over --set or a flag)
        stage = stage_root / f"{name.replace(':', '-').replace(' @', '@')}-{domain}"
        reused = storage.is_done(stage, cfg)
        t = time.perf_counter()
        curate_run.run(cfg, stage)
        wall = round(time.perf_counter() - t, 1)
        selected = [json.loads(line) for line in (stage / "selected.jsonl").read_text().splitlines()]
        stage_timings = json.loads((stage / "metrics.json").read_text()).get("timings_s", {})
        times[domain] = round(stage_timings.get("total", wall), 1)
        cells[domain] = {
            **score_selection(selected, domain, args.top_m, relevant[domain]),
            "time_s": times[domain],
            "wall_s": wall,
            "reused": reused,
            "stage_timings_s": {k: round(v, 1) for k, v in stage_timings.items()},
        }
    out = {
        "overrides": overrides,
        "domains": cells,
        "mean_precision_at_m": pooled_mean(cells, "precision_at_m"),
        "mean_r_precision": pooled_mean(cells, "r_precision"),
        "time_s": round(sum(times.values()), 1),
        "time_s_per_domain": times,
    }
    summary = "  ".join(
        f"{d} {c['precision_at_m']['value']:.2f}/{c['r_precision']['value']:.2f}" for d, c in cells.items()
    )
    print(
        f"{name}: P@{args.top_m}/R-prec {summary}  mean {out['mean_precision_at_m']['value']:.3f}/"
        f"{out['mean_r_precision']['value']:.3f}  {out['time_s']} s",
        file=sys.stderr,
    )
    return out


def throughput(handle, state_dir: Path, texts: list[str], max_length: int, batch_size: int, reps: int = 3) -> dict:
    """Tokens/s of pool encoding (forward to ℓ + SAE encode + pooling + shard write) vs bare forward to ℓ."""
    import torch

    from finescope.curate.activations import TextBatches, encode_pooled
    from finescope.curate.sae import load_sae

    sae, meta = load_sae(state_dir)
    layer, coords = meta["hook_layer"], meta["coords"]
    batches = TextBatches(handle.tokenizer, texts, max_length, batch_size)
    tokens = sum(int(b["token_mask"].sum()) for b in batches)
    bare, enc = [], []
    for _ in range(reps):
        t = time.perf_counter()
        with torch.no_grad():
            for b in batches:
                handle.adapter.hidden_after(layer, input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        bare.append(tokens / (time.perf_counter() - t))
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            encode_pooled(handle, layer, coords, sae.encode, batches, Path(tmp), "mean")
            enc.append(tokens / (time.perf_counter() - t))
    return {
        "tokens": tokens,
        "bare_truncated_forward_tok_s": statistics.median(bare),
        "pool_encoding_tok_s": statistics.median(enc),
        "ratio": statistics.median(e / b for e, b in zip(enc, bare)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--pool", default="tuning", choices=POOLS, help="the labelled pool (labelled_pool.py)")
    ap.add_argument(
        "--pool-size",
        type=int,
        default=0,
        help="scale every pool count by N / the pool's nominal size (0: the full pool)",
    )
    ap.add_argument(
        "--seed-variants",
        default="clean",
        help=f"comma-separated seed sets to run every method with (seed_variants.py): {', '.join(VARIANTS)}",
    )
    ap.add_argument("--top-m", type=int, default=100, help="M of precision@M")
    ap.add_argument("--methods", default="all", help='comma-separated variant names ("sae" = every SAE selector)')
    ap.add_argument("--selectors", default="jacobian", help="coordinate selectors of the SAE variants")
    ap.add_argument(
        "--levers",
        default="",
        help="SAE scoring levers to add as variants, separated by ';' (combine with '&'), e.g. 'center;idf;idf&top3'; "
        f"known: {', '.join(LEVERS)}",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="CurateConfig override of every variant (a variant's own settings win)",
    )
    ap.add_argument("--reference-samples", type=int, default=400)
    ap.add_argument("--coord-samples", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=96)
    ap.add_argument("--sae-steps", type=int, default=1000)
    ap.add_argument("--out", default="runs/bench-curate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pool-only", action="store_true", help="build the labelled pool, print its composition, stop")
    ap.add_argument("--skip-throughput", action="store_true", help="do not measure pool-encoding throughput")
    args = ap.parse_args()

    scale = args.pool_size / nominal_size(args.pool) if args.pool_size else 1.0
    pool, composition = build_labelled_pool(scale, args.seed, args.pool)
    blob = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in pool)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:12]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pool_path = out / f"pool-{digest}.jsonl"
    if not pool_path.is_file():
        write_pool(pool, pool_path)
    relevant = composition["relevant"]
    result: dict = {
        "model": args.model,
        "pool": {"path": str(pool_path), "digest": digest, **composition},
        "top_m": args.top_m,
        "r": relevant,
        "seeds": {d: seeds_spec(args.pool, d) for d in DOMAINS},
    }
    if args.pool_only:
        print(json.dumps(result, indent=2))
        return

    levers = [x.strip() for x in args.levers.split(";") if x.strip()]
    variants, skipped = method_variants([s.strip() for s in args.selectors.split(",") if s.strip()], levers)
    chosen = pick_methods(variants, args.methods, skipped)
    result.update(
        settings={
            k: getattr(args, k) for k in ("reference_samples", "coord_samples", "max_length", "sae_steps", "seed")
        }
        | {"set": args.set},
        methods={},
        skipped=skipped,
    )
    seed_variants = [v.strip() for v in args.seed_variants.split(",") if v.strip()]
    for variant in seed_variants:
        seeds = seed_sets(args.pool, variant, out)
        for name, overrides in chosen:
            key = name if variant == "clean" else f"{name} @{variant}"
            result["methods"][key] = run_variant(key, overrides, args, pool_path, out / digest, relevant, seeds)
    result["time_s_total"] = round(sum(m["time_s"] for m in result["methods"].values()), 1)

    first_sae = next((n for n, o in chosen if o.get("method") == "sae"), None)
    if first_sae is not None and not args.skip_throughput:
        from finescope.data import read_records, record_text
        from finescope.modeling import load

        handle = load(args.model)
        sae_dir = next((out / digest / f"{first_sae.replace(':', '-')}-math" / "sae").iterdir())
        texts = [record_text(r) for r in read_records(pool_path)][:200]
        result["throughput"] = throughput(handle, sae_dir, texts, args.max_length, 8)
    else:
        result["throughput"] = "not measured: no SAE variant ran, or --skip-throughput"
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
