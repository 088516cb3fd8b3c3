"""`method: random`: a seeded random subset (baseline)."""

from __future__ import annotations

import torch

from ..baselines import random_scores
from ..scored import Scored, SelectionInputs, pool_keys


def score(inputs: SelectionInputs) -> Scored:
    n = len(inputs.pool)
    return Scored(random_scores(n, inputs.cfg.seed), torch.full((n,), -1), pool_keys(inputs.pool))
