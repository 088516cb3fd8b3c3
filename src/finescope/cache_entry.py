"""Cache entries you can trust: every safetensors file FineScope caches carries a checksum of its tensor bytes and
the key it was written for, both in its header's metadata, and every reader checks them before use.

    blob = cache_entry.dump(tensors, key="enc-ab12/shard-00000")    # bytes for storage.write_atomic
    tensors = cache_entry.load(path, key="enc-ab12/shard-00000")    # None (one line said why) when bad

A bad entry (flipped bytes, truncated, empty, unreadable, a file of another key renamed into place, no checksum
record) is reported on stderr in one line naming the file and what is wrong, removed when it can be, and `load`
returns None: the caller recomputes it, so a rerun gives exactly what an intact cache gives. `load_or_raise` is
for readers that cannot recompute (a shard verified moments ago by its writer rank): it raises `BadCacheEntry`.

The checksum is sha256 over the bytes after the header (hashlib's sha256 is the fastest of the standard
library's digests on x86; see benchmarks/cache_integrity.py for its throughput). A file verified once in this
process is not hashed again while its inode, size, mtime and ctime are unchanged: a shard checked when a stage decides to
reuse it is read later without a second hash. The files stay plain safetensors (SAELens and `safe_open` read them).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import sys
from pathlib import Path
from typing import Any

from . import FinescopeError

CHECKSUM = "finescope_sha256"
KEY = "finescope_cache_key"
_verified: dict[str, tuple[int, int, int, int]] = {}


class BadCacheEntry(FinescopeError):
    """A cache file that fails its check; the message is one line naming the file and what is wrong."""


def _stamp(path: Path) -> tuple[int, int, int, int]:
    st = path.stat()
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _split(blob: bytes | memoryview) -> tuple[dict[str, Any], memoryview]:
    """(header, data bytes) of a safetensors blob; ValueError when it is not one (empty, truncated, garbage)."""
    view = memoryview(blob)
    if len(view) < 8:
        raise ValueError(f"{len(view)} bytes, not a safetensors file (empty or truncated)")
    (n,) = struct.unpack("<Q", view[:8])
    if n > len(view) - 8:
        raise ValueError("truncated or not a safetensors file (its header would run past the end of the file)")
    try:
        header = json.loads(bytes(view[8 : 8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ValueError("its header is not valid JSON (corrupted)") from None
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object (corrupted)")
    return header, view[8 + n :]


def digest(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def dump(tensors: dict, key: str, metadata: dict[str, str] | None = None) -> bytes:
    """`safetensors.torch.save(tensors)` with the checksum of its tensor bytes and `key` in the metadata."""
    from safetensors.torch import save

    blob = save(tensors, metadata=metadata)
    header, data = _split(blob)
    header["__metadata__"] = {**(header.get("__metadata__") or {}), CHECKSUM: digest(data), KEY: key}
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # safetensors aligns the data section to 8 bytes
    return b"".join([struct.pack("<Q", len(text)), text, data])  # one copy of the tensor bytes


def check(path: str | os.PathLike, key: str) -> tuple[dict[str, Any], bytes]:
    """(metadata, file bytes) of a cache entry that passes its check; BadCacheEntry otherwise."""
    path = Path(path)
    try:
        blob = path.read_bytes()
    except OSError as e:
        raise BadCacheEntry(f"{path}: cache entry unreadable ({e.strerror or e})") from None
    try:
        header, data = _split(blob)
    except ValueError as e:
        raise BadCacheEntry(f"{path}: cache entry {e}") from None
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or CHECKSUM not in meta:
        raise BadCacheEntry(f"{path}: cache entry has no checksum record (written by an older finescope or not by it)")
    if meta.get(KEY) != key:
        raise BadCacheEntry(f"{path}: cache entry of another key ({str(meta.get(KEY))[:80]}), not {key}")
    if digest(data) != meta[CHECKSUM]:
        raise BadCacheEntry(f"{path}: cache entry content does not match its checksum (corrupted)")
    return meta, blob


def _say(msg: str) -> None:
    print(f"finescope: {msg}; recomputing it", file=sys.stderr, flush=True)


def discard(path: Path) -> None:
    """Remove a bad entry when possible (the recomputed one replaces it by rename anyway)."""
    _verified.pop(str(path), None)
    with contextlib.suppress(OSError):
        path.unlink()


def verify(path: str | os.PathLike, key: str) -> bool:
    """True when `path` is a good entry for `key`; a bad one is reported in one line, removed, and False returned.
    A missing file is False without a word (the normal cache miss)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        if _verified.get(str(path)) == _stamp(path):
            return True
        stamp = _stamp(path)
        check(path, key)
    except BadCacheEntry as e:
        _say(str(e))
        discard(path)
        return False
    except OSError as e:
        _say(f"{path}: cache entry unreadable ({e.strerror or e})")
        discard(path)
        return False
    _verified[str(path)] = stamp
    return True


def _tensors(path: Path, key: str, names: list[str] | None = None) -> tuple[dict, dict[str, Any]]:
    """The tensors (those in `names`, when given, that the file holds) and the metadata of a checked entry."""
    from safetensors.torch import load

    if _verified.get(str(path)) == _stamp(path):  # checked earlier in this process, unchanged since: no rehash
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            keys = [k for k in f.keys() if names is None or k in names]
            return {k: f.get_tensor(k) for k in keys}, (f.metadata() or {})
    stamp = _stamp(path)
    meta, blob = check(path, key)
    try:
        tensors = load(blob)
    except Exception as e:  # the checksum matched yet safetensors refuses it: a file we did not write
        raise BadCacheEntry(f"{path}: cache entry not loadable ({' '.join(str(e).split())[:200]})") from None
    _verified[str(path)] = stamp
    return {k: v for k, v in tensors.items() if names is None or k in names}, meta


def load(path: str | os.PathLike, key: str) -> dict | None:
    """The tensors of a good cache entry; None when missing, or bad (reported in one line, removed)."""
    got = load_with_metadata(path, key)
    return None if got is None else got[0]


def load_with_metadata(path: str | os.PathLike, key: str) -> tuple[dict, dict[str, Any]] | None:
    """`load`, with the file's metadata."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return _tensors(path, key)
    except BadCacheEntry as e:
        _say(str(e))
    except OSError as e:
        _say(f"{path}: cache entry unreadable ({e.strerror or e})")
    discard(path)
    return None


def load_or_raise(path: str | os.PathLike, key: str, names: list[str] | None = None) -> dict:
    """The tensors (those of `names` the file holds, when given) of a cache entry that must be good (verified by
    its writer); BadCacheEntry (removed, so a rerun recomputes it) otherwise."""
    path = Path(path)
    try:
        return _tensors(path, key, names)[0]
    except BadCacheEntry as e:
        discard(path)
        raise BadCacheEntry(f"{e}; removed: run the command again to recompute it") from None
    except OSError as e:
        discard(path)
        raise BadCacheEntry(
            f"{path}: cache entry unreadable ({e.strerror or e}); removed: run the command again to recompute it"
        ) from None


def load_with_metadata_or_raise(path: str | os.PathLike, key: str) -> tuple[dict, dict[str, Any]]:
    """`load_or_raise`, with the file's metadata (the bad file is left for its caller to handle)."""
    path = Path(path)
    try:
        return _tensors(path, key)
    except OSError as e:
        raise BadCacheEntry(f"{path}: cache entry unreadable ({e.strerror or e})") from None


def shard_key(path: str | os.PathLike) -> str:
    """The key of a cache file: its last three path parts, which hold the keyed cache folder's name
    (`curate/enc-<key>/shard-00000.safetensors`, `sae-<key>/acts/shard-00000.safetensors`), so a file moved or
    copied from another entry, or from another shard index, is told apart while the cache home may move."""
    return "/".join(Path(path).absolute().parts[-3:])
