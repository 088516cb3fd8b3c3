"""Report rendering on a hand-written fixture run directory: table values, % of dense, plots, HTML, model card."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from finescope import cli
from finescope.report import tables
from finescope.report.run import write_report

PNG = b"\x89PNG\r\n\x1a\n"


def _w(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _results(acc: float, nll: float, params: int, path: str) -> dict:
    return {"model": {"path": path, "parameters": params}, "wall_s": 12.5, "results": [
        {"task": "nll:math", "variant": "response tokens", "metric": "nll", "value": nll, "stderr": 0.05, "n": 40},
        {"task": "mmlu:elementary_mathematics", "variant": "cloze", "metric": "acc_norm", "value": acc,
         "stderr": 0.07, "n": 40}]}


@pytest.fixture
def run_dir(tmp_path) -> Path:
    root = tmp_path / "run"
    stages = {"dense": {"eval": "eval/dense-1"},
              "pruned": {"curate": "curate/sae-1", "prune": "prune/p-1", "eval": "eval/pruned-1"},
              "pruned_tgd": {"curate": "curate/sae-1", "prune": "prune/p-1", "recover": "recover/r-1",
                             "eval": "eval/tgd-1"},
              "pruned_sft": {"curate": "curate/sae-1", "prune": "prune/p-1", "recover": "recover/s-1",
                             "eval": "eval/sft-1"}}
    from finescope.pipeline import VARIANTS

    _w(root / "pipeline.json", {
        "name": "fixture", "model": "default", "config": {"name": "fixture"},
        "variants": {n: {"label": VARIANTS[n].label, "description": VARIANTS[n].description,
                         "data": VARIANTS[n].data, "prune": VARIANTS[n].prune, "recovery": VARIANTS[n].recovery,
                         "stages": s} for n, s in stages.items()},
        "stage_seconds": {"curate/sae-1": 300.0, "prune/p-1": 60.0}, "last_run_wall_s": 900})
    _w(root / "eval/dense-1/results.json", _results(0.5, 2.0, 134_515_008, "default"))
    _w(root / "eval/pruned-1/results.json", _results(0.25, 5.5, 87_000_000, "p"))
    _w(root / "eval/tgd-1/results.json", _results(0.3, 3.0, 87_000_000, "r"))
    # pruned_sft has no results (e.g. its eval has not run yet): the row must still render.
    curves = {"step": [0, 10, 20], "fvu": [1.0, 0.5, 0.3], "l0": [32, 32, 32], "dead_fraction": [0.0, 0.1, 0.2],
              "loss": [1, 0.6, 0.4]}
    _w(root / "curate/sae-1/metrics.json", {
        "method": "sae", "pool_records": 6, "seeds": 2, "selected": 2, "layers": [15],
        "selected_sources": {"bigbench/elementary_math_qa": 2},
        "score_quantiles_pool": {"min": 0.1, "q25": 0.2, "median": 0.3, "q75": 0.5, "max": 0.9},
        "score_quantiles_selected": {"min": 0.8, "q25": 0.82, "median": 0.85, "q75": 0.88, "max": 0.9},
        "sae": {"layer15": {"fvu": 0.3, "l0": 32.0, "dead_fraction": 0.2, "tokens": 1000, "curves": curves}},
        "timings_s": {"total": 299.0}})
    _w(root / "curate/sae-1/config.json", {"config": {"seeds": "preset:math", "selector": "jacobian", "method": "sae",
                                                      "top_m": 2, "pool": "default"}})
    _w(root / "curate/sae-1/features.json", {"layer15": [
        {"latent": 7, "seed_mean_activation": 1.5, "selected_mean_activation": 1.2, "pool_mean_activation": 0.1,
         "top_pool_snippets": [{"id": "a", "source": "bigbench/elementary_math_qa", "activation": 3.2,
                                "text": "a train travels 60 km in 1.5 hours"}]}]})
    (root / "curate/sae-1/selected.jsonl").write_text(
        json.dumps({"id": "a", "instruction": "A train travels 60 km | in 1.5 hours. Speed?", "response": "40",
                    "source": "bigbench/elementary_math_qa", "score": 0.9, "rank": 1, "nearest_seed": "s1"}) + "\n")
    pq.write_table(pa.table({"id": list("abcdef"), "score": [0.9, 0.8, 0.3, 0.2, 0.1, 0.15],
                             "selected": [True, True, False, False, False, False]}),
                   root / "curate/sae-1/scores.parquet")
    shapes_b = {"layers": 30, "attention_heads": 9, "kv_heads": 3, "head_dim": 64, "mlp_width": 1536}
    shapes_a = {"layers": 30, "attention_heads": 6, "kv_heads": 3, "head_dim": 64, "mlp_width": 1000}
    _w(root / "prune/p-1/report.json", {
        "shapes_before": shapes_b, "shapes_after": shapes_a, "importance": "taylor", "head_mode": "query",
        "parameters": {"before": 134_515_008, "after": 87_000_000, "ratio": 0.353, "non_embedding_ratio": 0.45},
        "plan": {"ratio_target": 0.35}, "data": "runs/x/curate/c-1/selected.jsonl",
        "calibration": {"records": 64, "skipped": 0, "tokens": 2911, "loss_tokens": 2847, "batches": 8},
        "dropped_blocks": [], "verification": {"logits_match": True},
        "importance_summary": [{"layer": i, "dropped": False, "heads_kept_score_fraction": 0.8,
                                "channels_kept_score_fraction": 0.7} for i in range(30)]})
    for rec, mode in (("r-1", "tgd"), ("s-1", "sft")):
        _w(root / f"recover/{rec}/metrics.json", {
            "mode": mode, "records": 100, "filters": {"acceptance_rate": 0.6 if mode == "tgd" else None,
                                                     "counts": {"accepted": 60, "answer_mismatch": 40}},
            "train": {"train_examples": 90, "total_steps": 12,
                      "train_loss": [{"step": s, "epoch": 1, "loss": 2 - s / 10} for s in range(1, 13)],
                      "eval_loss": [{"epoch": 0, "loss": 2.5}, {"epoch": 2, "loss": 1.7}]}})
        _w(root / f"recover/{rec}/config.json", {"config": {"lora_rank": 32, "lora_alpha": 64, "lr": 2e-4,
                                                            "teacher": "default", "no_teacher": mode == "sft"}})
        (root / f"recover/{rec}/model").mkdir(parents=True)
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
    assert tgd["Params (M)"] == "87.0" and tgd["mean % of dense (↑ metrics)"] == "60%"
    assert rows["dense"]["mean % of dense (↑ metrics)"] == "reference"
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
