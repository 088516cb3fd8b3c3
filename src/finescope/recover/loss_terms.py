"""The recovery's training loss, term by term. `TERMS` has one row per term besides the cross-entropy, and is the one
place a term is declared: the loss, the Trainer's per-step means over ranks, the history's per-step points and
whether the teacher must be loaded (or must run online) all read it.

The loss of an optimiser step is token-weighted over the whole step (every micro-batch, every rank):

    (1 − α)·CE / n_ce  +  α·KD / n_kd  +  β·H / n_kd  +  γ·UL / n_ce

CE is the cross-entropy on the labelled tokens, always on. Every other term is summed over its positions by its
row's `compute` and divided by the step's count of those positions (`over`: "ce", the labelled tokens, or "kd",
the KD positions: `kd_labels`, the whole example with `kd_scope: all`). A term whose weight is 0 is off: neither
computed nor logged, and the loss is then exactly the one without it. A term that `shares_ce` takes its weight
out of the cross-entropy's share (logit KD: (1 − α)·CE + α·KD); the others add theirs on top.

A new term is a weight field on `RecoverConfig` (0 by default, in its `HASH_OMIT_AT`), the same on `KdSettings`, a
function that sums it over a micro-batch, one row here and its per-step mean on `artifacts.TrainLossPoint`:
docs/extending.md, "Add a recovery loss term".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..config import RecoverConfig
from .distill import Direction, HiddenLoss, TopK, hidden_summed, kd_summed
from .unlikelihood import unlikelihood_summed

_R = RecoverConfig()  # the defaults are declared once, on the config


@dataclass
class KdSettings:
    """The weights and settings of the training loss's terms (`RecoverConfig`'s kd_*, hidden_* and *_weight
    fields): what `TERMS` reads."""

    weight: float = _R.kd_weight
    """α: 0 = plain cross-entropy on the targets (today's TGD), 1 = KD only."""
    temperature: float = _R.kd_temperature
    loss: Direction = _R.kd_loss
    top_k: int = _R.kd_top_k
    """Teacher tokens kept per position when the targets are cached."""
    hidden_weight: float = _R.hidden_weight
    """β of the hidden-state term; 0 = none."""
    hidden_loss: HiddenLoss = _R.hidden_loss
    hidden_layers: tuple[int, ...] = tuple(_R.hidden_layers)
    """Student blocks (0-based) whose outputs are matched; () = every block."""
    unlikelihood_weight: float = _R.unlikelihood_weight
    """γ of the token-level unlikelihood term against repetition (`unlikelihood.py`); 0 = none."""

    @classmethod
    def from_config(cls, cfg: RecoverConfig) -> KdSettings:
        return cls(
            weight=cfg.kd_weight,
            temperature=cfg.kd_temperature,
            loss=cfg.kd_loss,
            top_k=cfg.kd_top_k,
            hidden_weight=cfg.hidden_weight,
            hidden_loss=cfg.hidden_loss,
            hidden_layers=tuple(cfg.hidden_layers),
            unlikelihood_weight=cfg.unlikelihood_weight,
        )

    def terms_on(self) -> list[LossTerm]:
        """The rows of `TERMS` whose weight is > 0, in table order."""
        return [t for t in TERMS if t.weight_of(self) > 0]

    @property
    def needs_teacher(self) -> bool:
        """A term that is on reads the teacher (logit or hidden-state distillation)."""
        return any(t.teacher != "none" for t in self.terms_on())

    @property
    def reads_teacher_logits(self) -> bool:
        """A term that is on reads the teacher's logits. Whether they come from the examples' cached top-k targets
        or from a teacher run online is the caller's to decide (the trainer's collator attaches the cached ones only
        when no teacher runs online)."""
        return any(t.teacher == "logits" for t in self.terms_on())

    @property
    def needs_online_teacher(self) -> bool:
        """A term that is on reads what the top-k cache does not hold (the teacher's hidden states of the batch)."""
        return any(t.teacher == "hidden" for t in self.terms_on())


@dataclass(frozen=True)
class TermInputs:
    """What a term's `compute` reads from one micro-batch."""

    logits: torch.Tensor
    """The student's logits, (batch, T, vocab)."""
    labels: torch.Tensor
    """The CE labels, (batch, T); -100 where there is no target."""
    positions: torch.Tensor
    """The KD positions as a label tensor (`distill.kd_positions`)."""
    hidden: tuple[torch.Tensor, ...] | None = None
    """The student's `output_hidden_states`, when a term that is on has `teacher="hidden"`."""
    teacher: torch.Tensor | TopK | None = None
    """The teacher's logits at the KD positions (online) or their cached top-k, when a term reads the teacher."""
    teacher_hidden: tuple[torch.Tensor, ...] | None = None
    """The teacher's `output_hidden_states` of the same batch (online teacher only)."""


@dataclass(frozen=True)
class LossTerm:
    """One term of the training loss besides the cross-entropy."""

    name: str
    """Its key in a micro-batch's `Terms`, in the history's per-step points and in the Trainer's step means."""
    weight: str
    """The `KdSettings` field holding its weight; 0 = off."""
    config: str
    """The `RecoverConfig` field that sets it (`--flag` and YAML key), 0 by default."""
    over: Literal["ce", "kd"]
    """The token count it is divided by: the labelled tokens ("ce") or the KD positions ("kd")."""
    compute: Callable[[TermInputs, KdSettings], torch.Tensor]
    """Its sum over a micro-batch's positions (a float32 scalar that carries the gradient)."""
    summary: str
    teacher: Literal["none", "logits", "hidden"] = "none"
    """What it reads of the teacher: nothing, its logits (online or the top-k cache), its hidden states (online)."""
    shares_ce: bool = False
    """Its weight comes out of the cross-entropy's share instead of adding to the loss."""

    def weight_of(self, s: KdSettings) -> float:
        return float(getattr(s, self.weight))


def _kd(x: TermInputs, s: KdSettings) -> torch.Tensor:
    assert x.teacher is not None, "batch_loss hands a term with teacher='logits' the teacher's logits or top-k"
    return kd_summed(x.logits, x.positions, x.teacher, s)


def _hidden(x: TermInputs, s: KdSettings) -> torch.Tensor:
    assert x.hidden is not None and x.teacher_hidden is not None, "batch_loss hands a 'hidden' term both states"
    return hidden_summed(x.hidden, x.teacher_hidden, x.positions, s)


def _unlikelihood(x: TermInputs, s: KdSettings) -> torch.Tensor:
    return unlikelihood_summed(x.logits, x.labels)


TERMS: tuple[LossTerm, ...] = (
    LossTerm(
        name="kd", weight="weight", config="kd_weight", over="kd", compute=_kd, teacher="logits", shares_ce=True,
        summary="τ²·KL between the teacher's and the student's next-token distributions (distill.py)",
    ),
    LossTerm(
        name="hidden", weight="hidden_weight", config="hidden_weight", over="kd", compute=_hidden, teacher="hidden",
        summary="normalised MSE or 1 − cosine between the student's and the teacher's residual streams (distill.py)",
    ),
    LossTerm(
        name="ul", weight="unlikelihood_weight", config="unlikelihood_weight", over="ce", compute=_unlikelihood,
        summary="token-level unlikelihood of the response's earlier tokens (unlikelihood.py)",
    ),
)  # fmt: skip

Terms = dict[str, Any]
"""A micro-batch's (or a step's) summed loss terms by name: "ce" always, then each term of `TERMS` that is on.
Values are tensors in training, floats in the Trainer's step bookkeeping."""


def mixed_loss(terms: Terms, n_ce: float, n_kd: float, s: KdSettings):
    """The token-weighted training loss of summed terms: (1 − Σ weights that share the CE's)·CE / n_ce, plus each
    other term's weight × its sum / its count. Tensors or floats alike."""
    counts = {"ce": max(n_ce, 1), "kd": max(n_kd, 1)}
    on = [t for t in TERMS if t.name in terms]
    ce_share = 1 - sum(t.weight_of(s) for t in on if t.shares_ce)
    loss = ce_share * terms["ce"] / counts["ce"]
    for t in on:
        loss = loss + t.weight_of(s) * terms[t.name] / counts[t.over]
    return loss


def term_means(sums: Terms, n_ce: float, n_kd: float) -> dict[str, float]:
    """Each summed term divided by its count: the per-token means the history records ("ce" first)."""
    counts = {"ce": max(n_ce, 1), "kd": max(n_kd, 1)}
    over = {"ce": "ce"} | {t.name: t.over for t in TERMS}
    return {name: float(value) / counts[over[name]] for name, value in sums.items()}
