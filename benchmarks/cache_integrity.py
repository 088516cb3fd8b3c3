"""What the cache integrity checks (`finescope.cache_entry`) cost: sha256 throughput, and the time a checked write
and a checked read add to a plain safetensors write / read of a shard. Prints one JSON object.

    .venv/bin/python benchmarks/cache_integrity.py                 # 64 MiB shards, 3 repeats
    .venv/bin/python benchmarks/cache_integrity.py --shard-mib 256 --cache ~/.cache/finescope/cache

Each cache entry is hashed once when written and once when a run first reuses it (a shard read again in the
same process, unchanged on disk, is not hashed again). The added seconds for a cache folder are therefore
(its safetensors bytes) × 2 / (checked-read-and-write overhead per byte), measured here on this machine; the
folder is `--cache`, default `$FINESCOPE_HOME/cache` (`~/.cache/finescope/cache`) when it exists.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load, save

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from finescope import cache_entry  # noqa: E402
from finescope.storage import write_atomic  # noqa: E402


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shard-mib", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    home = Path(os.environ.get("FINESCOPE_HOME") or Path.home() / ".cache" / "finescope").expanduser()
    ap.add_argument("--cache", type=Path, default=home / "cache")
    args = ap.parse_args()

    n = args.shard_mib << 20
    blob = os.urandom(n)
    sha = _best(lambda: hashlib.sha256(blob).hexdigest(), args.repeats)
    blake = _best(lambda: hashlib.blake2b(blob).hexdigest(), args.repeats)
    tensors = {"acts": torch.randn(n // 4 // 512, 512), "lengths": torch.arange(1000)}
    mib = sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "enc-plain" / "shard-00000.safetensors"
        checked = Path(tmp) / "enc-checked" / "shard-00000.safetensors"
        key = cache_entry.shard_key(checked)
        write_plain = _best(lambda: write_atomic(plain, save(tensors)), args.repeats)
        write_checked = _best(lambda: write_atomic(checked, cache_entry.dump(tensors, key)), args.repeats)
        read_plain = _best(lambda: load(plain.read_bytes()), args.repeats)

        def read_checked():
            cache_entry._verified.clear()  # a new process: the first reuse hashes the file
            assert cache_entry.load(checked, key) is not None

        read_checked_s = _best(read_checked, args.repeats)
    added_per_gib = ((write_checked - write_plain) + (read_checked_s - read_plain)) * 1024 / mib
    files = sorted(args.cache.rglob("*.safetensors")) if args.cache.is_dir() else []
    size = sum(p.stat().st_size for p in files)
    print(
        json.dumps(
            {
                "sha256_mb_s": round(n / 1e6 / sha),
                "blake2b_mb_s": round(n / 1e6 / blake),
                "shard_mib": round(mib, 1),
                "write_plain_s": round(write_plain, 4),
                "write_checked_s": round(write_checked, 4),
                "read_plain_s": round(read_plain, 4),
                "read_checked_s": round(read_checked_s, 4),
                "added_s_per_gib_written_and_reused": round(added_per_gib, 2),
                "cache_folder": str(args.cache),
                "cache_safetensors_files": len(files),
                "cache_safetensors_mib": round(size / 2**20, 1),
                "added_s_for_that_cache": round(added_per_gib * size / 2**30, 2),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
