"""The teacher's top-k next-token distribution of every training example, computed once and kept on disk.

One safetensors file: `ids` (N, k) int32, `logp` (N, k) and `log_rest` (N,) float32 over the N labelled positions
of all examples, and `offsets` (examples + 1) int64; its metadata holds the key it was built for. The key digests
the teacher (`hashing.model_fingerprint`: path, config and weight files), the examples' token ids and labels, τ
and k, so a file built from another teacher or other data is detected and rebuilt, never read.

    targets = load_or_build(path, key, lambda: teacher_top_k(model, examples, settings, micro_batch_size=8))
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .. import assets, cache_entry, hashing
from ..progress import progress
from ..storage import write_atomic
from ..tokens import pad_batch
from .distill import TopK, labelled_logits, top_k_of
from .loss_terms import KdSettings

VERSION = "1"
FILE = "kd-targets.safetensors"


def _say(msg: str) -> None:
    print(f"recover: {msg}", file=sys.stderr, flush=True)


def cache_key(teacher_source: str, examples, s: KdSettings) -> str:
    """What the cached targets depend on: teacher, examples (ids and KD positions, in order), τ and k."""
    data = hashing.digest_parts(*[(e.input_ids, e.kd_labels or e.labels) for e in examples], length=32)
    return hashing.digest_parts(VERSION, hashing.model_fingerprint(teacher_source), data, s.temperature, s.top_k)


def cache_path(setting: str, key: str) -> Path:
    """`auto`: under `$FINESCOPE_HOME/cache/recover/`, one file per key; a folder: its kd-targets.safetensors."""
    if setting == "auto":
        return assets.home() / "cache" / "recover" / f"kd-{key}.safetensors"
    return Path(setting).expanduser() / FILE


@torch.no_grad()
def teacher_top_k(model, examples, s: KdSettings, micro_batch_size: int, pad_id: int) -> list[TopK]:
    """The teacher's top-k distribution at each example's KD positions, one `TopK` per example (in their order; the
    batches go longest first, so like lengths share one and little of it is padding)."""
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    out: dict[int, TopK] = {}
    bar = progress(total=len(examples), desc="teacher logits", unit="ex")
    for start in range(0, len(order), micro_batch_size):
        chunk = order[start : start + micro_batch_size]
        for i, top in zip(chunk, batch_top_k(model, [examples[i] for i in chunk], s, pad_id)):
            out[i] = top
        bar.update(len(chunk))
    bar.close()
    return [out[i] for i in range(len(examples))]


@torch.no_grad()
def batch_top_k(model, examples, s: KdSettings, pad_id: int) -> list[TopK]:
    """One teacher pass over `examples` as a single batch: each one's top-k at its KD positions (on the CPU)."""
    device = next(model.parameters()).device
    batch = pad_batch([e.input_ids for e in examples], pad_id, labels=[e.kd_labels or e.labels for e in examples])
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    top = top_k_of(labelled_logits(logits.logits, batch["labels"].to(device)), s.temperature, s.top_k)
    out, at = [], 0
    for e in examples:
        n = e.kd_targets
        out.append(TopK(top.ids[at : at + n].cpu(), top.logp[at : at + n].cpu(), top.log_rest[at : at + n].cpu()))
        at += n
    return out


def write(path: Path, key: str, parts: list[TopK]) -> None:
    whole = TopK.cat(parts)
    offsets = torch.tensor([0] + [len(p.log_rest) for p in parts]).cumsum(0)
    tensors = {
        "ids": whole.ids.to(torch.int32).contiguous(),
        "logp": whole.logp.contiguous(),
        "log_rest": whole.log_rest.contiguous(),
        "offsets": offsets,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, cache_entry.dump(tensors, key, metadata={"key": key, "version": VERSION}))


def read(path: Path, key: str) -> list[TopK] | None:
    """The cached targets, or None when the file is missing, unreadable, altered (its checksum, `cache_entry`) or
    built for another key: said in one line, and the caller rebuilds it."""
    if not path.is_file():
        return None
    found = None
    with contextlib.suppress(SafetensorError, OSError, ValueError), safe_open(str(path), framework="pt") as f:
        found = (f.metadata() or {}).get("key")
    if found is not None and found != key:
        _say(f"{path}: KD targets of another teacher or other data (key {found}, want {key}); recomputing")
        return None
    t = cache_entry.load(path, key)
    if t is None:
        return None
    problem = _inconsistent(t)
    if problem:
        _say(f"{path}: KD targets {problem}; recomputing")
        cache_entry.discard(path)
        return None
    off = t["offsets"].tolist()
    ids = t["ids"].long()
    return [TopK(ids[a:b], t["logp"][a:b], t["log_rest"][a:b]) for a, b in zip(off, off[1:])]


def _inconsistent(t: dict[str, torch.Tensor]) -> str | None:
    """What is wrong with the tensors of a KD targets file, or None: shapes and offsets agree, ids are token ids."""
    names = {"ids", "logp", "log_rest", "offsets"}
    if set(t) != names:
        return f"hold tensors {sorted(t)}, not {sorted(names)}"
    ids, logp, rest, off = t["ids"], t["logp"], t["log_rest"], t["offsets"]
    n = int(rest.shape[0]) if rest.dim() == 1 else -1
    if ids.dim() != 2 or ids.shape != logp.shape or ids.shape[0] != n or off.dim() != 1 or off.numel() < 1:
        return "have inconsistent shapes"
    if int(off[0]) != 0 or int(off[-1]) != n or bool((off[1:] < off[:-1]).any()):
        return "have inconsistent offsets"
    if ids.numel() and int(ids.min()) < 0:
        return "hold negative token ids"
    return None


def load_or_build(path: Path, key: str, build: Callable[[], list[TopK]]) -> tuple[list[TopK], bool]:
    """The targets from `path` when it holds this key, else built and written there; and whether it was a hit."""
    cached = read(path, key)
    if cached is not None:
        return cached, True
    parts = build()
    write(path, key, parts)
    return parts, False
