"""Stage 1, curate: SAE-guided selection of a domain's records from a pool (docs/method.md §2).

    finescope curate --model default --pool default --seeds preset:math --out runs/demo/curate --top-m 100

Modules: coords.py (coordinate selectors), activations.py (truncated forward, harvest, pooled SAE codes), sae.py
(the SAE, SAELens layout), select.py (max cosine to the seeds, top-M), baselines.py (embedding kNN, random),
run.py (the stage entry point `run(cfg, out)`). Pool and reference corpora come from finescope/corpora.py.
"""
