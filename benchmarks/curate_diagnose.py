"""Why does an SAE curation rank what it ranks? Diagnosis of finished curate stages on the labelled benchmark pool.

For each stage folder given (a `benchmarks/curate.py` SAE stage, e.g. runs/bench-curate/sae-jacobian-law), it
reads the stage's config, rebuilds the pooled SAE codes of pool and seeds from the curate cache (no new forward
when the stage ran on this machine), and prints JSON with:
- where the domain's relevant records rank (quartiles of their ranks, how many land in the top R);
- the top false positives (source, kind, score, text);
- how much of the cosine comes from "common" latents: those active (pooled code > 0) on at least half of the pool,
  as a share of the seed-record dot product summed over the top M records, over the relevant records and over the
  pool, and what the ranking would give with those latents removed;
- the latents that carry the selected records' scores (mean contribution to the dot product), with how often each
  fires in the pool.

    .venv/bin/python benchmarks/curate_diagnose.py runs/bench-curate/<pool digest>/sae-jacobian-law --top 100
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from finescope import hashing
from finescope.config import CurateConfig, from_dict
from finescope.curate import run as curate_run
from finescope.curate.select import max_cosine
from finescope.data import read_records, record_text
from finescope.modeling import load
from labelled_pool import label_of


def diagnose(stage: Path, top: int, handle_cache: dict) -> dict:
    saved = json.loads((stage / "config.json").read_text())["config"]
    cfg = from_dict(CurateConfig, saved)
    domain = cfg.seeds.split(":", 1)[1] if cfg.seeds.startswith("preset:") else cfg.seeds
    if cfg.model not in handle_cache:
        handle_cache[cfg.model] = load(cfg.model, device="cpu")
    handle = handle_cache[cfg.model]
    pool = curate_run._load_pool(cfg)
    seeds = list(read_records(curate_run.resolve_records_path(cfg.seeds, "seeds")))
    reference = curate_run._reference_texts(cfg)
    layer = (cfg.layers or [handle.adapter.num_layers // 2])[0]
    state = curate_run._train_layer_sae(cfg, handle, layer, reference, hashing.model_fingerprint(handle.source))
    texts = [record_text(r, cfg.encode_fields) for r in pool]
    pv = curate_run._sae_vectors(cfg, handle, state, layer, texts, "pool").float()
    sv = curate_run._sae_vectors(cfg, handle, state, layer, [record_text(r, cfg.encode_fields) for r in seeds], "seeds")
    sv = sv.float()
    scores, nearest, _ = max_cosine(pv, sv)
    order = torch.argsort(scores, descending=True, stable=True).tolist()
    relevant = [label_of(r.get("source")) == domain for r in pool]
    r = sum(relevant)
    rank = {i: k for k, i in enumerate(order, 1)}
    rel_ranks = sorted(rank[i] for i in range(len(pool)) if relevant[i])
    q = lambda f: rel_ranks[min(len(rel_ranks) - 1, int(f * len(rel_ranks)))] if rel_ranks else None  # noqa: E731

    fires = (pv > 0).float().mean(0)  # share of pool records on which each latent is active
    common = fires >= 0.5
    pn = torch.nn.functional.normalize(pv, dim=-1)
    sn = torch.nn.functional.normalize(sv, dim=-1)
    contrib = pn * sn[nearest]  # (pool, latents): each latent's part of the record's cosine to its nearest seed

    def common_share(idx: list[int]) -> float:
        c = contrib[idx]
        return round(float(c[:, common].sum() / c.sum().clamp_min(1e-9)), 3)

    without, _, _ = max_cosine(pv * ~common, sv * ~common)
    order_wo = torch.argsort(without, descending=True, stable=True).tolist()
    top_idx = order[:top]
    carry = contrib[top_idx].mean(0)
    false_pos = [i for i in order if not relevant[i]][:8]
    return {
        "stage": str(stage),
        "domain": domain,
        "pool": len(pool),
        "relevant": r,
        "relevant_rank_quartiles": [q(0.25), q(0.5), q(0.75)],
        "relevant_in_top_r": sum(1 for k in rel_ranks if k <= r),
        "precision_at_top": round(sum(relevant[i] for i in top_idx) / max(1, len(top_idx)), 3),
        "score_quantiles_pool": [round(float(x), 3) for x in torch.quantile(scores, torch.tensor([0.1, 0.5, 0.9]))],
        "latents": int(pv.shape[1]),
        "latents_ever_active": int((fires > 0).sum()),
        "common_latents": int(common.sum()),
        "common_share_of_cosine": {
            "top": common_share(top_idx),
            "relevant": common_share([i for i in range(len(pool)) if relevant[i]]),
            "pool": common_share(list(range(len(pool)))),
        },
        "precision_at_top_without_common_latents": round(sum(relevant[i] for i in order_wo[:top]) / top, 3),
        "latents_carrying_the_top": [
            {
                "latent": int(j),
                "mean_contribution": round(float(carry[j]), 4),
                "pool_fire_rate": round(float(fires[j]), 3),
            }
            for j in torch.argsort(carry, descending=True)[:10].tolist()
        ],
        "top_false_positives": [
            {
                "rank": rank[i],
                "source": pool[i].get("source"),
                "kind": pool[i].get("kind"),
                "score": round(float(scores[i]), 3),
                "text": texts[i][:160],
            }
            for i in false_pos
        ],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stages", nargs="+", help="curate stage folders of the SAE method")
    ap.add_argument("--top", type=int, default=100)
    args = ap.parse_args()
    handles: dict = {}
    print(json.dumps([diagnose(Path(s), args.top, handles) for s in args.stages], indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
