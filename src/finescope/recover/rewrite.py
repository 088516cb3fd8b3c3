"""Teacher rewrite (SDFT-style): the teacher sees an instruction and its original response as a reference answer
and writes its own response, in batched greedy generation with left padding. Resumable: every finished batch is
appended to a partial file, and a rerun skips the records already there.

    from finescope.modeling import load
    from finescope.recover.rewrite import rewrite_records
    teacher = load("default", device="cpu")
    rows = rewrite_records(teacher.model, teacher.tokenizer, records, max_new_tokens=128,
                           partial_path=Path("runs/demo/recover/rewrites.partial.jsonl"))
    # rows: {id: {"rewrite": str, "new_tokens": int, "cut_off": bool, "prompt_hash": str}}
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from ..data import format_prompt
from ..io import progress

# SDFT's `alpaca_distill_using` template (Yang et al., 2024), the faithful default (METHOD.md §8 item 9).
DISTILL_SYSTEM = (
    "Below are an instruction that describes a task along with a reference answer. "
    "Using the reference answer as a guide, write your own response."
)
DISTILL_BODY = "### Instruction:\n{instruction}\n\n### Reference Answer:\n{reference}"
DISTILL_PLAIN = DISTILL_SYSTEM + "\n\n" + DISTILL_BODY + "\n\n### Response:\n"


def uses_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def rewrite_prompt(tokenizer, rec: dict) -> str:
    """The teacher's prompt for one instruction record.

    With a chat template: the SDFT instruction is the system turn (plus the record's own system prompt, which
    often fixes the answer format), the instruction and reference answer are the user turn. Without one: SDFT's
    plain `alpaca_distill_using` text.
    """
    body = DISTILL_BODY.format(instruction=rec["instruction"].strip(), reference=rec["response"].strip())
    own = rec.get("system") if isinstance(rec.get("system"), str) and rec.get("system").strip() else None
    if uses_chat_template(tokenizer):
        system = DISTILL_SYSTEM + (f"\n\n{own.strip()}" if own else "")
        return format_prompt(tokenizer, body, system=system)
    prefix = f"{own.strip()}\n\n" if own else ""
    return prefix + DISTILL_PLAIN.format(instruction=rec["instruction"].strip(), reference=rec["response"].strip())


def prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]


def stop_token_ids(model, tokenizer) -> set[int]:
    """Every id that ends a generation: the tokenizer's EOS and the generation config's (may be a list)."""
    ids: set[int] = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


@torch.no_grad()
def generate_batched(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    temperature: float = 0.0,
    seed: int = 0,
    desc: str = "generate",
    on_batch=None,
) -> list[dict[str, Any]]:
    """Generate a completion for every prompt; returns `{"text", "new_tokens", "cut_off"}` in prompt order.

    Prompts are sorted by length so each left-padded batch wastes little; `cut_off` is True when the model did
    not emit a stop token within `max_new_tokens`. `on_batch(indices, results)` is called after every batch.
    """
    add_special = not uses_chat_template(tokenizer)  # a chat template already renders BOS where it wants one
    stops = stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(stops), 0)
    device = next(model.parameters()).device
    encoded = [tokenizer(p, add_special_tokens=add_special)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    results: list[dict[str, Any] | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    bar = progress(total=len(prompts), desc=desc, unit="rec")
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                seq = encoded[i]
                ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
                mask[row, width - len(seq):] = 1
            kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                                          eos_token_id=sorted(stops) or None)
            if temperature > 0:
                torch.manual_seed(seed + start)
                kwargs.update(do_sample=True, temperature=temperature, top_p=1.0, top_k=0)
            else:
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
            new = out[:, width:].cpu()
            batch_results = []
            for row, i in enumerate(idx):
                toks = new[row].tolist()
                end = next((k for k, t in enumerate(toks) if t in stops), None)
                kept = toks if end is None else toks[:end]
                text = tokenizer.decode(kept, skip_special_tokens=True)
                results[i] = {"text": text.strip(), "new_tokens": len(kept), "cut_off": end is None}
                batch_results.append(results[i])
            if on_batch is not None:
                on_batch(idx, batch_results)
            bar.update(len(idx))
    finally:
        bar.close()
        model.train(was_training)
    return results  # type: ignore[return-value]


def read_partial(path: Path) -> dict[str, dict]:
    """Rows of an interrupted rewrite, by record id; a torn last line (killed mid-write) is ignored."""
    rows: dict[str, dict] = {}
    if not path.is_file():
        return rows
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "id" in row and "rewrite" in row:
                rows[row["id"]] = row
    return rows


def rewrite_records(
    model,
    tokenizer,
    records: list[dict],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    temperature: float = 0.0,
    seed: int = 0,
    partial_path: Path | None = None,
) -> tuple[dict[str, dict], dict[str, Any]]:
    """Teacher rewrites of the instruction records: `({id: row}, stats)`.

    Rows already in `partial_path` whose prompt hash still matches are reused (resume); new rows are appended
    to it after every batch, flushed and fsynced, so a killed run loses at most one batch.
    """
    todo = [r for r in records if "instruction" in r]
    prompts = {r["id"]: rewrite_prompt(tokenizer, r) for r in todo}
    done = read_partial(partial_path) if partial_path is not None else {}
    done = {k: v for k, v in done.items() if k in prompts and v.get("prompt_hash") == prompt_hash(prompts[k])}
    pending = [r for r in todo if r["id"] not in done]
    stats: dict[str, Any] = {"instruction_records": len(todo), "resumed": len(done), "generated": len(pending)}
    handle = None
    if partial_path is not None:
        partial_path.parent.mkdir(parents=True, exist_ok=True)
        if done:  # rewrite the kept rows only, dropping stale or torn ones
            tmp = partial_path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(v, ensure_ascii=False) + "\n" for v in done.values()), encoding="utf-8")
            os.replace(tmp, partial_path)
        elif partial_path.exists():
            partial_path.unlink()
        handle = open(partial_path, "a", encoding="utf-8")

    def save(indices: list[int], results: list[dict]) -> None:
        lines = []
        for i, res in zip(indices, results):
            rid = pending[i]["id"]
            row = {"id": rid, "rewrite": res["text"], "new_tokens": res["new_tokens"], "cut_off": res["cut_off"],
                   "prompt_hash": prompt_hash(prompts[rid])}
            done[rid] = row
            lines.append(json.dumps(row, ensure_ascii=False) + "\n")
        if handle is not None:
            handle.write("".join(lines))
            handle.flush()
            os.fsync(handle.fileno())

    start = time.perf_counter()
    try:
        if pending:
            generate_batched(model, tokenizer, [prompts[r["id"]] for r in pending], max_new_tokens=max_new_tokens,
                             batch_size=batch_size, temperature=temperature, seed=seed, desc="teacher rewrite",
                             on_batch=save)
    finally:
        if handle is not None:
            handle.close()
    seconds = time.perf_counter() - start
    new_tokens = sum(done[r["id"]]["new_tokens"] for r in pending)
    stats.update(seconds=round(seconds, 2), new_tokens=new_tokens,
                 tokens_per_second=round(new_tokens / seconds, 1) if seconds > 0 and new_tokens else None,
                 mean_new_tokens=round(sum(v["new_tokens"] for v in done.values()) / max(len(done), 1), 1))
    return done, stats
