"""Teacher rewrite (SDFT-style): the teacher sees an instruction and its original response as a reference answer
and writes its own response, in batched greedy generation with left padding. Resumable: every finished batch is
appended to a partial file, and a rerun skips the records already there.

    from finescope.modeling import load
    from finescope.recover.rewrite import rewrite_records
    teacher = load("default", device="cpu")
    rows, stats = rewrite_records(teacher.model, teacher.tokenizer, records, max_new_tokens=128,
                                  partial_path=Path("runs/demo/recover/rewrites.partial.jsonl"))
    # rows: {id: {"rewrite": str, "new_tokens": int, "cut_off": bool, "prompt_hash": str}}; stats: counts, timings
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, TextIO

from .. import distributed
from ..data import format_prompt
from ..generation import generate
from ..hashing import sha256_hex
from ..storage import write_atomic

# SDFT's `alpaca_distill_using` template (Yang et al., 2024), the faithful default (docs/method.md §4.1).
DISTILL_SYSTEM = (
    "Below are an instruction that describes a task along with a reference answer. "
    "Using the reference answer as a guide, write your own response."
)
DISTILL_BODY = "### Instruction:\n{instruction}\n\n### Reference Answer:\n{reference}"
DISTILL_PLAIN = DISTILL_SYSTEM + "\n\n" + DISTILL_BODY + "\n\n### Response:\n"


def uses_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def rewrite_prompt(tokenizer, rec: dict, mode: str = "reference") -> str:
    """The teacher's prompt for one instruction record.

    mode "own": the student's own prompt (`data.format_prompt` of the record's instruction and system prompt), no
    reference answer — the teacher answers as itself. mode "reference", with a chat template: the SDFT instruction
    is the system turn (plus the record's own system prompt, which often fixes the answer format), the instruction
    and reference answer are the user turn. Without one: SDFT's plain `alpaca_distill_using` text.
    """
    rec_system = rec.get("system")
    own = rec_system if isinstance(rec_system, str) and rec_system.strip() else None
    if mode == "own":
        return format_prompt(tokenizer, rec["instruction"], own)
    if mode != "reference":
        raise ValueError(f"rewrite prompt {mode!r}: must be reference or own")
    body = DISTILL_BODY.format(instruction=rec["instruction"].strip(), reference=rec["response"].strip())
    if uses_chat_template(tokenizer):
        system = DISTILL_SYSTEM + (f"\n\n{own.strip()}" if own else "")
        return format_prompt(tokenizer, body, system=system)
    prefix = f"{own.strip()}\n\n" if own else ""
    return prefix + DISTILL_PLAIN.format(instruction=rec["instruction"].strip(), reference=rec["response"].strip())


def prompt_hash(prompt: str) -> str:
    return sha256_hex(prompt, 16)


def rank_partials(path: Path) -> list[Path]:
    """The per-rank partial files of a sharded rewrite beside `path` (`<stem>.rank<r>.jsonl`)."""
    return sorted(path.parent.glob(f"{path.stem}.rank*{path.suffix}"))


def read_partial(path: Path) -> dict[str, dict]:
    """Rows of an interrupted rewrite, by record id, from `path` and the per-rank files beside it (a resume may
    use another process count); a torn line (killed mid-write) is ignored."""
    rows: dict[str, dict] = {}
    for part in [path, *rank_partials(path)]:
        if not part.is_file():
            continue
        with open(part, encoding="utf-8") as f:
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
    sharded: bool = False,
    prompt: str = "reference",
    known: dict[str, dict] | None = None,
) -> tuple[dict[str, dict], dict[str, Any]]:
    """Teacher rewrites of the instruction records: `({id: row}, stats)`.

    Rows already in `partial_path` whose prompt hash still matches are reused (resume); new rows are appended
    to it after every batch, flushed and fsynced, so a killed run loses at most one batch.

    prompt: `rewrite_prompt`'s mode (reference: SDFT's prompt with the original as a reference answer; own: the
    record's own prompt). The prompt hash of each row tells a resume which rows were made with another prompt.

    sharded (launched with several ranks): the pending records' batches are split over the ranks, each rank
    appends to its own `<partial stem>.rank<r>.jsonl`, and every rank returns all rows.

    known: answers of this teacher under these settings by prompt hash (`answer_cache`): a record whose prompt is
    there is not generated again (every rank must get the same `known`).
    """
    ranks = distributed.ranks() if sharded else distributed.Ranks()
    todo = [r for r in records if "instruction" in r]
    prompts = {r["id"]: rewrite_prompt(tokenizer, r, prompt) for r in todo}
    done = _resumable_rows(partial_path, prompts)
    resumed, from_cache = len(done), 0
    for r in todo:
        row = (known or {}).get(prompt_hash(prompts[r["id"]]))
        if row is not None and r["id"] not in done:
            done[r["id"]] = {"id": r["id"], **row}
            from_cache += 1
    if ranks.world > 1:
        distributed.barrier("reading the partial rewrites")  # every rank reads before any rank appends
    pending = [r for r in todo if r["id"] not in done]
    stats: dict[str, Any] = {
        "instruction_records": len(todo),
        "resumed": resumed,
        "from_cache": from_cache,
        "generated": len(pending),
    }
    handle = None
    if partial_path is not None:
        if ranks.world > 1:
            handle = _append_rank_partial(partial_path.with_name(f"{partial_path.stem}.rank{ranks.rank}.jsonl"))
        else:
            handle = _reopen_partial(partial_path, done)
    start = time.perf_counter()
    try:
        if pending:
            # every record in the batches an uninterrupted run would form (same prompts, same sampling seeds); the
            # batches of records already answered are skipped
            ids = [r["id"] for r in todo]
            sink = _BatchSink(ids, prompts, done, handle)
            outs = generate(
                model,
                tokenizer,
                [prompts[i] for i in ids],
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                temperature=temperature,
                seed=seed,
                desc="teacher rewrite",
                on_batch=sink.save,
                sharded=ranks.world > 1,
                skip={k for k, i in enumerate(ids) if i in done},
            )
            for rid, res in zip(ids, outs):  # the other ranks' batches
                if res:
                    done.setdefault(rid, sink.row(rid, res[0]))
    finally:
        if handle is not None:
            handle.close()
    stats.update(_throughput(time.perf_counter() - start, [done[r["id"]] for r in pending], done))
    return done, stats


def _resumable_rows(partial_path: Path | None, prompts: dict[str, str]) -> dict[str, dict]:
    """Rows of the partial file for a current record whose prompt hash still matches its prompt."""
    done = read_partial(partial_path) if partial_path is not None else {}
    return {k: v for k, v in done.items() if k in prompts and v.get("prompt_hash") == prompt_hash(prompts[k])}


def _reopen_partial(partial_path: Path, done: dict[str, dict]) -> TextIO:
    """Reset the partial file to the kept rows (dropping stale or torn ones) and open it for appending."""
    partial_path.parent.mkdir(parents=True, exist_ok=True)
    if done:
        write_atomic(partial_path, "".join(json.dumps(v, ensure_ascii=False) + "\n" for v in done.values()))
    elif partial_path.exists():
        partial_path.unlink()
    return open(partial_path, "a", encoding="utf-8")


def _append_rank_partial(path: Path) -> TextIO:
    """Open one rank's partial file for appending, after a newline if a killed run left a torn last line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torn = False
    if path.is_file() and path.stat().st_size > 0:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
    handle = open(path, "a", encoding="utf-8")
    if torn:
        handle.write("\n")
    return handle


class _BatchSink:
    """`generate`'s `on_batch`: each finished batch becomes rows in `done`, appended durably to `handle`."""

    def __init__(self, ids: list[str], prompts: dict[str, str], done: dict[str, dict], handle: TextIO | None):
        self.ids, self.prompts, self.done, self.handle = ids, prompts, done, handle

    def save(self, indices: list[int], results: list[list[dict]]) -> None:
        rows = [self.row(self.ids[i], res) for i, (res,) in zip(indices, results)]
        for row in rows:
            self.done[row["id"]] = row
        if self.handle is not None:
            self.handle.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
            self.handle.flush()
            os.fsync(self.handle.fileno())

    def row(self, rid: str, res: dict) -> dict:
        return {
            "id": rid,
            "rewrite": res["text"].strip(),
            "new_tokens": res["new_tokens"],
            "cut_off": res["cut_off"],
            "prompt_hash": prompt_hash(self.prompts[rid]),
        }


def _throughput(seconds: float, generated: list[dict], done: dict[str, dict]) -> dict[str, Any]:
    """Timing stats: wall seconds, new tokens of this run, their rate, and the mean over all rows."""
    new_tokens = sum(row["new_tokens"] for row in generated)
    return {
        "seconds": round(seconds, 2),
        "new_tokens": new_tokens,
        "tokens_per_second": round(new_tokens / seconds, 1) if seconds > 0 and new_tokens else None,
        "mean_new_tokens": round(sum(v["new_tokens"] for v in done.values()) / max(len(done), 1), 1),
    }
