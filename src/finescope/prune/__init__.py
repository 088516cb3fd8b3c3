"""Stage 2: domain-calibrated structured pruning to a stock-loadable model (METHOD.md §3).

    finescope prune --model default --data runs/demo/curate/selected.jsonl --ratio 0.35 --out runs/demo/prune

Modules: `structure` (coupled groups, slicing, config rewrite), `importance` (calibration batches and scores),
`solver` (uniform shapes for a target ratio), `run` (the stage: importance → solve → slice → save → verify).
"""

from .run import PruneError, run

__all__ = ["PruneError", "run"]
