"""Domain NLL: mean negative log-likelihood per response token (and perplexity) of held-out records, and the
top-1 accuracy of the same tokens.

Instruction records are formatted with the model's chat template (`data.format_example`); the loss falls on
the response (and the template's end-of-turn). Text records are scored whole; `{"context", "continuation"}`
pairs (the `nll:code` preset) as raw completions. Token-weighted means over the set, from one scoring pass:
NLL = Σ(−log p) / Σ tokens, perplexity = exp(NLL); top-1 = Σ(tokens whose target is the model's argmax
prediction) / Σ tokens. Both standard errors are the ratio estimator's (delta method) over documents: a
cluster standard error, since the tokens of one document are not independent (a per-token Bernoulli error
would be far too small).
"""

from __future__ import annotations

import math

from ..data import format_example
from .mc import Request, score_requests


def pair_of(tokenizer, rec: dict) -> tuple[str, str]:
    if "context" in rec and "continuation" in rec:
        return rec["context"], rec["continuation"]
    return format_example(tokenizer, rec)


def ratio_stderr(sums: list[float], counts: list[int]) -> float:
    """Standard error of Σ sums / Σ counts over documents (delta method; NaN for fewer than 2 documents)."""
    n = len(sums)
    if n < 2:
        return float("nan")
    mean = sum(sums) / sum(counts)
    mean_counts = sum(counts) / n
    resid = sum((x - mean * t) ** 2 for x, t in zip(sums, counts))
    return math.sqrt(resid / (n * (n - 1))) / mean_counts


def domain_nll(
    model, tokenizer, records: list[dict], *, batch_size: int = 8, desc: str = "nll", sharded: bool = False
) -> tuple[dict, list[dict]]:
    """(metrics, per-record samples) of the response-token NLL and top-1 accuracy over `records` (sharded: the
    scoring split over the ranks, see `score_requests`)."""
    pairs = [pair_of(tokenizer, r) for r in records]
    requests = [Request(c, [x]) for c, x in pairs]
    scores = score_requests(model, tokenizer, requests, batch_size=batch_size, desc=desc, sharded=sharded)
    nll = [-s[0].logprob for s in scores]
    tokens = [s[0].tokens for s in scores]
    hits = [s[0].top1 for s in scores]
    total_tokens = sum(tokens)
    mean = sum(nll) / total_tokens
    metrics = {
        "nll": mean,
        "nll_stderr": ratio_stderr(nll, tokens),
        "perplexity": math.exp(mean),
        "tokens": total_tokens,
        "top1": sum(hits) / total_tokens,
        "top1_stderr": ratio_stderr([float(h) for h in hits], tokens),
    }
    samples = [
        {"id": r["id"], "nll_sum": x, "tokens": t, "nll": x / max(1, t), "top1_hits": h}
        for r, x, t, h in zip(records, nll, tokens, hits)
    ]
    return metrics, samples
