"""What a selection method gives back (`Scored`), what it gets (`SelectionInputs`), and how the records are chosen
from its scores (`choose`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..artifacts import SaeCurationMetrics
from ..config import CurateConfig
from ..registry import SELECTION_METHODS, WHOLE_POOL
from .features import LayerCodes
from .pool import Pool
from .select import Keys, dedupe_key, select_global, select_per_seed


@dataclass
class SelectionInputs:
    """Everything a selection method may read: the stage folder (the SAE method writes its SAEs there), the
    config, the pool, the seeds' texts, the model and reference texts (methods that need MODEL), the pool's
    sentence embeddings (methods that need EMBEDDINGS) and the timings dict to add to."""

    stage: Path
    cfg: CurateConfig
    pool: Pool
    seed_texts: list[str]
    timings: dict[str, float]
    handle: Any = None
    reference: list[str] | None = None
    embedded: Any = None
    """`embeddings.PoolEmbeddings` when the method needs EMBEDDINGS."""


@dataclass
class Scored:
    """Scores of the pool records and their nearest seed (-1: none), with what the SAE method adds."""

    scores: torch.Tensor
    nearest: torch.Tensor
    keys: Keys
    """Per record, what makes it an exact duplicate of another (its text, or `dedupe_key` of it: an S16 array)."""
    sims: torch.Tensor | None = None
    """(layers, pool, seeds) cosine similarities, for per-seed and per-layer selection."""
    features: dict[str, LayerCodes] = field(default_factory=dict)
    """Per layer: what features.json reads (a pass over the pool's codes, their statistics, the seeds' codes)."""
    sae: SaeCurationMetrics | None = None


def pool_keys(pool: Pool) -> np.ndarray:
    """Every record's `dedupe_key`, in pool order: an S16 array (16 bytes per record), from one pass."""
    chunks = [np.array([dedupe_key(t) for t in texts], dtype="S16") for texts in pool.text_chunks(4096)]
    return np.concatenate(chunks) if chunks else np.array([], dtype="S16")


def choose(cfg: CurateConfig, scored: Scored, m: int) -> list[int]:
    """Indices of the selected records, best first: global top-M, per seed, or the union over layers."""
    scores, sims, keys = scored.scores, scored.sims, scored.keys
    if WHOLE_POOL in SELECTION_METHODS[cfg.method].needs:
        return select_global(scores, keys, len(keys))
    if cfg.selection == "per_seed" and sims is not None:
        return sorted(
            {i for layer_sims in sims for i in select_per_seed(layer_sims, scores, keys, m)},
            key=lambda i: (-float(scores[i]), i),
        )
    if sims is not None and sims.shape[0] > 1:
        return sorted(
            {i for s in sims for i in select_global(s.max(-1).values, keys, m)},
            key=lambda i: (-float(scores[i]), i),
        )
    return select_global(scores, keys, m)
