from __future__ import annotations

import dataclasses
import json
import os

import pytest

from finescope import storage
from finescope.config import CurateConfig, PruneConfig
from finescope.progress import progress


def test_write_atomic_never_leaves_half_files(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "a.json"
    storage.write_json_atomic(target, {"x": 1})
    assert json.loads(target.read_text()) == {"x": 1}

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        storage.write_json_atomic(target, {"x": 2})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"x": 1}
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.json"]


def test_atomic_dir_replaces_only_on_success(tmp_path):
    out = tmp_path / "model"
    with storage.atomic_dir(out) as tmp:
        (tmp / "w.txt").write_text("v1")
    with pytest.raises(RuntimeError):
        with storage.atomic_dir(out) as tmp:
            (tmp / "w.txt").write_text("v2-partial")
            raise RuntimeError("killed")
    assert (out / "w.txt").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    with storage.atomic_dir(out) as tmp:
        (tmp / "w.txt").write_text("v2")
    assert (out / "w.txt").read_text() == "v2"


def test_config_hash_stable_and_excludes_switches():
    a, b = PruneConfig(ratio=0.3), PruneConfig(ratio=0.3)
    assert storage.config_hash(a) == storage.config_hash(b)
    assert storage.config_hash(a) != storage.config_hash(PruneConfig(ratio=0.31))
    assert storage.config_hash(a) == storage.config_hash(dataclasses.replace(a, overwrite=True))
    assert storage.config_hash({"b": 1, "a": 2}) == storage.config_hash({"a": 2, "b": 1})


def test_stage_skip_rerun_and_supersede(tmp_path):
    cfg = CurateConfig(top_m=10)
    stage = storage.open_stage(tmp_path / "curate", cfg)
    assert stage == tmp_path / "curate" and json.loads((stage / "config.json").read_text())["config"]["top_m"] == 10
    (stage / "selected.jsonl").write_text("{}\n")
    assert not storage.is_done(stage, cfg)
    # interrupted, same config: the partial folder is kept for the stage to resume
    assert storage.open_stage(tmp_path / "curate", cfg) == stage and (stage / "selected.jsonl").exists()
    storage.mark_done(stage, cfg, {"n": 10})
    assert storage.is_done(stage, cfg) and json.loads((stage / "metrics.json").read_text()) == {"n": 10}
    assert storage.open_stage(tmp_path / "curate", cfg) is None  # skipped
    # another config: the finished folder is kept aside, never deleted
    new = CurateConfig(top_m=20)
    stage2 = storage.open_stage(tmp_path / "curate", new)
    assert stage2 == stage and not (stage2 / "selected.jsonl").exists() and not storage.is_done(stage2, new)
    aside = tmp_path / f"curate.superseded-{storage.config_hash(cfg)}"
    assert (aside / "selected.jsonl").exists() and (aside / "DONE").exists()
    # an unfinished folder of another config is moved aside too
    (stage2 / "partial.bin").write_bytes(b"x")
    storage.open_stage(tmp_path / "curate", cfg)
    assert (tmp_path / f"curate.superseded-{storage.config_hash(new)}" / "partial.bin").exists()


def test_done_marker_written_last_and_corrupt_marker_means_not_done(tmp_path):
    cfg = CurateConfig()
    stage = storage.open_stage(tmp_path / "curate", cfg)
    (stage / "DONE").write_text("garbage")
    assert not storage.is_done(stage, cfg)
    assert storage.open_stage(tmp_path / "curate", cfg) == stage


def test_unrelated_folder_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    with pytest.raises(storage.StageError, match="not a finescope stage folder"):
        storage.open_stage(out, CurateConfig())
    assert (out / "precious.txt").read_text() == "keep"
    assert storage.open_stage(out, CurateConfig(), overwrite=True) == out
    assert (tmp_path / "mine.superseded-unknown" / "precious.txt").read_text() == "keep"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert storage.open_stage(empty, CurateConfig()) == empty


def test_progress_in_a_log_is_whole_lines(monkeypatch, capsys):
    monkeypatch.delenv("FINESCOPE_PROGRESS", raising=False)
    monkeypatch.setenv("FINESCOPE_PROGRESS_INTERVAL", "0")
    assert list(progress(range(3), desc="demo", unit="rec")) == [0, 1, 2]
    err = capsys.readouterr().err
    assert "\r" not in err and err.endswith("\n")
    lines = err.splitlines()
    assert all(line.startswith("demo:") for line in lines) and "3/3" in lines[-1]


def test_progress_silenced(monkeypatch, capsys):
    monkeypatch.setenv("FINESCOPE_PROGRESS", "0")
    assert list(progress(range(3), desc="demo")) == [0, 1, 2]
    assert capsys.readouterr().err == ""
