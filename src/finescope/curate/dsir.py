"""DSIR baseline behind `--method dsir`: hashed n-gram importance weights (Xie et al. 2023, arXiv 2302.03169).

A record's text is lower-cased, split by nltk's WordPunctTokenizer, and its unigrams and bigrams are hashed
(sha256) into 10,000 buckets: the featurizer of the reference package `data-selection` 1.0.3
(`data_selection.hashed_ngram_dsir.get_ngram_counts`, called here, so our features are its features). Two
bag-of-n-gram distributions are fitted, the raw one on the pool and the target one on the seeds, and a record's
score is its log importance weight counts · (log(p_target + 1e-8) − log(p_raw + 1e-8)), as the package's
`HashedNgramDSIR.importance_estimator`. The selection is the top-M by score (a deterministic ranking, the
package's `resample(top_k=True)`; the paper's Gumbel top-k resampling is not used).

Where we differ from `HashedNgramDSIR`, on purpose:
- no `min_example_length` filter: the package drops records under 100 words by default, and pool records here
  are often shorter (questions, snippets). Every record is scored; an empty text has no n-grams and scores 0.
- the stage ranks by the log weight **per n-gram** (the weight divided by the record's n-gram count). Without the
  length filter the raw weight ranks by length: ten seeds leave most buckets with p_target ≈ 0, every n-gram they
  lack costs about −18, so the shortest records win (0 of the top 100 were maths on the default pool sample with
  math seeds, 61 per n-gram; with the package's 100-word filter 4, with a 30-word one 76). `dsir_scores(...,
  per_ngram=False)` gives the package's weights exactly (tested against it).
- the raw distribution is fitted on the whole pool (the package stops after 100k × num_buckets tokens).
- a pool in memory is featurised once: its counts are accumulated record by record into the raw bag of n-grams,
  and each record keeps only its own sparse counts (bucket ids and counts, never a records × buckets matrix),
  from which its score is computed once the fit is done. A streamed pool (the curate stage) is featurised twice
  instead, fit then score, so that memory does not grow with it.

    from finescope.curate.dsir import dsir_scores
    scores = dsir_scores(["2 + 3 = 5", "Shares rose on Monday"], ["What is 4 + 4?"])   # CPU, float64

    finescope curate --pool default --pool-sample 2000 --seeds preset:math --method dsir --top-m 100 \\
        --out runs/demo/curate-dsir
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch

from ..progress import progress

NGRAMS = 2
"""n of the n-grams: 2 = unigrams and bigrams (the package's default)."""
NUM_BUCKETS = 10_000
"""Hash buckets of the n-gram features (the package's default)."""
EPS = 1e-8
"""Added to both distributions before the log, as the package does."""


def _featurizer() -> Callable[..., np.ndarray]:
    # nltk takes ~2 s to import: only the dsir method pays for it.
    from data_selection.hashed_ngram_dsir import get_ngram_counts

    return get_ngram_counts


def ngram_counts(
    text: str, n: int = NGRAMS, num_buckets: int = NUM_BUCKETS, featurizer: Callable[..., np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Hashed n-gram counts of one text as (bucket ids, counts): the non-zeros of the package's feature vector."""
    dense = (featurizer or _featurizer())(text, n=n, num_buckets=num_buckets)
    ids = np.flatnonzero(dense)
    return ids.astype(np.int32), dense[ids].astype(np.int32)


def bag_of_ngrams(
    texts: Iterable[str], n: int = NGRAMS, num_buckets: int = NUM_BUCKETS, desc: str = "dsir: n-grams"
) -> np.ndarray:
    """Summed hashed n-gram counts of the texts, (num_buckets,) int64, accumulated one text at a time."""
    featurizer = _featurizer()
    total = np.zeros(num_buckets, dtype=np.int64)
    for text in progress(texts, desc=desc, unit="record"):
        ids, counts = ngram_counts(text, n, num_buckets, featurizer)
        total[ids] += counts
    return total


def _distribution(counts: np.ndarray) -> np.ndarray:
    total = counts.sum()
    # No n-gram at all (every text empty): an all-zero distribution, so every log weight is 0 instead of NaN.
    return counts / total if total > 0 else np.zeros(len(counts))


def log_importance_diff(target_counts: np.ndarray, raw_counts: np.ndarray) -> np.ndarray:
    """log(p_target + ε) − log(p_raw + ε) per bucket: a record's score is its counts dotted with this."""
    return np.log(_distribution(target_counts) + EPS) - np.log(_distribution(raw_counts) + EPS)


def dsir_scores(
    pool_texts: Iterable[str] | Callable[[], Iterable[str]],
    seed_texts: Iterable[str],
    n: int = NGRAMS,
    num_buckets: int = NUM_BUCKETS,
    per_ngram: bool = False,
) -> torch.Tensor:
    """Log importance weight of every pool text (float64, pool order): raw distribution fitted on the pool,
    target distribution on the seeds; `per_ngram`: divided by the text's n-gram count (0 for an empty text).

    `pool_texts` is the texts, or a function that gives them afresh (a streamed pool): then the pool is read
    twice, once to fit the raw distribution and once to score, and nothing per record is kept but its score."""
    featurizer = _featurizer()
    if callable(pool_texts):
        raw = bag_of_ngrams(pool_texts(), n, num_buckets, desc="dsir: n-grams of the pool")
        log_diff = log_importance_diff(bag_of_ngrams(seed_texts, n, num_buckets, "dsir: n-grams of the seeds"), raw)
        out = []
        for text in progress(pool_texts(), desc="dsir: scoring the pool", unit="record"):
            ids, counts = ngram_counts(text, n, num_buckets, featurizer)
            out.append(_score(log_diff, ids, counts, per_ngram))
        return torch.tensor(out, dtype=torch.float64)
    raw = np.zeros(num_buckets, dtype=np.int64)
    per_record: list[tuple[np.ndarray, np.ndarray]] = []
    for text in progress(pool_texts, desc="dsir: n-grams of the pool", unit="record"):
        ids, counts = ngram_counts(text, n, num_buckets, featurizer)
        raw[ids] += counts
        per_record.append((ids, counts))
    target = bag_of_ngrams(seed_texts, n, num_buckets, desc="dsir: n-grams of the seeds")
    log_diff = log_importance_diff(target, raw)
    return torch.tensor([_score(log_diff, ids, counts, per_ngram) for ids, counts in per_record], dtype=torch.float64)


def _score(log_diff: np.ndarray, ids: np.ndarray, counts: np.ndarray, per_ngram: bool) -> float:
    score = float(log_diff[ids] @ counts)
    return score / max(1, int(counts.sum())) if per_ngram else score
