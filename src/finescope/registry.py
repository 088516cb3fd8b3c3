"""The method registries: every pruning importance and every curate selection method, with what it needs.

One literal table per kind, in the style of `stages.STAGES`: a row names the method, says in one line what it is,
declares what it needs from the stage (gradients, activations, a model, sentence embeddings …) and names the
module or function that implements it. The table is the one place a method's name is written:

- config validation and `--help` choices read it (`config.Choices`), so a typo is refused with the full list;
- the stage asks the row what to gather (`entry.needs`), instead of comparing method names;
- the stage calls the row's implementation (`entry.implementation()`, imported when first asked for).

The tables live here, below the stage packages and free of torch, because the configs (`config.py`) must know
the names without importing a stage: see docs/extending.md for adding a method.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar


@dataclass(frozen=True)
class Method:
    """One row of a registry."""

    name: str
    """What users write (config value, CLI flag value)."""
    summary: str
    """One line: what it computes and where it comes from."""
    implementation_path: str
    """`package.module:function` (or `package.module` for a module) that implements it, imported when used."""
    needs: frozenset[str] = field(default_factory=frozenset)
    """What the stage must gather or load for it (the kind's NEEDS vocabulary)."""

    def implementation(self) -> Any:
        """The implementing function (or module), imported now."""
        module, _, attr = self.implementation_path.partition(":")
        mod = importlib.import_module(module)
        return getattr(mod, attr) if attr else mod


E = TypeVar("E", bound=Method)


class Registry(Generic[E]):
    """An ordered, read-only name → row table of one kind of method."""

    def __init__(self, kind: str, needs: Iterable[str], rows: Iterable[E]):
        self.kind = kind
        self.vocabulary = frozenset(needs)
        self._rows: dict[str, E] = {}
        for row in rows:
            assert row.name not in self._rows, f"{kind} {row.name!r} is declared twice"
            assert row.needs <= self.vocabulary, (
                f"{kind} {row.name!r}: unknown needs {set(row.needs - self.vocabulary)}"
            )
            self._rows[row.name] = row

    def names(self) -> tuple[str, ...]:
        """Every name, in table order (the order of `--help` choices and error messages)."""
        return tuple(self._rows)

    def __contains__(self, name: object) -> bool:
        return name in self._rows

    def __iter__(self) -> Iterator[E]:
        return iter(self._rows.values())

    def __getitem__(self, name: str) -> E:
        """The row of `name`; an unknown name raises ValueError naming every known one."""
        try:
            return self._rows[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(self._rows)}") from None


def needs(*names: str) -> frozenset[str]:
    return frozenset(names)


# ================================================================================================ prune: importance

GRADIENTS = "gradients"
"""Gradients of the calibration loss w.r.t. every projection (a backward pass per calibration batch)."""
FISHER = "fisher"
"""The empirical Fisher diagonal over mini-batches (with the gradients)."""
ACTIVATIONS = "activations"
"""Input moments (sum, sum of squares over real tokens) of every o_proj / down_proj."""
BLOCK_COSINES = "block_cosines"
"""Each block's input/output cosine over real tokens."""
IMPORTANCE_NEEDS = (GRADIENTS, FISHER, ACTIVATIONS, BLOCK_COSINES)

_IMP = "finescope.prune.importance"

IMPORTANCE: Registry[Method] = Registry(
    "importance",
    IMPORTANCE_NEEDS,
    [
        Method("taylor", "abs(w·g) summed per group (LLM-Pruner param_first)", f"{_IMP}:taylor", needs(GRADIENTS)),
        Method(
            "taylor2", "abs(w·g) + ½·w²·F (first + Fisher-diagonal term)", f"{_IMP}:taylor2", needs(GRADIENTS, FISHER)
        ),
        Method(
            "taylor_mix", "abs(w·g − ½·w²·F) (LLM-Pruner param_mix)", f"{_IMP}:taylor_mix", needs(GRADIENTS, FISHER)
        ),
        Method(
            "taylor_vector",
            "abs(Σ w·g) per group: the group's first-order loss change (LLM-Pruner vector-wise)",
            f"{_IMP}:taylor_vector",
            needs(GRADIENTS),
        ),
        Method("magnitude", "w² summed per group, group score = its L2 norm", f"{_IMP}:magnitude"),
        Method(
            "wanda_sp",
            "abs(W[:, j])·‖X_j‖₂ on o_proj/down_proj inputs (Wanda-sp)",
            f"{_IMP}:wanda_sp",
            needs(ACTIVATIONS),
        ),
        Method("flap", "Var(X_j)·‖W[:, j]‖² on o_proj/down_proj inputs (FLAP)", f"{_IMP}:flap", needs(ACTIVATIONS)),
        Method("random", "uniform random, seeded (baseline)", f"{_IMP}:random_scores"),
    ],
)
"""Width importance (`prune.importance`). Implementation: `(adapter, layer, gathered, generator) -> (heads, kv,
channels)` scores of one layer, in prune/importance.py."""

DEPTH_IMPORTANCE: Registry[Method] = Registry(
    "depth importance",
    IMPORTANCE_NEEDS,
    [
        Method(
            "block_influence",
            "1 − cos(block input, block output) (ShortGPT)",
            f"{_IMP}:block_influence",
            needs(BLOCK_COSINES),
        ),
        Method("taylor_block", "Σ abs(w·g) over the block's projections", f"{_IMP}:taylor_block", needs(GRADIENTS)),
    ],
)
"""Block importance for depth pruning (`prune.depth_importance`). Implementation: `(adapter, gathered) ->
(layers,) scores`, in prune/importance.py."""


# ================================================================================================ curate: selection

MODEL = "model"
"""The model and the reference corpus (loaded rank 0 first); the method scores on every rank (sharded forwards)."""
EMBEDDINGS = "embeddings"
"""all-MiniLM-L6-v2 sentence embeddings of the pool and the seeds (sharded over the ranks, cached)."""
WHOLE_POOL = "whole_pool"
"""Keeps every pool record: top_m does not apply."""
SELECTION_NEEDS = (MODEL, EMBEDDINGS, WHOLE_POOL)

_SEL = "finescope.curate.methods"

SELECTION_METHODS: Registry[Method] = Registry(
    "selection method",
    SELECTION_NEEDS,
    [
        Method("sae", "SAE codes of the pool vs the seeds (the paper's)", f"{_SEL}.sae", needs(MODEL)),
        Method("embedding", "sentence-embedding kNN to the seeds", f"{_SEL}.embedding", needs(EMBEDDINGS)),
        Method("dsir", "DSIR importance weights on hashed n-grams", f"{_SEL}.dsir"),
        Method("random", "a seeded random subset", f"{_SEL}.random"),
        Method("full", "the whole pool", f"{_SEL}.full", needs(WHOLE_POOL)),
        Method("hybrid", "reciprocal-rank fusion of sae and embedding", f"{_SEL}.hybrid", needs(MODEL, EMBEDDINGS)),
    ],
)
"""`curate.method`. Implementation: a module of curate/methods/ with `score(inputs) -> Scored` (and, for the
methods that score on every rank, an optional `finish(scored, inputs)` run on rank 0 before writing)."""
