from __future__ import annotations

import json

import pytest

from finescope.cli import build_parser, main


@pytest.mark.parametrize("command", ["assets", "info"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert len(capsys.readouterr().out) > 200


def test_top_level_help_lists_subcommands():
    text = build_parser().format_help()
    assert "assets" in text and "info" in text


def test_info_on_tiny_model(tiny_model_dirs, capsys):
    assert main(["info", str(tiny_model_dirs["qwen3"]), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "Qwen3ForCausalLM" in out and "heads / KV heads  4 / 2" in out and "MLP width         96" in out
    assert main(["info", str(tiny_model_dirs["llama"]), "--json", "--device", "cpu"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layers"] == 3 and info["head_dim"] == 16 and info["family"] == "Llama"


def test_errors_are_one_line_with_exit_2(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("finescope info: error:") and "missing" in err
    assert main(["assets", "nope"]) == 2
    assert "unknown asset 'nope'" in capsys.readouterr().err


def test_stage_subcommand_plumbing(monkeypatch, tmp_path, capsys):
    """A registered stage gets flags from its config dataclass, a --config YAML, and run(cfg, out)."""
    import sys
    import types

    from finescope import cli, storage
    from finescope.config import PruneConfig
    from finescope.stages import Stage

    calls = []

    def fake_run(cfg, out):
        stage = storage.open_stage(out, cfg, overwrite=cfg.overwrite)
        calls.append(cfg)
        storage.mark_done(stage, cfg, {"ok": True})
        return out

    module = types.ModuleType("fake_stage")
    module.run = fake_run
    monkeypatch.setitem(sys.modules, "fake_stage", module)
    monkeypatch.setitem(cli.STAGES, "fakeprune", Stage("fakeprune", PruneConfig, "fake_stage", "test stage"))
    yaml_path = tmp_path / "p.yaml"
    yaml_path.write_text("ratio: 0.2\ncalib_samples: 16\n")
    out = tmp_path / "out"
    assert main(["fakeprune", "--out", str(out), "--config", str(yaml_path), "--importance", "flap"]) == 0
    assert (calls[0].ratio, calls[0].calib_samples, calls[0].importance) == (0.2, 16, "flap")
    assert storage.is_done(out, calls[0])
    assert main(["fakeprune", "--out", str(out), "--ratio", "1.5"]) == 2
    assert "ratio = 1.5: must be in (0, 1)" in capsys.readouterr().err
