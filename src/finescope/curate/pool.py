"""The curate stage's pool, read in order as often as needed and never held whole.

    pool = Pool.open(cfg)                    # one validating pass: count, text digest (nothing kept)
    for chunk in pool.chunks(1024): ...      # lists of records, in pool order
    texts = pool.texts(cfg.encode_fields)    # an iterator over the records' texts

With `pool_sample` = k, the pool is the k records `random.Random(seed).sample(...)` picks, in that order (the
sample of indices is drawn over the record count, which picks what sampling the list of records picks), held in
memory: k is the size the user asked to work on. Without it, every pass streams the file.
"""

from __future__ import annotations

import random
from collections.abc import Container, Iterator
from dataclasses import dataclass
from pathlib import Path

from .. import hashing
from ..data import RecordStream, record_text


@dataclass
class Pool:
    path: Path
    size: int
    """Records in the pool (after sampling)."""
    digest: str
    """Digest of the encoded texts in pool order (`hashing.digest_texts`, the cache key of everything computed
    from them)."""
    fields: str
    skip_bad_rows: bool = False
    sampled: list[dict] | None = None
    """The sampled records (pool_sample), in sample order; None = the whole file, streamed."""
    skipped: int = 0

    @classmethod
    def open(cls, path: Path, *, fields: str, sample: int = 0, seed: int = 0, skip_bad_rows: bool = False) -> Pool:
        stream = RecordStream(path, skip_bad_rows=skip_bad_rows)
        digest = hashing.TextsDigest()
        total = 0
        for rec in stream:  # one pass: validation, count, and the digest of the whole pool's texts
            digest.update(record_text(rec, fields))
            total += 1
        skipped = stream.skipped
        sampled = None
        if sample and sample < total:
            wanted = random.Random(seed).sample(range(total), sample)
            slot = {j: k for k, j in enumerate(wanted)}
            picked: list[dict | None] = [None] * sample
            for j, rec in enumerate(RecordStream(path, skip_bad_rows=skip_bad_rows)):
                if j in slot:
                    picked[slot[j]] = rec
            sampled = [r for r in picked if r is not None]
        pool = cls(
            path,
            total if sampled is None else len(sampled),
            digest.hexdigest(),
            fields,
            skip_bad_rows,
            sampled,
            skipped,
        )
        if sampled is not None:
            pool.digest = hashing.digest_texts(pool.texts())
        return pool

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[dict]:
        if self.sampled is not None:
            return iter(self.sampled)
        return iter(RecordStream(self.path, skip_bad_rows=self.skip_bad_rows))

    def chunks(self, size: int) -> Iterator[list[dict]]:
        chunk: list[dict] = []
        for rec in self:
            chunk.append(rec)
            if len(chunk) == size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def texts(self) -> Iterator[str]:
        return (record_text(r, self.fields) for r in self)

    def text_chunks(self, size: int) -> Iterator[list[str]]:
        return ([record_text(r, self.fields) for r in chunk] for chunk in self.chunks(size))

    def pick(self, indices: Container[int]) -> dict[int, dict]:
        """The records at `indices` (one pass)."""
        return {i: rec for i, rec in enumerate(self) if i in indices}
