"""The stage registry: every stage's name, config class, entry module and one-line help, in run order.

`finescope <stage>` (cli.py) and `finescope run` (pipeline.py) both read this table, so a stage is added in one
place. A stage's entry module has `run(cfg, out_dir) -> Path`; it is imported when the stage runs, so importing
the registry stays cheap and tests can replace a stage's `run`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import CurateConfig, EvalConfig, PruneConfig, RecoverConfig


@dataclass(frozen=True)
class Stage:
    name: str
    """Subcommand and stage-folder name."""
    config: type
    """The stage's config dataclass: its fields are the subcommand's flags and the pipeline YAML's section."""
    module: str
    """Module whose `run(cfg, out_dir) -> Path` runs the stage."""
    help: str
    """One line for `finescope --help`."""

    def entry(self) -> Callable[[Any, Path], Path]:
        """The stage's `run` function, looked up now (not at import time)."""
        return importlib.import_module(self.module).run


STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("curate", CurateConfig, "finescope.curate.run", "SAE-guided selection of a domain's records from a pool"),
        Stage(
            "prune",
            PruneConfig,
            "finescope.prune.run",
            "structured pruning (heads, MLP channels, blocks) to a target ratio",
        ),
        Stage(
            "recover",
            RecoverConfig,
            "finescope.recover.run",
            "teacher-guided distillation + LoRA fine-tuning of a pruned model",
        ),
        Stage(
            "eval",
            EvalConfig,
            "finescope.evaluate.run",
            "evaluate a model: MMLU slices, GSM8K, HumanEval, domain NLL, its own replies, task files",
        ),
    )
}
"""In run order: a later stage reads only earlier stages' files."""
