"""`method: hybrid`: reciprocal-rank fusion of the SAE ranking and the embedding-kNN ranking."""

from __future__ import annotations

from ..baselines import reciprocal_rank_fusion
from ..embeddings import PoolEmbeddings
from ..scored import Scored, SelectionInputs
from .sae import score  # every rank: the SAE method's scores  # noqa: F401


def finish(scored: Scored, inputs: SelectionInputs) -> Scored:
    """Rank 0, before writing: fuse the SAE ranking with the embedding-kNN ranking."""
    embedded = inputs.embedded
    assert isinstance(embedded, PoolEmbeddings), "the hybrid method's embeddings are computed before scoring"
    fused = reciprocal_rank_fusion(scored.scores, embedded.scores()[0])
    return Scored(fused, scored.nearest, scored.keys, None, scored.features, scored.sae)
