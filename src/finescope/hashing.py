"""sha256 digests: of bytes or text, of JSON-able parts, of lists of texts, of streams and files; model fingerprints.

Every cache key, content id and config hash of FineScope is made here, so each recipe exists once. The values
are stored on disk (record ids, DONE markers, cache folder names): a recipe never changes silently, and
tests/unit/test_tokens.py pins known values. A lower layer: standard library only.

    from finescope import hashing
    hashing.sha256_hex("text", 16)                   # first 16 hex digits of sha256("text")
    hashing.digest_parts("sae", 2, {"k": 32})        # cache key of several JSON-able parts
    hashing.file_sha256("model.gguf")                # streamed, full hex digest
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

_BLOCK = 1 << 20


def sha256_hex(data: str | bytes, length: int | None = None) -> str:
    """Hex sha256 of `data` (text is UTF-8 encoded), cut to its first `length` digits when given."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return hashlib.sha256(raw).hexdigest()[:length]


def digest_parts(*parts: Any, length: int = 16) -> str:
    """Short digest of JSON-able parts (sorted keys, anything else by `str`), each followed by a NUL byte, so
    ("ab", "c") and ("a", "bc") differ. The recipe of curate's cache keys."""
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:length]


class TextsDigest:
    """`digest_texts` fed one text at a time."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def update(self, text: str) -> None:
        self._h.update(text.encode("utf-8"))
        self._h.update(b"\0")

    def hexdigest(self, length: int = 16) -> str:
        return self._h.hexdigest()[:length]


def digest_texts(texts: Iterable[str], length: int = 16) -> str:
    """Short digest of a sequence of texts (UTF-8, each followed by a NUL byte): order and boundaries count."""
    h = TextsDigest()
    for t in texts:
        h.update(t)
    return h.hexdigest(length)


def sha256_stream(chunks: Iterable[bytes], *sinks: Callable[[bytes], Any]) -> str:
    """Hex sha256 of the concatenated `chunks`, passing each chunk on to every sink (e.g. a file's `write`, a
    progress bar), so data is hashed while it is copied and never held whole in memory."""
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
        for sink in sinks:
            sink(chunk)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    with open(path, "rb") as f:
        return sha256_stream(iter(lambda: f.read(_BLOCK), b""))


# ================================================================================================ models


def model_fingerprint(source: str) -> str:
    """Cache key of a model: for a local folder, a digest of its resolved path, its config.json and the names,
    sizes and modification times of its safetensors files (rewritten weights invalidate every cache built on
    them); anything else (a hub id) is its own key."""
    path = Path(source)
    if not path.is_dir():
        return source
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.glob("*.safetensors"))
    return digest_parts(str(path.resolve()), (path / "config.json").read_text(encoding="utf-8"), files)


def model_config_hash(source: str) -> str:
    """Identity of a model as reported in evaluation results: a short digest of its config.json bytes and its
    weight files' names and sizes (the same folder copied elsewhere keeps it); a hub id hashes its name.

    Not a cache key (that is `model_fingerprint`, which also sees modification times): it names which model a
    result belongs to, so it must not depend on where the folder lies."""
    src = Path(source)
    if not src.is_dir():
        return sha256_hex(str(src), 16)
    parts = [(src / "config.json").read_bytes()]
    for f in sorted(src.glob("*.safetensors")) + sorted(src.glob("*.bin")):
        parts.append(f"{f.name}:{f.stat().st_size}".encode())
    return sha256_stream(parts)[:16]
