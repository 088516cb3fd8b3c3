"""`finescope curate`: select a domain's records from a pool with SAE codes (stage 1, METHOD.md §2).

    finescope curate --model default --pool default --seeds preset:math --out runs/demo/curate --top-m 100

Pipeline per hook layer ℓ: score coordinates on reference texts (selector) → keep K → harvest those coordinates
from the reference corpus (truncated forward, cached shards) → train the SAE → encode pool and seeds (pooled SAE
codes, cached) → max cosine over seeds → top-M. Everything expensive is cached under
`$FINESCOPE_HOME/cache/curate/`, keyed by what it depends on, so selecting again with new seeds or a new M only
re-scores.

Outputs (stage folder): selected.jsonl, scores.parquet, coords.safetensors, sae/ (one per layer), features.json,
metrics.json, config.json, DONE.
"""

from __future__ import annotations

import contextlib
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from .. import FinescopeError, assets, distributed, hashing, storage
from ..artifacts import CurateFeatures, CurateMetrics, PoolSnippet, SaeCurationMetrics, SaeLayerMetrics, SharedLatent
from ..config import CurateConfig
from ..corpora import default_reference_texts, resolve_records_path
from ..data import read_records, record_text
from ..modeling import load
from .activations import RecordActivations, TextBatches, encode_pooled, harvest_coords, harvest_records, pool_codes
from .baselines import minilm_embeddings, random_scores
from .coords import coordinate_scores, top_k_coords
from .dsir import dsir_scores
from .sae import evaluate_sae, load_sae, save_sae, train_sae
from .select import max_cosine, seed_cosine, select_global, select_per_seed, weight_latents

# Bump when the SAE's definition changes, so cached SAEs (and encodings made with them) are not reused.
SAE_VERSION = 3  # 3: folder and encodings use the standardisation folded into the weights (SAELens layout)
# Per selector, bumped when its score definition changes, so cached coordinates are not reused
# (gradient 2: Hutchinson estimate, root-mean-square over texts, instead of the exact per-coordinate backward).
COORDS_VERSION = {"gradient": 2}


class CurateError(FinescopeError):
    pass


def _cache_root() -> Path:
    return assets.home() / "cache" / "curate"


def _load_pool(cfg: CurateConfig) -> list[dict]:
    records = list(read_records(resolve_records_path(cfg.pool, "pool"), skip_bad_rows=cfg.skip_bad_rows))
    if cfg.pool_sample and cfg.pool_sample < len(records):
        records = random.Random(cfg.seed).sample(records, cfg.pool_sample)
    return records


def _reference_texts(cfg: CurateConfig) -> list[str]:
    if cfg.reference == "default":
        texts = default_reference_texts()
    else:
        texts = [record_text(r) for r in read_records(cfg.reference, skip_bad_rows=cfg.skip_bad_rows)]
    # One seeded shuffle, then prefixes: the coordinate texts are the same for any reference_samples ≥ them,
    # so changing the SAE corpus size reuses cached coordinates.
    random.Random(cfg.seed).shuffle(texts)
    return texts[: cfg.reference_samples]


def _coords_key(cfg: CurateConfig, layer: int, coord_texts: list[str], model_fp: str) -> str:
    """Cache key of a layer's coordinate scores: the model, the layer, the selector and its texts."""
    return hashing.digest_parts(
        "coords",
        COORDS_VERSION.get(cfg.selector, 1),
        model_fp,
        layer,
        cfg.selector,
        cfg.num_coords,
        cfg.probes,
        hashing.digest_texts(coord_texts),
        cfg.max_length,
        cfg.batch_size,
        cfg.seed,
    )


def _sae_key(cfg: CurateConfig, coords_key: str, reference: list[str], pool_acts_key: str | None = None) -> str:
    """Cache key of a layer's SAE: its coordinates, the reference corpus, the pool activations it was also trained
    on (sae_data = pool+reference) and the SAE's training settings."""
    extra = () if pool_acts_key is None else ("pool", pool_acts_key)
    return hashing.digest_parts(
        "sae",
        SAE_VERSION,
        coords_key,
        hashing.digest_texts(reference),
        cfg.sae_kind,
        cfg.sae_expansion,
        cfg.sae_k,
        cfg.sae_l1,
        cfg.sae_auxk_alpha,
        cfg.sae_lr,
        cfg.sae_steps,
        cfg.sae_batch_size,
        *extra,
    )


def _pool_acts_key(cfg: CurateConfig, coords_key: str, layer: int, pool_texts: list[str]) -> str:
    """Cache key of the pool's token activations: the coordinates (model and layer included), the texts and how
    they are tokenised and batched."""
    return hashing.digest_parts(
        "pool-acts", coords_key, layer, cfg.max_length, cfg.batch_size, hashing.digest_texts(pool_texts)
    )


def _train_layer_sae(cfg: CurateConfig, handle, layer: int, reference: list[str], model_fp: str, pool_texts: list[str]):
    """Coordinates + SAE for one layer, from the cache when the same inputs were seen before.

    sae_data = pool+reference: the pool's token activations are harvested first (one forward per pool record,
    cached as shards), the SAE also trains on them, and the returned state carries them, so that the pool is
    encoded from that cache."""
    coord_texts = reference[: cfg.coord_samples]
    coords_key = _coords_key(cfg, layer, coord_texts, model_fp)
    timings: dict[str, float] = {}
    scores, idx = distributed.main_first(
        lambda: _layer_coords(cfg, handle, layer, coord_texts, coords_key, timings),
        f"coordinate scores (layer {layer})",
    )
    pool_acts: RecordActivations | None = None
    pool_key = None
    if cfg.sae_data == "pool+reference":
        pool_key = _pool_acts_key(cfg, coords_key, layer, pool_texts)
        cache = _cache_root() / f"pool-acts-{pool_key}"
        t = time.perf_counter()
        batches = TextBatches(handle.tokenizer, pool_texts, cfg.max_length, cfg.batch_size)
        pool_acts = harvest_records(handle, layer, idx, batches, cache, desc=f"harvest pool (layer {layer})")
        if distributed.ranks().is_main:
            storage.write_json_atomic(
                cache / "info.json", {"texts": len(pool_texts), "layer": layer, "tokens": pool_acts.tokens}
            )
        timings["harvest_pool_s"] = time.perf_counter() - t
    key = _sae_key(cfg, coords_key, reference, pool_key)
    root = _cache_root() / f"sae-{key}"
    root.mkdir(parents=True, exist_ok=True)
    sae, curves, quality = _layer_sae(cfg, handle, layer, reference, idx, root, timings, pool_acts)
    return {
        "key": key,
        "root": root,
        "scores": scores,
        "indices": idx,
        "sae": sae,
        "curves": curves,
        "quality": quality,
        "timings": timings,
        "pool_acts": pool_acts,
    }


def _layer_coords(
    cfg: CurateConfig, handle, layer: int, coord_texts: list[str], coords_key: str, timings: dict[str, float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinate scores and the top-K indices of one layer, cached in coords-<key>.safetensors."""
    coords_file = _cache_root() / f"coords-{coords_key}.safetensors"
    if coords_file.is_file():
        saved = load_file(str(coords_file))
        return saved["scores"], saved["indices"]
    t = time.perf_counter()
    scores = coordinate_scores(
        handle,
        layer,
        TextBatches(handle.tokenizer, coord_texts, cfg.max_length, cfg.batch_size),
        cfg.selector,
        probes=cfg.probes,
        seed=cfg.seed,
        k=cfg.num_coords,
    )
    idx = top_k_coords(scores, cfg.num_coords)
    storage.write_atomic(coords_file, save({"scores": scores.float().contiguous(), "indices": idx.contiguous()}))
    timings["coords_s"] = time.perf_counter() - t
    return scores, idx


def _layer_sae(
    cfg: CurateConfig,
    handle,
    layer: int,
    reference: list[str],
    idx: torch.Tensor,
    root: Path,
    timings: dict[str, float],
    pool_acts: RecordActivations | None = None,
):
    """(SAE, curves, quality) of one layer: loaded from root/sae/, else harvested, trained and saved there.

    With `pool_acts`, the SAE trains on the reference tokens and the pool's tokens together. Several ranks: the
    harvest is sharded over them, rank 0 trains and saves, the others then load what it saved."""
    sae_dir = root / "sae"

    def cached():
        sae, meta = load_sae(sae_dir)
        return sae, meta["finescope_curves"], meta["finescope_metrics"]

    if distributed.on_main(lambda: (sae_dir / "cfg.json").is_file(), f"SAE cache lookup (layer {layer})"):
        return cached()
    t = time.perf_counter()
    acts = harvest_coords(
        handle,
        {layer: idx},
        TextBatches(handle.tokenizer, reference, cfg.max_length, cfg.batch_size),
        root / "acts",
    )[layer]
    timings["harvest_s"] = time.perf_counter() - t

    def fit():
        if (sae_dir / "cfg.json").is_file():  # the other ranks, once rank 0 has saved it
            return cached()
        t = time.perf_counter()
        train = acts if pool_acts is None else torch.cat([acts, pool_acts.all_tokens()])
        sae, curves, quality = _fit_sae(cfg, train)
        quality["reference_tokens"] = int(acts.shape[0])
        quality["pool_tokens"] = int(train.shape[0]) - int(acts.shape[0])
        timings["sae_train_s"] = time.perf_counter() - t
        save_sae(
            sae,
            sae_dir,
            coords=idx,
            layer=layer,
            model=handle.source,
            extra={"finescope_curves": curves, "finescope_metrics": quality, "finescope_selector": cfg.selector},
        )
        return sae, curves, quality

    return distributed.main_first(fit, f"SAE training (layer {layer})")


def _fit_sae(cfg: CurateConfig, acts: torch.Tensor):
    """Train the configured SAE on harvested activations; returns (SAE, curves, quality with the token count)."""
    sae, curves = train_sae(
        acts,
        kind=cfg.sae_kind,
        d_sae=cfg.sae_expansion * cfg.num_coords,
        k=cfg.sae_k,
        l1=cfg.sae_l1,
        auxk_alpha=cfg.sae_auxk_alpha,
        lr=cfg.sae_lr,
        steps=cfg.sae_steps,
        batch_size=cfg.sae_batch_size,
        seed=cfg.seed,
    )
    quality = evaluate_sae(sae, acts)
    quality["tokens"] = int(acts.shape[0])
    return sae, curves, quality


def _sae_vectors(cfg, handle, layer_state, layer: int, texts: list[str], tag: str) -> torch.Tensor:
    batches = TextBatches(handle.tokenizer, texts, cfg.max_length, cfg.batch_size)
    key = hashing.digest_parts(
        "enc", layer_state["key"], layer, cfg.pooling, cfg.max_length, cfg.batch_size, hashing.digest_texts(texts)
    )
    cache = _cache_root() / f"enc-{key}"
    vecs = encode_pooled(
        handle,
        layer,
        layer_state["indices"],
        layer_state["sae"].encode,
        batches,
        cache,
        cfg.pooling,
        desc=f"encode {tag} (layer {layer})",
    )
    if distributed.ranks().is_main:
        storage.write_json_atomic(cache / "info.json", {"texts": len(texts), "layer": layer, "tag": tag})
    return vecs


def _features(
    pool_vecs, seed_vecs, selected: list[int], pool: list[dict], texts: list[str], top: int = 20, snippets: int = 5
) -> list[SharedLatent]:
    """SAE latents most shared by the seeds and the selection, with their top-activating pool snippets.

    A latent counts by how much more it fires on both the seeds and the selection than on the pool at large
    (min(seed mean, selected mean) − pool mean): latents that fire on everything explain nothing.
    """
    seed_mean = seed_vecs.mean(0)
    sel_mean = pool_vecs[selected].mean(0) if selected else torch.zeros_like(seed_mean)
    pool_mean = pool_vecs.mean(0)
    shared = torch.minimum(seed_mean, sel_mean) - pool_mean
    out = []
    for latent in torch.argsort(shared, descending=True)[:top].tolist():
        if float(shared[latent]) <= 0:
            break
        best = torch.argsort(pool_vecs[:, latent], descending=True)[:snippets].tolist()
        out.append(
            SharedLatent(
                latent=latent,
                lift=float(shared[latent]),
                seed_mean_activation=float(seed_mean[latent]),
                selected_mean_activation=float(sel_mean[latent]),
                pool_mean_activation=float(pool_mean[latent]),
                top_pool_snippets=[
                    PoolSnippet(
                        id=pool[i]["id"],
                        source=pool[i].get("source"),
                        activation=float(pool_vecs[i, latent]),
                        text=texts[i][:240],
                    )
                    for i in best
                ],
            )
        )
    return out


def run(cfg: CurateConfig, out: Path) -> Path:
    """Run the curate stage into `out`; returns `out` (skipped when already done with this config).

    Every input (seeds, pool, reference corpus, model and its layers) is read and checked before the stage
    folder is opened, so a refusal leaves nothing behind."""
    out = Path(out)
    if storage.is_done(out, cfg):
        return out
    storage.check_stage_folder(out, cfg, overwrite=cfg.overwrite)
    start = time.perf_counter()
    seeds = list(read_records(resolve_records_path(cfg.seeds, "seeds"), skip_bad_rows=cfg.skip_bad_rows))
    pool = _load_pool(cfg)
    handle = reference = None
    if cfg.method == "sae":  # rank 0 first: a model converted into the asset cache is converted once
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
    with contextlib.ExitStack() as held:  # rank 0 holds the stage lock; the other ranks write only cache shards
        stage = distributed.on_main(
            lambda: held.enter_context(storage.stage_folder(out, cfg, overwrite=cfg.overwrite)),
            f"opening {out}",
        )
        if stage is None:
            return out
        _curate_into(stage, cfg, seeds, pool, handle, reference, start)
    return out


def _curate_into(
    stage: Path,
    cfg: CurateConfig,
    seeds: list[dict],
    pool: list[dict],
    handle,
    reference: list[str] | None,
    start: float,
) -> None:
    """Score the pool and write the selection into the (locked) stage folder; DONE last.

    Several ranks: the SAE method's forwards are sharded over them (see `sharded`), every rank scores, rank 0
    alone writes; the others return once rank 0 has marked the stage done (or raise its error)."""
    m = cfg.top_m
    if m > len(pool) and cfg.method != "full" and distributed.ranks().is_main:
        warnings.warn(f"top_m = {m} is larger than the pool ({len(pool)} records); keeping all of them", stacklevel=2)
        m = len(pool)
    pool_texts = [record_text(r, cfg.encode_fields) for r in pool]
    seed_texts = [record_text(r, cfg.encode_fields) for r in seeds]
    timings: dict[str, float] = {}

    def score() -> _Scored:
        return _score(stage, cfg, handle, reference, pool_texts, seed_texts, timings)

    if cfg.method == "sae":  # every rank takes part (sharded forwards), rank 0 writes
        scored = score()
        distributed.on_main(
            lambda: _write_selection(stage, cfg, seeds, pool, pool_texts, scored, m, timings, start),
            "writing the selection on rank 0",
        )
    else:  # the other methods run on rank 0 alone; the others wait for its outcome
        distributed.on_main(
            lambda: _write_selection(stage, cfg, seeds, pool, pool_texts, score(), m, timings, start),
            f"{cfg.method} curation on rank 0",
        )


def _write_selection(stage, cfg, seeds, pool, pool_texts, scored, m, timings, start) -> None:
    chosen = _choose(cfg, scored, pool_texts, m)
    selection = _write_outputs(stage, pool, seeds, scored.scores, scored.nearest, chosen)
    if scored.features:
        CurateFeatures(
            layers={layer: _features(pv, sv, chosen, pool, pool_texts) for layer, (pv, sv) in scored.features.items()}
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
    storage.mark_done(stage, cfg, metrics.to_json())


@dataclass
class _Scored:
    """Scores of the pool records and their nearest seed (-1: none), with what the SAE method adds."""

    scores: torch.Tensor
    nearest: torch.Tensor
    sims: torch.Tensor | None = None
    """(layers, pool, seeds) cosine similarities, for per-seed and per-layer selection."""
    features: dict[str, tuple] = field(default_factory=dict)
    """Per layer: pooled SAE codes of the pool and of the seeds (for features.json)."""
    sae: SaeCurationMetrics | None = None


def _score(
    stage: Path,
    cfg: CurateConfig,
    handle,
    reference: list[str] | None,
    pool_texts: list[str],
    seed_texts: list[str],
    timings: dict[str, float],
) -> _Scored:
    """Score every pool record by the configured method."""
    n = len(pool_texts)
    if cfg.method == "sae":
        assert reference is not None, "the sae method reads the reference corpus before scoring"
        return _score_sae(stage, cfg, handle, reference, pool_texts, seed_texts, timings)
    if cfg.method == "embedding":
        t = time.perf_counter()
        vecs = minilm_embeddings(pool_texts + seed_texts)
        timings["embed"] = time.perf_counter() - t
        scores, nearest, sims = max_cosine(vecs[:n], vecs[n:])
        return _Scored(scores, nearest, sims.unsqueeze(0))
    if cfg.method == "dsir":
        # Scored against the seeds' n-gram distribution, not against one seed: no nearest seed, no per-seed sims.
        t = time.perf_counter()
        scores = dsir_scores(pool_texts, seed_texts, per_ngram=True)
        timings["dsir"] = time.perf_counter() - t
        return _Scored(scores, torch.full((n,), -1))
    if cfg.method == "random":
        return _Scored(random_scores(n, cfg.seed), torch.full((n,), -1))
    if cfg.method == "full":
        return _Scored(torch.ones(n), torch.full((n,), -1))
    raise CurateError(f"unknown method {cfg.method!r}")


def _score_sae(
    stage: Path,
    cfg: CurateConfig,
    handle,
    reference: list[str],
    pool_texts: list[str],
    seed_texts: list[str],
    timings: dict[str, float],
) -> _Scored:
    """Per hook layer: coordinates and SAE (cached), pooled codes of pool and seeds, max cosine to the seeds.

    Writes the SAEs (sae/layer<ℓ>/) and coords.safetensors. Several layers: a record's score is its best layer's
    score (selection lists are merged by union in `_choose`)."""
    layers = cfg.layers or [handle.adapter.num_layers // 2]
    model_fp = hashing.model_fingerprint(handle.source)
    coords_out, per_layer_scores, per_layer_sims, features, sae_metrics = {}, [], [], {}, {}
    for layer in layers:
        state = _train_layer_sae(cfg, handle, layer, reference, model_fp, pool_texts)
        t = time.perf_counter()
        if state["pool_acts"] is not None:  # encoded from the harvested activations: no second forward
            pool_vecs = pool_codes(state["pool_acts"], state["sae"].encode, cfg.pooling)
        else:
            pool_vecs = _sae_vectors(cfg, handle, state, layer, pool_texts, "pool")
        timings[f"encode_pool_layer{layer}"] = time.perf_counter() - t
        seed_vecs = _sae_vectors(cfg, handle, state, layer, seed_texts, "seeds")
        weighted = weight_latents(pool_vecs, seed_vecs, cfg.latent_weighting)
        scores, _, layer_sims = seed_cosine(*weighted, top_k=cfg.seed_top_k)
        per_layer_scores.append(scores)
        per_layer_sims.append(layer_sims)
        coords_out[f"layer{layer}.indices"] = state["indices"].contiguous()
        coords_out[f"layer{layer}.scores"] = state["scores"].float().contiguous()
        if distributed.ranks().is_main:
            save_sae(
                state["sae"],
                stage / "sae" / f"layer{layer}",
                coords=state["indices"],
                layer=layer,
                model=handle.source,
                extra={"finescope_curves": state["curves"], "finescope_metrics": state["quality"]},
            )
        sae_metrics[f"layer{layer}"] = SaeLayerMetrics.from_json(
            {**state["quality"], "curves": state["curves"], "cache": str(state["root"])}, source="SAE quality"
        )
        timings.update({f"{k}_layer{layer}": v for k, v in state["timings"].items()})
        width = state["sae"].d_sae
        features[f"layer{layer}"] = (pool_vecs[:, :width], seed_vecs[:, :width])  # mean+max: the mean half
    if distributed.ranks().is_main:
        storage.write_atomic(stage / "coords.safetensors", save(coords_out))
    scores = torch.stack(per_layer_scores).max(0).values
    best_layer = torch.stack(per_layer_scores).argmax(0)
    sims = torch.stack(per_layer_sims)  # (layers, pool, seeds)
    nearest = sims[best_layer, torch.arange(len(pool_texts))].argmax(-1)
    truncated = TextBatches(handle.tokenizer, pool_texts, cfg.max_length).count_truncated()
    info = SaeCurationMetrics(
        layers=layers,
        reference_texts=len(reference),
        pool_truncated=truncated,
        max_length=cfg.max_length,
        sae=sae_metrics,
    )
    return _Scored(scores, nearest, sims, features, info)


def _choose(cfg: CurateConfig, scored: _Scored, pool_texts: list[str], m: int) -> list[int]:
    """Indices of the selected records, best first: global top-M, per seed, or the union over layers."""
    scores, sims = scored.scores, scored.sims
    if cfg.method == "full":
        return select_global(scores, pool_texts, len(pool_texts))
    if cfg.selection == "per_seed" and sims is not None:
        return sorted(
            {i for layer_sims in sims for i in select_per_seed(layer_sims, scores, pool_texts, m)},
            key=lambda i: (-float(scores[i]), i),
        )
    if sims is not None and sims.shape[0] > 1:
        return sorted(
            {i for s in sims for i in select_global(s.max(-1).values, pool_texts, m)},
            key=lambda i: (-float(scores[i]), i),
        )
    return select_global(scores, pool_texts, m)


def _write_outputs(stage: Path, pool, seeds, scores, nearest, chosen) -> dict:
    """Write selected.jsonl and scores.parquet; return the selection statistics of metrics.json."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rank = {i: r for r, i in enumerate(chosen, 1)}
    seed_ids = [s["id"] for s in seeds]

    def seed_of(i: int):
        j = int(nearest[i])
        return seed_ids[j] if j >= 0 else None

    storage.write_jsonl_atomic(
        stage / "selected.jsonl",
        ({**pool[i], "score": float(scores[i]), "rank": rank[i], "nearest_seed": seed_of(i)} for i in chosen),
    )
    table = pa.table(
        {
            "id": [r["id"] for r in pool],
            "source": [r.get("source") for r in pool],
            "score": [float(s) for s in scores],
            "nearest_seed": [seed_of(i) for i in range(len(pool))],
            "selected": [i in rank for i in range(len(pool))],
            "rank": [rank.get(i) for i in range(len(pool))],
        }
    )
    tmp = stage / ".scores.parquet.tmp"
    pq.write_table(table, tmp)
    tmp.replace(stage / "scores.parquet")
    sel = torch.tensor([float(scores[i]) for i in chosen]) if chosen else torch.zeros(0)
    q = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    names = ["min", "q25", "median", "q75", "max"]
    return {
        "selected": len(chosen),
        "score_quantiles_pool": dict(zip(names, torch.quantile(scores.float(), q).tolist())),
        "score_quantiles_selected": dict(zip(names, torch.quantile(sel, q).tolist())) if len(sel) else {},
        "selected_sources": _count(pool[i].get("source") for i in chosen),
    }


def _count(values) -> dict:
    out: dict = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))
