from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from finescope import storage
from finescope.config import CurateConfig
from finescope.curate import embeddings, layer_sae
from finescope.curate import run as curate_run
from finescope.curate.activations import TextBatches
from finescope.curate.coords import SELECTORS, coordinate_scores, top_k_coords
from finescope.curate.sae import evaluate_sae, load_sae, save_sae, train_sae
from finescope.curate.select import max_cosine, select_global, select_per_seed
from finescope.modeling import load

MATH = [f"Tom has {i} apples and buys {i + 3} more. How many apples does he have now? {2 * i + 3}." for i in range(20)]
NEWS = [
    f"Shares of company {i} rose {i % 7}% on Monday after strong quarterly earnings were reported." for i in range(20)
]


@pytest.fixture(scope="module")
def llama(tiny_model_dirs):
    return load(tiny_model_dirs["llama"], device="cpu")


def _batches(h, texts, n=4):
    return TextBatches(h.tokenizer, texts, max_length=24, batch_size=n)


@pytest.mark.parametrize("selector", SELECTORS)
def test_every_selector_scores_every_coordinate(llama, selector):
    scores = coordinate_scores(llama, 1, _batches(llama, MATH[:6] + NEWS[:6]), selector, probes=2, k=8)
    assert scores.shape == (64,) and torch.isfinite(scores).all()
    idx = top_k_coords(scores, 8)
    rest = torch.ones_like(scores, dtype=torch.bool)
    rest[idx] = False
    assert len(set(idx.tolist())) == 8 and scores[idx].min() >= scores[rest].max()  # the 8 largest, none missed
    assert scores[idx[0]] == scores.max()


def test_jacobian_estimate_matches_exact_jacobian_row_norms(llama):
    text = ["Tom has 3 apples."]
    batch = _batches(llama, text).batch(0)
    embeds = llama.adapter.embed_tokens(batch["input_ids"]).detach()

    def f(e):
        return llama.adapter.hidden_after(1, inputs_embeds=e, attention_mask=batch["attention_mask"])

    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        jac = torch.autograd.functional.jacobian(f, embeds, vectorize=True)  # (1, T, d, 1, T, h)
    mask = batch["token_mask"][0]
    exact = jac[0][mask].pow(2).sum((-1, -2, -3)).mean(0).sqrt()  # per output coordinate
    est = coordinate_scores(llama, 1, _batches(llama, text), "jacobian", probes=128, seed=1)
    rel = ((est - exact).abs() / exact).median()
    assert rel < 0.12, float(rel)
    assert torch.corrcoef(torch.stack([est, exact]))[0, 1] > 0.9


def test_gradient_selector_estimates_the_autograd_norm(llama):
    texts = [NEWS[1], MATH[0]]
    batches = _batches(llama, texts)
    exact = torch.zeros(llama.adapter.hidden_size)
    for b in batches:
        for row in range(b["input_ids"].shape[0]):
            ids, attn = b["input_ids"][row : row + 1], b["attention_mask"][row : row + 1]
            for j in range(llama.adapter.hidden_size):
                e = llama.adapter.embed_tokens(ids).detach().requires_grad_(True)
                h = llama.adapter.hidden_after(0, inputs_embeds=e, attention_mask=attn)
                (g,) = torch.autograd.grad(h[0][b["token_mask"][row]][:, j].sum(), e)
                exact[j] += g.pow(2).sum()
    exact = (exact / len(texts)).sqrt()  # root-mean-square over texts of ‖∂(Σ_t a_j,t)/∂e‖
    est = coordinate_scores(llama, 0, batches, "gradient", probes=256, seed=2)
    rel = ((est - exact).abs() / exact).median()
    assert rel < 0.12, float(rel)
    assert torch.corrcoef(torch.stack([est, exact]))[0, 1] > 0.9
    # a different quantity from the per-token jacobian score
    assert not torch.allclose(est, coordinate_scores(llama, 0, batches, "jacobian", probes=256, seed=2), rtol=0.2)


def test_stat_selectors_match_direct_computation(llama):
    texts = MATH[:4] + NEWS[:4]
    batches = _batches(llama, texts)
    acts = torch.cat(
        [
            llama.adapter.hidden_after(1, input_ids=b["input_ids"], attention_mask=b["attention_mask"])[b["token_mask"]]
            for b in batches
        ]
    ).double()
    torch.testing.assert_close(coordinate_scores(llama, 1, batches, "magnitude"), acts.abs().mean(0).float())
    var = acts.var(0, unbiased=False).float()
    torch.testing.assert_close(coordinate_scores(llama, 1, batches, "variance"), var, rtol=1e-4, atol=1e-5)
    # with K = d the principal subspace is everything, so the PCA energy of a coordinate is its variance
    torch.testing.assert_close(coordinate_scores(llama, 1, batches, "pca", k=64), var, rtol=1e-3, atol=1e-4)


def test_k_larger_than_hidden_is_an_error():
    with pytest.raises(Exception, match=r"num_coords \(K\) = 65 is larger than the hidden size 64"):
        top_k_coords(torch.rand(64), 65)


def _sparse_data(n=2000, d=16, atoms=64, active=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.nn.functional.normalize(torch.randn(atoms, d, generator=g), dim=1)
    codes = torch.zeros(n, atoms)
    idx = torch.randint(0, atoms, (n, active), generator=g)
    codes.scatter_(1, idx, torch.rand(n, active, generator=g) * 3 + 0.5)
    return codes @ dictionary * 5.0 + 2.0


@pytest.mark.parametrize("kind", ["topk", "relu"])
def test_sae_learns_sparse_structure_and_round_trips(kind, tmp_path):
    acts = _sparse_data()
    sae, curves = train_sae(acts, kind=kind, d_sae=128, k=8, steps=300, lr=3e-3, batch_size=256, l1=3e-3)
    q = evaluate_sae(sae, acts)
    assert curves["fvu"][-1] < curves["fvu"][0]
    assert q["fvu"] < 0.35, q
    if kind == "topk":
        assert q["l0"] <= 8 + 1e-6
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(128), rtol=1e-4, atol=1e-4)
    coords = torch.arange(16)
    save_sae(sae, tmp_path / "sae", coords=coords, layer=3, model="tiny")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["d_in"] == 16 and cfg["d_sae"] == 128 and cfg["hook_layer"] == 3
    again, meta = load_sae(tmp_path / "sae")
    torch.testing.assert_close(again.encode(acts[:50]), sae.encode(acts[:50]))
    assert torch.equal(meta["coords"], coords)


def test_select_global_per_seed_and_dedupe():
    pool = torch.tensor([[1.0, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [0.5, 0.5], [1.0, 0]])
    seeds = torch.tensor([[1.0, 0], [0, 1]])
    texts = ["a", "b", "c", "d", "e", "a"]  # record 5 duplicates record 0
    scores, nearest, sims = max_cosine(pool, seeds)
    assert nearest.tolist() == [0, 0, 1, 1, 0, 0]
    top = select_global(scores, texts, 3)
    assert top[:1] in ([0], [2]) and 5 not in top and len(top) == 3
    per = select_per_seed(sims, scores, texts, 2)
    assert set(per) == {0, 1, 2, 3}
    assert select_global(torch.zeros(2), ["x", "y"], 5) == [0, 1]


def _pool_file(tmp_path):
    rows = [{"instruction": t, "response": "ok", "source": "math"} for t in MATH]
    rows += [{"text": t, "source": "news"} for t in NEWS] + [{"text": NEWS[0], "source": "news"}]
    path = tmp_path / "pool.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ref = tmp_path / "ref.jsonl"
    ref.write_text("".join(json.dumps({"text": t}) + "\n" for t in NEWS + MATH))
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"instruction": t, "response": "x"}) + "\n" for t in MATH[:3]))
    return path, ref, seeds


def _cfg(tiny_model_dirs, tmp_path, **kw):
    pool, ref, seeds = _pool_file(tmp_path)
    base = dict(
        model=str(tiny_model_dirs["llama"]),
        pool=str(pool),
        seeds=str(seeds),
        reference=str(ref),
        num_coords=16,
        sae_expansion=4,
        sae_k=4,
        sae_steps=60,
        sae_batch_size=64,
        top_m=10,
        max_length=32,
        coord_samples=8,
        batch_size=8,
    )
    base.update(kw)
    return CurateConfig(**base)


def test_run_end_to_end_outputs_and_cache(tiny_model_dirs, tmp_path, cache_home, monkeypatch):
    cfg = _cfg(tiny_model_dirs, tmp_path)
    out = curate_run.run(cfg, tmp_path / "curate")
    assert storage.is_done(out, cfg)
    selected = [json.loads(l) for l in (out / "selected.jsonl").read_text().splitlines()]
    assert len(selected) == 10 and [r["rank"] for r in selected] == list(range(1, 11))
    assert all({"id", "score", "nearest_seed", "source"} <= set(r) for r in selected)
    assert selected[0]["score"] >= selected[-1]["score"]
    table = pq.read_table(out / "scores.parquet").to_pylist()
    assert len(table) == 41 and sum(r["selected"] for r in table) == 10
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["layers"] == [2] and metrics["sae"]["layer2"]["curves"]["fvu"]
    assert 0 <= metrics["sae"]["layer2"]["dead_fraction"] <= 1
    feats = json.loads((out / "features.json").read_text())["layer2"]
    assert feats and feats[0]["top_pool_snippets"]
    sae, meta = load_sae(out / "sae" / "layer2")
    assert meta["coords"].shape == (16,)

    # New M and seeds: coordinates, activations, SAE and pool encodings all come from the cache.
    def forbidden(*a, **k):
        raise AssertionError("recomputed something that was cached")

    monkeypatch.setattr(layer_sae, "coordinate_scores", forbidden)
    monkeypatch.setattr(layer_sae, "harvest_coords", forbidden)
    monkeypatch.setattr(layer_sae, "train_sae", forbidden)
    calls = []
    real_encode = layer_sae.encode_pooled

    def counting(handle, layer, coords, encode, batches, cache_dir, *a, **k):
        calls.append((len(batches.texts), any(cache_dir.glob("shard-*"))))
        return real_encode(handle, layer, coords, encode, batches, cache_dir, *a, **k)

    monkeypatch.setattr(layer_sae, "encode_pooled", counting)
    streamed = []
    real_stream = layer_sae.encode_pooled_stream

    def counting_stream(handle, layer, coords, encode, chunks, cache_dir, **k):
        streamed.append(any(cache_dir.glob("shard-*")))
        real_forward = handle.adapter.hidden_after
        handle.adapter.hidden_after = forbidden  # no forward over the pool
        try:
            return real_stream(handle, layer, coords, encode, chunks, cache_dir, **k)
        finally:
            handle.adapter.hidden_after = real_forward

    monkeypatch.setattr(layer_sae, "encode_pooled_stream", counting_stream)
    cfg2 = _cfg(tiny_model_dirs, tmp_path, top_m=5, selection="per_seed")
    out2 = curate_run.run(cfg2, tmp_path / "curate2")
    assert streamed == [True]  # pool encodings were on disk and read from there
    assert calls == [(3, True)]  # the seeds' too
    assert len((out2 / "selected.jsonl").read_text().splitlines()) >= 5


def test_run_rejects_bad_inputs(tiny_model_dirs, tmp_path, cache_home):
    with pytest.raises(Exception, match=r"layers: 7 is out of range; .* blocks 0\.\.2"):
        curate_run.run(_cfg(tiny_model_dirs, tmp_path, layers=[7]), tmp_path / "a")
    with pytest.raises(Exception, match=r"num_coords \(K\) = 100 is larger than the hidden size 64"):
        curate_run.run(_cfg(tiny_model_dirs, tmp_path, num_coords=100), tmp_path / "b")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(Exception, match="empty.jsonl: no usable records"):
        curate_run.run(_cfg(tiny_model_dirs, tmp_path, pool=str(empty)), tmp_path / "c")
    with pytest.raises(Exception, match="empty.jsonl: no usable records"):
        curate_run.run(_cfg(tiny_model_dirs, tmp_path, seeds=str(empty)), tmp_path / "d")
    with pytest.raises(Exception, match="unknown seed preset 'poetry'"):
        curate_run.run(_cfg(tiny_model_dirs, tmp_path, seeds="preset:poetry"), tmp_path / "e")


@pytest.mark.parametrize("method", ["random", "full"])
def test_baselines_same_format(tiny_model_dirs, tmp_path, cache_home, method):
    cfg = _cfg(tiny_model_dirs, tmp_path, method=method, top_m=7)
    out = curate_run.run(cfg, tmp_path / method)
    selected = [json.loads(l) for l in (out / "selected.jsonl").read_text().splitlines()]
    # the pool holds one exact duplicate, which is removed
    assert len(selected) == (40 if method == "full" else 7)
    assert all({"id", "score", "rank", "nearest_seed"} <= set(r) for r in selected)


def test_top_m_larger_than_pool_warns_and_caps(tiny_model_dirs, tmp_path, cache_home):
    with pytest.warns(UserWarning, match=r"top_m = 500 is larger than the pool \(41 records\)"):
        out = curate_run.run(_cfg(tiny_model_dirs, tmp_path, method="random", top_m=500), tmp_path / "r")
    assert len((out / "selected.jsonl").read_text().splitlines()) == 40


def test_embedding_baseline_with_a_tiny_encoder(tmp_path, chat_tokenizer):
    from transformers import BertConfig, BertModel

    from finescope.curate.baselines import MiniLM

    BertModel(
        BertConfig(
            vocab_size=len(chat_tokenizer),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
        )
    ).save_pretrained(tmp_path / "enc")
    chat_tokenizer.save_pretrained(tmp_path / "enc")
    encoder = MiniLM(str(tmp_path / "enc"))
    texts = MATH[:3] + NEWS[:2]
    vecs = encoder.embed(texts, batch_size=2)
    assert vecs.shape == (5, 32)
    torch.testing.assert_close(vecs.norm(dim=1), torch.ones(5))
    # batched by length, handed back in the texts' order: each row is that text's own vector, as embedded alone
    alone = torch.cat([encoder.embed([t]) for t in texts])
    torch.testing.assert_close(vecs, alone, atol=1e-5, rtol=1e-4)
    assert encoder.embed([]).shape == (0, 32)


def test_seed_presets_are_valid_records():
    from finescope.corpora import PRESETS, seed_preset_path
    from finescope.data import read_records

    for name in PRESETS:
        recs = read_records(seed_preset_path(name))
        assert 8 <= len(recs) <= 15 and all(r["instruction"] and r["response"] for r in recs)


@pytest.mark.parametrize("sae_data", ["reference", "pool+reference"])
def test_truncation_count_comes_from_the_pool_shards_and_from_older_shards_too(
    tiny_model_dirs, tmp_path, cache_home, sae_data
):
    """The pool's truncation count is what the encoding shards recorded as they tokenised their texts (no extra
    tokenising pass); shards of an older cache, which did not record it, are counted by tokenising them again."""
    from dataclasses import replace

    from safetensors.torch import load_file

    from finescope import cache_entry
    from finescope.curate.activations import count_truncated
    from finescope.data import read_records, record_text

    cfg = _cfg(tiny_model_dirs, tmp_path, sae_data=sae_data, max_length=45, batch_size=2)  # shards of 32 texts
    texts = [record_text(r) for r in read_records(cfg.pool)]
    expected = count_truncated(load(cfg.model).tokenizer, texts, 45)
    assert 0 < expected < len(texts) == 41
    out = curate_run.run(cfg, tmp_path / "curate")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["pool_truncated"] == expected
    shards = sorted(cache_home.glob("cache/curate/**/shard-*.safetensors"))
    stripped = 0
    for path in shards:
        tensors = load_file(str(path))
        if "truncated" in tensors:
            kept = {k: v for k, v in tensors.items() if k != "truncated"}  # a shard that did not record it
            path.write_bytes(cache_entry.dump(kept, cache_entry.shard_key(path)))  # (checksummed, or recomputed)
            stripped += 1
    assert stripped == 2  # 41 texts in shards of 32: the pool's two shards recorded the count
    again = curate_run.run(replace(cfg, top_m=9), tmp_path / "again")
    assert json.loads((again / "metrics.json").read_text())["pool_truncated"] == expected
    assert not any("truncated" in load_file(str(p)) for p in shards)  # the rerun read the older shards


def tiny_sentence_encoder(folder: Path, tokenizer) -> Path:
    """A 1-layer random BERT with the chat tokenizer, standing in for all-MiniLM-L6-v2."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    BertModel(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_embedding_method_embeds_the_pool_once_into_cached_shards(
    tiny_model_dirs, tmp_path, cache_home, chat_tokenizer, monkeypatch
):
    """The encoder is loaded once per stage (not per chunk); the pool's vectors are cache shards of 4,096 texts
    that a second selection over the same pool (other seeds count, other M) reuses without a forward; the scores
    are the cosines of the encoder's own vectors."""
    from dataclasses import replace

    from finescope.curate.baselines import MiniLM
    from finescope.data import read_records, record_text

    enc = tiny_sentence_encoder(tmp_path / "enc", chat_tokenizer)
    loads = []

    def counted(*a, **kw):
        loads.append(1)
        return MiniLM(str(enc), *a, **kw)

    monkeypatch.setattr(embeddings, "MiniLM", counted)
    monkeypatch.setattr(embeddings, "EMBED_SHARD_TEXTS", 16)  # 41 records: 3 shards
    cfg = _cfg(tiny_model_dirs, tmp_path, method="embedding", top_m=5)
    out = curate_run.run(cfg, tmp_path / "emb")
    assert loads == [1]
    rows = [json.loads(l) for l in (out / "selected.jsonl").read_text().splitlines()]
    texts = [record_text(r) for r in read_records(cfg.pool)]
    seeds = [record_text(r) for r in read_records(cfg.seeds)]
    encoder = MiniLM(str(enc))
    expected = (encoder.embed(texts) @ encoder.embed(seeds).T).max(1)
    best = torch.argsort(expected.values, descending=True, stable=True)[:5].tolist()
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["score"] for r in rows] == pytest.approx(expected.values[best].tolist(), abs=1e-5)
    shards = sorted(cache_home.glob("cache/curate/emb-*/shard-*.safetensors"))
    assert len(shards) == 3
    stamps = [p.stat().st_mtime_ns for p in shards]

    calls: list[int] = []
    embed = MiniLM.embed

    def spy(self, texts, *a, **k):
        calls.append(len(texts))
        return embed(self, texts, *a, **k)

    monkeypatch.setattr(MiniLM, "embed", spy)
    again = curate_run.run(replace(cfg, top_m=3), tmp_path / "again")
    assert calls == [3]  # the 3 seeds only: the pool's vectors came from the cache
    assert [p.stat().st_mtime_ns for p in shards] == stamps
    assert (again / "selected.jsonl").read_text().splitlines() == (out / "selected.jsonl").read_text().splitlines()[:3]
