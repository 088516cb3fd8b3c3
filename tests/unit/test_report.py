"""Report rendering on a fixture run directory built from the artifact types (finescope/artifacts.py) and written
with their writer: table values, % of dense, plots, HTML, model card, and the error on an incomplete file."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from finescope import cli, storage
from finescope.artifacts import (
    ArtifactError,
    Calibration,
    CurateFeatures,
    CurateMetrics,
    EvalLossPoint,
    EvalResults,
    FilterStats,
    KeptLayer,
    LayerImportance,
    ModelIdentity,
    ModelShapes,
    ParameterCounts,
    PeakMemory,
    PipelineManifest,
    PoolSnippet,
    PruneMetrics,
    PrunePlan,
    PruneReport,
    PruneTimings,
    RecoverMetrics,
    RewriteStats,
    SaeCurationMetrics,
    SaeLayerMetrics,
    SharedLatent,
    TaskResult,
    TeacherRewriteStats,
    TrainHistory,
    TrainLossPoint,
    VariantEntry,
    Verification,
)
from finescope.config import CurateConfig, EvalConfig, PipelineConfig, PruneConfig, RecoverConfig, to_dict
from finescope.report import tables
from finescope.report.run import write_report

PNG = b"\x89PNG\r\n\x1a\n"
TASKS = ["nll:math", "mmlu:elementary_mathematics"]


def _results(acc: float, nll: float, params: int, path: str) -> EvalResults:
    return EvalResults(
        model=ModelIdentity(
            path=path, config_hash="0123456789abcdef", architecture="LlamaForCausalLM", parameters=params
        ),
        eval_config_hash="fedcba9876543210",
        config=to_dict(EvalConfig(model=path, tasks=TASKS)),
        wall_s=12.5,
        results=[
            TaskResult(
                task="nll:math",
                variant="response tokens",
                metric="nll",
                value=nll,
                stderr=0.05,
                n=40,
                extra={"perplexity": 2.718**nll, "tokens": 4000},
                wall_s=4.0,
            ),
            TaskResult(
                task="mmlu:elementary_mathematics",
                variant="cloze",
                metric="acc_norm",
                value=acc,
                stderr=0.07,
                n=40,
                chance=0.25,
                extra={"shots": 0, "acc": acc, "acc_stderr": 0.07},
                wall_s=8.5,
            ),
        ],
    )


def _curation(folder: Path) -> None:
    storage.open_stage(
        folder,
        CurateConfig(
            model="default",
            seeds="preset:math",
            selector="gradient",
            method="sae",
            top_m=2,
            pool="default",
            layers=[15],
        ),
    )
    curves = {
        "step": [0, 10, 20],
        "fvu": [1.0, 0.5, 0.3],
        "l0": [32, 32, 32],
        "dead_fraction": [0.0, 0.1, 0.2],
        "loss": [1, 0.6, 0.4],
    }
    CurateMetrics(
        method="sae",
        pool_records=6,
        seeds=2,
        top_m=2,
        selection="global",
        timings_s={"total": 299.0},
        sae_curation=SaeCurationMetrics(
            layers=[15],
            reference_texts=64,
            pool_truncated=0,
            max_length=128,
            sae={
                "layer15": SaeLayerMetrics(
                    fvu=0.3, l0=32.0, dead_fraction=0.2, tokens=1000, curves=curves, cache="/cache/sae-0"
                )
            },
        ),
        selected=2,
        selected_sources={"bigbench/elementary_math_qa": 2},
        score_quantiles_pool={"min": 0.1, "q25": 0.2, "median": 0.3, "q75": 0.5, "max": 0.9},
        score_quantiles_selected={"min": 0.8, "q25": 0.82, "median": 0.85, "q75": 0.88, "max": 0.9},
    ).write(folder / CurateMetrics.FILE)
    CurateFeatures(
        layers={
            "layer15": [
                SharedLatent(
                    latent=7,
                    lift=1.1,
                    seed_mean_activation=1.5,
                    selected_mean_activation=1.2,
                    pool_mean_activation=0.1,
                    top_pool_snippets=[
                        PoolSnippet(
                            id="a",
                            source="bigbench/elementary_math_qa",
                            activation=3.2,
                            text="a train travels 60 km in 1.5 hours",
                        )
                    ],
                )
            ]
        }
    ).write(folder / "features.json")
    storage.write_jsonl_atomic(
        folder / "selected.jsonl",
        [
            {
                "id": "a",
                "instruction": "A train travels 60 km | in 1.5 hours. Speed?",
                "response": "40",
                "source": "bigbench/elementary_math_qa",
                "score": 0.9,
                "rank": 1,
                "nearest_seed": "s1",
            }
        ],
    )
    pq.write_table(
        pa.table(
            {
                "id": list("abcdef"),
                "score": [0.9, 0.8, 0.3, 0.2, 0.1, 0.15],
                "selected": [True, True, False, False, False, False],
            }
        ),
        folder / "scores.parquet",
    )


def _pruning(folder: Path) -> None:
    storage.open_stage(folder, PruneConfig(model="default", data="runs/x/curate/c-1/selected.jsonl", ratio=0.35))
    shapes_b = ModelShapes(layers=30, attention_heads=9, kv_heads=3, head_dim=64, mlp_width=1536)
    shapes_a = ModelShapes(layers=30, attention_heads=6, kv_heads=3, head_dim=64, mlp_width=1000)
    params = ParameterCounts(
        before=134_515_008,
        after=87_000_000,
        non_embedding_before=106_000_000,
        non_embedding_after=58_300_000,
        ratio=0.353,
        non_embedding_ratio=0.45,
    )
    plan = PrunePlan(
        layers=30,
        heads=6,
        kv_heads=3,
        head_dim=64,
        intermediate=1000,
        depth=0,
        params_before=134_515_008,
        params_after=87_000_000,
        ratio_target=0.35,
        ratio_achieved=0.353,
        non_embedding_ratio=0.45,
        attention_removed=0.33,
        mlp_removed=0.35,
        granule=0.004,
    )
    report = PruneReport(
        model="default",
        family="llama",
        architecture="LlamaForCausalLM",
        data="runs/x/curate/c-1/selected.jsonl",
        calibration=Calibration(records=64, skipped=0, tokens=2911, loss_tokens=2847, batches=8),
        importance="taylor",
        head_mode="query",
        depth_importance=None,
        calibration_loss=2.3,
        plan=plan,
        parameters=params,
        shapes_before=shapes_b,
        shapes_after=shapes_a,
        dropped_blocks=[],
        kept=[
            KeptLayer(layer=i, heads=[0, 1, 2, 3, 4, 5], kv_heads=[0, 1, 2], channels=list(range(1000)))
            for i in range(30)
        ],
        importance_summary=[
            LayerImportance(
                layer=i, dropped=False, scores={"heads_kept_score_fraction": 0.8, "channels_kept_score_fraction": 0.7}
            )
            for i in range(30)
        ],
        wall_time=PruneTimings(importance_s=40.0, slice_s=1.0, save_s=2.0, verify_s=10.0, total_s=58.0),
        peak_memory_mib=PeakMemory(rss=2048.0, gpu=None),
        verification=Verification(
            new_tokens=8,
            cache_matches_no_cache=True,
            architecture="LlamaForCausalLM",
            shapes=[30, 6, 3, 64, 1000],
            max_abs_logit_diff=1e-6,
            tolerance=1e-4,
            logits_match=True,
        ),
        notes=[],
    )
    report.write(folder / PruneReport.FILE)
    PruneMetrics(
        parameters=params,
        ratio_target=0.35,
        ratio_achieved=0.353,
        shapes_after=shapes_a,
        calibration_records=64,
        calibration_loss=2.3,
        wall_time_s=58.0,
        peak_rss_mib=2048.0,
        verified=True,
    ).write(folder / PruneMetrics.FILE)


def _recovery(folder: Path, mode: str) -> None:
    storage.open_stage(
        folder,
        RecoverConfig(
            student="prune/p-1/model",
            data="curate/sae-1/selected.jsonl",
            lora_rank=32,
            lora_alpha=64,
            lr=2e-4,
            teacher="default",
            no_teacher=mode == "sft",
        ),
    )
    teacher = (
        TeacherRewriteStats(
            resumed=0,
            generated=100,
            seconds=50.0,
            new_tokens=6400,
            tokens_per_second=128.0,
            mean_new_tokens=64.0,
            teacher="default",
        )
        if mode == "tgd"
        else None
    )
    RecoverMetrics(
        records=100,
        skipped_rows=0,
        mode=mode,
        rewrite=RewriteStats(instruction_records=100, text_records=0, teacher_run=teacher),
        filters=FilterStats(
            counts={"accepted": 60, "answer_mismatch": 40}, acceptance_rate=0.6 if mode == "tgd" else None
        ),
        too_long_skipped=0,
        train=TrainHistory(
            train_examples=90,
            eval_examples=10,
            micro_batch_size=4,
            grad_accumulation=2,
            effective_batch=8,
            steps_per_epoch=6,
            total_steps=12,
            trainable_parameters=500_000,
            train_loss=[TrainLossPoint(step=s, epoch=1, loss=2 - s / 10, lr=2e-4) for s in range(1, 13)],
            eval_loss=[EvalLossPoint(epoch=0, loss=2.5), EvalLossPoint(epoch=2, loss=1.7)],
            seconds=30.0,
            seconds_per_step=2.5,
            epochs_run=2,
            eval_loss_merged=1.7,
        ),
        seconds={"finetune": 30.0, "save": 2.0, "total": 90.0},
    ).write(folder / RecoverMetrics.FILE)
    (folder / "model").mkdir(parents=True)


@pytest.fixture
def run_dir(tmp_path) -> Path:
    root = tmp_path / "run"
    stages = {
        "dense": {"eval": "eval/dense-1"},
        "pruned": {"curate": "curate/sae-1", "prune": "prune/p-1", "eval": "eval/pruned-1"},
        "pruned_tgd": {"curate": "curate/sae-1", "prune": "prune/p-1", "recover": "recover/r-1", "eval": "eval/tgd-1"},
        "pruned_sft": {"curate": "curate/sae-1", "prune": "prune/p-1", "recover": "recover/s-1", "eval": "eval/sft-1"},
    }
    from finescope.pipeline import VARIANTS

    PipelineManifest(
        name="fixture",
        model="default",
        config=to_dict(PipelineConfig(name="fixture")),
        variants={
            n: VariantEntry(
                label=VARIANTS[n].label,
                description=VARIANTS[n].description,
                data=VARIANTS[n].data,
                prune=VARIANTS[n].prune,
                recovery=VARIANTS[n].recovery,
                stages=s,
            )
            for n, s in stages.items()
        },
        stage_seconds={"curate/sae-1": 300.0, "prune/p-1": 60.0},
        last_run_wall_s=900,
    ).write(root / PipelineManifest.FILE)
    _results(0.5, 2.0, 134_515_008, "default").write(root / "eval/dense-1" / EvalResults.FILE)
    _results(0.25, 5.5, 87_000_000, "p").write(root / "eval/pruned-1" / EvalResults.FILE)
    _results(0.3, 3.0, 87_000_000, "r").write(root / "eval/tgd-1" / EvalResults.FILE)
    # pruned_sft has no results (e.g. its eval has not run yet): the row must still render.
    _curation(root / "curate/sae-1")
    _pruning(root / "prune/p-1")
    for rec, mode in (("r-1", "tgd"), ("s-1", "sft")):
        _recovery(root / f"recover/{rec}", mode)
    return root


def test_results_table_values_and_percent_of_dense(run_dir):
    data = tables.collect(run_dir)
    header, body = tables.results_table(data)
    assert header[:5] == ["Variant", "Pruned", "Data", "Recovery", "Params (M)"]
    rows = {r[0]: dict(zip(header, r)) for r in body}
    tgd = rows["FineScope (pruned + TGD)"]
    assert tgd["mmlu:elementary_mathematics acc_norm ↑"] == "0.300 (60%)"
    assert tgd["nll:math nll ↓"] == "3.000 (+1.00)"
    assert tgd["Pruned"] == "✓" and tgd["Data"] == "FineScope" and tgd["Recovery"] == "TGD"
    assert tgd["Params (M)"] == "87.0" and tgd["mean % of dense (↑ metrics above chance)"] == "60%"
    assert rows["dense"]["mean % of dense (↑ metrics above chance)"] == "reference"
    assert rows["dense"]["mmlu:elementary_mathematics acc_norm ↑"] == "0.500"
    assert rows["pruned, no recovery"]["mmlu:elementary_mathematics acc_norm ↑"] == "0.250 (50%)"
    assert rows["pruned + SFT (w/o TGD)"]["nll:math nll ↓"] == "–"  # no results yet
    md = tables.markdown_table(header, body)
    assert md.count("\n") == len(body) + 2


def test_report_files_plots_html_and_card(run_dir):
    html_path = write_report(run_dir)
    html = html_path.read_text()
    md = (run_dir / "report" / "report.md").read_text()
    plots = {p.stem for p in (run_dir / "report" / "plots").glob("*.png")}
    assert plots == {"metrics", "scores", "sae", "widths", "recovery"}  # no sweep configured → no sweep plot
    assert all((run_dir / "report" / "plots" / f"{p}.png").read_bytes().startswith(PNG) for p in plots)
    images = re.findall(r"src='data:image/png;base64,([^']+)'", html)
    assert len(images) == len(plots) and all(base64.b64decode(i).startswith(PNG) for i in images)
    assert not re.search(r"(src|href)=['\"]https?:", html)  # self-contained
    for text in ("FineScope (pruned + TGD)", "0.300 (60%)", "latent", "a train travels 60 km", "Timings", "300"):
        assert text in md and text in html
    assert "A train travels 60 km \\| in 1.5 hours" in md  # pipes inside cells are escaped
    card = (run_dir / "recover/r-1/model/README.md").read_text()
    assert "134.5M → 87.0M" in card and "9→6" in card and "1536→1000" in card
    assert "calibration 64 records from `runs/x/curate/c-1/selected.jsonl`" in card
    assert "preset:math" in card and "Apache-2.0" in card and "FineScope (pruned + TGD) ★" in card
    assert not (run_dir / "recover/s-1/model/README.md").exists()


def test_report_cli_and_bad_run_dir(run_dir, tmp_path, capsys):
    assert cli.main(["report", str(run_dir)]) == 0
    assert capsys.readouterr().out.strip().endswith("report/report.html")
    assert cli.main(["report", str(tmp_path / "nothing")]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_an_incomplete_artifact_is_refused_in_one_line_naming_file_and_field(run_dir, capsys):
    """A report must not print `None` for a key the writer never wrote: it names the file and the field."""
    path = run_dir / "prune/p-1" / PruneReport.FILE
    report = json.loads(path.read_text())
    del report["calibration"]["records"]
    report["written_by_a_newer_version"] = True  # unknown keys are fine
    path.write_text(json.dumps(report))
    with pytest.raises(ArtifactError, match=r"report\.json: missing field 'calibration\.records'"):
        write_report(run_dir)
    assert cli.main(["report", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert "calibration.records" in err and str(path) in err and "\n" not in err


# ---------------------------------------------------------------------------------------------- mean % of dense


def _result(task: str, metric: str, value: float, n: int, chance: float | None, variant: str = "v") -> TaskResult:
    return TaskResult(task=task, variant=variant, metric=metric, value=value, stderr=0.05, n=n, chance=chance, wall_s=1)


def _eval_only_run(root: Path, results: dict[str, list[TaskResult]]) -> Path:
    """A run directory with only evaluations: variant → its results."""
    from finescope.pipeline import VARIANTS

    PipelineManifest(
        name="chance",
        model="default",
        variants={
            n: VariantEntry(label=VARIANTS[n].label, description="", stages={"eval": f"eval/{n}"}) for n in results
        },
    ).write(root / PipelineManifest.FILE)
    for n, rs in results.items():
        EvalResults(
            model=ModelIdentity(path=n, config_hash="0" * 16, architecture="LlamaForCausalLM", parameters=1_000_000),
            eval_config_hash="1" * 16,
            config={},
            results=rs,
            wall_s=1.0,
        ).write(root / "eval" / n / EvalResults.FILE)
    return root


def _chance_run(root: Path) -> Path:
    # dense: MMLU at chance (0.267 at n = 60, as the 135M model), top-1 and a 4-choice MMLU slice clearly above
    # it, GSM8K 0/60 (chance 0: nothing to tell apart), NLL (↓, never in the mean)
    dense = [
        _result("nll:math", "nll", 1.35, 60, None, "response tokens"),
        _result("nll:math", "top1", 0.50, 60, 0.0, "response tokens (top-1)"),
        _result("mmlu:elementary_mathematics", "acc_norm", 0.267, 60, 0.25),
        _result("mmlu:marketing", "acc_norm", 0.60, 60, 0.25),
        _result("gsm8k", "exact_match", 0.0, 60, 0.0),
    ]
    pruned = [
        _result("nll:math", "nll", 4.3, 60, None, "response tokens"),
        _result("nll:math", "top1", 0.25, 60, 0.0, "response tokens (top-1)"),
        _result("mmlu:elementary_mathematics", "acc_norm", 0.534, 60, 0.25),  # 200 %: noise, must not count
        _result("mmlu:marketing", "acc_norm", 0.45, 60, 0.25),
        _result("gsm8k", "exact_match", 0.0, 60, 0.0),
    ]
    return _eval_only_run(root, {"dense": dense, "pruned": pruned})


def test_wilson_lower_bound():
    assert tables.wilson_lower(0.267, 60) == pytest.approx(0.1846, abs=5e-4)  # below chance 0.25
    assert tables.wilson_lower(0.5, 40) == pytest.approx(0.3742, abs=5e-4)
    assert tables.wilson_lower(0.0, 164) == 0.0 and tables.wilson_lower(1 / 60, 60) > 0


def test_mean_percent_only_over_metrics_above_chance(tmp_path):
    data = tables.collect(_chance_run(tmp_path / "run"))
    used, left = tables.summary_columns(data)
    assert [c.label for c in used] == ["nll:math top1", "mmlu:marketing acc_norm"]
    assert {c.label: why for c, why in left} == {
        "mmlu:elementary_mathematics acc_norm": "dense 0.267 is not distinguishable from chance 0.25 at n = 60",
        "gsm8k exact_match": "dense 0.000 is not distinguishable from chance 0 at n = 60",
    }
    header, body = tables.results_table(data)
    rows = {r[0]: dict(zip(header, r)) for r in body}
    pruned = rows["pruned, no recovery"]
    assert pruned[tables.SUMMARY_HEADER] == "62%"  # (50 % + 75 %) / 2; the 200 % MMLU cell is left out
    assert pruned["mmlu:elementary_mathematics acc_norm ↑"] == "0.534"  # the value stays; no % of a chance dense
    note = tables.summary_note(data)
    assert note.startswith("Mean % of dense: averaged over nll:math top1, mmlu:marketing acc_norm,")
    assert "left out: mmlu:elementary_mathematics acc_norm — dense 0.267 is not distinguishable from chance" in note
    html_path = write_report(tmp_path / "run")
    assert note in (tmp_path / "run/report/report.md").read_text()
    assert "left out: mmlu:elementary_mathematics acc_norm" in html_path.read_text()


def test_no_metric_above_chance_shows_a_dash_with_the_reason(tmp_path):
    at_chance = {
        v: [_result("mmlu:elementary_mathematics", "acc_norm", a, 60, 0.25)]
        for v, a in (("dense", 0.267), ("pruned", 0.2))
    }
    data = tables.collect(_eval_only_run(tmp_path / "run", at_chance))
    header, body = tables.results_table(data)
    assert [dict(zip(header, r))[tables.SUMMARY_HEADER] for r in body] == ["reference", "–"]
    note = tables.summary_note(data)
    assert note.startswith("Mean % of dense: – for every variant, as no ↑ metric's dense value is distinguishable")
    assert "chance 0.25 at n = 60" in note


def test_old_results_without_chance_still_render(tmp_path):
    """Files written before `chance` existed: read, shown, and left out of the mean with the reason."""
    root = _chance_run(tmp_path / "run")
    for n in ("dense", "pruned"):
        path = root / "eval" / n / EvalResults.FILE
        old = json.loads(path.read_text())
        for r in old["results"]:
            del r["chance"]
        path.write_text(json.dumps(old))
    data = tables.collect(root)
    header, body = tables.results_table(data)
    rows = {r[0]: dict(zip(header, r)) for r in body}
    assert rows["pruned, no recovery"]["mmlu:marketing acc_norm ↑"] == "0.450 (75%)"
    assert rows["pruned, no recovery"][tables.SUMMARY_HEADER] == "–"
    assert "mmlu:marketing acc_norm — no chance level recorded" in tables.summary_note(data)
    assert write_report(root).is_file()


def test_the_card_goes_to_the_kd_recovery_when_the_run_has_one():
    from types import SimpleNamespace

    from finescope.report.run import final_variant

    def run(*names):
        stages = {"dense": {"eval": "e"}, **{n: {"prune": "p", "recover": f"r-{n}", "eval": "e"} for n in names}}
        variants = {n: SimpleNamespace(stages=s) for n, s in stages.items()}
        return {"manifest": SimpleNamespace(variants=variants)}

    assert final_variant(run("pruned_tgd", "pruned_kd", "pruned_sft")) == "pruned_kd"
    assert final_variant(run("pruned_tgd", "pruned_sft")) == "pruned_tgd"
    assert final_variant(run("pruned_sft")) == "pruned_sft"
    assert final_variant(run()) is None


def test_the_recovery_plot_draws_the_training_ce_beside_the_held_out_ce():
    """With KD the step's loss mixes CE and KL (0.4 against a held-out CE of 1.3 read like overfitting): the plot
    draws the step's CE, the held-out loss's measure; runs written before `ce` name their curve the objective."""
    from finescope.artifacts import TrainLossPoint
    from finescope.report.plots import train_curve

    new = [TrainLossPoint(step=i, epoch=1, loss=0.4, lr=1e-4, ce=1.3, kd=0.2) for i in (1, 2)]
    assert train_curve(new) == ([1.3, 1.3], "train CE")
    old_kd = [TrainLossPoint(step=i, epoch=1, loss=0.4, lr=1e-4, kd=0.2) for i in (1, 2)]
    assert train_curve(old_kd) == ([0.4, 0.4], "train objective (CE + KD)")
    old_hidden = [TrainLossPoint(step=1, epoch=1, loss=0.9, lr=1e-4, hidden=0.3)]
    assert train_curve(old_hidden) == ([0.9], "train objective (CE + hidden)")
    old_both = [TrainLossPoint(step=1, epoch=1, loss=0.5, lr=1e-4, kd=0.2, hidden=0.3)]
    assert train_curve(old_both) == ([0.5], "train objective (CE + KD + hidden)")
    old_sft = [TrainLossPoint(step=1, epoch=1, loss=1.1, lr=1e-4)]
    assert train_curve(old_sft) == ([1.1], "train CE")
