"""Score pool records against seeds and pick the selection (METHOD.md §2.5).

Score = max cosine similarity over seeds (multi-prototype rule). Modes:
- `global`: the top-M records by score;
- `per_seed`: the top-M records for each seed, their union, ranked by score.
Exact duplicate texts are removed in both modes (the best-scoring copy stays).

    scores, nearest, sims = max_cosine(pool_vecs, seed_vecs)
    order = select_global(scores, texts, m=100)
"""

from __future__ import annotations

import torch


def max_cosine(pool: torch.Tensor, seeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(score, nearest seed index, full similarity matrix) for every pool vector. Zero vectors score 0."""
    p = torch.nn.functional.normalize(pool.float(), dim=-1)
    s = torch.nn.functional.normalize(seeds.float(), dim=-1)
    sims = p @ s.T
    scores, nearest = sims.max(dim=1)
    return scores, nearest, sims


def _dedupe(order: list[int], texts: list[str], limit: int | None = None) -> list[int]:
    seen, out = set(), []
    for i in order:
        key = texts[i].strip()
        if key in seen:
            continue
        seen.add(key)
        out.append(i)
        if limit is not None and len(out) >= limit:
            break
    return out


def select_global(scores: torch.Tensor, texts: list[str], m: int) -> list[int]:
    """Indices of the top-m distinct texts by score, best first."""
    order = torch.argsort(scores, descending=True, stable=True).tolist()
    return _dedupe(order, texts, m)


def select_per_seed(sims: torch.Tensor, scores: torch.Tensor, texts: list[str], m: int) -> list[int]:
    """Union over seeds of each seed's top-m distinct texts, ranked by the max-over-seeds score."""
    chosen: set[int] = set()
    for j in range(sims.shape[1]):
        order = torch.argsort(sims[:, j], descending=True, stable=True).tolist()
        chosen.update(_dedupe(order, texts, m))
    ranked = sorted(chosen, key=lambda i: (-float(scores[i]), i))
    return _dedupe(ranked, texts)


def weight_latents(pool: torch.Tensor, seeds: torch.Tensor, weighting: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Reweight pooled SAE codes before the cosine, from pool statistics (the seeds get the same transform).

    - `none`: the codes as they are (the paper);
    - `center`: minus the pool's mean code, so latents that fire on every record stop dominating the cosine;
    - `idf`: each latent times log((1 + N) / (1 + n_j)), n_j = pool records on which it fires (inverse document
      frequency: a latent active on most of the pool carries no domain signal);
    - `zscore`: centred and divided by the pool's standard deviation per latent.
    """
    pool, seeds = pool.float(), seeds.float()
    if weighting == "none":
        return pool, seeds
    mean = pool.mean(0)
    if weighting == "center":
        return pool - mean, seeds - mean
    if weighting == "idf":
        fires = (pool > 0).sum(0).float()
        idf = torch.log((1 + pool.shape[0]) / (1 + fires))
        return pool * idf, seeds * idf
    if weighting == "zscore":
        std = pool.std(0, unbiased=False).clamp_min(1e-6)
        return (pool - mean) / std, (seeds - mean) / std
    raise ValueError(f"unknown latent weighting {weighting!r}")


def seed_cosine(
    pool: torch.Tensor, seeds: torch.Tensor, top_k: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Like `max_cosine`, with the score the mean of each record's `top_k` best seed similarities (1 = the max,
    the paper's multi-prototype rule; more asks a record to resemble several seeds, not one)."""
    scores, nearest, sims = max_cosine(pool, seeds)
    k = min(max(1, top_k), sims.shape[1])
    if k > 1:
        scores = sims.topk(k, dim=1).values.mean(1)
    return scores, nearest, sims
