"""`method: embedding`: k-nearest-neighbour by all-MiniLM-L6-v2 sentence embeddings (max cosine to the seeds)."""

from __future__ import annotations

from ..embeddings import PoolEmbeddings
from ..scored import Scored, SelectionInputs, pool_keys


def score(inputs: SelectionInputs) -> Scored:
    embedded = inputs.embedded
    assert isinstance(embedded, PoolEmbeddings), "the embedding method's vectors are computed before scoring"
    scores, nearest, sims = embedded.scores()
    return Scored(scores, nearest, pool_keys(inputs.pool), sims.unsqueeze(0))
