"""Stage 2, prune: domain-calibrated structured pruning to a stock-loadable model (docs/method.md §3).

    finescope prune --model default --data runs/demo/curate/selected.jsonl --ratio 0.35 --out runs/demo/prune

Modules: structure.py (coupled groups, slicing, config rewrite), importance.py (calibration batches and scores),
solver.py (uniform shapes for a target ratio), run.py (the stage entry point `run(cfg, out)`: importance → solve →
slice → save → verify).
"""
