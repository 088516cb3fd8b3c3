"""Scoring levers of the SAE method: latent weighting, top-k seed score, pooling, encoded fields."""

from __future__ import annotations

import json

import pytest
import torch

from finescope.config import CurateConfig
from finescope.curate import embeddings
from finescope.curate import run as curate_run
from finescope.curate.activations import TextBatches, encode_pooled
from finescope.curate.select import LatentStats, max_cosine, seed_cosine
from finescope.data import record_text
from finescope.modeling import load
from test_curate import _cfg


def _codes():
    # Latent 0 fires on every record (a "common" latent); latents 1 and 2 tell the two domains apart.
    pool = torch.tensor(
        [
            [5.0, 1.0, 0.0],  # domain A
            [5.0, 0.9, 0.0],  # domain A
            [5.0, 0.0, 1.0],  # domain B
            [5.0, 0.0, 1.1],  # domain B
            [5.0, 0.0, 0.0],  # only the common latent
        ]
    )
    seeds = torch.tensor([[5.0, 1.0, 0.0]])
    return pool, seeds


def weight_latents(pool: torch.Tensor, seeds: torch.Tensor, weighting: str) -> tuple[torch.Tensor, torch.Tensor]:
    """What the curate stage does with the pool's codes (one shard here): gather the pool's stats, transform both."""
    stats = LatentStats().add(pool)
    return stats.transform(pool, weighting), stats.transform(seeds, weighting)


def test_common_latent_dominates_plain_cosine_and_weighting_removes_it():
    pool, seeds = _codes()
    plain, _, _ = max_cosine(pool, seeds)
    # The common latent makes every record look alike: domain B is within 0.05 of domain A.
    assert float(plain[0] - plain[2]) < 0.05
    for weighting in ("center", "idf", "zscore"):
        scores, _, _ = max_cosine(*weight_latents(pool, seeds, weighting))
        assert scores[:2].min() > scores[2:].max() + 0.5, weighting


def test_idf_zeroes_latents_that_fire_on_every_record():
    pool, seeds = _codes()
    p, s = weight_latents(pool, seeds, "idf")
    assert torch.allclose(p[:, 0], torch.zeros(5))  # log((1 + 5) / (1 + 5)) = 0
    # A latent firing on 2 of 5 records keeps weight log(6/3).
    assert torch.allclose(p[0, 1], torch.tensor(1.0) * torch.log(torch.tensor(2.0)))
    assert s.shape == seeds.shape


def test_center_and_none():
    pool, seeds = _codes()
    p, s = weight_latents(pool, seeds, "center")
    assert torch.allclose(p.mean(0), torch.zeros(3), atol=1e-6)
    assert torch.allclose(s, seeds - pool.mean(0))
    p, s = weight_latents(pool, seeds, "none")
    assert torch.equal(p, pool) and torch.equal(s, seeds)
    with pytest.raises(ValueError):
        weight_latents(pool, seeds, "bogus")


def test_seed_top_k_is_max_at_one_and_the_mean_of_the_best_k():
    pool = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    seeds = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
    s1, n1, sims = seed_cosine(pool, seeds, top_k=1)
    m, nm, _ = max_cosine(pool, seeds)
    assert torch.equal(s1, m) and torch.equal(n1, nm)
    s3, _, _ = seed_cosine(pool, seeds, top_k=3)
    expect = torch.sort(sims, dim=1, descending=True).values[:, :3].mean(1)
    assert torch.allclose(s3, expect)
    big, _, _ = seed_cosine(pool, seeds, top_k=99)  # capped at the number of seeds
    assert torch.allclose(big, sims.mean(1))


def test_mean_max_pooling_concatenates_mean_and_max(tiny_model_dirs, tmp_path):
    h = load(tiny_model_dirs["llama"], device="cpu")
    texts = ["Tom has 3 apples.", "Shares rose 4% on Monday after earnings.", ""]
    batches = TextBatches(h.tokenizer, texts, max_length=16, batch_size=2)
    coords = torch.arange(8)
    enc = torch.nn.Linear(8, 6)
    out = {}
    for pooling in ("mean", "max", "mean+max"):
        with torch.no_grad():
            out[pooling] = encode_pooled(h, 1, coords, enc, batches, tmp_path / pooling, pooling)
    assert out["mean+max"].shape == (3, 12)
    assert torch.allclose(out["mean+max"], torch.cat([out["mean"], out["max"]], -1))
    assert torch.equal(out["max"][2], torch.zeros(6))  # no token: zero vector, not -inf


def test_response_field_falls_back_to_the_instruction():
    assert record_text({"instruction": "Q", "response": "A"}, "response") == "A"
    assert record_text({"instruction": "Q"}, "response") == "Q"
    assert record_text({"text": "T"}, "response") == "T"


def test_stage_runs_with_every_lever(tiny_model_dirs, tmp_path, cache_home):
    cfg = _cfg(
        tiny_model_dirs,
        tmp_path,
        latent_weighting="idf",
        seed_top_k=2,
        pooling="mean+max",
        encode_fields="response",
    )
    out = curate_run.run(cfg, tmp_path / "curate")
    selected = [json.loads(l) for l in (out / "selected.jsonl").read_text().splitlines()]
    assert len(selected) == 10
    width = cfg.sae_expansion * cfg.num_coords
    feats = json.loads((out / "features.json").read_text())["layer2"]
    assert all(0 <= f["latent"] < width for f in feats)


def test_default_scoring_is_the_measured_best_and_the_paper_preset_keeps_the_papers():
    from finescope.config import PipelineConfig, load_config
    from finescope.pipeline import resolve_config

    cfg = CurateConfig()
    assert (cfg.latent_weighting, cfg.seed_top_k, cfg.pooling, cfg.layer_depth) == ("zscore", 5, "mean", 0.87)
    paper = load_config(PipelineConfig, resolve_config("paper-ablations")).curate
    assert (paper.latent_weighting, paper.seed_top_k, paper.pooling, paper.layer_depth) == ("none", 1, "mean", 0.5)


def test_reciprocal_rank_fusion_ranks_by_summed_reciprocal_ranks():
    from finescope.curate.baselines import reciprocal_rank_fusion

    a = torch.tensor([0.9, 0.8, 0.1, 0.5])  # ranks 1, 2, 4, 3
    b = torch.tensor([0.0, 0.7, 0.9, 0.8])  # ranks 4, 3, 1, 2
    fused = reciprocal_rank_fusion(a, b, k=60)
    expect = torch.tensor([1 / 61 + 1 / 64, 1 / 62 + 1 / 63, 1 / 64 + 1 / 61, 1 / 63 + 1 / 62])
    assert torch.allclose(fused, expect.float())
    assert fused[0] == fused[2] and fused[1] == fused[3]  # symmetric rank pairs tie


def test_hybrid_fuses_the_sae_and_embedding_rankings(
    tiny_model_dirs, tmp_path, cache_home, monkeypatch, chat_tokenizer
):
    from functools import partial

    from transformers import BertConfig, BertModel

    from finescope.curate.baselines import MiniLM

    cfg = BertConfig(vocab_size=len(chat_tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    BertModel(cfg).save_pretrained(tmp_path / "enc")
    chat_tokenizer.save_pretrained(tmp_path / "enc")
    monkeypatch.setattr(embeddings, "MiniLM", partial(MiniLM, str(tmp_path / "enc")))
    sae = curate_run.run(_cfg(tiny_model_dirs, tmp_path, top_m=41), tmp_path / "sae")
    out = curate_run.run(_cfg(tiny_model_dirs, tmp_path, method="hybrid", top_m=7), tmp_path / "hybrid")
    rows = [json.loads(l) for l in (out / "selected.jsonl").read_text().splitlines()]
    assert len(rows) == 7 and [r["rank"] for r in rows] == list(range(1, 8))
    assert all(0 < r["score"] <= 2 / 61 for r in rows)  # fused reciprocal ranks, not cosines
    sae_rank = {json.loads(l)["id"]: json.loads(l)["rank"] for l in (sae / "selected.jsonl").read_text().splitlines()}
    assert rows[0]["id"] in sae_rank  # the fused best is a record the SAE ranked
    assert json.loads((out / "metrics.json").read_text())["method"] == "hybrid"


def test_layer_depth_picks_the_hook_block_when_layers_is_empty(tiny_model_dirs, tmp_path, cache_home):
    from finescope.curate.run import hook_layer

    assert [hook_layer(0.5, n) for n in (30, 31, 28)] == [15, 15, 14]  # the middle block, as before
    assert hook_layer(0.87, 30) == 26 and hook_layer(0.87, 32) == 27 and hook_layer(0.99, 3) == 2
    out = curate_run.run(_cfg(tiny_model_dirs, tmp_path, layer_depth=0.9), tmp_path / "deep")
    assert json.loads((out / "metrics.json").read_text())["layers"] == [2]  # 3 blocks: int(0.9 × 3)
    explicit = curate_run.run(_cfg(tiny_model_dirs, tmp_path, layer_depth=0.9, layers=[0]), tmp_path / "explicit")
    assert json.loads((explicit / "metrics.json").read_text())["layers"] == [0]  # layers wins


def test_dtype_and_device_reach_the_model_load(tiny_model_dirs, tmp_path, cache_home, monkeypatch):
    seen = []
    real = curate_run.load

    def spy(spec, **kw):
        seen.append(kw)
        return real(spec, **kw)

    monkeypatch.setattr(curate_run, "load", spy)
    out = curate_run.run(_cfg(tiny_model_dirs, tmp_path, dtype="bfloat16", device="cpu"), tmp_path / "bf16")
    assert seen == [{"dtype": "bfloat16", "device": "cpu"}]
    assert len((out / "selected.jsonl").read_text().splitlines()) == 10
