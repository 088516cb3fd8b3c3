"""Domain NLL: mean negative log-likelihood per response token (and perplexity) of held-out records.

Instruction records are formatted with the model's chat template (`data.format_example`); the loss falls on
the response (and the template's end-of-turn). Text records are scored whole; `{"context", "continuation"}`
pairs (the `nll:code` preset) as raw completions. Token-weighted mean over the set:
NLL = Σ(−log p) / Σ tokens, perplexity = exp(NLL); the standard error is the ratio estimator's (delta method).
"""

from __future__ import annotations

import math

from ..data import format_example
from .mc import Request, score_requests


def pair_of(tokenizer, rec: dict) -> tuple[str, str]:
    if "context" in rec and "continuation" in rec:
        return rec["context"], rec["continuation"]
    return format_example(tokenizer, rec)


def domain_nll(
    model, tokenizer, records: list[dict], *, batch_size: int = 8, desc: str = "nll"
) -> tuple[dict, list[dict]]:
    """(metrics, per-record samples) of the response-token NLL over `records`."""
    pairs = [pair_of(tokenizer, r) for r in records]
    scores = score_requests(model, tokenizer, [Request(c, [x]) for c, x in pairs], batch_size=batch_size, desc=desc)
    nll = [-s[0].logprob for s in scores]
    tokens = [s[0].tokens for s in scores]
    total_tokens = sum(tokens)
    mean = sum(nll) / total_tokens
    n = len(records)
    if n > 1:
        mean_tokens = total_tokens / n
        resid = sum((x - mean * t) ** 2 for x, t in zip(nll, tokens))
        stderr = math.sqrt(resid / (n * (n - 1))) / mean_tokens
    else:
        stderr = float("nan")
    metrics = {"nll": mean, "nll_stderr": stderr, "perplexity": math.exp(mean), "tokens": total_tokens}
    samples = [
        {"id": r["id"], "nll_sum": x, "tokens": t, "nll": x / max(1, t)} for r, x, t in zip(records, nll, tokens)
    ]
    return metrics, samples
