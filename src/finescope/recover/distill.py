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

Hidden-state distillation (β > 0) adds a term on the residual stream: FineScope never cuts the hidden size, so the
student's output of block i is directly comparable with the teacher's (Minitron, TinyBERT). Per position the term
is the normalised squared error ‖h_s − h_t‖² / ‖h_t‖² (`nmse`) or 1 − cos(h_s, h_t) (`cosine`), averaged over the
chosen blocks, summed over the KD positions and divided by their count like the KD term; the step's loss is then
(1 − α)·CE + α·KD + β·H. Its targets are the teacher's hidden states of the same batch, so the teacher runs online.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F

from .. import FinescopeError
from ..tokens import IGNORE_INDEX, LOSS_CHUNK_ELEMENTS, LOSS_ONE_PIECE_MAX, chunked_row_sum

Direction = Literal["forward", "reverse"]
HiddenLoss = Literal["nmse", "cosine"]
_LOG_FLOOR = -100.0  # log-mass of an empty bin: exp() is ~4e-44, so its terms vanish without 0·(−inf) = nan


class KlSettings(Protocol):
    """What the KD term reads of its settings (`loss_terms.KdSettings`, which imports this module)."""

    temperature: float
    loss: Direction


class HiddenSettings(Protocol):
    """What the hidden-state term reads of its settings (`loss_terms.KdSettings`)."""

    hidden_loss: HiddenLoss
    hidden_layers: tuple[int, ...]


@dataclass
class TopK:
    """The teacher's distribution at N labelled positions: k token ids, their log-probabilities at τ, and the
    log of the probability left to the rest of the vocabulary."""

    ids: torch.Tensor  # (N, k) int64
    logp: torch.Tensor  # (N, k) float32
    log_rest: torch.Tensor  # (N,) float32

    def __getitem__(self, rows: slice) -> TopK:
        return TopK(self.ids[rows], self.logp[rows], self.log_rest[rows])

    @staticmethod
    def cat(parts: list[TopK]) -> TopK:
        return TopK(
            torch.cat([p.ids for p in parts]),
            torch.cat([p.logp for p in parts]),
            torch.cat([p.log_rest for p in parts]),
        )


def labelled_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N, vocab) logits of the positions that predict a labelled token, row-major (example by example), in the
    logits' dtype: the losses upcast them to float32 chunk by chunk (`chunked_row_sum`)."""
    mask = labels[:, 1:] != IGNORE_INDEX
    return logits[:, :-1][mask]


def kd_positions(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The label tensor of a collated batch whose labelled positions the KD term covers."""
    return batch.get("kd_labels", batch["labels"])


def top_k_of(logits: torch.Tensor, temperature: float, k: int) -> TopK:
    """Top-k of a (N, vocab) distribution at temperature τ, with the log-mass of the rest."""
    if logits.numel() > LOSS_ONE_PIECE_MAX and logits.shape[0] > 1:  # row chunks: one float32 copy at a time
        step = max(1, LOSS_CHUNK_ELEMENTS // logits.shape[-1])
        return TopK.cat([top_k_of(logits[a : a + step], temperature, k) for a in range(0, logits.shape[0], step)])
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
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher: torch.Tensor | TopK,
    s: KlSettings,
    *,
    chunk_elements: int | None = None,
) -> torch.Tensor:
    """τ² · Σ KL over the labelled positions of a batch; `teacher` is (N, vocab) logits of those positions, in the
    same order, or their cached top-k. Taken in checkpointed chunks of positions above `tokens.LOSS_ONE_PIECE_MAX`
    logits (or `chunk_elements`), in one piece up to it (`tokens.chunked_row_sum`)."""

    def kl_sum(student: torch.Tensor, target: torch.Tensor | TopK) -> torch.Tensor:
        if isinstance(target, TopK):
            return kl_top_k(student, target, s.temperature, s.loss).sum()
        return kl_full(student, target, s.temperature, s.loss).sum()

    student = labelled_logits(student_logits, labels)
    return chunked_row_sum(kl_sum, student, teacher, chunk_elements=chunk_elements) * s.temperature**2


class HiddenStateError(FinescopeError):
    """The hidden-state loss cannot pair this student with this teacher."""


def layer_pairs(student_layers: int, teacher_layers: int, chosen: tuple[int, ...]) -> list[tuple[int, int]]:
    """(student, teacher) indices into `output_hidden_states` for the matched blocks: the student's block i (0-based)
    against the teacher's block round((i + 1)·L_t / L_s) − 1, the uniform map of TinyBERT (i against i at equal
    depth). Index 0 of `hidden_states` is the embeddings, so block i's output is index i + 1."""
    blocks = list(chosen) if chosen else list(range(student_layers))
    bad = [i for i in blocks if not 0 <= i < student_layers]
    if bad:
        raise HiddenStateError(
            f"hidden_layers {', '.join(map(str, bad))}: the student has blocks 0-{student_layers - 1}"
        )
    return [(i + 1, max(1, round((i + 1) * teacher_layers / student_layers))) for i in dict.fromkeys(blocks)]


def check_hidden_fit(student_config, teacher_config, chosen: tuple[int, ...], student: str, teacher: str) -> None:
    """Refuse, before any work, a teacher whose residual stream cannot be compared with the student's."""
    hs, ht = student_config.hidden_size, teacher_config.hidden_size
    if hs != ht:
        raise HiddenStateError(
            f"{teacher}: hidden size {ht}, the student {student} has {hs}; the hidden-state loss (--hidden-weight "
            f"> 0) compares residual streams of the same width (use --hidden-weight 0 for this teacher)"
        )
    ls, lt = student_config.num_hidden_layers, teacher_config.num_hidden_layers
    if lt < ls:
        raise HiddenStateError(
            f"{teacher}: {lt} blocks, fewer than the student's {ls} ({student}); the hidden-state loss maps each "
            f"student block to a teacher block and needs a teacher at least as deep"
        )
    layer_pairs(ls, lt, chosen)


def hidden_summed(
    student_hidden: tuple[torch.Tensor, ...],
    teacher_hidden: tuple[torch.Tensor, ...],
    labels: torch.Tensor,
    s: HiddenSettings,
) -> torch.Tensor:
    """Σ over the KD positions of the per-position hidden-state loss averaged over the matched blocks. Positions
    are those of the KD term: each one that predicts a labelled token (`labelled_logits`)."""
    mask = labels[:, 1:] != IGNORE_INDEX
    pairs = layer_pairs(len(student_hidden) - 1, len(teacher_hidden) - 1, s.hidden_layers)
    total = torch.zeros((), device=student_hidden[0].device, dtype=torch.float32)
    for si, ti in pairs:
        h_s = student_hidden[si][:, :-1][mask].float()
        h_t = teacher_hidden[ti][:, :-1][mask].float().to(h_s.device)
        if s.hidden_loss == "cosine":
            per_position = 1 - F.cosine_similarity(h_s, h_t, dim=-1, eps=1e-8)
        else:
            per_position = (h_s - h_t).pow(2).sum(-1) / h_t.pow(2).sum(-1).clamp(min=1e-8)
        total = total + per_position.sum()
    return total / len(pairs)


class OnlineTeacher:
    """Teacher logits (and hidden states) computed on each training batch (exact; keeps the teacher in memory)."""

    def __init__(self, model):
        self.model = model.eval()

    @torch.no_grad()
    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.states(batch, hidden=False)[0]

    @torch.no_grad()
    def states(
        self, batch: dict[str, torch.Tensor], *, hidden: bool
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """The labelled positions' logits (N, vocab), and every block's output when `hidden`."""
        device = next(self.model.parameters()).device
        out = self.model(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            output_hidden_states=hidden,
        )
        logits = labelled_logits(out.logits, kd_positions(batch).to(device))
        return logits, (tuple(out.hidden_states) if hidden else None)
