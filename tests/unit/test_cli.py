"""The `finescope` command: every subcommand's --help, one refusal each, and the stage plumbing."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import yaml

from finescope import pipeline
from finescope.cli import RUN_PRESET, _shown, build_parser, main
from finescope.config import to_dict
from finescope.stages import STAGES


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    """Every subcommand the parser knows, so a new one is covered without editing this file."""
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


SUBCOMMANDS = sorted(_subcommands())


def _squeeze(text: str) -> str:
    """Text without whitespace: argparse rewraps descriptions (and may break lines at hyphens)."""
    return "".join(text.split())


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_help_exits_0_and_prints_its_description(command, capsys):
    description = _subcommands()[command].description
    assert description and description.strip(), f"`finescope {command}` has no description"
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: finescope {command}")
    assert _squeeze(description) in _squeeze(out)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_help_names_the_run_presets_value_wherever_it_differs_from_the_hand_run_default(stage, capsys):
    """A stage run by hand takes its config class's defaults, `finescope run` the preset's section: --help shows
    both where they differ (e.g. curate --sae-steps), and only there, so nobody mistakes one for the other."""
    preset = yaml.safe_load((Path(pipeline.__file__).parent / "configs" / f"{RUN_PRESET}.yaml").read_text())
    section, defaults = preset.get(stage) or {}, to_dict(STAGES[stage].config())
    differ = {k: v for k, v in section.items() if v != defaults[k]}
    assert differ, f"the {RUN_PRESET} preset sets no {stage} field away from its default?"
    noted = f"; `finescope run` (configs/{RUN_PRESET}.yaml): "
    helps = {a.dest: a.help or "" for a in _subcommands()[stage]._actions}
    for key in defaults:
        if key not in helps:  # nested settings have no flag
            continue
        if key in differ:
            assert helps[key].endswith(noted + _shown(differ[key]).replace("%", "%%") + "]"), (stage, key, helps[key])
        else:
            assert noted not in helps[key], (stage, key)
    with pytest.raises(SystemExit):
        main([stage, "--help"])
    assert _squeeze(f"takes the `{stage}:` section of its preset") in _squeeze(capsys.readouterr().out)


def test_top_level_help_lists_every_subcommand():
    text = build_parser().format_help()
    missing = [c for c in SUBCOMMANDS if f"\n    {c} " not in text and f"\n    {c}\n" not in text]
    assert not missing, f"not listed in `finescope --help`: {missing}"


# One refusal a user can fix per subcommand: argv (built in tmp_path), words the message must contain, and the
# output that must not exist afterwards (a refused stage leaves nothing behind). None of them loads a model.
REFUSALS = {
    "assets": (lambda d: ["assets", "nope"], "unknown asset 'nope'", None),
    "info": (lambda d: ["info", str(d / "missing-model")], "missing-model: no such model folder", None),
    "run": (lambda d: ["run", "--run-dir", str(d / "run"), "nosuch.key=1"], "unknown config key 'nosuch.key'", "run"),
    "report": (lambda d: ["report", str(d)], "not a run directory", None),
    "curate": (
        lambda d: ["curate", "--out", str(d / "out"), "--seeds", str(d / "missing.jsonl")],
        "missing.jsonl: no such file",
        "out",
    ),
    "prune": (
        lambda d: ["prune", "--out", str(d / "out"), "--data", str(d / "missing.jsonl")],
        "missing.jsonl: no such file",
        "out",
    ),
    "recover": (
        lambda d: ["recover", "--out", str(d / "out"), "--student", str(d), "--data", str(d / "missing.jsonl")],
        "missing.jsonl: no such file",
        "out",
    ),
    "eval": (lambda d: ["eval", "--out", str(d / "out"), "--tasks", "nosuchtask"], "unknown task 'nosuchtask'", "out"),
}

# More refusals: bad flag values (checked against the config dataclass) and an unknown preset.
MORE_REFUSALS = [
    (["run", "--config", "no-such-preset"], "no-such-preset: no such file or preset"),
    (["run", "prune.ratio=1.5"], "prune.ratio = 1.5: must be in (0, 1)"),
    (["curate", "--out", "{d}/out", "--num-coords", "0"], "num_coords = 0: must be ≥ 1"),
    (["prune", "--out", "{d}/out", "--ratio", "abc"], "ratio = 'abc': must be a number"),
    (["prune", "--out", "{d}/out", "--importance", "nope"], "importance = 'nope': must be one of taylor"),
    (["recover", "--out", "{d}/out", "--max-new-tokens", "0"], "max_new_tokens = 0: must be ≥ 1"),
    (["eval", "--out", "{d}/out", "--tasks", "nll:{d}/missing.jsonl"], "neither an NLL preset"),
    (["eval", "--out", "{d}/out", "--batch-size", "0"], "batch_size = 0: must be ≥ 1"),
]


def test_every_subcommand_has_a_refusal_case():
    assert sorted(REFUSALS) == SUBCOMMANDS, "add a refusal for each new subcommand to REFUSALS"


def _refused(argv: list[str], capsys) -> str:
    """Run `argv`; it must exit 2 with exactly one stderr line, `finescope <cmd>: error: …`. Returns that line."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, f"not one line:\n{err}"
    assert err.startswith(f"finescope {argv[0]}: error: "), err
    return err


@pytest.mark.parametrize("command", sorted(REFUSALS))
def test_each_subcommand_refuses_with_one_line_and_exit_2(command, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FINESCOPE_PROGRESS", "0")  # a progress bar's log lines are not part of the message
    make_argv, words, output = REFUSALS[command]
    err = _refused(make_argv(tmp_path), capsys)
    assert words in err
    if output is not None:
        assert not (tmp_path / output).exists(), f"the refused `finescope {command}` left {output} behind"


@pytest.mark.parametrize("argv, words", MORE_REFUSALS, ids=[" ".join(a[:1] + a[-2:]) for a, _ in MORE_REFUSALS])
def test_bad_values_are_refused_with_one_line_and_exit_2(argv, words, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # `run` without --run-dir would write under ./runs
    argv = [a.replace("{d}", str(tmp_path)) for a in argv]
    words = words.replace("{d}", str(tmp_path))
    assert words in _refused(argv, capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_info_on_tiny_model(tiny_model_dirs, capsys):
    assert main(["info", str(tiny_model_dirs["qwen3"]), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "Qwen3ForCausalLM" in out and "heads / KV heads  4 / 2" in out and "MLP width         96" in out
    assert main(["info", str(tiny_model_dirs["llama"]), "--json", "--device", "cpu"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layers"] == 3 and info["head_dim"] == 16 and info["family"] == "Llama"


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


@pytest.mark.parametrize("argv", [["assets", "--list"], ["info", "/nonexistent/model-dir"]], ids=["ok", "refused"])
def test_main_leaves_the_process_group_on_the_way_out(argv, tmp_path, monkeypatch, capsys):
    """A launched rank destroys its gloo groups before the interpreter exits, after success and after a refusal:
    left to the exit, gloo's worker threads sometimes die as "terminate called without an active exception"
    (SIGABRT) after the stage's work is written (CI, session 51)."""
    import torch.distributed as dist

    from finescope import distributed

    monkeypatch.setenv("FINESCOPE_HOME", str(tmp_path / "home"))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert distributed._object_group() is not None  # the second (object) group as collectives create it
        code = main(argv)
        assert (code == 0) == (argv[0] == "assets"), capsys.readouterr().err
        assert not dist.is_initialized() and distributed._OBJECT_GROUP is None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
