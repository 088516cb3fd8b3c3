"""Choose the K activation coordinates at hook layer ℓ that the SAE reads (docs/method.md §2.2).

Selectors (per-coordinate score over reference texts; the top K are kept):
- `jacobian` (v3, default): ‖∂a_j/∂e(x)‖ estimated with R Rademacher probes pushed through Jacobian-vector
  products w.r.t. the input embeddings (Hutchinson: E[(J v)_j²] = ‖J_j‖²), averaged over tokens and texts.
- `gradient` (v1): the input-gradient norm ‖∂(Σ_t a_{j,t})/∂e(x)‖ of each coordinate summed over a text's tokens,
  root-mean-square over texts, estimated with the same R probes (JVP of the token-summed activation). The
  exact value needs one backward pass per coordinate (d of them per batch: ~4 min per batch of 8 short texts for
  SmolLM2 on 2 cores, hours for a 4096-wide model); the estimate costs what `jacobian` costs.
- `magnitude` (mean |a_j|), `variance` (Var a_j), `pca` (energy of coordinate j in the top-K principal
  subspace of the activations), `random`.

    scores = coordinate_scores(handle, 15, batches, "jacobian", probes=2, seed=0)
    idx = top_k_coords(scores, 128)
"""

from __future__ import annotations

from typing import get_args

import torch

from .. import FinescopeError
from ..config import Selector
from ..progress import progress
from .activations import TextBatches

SELECTORS: tuple[str, ...] = get_args(Selector)  # the names are declared once, on the config


def _math_sdpa():
    """Forward-mode AD needs the composite ("math") attention kernel; fused CPU/GPU kernels lack JVP rules."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def _probe_scores(
    handle, layer: int, batches: TextBatches, probes: int, seed: int, *, per_text: bool, desc: str
) -> torch.Tensor:
    """Hutchinson estimates of Jacobian row norms w.r.t. the input embeddings, from `probes` Rademacher JVPs.

    per_text=False (jacobian): rows of ∂a_{j,t}/∂e per token, squared norms averaged over tokens.
    per_text=True (gradient): the row of ∂(Σ_t a_{j,t})/∂e per text, squared norms averaged over texts.
    Returns the square root of the average (a root-mean-square norm per coordinate).
    """
    dev = next(handle.model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    acc: torch.Tensor | None = None
    count = 0
    for batch in progress(batches, desc=desc, total=len(batches), unit="batch"):
        ids, attn = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
        mask = batch["token_mask"].to(dev)
        with torch.no_grad():
            embeds = handle.adapter.embed_tokens(ids)

        def f(e: torch.Tensor, attn: torch.Tensor = attn) -> torch.Tensor:
            return handle.adapter.hidden_after(layer, inputs_embeds=e, attention_mask=attn)

        for _ in range(probes):
            v = (torch.randint(0, 2, embeds.shape, generator=gen) * 2 - 1).to(embeds.dtype).to(dev)
            with _math_sdpa(), torch.no_grad():  # forward mode only: no graph through the weights
                u = torch.func.jvp(f, (embeds,), (v,))[1]  # (f(embeds), J·v)
            u = u.float()
            if per_text:  # (J_sum v)_j per text, J_sum = ∂(Σ_t a_{j,t})/∂e
                sq = (u * mask.unsqueeze(-1)).sum(1).pow(2).sum(0)
            else:  # Σ over real tokens of (J v)_j²
                sq = u.pow(2)[mask].sum(0)
            acc = sq if acc is None else acc + sq
        count += (ids.shape[0] if per_text else int(mask.sum())) * probes
    assert acc is not None, "the reference texts give at least one batch and probes ≥ 1"
    return (acc / max(count, 1)).sqrt().cpu()


@torch.no_grad()
def _activation_stats(handle, layer: int, batches: TextBatches) -> dict[str, torch.Tensor]:
    dev = next(handle.model.parameters()).device
    d = handle.adapter.hidden_size
    n, s1, s2, sabs = (
        0,
        torch.zeros(d, dtype=torch.float64),
        torch.zeros(d, dtype=torch.float64),
        torch.zeros(d, dtype=torch.float64),
    )
    cross = torch.zeros(d, d, dtype=torch.float64)
    for batch in progress(batches, desc=f"activation statistics (layer {layer})", total=len(batches), unit="batch"):
        hidden = handle.adapter.hidden_after(
            layer, input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev)
        )
        x = hidden[batch["token_mask"].to(dev)].double().cpu()
        n += x.shape[0]
        s1 += x.sum(0)
        s2 += x.pow(2).sum(0)
        sabs += x.abs().sum(0)
        cross += x.T @ x
    n = max(n, 1)
    mean = s1 / n
    return {"magnitude": sabs / n, "variance": s2 / n - mean.pow(2), "covariance": cross / n - torch.outer(mean, mean)}


def coordinate_scores(
    handle, layer: int, batches: TextBatches, selector: str, *, probes: int = 2, seed: int = 0, k: int = 128
) -> torch.Tensor:
    """A score per hidden coordinate at `layer` (higher = keep)."""
    d = handle.adapter.hidden_size
    if selector == "jacobian":
        return _probe_scores(
            handle, layer, batches, probes, seed, per_text=False, desc=f"jacobian scores (layer {layer}, R={probes})"
        )
    if selector == "gradient":
        return _probe_scores(
            handle, layer, batches, probes, seed, per_text=True, desc=f"gradient scores (layer {layer}, R={probes})"
        )
    if selector == "random":
        return torch.rand(d, generator=torch.Generator().manual_seed(seed))
    if selector in ("magnitude", "variance", "pca"):
        stats = _activation_stats(handle, layer, batches)
        if selector != "pca":
            return stats[selector].float()
        evals, evecs = torch.linalg.eigh(stats["covariance"])  # ascending
        top = evecs[:, -k:], evals[-k:].clamp_min(0)
        return (top[0].pow(2) * top[1]).sum(1).float()
    raise FinescopeError(f"unknown selector {selector!r}; known: {', '.join(SELECTORS)}")


def top_k_coords(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, highest first."""
    if k > scores.numel():
        raise FinescopeError(
            f"num_coords (K) = {k} is larger than the hidden size {scores.numel()}; choose K ≤ {scores.numel()}"
        )
    return torch.topk(scores, k).indices
