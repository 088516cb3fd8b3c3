"""`method: sae` (the paper's): SAE codes of the pool against the seeds' (curate/layer_sae.py sets up each layer)."""

from __future__ import annotations

import time

import numpy as np
import torch
from safetensors.torch import save

from ... import distributed, hashing, storage
from ...artifacts import SaeCurationMetrics, SaeLayerMetrics
from ..activations import count_truncated, shard_truncated
from ..cache import shard_texts
from ..features import LayerCodes
from ..layer_sae import hook_layer, pool_code_shards, sae_vectors, train_layer_sae
from ..sae import save_sae
from ..scored import Scored, SelectionInputs
from ..select import LatentStats, dedupe_key, seed_cosine


def score(inputs: SelectionInputs) -> Scored:
    """Per hook layer: coordinates and SAE (cached), pooled codes of pool (shards on disk) and seeds, latent
    statistics over the pool, then each shard's top-k seed cosine.

    Writes the SAEs (sae/layer<ℓ>/) and coords.safetensors. Several layers: a record's score is its best layer's
    score (selection lists are merged by union in `_choose`)."""
    stage, cfg, handle, reference, pool = inputs.stage, inputs.cfg, inputs.handle, inputs.reference, inputs.pool
    seed_texts, timings = inputs.seed_texts, inputs.timings
    assert reference is not None and handle is not None, "the sae method loads the model and reference corpus first"
    layers = cfg.layers or [hook_layer(cfg.layer_depth, handle.adapter.num_layers)]
    model_fp = hashing.model_fingerprint(handle.source)
    coords_out, per_layer_scores, per_layer_sims, features, sae_metrics = {}, [], [], {}, {}
    for layer in layers:
        state = train_layer_sae(cfg, handle, layer, reference, model_fp, pool)
        t = time.perf_counter()
        shards, shard_paths = pool_code_shards(cfg, handle, state, layer, pool)
        stats = LatentStats()
        for codes in shards():
            stats.add(codes)
        timings[f"encode_pool_layer{layer}"] = time.perf_counter() - t
        seed_vecs = sae_vectors(cfg, handle, state, layer, seed_texts, "seeds")
        seeds_w = stats.transform(seed_vecs, cfg.latent_weighting)
        parts = [
            seed_cosine(stats.transform(codes, cfg.latent_weighting), seeds_w, cfg.seed_top_k) for codes in shards()
        ]
        per_layer_scores.append(torch.cat([p[0] for p in parts]))
        per_layer_sims.append(torch.cat([p[2] for p in parts]))
        coords_out[f"layer{layer}.indices"] = state.indices.contiguous()
        coords_out[f"layer{layer}.scores"] = state.scores.float().contiguous()
        if distributed.ranks().is_main:
            save_sae(
                state.sae,
                stage / "sae" / f"layer{layer}",
                coords=state.indices,
                layer=layer,
                model=handle.source,
                extra={"finescope_curves": state.curves, "finescope_metrics": state.quality},
            )
        sae_metrics[f"layer{layer}"] = SaeLayerMetrics.from_json(
            {**state.quality, "curves": state.curves, "cache": str(state.root)}, source="SAE quality"
        )
        timings.update({f"{k}_layer{layer}": v for k, v in state.timings.items()})
        features[f"layer{layer}"] = LayerCodes(shards, stats, seed_vecs, state.sae.d_sae)
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
    for path, texts in zip(shard_paths, pool.text_chunks(shard_texts(cfg)), strict=True):
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
    return Scored(scores, nearest, keys, sims, features, info)
