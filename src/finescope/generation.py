"""Batched generation with left padding, stop tokens and stop sequences: the one generation loop of FineScope,
used by the teacher rewrite (recover) and by the generative benchmarks (evaluate).

    from finescope.generation import generate
    outs = generate(model, tok, ["Q: 2+2?\\nA:"], max_new_tokens=32, stop=["\\n\\n", "Q:"])
    outs[0][0]   # {"text": ..., "new_tokens": 5, "cut_off": False}: the first (greedy) completion of prompt 0

Prompts are tokenized one by one (`tokens.encode_prompt`: BOS added unless the text already starts with it),
sorted longest first so an out-of-memory error surfaces in the first batch and each batch pads little; a batch
ends early rather than be half padding (`batch_spans`: a long outlier prompt goes with few others). A
completion ends at the first stop token (the tokenizer's EOS and every EOS id of the generation config) or stop
sequence; a row whose completion ended stops generating while the others continue (per-row stopping), and the
batch ends when every row has ended or reached `max_new_tokens`. `cut_off` is True when neither ended it.
`is_degenerate(text)` says whether a completion loops (the recover filters and the eval's `answers:` tasks).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Collection
from typing import Any

import torch

from . import distributed
from .progress import progress
from .tokens import encode_prompt, pad_batch, pad_id

_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


def _number_values(word: str) -> tuple[float, ...]:
    return tuple(float(m.replace(",", "")) if m.count(".") <= 1 else 0.0 for m in _NUMBER.findall(word))


def loops_at_end(text: str, *, min_words: int = 20, min_repeats: int = 3, max_unit: int = 16) -> bool:
    """True when the text ends in a loop: a unit of 1-`max_unit` words repeated at least `min_repeats` times, over
    at least `min_words` words, up to the last word (which may be cut short by a token cap).

    Two words repeat when they are equal, or when they differ only in their numbers (case and trailing punctuation
    aside) and no number is smaller than its counterpart one unit earlier: that catches counting and doubling loops
    ("1. 2. 3. 4. ...", "2 * 4 = 8 pounds / 2 * 8 = 16 pounds / ...") whose words all differ. A run that repeats
    only so needs twice the repeats (a worked solution may step through three days or years), and a digit grid or
    a sum of unrelated numbers ("5 + 9 + 2 + ...") goes up and down and is no loop. A loop a model broke out of
    (text that ends otherwise) is not counted here.
    """
    words = text.split()
    n = len(words)
    shapes = [(_NUMBER.sub("0", w).strip(".,;:!?") or w).lower() for w in words]
    values = [_number_values(w) for w in words]

    def same(i: int, j: int) -> bool:
        return words[i] == words[j] or (i == n - 1 and words[j].startswith(words[i]))

    def grows(i: int, j: int) -> bool:
        same_shape = shapes[i] == shapes[j] and len(values[i]) == len(values[j])
        return same_shape and all(a >= b for a, b in zip(values[i], values[j], strict=True))

    for unit in range(1, max_unit + 1):
        k, grown = 0, False  # trailing words that repeat the word one unit before; any only by growing numbers
        while k < n - unit:
            i = n - 1 - k
            if not same(i, i - unit):
                if not grows(i, i - unit):
                    break
                grown = True
            k += 1
        repeats = min_repeats * (2 if grown else 1)
        if k and k + unit >= max(min_words, repeats * unit):
            return True
    return False


def is_degenerate(text: str) -> bool:
    """Repetition loops typical of small models under greedy decoding: a character run, a line four times, text
    whose 4-grams are mostly repeats, or a loop at the end (`loops_at_end`)."""
    if re.search(r"(.)\1{29,}", text):
        return True
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    if lines and Counter(lines).most_common(1)[0][1] >= 4:
        return True
    words = text.split()
    if len(words) >= 24:
        grams = [tuple(words[i : i + 4]) for i in range(len(words) - 3)]
        if len(set(grams)) / len(grams) < 0.5:
            return True
    return loops_at_end(text)


def cut_at_stop(text: str, stop: list[str]) -> str:
    """`text` up to (not including) the earliest stop sequence."""
    cut = len(text)
    for s in stop:
        if s:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


def stop_token_ids(model, tokenizer) -> set[int]:
    """Every id that ends a generation: the tokenizer's EOS and the generation config's (may be a list)."""
    ids: set[int] = set()
    config = getattr(model, "generation_config", None)
    for value in (getattr(config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


class _StopOnSequences:
    """A per-row stopping criterion: True for a row once its generated text contains a stop sequence.

    Not transformers' `generate(stop_strings=…)`: its StopStringCriteria also matches a stop string that begins
    in the prompt (a code prompt's last "\n" + a generated "def" halts at once), which changes completions, and
    it is no faster here (benchmarks/generation_stops.py: ~100 µs per call either way, ≪ one decoding step)."""

    def __init__(self, tokenizer, prompt_len: int, stop: list[str]):
        self.tokenizer, self.prompt_len, self.stop = tokenizer, prompt_len, [s for s in stop if s]
        self.tail = max((len(s) for s in self.stop), default=0) + 16

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.Tensor:
        new = input_ids[:, self.prompt_len :]
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if not self.stop or new.shape[1] == 0:
            return done
        texts = self.tokenizer.batch_decode(new[:, -self.tail :], skip_special_tokens=False)
        for i, t in enumerate(texts):
            done[i] = any(s in t for s in self.stop)
        return done


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int = 256,
    stop: list[str] | None = None,
    batch_size: int = 8,
    num_samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    desc: str = "generate",
    on_batch: Callable[[list[int], list[list[dict[str, Any]]]], None] | None = None,
    sharded: bool = False,
    skip: Collection[int] = (),
) -> list[list[dict[str, Any]]]:
    """`num_samples` completions per prompt, in prompt order: `{"text", "new_tokens", "cut_off"}` each.

    Greedy when `temperature` is 0, else nucleus sampling seeded per batch (reproducible for the same prompts,
    `batch_size` and `max_new_tokens`, which set the batches: `batch_spans`). `text` is the completion decoded
    without special tokens and cut at the first stop sequence, not stripped (leading whitespace matters for code). `on_batch(prompt_indices, completions)` is called after
    every batch, e.g. to append finished rows to a resumable file.

    sharded: split the batches over the ranks (batch b on rank b mod world; batches and sampling seeds as in one
    process) and gather the completions on every rank; `on_batch` then sees this rank's batches only.

    skip: indices of prompts the caller already has (a resumed run's): a batch of only such prompts is not
    generated, and their completions come back empty. The batches keep the prompts and seeds they have without
    `skip`, so a resumed sampled run draws what an uninterrupted one does.
    """
    stop = [s for s in (stop or []) if s]
    stops = stop_token_ids(model, tokenizer)
    pad = pad_id(tokenizer, fallback=min(stops, default=0))
    engine = getattr(model, "is_vllm", False)  # a vllm_backend.VllmEngine: same prompts and rows, vLLM decodes
    device = None if engine else next(model.parameters()).device
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    kwargs = _decoding_kwargs(max_new_tokens, num_samples, temperature, top_p, pad, stops)
    results: list[list[dict[str, Any]]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    ranks = distributed.ranks() if sharded else distributed.Ranks()
    skip = set(skip)
    all_spans = batch_spans([len(encoded[i]) for i in order], batch_size, max_new_tokens)
    spans = [
        all_spans[b] for b in ranks.mine(len(all_spans)) if not all(i in skip for i in order[slice(*all_spans[b])])
    ]
    total = sum(i not in skip for span in spans for i in order[slice(*span)])
    bar = progress(total=total, desc=desc + ranks.tag, unit="prompt")
    try:
        for group in _groups(spans, engine):
            done = (
                _engine_batches(model, tokenizer, encoded, order, group, kwargs, seed, stop, stops)
                if engine
                else [_hf_batch(model, tokenizer, encoded, order, group[0], kwargs, seed, stop, stops, device)]
            )
            for idx, batch in done:
                kept = [(i, b) for i, b in zip(idx, batch) if i not in skip]  # the caller has the skipped ones
                idx, batch = [i for i, _ in kept], [b for _, b in kept]
                for i, b in kept:
                    results[i] = b
                if on_batch is not None:
                    on_batch(idx, batch)
                bar.update(len(idx))
    finally:
        bar.close()
        model.train(was_training)
    if ranks.world > 1:
        mine = {i: r for i, r in enumerate(results) if r or (ranks.is_main and i in skip)}
        return distributed.merge_indexed(mine, len(prompts), f"{desc}: gathering completions")
    return results


@torch.no_grad()
def generate_ids(
    model, rows: list[list[int]], *, stops: set[int], pad: int, max_new_tokens: int, temperature: float = 0.0
) -> list[list[int]]:
    """The new token ids of one batch generated after the prompt id `rows` (left padded), each cut after its first
    stop token (kept: it is what ended the row); greedy at `temperature` 0, else sampled from the whole
    distribution at that temperature, from torch's global generator (seed it, or fork it, around the call). For
    callers that train on the ids (on-policy distillation); text comes from `generate`."""
    was_training = model.training
    model.eval()
    try:
        kwargs = _decoding_kwargs(max_new_tokens, 1, temperature, 1.0, pad, stops)
        new = _generate_batch(model, None, rows, pad, [], next(model.parameters()).device, kwargs)
    finally:
        model.train(was_training)
    out = []
    for toks in new.tolist():
        end = next((j for j, t in enumerate(toks) if t in stops), None)
        out.append(toks if end is None else toks[: end + 1])
    return out


def batch_spans(lengths: list[int], batch_size: int, max_new_tokens: int) -> list[tuple[int, int]]:
    """The batches of prompts whose token `lengths` are sorted longest first, as [start, end) spans: at most
    `batch_size` prompts each, and no more than leave half of the batch's tokens padding. A batch pads every row
    to its longest prompt (plus `max_new_tokens` of decoding), so without the second bound one long outlier makes
    its whole batch as long (among the default's KD records, a 1,330-token prompt would pad 31 others of 193-503
    tokens to its length; the rewrite leaves out prompts that fill the training length). Prompts of similar lengths
    get plain `batch_size` batches."""
    new = max(max_new_tokens, 0)
    spans: list[tuple[int, int]] = []
    start = 0
    while start < len(lengths):
        end, real = start + 1, lengths[start] + new
        while end < len(lengths) and end - start < batch_size:
            row = lengths[end] + new
            if (end - start + 1) * (lengths[start] + new) > 2 * (real + row):
                break
            end, real = end + 1, real + row
        spans.append((start, end))
        start = end
    return spans


def _groups(spans: list[tuple[int, int]], engine: bool) -> list[list[tuple[int, int]]]:
    """The batches run together: one at a time for transformers; for a vLLM engine (which batches by itself and
    pads nothing), consecutive batches up to `vllm_backend.CHUNK` prompts per call (at least one batch)."""
    if not engine:
        return [[span] for span in spans]
    from .vllm_backend import CHUNK

    groups: list[list[tuple[int, int]]] = []
    held = 0
    for span in spans:
        size = span[1] - span[0]
        if not groups or held + size > CHUNK:
            groups.append([])
            held = 0
        groups[-1].append(span)
        held += size
    return groups


def _hf_batch(model, tokenizer, encoded, order, span, kwargs, seed, stop, stops, device):
    """(prompt indices, completions) of the batch `span` of `order`, generated by the transformers model."""
    idx = order[slice(*span)]
    if kwargs["do_sample"]:
        torch.manual_seed(seed + span[0])
    pad = kwargs["pad_token_id"]
    new = _generate_batch(model, tokenizer, [encoded[i] for i in idx], pad, stop, device, kwargs)
    return idx, _completions(tokenizer, new.tolist(), stops, stop, kwargs["num_return_sequences"])


def _engine_batches(engine, tokenizer, encoded, order, spans, kwargs, seed, stop, stops):
    """[(prompt indices, completions)] of the batches `spans` of `order`, decoded by a vLLM engine in one call."""
    batches = [order[slice(*span)] for span in spans]
    flat = [i for idx in batches for i in idx]
    outs = engine.complete(
        [encoded[i] for i in flat],
        indices=flat,
        max_new_tokens=kwargs["max_new_tokens"],
        num_samples=kwargs["num_return_sequences"],
        temperature=kwargs["temperature"] or 0.0,
        top_p=kwargs["top_p"] or 1.0,
        seed=seed,
        stop=stop,
        stop_ids=stops,
    )
    by_prompt = dict(zip(flat, outs))
    done = []
    for idx in batches:
        rows = [ids for i in idx for ids, _ in by_prompt[i]]
        hit_limit = [reason == "length" for i in idx for _, reason in by_prompt[i]]
        done.append((idx, _completions(tokenizer, rows, stops, stop, kwargs["num_return_sequences"], hit_limit)))
    return done


def _decoding_kwargs(
    max_new_tokens: int, num_samples: int, temperature: float, top_p: float, pad: int, stops: set[int]
) -> dict[str, Any]:
    """`model.generate` arguments: greedy (every sampling knob unset) or nucleus sampling without top-k."""
    kwargs: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens,
        num_return_sequences=num_samples,
        pad_token_id=pad,
        eos_token_id=sorted(stops) or None,
    )
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kwargs


def _generate_batch(
    model, tokenizer, rows: list[list[int]], pad: int, stop: list[str], device, kwargs: dict[str, Any]
) -> torch.Tensor:
    """The new tokens (rows × samples, ≤ max_new_tokens) generated after the left-padded prompt `rows`."""
    from transformers import StoppingCriteriaList

    batch = pad_batch(rows, pad, side="left")
    width = batch["input_ids"].shape[1]
    criteria = StoppingCriteriaList([_StopOnSequences(tokenizer, width, stop)]) if stop else None
    out = model.generate(
        input_ids=batch["input_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device),
        stopping_criteria=criteria,
        **kwargs,
    )
    return out[:, width:].cpu()


def _completions(
    tokenizer,
    rows: list[list[int]],
    stops: set[int],
    stop: list[str],
    num_samples: int,
    hit_limit: list[bool] | None = None,
) -> list[list[dict[str, Any]]]:
    """Per prompt, its samples' `{"text", "new_tokens", "cut_off"}` (`rows`: each sample's new token ids, samples
    of a prompt adjacent): ids up to the first stop token, decoded without special tokens, cut at the first stop
    sequence. `hit_limit` (vLLM): per sample, whether decoding stopped at max_new_tokens; without it, a sample
    is cut off when neither a stop token nor a stop sequence ended it."""
    batch: list[list[dict[str, Any]]] = [[] for _ in range(len(rows) // num_samples)]
    for k, toks in enumerate(rows):
        end = next((j for j, t in enumerate(toks) if t in stops), None)
        kept = toks if end is None else toks[:end]
        full = tokenizer.decode(kept, skip_special_tokens=True)
        text = cut_at_stop(full, stop)
        ended = end is not None or len(text) < len(full)  # a stop token, or a stop sequence cut it
        cut_off = not ended if hit_limit is None else hit_limit[k] and not ended
        batch[k // num_samples].append({"text": text, "new_tokens": len(kept), "cut_off": cut_off})
    return batch
