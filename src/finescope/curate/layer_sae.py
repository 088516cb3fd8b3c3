"""Per-layer SAE setup of the SAE method: coordinates, SAE (trained or from the cache), pooled codes.

    state = train_layer_sae(cfg, handle, layer, reference, model_fp, pool)   # a LayerSae
    shards, paths = pool_code_shards(cfg, handle, state, layer, pool)

Per hook layer ℓ: score coordinates on reference texts (selector) → keep K → harvest those coordinates from the
reference corpus (truncated forward, cached shards) → train the SAE → encode pool and seeds (pooled SAE codes,
cached). Cache keys: cache.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import cache_entry, distributed, hashing, storage
from ..config import CurateConfig
from .activations import (
    RecordActivations,
    TextBatches,
    encode_pooled,
    encode_pooled_stream,
    harvest_coords,
    harvest_records,
    pool_codes_by_shard,
)
from .cache import cache_root as _cache_root
from .cache import coords_key as _coords_key
from .cache import pool_acts_key as _pool_acts_key
from .cache import sae_key as _sae_key
from .cache import shard_texts as _shard_texts
from .coords import coordinate_scores, top_k_coords
from .pool import Pool
from .sae import SparseAutoencoder, check_sae, evaluate_sae, load_sae, save_sae, train_sae


def _checked(path: Path) -> dict[str, torch.Tensor]:
    """A cache shard verified when this run decided to reuse or wrote it (`cache_entry`)."""
    return cache_entry.load_or_raise(path, cache_entry.shard_key(path))


@dataclass
class LayerSae:
    """One hook layer's coordinates and SAE, and what it took to get them."""

    key: str
    """Cache key of the SAE (`cache.sae_key`)."""
    root: Path
    """Its cache folder (sae/, acts/)."""
    scores: torch.Tensor
    """Coordinate scores of every hidden dimension."""
    indices: torch.Tensor
    """The K kept coordinates."""
    sae: SparseAutoencoder
    curves: dict
    """Training curves (saved beside the SAE)."""
    quality: dict
    """Reconstruction quality and token counts (SaeLayerMetrics' fields)."""
    timings: dict[str, float]
    pool_acts: RecordActivations | None
    """The pool's token activations (sae_data = pool+reference): the pool is encoded from them, no second forward."""


def hook_layer(depth: float, blocks: int) -> int:
    """The block at `depth` (a fraction of `blocks`): int(depth × blocks), within 0..blocks-1 (0.5: blocks // 2)."""
    return min(blocks - 1, max(0, int(depth * blocks + 1e-9)))


def train_layer_sae(cfg: CurateConfig, handle, layer: int, reference: list[str], model_fp: str, pool: Pool) -> LayerSae:
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
    return LayerSae(key, root, scores, idx, sae, curves, quality, timings, pool_acts)


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


def sae_vectors(cfg, handle, layer_state: LayerSae, layer: int, texts: list[str], tag: str) -> torch.Tensor:
    batches = TextBatches(handle.tokenizer, texts, cfg.max_length, cfg.batch_size)
    key = hashing.digest_parts(
        "enc", layer_state.key, layer, cfg.pooling, cfg.max_length, cfg.batch_size, hashing.digest_texts(texts)
    )
    cache = _cache_root() / f"enc-{key}"
    vecs = encode_pooled(
        handle,
        layer,
        layer_state.indices,
        layer_state.sae.encode,
        batches,
        cache,
        cfg.pooling,
        desc=f"encode {tag} (layer {layer})",
    )
    if distributed.ranks().is_main:
        storage.write_json_atomic(cache / "info.json", {"texts": len(texts), "layer": layer, "tag": tag})
    return vecs


def pool_code_shards(
    cfg: CurateConfig, handle, state: LayerSae, layer: int, pool: Pool
) -> tuple[Callable[[], Iterator[torch.Tensor]], list[Path]]:
    """The pool's pooled SAE codes, one shard at a time (a function that starts a new pass): encoded from the
    harvested activations (sae_data = pool+reference) or by a forward per record, cached as shards. Also the
    shard files, one per `_shard_texts` chunk of the pool (they record its truncation count)."""
    acts = state.pool_acts
    if acts is not None:  # no second forward
        return lambda: pool_codes_by_shard(acts, state.sae.encode, cfg.pooling), acts.paths
    key = hashing.digest_parts(
        "enc", "bylen", state.key, layer, cfg.pooling, cfg.max_length, cfg.batch_size, pool.digest
    )
    cache = _cache_root() / f"enc-{key}"
    paths = encode_pooled_stream(
        handle,
        layer,
        state.indices,
        state.sae.encode,
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
