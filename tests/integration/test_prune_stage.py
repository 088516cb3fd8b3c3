"""The prune stage end to end on tiny models of every family: each run saves the model and verifies it by reloading
it in a fresh process (stock transformers), which makes these the slow half of the prune tests (~20 s each), so
they live in the integration tier; the prune stage's pieces are tested in tests/unit/test_prune*.py."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM

from conftest import CORPUS
from finescope.cli import main
from finescope.config import PruneConfig
from finescope.modeling import load
from finescope.prune import compensate
from finescope.prune.compensate import CompensationError
from finescope.prune.run import run
from finescope.storage import StageError


def test_run_every_family_saves_a_stock_loadable_verified_model(family, tiny_model_dirs, calib_file, tmp_path):
    out = tmp_path / "prune"
    cfg = PruneConfig(
        model=str(tiny_model_dirs[family]), data=str(calib_file), ratio=0.4, depth=1, importance="taylor", batch_size=8
    )
    assert run(cfg, out) == out
    report = json.loads((out / "report.json").read_text())
    assert (out / "DONE").is_file() and (out / "model" / "model.safetensors").is_file()
    assert report["verification"]["logits_match"] and report["verification"]["cache_matches_no_cache"]
    assert abs(report["parameters"]["ratio"] - 0.4) <= report["plan"]["granule"]
    assert report["shapes_after"]["layers"] == 2 and len(report["dropped_blocks"]) == 1
    assert report["calibration"]["records"] == len(CORPUS) + 4
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert sum(p.numel() for p in model.parameters()) == report["parameters"]["after"]
    handle = load(out / "model", device="cpu")  # tokenizer saved alongside
    assert handle.tokenizer is not None and handle.adapter.num_heads == report["shapes_after"]["attention_heads"]
    mtime = (out / "DONE").stat().st_mtime_ns
    assert run(cfg, out) == out and (out / "DONE").stat().st_mtime_ns == mtime  # done → skipped


def test_bf16_prune_saves_bf16_and_passes_the_reload_checks(family, tiny_model_dirs, calib_file, tmp_path):
    """bf16 (the default on GPUs), on the CPU, every family: the saved weights are bf16, the reloaded logits
    match in bf16, the KV-cache check passes (it runs in float32; the case it failed in bf16 is in
    test_prune_real.py)."""
    from safetensors import safe_open

    cfg = PruneConfig(
        model=str(tiny_model_dirs[family]), data=str(calib_file), ratio=0.4, importance="taylor", batch_size=8,
        dtype="bfloat16", device="cpu",
    )  # fmt: skip
    out = run(cfg, tmp_path / "prune")
    v = json.loads((out / "report.json").read_text())["verification"]
    assert v["logits_match"] and v["cache_matches_no_cache"] and v["new_tokens"] == 8
    with safe_open(str(out / "model" / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}


def test_refuses_an_unrelated_output_folder_unless_overwrite(tiny_model_dirs, calib_file, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    cfg = PruneConfig(model=str(tiny_model_dirs["qwen3"]), data=str(calib_file), ratio=0.3)
    with pytest.raises(StageError, match="not a finescope stage folder"):
        run(cfg, out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    run(PruneConfig(**{**cfg.__dict__, "overwrite": True}), out)
    assert (out / "DONE").is_file()


def test_cli_prune(tiny_model_dirs, calib_file, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["prune", "--help"])
    assert e.value.code == 0 and "--importance" in capsys.readouterr().out
    out = tmp_path / "cli"
    assert (
        main(
            [
                "prune",
                "--model",
                str(tiny_model_dirs["mistral"]),
                "--data",
                str(calib_file),
                "--ratio",
                "0.3",
                "--importance",
                "wanda_sp",
                "--depth",
                "1",
                "--depth-importance",
                "taylor_block",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out) and "achieved" in captured.err and "shapes:" in captured.err
    assert (
        main(
            [
                "prune",
                "--model",
                str(tiny_model_dirs["mistral"]),
                "--data",
                str(calib_file),
                "--ratio",
                "1.5",
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "ratio" in err and not (tmp_path / "x").exists()


@pytest.mark.parametrize("inputs", ["dense", "pruned"])
def test_a_compensated_model_reloads_in_stock_transformers_with_identical_logits(
    tiny_model_dirs, chat_tokenizer, tmp_path, inputs
):
    """The stage's own verification reloads the saved folder in a fresh process and compares logits; here it
    is checked again in this process, with the bias fields the config now carries."""
    calib = tmp_path / "calib.jsonl"
    calib.write_text(
        "".join(json.dumps({"instruction": f"Item {i}.", "response": t}) + "\n" for i, t in enumerate(CORPUS))
    )
    out = tmp_path / "prune"
    cfg = PruneConfig(
        model=str(tiny_model_dirs["llama"]),
        data=str(calib),
        ratio=0.4,
        compensation="bias_refit",
        compensation_inputs=inputs,
        depth=1 if inputs == "pruned" else 0,
        batch_size=8,
    )
    assert run(cfg, out) == out
    report = json.loads((out / "report.json").read_text())
    assert report["verification"]["logits_match"] and report["verification"]["cache_matches_no_cache"]
    assert report["compensation"]["mode"] == "bias_refit" and report["compensation"]["added_parameters"] > 0
    assert report["compensation"]["inputs"] == inputs and len(report["dropped_blocks"]) == (inputs == "pruned")
    model = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    assert model.config.mlp_bias and model.config.attention_bias
    assert sum(p.numel() for p in model.parameters()) == report["parameters"]["after"]
    assert float(model.model.layers[0].mlp.down_proj.bias.detach().abs().sum()) > 0
    assert float(model.model.layers[0].mlp.gate_proj.bias.detach().abs().sum()) == 0


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral", "gemma3"])
def test_a_family_without_a_bias_field_is_refused_for_bias_modes_and_refits(family, tiny_model_dirs, tmp_path, capsys):
    from finescope.cli import main

    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS))
    args = ["prune", "--model", str(tiny_model_dirs[family]), "--data", str(calib), "--ratio", "0.3"]
    assert main([*args, "--compensation", "bias", "--out", str(tmp_path / "p1")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "has no mlp_bias" in err and "use compensation=refit" in err
    assert not (tmp_path / "p1").exists()
    with pytest.raises(CompensationError):
        compensate.check_supported(AutoModelForCausalLM.from_pretrained(tiny_model_dirs[family]).config, "bias_refit")
    cfg = PruneConfig(
        model=str(tiny_model_dirs[family]), data=str(calib), ratio=0.3, compensation="refit", batch_size=8
    )
    out = run(cfg, tmp_path / "p2")
    assert json.loads((out / "report.json").read_text())["verification"]["logits_match"]


def test_the_default_presets_calibration_reads_the_records_through_the_chat_template(
    tiny_model_dirs, calib_file, tmp_path
):
    """The default preset prunes with flap + re-fit on the chat-formatted records (calib_loss: response): the stage
    runs, verifies, and its calibration holds the template's tokens besides the records' own."""
    from finescope import pipeline
    from finescope.config import PipelineConfig, load_config

    preset = load_config(PipelineConfig, pipeline.resolve_config("default"), []).prune
    assert (preset.importance, preset.compensation, preset.calib_loss) == ("flap", "refit", "response")
    common = dict(
        model=str(tiny_model_dirs["llama"]),
        data=str(calib_file),
        ratio=0.3,
        importance=preset.importance,
        compensation=preset.compensation,
        refit_ridge=preset.refit_ridge,
        calib_length=preset.calib_length,
        batch_size=8,
    )
    reports = {}
    for form in ("text", preset.calib_loss):
        out = tmp_path / form
        run(PruneConfig(**common, calib_loss=form), out)
        reports[form] = json.loads((out / "report.json").read_text())
    chat, text = reports["response"], reports["text"]
    assert chat["verification"]["logits_match"] and chat["calibration"]["records"] == text["calibration"]["records"]
    assert chat["calibration"]["tokens"] > text["calibration"]["tokens"]  # <|user|>, <|assistant|>, </s> per record
