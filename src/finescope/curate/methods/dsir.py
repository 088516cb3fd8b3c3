"""`method: dsir`: DSIR importance weights of hashed n-grams (curate/dsir.py), seeds vs pool."""

from __future__ import annotations

import time

import torch

from ..dsir import dsir_scores
from ..scored import Scored, SelectionInputs, pool_keys


def score(inputs: SelectionInputs) -> Scored:
    # Scored against the seeds' n-gram distribution, not against one seed: no nearest seed, no per-seed sims.
    pool = inputs.pool
    t = time.perf_counter()
    scores = dsir_scores(pool.texts, inputs.seed_texts, per_ngram=True)  # two passes: fit, then score
    inputs.timings["dsir"] = time.perf_counter() - t
    return Scored(scores, torch.full((len(pool),), -1), pool_keys(pool))
