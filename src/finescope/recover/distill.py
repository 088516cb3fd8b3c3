"""Logit distillation: the teacher's next-token distribution as a soft target on every labelled token.

Per labelled position, with temperature τ, teacher distribution p = softmax(t/τ) and student q = softmax(s/τ):

    forward KL  KL(p ‖ q) = Σ_v p_v (log p_v − log q_v)      (mean-seeking; Hinton et al., MiniLLM's baseline)
    reverse KL  KL(q ‖ p) = Σ_v q_v (log q_v − log p_v)      (mode-seeking; MiniLLM, GKD)

scaled by τ² so the gradient's size does not shrink with τ (Hinton et al. 2015). The training loss of a step is
α · KD + (1 − α) · CE on the same tokens, both summed over tokens and divided by the step's token count.

The teacher side comes either from the teacher itself, run on the same batch (`OnlineTeacher`: exact, the whole
vocabulary, the teacher stays in memory during training), or from a cache of its top-k distribution per labelled
token (`TopK`: one teacher pass over the examples instead of one per epoch; the teacher is freed before training).
With top-k targets the KL is taken over k + 1 bins: the k teacher tokens and one bin holding the rest of the
vocabulary on each side. That is exact bookkeeping of the probability mass, equals the full KL when k covers the
vocabulary, and never exceeds it (grouping outcomes can only lower a KL divergence).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ..tokens import IGNORE_INDEX

Direction = Literal["forward", "reverse"]
_LOG_FLOOR = -100.0  # log-mass of an empty bin: exp() is ~4e-44, so its terms vanish without 0·(−inf) = nan


@dataclass
class KdSettings:
    weight: float = 0.0
    """α: 0 = plain cross-entropy on the targets (today's TGD), 1 = KD only."""
    temperature: float = 1.0
    loss: Direction = "forward"
    top_k: int = 64
    """Teacher tokens kept per position when the targets are cached."""


@dataclass
class TopK:
    """The teacher's distribution at N labelled positions: k token ids, their log-probabilities at τ, and the
    log of the probability left to the rest of the vocabulary."""

    ids: torch.Tensor  # (N, k) int64
    logp: torch.Tensor  # (N, k) float32
    log_rest: torch.Tensor  # (N,) float32

    @staticmethod
    def cat(parts: list[TopK]) -> TopK:
        return TopK(
            torch.cat([p.ids for p in parts]),
            torch.cat([p.logp for p in parts]),
            torch.cat([p.log_rest for p in parts]),
        )


def labelled_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N, vocab) float32 logits of the positions that predict a labelled token, row-major (example by example)."""
    mask = labels[:, 1:] != IGNORE_INDEX
    return logits[:, :-1][mask].float()


def kd_positions(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The label tensor of a collated batch whose labelled positions the KD term covers."""
    return batch.get("kd_labels", batch["labels"])


def top_k_of(logits: torch.Tensor, temperature: float, k: int) -> TopK:
    """Top-k of a (N, vocab) distribution at temperature τ, with the log-mass of the rest."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    k = min(k, logp.shape[-1])
    top, ids = logp.topk(k, dim=-1)
    rest = logp.scatter(-1, ids, float("-inf"))
    return TopK(ids, top, torch.logsumexp(rest, dim=-1))


def kl_full(student: torch.Tensor, teacher: torch.Tensor, temperature: float, direction: Direction) -> torch.Tensor:
    """Per-position KL (N,) between two (N, vocab) logit rows at temperature τ (not yet scaled by τ²)."""
    log_q = F.log_softmax(student.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher.float() / temperature, dim=-1)
    if direction == "forward":
        return (log_p.exp() * (log_p - log_q)).sum(-1)
    return (log_q.exp() * (log_q - log_p)).sum(-1)


def kl_top_k(student: torch.Tensor, teacher: TopK, temperature: float, direction: Direction) -> torch.Tensor:
    """Per-position KL (N,) over the teacher's k tokens plus one bin for the rest of the vocabulary."""
    log_q_all = F.log_softmax(student.float() / temperature, dim=-1)
    log_q = log_q_all.gather(-1, teacher.ids)
    log_q_rest = torch.logsumexp(log_q_all.scatter(-1, teacher.ids, float("-inf")), dim=-1)
    log_p, log_p_rest = teacher.logp, teacher.log_rest
    log_q_rest, log_p_rest = log_q_rest.clamp(min=_LOG_FLOOR), log_p_rest.clamp(min=_LOG_FLOOR)
    if direction == "forward":
        return (log_p.exp() * (log_p - log_q)).sum(-1) + log_p_rest.exp() * (log_p_rest - log_q_rest)
    return (log_q.exp() * (log_q - log_p)).sum(-1) + log_q_rest.exp() * (log_q_rest - log_p_rest)


def kd_summed(
    student_logits: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | TopK, s: KdSettings
) -> torch.Tensor:
    """τ² · Σ KL over the labelled positions of a batch; `teacher` is (N, vocab) logits of those positions, in the
    same order, or their cached top-k."""
    student = labelled_logits(student_logits, labels)
    if isinstance(teacher, TopK):
        per_token = kl_top_k(student, teacher, s.temperature, s.loss)
    else:
        per_token = kl_full(student, teacher, s.temperature, s.loss)
    return per_token.sum() * s.temperature**2


class OnlineTeacher:
    """Teacher logits computed on each training batch (exact; keeps the teacher in memory)."""

    def __init__(self, model):
        self.model = model.eval()

    @torch.no_grad()
    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        out = self.model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
        return labelled_logits(out.logits, kd_positions(batch).to(device))
