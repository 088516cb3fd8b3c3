"""Which recover stage the recipe benchmarks (distill_terms.py, data_curves.py, kd_batch_time.py) start from: the
run's own `pruned_kd` stage, never another config's stage left in the same run directory."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from distill_terms import kd_stage  # noqa: E402


def _stage(run: Path, name: str) -> Path:
    d = run / "recover" / name
    d.mkdir(parents=True)
    (d / "DONE").write_text("{}")
    return d


def test_the_stage_the_runs_pipeline_names_wins_over_others(tmp_path):
    _stage(tmp_path, "x-kd-00000000")  # an earlier config's stage, first by name
    own = _stage(tmp_path, "x-kd-ffffffff")
    record = {"variants": {"pruned_kd": {"stages": {"recover": "recover/x-kd-ffffffff"}}}}
    (tmp_path / "pipeline.json").write_text(json.dumps(record))
    assert kd_stage(tmp_path) == own


def test_one_finished_stage_without_a_record_is_taken(tmp_path):
    own = _stage(tmp_path, "x-kd-1")
    (tmp_path / "recover" / "x-kd-2").mkdir()  # unfinished: no DONE
    assert kd_stage(tmp_path) == own


def test_several_stages_and_no_record_refuse_naming_them(tmp_path):
    _stage(tmp_path, "x-kd-1")
    _stage(tmp_path, "x-kd-2")
    with pytest.raises(SystemExit, match=r"2 finished kd stages \(x-kd-1, x-kd-2\)"):
        kd_stage(tmp_path)


def test_no_finished_stage_refuses(tmp_path):
    (tmp_path / "recover").mkdir()
    with pytest.raises(SystemExit, match="no finished kd stage"):
        kd_stage(tmp_path)
