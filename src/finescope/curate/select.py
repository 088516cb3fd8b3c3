"""Score pool records against seeds and pick the selection (docs/method.md §2.5).

Score = max cosine similarity over seeds (multi-prototype rule). Modes:
- `global`: the top-M records by score;
- `per_seed`: the top-M records for each seed, their union, ranked by score.
Exact duplicate texts are removed in both modes (the best-scoring copy stays).

    scores, nearest, sims = max_cosine(pool_vecs, seed_vecs)
    order = select_global(scores, texts, m=100)
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

Keys = Sequence[str] | Sequence[Hashable] | np.ndarray
"""Per record, what makes it a duplicate: its text, or its `dedupe_key` (a list, or an S16 array)."""


def max_cosine(pool: torch.Tensor, seeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(score, nearest seed index, full similarity matrix) for every pool vector. Zero vectors score 0."""
    p = torch.nn.functional.normalize(pool.float(), dim=-1)
    s = torch.nn.functional.normalize(seeds.float(), dim=-1)
    sims = p @ s.T
    scores, nearest = sims.max(dim=1)
    return scores, nearest, sims


def dedupe_key(text: str) -> bytes:
    """What makes two texts the same record for de-duplication: equal after stripping (a 16-byte digest)."""
    import hashlib

    return hashlib.blake2b(text.strip().encode("utf-8", "surrogatepass"), digest_size=16).digest()


def ranked(values: torch.Tensor, chunk: int = 1 << 16) -> Iterator[int]:
    """Indices of `values` from the highest (stable for ties), produced chunk by chunk rather than as one list of
    Python ints (~36 bytes per pool record)."""
    order = torch.argsort(values, descending=True, stable=True)
    for start in range(0, len(order), chunk):
        yield from order[start : start + chunk].tolist()


def _dedupe(order: Iterable[int], texts: Keys, limit: int | None = None) -> list[int]:
    """`order` without exact duplicates: `texts` are the texts, or their `dedupe_key`s."""
    seen, out = set(), []
    for i in order:
        t = texts[i]
        key = t.strip() if isinstance(t, str) else t
        if key in seen:
            continue
        seen.add(key)
        out.append(i)
        if limit is not None and len(out) >= limit:
            break
    return out


def select_global(scores: torch.Tensor, texts: Keys, m: int) -> list[int]:
    """Indices of the top-m distinct texts by score, best first."""
    return _dedupe(ranked(scores), texts, m)


def select_per_seed(sims: torch.Tensor, scores: torch.Tensor, texts: Keys, m: int) -> list[int]:
    """Union over seeds of each seed's top-m distinct texts, ranked by the max-over-seeds score."""
    chosen: set[int] = set()
    for j in range(sims.shape[1]):
        chosen.update(_dedupe(ranked(sims[:, j]), texts, m))
    best_first = sorted(chosen, key=lambda i: (-float(scores[i]), i))
    return _dedupe(best_first, texts)


@dataclass
class LatentStats:
    """Pool statistics of pooled codes for the latent weighting, accumulated chunk by chunk (float64 sums), so a
    pool too large for memory is weighted from its shards on disk."""

    n: int = 0
    total: torch.Tensor | None = None
    squares: torch.Tensor | None = None
    fires: torch.Tensor | None = None

    def add(self, codes: torch.Tensor) -> LatentStats:
        x = codes.double()
        if self.total is None:
            d = x.shape[1]
            self.total, self.squares, self.fires = (
                torch.zeros(d, dtype=torch.float64),
                torch.zeros(d, dtype=torch.float64),
                torch.zeros(d, dtype=torch.float64),
            )
        assert self.squares is not None and self.fires is not None
        self.n += x.shape[0]
        self.total += x.sum(0)
        self.squares += x.pow(2).sum(0)
        self.fires += (x > 0).sum(0)
        return self

    def transform(self, codes: torch.Tensor, weighting: str) -> torch.Tensor:
        """The pooled SAE codes reweighted from the pool statistics gathered by `add` (seeds get the same transform):

        - `none`: the codes as they are (the paper);
        - `center`: minus the pool's mean code, so latents that fire on every record stop dominating the cosine;
        - `idf`: each latent times log((1 + N) / (1 + n_j)), n_j = pool records on which it fires (inverse document
          frequency: a latent active on most of the pool carries no domain signal);
        - `zscore`: centred and divided by the pool's standard deviation per latent.
        """
        x = codes.float()
        if weighting == "none":
            return x
        assert self.total is not None and self.squares is not None and self.fires is not None, "stats of no codes"
        mean = (self.total / max(self.n, 1)).float()
        if weighting == "center":
            return x - mean
        if weighting == "idf":
            return x * torch.log((1 + self.n) / (1 + self.fires)).float()
        if weighting == "zscore":
            var = (self.squares / max(self.n, 1) - (self.total / max(self.n, 1)).pow(2)).clamp_min(0)
            return (x - mean) / var.sqrt().float().clamp_min(1e-6)
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
