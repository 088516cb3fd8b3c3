"""`finescope curate`: select a domain's records from a pool with SAE codes (stage 1, METHOD.md §2).

    finescope curate --model default --pool default --seeds preset:math --out runs/demo/curate --top-m 100

Pipeline per hook layer ℓ: score coordinates on reference texts (selector) → keep K → harvest those coordinates
from the reference corpus (truncated forward, cached shards) → train the SAE → encode pool and seeds (pooled SAE
codes, cached) → max cosine over seeds → top-M. Everything expensive is cached under
`$FINESCOPE_HOME/cache/curate/`, keyed by what it depends on, so selecting again with new seeds or a new M only
re-scores.

Modules: the selection methods are declared in `finescope.registry.SELECTION_METHODS` and implemented one per
file in curate/methods/; layer_sae.py sets up each layer's coordinates and SAE, cache.py keys the cache,
embeddings.py the sentence embeddings, scored.py chooses the records, features.py writes features.json and
output.py selected.jsonl / scores.parquet.

Outputs (stage folder): selected.jsonl, scores.parquet, coords.safetensors, sae/ (one per layer), features.json,
metrics.json, config.json, DONE.
"""

from __future__ import annotations

import random
import time
import warnings
from pathlib import Path

from .. import FinescopeError, distributed, stage_protocol, storage
from ..artifacts import CurateFeatures, CurateMetrics
from ..config import CurateConfig
from ..corpora import default_reference_texts, resolve_records_path
from ..data import read_records, record_text
from ..modeling import load
from ..registry import EMBEDDINGS, MODEL, SELECTION_METHODS, WHOLE_POOL
from .embeddings import embed_pool
from .features import shared_latents
from .layer_sae import hook_layer
from .output import write_outputs
from .pool import Pool
from .scored import Scored, SelectionInputs, choose

__all__ = ["CurateError", "hook_layer", "run"]


class CurateError(FinescopeError):
    pass


def _open_pool(cfg: CurateConfig) -> Pool:
    """The pool (validated in one streaming pass; sampled when pool_sample is set), never held whole."""
    return Pool.open(
        resolve_records_path(cfg.pool, "pool"),
        fields=cfg.encode_fields,
        sample=cfg.pool_sample,
        seed=cfg.seed,
        skip_bad_rows=cfg.skip_bad_rows,
    )


def _reference_texts(cfg: CurateConfig) -> list[str]:
    if cfg.reference == "default":
        texts = default_reference_texts()
    else:
        texts = [record_text(r) for r in read_records(cfg.reference, skip_bad_rows=cfg.skip_bad_rows)]
    # One seeded shuffle, then prefixes: the coordinate texts are the same for any reference_samples ≥ them,
    # so changing the SAE corpus size reuses cached coordinates.
    random.Random(cfg.seed).shuffle(texts)
    return texts[: cfg.reference_samples]


def run(cfg: CurateConfig, out: Path) -> Path:
    """Run the curate stage into `out`; returns `out` (skipped when already done with this config).

    Every input (seeds, pool, reference corpus, model and its layers) is read and checked before the stage
    folder is opened, so a refusal leaves nothing behind."""
    out = Path(out)
    if stage_protocol.is_done(out, cfg):
        return out
    storage.check_stage_folder(out, cfg, overwrite=cfg.overwrite)
    start = time.perf_counter()
    seeds = list(read_records(resolve_records_path(cfg.seeds, "seeds"), skip_bad_rows=cfg.skip_bad_rows))
    pool = _open_pool(cfg)
    handle = reference = None
    method = SELECTION_METHODS[cfg.method]
    if MODEL in method.needs:  # rank 0 first: a model converted into the asset cache is converted once
        handle = distributed.main_first(
            lambda: load(cfg.model, dtype=cfg.dtype, device=cfg.device), f"loading {cfg.model}"
        )
        n_layers = handle.adapter.num_layers
        for layer in cfg.layers:
            if not 0 <= layer < n_layers:
                raise CurateError(f"layers: {layer} is out of range; {handle.source} has blocks 0..{n_layers - 1}")
        if cfg.num_coords > handle.adapter.hidden_size:
            raise CurateError(
                f"num_coords (K) = {cfg.num_coords} is larger than the hidden size "
                f"{handle.adapter.hidden_size} of {handle.source}"
            )
        reference = _reference_texts(cfg)
    with stage_protocol.locked_on_rank0(out, cfg) as stage:  # the other ranks write only cache shards
        if stage is None:
            return out
        _curate_into(stage, cfg, seeds, pool, handle, reference, start)
    return out


def _curate_into(
    stage: Path,
    cfg: CurateConfig,
    seeds: list[dict],
    pool: Pool,
    handle,
    reference: list[str] | None,
    start: float,
) -> None:
    """Score the pool and write the selection into the (locked) stage folder; DONE last.

    Every method streams the pool (shards of codes or embeddings on disk, a few bytes per record in memory).
    Several ranks: the SAE method's forwards and the sentence embeddings are sharded over them (see
    `sharded_stream`), the SAE method scores on every rank, rank 0 alone writes; the others return once rank 0 has
    marked the stage done (or raise its error)."""
    m = cfg.top_m
    method = SELECTION_METHODS[cfg.method]
    if m > len(pool) and WHOLE_POOL not in method.needs and distributed.ranks().is_main:
        warnings.warn(f"top_m = {m} is larger than the pool ({len(pool)} records); keeping all of them", stacklevel=2)
        m = len(pool)
    m = min(m, len(pool))
    seed_texts = [record_text(r, cfg.encode_fields) for r in seeds]
    timings: dict[str, float] = {}

    # The sentence embeddings (embedding, hybrid) are sharded over every rank like the SAE method's forwards.
    embedded = embed_pool(cfg, pool, seed_texts, timings) if EMBEDDINGS in method.needs else None
    inputs = SelectionInputs(stage, cfg, pool, seed_texts, timings, handle, reference, embedded)
    impl = method.implementation()
    if MODEL in method.needs:  # every rank takes part (sharded forwards), rank 0 writes
        scored = impl.score(inputs)
        finish = getattr(impl, "finish", None)

        def write() -> dict:
            final = finish(scored, inputs) if finish is not None else scored
            return _write_selection(stage, cfg, seeds, pool, final, m, timings, start)

        stage_protocol.finish_on_rank0(stage, cfg, write, "writing the selection on rank 0")
    else:  # scoring (and the other methods whole) on rank 0; the others wait for its outcome

        def score_and_write() -> dict:
            return _write_selection(stage, cfg, seeds, pool, impl.score(inputs), m, timings, start)

        stage_protocol.finish_on_rank0(stage, cfg, score_and_write, f"{cfg.method} curation on rank 0")


def _write_selection(stage, cfg, seeds, pool: Pool, scored: Scored, m: int, timings, start) -> dict:
    """Choose, write selected.jsonl, scores.parquet and features.json; return metrics.json's content (rank 0)."""
    chosen = choose(cfg, scored, m)
    selection = write_outputs(stage, pool, seeds, scored.scores, scored.nearest, chosen)
    if scored.features:
        CurateFeatures(
            layers={layer: shared_latents(codes, chosen, pool) for layer, codes in scored.features.items()}
        ).write(stage / CurateFeatures.FILE)
    timings["total"] = time.perf_counter() - start
    metrics = CurateMetrics(
        method=cfg.method,
        pool_records=len(pool),
        seeds=len(seeds),
        top_m=m,
        selection=cfg.selection,
        timings_s=timings,
        sae_curation=scored.sae,
        **selection,
    )
    return metrics.to_json()
