"""Activations at the hook layer: batched tokenisation, truncated forwards, disk-cached safetensors shards.

Every forward stops after the hook block (`ArchAdapter.hidden_states_at`): the blocks above it are never computed.
Padding and special tokens (BOS) are excluded from everything downstream through a token mask.

    batches = TextBatches(tokenizer, texts, max_length=128, batch_size=8)
    acts = harvest_coords(handle, {15: idx}, batches, cache_dir).layer(15)  # (tokens, K) from shards on disk
    pool = harvest_records(handle, 15, idx, batches, cache_dir)    # per-record token activations, kept in shards
    vecs = pool_codes(pool, sae.encode, "mean")                    # pooled codes from the shards, no forward
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import cache_entry, distributed
from ..progress import progress
from ..storage import write_atomic
from ..tokens import pad_batch, pad_id, pad_rows


def _padded(ids: list[list[int]], special: list[list[int]], max_length: int, pad: int) -> dict[str, torch.Tensor]:
    """A right-padded batch of token ids cut at `max_length`, with the mask of real, non-special tokens."""
    ids = [x[:max_length] for x in ids]
    special = [x[:max_length] for x in special]
    batch = pad_batch(ids, pad, min_width=1)
    # Padding counts as special: the token mask keeps real, non-special tokens only.
    batch["token_mask"] = pad_rows(special, 1, batch["input_ids"].shape[1]) == 0
    return batch


@dataclass
class TextBatches:
    """Texts tokenised in fixed batches: right padding, truncation at `max_length`, a mask of real tokens."""

    tokenizer: Any  # a Hugging Face tokenizer
    texts: list[str]
    max_length: int = 128
    batch_size: int = 8

    def __len__(self) -> int:
        return (len(self.texts) + self.batch_size - 1) // self.batch_size

    def batch(self, i: int) -> dict[str, torch.Tensor]:
        enc = _encode(self.tokenizer, self.texts[i * self.batch_size : (i + 1) * self.batch_size])
        return _padded(enc["input_ids"], enc["special_tokens_mask"], self.max_length, pad_id(self.tokenizer))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for i in range(len(self)):
            yield self.batch(i)


def _encode(tokenizer, texts: list[str]) -> dict[str, list[list[int]]]:
    return tokenizer(texts, add_special_tokens=True, truncation=False, return_special_tokens_mask=True)


def count_truncated(tokenizer, texts: list[str], max_length: int) -> int:
    """How many texts are longer than `max_length` tokens (they are cut, not dropped)."""
    n = 0
    for i in range(0, len(texts), 256):
        n += sum(len(ids) > max_length for ids in _encode(tokenizer, texts[i : i + 256])["input_ids"])
    return n


@dataclass
class LengthSortedBatches:
    """One shard's texts, tokenised once, in batches of neighbours by token count (`by_length`): `order[j]` is the
    text of the j-th row over the batches; `truncated` counts the texts cut at `max_length`."""

    ids: list[list[int]]
    special: list[list[int]]
    order: list[int]
    truncated: int
    max_length: int
    batch_size: int
    pad: int

    @classmethod
    def of(cls, tokenizer, texts: list[str], max_length: int, batch_size: int) -> LengthSortedBatches:
        enc = _encode(tokenizer, texts)
        lengths = [len(x) for x in enc["input_ids"]]
        order = by_length(lengths, max_length)
        return cls(
            ids=[enc["input_ids"][i] for i in order],
            special=[enc["special_tokens_mask"][i] for i in order],
            order=order,
            truncated=sum(n > max_length for n in lengths),
            max_length=max_length,
            batch_size=batch_size,
            pad=pad_id(tokenizer),
        )

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for s in range(0, len(self.ids), self.batch_size):
            e = s + self.batch_size
            yield _padded(self.ids[s:e], self.special[s:e], self.max_length, self.pad)


def _device(handle) -> torch.device:
    return next(handle.model.parameters()).device


def _shard_path(cache_dir: Path, i: int) -> Path:
    return cache_dir / f"shard-{i:05d}.safetensors"


SHARD_BATCHES = 16
"""Batches per cache shard."""


def sharded(
    cache_dir: Path,
    n_batches: int,
    compute: Callable[[int], dict[str, torch.Tensor]],
    desc: str,
    shard_batches: int = SHARD_BATCHES,
) -> list[dict[str, torch.Tensor]]:
    """Run `compute(batch_index)` over all batches, `shard_batches` per safetensors shard in `cache_dir`.

    Shards already on disk are loaded instead of recomputed, so a killed run resumes where it stopped. Launched
    with several ranks, rank r computes the shards s ≡ r (mod world) and, after a barrier, every rank reads all
    of them: a shard's content does not depend on the process count, so a resume may use another count.
    Returns the per-shard tensor dicts in order.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    n_shards = (n_batches + shard_batches - 1) // shard_batches
    ranks = distributed.ranks()
    mine = ranks.mine(n_shards)
    done: dict[int, dict[str, torch.Tensor]] = {}
    own_batches = sum(min(n_batches, (s + 1) * shard_batches) - s * shard_batches for s in mine)
    bar = progress(total=own_batches, desc=desc + ranks.tag, unit="batch")
    for s in mine:
        path = _shard_path(cache_dir, s)
        lo, hi = s * shard_batches, min(n_batches, (s + 1) * shard_batches)
        cached = cache_entry.load(path, cache_entry.shard_key(path))
        if cached is not None:
            done[s] = cached
            bar.update(hi - lo)
            continue
        parts: dict[str, list[torch.Tensor]] = {}
        for b in range(lo, hi):
            for k, v in compute(b).items():
                parts.setdefault(k, []).append(v)
            bar.update(1)
        shard = {k: torch.cat(v).contiguous() for k, v in parts.items()}
        write_atomic(path, cache_entry.dump(shard, cache_entry.shard_key(path)))
        done[s] = shard
    bar.close()
    distributed.barrier(f"{desc}: waiting for every rank's shards")
    return [done[s] if s in done else _read(_shard_path(cache_dir, s)) for s in range(n_shards)]


def _read(path: Path, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """A shard another rank (or this one) wrote or verified in this run: checked, never silently wrong."""
    return cache_entry.load_or_raise(path, cache_entry.shard_key(path), names)


def by_length(lengths: list[int], max_length: int) -> list[int]:
    """Indices of texts of these token counts by length (truncated at `max_length`), shortest first, ties in
    order: batches of neighbours in this order pad little (on the default pool sample, 96 % of the padded tokens
    are real, against 62 % in pool order)."""
    return sorted(range(len(lengths)), key=lambda i: min(lengths[i], max_length))


def _truncated(n: int) -> torch.Tensor:
    """A shard's count of texts cut at max_length, stored beside its tensors (read by `shard_truncated`)."""
    return torch.tensor([n], dtype=torch.long)


def shard_truncated(path: Path) -> int | None:
    """The count of truncated texts a pool shard recorded; None for a shard written before shards recorded it."""
    shard = _read(path, ["truncated"])
    return int(shard["truncated"][0]) if "truncated" in shard else None


@torch.no_grad()
def harvest_coords(handle, coords: dict[int, torch.Tensor], batches: TextBatches, cache_dir: Path) -> CoordShards:
    """Selected coordinates of every non-special token at each hook layer, written to shards (`.layer(l)` reads
    them back: (tokens, K) float32).

    The texts of each cache shard are batched by length; the rows come in that order (an SAE samples them)."""
    layers = sorted(coords)
    dev = _device(handle)
    texts, size = batches.texts, SHARD_BATCHES * batches.batch_size

    def compute(chunk: list[str]) -> dict[str, torch.Tensor]:
        sorted_batches = LengthSortedBatches.of(handle.tokenizer, chunk, batches.max_length, batches.batch_size)
        parts: dict[str, list[torch.Tensor]] = {f"layer{l}": [] for l in layers}
        for batch in sorted_batches:
            hidden = handle.adapter.hidden_states_at(
                layers, input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev)
            )
            mask = batch["token_mask"].to(dev)
            for l in layers:
                parts[f"layer{l}"].append(hidden[l][mask][:, coords[l].to(dev)].float().cpu())
        return {k: torch.cat(v) for k, v in parts.items()}

    chunks = (texts[i : i + size] for i in range(0, len(texts), size))
    return CoordShards(sharded_stream(cache_dir, chunks, compute, f"harvest activations (layers {layers})", len(texts)))


@dataclass
class CoordShards:
    """`harvest_coords`' shards on disk, read only by whoever needs them (under several ranks, the rank that trains
    the SAE): per shard, "layer{l}" (tokens, K) float32."""

    paths: list[Path]

    def layer(self, layer: int) -> torch.Tensor:
        """Every harvested token's selected coordinates at `layer`, (tokens, K)."""
        parts = []
        for path in self.paths:
            parts.append(_read(path, [f"layer{layer}"])[f"layer{layer}"])
        return torch.cat(parts)


def sharded_stream(
    cache_dir: Path,
    chunks: Iterable[list[str]],
    compute: Callable[[list[str]], dict[str, torch.Tensor]],
    desc: str,
    total: int | None = None,
) -> list[Path]:
    """Like `sharded`, over texts that arrive as a stream of per-shard chunks (`Pool.text_chunks(shard texts)`):
    shard s is computed from chunk s unless on disk, by rank s mod world, and nothing is kept in memory. Returns
    the shard paths, in order, once every rank has written its shards (read them one at a time)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    ranks = distributed.ranks()
    bar = progress(total=total, desc=desc + ranks.tag, unit="text")
    paths = []
    for s, texts in enumerate(chunks):
        path = _shard_path(cache_dir, s)
        paths.append(path)
        if s % ranks.world == ranks.rank:
            if not cache_entry.verify(path, cache_entry.shard_key(path)):
                shard = {k: v.contiguous() for k, v in compute(texts).items()}
                write_atomic(path, cache_entry.dump(shard, cache_entry.shard_key(path)))
            bar.update(len(texts))
    bar.close()
    distributed.barrier(f"{desc}: waiting for every rank's shards")
    return paths


@dataclass
class RecordActivations:
    """Selected coordinates of every real token of every record, as the shards on disk hold them: per shard,
    "acts" (tokens, K) float32 with each record's tokens contiguous and in order, and "lengths" (records,)."""

    paths: list[Path]

    @property
    def shards(self) -> Iterator[dict[str, torch.Tensor]]:
        """The shards, read one at a time."""
        return (_read(p) for p in self.paths)

    @property
    def tokens(self) -> int:
        return sum(int(s["acts"].shape[0]) for s in self.shards)

    @property
    def records(self) -> int:
        return sum(int(s["lengths"].numel()) for s in self.shards)

    def all_tokens(self) -> torch.Tensor:
        return torch.cat([s["acts"] for s in self.shards])


@torch.no_grad()
def harvest_records(
    handle,
    layer: int,
    coords: torch.Tensor,
    chunks: Iterable[list[str]],
    cache_dir: Path,
    *,
    max_length: int,
    batch_size: int,
    desc: str = "harvest",
    total: int | None = None,
) -> RecordActivations:
    """Each text's token activations at `layer` (selected coordinates), cached as shards that keep the record
    boundaries, so pooled codes can be computed later from disk (`pool_codes`) without a second forward.
    `chunks`: the texts, one list per shard (SHARD_BATCHES × batch_size texts)."""
    dev = _device(handle)
    idx = coords.to(dev)

    def compute(texts: list[str]) -> dict[str, torch.Tensor]:
        batches = LengthSortedBatches.of(handle.tokenizer, texts, max_length, batch_size)
        per_record: list[torch.Tensor] = []
        for batch in batches:
            hidden = handle.adapter.hidden_after(
                layer, input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev)
            )
            mask = batch["token_mask"].to(dev)
            per_record += [hidden[r][mask[r]][:, idx].float().cpu() for r in range(mask.shape[0])]
        in_order: list[torch.Tensor] = [torch.empty(0)] * len(texts)
        for slot, rows in zip(batches.order, per_record):
            in_order[slot] = rows
        lengths = torch.tensor([rows.shape[0] for rows in in_order], dtype=torch.long)
        return {"acts": torch.cat(in_order), "lengths": lengths, "truncated": _truncated(batches.truncated)}

    return RecordActivations(sharded_stream(cache_dir, chunks, compute, desc, total))


def _pool_tokens(codes: torch.Tensor, lengths: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool per-token codes (tokens, d) into one row per record (records, d); records without tokens get zeros."""
    n = lengths.numel()
    owner = torch.repeat_interleave(torch.arange(n), lengths)
    parts = []
    if pooling in ("mean", "mean+max"):
        total = torch.zeros(n, codes.shape[1]).index_add_(0, owner, codes)
        parts.append(total / lengths.clamp_min(1).unsqueeze(1).to(codes.dtype))
    if pooling in ("max", "mean+max"):
        where = owner.unsqueeze(1).expand(-1, codes.shape[1])
        parts.append(torch.zeros(n, codes.shape[1]).scatter_reduce_(0, where, codes, "amax", include_self=False))
    return torch.cat(parts, -1)


@torch.no_grad()
def pool_codes(
    acts: RecordActivations, encode: Callable[[torch.Tensor], torch.Tensor], pooling: str = "mean", chunk: int = 8192
) -> torch.Tensor:
    """One vector per record from cached token activations: `encode` per token, pooled as `encode_pooled` does."""
    return torch.cat(list(pool_codes_by_shard(acts, encode, pooling, chunk)))


@torch.no_grad()
def pool_codes_by_shard(
    acts: RecordActivations, encode: Callable[[torch.Tensor], torch.Tensor], pooling: str = "mean", chunk: int = 8192
) -> Iterator[torch.Tensor]:
    """`pool_codes`, one shard's records at a time."""
    for shard in acts.shards:
        tokens = shard["acts"].float()
        codes = [encode(tokens[i : i + chunk]).float().cpu() for i in range(0, tokens.shape[0], chunk)]
        flat = torch.cat(codes) if codes else encode(tokens[:0]).float().cpu()  # a shard of empty texts
        yield _pool_tokens(flat, shard["lengths"].long(), pooling)


@torch.no_grad()
def encode_pooled(
    handle,
    layer: int,
    coords: torch.Tensor,
    encode: Callable[[torch.Tensor], torch.Tensor],
    batches: TextBatches,
    cache_dir: Path,
    pooling: str = "mean",
    desc: str = "encode",
) -> torch.Tensor:
    """One vector per text: `encode` (e.g. an SAE encoder) applied to each token's selected coordinates at
    `layer`, pooled over non-special tokens (mean, max, or both concatenated). Texts without any token get a zero
    vector."""
    shards = sharded(
        cache_dir, len(batches), lambda b: _pooled_batch(handle, layer, coords, encode, batches.batch(b), pooling), desc
    )
    return torch.cat([s["pooled"] for s in shards])


@torch.no_grad()
def encode_pooled_stream(
    handle,
    layer: int,
    coords: torch.Tensor,
    encode: Callable[[torch.Tensor], torch.Tensor],
    chunks: Iterable[list[str]],
    cache_dir: Path,
    *,
    max_length: int,
    batch_size: int,
    pooling: str = "mean",
    desc: str = "encode",
    total: int | None = None,
) -> list[Path]:
    """`encode_pooled` over a stream of per-shard text chunks (SHARD_BATCHES × batch_size texts each): the shard
    files ("pooled": (texts, d_code), in the texts' order), read them one at a time. Each chunk is batched by
    length (`by_length`), which changes no record's code beyond float rounding and skips ~a third of the padded
    positions of pool order."""

    def compute(texts: list[str]) -> dict[str, torch.Tensor]:
        batches = LengthSortedBatches.of(handle.tokenizer, texts, max_length, batch_size)
        pooled = torch.cat([_pooled_batch(handle, layer, coords, encode, b, pooling)["pooled"] for b in batches])
        out = torch.empty_like(pooled)
        out[torch.tensor(batches.order, dtype=torch.long)] = pooled  # back to the texts' order
        return {"pooled": out, "truncated": _truncated(batches.truncated)}

    return sharded_stream(cache_dir, chunks, compute, desc, total)


def _pooled_batch(handle, layer: int, coords: torch.Tensor, encode, batch: dict, pooling: str) -> dict:
    dev = _device(handle)
    hidden = handle.adapter.hidden_after(
        layer, input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev)
    )
    mask = batch["token_mask"].to(dev)
    codes = encode(hidden[..., coords.to(dev)].float())  # (B, T, d_code)
    m = mask.unsqueeze(-1).float()
    parts = []
    if pooling in ("mean", "mean+max"):
        parts.append((codes * m).sum(1) / m.sum(1).clamp_min(1.0))
    if pooling in ("max", "mean+max"):  # only when asked: the default mean pooling skips the extra pass
        peak = codes.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(1)
        parts.append(torch.where(mask.any(1, keepdim=True), peak, torch.zeros_like(peak)))
    return {"pooled": torch.cat(parts, -1).cpu()}
