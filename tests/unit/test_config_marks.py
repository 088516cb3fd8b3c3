"""Settings whose role is declared on the field (`Annotated[T, mark]`), not in hand-kept lists: the lists the
pipeline uses are derived from the marks, and the planner changes no field that is not marked."""

from __future__ import annotations

import warnings
from dataclasses import fields, replace
from pathlib import Path

from finescope.config import (
    KD_SETTINGS,
    PIPELINE_SETS,
    RANKED_CALIBRATION,
    SAE_SETTINGS,
    CurateConfig,
    PipelineConfig,
    load_config,
)
from finescope.pipeline import plan
from finescope.variants import VARIANTS

PRESET = Path(__file__).resolve().parents[2] / "src" / "finescope" / "configs" / "default.yaml"


def _plan(cfg: PipelineConfig):
    variants = [v for v in VARIANTS if v != "dense_curated"]  # that one needs a local dense folder
    planner, _ = plan(replace(cfg, variants=variants, sweep_ratios=[0.2]), Path("/nonexistent/run"))
    return list(planner.jobs.values())


def test_the_planner_only_changes_marked_fields():
    """Every stage field a job's config holds differently from the pipeline config's section is one the pipeline
    declares it sets: `SetBy` (PIPELINE_SETS), the kd recipe (KD_SETTINGS), the SAE-only settings the baselines
    reset (SAE_SETTINGS), `epochs` (kd_epochs) and `ratio` (sweep_ratios). A new wiring without a mark fails here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = load_config(PipelineConfig, PRESET)
    allowed = {
        "curate": {*PIPELINE_SETS["curate"], *SAE_SETTINGS},
        "prune": {*PIPELINE_SETS["prune"], *RANKED_CALIBRATION, "ratio"},
        "recover": {*PIPELINE_SETS["recover"], *KD_SETTINGS, "epochs"},
        "eval": {*PIPELINE_SETS["eval"], "tasks"},  # the sweep evaluates its nll tasks only
    }
    changed: dict[str, set[str]] = {s: set() for s in allowed}
    for job in _plan(cfg):
        section = getattr(cfg, job.stage)
        changed[job.stage] |= {f.name for f in fields(section) if getattr(job.cfg, f.name) != getattr(section, f.name)}
    for stage, names in changed.items():
        assert names <= allowed[stage], f"{stage}: the planner sets {sorted(names - allowed[stage])} unmarked"
    # and the marks are not empty decorations: the planner does set them
    assert "method" in changed["curate"] and {"student", "data"} <= changed["recover"]


def test_baselines_reset_only_sae_settings():
    """A baseline curation (embedding, dsir, random) keeps every setting the SAE method does not own: changing an
    SAE-only setting keeps its folder; changing a shared one (top_m, device) reaches it."""
    base = PipelineConfig(variants=["pruned_random"])

    def random_curate(cfg: PipelineConfig):
        (job,) = [j for j in _plan(cfg) if j.stage == "curate" and j.cfg.method == "random"]
        return job

    ref = random_curate(base)
    for name, value in (("sae_steps", 7), ("layer_depth", 0.25), ("max_length", 64)):
        assert name in SAE_SETTINGS
        assert random_curate(replace(base, curate=replace(base.curate, **{name: value}))).folder == ref.folder
    assert random_curate(replace(base, curate=replace(base.curate, top_m=7))).cfg.top_m == 7
    assert random_curate(replace(base, curate=replace(base.curate, device="cpu"))).cfg.device == "cpu"
    shared = [f.name for f in fields(CurateConfig) if f.name not in (*SAE_SETTINGS, "method")]
    assert {"model", "pool", "seeds", "top_m", "pool_sample", "seed", "device"} <= set(shared)
