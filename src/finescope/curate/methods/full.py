"""`method: full`: the whole pool (its registry row needs WHOLE_POOL: top_m does not apply)."""

from __future__ import annotations

import torch

from ..scored import Scored, SelectionInputs, pool_keys


def score(inputs: SelectionInputs) -> Scored:
    n = len(inputs.pool)
    return Scored(torch.ones(n), torch.full((n,), -1), pool_keys(inputs.pool))
