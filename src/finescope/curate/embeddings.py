"""The pool's and the seeds' sentence embeddings (all-MiniLM-L6-v2), for the embedding and hybrid methods."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import cache_entry, distributed, hashing, storage
from ..config import CurateConfig
from .activations import sharded_stream
from .baselines import MiniLM
from .cache import cache_root as _cache_root
from .pool import Pool
from .select import max_cosine

EMBED_SHARD_TEXTS = 512
"""Pool texts per cache shard of the embedding baseline's vectors: the unit of progress, of resuming a killed run
and of sharing the pass between ranks (512 texts: ~10-30 s of MiniLM on 2 CPU cores)."""


@dataclass
class PoolEmbeddings:
    """The pool's sentence embeddings as shards on disk ("emb": (texts, 384) float32, in pool order) and the
    seeds' embeddings."""

    paths: list[Path]
    seeds: torch.Tensor

    def scores(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`max_cosine` of the pool against the seeds (best cosine, its seed, every seed's), a shard at a time."""
        parts = [
            max_cosine(cache_entry.load_or_raise(p, cache_entry.shard_key(p))["emb"], self.seeds) for p in self.paths
        ]
        if not parts:
            return torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.zeros(0, len(self.seeds))
        return tuple(torch.cat([p[k] for p in parts]) for k in range(3))  # type: ignore[return-value]


def _embed_device(cfg: CurateConfig) -> str:
    """The sentence encoder's device: --device, or (unset / auto, since it is small) this rank's GPU if any."""
    if cfg.device not in (None, "auto"):
        return cfg.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def embed_pool(cfg: CurateConfig, pool: Pool, seed_texts: list[str], timings: dict[str, float]) -> PoolEmbeddings:
    """all-MiniLM-L6-v2 embeddings of the pool, loaded once, shard s (EMBED_SHARD_TEXTS texts) on rank s mod N,
    cached (a killed run, or another seed set over the same pool, reuses finished shards); and of the seeds."""
    t = time.perf_counter()
    encoder = distributed.main_first(lambda: MiniLM(device=_embed_device(cfg)), "loading all-MiniLM-L6-v2")
    key = hashing.digest_parts("minilm", hashing.model_fingerprint(encoder.path), 256, EMBED_SHARD_TEXTS, pool.digest)
    cache = _cache_root() / f"emb-{key}"
    paths = sharded_stream(
        cache,
        pool.text_chunks(EMBED_SHARD_TEXTS),
        lambda texts: {"emb": encoder.embed(texts)},
        "embed pool (all-MiniLM-L6-v2)",
        len(pool),
    )
    if distributed.ranks().is_main:
        storage.write_json_atomic(cache / "info.json", {"texts": len(pool), "model": encoder.path, "tag": "minilm"})
    embedded = PoolEmbeddings(paths, encoder.embed(seed_texts))
    timings["embed"] = time.perf_counter() - t
    return embedded
