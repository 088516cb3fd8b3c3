"""Iterative pruning (`prune_schedule`): the planner's chain of prune → recover steps, and its refusals."""

from __future__ import annotations

import math
import warnings
from dataclasses import replace
from pathlib import Path

import pytest

from finescope import pipeline
from finescope.config import ConfigError, PipelineConfig, load_config

PRESET = Path(pipeline.__file__).parent / "configs" / "default.yaml"


def _cfg(*overrides: str) -> PipelineConfig:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_config(PipelineConfig, PRESET, list(overrides))


def _plan(cfg: PipelineConfig):
    return pipeline.plan(cfg, Path("/nonexistent/run"))


def test_one_step_schedule_is_one_shot():
    """k = 1 ([prune.ratio]) plans exactly the one-shot chain: the same stage configs, hence the same folders."""
    one_shot = _cfg("variants=dense,pruned,pruned_kd,pruned_tgd")
    k1 = replace(one_shot, prune_schedule=[one_shot.prune.ratio])
    (pa, ca), (pb, cb) = _plan(one_shot), _plan(k1)
    assert {n: {s: j.folder for s, j in c.items()} for n, c in ca.items()} == {
        n: {s: j.folder for s, j in c.items()} for n, c in cb.items()
    }
    assert [j.cfg for j in pa.jobs.values()] == [j.cfg for j in pb.jobs.values()]


def test_steps_chain_prune_and_recover_and_reach_the_target():
    cfg = _cfg("variants=pruned,pruned_kd", "prune_schedule=0.1,0.2,0.35", "kd_epochs=3")
    planner, chains = _plan(cfg)
    kd = chains["pruned_kd"]
    assert list(kd) == ["curate", "prune@1", "recover@1", "prune@2", "recover@2", "prune", "recover", "eval"]
    # each step prunes the model the step before recovered, and each recovery trains on that step's pruned model
    assert kd["prune@1"].cfg.model == cfg.model
    assert kd["prune@2"].cfg.model == str(kd["recover@1"].folder / "model")
    assert kd["prune"].cfg.model == str(kd["recover@2"].folder / "model")
    for p, r in (("prune@1", "recover@1"), ("prune@2", "recover@2"), ("prune", "recover")):
        assert kd[r].cfg.student == str(kd[p].folder / "model")
        assert kd[r].cfg.teacher == cfg.model  # the dense model teaches every step
        assert kd[r].cfg.epochs == pytest.approx(1.0)  # kd_epochs 3 shared over 3 steps: one-shot's budget
    kept = math.prod(1 - kd[s].cfg.ratio for s in ("prune@1", "prune@2", "prune"))
    assert kept == pytest.approx(1 - 0.35)
    assert kd["prune@2"].cfg.ratio == pytest.approx((0.2 - 0.1) / 0.9)
    # steps run after what they need: a job's round is never before the round of the job it reads
    assert [kd[s].round for s in kd] == [0, 0, 0, 1, 1, 2, 2, 2]
    # the variant without recovery stays one-shot
    assert list(chains["pruned"]) == ["curate", "prune", "eval"] and chains["pruned"]["prune"].cfg.ratio == 0.35


@pytest.mark.parametrize(
    "schedule,match",
    [
        (
            "0.1,0.2",
            r"prune_schedule = \[0\.1, 0\.2\]: its last step reaches 0\.2, not the target prune\.ratio = 0\.35",
        ),
        ("0.2,0.2,0.35", r"step 2 \(0\.2\) does not remove more than step 1 \(0\.2\)"),
        ("0.3,0.1,0.35", r"step 2 \(0\.1\) does not remove more than step 1"),
        ("0,0.35", r"prune_schedule\[0\] = 0\.0: must be in \(0, 1\)"),
    ],
)
def test_a_schedule_that_does_not_reach_the_target_is_refused(schedule, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(f"prune_schedule={schedule}")


def test_a_schedule_without_a_variant_that_recovers_is_refused():
    with pytest.raises(ConfigError, match=r"no variant of variants \(dense, pruned\) prunes and recovers"):
        _cfg("variants=dense,pruned", "prune_schedule=0.2,0.35")
