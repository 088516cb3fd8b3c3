"""Hostile and mistaken inputs against every subcommand, as a table: each must be refused with exit status 2 and one
`finescope <command>: error:` line on stderr that names the file or field, without a traceback, leaving every file
already there untouched and creating nothing (hidden `.lock` files beside an output excepted: they hold no data).

Readers of record files, task files and model folders have their own table in test_hostile_readers.py; this one
covers configs, numbers, output paths, run directories, stage wiring and locks."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from conftest import CORPUS, hold_lock
from finescope.cli import main


def _records(path: Path, n: int = 8) -> str:
    rows = [{"instruction": f"Q{i}: {CORPUS[i % len(CORPUS)]}", "response": f"A{i}."} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _write(path: Path, text: str | bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


def _stage_folder(path: Path, stage: str) -> str:
    """A finished-looking stage folder of another stage kind."""
    path.mkdir()
    _write(path / "config.json", json.dumps({"config_hash": "0" * 16, "stage": stage, "config": {}}))
    return str(path)


def _alias_bomb(path: Path) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    return _write(path, "\n".join(lines) + "\n")


# Each row: id → builder(tmp, models) returning (argv, text the one error line must contain).
# `tmp` holds the inputs; outputs go to tmp/"out…" paths that must stay absent (or unchanged when they existed).
ROWS = {
    # --- configs -------------------------------------------------------------------------------------------------
    "run config missing": lambda t, m: (["run", "--config", str(t / "nope.yaml")], "nope.yaml: config file not found"),
    "run config invalid yaml": lambda t, m: (
        ["run", "--config", _write(t / "bad.yaml", "a: [1, 2\nb: c:")],
        "bad.yaml",
    ),
    "run config is a list": lambda t, m: (["run", "--config", _write(t / "l.yaml", "- 1\n- 2\n")], "l.yaml"),
    "run config python tag": lambda t, m: (
        ["run", "--config", _write(t / "py.yaml", "name: !!python/object/apply:os.system ['touch pwned']\n")],
        "py.yaml",
    ),
    "run config alias bomb": lambda t, m: (["run", "--config", _alias_bomb(t / "bomb.yaml")], "YAML aliases"),
    "run config not utf-8": lambda t, m: (
        ["run", "--config", _write(t / "l1.yaml", b"name: caf\xe9\n")],
        "l1.yaml: not UTF-8",
    ),
    "run config nested deeply": lambda t, m: (
        ["run", "--config", _write(t / "deep.yaml", "a: " + "[" * 5000 + "]" * 5000 + "\n")],
        "deep.yaml",
    ),
    "run config is a folder": lambda t, m: (["run", "--config", str(t)], "is a folder"),
    "run config wrong type": lambda t, m: (
        ["run", "--config", _write(t / "w.yaml", "curate:\n  top_m: many\n")],
        "curate.top_m",
    ),
    "run config section not a mapping": lambda t, m: (
        ["run", "--config", _write(t / "s.yaml", "prune: 0.3\n")],
        "prune",
    ),
    "run config huge value": lambda t, m: (
        ["run", "--config", _write(t / "h.yaml", "curate:\n  top_m: '" + "9" * 50_000 + "x'\n")],
        "curate.top_m",
    ),
    "run unknown preset": lambda t, m: (["run", "--config", "nosuchpreset"], "no such file or preset"),
    "run override without =": lambda t, m: (["run", "--config", "quick", "curate.top_m"], "key=value"),
    "run override unknown key": lambda t, m: (["run", "--config", "quick", "curate.topm=3"], "did you mean 'top_m'"),
    "run override no sub-keys": lambda t, m: (["run", "--config", "quick", "name.x=3"], "'name' has no sub-keys"),
    "run variants unknown": lambda t, m: (["run", "--config", "quick", "variants=dense,best"], "variants[1]"),
    "run variants empty": lambda t, m: (
        ["run", "--config", "quick", "variants=", f"--run-dir={t / 'out'}"],
        "variants",
    ),
    "stage config missing": lambda t, m: (
        ["prune", "--config", str(t / "nope.yaml"), "--out", str(t / "out")],
        "nope.yaml",
    ),
    "stage config unknown flag value": lambda t, m: (
        ["prune", "--config", _write(t / "p.yaml", "ratio: lots\n"), "--out", str(t / "out")],
        "ratio",
    ),
    # --- numbers ------------------------------------------------------------------------------------------------
    "curate top_m zero": lambda t, m: (["curate", "--top-m", "0", "--out", str(t / "out")], "top_m"),
    "curate top_m float": lambda t, m: (["curate", "--top-m", "1e99", "--out", str(t / "out")], "top_m"),
    "curate method unknown": lambda t, m: (["curate", "--method", "magic", "--out", str(t / "out")], "method"),
    "prune ratio 0": lambda t, m: (["prune", "--ratio", "0", "--out", str(t / "out")], "ratio"),
    "prune ratio nan": lambda t, m: (["prune", "--ratio", "nan", "--out", str(t / "out")], "ratio"),
    "prune ratio 1.5 (run override)": lambda t, m: (["run", "--config", "quick", "prune.ratio=1.5"], "prune.ratio"),
    "recover lr 0": lambda t, m: (["recover", "--lr", "0", "--out", str(t / "out")], "lr"),
    "recover epochs negative": lambda t, m: (["recover", "--epochs", "-1", "--out", str(t / "out")], "epochs"),
    "eval limit negative": lambda t, m: (["eval", "--limit", "-5", "--out", str(t / "out")], "limit"),
    "eval timeout 0": lambda t, m: (["eval", "--exec-timeout-s", "0", "--out", str(t / "out")], "exec_timeout_s"),
    "eval dtype unknown": lambda t, m: (["eval", "--dtype", "int3", "--out", str(t / "out")], "dtype"),
    # --- output paths -------------------------------------------------------------------------------------------
    "curate out empty": lambda t, m: (["curate", "--method", "random", "--out", ""], "--out: must not be empty"),
    "prune out under a file": lambda t, m: (
        [
            "prune",
            "--model",
            str(m["llama"]),
            "--data",
            _records(t / "d.jsonl"),
            "--out",
            str(Path(_write(t / "afile", "x")) / "out"),
        ],
        "is a file",
    ),
    "prune out is a file": lambda t, m: (
        ["prune", "--model", str(m["llama"]), "--data", _records(t / "d.jsonl"), "--out", _write(t / "out", "mine")],
        "is a file",
    ),
    "curate out unrelated folder": lambda t, m: (
        [
            "curate",
            "--method",
            "random",
            "--pool",
            _records(t / "p.jsonl"),
            "--seeds",
            _records(t / "s.jsonl", 2),
            "--out",
            str(Path(_write(t / "out" / "notes.txt", "x")).parent),
        ],
        "not a finescope stage folder",
    ),
    "prune out is a curate stage": lambda t, m: (
        [
            "prune",
            "--model",
            str(m["llama"]),
            "--data",
            _records(t / "d.jsonl"),
            "--out",
            _stage_folder(t / "out", "CurateConfig"),
        ],
        "holds a CurateConfig stage",
    ),
    "eval out unrelated json": lambda t, m: (
        ["eval", "--model", str(m["llama"]), "--tasks", "nll:math", "--out", _write(t / "out.json", '{"mine": 1}')],
        "not a finescope eval results file",
    ),
    "eval out json is a folder": lambda t, m: (
        [
            "eval",
            "--model",
            str(m["llama"]),
            "--tasks",
            "nll:math",
            "--out",
            str(Path(_write(t / "out.json" / "x", "x")).parent),
        ],
        "is not a file",
    ),
    "run dir is a file": lambda t, m: (["run", "--config", "quick", "--run-dir", _write(t / "out", "x")], "is a file"),
    "run dir under a file": lambda t, m: (
        ["run", "--config", "quick", "--run-dir", str(Path(_write(t / "afile", "x")) / "run")],
        "is a file",
    ),
    "run dir unrelated folder": lambda t, m: (
        ["run", "--config", "quick", "--run-dir", str(Path(_write(t / "out" / "pipeline.yaml", "mine: 1\n")).parent)],
        "not a finescope run directory",
    ),
    "report not a run dir": lambda t, m: (
        ["report", str(Path(_write(t / "out" / "x.txt", "x")).parent)],
        "not a run directory",
    ),
    "report missing dir": lambda t, m: (["report", str(t / "missing")], "missing"),
    # --- stage wiring -------------------------------------------------------------------------------------------
    "assets unknown": lambda t, m: (["assets", "nosuch"], "unknown asset 'nosuch'"),
    "info missing model": lambda t, m: (["info", str(t / "nomodel")], "nomodel"),
    "info folder without config": lambda t, m: (
        ["info", str(Path(_write(t / "m" / "w.txt", "x")).parent)],
        "no config.json",
    ),
    "curate seeds missing": lambda t, m: (
        ["curate", "--method", "random", "--seeds", str(t / "seeds.jsonl"), "--out", str(t / "out")],
        "seeds.jsonl",
    ),
    "curate seeds unknown preset": lambda t, m: (
        ["curate", "--method", "random", "--seeds", "preset:astrology", "--out", str(t / "out")],
        "preset:astrology",
    ),
    "curate pool missing": lambda t, m: (
        [
            "curate",
            "--method",
            "random",
            "--seeds",
            _records(t / "s.jsonl", 2),
            "--pool",
            str(t / "pool.jsonl"),
            "--out",
            str(t / "out"),
        ],
        "pool.jsonl",
    ),
    "curate layer out of range": lambda t, m: (
        [
            "curate",
            "--model",
            str(m["llama"]),
            "--pool",
            _records(t / "p.jsonl"),
            "--seeds",
            _records(t / "s.jsonl", 2),
            "--reference",
            _records(t / "r.jsonl"),
            "--layers",
            "99",
            "--out",
            str(t / "out"),
        ],
        "layers: 99",
    ),
    "curate K above hidden size": lambda t, m: (
        [
            "curate",
            "--model",
            str(m["llama"]),
            "--pool",
            _records(t / "p.jsonl"),
            "--seeds",
            _records(t / "s.jsonl", 2),
            "--reference",
            _records(t / "r.jsonl"),
            "--num-coords",
            "4096",
            "--out",
            str(t / "out"),
        ],
        "num_coords",
    ),
    "prune data missing": lambda t, m: (
        ["prune", "--model", str(m["llama"]), "--data", str(t / "calib.jsonl"), "--out", str(t / "out")],
        "calib.jsonl",
    ),
    "prune data empty": lambda t, m: (
        ["prune", "--model", str(m["llama"]), "--data", _write(t / "e.jsonl", ""), "--out", str(t / "out")],
        "e.jsonl",
    ),
    "prune no data": lambda t, m: (["prune", "--model", str(m["llama"]), "--out", str(t / "out")], "data"),
    "prune model missing": lambda t, m: (
        ["prune", "--model", str(t / "nomodel"), "--data", _records(t / "d.jsonl"), "--out", str(t / "out")],
        "nomodel",
    ),
    "recover student missing": lambda t, m: (
        [
            "recover",
            "--student",
            str(t / "nomodel"),
            "--data",
            _records(t / "d.jsonl"),
            "--no-teacher",
            "--out",
            str(t / "out"),
        ],
        "nomodel",
    ),
    "recover no teacher known": lambda t, m: (
        ["recover", "--student", str(m["llama"]), "--data", _records(t / "d.jsonl"), "--out", str(t / "out")],
        "--teacher",
    ),
    "recover teacher missing": lambda t, m: (
        [
            "recover",
            "--student",
            str(m["llama"]),
            "--teacher",
            str(t / "noteacher"),
            "--data",
            _records(t / "d.jsonl"),
            "--out",
            str(t / "out"),
        ],
        "noteacher",
    ),
    "recover max_length below template": lambda t, m: (
        [
            "recover",
            "--student",
            str(m["llama"]),
            "--data",
            _records(t / "d.jsonl"),
            "--no-teacher",
            "--max-length",
            "16",
            "--out",
            str(t / "out"),
        ],
        "max_length",
    ),
    "eval task unknown": lambda t, m: (
        ["eval", "--tasks", "mmlu:astrology", "--out", str(t / "out")],
        "mmlu:astrology",
    ),
    "eval code without permission": lambda t, m: (
        ["eval", "--tasks", "humaneval", "--out", str(t / "out")],
        "--allow-code-execution",
    ),
    "eval limit above task size": lambda t, m: (
        [
            "eval",
            "--model",
            str(m["llama"]),
            "--tasks",
            f"nll:{_records(t / 'n.jsonl', 3)}",
            "--limit",
            "50",
            "--out",
            str(t / "out"),
        ],
        "--limit 50",
    ),
    "eval nll file missing": lambda t, m: (
        ["eval", "--tasks", f"nll:{t / 'none.jsonl'}", "--out", str(t / "out")],
        "none.jsonl",
    ),
    "eval no tasks": lambda t, m: (["eval", "--tasks", ",", "--out", str(t / "out")], "tasks"),
}


def _snapshot(root: Path) -> dict[str, str]:
    """Every path under `root` with a hash of its content (lock files excluded)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.name.endswith(".lock"):
            continue
        rel = p.relative_to(root).as_posix()
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "other"
    return out


@pytest.mark.parametrize("row", list(ROWS))
def test_hostile_input_is_one_line_exit_2_and_touches_nothing(row, tmp_path, tiny_model_dirs, capsys, monkeypatch):
    inputs = tmp_path / "in"
    inputs.mkdir()
    monkeypatch.chdir(inputs)  # a stray relative write would land here and be caught by the snapshot
    argv, must_contain = ROWS[row](inputs, tiny_model_dirs)
    before = _snapshot(inputs)
    code = main(argv)
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2, (row, err)
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert errors == err.splitlines()[-1:], err  # one error line, and it is the last thing printed
    assert errors[0].startswith(f"finescope {argv[0]}: error: ") and must_contain in errors[0], errors[0]
    assert len(errors[0]) < 1200
    assert _snapshot(inputs) == before, "the refusal changed files"


def test_a_locked_stage_folder_is_refused_naming_the_holder(tmp_path, tiny_model_dirs, capsys):
    out = tmp_path / "out"
    holder = hold_lock(out, tmp_path / "ready")
    try:
        for argv in (
            [
                "curate",
                "--method",
                "random",
                "--pool",
                _records(tmp_path / "p.jsonl"),
                "--seeds",
                _records(tmp_path / "s.jsonl", 2),
            ],
            [
                "eval",
                "--model",
                str(tiny_model_dirs["llama"]),
                "--tasks",
                f"nll:{_records(tmp_path / 'n.jsonl')}",
                "--device",
                "cpu",
            ],
        ):
            assert main(argv + ["--out", str(out)]) == 2
            err = capsys.readouterr().err.strip().splitlines()[-1]
            assert f"PID {holder.pid}" in err and "in use" in err
            assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
