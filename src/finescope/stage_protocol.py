"""The stage protocol, in one place: is-done check, rank-0 folder lock, write, DONE, the other ranks wait.

Every stage (curate, prune, recover, eval) runs the same steps:

    if stage_protocol.is_done(out, cfg):           # finished with this very config: skip
        return out
    storage.check_stage_folder(out, cfg, ...)      # refuse a bad folder before any input is read
    ...read and check the inputs, load the model...
    with stage_protocol.locked_on_rank0(out, cfg) as stage:
        if stage is None:                          # another run finished it meanwhile
            return out
        ...every rank computes its share...
        stage_protocol.finish_on_rank0(stage, cfg, write, "saving on rank 0")

`write` runs on rank 0 only, writes the stage's files and returns what goes into metrics.json; DONE is written
after it, always last. The other ranks wait for rank 0's outcome and raise its error if it failed, so none of
them waits on a collective rank 0 will never reach. One process: the same steps, without the waiting.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from . import distributed, storage


def is_done(out: str | Path, cfg: Any) -> bool:
    """True when `out` is a finished stage folder of this very config (its DONE certifies `config_hash(cfg)`)."""
    return storage.is_done(out, cfg)


@contextlib.contextmanager
def locked_on_rank0(out: str | Path, cfg: Any) -> Iterator[Path | None]:
    """Rank 0 opens the stage folder (`storage.stage_folder`: lock, set aside another config's folder, write
    config.json) and holds its lock until the block ends; every rank gets the folder, or None when it is already
    done with this config. A refusal on rank 0 is raised on every rank."""
    with contextlib.ExitStack() as held:
        yield distributed.on_main(
            lambda: held.enter_context(storage.stage_folder(out, cfg, overwrite=cfg.overwrite)),
            f"opening {out}",
        )


def finish_on_rank0(stage: Path | None, cfg: Any, write: Callable[[], dict | None], what: str) -> None:
    """Rank 0 runs `write` (the stage's files; it returns metrics.json's content, or None for none) and then marks
    `stage` done; the other ranks wait for that outcome. `stage` None: write only (an output that is not a stage
    folder, e.g. eval's results file)."""

    def on_rank0() -> None:
        metrics = write()
        if stage is not None:
            storage.mark_done(stage, cfg, metrics)

    distributed.on_main(on_rank0, what)
