"""`finescope run` on tiny models: every variant end to end, shared stage outputs, rerun skips, resume, presets."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from finescope import cli, pipeline, storage
from finescope.config import PipelineConfig, load_config

FIX = Path(__file__).parents[1] / "fixtures" / "eval"
CONFIGS = Path(pipeline.__file__).parent / "configs"

MATH = [f"Tom has {i} apples and buys {i + 3} more. How many apples does he have now?" for i in range(16)]
NEWS = [
    f"Shares of company {i} rose {i % 7}% on Monday after strong quarterly earnings were reported." for i in range(16)
]


@pytest.fixture
def tiny_run(tmp_path, tiny_model_dirs, monkeypatch):
    """A pipeline YAML over a tiny Llama, a 32-record pool, 3 seeds, a generic text file; FINESCOPE_HOME in tmp."""
    monkeypatch.setenv("FINESCOPE_HOME", str(tmp_path / "home"))
    rows = [{"instruction": t, "response": f"He has {2 * i + 3} apples.", "source": "math"} for i, t in enumerate(MATH)]
    rows += [{"text": t, "source": "news"} for t in NEWS]
    (tmp_path / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "seeds.jsonl").write_text(
        "".join(json.dumps({"instruction": t, "response": "x"}) + "\n" for t in MATH[:3])
    )
    (tmp_path / "generic.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in NEWS + MATH))
    model = str(tiny_model_dirs["llama"])
    cfg = {
        "name": "tiny",
        "runs_dir": str(tmp_path / "runs"),
        "model": model,
        "variants": [
            "dense",
            "pruned",
            "pruned_tgd",
            "pruned_kd",
            "pruned_sft",
            "pruned_random",
            "pruned_generic",
            "dense_curated",
        ],
        "generic_calibration": str(tmp_path / "generic.jsonl"),
        "curate": {
            "pool": str(tmp_path / "pool.jsonl"),
            "seeds": str(tmp_path / "seeds.jsonl"),
            "reference": str(tmp_path / "generic.jsonl"),
            "num_coords": 16,
            "sae_expansion": 4,
            "sae_k": 4,
            "sae_steps": 30,
            "sae_batch_size": 64,
            "top_m": 8,
            "max_length": 32,
            "coord_samples": 8,
        },
        "prune": {"ratio": 0.3, "calib_samples": 8, "calib_length": 32},
        "recover": {
            "max_new_tokens": 8,
            "lora_rank": 4,
            "lora_alpha": 8,
            "batch_size": 4,
            "micro_batch_size": 4,
            "epochs": 1,
            "max_length": 200,
            "eval_fraction": 0.25,
            "kd_weight": 0.5,
        },
        "eval": {"tasks": [f"nll:{FIX / 'nll_small.jsonl'}"], "batch_size": 4},
    }
    import yaml

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


_ORIGINAL_STAGE_FN = pipeline._stage_fn


def _calls(monkeypatch, fail: bool = False) -> list[tuple[str, str]]:
    """Record (stage, folder) of every stage run the pipeline starts; with `fail`, every call raises."""
    calls: list[tuple[str, str]] = []
    real = _ORIGINAL_STAGE_FN

    def fake(stage):
        fn = real(stage)

        def wrapped(cfg, out):
            calls.append((stage, Path(out).name))
            if fail:
                raise AssertionError(f"{stage} ran again: {out}")
            return fn(cfg, out)

        return wrapped

    monkeypatch.setattr(pipeline, "_stage_fn", fake)
    return calls


def test_run_every_variant_shares_stages_and_rerun_skips(tiny_run, capsys, monkeypatch):
    calls = _calls(monkeypatch)
    assert cli.main(["run", "--config", str(tiny_run)]) == 0
    html = Path(capsys.readouterr().out.strip().splitlines()[-1])
    root = html.parent.parent
    assert html.name == "report.html" and html.is_file()
    manifest = json.loads((root / "pipeline.json").read_text())
    v = manifest["variants"]
    # One SAE curation, one curated-calibration prune shared by pruned / +TGD / +SFT; random has its own chain.
    assert v["pruned"]["stages"]["curate"] == v["pruned_tgd"]["stages"]["curate"] == v["pruned_sft"]["stages"]["curate"]
    assert v["pruned"]["stages"]["prune"] == v["pruned_tgd"]["stages"]["prune"] == v["pruned_sft"]["stages"]["prune"]
    assert v["pruned_random"]["stages"]["curate"] != v["pruned"]["stages"]["curate"]
    assert v["pruned_generic"]["stages"]["prune"] != v["pruned"]["stages"]["prune"]
    assert v["pruned_tgd"]["stages"]["recover"] != v["pruned_sft"]["stages"]["recover"]
    assert "prune" not in v["dense_curated"]["stages"] and "recover" in v["dense_curated"]["stages"]
    folders = [f for _, f in calls]
    assert len(folders) == len(set(folders))  # each shared stage ran once
    assert sorted(s for s, _ in calls) == sorted(["curate"] * 2 + ["prune"] * 3 + ["recover"] * 5 + ["eval"] * 8)
    assert v["pruned_kd"]["stages"]["prune"] == v["pruned_tgd"]["stages"]["prune"]
    kd = json.loads((root / v["pruned_kd"]["stages"]["recover"] / "metrics.json").read_text())
    tgd = json.loads((root / v["pruned_tgd"]["stages"]["recover"] / "metrics.json").read_text())
    assert kd["kd"]["weight"] == 0.5 and kd["mode"] == "tgd" and tgd["kd"] is None
    # The stages were wired: prune calibrated on the curation's selection, recovery trained the pruned model.
    prune_cfg = json.loads((root / v["pruned_tgd"]["stages"]["prune"] / "config.json").read_text())["config"]
    assert prune_cfg["data"] == str(root / v["pruned_tgd"]["stages"]["curate"] / "selected.jsonl")
    rec = json.loads((root / v["pruned_tgd"]["stages"]["recover"] / "config.json").read_text())["config"]
    assert rec["student"] == str(root / v["pruned_tgd"]["stages"]["prune"] / "model") and not rec["no_teacher"]
    res = json.loads((root / v["pruned_tgd"]["stages"]["eval"] / "results.json").read_text())
    assert res["model"]["path"] == str(root / v["pruned_tgd"]["stages"]["recover"] / "model")
    dense = json.loads((root / v["dense"]["stages"]["eval"] / "results.json").read_text())
    assert res["model"]["parameters"] < dense["model"]["parameters"]
    # Report and model card.
    md = (root / "report" / "report.md").read_text()
    for name in v:
        assert pipeline.VARIANTS[name].label in md
    assert "data:image/png;base64," in html.read_text() and "src='http" not in html.read_text()
    # The card goes with the model the report's answer tells the user to take, and with no other.
    from finescope.report import answer, tables

    pick = answer.pick(tables.collect(root))
    assert pick is not None and pick.row.pruned and f"**Take `{pick.row.label}`**" in md
    card = (pick.model_dir / "README.md").read_text()
    assert "## Pruning" in card and "★" in card
    assert "None: every model and data set of this run came from the user." in card  # no embedded asset used
    assert len(list(root.glob("*/*/model/README.md"))) == 1

    # Rerun: everything is done, nothing runs.
    calls_again = _calls(monkeypatch, fail=True)
    assert cli.main(["run", "--config", str(tiny_run)]) == 0
    assert calls_again == []
    assert "last run with config" not in capsys.readouterr().err
    # The same folder under another config's name: the run says which config it uses now.
    assert cli.main(["run", "--config", str(tiny_run), "--run-dir", str(root), "name=other"]) == 0
    assert f"{root}: last run with config 'tiny', this run uses 'other'" in capsys.readouterr().err
    assert calls_again == []

    # A recovery setting changes: only the recoveries and the evaluations of their models run again.
    calls_lr = _calls(monkeypatch)
    assert cli.main(["run", "--config", str(tiny_run), "recover.lr=1e-4"]) == 0
    assert sorted(s for s, _ in calls_lr) == sorted(["recover"] * 5 + ["eval"] * 5)


def test_iterative_pruning_runs_step_by_step_and_loads_in_stock_transformers(tiny_run, capsys, monkeypatch):
    """`prune_schedule` [0.15, 0.3]: prune → recover → prune (the recovered model) → recover → eval, in that order;
    the final model is smaller than the first step's and loads in stock transformers."""
    from transformers import AutoModelForCausalLM

    calls = _calls(monkeypatch)
    args = ["run", "--config", str(tiny_run), "variants=dense,pruned_kd", "prune_schedule=0.15,0.3"]
    assert cli.main(args) == 0
    root = Path(capsys.readouterr().out.strip().splitlines()[-1]).parent.parent
    v = json.loads((root / "pipeline.json").read_text())["variants"]["pruned_kd"]
    st = v["stages"]
    assert list(st) == ["curate", "prune@1", "recover@1", "prune", "recover", "eval"]
    assert v["label"].endswith("pruned in 2 steps")
    ran = [f for s, f in calls if s in ("prune", "recover")]
    assert ran == [Path(st[s]).name for s in ("prune@1", "recover@1", "prune", "recover")]
    second = json.loads((root / st["prune"] / "config.json").read_text())["config"]
    assert second["model"] == str(root / st["recover@1"] / "model")
    size = {s: json.loads((root / st[s] / "report.json").read_text())["parameters"] for s in ("prune@1", "prune")}
    assert size["prune"]["after"] < size["prune@1"]["after"] == size["prune"]["before"]
    final = AutoModelForCausalLM.from_pretrained(root / st["recover"] / "model")
    assert sum(p.numel() for p in final.parameters()) == size["prune"]["after"]
    assert "pruned in 2 steps" in (root / "report" / "report.md").read_text()


def _stage_dirs(folder):
    """Stage folders of one stage (their lock files lie beside them, hidden)."""
    return (d for d in folder.iterdir() if not d.name.startswith("."))


def test_interrupted_stage_restarts_and_finished_stages_are_skipped(tiny_run, monkeypatch):
    from finescope.recover import run as recover_run

    cfg = load_config(PipelineConfig, tiny_run, ["variants=pruned_tgd"])

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(recover_run, "fine_tune", boom)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(cfg)
    root = pipeline.run_dir_of(cfg)
    recover_dir = next(_stage_dirs(root / "recover"))
    assert not (recover_dir / "DONE").exists() and (recover_dir / "config.json").is_file()
    assert all((d / "DONE").is_file() for s in ("curate", "prune") for d in _stage_dirs(root / s))
    monkeypatch.undo()

    calls = _calls(monkeypatch)
    pipeline.run(cfg)
    assert [s for s, _ in calls] == ["recover", "eval"]
    assert (recover_dir / "DONE").is_file() and (recover_dir / "model" / "config.json").is_file()


def test_fsdp_in_the_launch_environment_is_refused_before_any_stage_runs(tiny_run, monkeypatch):
    from finescope.recover.finetune import FinetuneError

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    calls = _calls(monkeypatch)
    with pytest.raises(FinetuneError, match="^FSDP .*use DDP"):
        pipeline.run(load_config(PipelineConfig, tiny_run, ["variants=dense,pruned_tgd"]))
    assert calls == [] and not pipeline.run_dir_of(load_config(PipelineConfig, tiny_run)).exists()
    pipeline.run(load_config(PipelineConfig, tiny_run, ["variants=dense"]))  # nothing to fine-tune: runs
    assert [s for s, _ in calls] == ["eval"]


def test_vllm_with_several_processes_is_refused_before_any_stage_runs(tiny_run, monkeypatch):
    calls = _calls(monkeypatch)
    cfg = load_config(PipelineConfig, tiny_run, ["variants=dense", "num_processes=2", "eval.generation_backend=vllm"])
    with pytest.raises(pipeline.PipelineError, match="vllm with several processes"):
        pipeline.run(cfg)
    assert calls == []


def test_ablation_matrix_plan_shares_outputs(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = load_config(PipelineConfig, CONFIGS / "paper-ablations.yaml")
    planner, chains = pipeline.plan(cfg, tmp_path)
    assert set(cfg.variants) == set(pipeline.VARIANTS)
    by_stage = {}
    for job in planner.jobs.values():
        by_stage.setdefault(job.stage, []).append(job)
    # sae-jacobian, 5 other selectors, embedding, random, full
    assert len(by_stage["curate"]) == 9
    # dense eval once, although dense and the ratio sweep's r=0 point could each ask for it
    dense_evals = [j for j in by_stage["eval"] if j.cfg.model == cfg.model]
    assert len({storage.config_hash(j.cfg) for j in dense_evals}) == len(dense_evals)
    assert chains["pruned"]["prune"] is chains["pruned_tgd"]["prune"] is chains["pruned_sft"]["prune"]
    assert chains["generic_tgd"]["prune"] is chains["pruned_generic"]["prune"]
    assert chains["generic_tgd"]["prune"].cfg.data.endswith("data/generic.jsonl")
    assert chains["pruned_random"]["curate"].cfg.method == "random"
    assert chains["pruned_random"]["curate"].cfg.top_m == cfg.curate.top_m
    assert chains["selector_pca"]["curate"].cfg.selector == "pca"
    assert chains["pruned_sft"]["recover"].cfg.no_teacher and not chains["pruned_tgd"]["recover"].cfg.no_teacher


def test_own_rewrites_are_the_kd_variants_recipe_tgd_keeps_the_reference_prompt(tmp_path):
    overrides = ["recover.rewrite_prompt=own", "recover.no_rewrite=false", "recover.kd_weight=0.8"]
    cfg = load_config(PipelineConfig, CONFIGS / "paper-ablations.yaml", overrides)
    _, chains = pipeline.plan(cfg, tmp_path)
    kd, tgd = chains["pruned_kd"]["recover"].cfg, chains["pruned_tgd"]["recover"].cfg
    assert (kd.rewrite_prompt, kd.no_rewrite) == ("own", False)
    assert (tgd.rewrite_prompt, tgd.kd_weight) == ("reference", 0.0)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_preset_parses_strictly(path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unknown key in a shipped preset is a bug
        cfg = load_config(PipelineConfig, path)
    assert cfg.variants and cfg.eval.tasks


def test_presets_resolve_by_name_and_bad_names_fail():
    assert pipeline.resolve_config("quick") == CONFIGS / "quick.yaml"
    assert pipeline.resolve_config(None) == CONFIGS / "default.yaml"
    with pytest.raises(pipeline.PipelineError, match="presets: .*quick"):
        pipeline.resolve_config("nonesuch")


def test_run_cli_reports_config_errors(capsys):
    assert cli.main(["run", "--config", "quick", "curate.top_mm=3"]) == 2
    assert "did you mean 'top_m'" in capsys.readouterr().err
    assert cli.main(["run", "--config", "quick", "variants=dense,nonesuch"]) == 2
