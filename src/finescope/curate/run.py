"""`finescope curate`: select a domain's records from a pool with SAE codes (stage 1, docs/method.md §2).

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save

from .. import FinescopeError, assets, cache_entry, distributed, hashing, storage
from ..artifacts import CurateFeatures, CurateMetrics, PoolSnippet, SaeCurationMetrics, SaeLayerMetrics, SharedLatent
from ..config import CurateConfig
from ..corpora import default_reference_texts, resolve_records_path
from ..data import read_records, record_text
from ..modeling import load
from .activations import (
    SHARD_BATCHES,
    RecordActivations,
    TextBatches,
    count_truncated,
    encode_pooled,
    encode_pooled_stream,
    harvest_coords,
    harvest_records,
    pool_codes_by_shard,
    shard_truncated,
    sharded_stream,
)
from .baselines import MiniLM, random_scores, reciprocal_rank_fusion
from .coords import coordinate_scores, top_k_coords
from .dsir import dsir_scores
from .pool import Pool
from .sae import check_sae, evaluate_sae, load_sae, save_sae, train_sae
from .select import Keys, LatentStats, dedupe_key, max_cosine, seed_cosine, select_global, select_per_seed

# Bump when the SAE's definition changes, so cached SAEs (and encodings made with them) are not reused.
SAE_VERSION = 4  # 3: standardisation folded into the weights (SAELens layout); 4: reference rows batched by length
# Per selector, bumped when its score definition changes, so cached coordinates are not reused
# (gradient 2: Hutchinson estimate, root-mean-square over texts, instead of the exact per-coordinate backward).
COORDS_VERSION = {"gradient": 2}


class CurateError(FinescopeError):
    pass


def _cache_root() -> Path:
    return assets.home() / "cache" / "curate"


def _checked(path: Path) -> dict[str, torch.Tensor]:
    """A cache shard verified when this run decided to reuse or wrote it (`cache_entry`)."""
    return cache_entry.load_or_raise(path, cache_entry.shard_key(path))


def _open_pool(cfg: CurateConfig) -> Pool:
    """The pool (validated in one streaming pass; sampled when pool_sample is set), never held whole."""
    return Pool.open(
        resolve_records_path(cfg.pool, "pool"),
        fields=cfg.encode_fields,
        sample=cfg.pool_sample,
        seed=cfg.seed,
        skip_bad_rows=cfg.skip_bad_rows,
    )


def _shard_texts(cfg: CurateConfig) -> int:
    """Texts per cache shard of the pool (the shards `encode_pooled` writes for a text list)."""
    return SHARD_BATCHES * cfg.batch_size


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


def _pool_acts_key(cfg: CurateConfig, coords_key: str, layer: int, pool: Pool) -> str:
    """Cache key of the pool's token activations: the coordinates (model and layer included), the texts and how
    they are tokenised and batched."""
    return hashing.digest_parts("pool-acts", "bylen", coords_key, layer, cfg.max_length, cfg.batch_size, pool.digest)


def _train_layer_sae(cfg: CurateConfig, handle, layer: int, reference: list[str], model_fp: str, pool: Pool):
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
        pool_key = _pool_acts_key(cfg, coords_key, layer, pool)
        cache = _cache_root() / f"pool-acts-{pool_key}"
        t = time.perf_counter()
        pool_acts = harvest_records(
            handle,
            layer,
            idx,
            pool.text_chunks(_shard_texts(cfg)),
            cache,
            max_length=cfg.max_length,
            batch_size=cfg.batch_size,
            desc=f"harvest pool (layer {layer})",
            total=len(pool),
        )
        if distributed.ranks().is_main:
            storage.write_json_atomic(
                cache / "info.json", {"texts": len(pool), "layer": layer, "tokens": pool_acts.tokens}
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
    saved = cache_entry.load(coords_file, cache_entry.shard_key(coords_file))
    if saved is not None:
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
    saved = {"scores": scores.float().contiguous(), "indices": idx.contiguous()}
    storage.write_atomic(coords_file, cache_entry.dump(saved, cache_entry.shard_key(coords_file)))
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
        sae, meta = load_sae(sae_dir, checked=True)
        return sae, meta["finescope_curves"], meta["finescope_metrics"]

    if distributed.on_main(lambda: check_sae(sae_dir), f"SAE cache lookup (layer {layer})"):
        return cached()
    t = time.perf_counter()
    harvest = harvest_coords(
        handle,
        {layer: idx},
        TextBatches(handle.tokenizer, reference, cfg.max_length, cfg.batch_size),
        root / "acts",
    )
    timings["harvest_s"] = time.perf_counter() - t

    def fit():
        if (sae_dir / "cfg.json").is_file():  # the other ranks, once rank 0 has saved it
            return cached()
        acts = harvest.layer(layer)  # read on the training rank only
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
            checked=True,
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


def _pool_code_shards(
    cfg: CurateConfig, handle, state, layer: int, pool: Pool
) -> tuple[Callable[[], Iterator[torch.Tensor]], list[Path]]:
    """The pool's pooled SAE codes, one shard at a time (a function that starts a new pass): encoded from the
    harvested activations (sae_data = pool+reference) or by a forward per record, cached as shards. Also the
    shard files, one per `_shard_texts` chunk of the pool (they record its truncation count)."""
    acts = state["pool_acts"]
    if acts is not None:  # no second forward
        return lambda: pool_codes_by_shard(acts, state["sae"].encode, cfg.pooling), acts.paths
    key = hashing.digest_parts(
        "enc", "bylen", state["key"], layer, cfg.pooling, cfg.max_length, cfg.batch_size, pool.digest
    )
    cache = _cache_root() / f"enc-{key}"
    paths = encode_pooled_stream(
        handle,
        layer,
        state["indices"],
        state["sae"].encode,
        pool.text_chunks(_shard_texts(cfg)),
        cache,
        max_length=cfg.max_length,
        batch_size=cfg.batch_size,
        pooling=cfg.pooling,
        desc=f"encode pool (layer {layer})",
        total=len(pool),
    )
    if distributed.ranks().is_main:
        storage.write_json_atomic(cache / "info.json", {"texts": len(pool), "layer": layer, "tag": "pool"})
    return lambda: (_checked(p)["pooled"] for p in paths), paths


@dataclass
class _LayerCodes:
    """What features.json needs of one layer: a pass over the pool's codes, their statistics, the seeds' codes."""

    shards: Callable[[], Iterator[torch.Tensor]]
    stats: LatentStats
    seeds: torch.Tensor
    width: int
    """Latents of the SAE (mean+max pooling: the mean half is read)."""


def _features(
    codes: _LayerCodes, selected: list[int], pool: Pool, top: int = 20, snippets: int = 5
) -> list[SharedLatent]:
    """SAE latents most shared by the seeds and the selection, with their top-activating pool snippets.

    A latent counts by how much more it fires on both the seeds and the selection than on the pool at large
    (min(seed mean, selected mean) − pool mean): latents that fire on everything explain nothing. Two passes
    over the pool's code shards (selection mean, then each top latent's best records), one over the pool for the
    snippets' texts.
    """
    w = codes.width
    assert codes.stats.total is not None, "the pool has records"
    seed_mean = codes.seeds[:, :w].float().mean(0)
    pool_mean = (codes.stats.total[:w] / max(codes.stats.n, 1)).float()
    chosen = set(selected)
    sel_sum, offset = torch.zeros(w, dtype=torch.float64), 0
    for shard in codes.shards():
        rows = [i - offset for i in range(offset, offset + shard.shape[0]) if i in chosen]
        if rows:
            sel_sum += shard[rows, :w].double().sum(0)
        offset += shard.shape[0]
    sel_mean = (sel_sum / len(selected)).float() if selected else torch.zeros_like(seed_mean)
    shared = torch.minimum(seed_mean, sel_mean) - pool_mean
    latents = [j for j in torch.argsort(shared, descending=True)[:top].tolist() if float(shared[j]) > 0]
    if not latents:
        return []
    best_vals = torch.full((snippets, len(latents)), float("-inf"))
    best_idx = torch.full((snippets, len(latents)), -1, dtype=torch.long)
    offset = 0
    for shard in codes.shards():  # running top-`snippets` records of each latent (earlier records win ties)
        vals = torch.cat([best_vals, shard[:, latents].float()])
        positions = torch.arange(offset, offset + shard.shape[0]).unsqueeze(1).expand(-1, len(latents))
        idx = torch.cat([best_idx, positions])
        order = torch.sort(vals, dim=0, descending=True, stable=True).indices[:snippets]
        best_vals, best_idx = vals.gather(0, order), idx.gather(0, order)
        offset += shard.shape[0]
    records = pool.pick({int(i) for i in best_idx.flatten() if i >= 0})
    out = []
    for col, latent in enumerate(latents):
        picks = [(int(best_idx[r, col]), float(best_vals[r, col])) for r in range(snippets) if best_idx[r, col] >= 0]
        out.append(
            SharedLatent(
                latent=latent,
                lift=float(shared[latent]),
                seed_mean_activation=float(seed_mean[latent]),
                selected_mean_activation=float(sel_mean[latent]),
                pool_mean_activation=float(pool_mean[latent]),
                top_pool_snippets=[
                    PoolSnippet(
                        id=records[i]["id"],
                        source=records[i].get("source"),
                        activation=value,
                        text=record_text(records[i], pool.fields)[:240],
                    )
                    for i, value in picks
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
    pool = _open_pool(cfg)
    handle = reference = None
    if cfg.method in ("sae", "hybrid"):  # rank 0 first: a model converted into the asset cache is converted once
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
    if m > len(pool) and cfg.method != "full" and distributed.ranks().is_main:
        warnings.warn(f"top_m = {m} is larger than the pool ({len(pool)} records); keeping all of them", stacklevel=2)
        m = len(pool)
    m = min(m, len(pool))
    seed_texts = [record_text(r, cfg.encode_fields) for r in seeds]
    timings: dict[str, float] = {}

    # The sentence embeddings (embedding, hybrid) are sharded over every rank like the SAE method's forwards.
    embedded = _embed_pool(cfg, pool, seed_texts, timings) if cfg.method in ("embedding", "hybrid") else None
    if cfg.method in ("sae", "hybrid"):  # every rank takes part (sharded forwards), rank 0 writes
        assert reference is not None, "the sae method reads the reference corpus before scoring"
        scored = _score_sae(stage, cfg, handle, reference, pool, seed_texts, timings)

        def write() -> None:
            final = _fuse_with_embedding(scored, embedded) if embedded is not None else scored
            _write_selection(stage, cfg, seeds, pool, final, m, timings, start)

        distributed.on_main(write, "writing the selection on rank 0")
    else:  # scoring (and the other methods whole) on rank 0; the others wait for its outcome

        def score_and_write() -> None:
            scored = _score(cfg, pool, seed_texts, timings, embedded)
            _write_selection(stage, cfg, seeds, pool, scored, m, timings, start)

        distributed.on_main(score_and_write, f"{cfg.method} curation on rank 0")


def _write_selection(stage, cfg, seeds, pool: Pool, scored: _Scored, m: int, timings, start) -> None:
    chosen = _choose(cfg, scored, m)
    selection = _write_outputs(stage, pool, seeds, scored.scores, scored.nearest, chosen)
    if scored.features:
        CurateFeatures(
            layers={layer: _features(codes, chosen, pool) for layer, codes in scored.features.items()}
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
    keys: Keys
    """Per record, what makes it an exact duplicate of another (its text, or `dedupe_key` of it: an S16 array)."""
    sims: torch.Tensor | None = None
    """(layers, pool, seeds) cosine similarities, for per-seed and per-layer selection."""
    features: dict[str, _LayerCodes] = field(default_factory=dict)
    """Per layer: what features.json reads (a pass over the pool's codes, their statistics, the seeds' codes)."""
    sae: SaeCurationMetrics | None = None


def _score(
    cfg: CurateConfig,
    pool: Pool,
    seed_texts: list[str],
    timings: dict[str, float],
    embedded: _PoolEmbeddings | None = None,
) -> _Scored:
    """Score every pool record by a baseline method, streaming the pool (chunks of texts, never all of them);
    `embedded`: the embedding method's vectors, computed beforehand by every rank."""
    n = len(pool)
    if cfg.method == "embedding":
        assert embedded is not None, "the embedding method's vectors are computed before scoring (_embed_pool)"
        scores, nearest, sims = embedded.scores()
        return _Scored(scores, nearest, pool_keys(pool), sims.unsqueeze(0))
    if cfg.method == "dsir":
        # Scored against the seeds' n-gram distribution, not against one seed: no nearest seed, no per-seed sims.
        t = time.perf_counter()
        scores = dsir_scores(pool.texts, seed_texts, per_ngram=True)  # two passes: fit, then score
        timings["dsir"] = time.perf_counter() - t
        return _Scored(scores, torch.full((n,), -1), pool_keys(pool))
    if cfg.method == "random":
        return _Scored(random_scores(n, cfg.seed), torch.full((n,), -1), pool_keys(pool))
    if cfg.method == "full":
        return _Scored(torch.ones(n), torch.full((n,), -1), pool_keys(pool))
    raise CurateError(f"unknown method {cfg.method!r}")


def pool_keys(pool: Pool) -> np.ndarray:
    """Every record's `dedupe_key`, in pool order: an S16 array (16 bytes per record), from one pass."""
    chunks = [np.array([dedupe_key(t) for t in texts], dtype="S16") for texts in pool.text_chunks(4096)]
    return np.concatenate(chunks) if chunks else np.array([], dtype="S16")


EMBED_SHARD_TEXTS = 4096
"""Pool texts per cache shard of the embedding baseline's vectors."""


@dataclass
class _PoolEmbeddings:
    """The pool's sentence embeddings as shards on disk ("emb": (texts, 384) float32, in pool order) and the
    seeds' embeddings."""

    paths: list[Path]
    seeds: torch.Tensor

    def scores(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`max_cosine` of the pool against the seeds (best cosine, its seed, every seed's), a shard at a time."""
        parts = [max_cosine(_checked(p)["emb"], self.seeds) for p in self.paths]
        if not parts:
            return torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.zeros(0, len(self.seeds))
        return tuple(torch.cat([p[k] for p in parts]) for k in range(3))  # type: ignore[return-value]


def _embed_device(cfg: CurateConfig) -> str:
    """The sentence encoder's device: --device, or (unset / auto, since it is small) this rank's GPU if any."""
    if cfg.device not in (None, "auto"):
        return cfg.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _embed_pool(cfg: CurateConfig, pool: Pool, seed_texts: list[str], timings: dict[str, float]) -> _PoolEmbeddings:
    """all-MiniLM-L6-v2 embeddings of the pool, loaded once, shard s (4,096 texts) on rank s mod N, cached (a
    killed run, or another seed set over the same pool, reuses finished shards); and of the seeds."""
    t = time.perf_counter()
    encoder = distributed.main_first(lambda: MiniLM(device=_embed_device(cfg)), "loading all-MiniLM-L6-v2")
    key = hashing.digest_parts("minilm", hashing.model_fingerprint(encoder.path), 256, pool.digest)
    cache = _cache_root() / f"emb-{key}"
    paths = sharded_stream(
        cache,
        pool.text_chunks(EMBED_SHARD_TEXTS),
        lambda texts: {"emb": encoder.embed(texts)},
        "embed pool (all-MiniLM-L6-v2)",
        len(pool),
    )
    if distributed.ranks().is_main:
        storage.write_json_atomic(cache / "info.json", {"texts": len(pool), "model": encoder.path, "tag": "minilm"})
    embedded = _PoolEmbeddings(paths, encoder.embed(seed_texts))
    timings["embed"] = time.perf_counter() - t
    return embedded


def _fuse_with_embedding(scored: _Scored, embedded: _PoolEmbeddings) -> _Scored:
    """`--method hybrid`: reciprocal-rank fusion of the SAE ranking and the embedding-kNN ranking."""
    fused = reciprocal_rank_fusion(scored.scores, embedded.scores()[0])
    return _Scored(fused, scored.nearest, scored.keys, None, scored.features, scored.sae)


def hook_layer(depth: float, blocks: int) -> int:
    """The block at `depth` (a fraction of `blocks`): int(depth × blocks), within 0..blocks-1 (0.5: blocks // 2)."""
    return min(blocks - 1, max(0, int(depth * blocks + 1e-9)))


def _score_sae(
    stage: Path,
    cfg: CurateConfig,
    handle,
    reference: list[str],
    pool: Pool,
    seed_texts: list[str],
    timings: dict[str, float],
) -> _Scored:
    """Per hook layer: coordinates and SAE (cached), pooled codes of pool (shards on disk) and seeds, latent
    statistics over the pool, then each shard's top-k seed cosine.

    Writes the SAEs (sae/layer<ℓ>/) and coords.safetensors. Several layers: a record's score is its best layer's
    score (selection lists are merged by union in `_choose`)."""
    layers = cfg.layers or [hook_layer(cfg.layer_depth, handle.adapter.num_layers)]
    model_fp = hashing.model_fingerprint(handle.source)
    coords_out, per_layer_scores, per_layer_sims, features, sae_metrics = {}, [], [], {}, {}
    for layer in layers:
        state = _train_layer_sae(cfg, handle, layer, reference, model_fp, pool)
        t = time.perf_counter()
        shards, shard_paths = _pool_code_shards(cfg, handle, state, layer, pool)
        stats = LatentStats()
        for codes in shards():
            stats.add(codes)
        timings[f"encode_pool_layer{layer}"] = time.perf_counter() - t
        seed_vecs = _sae_vectors(cfg, handle, state, layer, seed_texts, "seeds")
        seeds_w = stats.transform(seed_vecs, cfg.latent_weighting)
        parts = [
            seed_cosine(stats.transform(codes, cfg.latent_weighting), seeds_w, cfg.seed_top_k) for codes in shards()
        ]
        per_layer_scores.append(torch.cat([p[0] for p in parts]))
        per_layer_sims.append(torch.cat([p[2] for p in parts]))
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
        features[f"layer{layer}"] = _LayerCodes(shards, stats, seed_vecs, state["sae"].d_sae)
    if distributed.ranks().is_main:
        storage.write_atomic(stage / "coords.safetensors", save(coords_out))
    if len(per_layer_scores) == 1:  # no stacked copies of the (pool, seeds) similarities
        scores, best_layer = per_layer_scores[0], torch.zeros(len(pool), dtype=torch.long)
        sims = per_layer_sims.pop().unsqueeze(0)
    else:
        scores = torch.stack(per_layer_scores).max(0).values
        best_layer = torch.stack(per_layer_scores).argmax(0)
        sims = torch.stack(per_layer_sims)  # (layers, pool, seeds)
    del per_layer_sims
    nearest = sims[0].argmax(-1) if len(sims) == 1 else sims[best_layer, torch.arange(len(pool))].argmax(-1)
    truncated, key_chunks = 0, []
    # One more pass over the pool for the dedupe digests; the truncation count is what the (last layer's) shards
    # recorded when they tokenised their texts: only shards of an older cache, without it, are tokenised again.
    for path, texts in zip(shard_paths, pool.text_chunks(_shard_texts(cfg)), strict=True):
        recorded = shard_truncated(path)
        truncated += recorded if recorded is not None else count_truncated(handle.tokenizer, texts, cfg.max_length)
        key_chunks.append(np.array([dedupe_key(t) for t in texts], dtype="S16"))
    keys = np.concatenate(key_chunks) if key_chunks else np.array([], dtype="S16")  # 16 B per record, as `pool_keys`
    info = SaeCurationMetrics(
        layers=layers,
        reference_texts=len(reference),
        pool_truncated=truncated,
        max_length=cfg.max_length,
        sae=sae_metrics,
    )
    return _Scored(scores, nearest, keys, sims, features, info)


def _choose(cfg: CurateConfig, scored: _Scored, m: int) -> list[int]:
    """Indices of the selected records, best first: global top-M, per seed, or the union over layers."""
    scores, sims, keys = scored.scores, scored.sims, scored.keys
    if cfg.method == "full":
        return select_global(scores, keys, len(keys))
    if cfg.selection == "per_seed" and sims is not None:
        return sorted(
            {i for layer_sims in sims for i in select_per_seed(layer_sims, scores, keys, m)},
            key=lambda i: (-float(scores[i]), i),
        )
    if sims is not None and sims.shape[0] > 1:
        return sorted(
            {i for s in sims for i in select_global(s.max(-1).values, keys, m)},
            key=lambda i: (-float(scores[i]), i),
        )
    return select_global(scores, keys, m)


def _write_outputs(stage: Path, pool: Pool, seeds, scores, nearest, chosen) -> dict:
    """Write selected.jsonl and scores.parquet (in chunks, from a pass over the pool); return the selection
    statistics of metrics.json."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rank = {i: r for r, i in enumerate(chosen, 1)}
    seed_ids = [s["id"] for s in seeds]

    def seed_of(i: int):
        j = int(nearest[i])
        return seed_ids[j] if j >= 0 else None

    picked = pool.pick(rank)
    storage.write_jsonl_atomic(
        stage / "selected.jsonl",
        ({**picked[i], "score": float(scores[i]), "rank": rank[i], "nearest_seed": seed_of(i)} for i in chosen),
    )
    schema = pa.schema(
        [
            ("id", pa.string()),
            ("source", pa.string()),
            ("score", pa.float64()),
            ("nearest_seed", pa.string()),
            ("selected", pa.bool_()),
            ("rank", pa.int64()),
        ]
    )
    tmp = stage / ".scores.parquet.tmp"
    offset = 0
    with pq.ParquetWriter(tmp, schema) as writer:
        for chunk in pool.chunks(8192):  # records with their texts: a chunk's worth in memory at a time
            idx = range(offset, offset + len(chunk))
            near = nearest[offset : offset + len(chunk)].tolist()
            writer.write_table(
                pa.table(
                    {
                        "id": [r["id"] for r in chunk],
                        "source": [_source(r) for r in chunk],
                        "score": scores[offset : offset + len(chunk)].double().tolist(),
                        "nearest_seed": [seed_ids[j] if j >= 0 else None for j in near],
                        "selected": [i in rank for i in idx],
                        "rank": [rank.get(i) for i in idx],
                    },
                    schema=schema,
                )
            )
            offset += len(chunk)
    tmp.replace(stage / "scores.parquet")
    sel = torch.tensor([float(scores[i]) for i in chosen]) if chosen else torch.zeros(0)
    q = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    names = ["min", "q25", "median", "q75", "max"]
    return {
        "selected": len(chosen),
        "score_quantiles_pool": dict(zip(names, torch.quantile(scores.float(), q).tolist())),
        "score_quantiles_selected": dict(zip(names, torch.quantile(sel, q).tolist())) if len(sel) else {},
        "selected_sources": _count(picked[i].get("source") for i in chosen),
    }


def _source(rec: dict) -> str | None:
    source = rec.get("source")
    return None if source is None else str(source)


def _count(values) -> dict:
    out: dict = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))
