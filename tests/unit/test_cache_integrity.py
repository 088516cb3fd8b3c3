"""Caches you can trust (issue 28): every cache entry under $FINESCOPE_HOME (curate's coordinate scores, harvests,
SAE weights, encodings; the KD targets) carries a checksum and its key, and a bad one — flipped bytes, truncated,
empty, unreadable, renamed from another key, without a checksum record — is reported in one line naming the file
and recomputed: the rerun's artifacts equal an intact cache's, never exit 0 with another result."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from finescope import cache_entry
from finescope.curate import activations
from finescope.curate import run as curate_run

# ================================================================================================ corruptions


def _flip(path: Path) -> None:
    """Overwrite 4 KiB (or the second half of a smaller file) in the middle of the tensor bytes."""
    data = bytearray(path.read_bytes())
    n = min(4096, len(data) // 4)
    mid = len(data) - n - max(0, (len(data) - n) // 4)
    data[mid : mid + n] = bytes((b ^ 0x5A) for b in data[mid : mid + n])
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _no_checksum(path: Path) -> None:
    """The same tensors, written as a plain safetensors file (an older finescope's cache): nothing to check."""
    from safetensors.torch import load

    path.write_bytes(save(load(path.read_bytes())))


CORRUPTIONS = {"flipped bytes": _flip, "truncated": _truncate, "empty": _empty, "no checksum": _no_checksum}


def _bad_lines(err: str, path: Path) -> list[str]:
    return [l for l in err.splitlines() if str(path) in l]


# ================================================================================================ the helper


def test_a_good_entry_loads_and_each_corruption_is_one_line_and_removed(tmp_path, capsys):
    tensors = {"a": torch.arange(5000, dtype=torch.float32), "b": torch.tensor([7])}
    for name, corrupt in CORRUPTIONS.items():
        path = tmp_path / "enc-k" / "shard-00000.safetensors"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(cache_entry.dump(tensors, cache_entry.shard_key(path)))
        got = cache_entry.load(path, cache_entry.shard_key(path))
        assert got is not None and torch.equal(got["a"], tensors["a"]) and torch.equal(got["b"], tensors["b"])
        corrupt(path)
        assert cache_entry.load(path, cache_entry.shard_key(path)) is None, name
        lines = _bad_lines(capsys.readouterr().err, path)
        assert len(lines) == 1 and "recomputing it" in lines[0], (name, lines)
        assert not path.exists(), name


def test_a_shard_of_another_key_renamed_into_place_is_refused(tmp_path, capsys):
    a = tmp_path / "enc-aaaa" / "shard-00000.safetensors"
    b = tmp_path / "enc-bbbb" / "shard-00000.safetensors"
    for p in (a, b):
        p.parent.mkdir()
        p.write_bytes(cache_entry.dump({"x": torch.ones(3)}, cache_entry.shard_key(p)))
    os.replace(a, b)  # a shard of enc-aaaa renamed into enc-bbbb
    assert cache_entry.load(b, cache_entry.shard_key(b)) is None
    [line] = _bad_lines(capsys.readouterr().err, b)
    assert "another key" in line and "enc-aaaa" in line
    # and another shard index of the same entry
    c = tmp_path / "enc-cccc" / "shard-00001.safetensors"
    c.parent.mkdir()
    c.write_bytes(cache_entry.dump({"x": torch.ones(3)}, cache_entry.shard_key(c)))
    os.replace(c, c.with_name("shard-00000.safetensors"))
    assert not cache_entry.verify(
        c.with_name("shard-00000.safetensors"), cache_entry.shard_key(c.with_name("shard-00000.safetensors"))
    )


def test_an_unreadable_entry_is_one_line_naming_the_os_reason(tmp_path, capsys, monkeypatch):
    path = tmp_path / "enc-k" / "shard-00000.safetensors"
    path.parent.mkdir()
    path.write_bytes(cache_entry.dump({"x": torch.ones(3)}, cache_entry.shard_key(path)))
    real = Path.read_bytes

    def denied(self):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    assert cache_entry.load(path, cache_entry.shard_key(path)) is None
    [line] = _bad_lines(capsys.readouterr().err, path)
    assert "unreadable (Permission denied)" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 file")
def test_a_chmod_000_shard_is_recomputed(tmp_path, capsys):
    calls = []
    cache = tmp_path / "enc-k"

    def compute(texts):
        calls.append(list(texts))
        return {"v": torch.tensor([float(len(t)) for t in texts])}

    first = activations.sharded_stream(cache, [["ab", "c"]], compute, "t")
    first[0].chmod(0)
    again = activations.sharded_stream(cache, [["ab", "c"]], compute, "t")
    assert len(calls) == 2 and torch.equal(
        cache_entry.load(again[0], cache_entry.shard_key(again[0]))["v"], torch.tensor([2.0, 1.0])
    )
    assert "unreadable (Permission denied)" in capsys.readouterr().err


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_sharded_recomputes_exactly_the_bad_shard(corruption, tmp_path, capsys):
    """`sharded` (batch shards) and `sharded_stream` (text-chunk shards): the bad shard alone is recomputed and the
    result equals the intact cache's."""
    calls: list[int] = []

    def compute(b: int) -> dict[str, torch.Tensor]:
        calls.append(b)
        return {"x": torch.full((2, 3), float(b)), "n": torch.tensor([b])}

    cache = tmp_path / "enc-k"
    intact = activations.sharded(cache, 5, compute, "t", shard_batches=2)
    assert calls == [0, 1, 2, 3, 4]
    bad = cache / "shard-00001.safetensors"
    CORRUPTIONS[corruption](bad)
    cache_entry._verified.clear()  # a new process
    calls.clear()
    again = activations.sharded(cache, 5, compute, "t", shard_batches=2)
    assert calls == [2, 3]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(intact, again) for k in a)
    assert len(_bad_lines(capsys.readouterr().err, bad)) == 1

    chunks = [["a", "bb"], ["ccc"], ["dddd", "e"]]
    seen: list[list[str]] = []

    def embed(texts: list[str]) -> dict[str, torch.Tensor]:
        seen.append(texts)
        return {"emb": torch.tensor([[float(len(t))] for t in texts])}

    stream = tmp_path / "emb-k"
    paths = activations.sharded_stream(stream, chunks, embed, "t")
    want = [cache_entry.load(p, cache_entry.shard_key(p))["emb"] for p in paths]
    CORRUPTIONS[corruption](paths[2])
    cache_entry._verified.clear()
    seen.clear()
    paths = activations.sharded_stream(stream, chunks, embed, "t")
    assert seen == [["dddd", "e"]]
    assert all(torch.equal(activations._read(p)["emb"], w) for p, w in zip(paths, want))


# ================================================================================================ curate


def _cache_files(home: Path) -> dict[str, Path]:
    """The curate cache's safetensors files by kind: coords, harvest, sae weights, sae coords, encodings."""
    root = home / "cache" / "curate"
    files = sorted(root.rglob("*.safetensors"))
    kinds: dict[str, Path] = {}
    for p in files:
        rel = p.relative_to(root).as_posix()
        kind = (
            "coords"
            if rel.startswith("coords-")
            else "harvest"
            if "/acts/" in rel
            else "sae weights"
            if p.name == "sae_weights.safetensors"
            else "sae coords"
            if "/sae/" in rel
            else "encoding"
        )
        kinds.setdefault(kind, p)
    return kinds


def _outputs(out: Path) -> tuple[str, bytes]:
    return (out / "selected.jsonl").read_text(), (out / "scores.parquet").read_bytes()


def _selected(out: Path) -> list[tuple]:
    return [(r["id"], r["score"]) for r in map(json.loads, (out / "selected.jsonl").read_text().splitlines())]


@pytest.fixture
def curated(tiny_model_dirs, tmp_path, cache_home):
    """An intact curate run (method sae) and its cache files."""
    from test_curate import _cfg

    cfg = _cfg(tiny_model_dirs, tmp_path)
    out = curate_run.run(cfg, tmp_path / "intact")
    return cfg, _selected(out), _cache_files(cache_home)


def test_curate_cache_holds_every_kind_of_entry_with_a_checksum(curated):
    _, _, files = curated
    assert set(files) == {"coords", "harvest", "sae weights", "sae coords", "encoding"}
    for path in files.values():
        cache_entry.check(path, cache_entry.shard_key(path))


@pytest.mark.parametrize(
    "kind,corruption",
    [
        ("encoding", "flipped bytes"),  # defect 1: the pool's encoding shard
        ("encoding", "truncated"),  # defect 3
        ("encoding", "empty"),
        ("coords", "flipped bytes"),
        ("harvest", "truncated"),
        ("sae weights", "flipped bytes"),
        ("sae coords", "no checksum"),
        ("sae weights", "no checksum"),
    ],
)
def test_a_bad_curate_cache_entry_is_reported_and_recomputed(kind, corruption, curated, tmp_path, capsys):
    cfg, intact, files = curated
    CORRUPTIONS[corruption](files[kind])
    if kind == "harvest":  # read only to train the SAE: without the trained SAE, the rerun needs it
        shutil.rmtree(files["sae weights"].parent)
    cache_entry._verified.clear()  # the rerun is a new process
    capsys.readouterr()
    out = curate_run.run(cfg, tmp_path / "again")
    assert _selected(out) == intact  # the same records, the same scores
    err = capsys.readouterr().err
    named = [l for l in err.splitlines() if files[kind].name in l and "recomputing it" in l]
    assert len(named) == 1, err[-2000:]
    cache_entry.check(files[kind], cache_entry.shard_key(files[kind]))  # replaced by a good entry


def test_a_shard_of_another_key_renamed_into_the_curate_cache_is_recomputed(curated, tmp_path, capsys):
    cfg, intact, files = curated
    encodings = sorted((files["encoding"].parents[1]).glob("enc-*/shard-00000.safetensors"))
    assert len(encodings) >= 2  # the pool's and the seeds' encodings
    target = files["encoding"]
    other = next(p for p in encodings if p != target)
    target.write_bytes(other.read_bytes())
    cache_entry._verified.clear()
    capsys.readouterr()
    out = curate_run.run(cfg, tmp_path / "again")
    assert _selected(out) == intact
    assert "cache entry of another key" in capsys.readouterr().err


# ================================================================================================ KD targets


def _kd_run(tmp_path, tiny_model_dirs, cache: Path, out: str) -> dict:
    from finescope.recover.run import run
    from test_recover import _cfg, write_records

    data = write_records(tmp_path / "data.jsonl")
    cfg = _cfg(
        tiny_model_dirs["llama"], tiny_model_dirs["qwen2"], data, kd_weight=0.5, kd_temperature=2.0,
        kd_cache=str(cache), kd_top_k=8,
    )  # fmt: skip
    folder = run(cfg, tmp_path / out)
    metrics = json.loads((folder / "metrics.json").read_text())
    weights = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*.safetensors")}
    return {"metrics": metrics, "weights": weights}


def _rewrite_kd(path: Path, change) -> None:
    """Alter one tensor of a KD targets file, keeping its metadata (key and old checksum) as it was."""
    from safetensors import safe_open
    from safetensors.torch import load

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    t = load(path.read_bytes())
    change(t)
    path.write_bytes(save(t, metadata=meta))


@pytest.mark.parametrize(
    "damage",
    [
        "logp half zeroed",
        "ids overwritten",
        "truncated",
    ],
)
def test_a_bad_kd_cache_is_recomputed_and_trains_like_the_intact_one(damage, tmp_path, tiny_model_dirs, capsys):
    from finescope.recover import kd_cache

    cache = tmp_path / "kd"
    intact = _kd_run(tmp_path, tiny_model_dirs, cache, "a")
    path = cache / kd_cache.FILE
    if damage == "logp half zeroed":
        _rewrite_kd(path, lambda t: t["logp"][: len(t["logp"]) // 2].zero_())
    elif damage == "ids overwritten":
        _rewrite_kd(path, lambda t: t["ids"].fill_(10**6))
    else:
        _truncate(path)
    cache_entry._verified.clear()
    capsys.readouterr()
    again = _kd_run(tmp_path, tiny_model_dirs, cache, "b")
    assert again["metrics"]["kd"]["cache_hit"] is False
    assert again["metrics"]["train"]["train_loss"] == intact["metrics"]["train"]["train_loss"]
    assert intact["weights"] and again["weights"] == intact["weights"]
    assert len(_bad_lines(capsys.readouterr().err, path)) == 1


# ================================================================================================ the default pool


def test_the_default_pool_is_checked_and_built_again_when_altered(cache_home, monkeypatch, capsys):
    from finescope import corpora, hashing

    builds: list[Path] = []
    text = '{"text": "a", "source": "x"}\n{"text": "b", "source": "y"}\n'

    def build(path: Path) -> Path:
        builds.append(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        corpora.manifest_path(path).write_text(json.dumps({"sha256": hashing.sha256_hex(text)}))
        path.write_text(text)
        return path

    monkeypatch.setattr(corpora, "build_default_pool", build)
    path = corpora.default_pool_path()
    assert len(builds) == 1 and corpora.default_pool_path() == path and len(builds) == 1  # intact: reused
    for damage in ("flip", "truncate", "no checksum"):
        if damage == "flip":
            path.write_text(text.replace("a", "z"))
        elif damage == "truncate":
            _truncate(path)
        else:
            corpora.manifest_path(path).write_text("{}")
        corpora._checked_pools.clear()  # a new process
        capsys.readouterr()
        assert corpora.default_pool_path() == path and path.read_text() == text
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "building the default pool again" in err[0], (damage, err)
    assert len(builds) == 4
