"""Stage 1, curate: SAE-guided selection of a domain's records from a pool (docs/method.md §2).

    finescope curate --model default --pool default --seeds preset:math --out runs/demo/curate --top-m 100

Modules: run.py (the stage entry point `run(cfg, out)`), methods/ (one file per selection method; the names and
what each needs are declared in finescope/registry.py), scored.py (a method's inputs and scores, choosing the
records), layer_sae.py (per-layer coordinates and SAE), cache.py (cache keys), embeddings.py (sentence embeddings),
features.py (features.json), output.py (selected.jsonl, scores.parquet), coords.py (coordinate selectors),
activations.py (truncated forward, harvest, pooled SAE codes), sae.py (the SAE, SAELens layout), select.py (max
cosine to the seeds, top-M), baselines.py (the MiniLM encoder, random scores, rank fusion), dsir.py (DSIR weights).
Pool and reference corpora come from finescope/corpora.py.
"""
