"""Curate's cache: where it lives and the keys of its entries (coordinates, SAEs, pool activations).

Everything expensive is cached under `$FINESCOPE_HOME/cache/curate/`, keyed by what it depends on, so selecting
again with new seeds or a new M only re-scores.
"""

from __future__ import annotations

from pathlib import Path

from .. import assets, hashing
from ..config import CurateConfig
from .activations import SHARD_BATCHES
from .pool import Pool

# Bump when the SAE's definition changes, so cached SAEs (and encodings made with them) are not reused.
SAE_VERSION = 4  # 3: standardisation folded into the weights (SAELens layout); 4: reference rows batched by length
# Per selector, bumped when its score definition changes, so cached coordinates are not reused
# (gradient 2: Hutchinson estimate, root-mean-square over texts, instead of the exact per-coordinate backward).
COORDS_VERSION = {"gradient": 2}


def cache_root() -> Path:
    return assets.home() / "cache" / "curate"


def shard_texts(cfg: CurateConfig) -> int:
    """Texts per cache shard of the pool (the shards `encode_pooled` writes for a text list)."""
    return SHARD_BATCHES * cfg.batch_size


def coords_key(cfg: CurateConfig, layer: int, coord_texts: list[str], model_fp: str) -> str:
    """Cache key of a layer's coordinate scores: the model, the layer, the selector and its texts."""
    return hashing.digest_parts(
        "coords",
        COORDS_VERSION.get(cfg.selector, 1),
        model_fp,
        layer,
        cfg.selector,
        cfg.num_coords,
        cfg.probes,
        hashing.digest_texts(coord_texts),
        cfg.max_length,
        cfg.batch_size,
        cfg.seed,
    )


def sae_key(cfg: CurateConfig, coords_key: str, reference: list[str], pool_acts_key: str | None = None) -> str:
    """Cache key of a layer's SAE: its coordinates, the reference corpus, the pool activations it was also trained
    on (sae_data = pool+reference) and the SAE's training settings."""
    extra = () if pool_acts_key is None else ("pool", pool_acts_key)
    return hashing.digest_parts(
        "sae",
        SAE_VERSION,
        coords_key,
        hashing.digest_texts(reference),
        cfg.sae_kind,
        cfg.sae_expansion,
        cfg.sae_k,
        cfg.sae_l1,
        cfg.sae_auxk_alpha,
        cfg.sae_lr,
        cfg.sae_steps,
        cfg.sae_batch_size,
        *extra,
    )


def pool_acts_key(cfg: CurateConfig, coords_key: str, layer: int, pool: Pool) -> str:
    """Cache key of the pool's token activations: the coordinates (model and layer included), the texts and how
    they are tokenised and batched."""
    return hashing.digest_parts("pool-acts", "bylen", coords_key, layer, cfg.max_length, cfg.batch_size, pool.digest)
