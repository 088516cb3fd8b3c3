from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import torch

from finescope import storage
from finescope.config import CurateConfig
from finescope.curate import run as curate_run
from finescope.curate.dsir import NUM_BUCKETS, bag_of_ngrams, dsir_scores, ngram_counts
from test_curate import MATH, NEWS

RAW = [
    "Tom has 3 apples and buys 5 more. How many apples does he have now? 8.",
    "A train travels 60 km in 1.5 hours; what is its average speed? 40 km/h.",
    "What is 12 * 7? The answer is 84.",
    "Shares of Acme rose 4% on Monday after strong quarterly earnings were reported.",
    "The Prime Minister said on Tuesday that the budget would be published next week.",
    "Café owners in Paris say the naïve résumé of events — rain, rain, rain — hurt trade.",
    "If x + 2 = 10, then x = 8. Check: 8 + 2 = 10.",
    "Manchester United beat Arsenal 2-1 in a thrilling match at Old Trafford!!!",
    "Divide 144 by 12 and add 3: 144 / 12 + 3 = 15.",
    "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG, the quick brown fox jumps.",
    "Oil prices fell sharply as traders worried about weaker demand from China.",
    "Sara has 4 pencils and gives away 1. How many pencils are left? 3.",
]
TARGET = [
    "Lisa has 7 apples and buys 2 more. How many apples does she have? 9.",
    "What is 15 + 27? The answer is 42.",
    "Solve for y: 3y = 21, so y = 7.",
]


def _jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def test_scores_equal_the_reference_package(tmp_path):
    from data_selection import HashedNgramDSIR

    ref = HashedNgramDSIR(
        raw_datasets=[str(_jsonl(tmp_path / "raw.jsonl", RAW))],
        target_datasets=[str(_jsonl(tmp_path / "target.jsonl", TARGET))],
        cache_dir=str(tmp_path / "dsir-cache"),
        num_proc=1,
        ngrams=2,
        num_buckets=10000,
        min_example_length=0,
    )
    ref.fit_importance_estimator(num_tokens_to_fit="all")
    expected = np.array([ref.importance_estimator(ref.featurizer(t)) for t in RAW])
    ours = dsir_scores(RAW, TARGET)
    assert ours.dtype == torch.float64 and ours.shape == (len(RAW),)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=0, atol=1e-9)
    assert np.argsort(-ours.numpy(), kind="stable").tolist() == np.argsort(-expected, kind="stable").tolist()
    # The package's own pass over the raw file (what its resample() ranks) gives the same weights.
    ref.compute_importance_weights()
    np.testing.assert_allclose(
        ours.numpy(), np.load(tmp_path / "dsir-cache" / "log_importance_weights" / "0.npy"), rtol=0, atol=1e-9
    )
    # Accumulating record by record is the package's bag of n-grams.
    np.testing.assert_array_equal(bag_of_ngrams(RAW), ref._fit_bow([str(tmp_path / "raw.jsonl")]))


def test_empty_and_whitespace_texts_score_zero_without_crashing():
    ids, counts = ngram_counts("   ")
    assert ids.size == 0 and counts.size == 0
    scores = dsir_scores(["", "  \n\t ", "What is 2 + 2? 4."], ["What is 3 + 3? 6."])
    assert scores[:2].tolist() == [0.0, 0.0] and torch.isfinite(scores).all() and scores[2] != 0
    # No n-gram anywhere (pool or seeds): every weight is 0, not NaN.
    assert dsir_scores(["", " "], ["x"]).tolist() == [0.0, 0.0]
    assert dsir_scores(["a b", "c"], ["  "]).isfinite().all()
    assert dsir_scores([], ["x"]).shape == (0,)
    assert bag_of_ngrams([]).shape == (NUM_BUCKETS,)


def _cfg(tmp_path, **kw) -> CurateConfig:
    pool = tmp_path / "pool.jsonl"
    rows = [{"text": t, "source": "news"} for t in NEWS[:10]]
    rows += [{"instruction": t, "response": "ok", "source": "math"} for t in MATH[:10]]
    rows += [{"text": t, "source": "news"} for t in NEWS[10:]]
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows))
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(
        "".join(
            json.dumps({"instruction": q, "response": a}) + "\n"
            for q, a in [
                ("Sara has 4 apples and buys 5 more. How many apples does she have?", "9."),
                ("What is 6 + 7?", "13."),
            ]
        )
    )
    return CurateConfig(
        **{"model": "unused-by-dsir", "pool": str(pool), "seeds": str(seeds), "method": "dsir", "top_m": 10, **kw}
    )


def _selected(out):
    return [json.loads(l) for l in (out / "selected.jsonl").read_text().splitlines()]


def test_curate_dsir_selects_the_domain_records_first(tmp_path, cache_home):
    cfg = _cfg(tmp_path)
    out = curate_run.run(cfg, tmp_path / "curate")
    assert storage.is_done(out, cfg)
    selected = _selected(out)
    assert [r["rank"] for r in selected] == list(range(1, 11))
    assert [r["source"] for r in selected] == ["math"] * 10
    assert all(r["nearest_seed"] is None for r in selected)
    scores = [r["score"] for r in selected]
    assert scores == sorted(scores, reverse=True)
    table = pq.read_table(out / "scores.parquet").to_pylist()
    assert len(table) == 30 and sum(r["selected"] for r in table) == 10
    assert max(r["score"] for r in table if r["source"] == "news") < min(scores)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "dsir" and "dsir" in metrics["timings_s"]
    assert not (out / "sae").exists() and not (out / "features.json").exists()


def test_curate_dsir_per_seed_falls_back_to_global(tmp_path, cache_home):
    glob = curate_run.run(_cfg(tmp_path, top_m=5), tmp_path / "global")
    per_seed = curate_run.run(_cfg(tmp_path, top_m=5, selection="per_seed"), tmp_path / "per_seed")
    assert [r["id"] for r in _selected(per_seed)] == [r["id"] for r in _selected(glob)]
    assert len(_selected(per_seed)) == 5


def test_per_ngram_scores_are_the_weights_divided_by_the_ngram_count():
    raw = dsir_scores(RAW, TARGET)
    per = dsir_scores(RAW + [""], TARGET, per_ngram=True)
    n = torch.tensor([float(ngram_counts(t)[1].sum()) for t in RAW], dtype=torch.float64)
    assert torch.allclose(per[:-1], raw / n) and per[-1] == 0.0
    # Length no longer decides: a long record that repeats a short one scores like it, not k times lower.
    short, long = "Tom has 3 apples.", " ".join(["Tom has 3 apples."] * 5)
    s = dsir_scores([short, long, "Shares rose on Monday."], TARGET, per_ngram=True)
    r = dsir_scores([short, long, "Shares rose on Monday."], TARGET)
    assert abs(float(s[0] - s[1])) < abs(float(r[0] - r[1])) / 4


def test_streamed_pool_scores_equal_the_in_memory_ones():
    """A pool given as a function (read twice: fit, then score) scores exactly as the list does."""
    texts = RAW + ["", "What is 2 + 2? 4."]
    for per_ngram in (False, True):
        streamed = dsir_scores(lambda: iter(texts), TARGET, per_ngram=per_ngram)
        assert torch.equal(streamed, dsir_scores(texts, TARGET, per_ngram=per_ngram))
