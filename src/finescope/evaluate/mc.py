"""Batched log-likelihood scoring: each question's context is run once, its answer choices share its KV cache.

`score_requests` returns, for every (context, [continuation, ...]) request, the summed log-probability of each
continuation given the context, its token count, whether it is the greedy continuation and how many of its
tokens are the model's argmax (top-1) prediction. Tokenisation follows
lm-evaluation-harness (`_encode_pair`): trailing spaces of the context move to the continuation, the pair is
encoded whole and split at the context's token count, so our numbers match `lm_eval` on the same prompts.

How a batch is computed (B questions, C choices each):
1. the B contexts, left-padded, run once (`logits_to_keep=1`: only the last position goes through the LM head);
   the last logits score every continuation's first token;
2. when a continuation is longer than one token, the context KV cache is repeated once per choice and the
   B·C continuations (right-padded) run on top of it. Letter-scored MMLU never needs step 2.

    from finescope.evaluate.mc import Request, score_requests
    out = score_requests(model, tok, [Request("The capital of France is", [" Paris", " Rome"])])
    out[0][0].logprob   # log P(" Paris" | context)

CPU example: `finescope eval --model default --tasks mmlu:anatomy --limit 20`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import distributed
from ..progress import progress
from ..tokens import encode_prompt, pad_batch, pad_id, pad_rows  # encode_prompt = lm-eval's rule: never a 2nd BOS


@dataclass
class Request:
    context: str
    continuations: list[str]


@dataclass
class Score:
    logprob: float
    """Summed log-probability of the continuation's tokens."""
    tokens: int
    """Number of continuation tokens scored."""
    greedy: bool
    """Every continuation token is the argmax of the model's distribution."""
    top1: int
    """Continuation tokens that are the argmax of the model's distribution (ties go to the lowest id)."""


def prefix_token_id(tokenizer) -> int:
    """The token an empty context is replaced by (lm-eval: BOS, else EOS)."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids), split exactly as lm-evaluation-harness splits them."""
    if context == "":
        cont = encode_prompt(tokenizer, continuation)
        return [prefix_token_id(tokenizer)], cont
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode_prompt(tokenizer, context + continuation)
    ctx = encode_prompt(tokenizer, context)
    return ctx, whole[len(ctx) :]


def max_model_length(model, default: int = 2048) -> int:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n = getattr(cfg, "max_position_embeddings", None)
    return int(n) if n else default


@dataclass
class _Encoded:
    index: int
    ctx: list[int]
    conts: list[list[int]]


def _encode_request(tokenizer, i: int, req: Request, max_len: int) -> _Encoded:
    pairs = [encode_pair(tokenizer, req.context, c) for c in req.continuations]
    ctx = pairs[0][0]
    conts = []
    for _, cont in pairs:
        if not cont:
            raise ValueError(f"request {i}: continuation {req.continuations!r} encodes to no tokens")
        conts.append(cont[: max_len - 1])
    # The context keeps its last tokens (left truncation, as lm-eval): context + longest continuation − 1 fits.
    room = max(1, max_len - max(len(c) for c in conts) + 1)
    return _Encoded(i, ctx[-room:], conts)


@torch.no_grad()
def score_requests(
    model,
    tokenizer,
    requests: list[Request],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    desc: str = "loglikelihood",
    sharded: bool = False,
) -> list[list[Score]]:
    """Log-likelihood of every continuation of every request; batched, one context forward per question.

    sharded: split the batches over the ranks (batch b on rank b mod world, batches made as in one process, so
    every question is scored with the same neighbours) and gather the scores on every rank."""
    if not requests:
        return []
    max_len = max_length or max_model_length(model)
    encoded = [_encode_request(tokenizer, i, r, max_len) for i, r in enumerate(requests)]
    # Longest first: similar lengths share a batch (little padding) and memory problems show up at once.
    order = sorted(encoded, key=lambda e: -(len(e.ctx) + max(len(c) for c in e.conts)))
    results: list[list[Score] | None] = [None] * len(requests)
    device = next(model.parameters()).device
    pad = pad_id(tokenizer)
    ranks = distributed.ranks() if sharded else distributed.Ranks()
    starts = [range(0, len(order), batch_size)[b] for b in ranks.mine(len(range(0, len(order), batch_size)))]
    bar = progress(total=sum(len(order[s : s + batch_size]) for s in starts), desc=desc + ranks.tag, unit="q")
    for start in starts:
        batch = order[start : start + batch_size]
        for enc, scores in zip(batch, _score_batch(model, batch, pad, device)):
            results[enc.index] = scores
        bar.update(len(batch))
    bar.close()
    if ranks.world > 1:
        mine = {i: r for i, r in enumerate(results) if r is not None}
        return distributed.merge_indexed(mine, len(requests), f"{desc}: gathering scores")
    return results  # type: ignore[return-value]


def _score_batch(model, batch: list[_Encoded], pad: int, device) -> list[list[Score]]:
    contexts = pad_batch([e.ctx for e in batch], pad, side="left")  # every context ends at the last column
    ids, mask = contexts["input_ids"].to(device), contexts["attention_mask"].to(device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    need_cache = any(len(c) > 1 for e in batch for c in e.conts)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=need_cache, logits_to_keep=1)
    first = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)  # (b, vocab)

    rows = [(r, c) for r, e in enumerate(batch) for c in range(len(e.conts))]
    conts = [batch[r].conts[c] for r, c in rows]
    row_q = torch.tensor([r for r, _ in rows], device=device)
    first_tok = torch.tensor([c[0] for c in conts], device=device)
    lp_first = first[row_q, first_tok]
    greedy_first = first[row_q].argmax(-1) == first_tok
    logprob = lp_first.clone()
    greedy = greedy_first.clone()
    top1 = greedy_first.long()

    if need_cache:
        cache = getattr(out, "cache", None) or out.past_key_values
        cache.reorder_cache(row_q)  # one copy of the question's cache per answer choice
        rest = pad_batch([c[:-1] for c in conts], pad)  # input c[:-1], target c[1:], right-padded
        rest_len = rest["input_ids"].shape[1]
        tgt = pad_rows([c[1:] for c in conts], 0, rest_len)  # 0, not -100: padded targets are gathered, then masked
        inp, tgt, cmask = rest["input_ids"].to(device), tgt.to(device), rest["attention_mask"].to(device)
        full_mask = torch.cat([mask[row_q], cmask], dim=1)
        start = mask[row_q].sum(-1, keepdim=True)
        cpos = start + torch.arange(rest_len, device=device).unsqueeze(0)
        out2 = model(
            input_ids=inp, attention_mask=full_mask, position_ids=cpos, use_cache=True, **{_cache_kwarg(model): cache}
        )
        lp = torch.log_softmax(out2.logits.float(), dim=-1)
        tok_lp = lp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) * cmask
        logprob = logprob + tok_lp.sum(-1)
        argmax_hit = lp.argmax(-1) == tgt
        greedy = greedy & (argmax_hit | (cmask == 0)).all(-1)
        top1 = top1 + (argmax_hit & (cmask == 1)).sum(-1)
        del cache, out2

    result: list[list[Score]] = [[] for _ in batch]
    for k, (r, _) in enumerate(rows):
        result[r].append(Score(float(logprob[k]), len(conts[k]), bool(greedy[k]), int(top1[k])))
    return result


def _cache_kwarg(model) -> str:
    """transformers ≥ 5.2x names the cache argument `cache` (`past_key_values` is deprecated); older 5.x do not."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def pick(scores: list[Score], continuations: list[str], normalise: str = "none") -> int:
    """Index of the chosen answer: highest log-likelihood, optionally per character (lm-eval acc_norm) or token."""

    def value(k: int) -> float:
        s = scores[k]
        if normalise == "chars":
            return s.logprob / max(1, len(continuations[k]))
        if normalise == "tokens":
            return s.logprob / max(1, s.tokens)
        return s.logprob

    vals = [value(k) for k in range(len(scores))]
    return max(range(len(vals)), key=lambda k: (vals[k], -k))


def mean_stderr(values: list[float]) -> float:
    """Standard error of the mean with the sample (n−1) variance, as lm-eval reports it."""
    n = len(values)
    if n < 2:
        return float("nan")
    mu = sum(values) / n
    var = sum((v - mu) ** 2 for v in values) / (n - 1)
    return math.sqrt(var / n)
