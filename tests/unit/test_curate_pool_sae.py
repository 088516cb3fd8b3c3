"""SAE trained on the pool's own activations (sae_data = pool+reference): the harvest cache, its reuse and
invalidation, and pooled codes from the cache equal to those of a second forward."""

from __future__ import annotations

import json

import pytest
import torch

from finescope.curate import layer_sae
from finescope.curate import run as curate_run
from finescope.curate.activations import TextBatches, encode_pooled, harvest_records, pool_codes
from finescope.curate.sae import train_sae
from finescope.modeling import load
from test_curate import _cfg


@pytest.mark.parametrize("pooling", ["mean", "max", "mean+max"])
def test_codes_from_the_cache_equal_codes_from_a_forward(tiny_model_dirs, tmp_path, pooling):
    h = load(tiny_model_dirs["llama"], device="cpu")
    texts = ["Tom has 3 apples and buys 4 more.", "Shares rose 4% on Monday.", "", "x " * 40, "A cat."]
    idx = torch.tensor([0, 3, 5, 7, 11, 2])
    batches = TextBatches(h.tokenizer, texts, max_length=16, batch_size=2)
    acts = harvest_records(h, 1, idx, [texts], tmp_path / "acts", max_length=16, batch_size=2)
    assert acts.records == len(texts)
    assert [int(x) for s in acts.shards for x in s["lengths"]][2] == 0  # the empty text keeps its row
    sae, _ = train_sae(acts.all_tokens(), d_sae=24, k=4, steps=20, batch_size=16)
    cached = pool_codes(acts, sae.encode, pooling, chunk=7)  # a chunk smaller than a shard: split inside records
    direct = encode_pooled(h, 1, idx, sae.encode, batches, tmp_path / "enc", pooling)
    assert cached.shape == direct.shape
    assert torch.allclose(cached, direct, atol=1e-5)
    assert torch.equal(cached[2], torch.zeros_like(cached[2]))


def test_pool_sae_trains_on_pool_tokens_and_reuses_the_cache(tiny_model_dirs, tmp_path, cache_home, monkeypatch):
    cfg = _cfg(tiny_model_dirs, tmp_path, sae_data="pool+reference")
    out = curate_run.run(cfg, tmp_path / "curate")
    metrics = json.loads((out / "metrics.json").read_text())
    sae = metrics["sae"]["layer2"]
    assert sae["pool_tokens"] > 0 and sae["reference_tokens"] > 0
    assert sae["tokens"] == sae["pool_tokens"] + sae["reference_tokens"]
    assert "harvest_pool_s_layer2" in metrics["timings_s"]
    caches = sorted(cache_home.glob("cache/curate/pool-acts-*"))
    assert len(caches) == 1
    info = json.loads((caches[0] / "info.json").read_text())
    assert info["texts"] == 41 and info["tokens"] == sae["pool_tokens"]

    # The reference-only SAE is another SAE (its cache key differs) and selects from the same stage contract.
    ref = curate_run.run(_cfg(tiny_model_dirs, tmp_path), tmp_path / "curate-ref")
    ref_sae = json.loads((ref / "metrics.json").read_text())["sae"]["layer2"]
    assert ref_sae["cache"] != sae["cache"] and ref_sae["pool_tokens"] == 0

    # New seeds and M: no forward over the pool, no harvest, no SAE training; the pool codes come from the cache.
    def forbidden(*a, **k):
        raise AssertionError("recomputed something that was cached")

    monkeypatch.setattr(layer_sae, "train_sae", forbidden)
    monkeypatch.setattr(layer_sae, "harvest_coords", forbidden)
    monkeypatch.setattr(layer_sae, "coordinate_scores", forbidden)
    encoded = []
    real_encode = layer_sae.encode_pooled

    def counting(handle, layer, coords, encode, batches, *a, **k):
        encoded.append(len(batches.texts))
        return real_encode(handle, layer, coords, encode, batches, *a, **k)

    monkeypatch.setattr(layer_sae, "encode_pooled", counting)
    cfg2 = _cfg(tiny_model_dirs, tmp_path, sae_data="pool+reference", top_m=5, selection="per_seed")
    curate_run.run(cfg2, tmp_path / "curate2")
    assert encoded == [3]  # only the seeds go through the model
    assert sorted(cache_home.glob("cache/curate/pool-acts-*")) == caches


def test_pool_activation_cache_is_invalidated_by_what_it_depends_on(tiny_model_dirs, tmp_path, cache_home):
    curate_run.run(_cfg(tiny_model_dirs, tmp_path, sae_data="pool+reference"), tmp_path / "a")
    # Another token limit: other activations, another cache and another SAE.
    curate_run.run(_cfg(tiny_model_dirs, tmp_path, sae_data="pool+reference", max_length=24), tmp_path / "b")
    assert len(list(cache_home.glob("cache/curate/pool-acts-*"))) == 2
    # Another pool (one record's text changed): another cache.
    pool = tmp_path / "pool2.jsonl"
    rows = (tmp_path / "pool.jsonl").read_text().splitlines()
    rows[0] = json.dumps({"instruction": "A farmer has 12 cows and sells 5.", "response": "7", "source": "math"})
    pool.write_text("\n".join(rows) + "\n")
    cfg = _cfg(tiny_model_dirs, tmp_path, sae_data="pool+reference")
    cfg.pool = str(pool)
    curate_run.run(cfg, tmp_path / "c")
    assert len(list(cache_home.glob("cache/curate/pool-acts-*"))) == 3


def test_a_killed_pool_harvest_resumes_at_shard_granularity(tiny_model_dirs, tmp_path, monkeypatch):
    h = load(tiny_model_dirs["llama"], device="cpu")
    texts = [f"record {i} has {i * 3} apples" for i in range(40)]
    idx = torch.arange(6)
    chunks = [texts[:32], texts[32:]]  # one per shard: SHARD_BATCHES (16) batches of 2
    full = harvest_records(h, 1, idx, chunks, tmp_path / "acts", max_length=16, batch_size=2)
    assert len(full.paths) == 2
    (tmp_path / "acts" / "shard-00001.safetensors").unlink()  # as if killed before the last shard was written
    calls = []
    real = h.adapter.hidden_after

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(h.adapter, "hidden_after", counting)
    again = harvest_records(h, 1, idx, chunks, tmp_path / "acts", max_length=16, batch_size=2)
    assert len(calls) == 4  # only the missing shard's batches
    assert torch.equal(again.all_tokens(), full.all_tokens())
    assert not list((tmp_path / "acts").glob("*.tmp*"))
