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
