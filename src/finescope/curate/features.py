"""features.json: the SAE latents most shared by the seeds and the selection, with their top pool snippets."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ..artifacts import PoolSnippet, SharedLatent
from ..data import record_text
from .pool import Pool
from .select import LatentStats


@dataclass
class LayerCodes:
    """What features.json needs of one layer: a pass over the pool's codes, their statistics, the seeds' codes."""

    shards: Callable[[], Iterator[torch.Tensor]]
    stats: LatentStats
    seeds: torch.Tensor
    width: int
    """Latents of the SAE (mean+max pooling: the mean half is read)."""


def shared_latents(
    codes: LayerCodes, selected: list[int], pool: Pool, top: int = 20, snippets: int = 5
) -> list[SharedLatent]:
    """SAE latents most shared by the seeds and the selection, with their top-activating pool snippets.

    A latent counts by how much more it fires on both the seeds and the selection than on the pool at large
    (min(seed mean, selected mean) − pool mean): latents that fire on everything explain nothing. Two passes
    over the pool's code shards (selection mean, then each top latent's best records), one over the pool for the
    snippets' texts.
    """
    w = codes.width
    assert codes.stats.total is not None, "the pool has records"
    seed_mean = codes.seeds[:, :w].float().mean(0)
    pool_mean = (codes.stats.total[:w] / max(codes.stats.n, 1)).float()
    chosen = set(selected)
    sel_sum, offset = torch.zeros(w, dtype=torch.float64), 0
    for shard in codes.shards():
        rows = [i - offset for i in range(offset, offset + shard.shape[0]) if i in chosen]
        if rows:
            sel_sum += shard[rows, :w].double().sum(0)
        offset += shard.shape[0]
    sel_mean = (sel_sum / len(selected)).float() if selected else torch.zeros_like(seed_mean)
    shared = torch.minimum(seed_mean, sel_mean) - pool_mean
    latents = [j for j in torch.argsort(shared, descending=True)[:top].tolist() if float(shared[j]) > 0]
    if not latents:
        return []
    best_vals = torch.full((snippets, len(latents)), float("-inf"))
    best_idx = torch.full((snippets, len(latents)), -1, dtype=torch.long)
    offset = 0
    for shard in codes.shards():  # running top-`snippets` records of each latent (earlier records win ties)
        vals = torch.cat([best_vals, shard[:, latents].float()])
        positions = torch.arange(offset, offset + shard.shape[0]).unsqueeze(1).expand(-1, len(latents))
        idx = torch.cat([best_idx, positions])
        order = torch.sort(vals, dim=0, descending=True, stable=True).indices[:snippets]
        best_vals, best_idx = vals.gather(0, order), idx.gather(0, order)
        offset += shard.shape[0]
    records = pool.pick({int(i) for i in best_idx.flatten() if i >= 0})
    out = []
    for col, latent in enumerate(latents):
        picks = [(int(best_idx[r, col]), float(best_vals[r, col])) for r in range(snippets) if best_idx[r, col] >= 0]
        out.append(
            SharedLatent(
                latent=latent,
                lift=float(shared[latent]),
                seed_mean_activation=float(seed_mean[latent]),
                selected_mean_activation=float(sel_mean[latent]),
                pool_mean_activation=float(pool_mean[latent]),
                top_pool_snippets=[
                    PoolSnippet(
                        id=records[i]["id"],
                        source=records[i].get("source"),
                        activation=value,
                        text=record_text(records[i], pool.fields)[:240],
                    )
                    for i, value in picks
                ],
            )
        )
    return out
