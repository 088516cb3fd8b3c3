"""Curate benchmark: pool-encoding throughput vs a bare truncated forward, and selection quality on a labelled pool.

Prints one JSON object. Quality: a pool built from the packaged data with domain labels from each record's source
(math, law, medicine; the rest are distractors: news, Wikipedia/OpenWebText, other evals sets), our own seed
presets, and for each method (SAE with each selector, MiniLM embedding kNN, random) precision@M and R-precision
(precision at R = number of relevant records in the pool).

    .venv/bin/python benchmarks/curate.py                       # SmolLM2, ~1,000-record labelled pool
    .venv/bin/python benchmarks/curate.py --pool-size 400 --selectors jacobian,random --sae-steps 500
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from finescope.config import CurateConfig
from finescope.corpora import default_pool_path
from finescope.curate import run as curate_run
from finescope.curate.activations import TextBatches, encode_pooled
from finescope.curate.sae import load_sae
from finescope.data import read_records, record_text
from finescope.modeling import load

DOMAINS = {
    "math": ("math", "arithmetic", "algebra", "elementary_math_qa"),
    "law": ("law", "legal"),
    "medicine": ("medic", "medication", "clinic", "drug", "health"),
}


def domain_of(source: str) -> str | None:
    s = source.lower()
    for name, keys in DOMAINS.items():
        if any(k in s for k in keys):
            return name
    return None


def labelled_pool(size: int, seed: int, out: Path) -> tuple[Path, dict[str, int]]:
    rng = random.Random(seed)
    rows = [r for r in read_records(default_pool_path())]
    by_domain: dict[str, list[dict]] = {}
    for r in rows:
        by_domain.setdefault(domain_of(r.get("source", "")) or "other", []).append(r)
    # Relevant domains ~12% each (capped by availability); the rest is distractors.
    take = {d: min(len(by_domain.get(d, [])), size // 8) for d in DOMAINS}
    pool = [r for d, n in take.items() for r in rng.sample(by_domain[d], n)]
    pool += rng.sample(by_domain["other"], size - len(pool))
    rng.shuffle(pool)
    out.write_text("".join(json.dumps(r) + "\n" for r in pool))
    return out, {d: sum(domain_of(r.get("source", "")) == d for r in pool) for d in DOMAINS}


def precision(selected: list[dict], domain: str, m: int, r: int) -> dict[str, float]:
    hits = [domain_of(x.get("source", "")) == domain for x in selected]
    return {"precision_at_m": sum(hits[:m]) / max(1, min(m, len(hits))), "r_precision": sum(hits[:r]) / max(1, r)}


def throughput(handle, state_dir: Path, texts: list[str], max_length: int, batch_size: int, reps: int = 3) -> dict:
    """Tokens/s of pool encoding (forward to ℓ + SAE encode + pooling + shard write) vs bare forward to ℓ."""
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
    ap.add_argument("--pool-size", type=int, default=1000)
    ap.add_argument("--top-m", type=int, default=50)
    ap.add_argument("--selectors", default="jacobian,gradient,magnitude,variance,pca,random")
    ap.add_argument("--reference-samples", type=int, default=400)
    ap.add_argument("--coord-samples", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=96)
    ap.add_argument("--sae-steps", type=int, default=1000)
    ap.add_argument("--out", default="runs/bench-curate")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pool_path, relevant = labelled_pool(args.pool_size, args.seed, out / "labelled_pool.jsonl")
    result: dict = {
        "model": args.model,
        "pool_size": args.pool_size,
        "relevant": relevant,
        "top_m": args.top_m,
        "methods": {},
        "timings_s": {},
    }
    common = dict(
        model=args.model,
        pool=str(pool_path),
        top_m=args.top_m,
        reference_samples=args.reference_samples,
        coord_samples=args.coord_samples,
        max_length=args.max_length,
        seed=args.seed,
        sae_steps=args.sae_steps,
    )
    methods = [("sae", s) for s in args.selectors.split(",")] + [("embedding", "-"), ("random", "-")]
    for method, selector in methods:
        name = f"sae:{selector}" if method == "sae" else method
        result["methods"][name] = {}
        for domain in DOMAINS:
            cfg = CurateConfig(
                **common, method=method, seeds=f"preset:{domain}", **({"selector": selector} if method == "sae" else {})
            )
            t = time.perf_counter()
            stage = curate_run.run(cfg, out / f"{name.replace(':', '-')}-{domain}")
            result["timings_s"][f"{name}/{domain}"] = round(time.perf_counter() - t, 1)
            selected = [json.loads(l) for l in (stage / "selected.jsonl").read_text().splitlines()]
            result["methods"][name][domain] = precision(selected, domain, args.top_m, relevant[domain])
        scores = [v for d in result["methods"][name].values() for v in (d["precision_at_m"],)]
        result["methods"][name]["mean_precision_at_m"] = sum(scores) / len(scores)
        print(f"{name}: {result['methods'][name]}", file=sys.stderr)
    if any(m == "sae" for m, _ in methods):
        handle = load(args.model)
        first = next(s for m, s in methods if m == "sae")
        sae_dir = next((out / f"sae-{first}-math" / "sae").iterdir())
        texts = [record_text(r) for r in read_records(pool_path)][:200]
        result["throughput"] = throughput(handle, sae_dir, texts, args.max_length, 8)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
