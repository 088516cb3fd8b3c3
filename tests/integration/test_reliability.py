"""Locks, refusals that write nothing, user files never replaced, DONE certified by config.json, CLI flags that
do what they say. Hostile inputs as a table live in test_hostile_inputs.py."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CORPUS, hold_lock
from finescope import storage
from finescope.cli import STAGES, build_parser, main
from finescope.config import CurateConfig, PruneConfig, config_from_args
from finescope.typed_data import fields as _fields
from finescope.typed_data import hints as _hints
from finescope.typed_data import spec as _spec
from test_pipeline import tiny_run  # noqa: F401  (a fixture, used by name)

SRC = Path(__file__).resolve().parents[2] / "src"


def _records(path: Path, n: int = 12) -> Path:
    rows = [{"instruction": f"Question {i}: {CORPUS[i % len(CORPUS)]}", "response": f"Answer {i}."} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _err_line(capsys) -> str:
    """The refusal: the last stderr line, the only one that says `error:` (progress lines may precede it)."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert [l for l in lines if "error:" in l] == lines[-1:], err
    return lines[-1]


# ================================================================================================ CLI flags


def _non_default(spec, default):
    """A valid value different from the default, as a command-line string and as the parsed value."""
    if spec.base is bool:
        return None, not default
    if spec.choices:
        value = next(c for c in spec.choices if c != default)
        return str(value), value
    if spec.base is list:
        return ("3,4", [3, 4]) if spec.item.base is int else ("a,b", ["a", "b"])
    if spec.base in (int, float):
        if spec.base is int:
            candidates = [1 if default is None else default + 1, 1 if default is None else default - 1, 3]
        else:
            candidates = [0.25 if not default else default / 2, 0.5, 2.0]
        value = next(v for v in candidates if v != default and (spec.range is None or spec.range.contains(v)))
        return str(value), value
    return "some-value", "some-value"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_stage_flag_sets_its_field(stage):
    """Each generated flag changes exactly its own field, to the given value (`--no-teacher` was once a no-op)."""
    cls = STAGES[stage].config
    defaults, hints = cls(), _hints(cls)
    for f in _fields(cls):
        spec = _spec(hints[f.name])
        default = getattr(defaults, f.name)
        text, value = _non_default(spec, default)
        flag = "--" + f.name.replace("_", "-")
        if spec.base is bool:
            argv = [flag] if value else ["--no-" + f.name.replace("_", "-")]
        else:
            argv = [flag, text]
        args = build_parser().parse_args([stage, "--out", "x", *argv])
        cfg = config_from_args(cls, args)
        assert getattr(cfg, f.name) == value, (stage, f.name, argv)
        changed = [g.name for g in _fields(cls) if getattr(cfg, g.name) != getattr(defaults, g.name)]
        assert changed == [f.name], (stage, argv, changed)


def test_no_teacher_on_a_prune_output_is_plain_sft(tmp_path, tiny_model_dirs, capsys):
    """The reported defect: on a prune output (where a default teacher exists) `--no-teacher` ran TGD."""
    prune = tmp_path / "prune"
    prune.mkdir()
    student = prune / "model"
    os.symlink(tiny_model_dirs["llama"], student)
    (prune / "config.json").write_text(
        json.dumps({"config_hash": "x", "config": {"model": str(tiny_model_dirs["llama"])}})
    )
    data = _records(tmp_path / "data.jsonl", 6)
    out = tmp_path / "sft"
    assert (
        main(
            [
                "recover",
                "--student",
                str(student),
                "--data",
                str(data),
                "--no-teacher",
                "--lora-rank",
                "2",
                "--batch-size",
                "2",
                "--micro-batch-size",
                "2",
                "--epochs",
                "0.5",
                "--max-length",
                "96",
                "--eval-fraction",
                "0",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mode"] == "sft" and metrics["rewrite"].get("generated") is None
    assert json.loads((out / "config.json").read_text())["config"]["no_teacher"] is True


# ================================================================================================ locks


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_second_process_on_a_stage_folder_is_refused_with_the_holders_pid(tmp_path, tiny_model_dirs, capsys):
    data = _records(tmp_path / "calib.jsonl")
    out = tmp_path / "prune"
    args = [
        "prune",
        "--model",
        str(tiny_model_dirs["llama"]),
        "--data",
        str(data),
        "--ratio",
        "0.3",
        "--calib-samples",
        "4",
        "--calib-length",
        "32",
        "--out",
        str(out),
    ]
    holder = hold_lock(out, tmp_path / "ready")
    try:
        assert main(args) == 2
        err = _err_line(capsys)
        assert f"PID {holder.pid}" in err and str(out) in err
        assert not out.exists()  # nothing written while another process holds the folder
    finally:
        _stop(holder)
    # the kernel released the killed holder's lock: the stage now runs
    assert main(args) == 0 and storage.is_done(out, json_config(out, PruneConfig))


def json_config(out: Path, cls):
    from finescope.config import from_dict

    data = json.loads((out / "config.json").read_text())["config"]
    return from_dict(cls, data)


def test_two_real_stage_processes_exactly_one_proceeds(tmp_path, tiny_model_dirs):
    """Two `finescope prune` processes (different configs) on one folder, started together: one finishes, the other
    is refused with exit 2 naming a PID, and the folder holds one run's files (config and DONE agree)."""
    data = _records(tmp_path / "calib.jsonl")
    out = tmp_path / "prune"
    env = {**os.environ, "PYTHONPATH": str(SRC), "FINESCOPE_PROGRESS": "0"}
    base = [
        sys.executable,
        "-m",
        "finescope.cli",
        "prune",
        "--model",
        str(tiny_model_dirs["llama"]),
        "--data",
        str(data),
        "--calib-samples",
        "8",
        "--calib-length",
        "64",
        "--out",
        str(out),
    ]
    procs = [
        subprocess.Popen(base + ["--ratio", r], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in ("0.3", "0.4")
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    if codes == [0, 0]:
        pytest.skip("the two processes did not overlap on this machine (the first finished before the second began)")
    assert codes == [0, 2], results
    refused = next(err for rc, err in results if rc == 2)
    assert "in use by another finescope process (PID" in refused and "Traceback" not in refused
    assert storage.done_hash(out) == json.loads((out / "config.json").read_text())["config_hash"]


def test_run_directory_and_report_are_locked(tmp_path, capsys):
    run_dir = tmp_path / "run"
    holder = hold_lock(run_dir, tmp_path / "ready")
    try:
        assert main(["run", "--config", "quick", "--run-dir", str(run_dir), "report=false"]) == 2
        assert f"PID {holder.pid}" in _err_line(capsys)
        run_dir.mkdir()
        (run_dir / "pipeline.json").write_text("{}")
        assert main(["report", str(run_dir)]) == 2
        assert f"PID {holder.pid}" in _err_line(capsys)
    finally:
        _stop(holder)


def test_lock_is_released_when_the_block_ends_and_reentry_from_another_fd_is_refused(tmp_path):
    target = tmp_path / "stage"
    with storage.exclusive(target):
        with pytest.raises(storage.StageError, match=f"PID {os.getpid()}"):
            with storage.exclusive(target):
                pass
    with storage.exclusive(target):
        pass
    assert storage.lock_file(target).read_text().strip() == str(os.getpid())


# ================================================================================================ DONE and temp files


def test_done_is_trusted_only_when_config_json_agrees(tmp_path):
    a, b = CurateConfig(top_m=10), CurateConfig(top_m=20)
    stage = storage.open_stage(tmp_path / "c", a)
    storage.mark_done(stage, a)
    assert storage.is_done(stage, a)
    # config.json of another run beside DONE of this one (the mixed folder of the report): trusted by neither
    other = json.loads((stage / "config.json").read_text())
    other.update(config_hash=storage.config_hash(b), config=storage.to_jsonable(b))
    (stage / "config.json").write_text(json.dumps(other))
    assert not storage.is_done(stage, a) and not storage.is_done(stage, b)
    # a hand-edited config.json that still claims the old hash is caught by re-hashing its content
    edited = json.loads(json.dumps(other))
    edited["config_hash"] = storage.config_hash(a)
    (stage / "config.json").write_text(json.dumps(edited))
    assert not storage.is_done(stage, a)


def test_switches_outside_the_hash_do_not_break_done(tmp_path):
    cfg = PruneConfig(data="x")
    stage = storage.open_stage(tmp_path / "p", cfg)
    storage.mark_done(stage, cfg)
    assert storage.is_done(stage, dataclasses.replace(cfg, overwrite=True))


def test_temp_files_of_a_killed_run_are_removed_when_the_stage_reopens(tmp_path):
    cfg = CurateConfig()
    stage = storage.open_stage(tmp_path / "c", cfg)
    (stage / ".selected.jsonl.abc.tmp").write_bytes(b"x" * 100)
    (stage / "model" / ".weights.x.tmp").parent.mkdir()
    (stage / "model" / ".weights.x.tmp").write_bytes(b"x")
    (stage / ".model.q1.tmp").mkdir()
    (stage / "rewrites.partial.jsonl").write_text("{}\n")  # resumable work is kept
    with storage.stage_folder(tmp_path / "c", cfg) as again:
        assert again == stage
    left = sorted(p.relative_to(stage).as_posix() for p in stage.rglob("*"))
    assert left == ["config.json", "model", "rewrites.partial.jsonl"]


# ================================================================================================ user files


def test_eval_never_replaces_a_json_file_it_did_not_write(tmp_path, tiny_model_dirs, capsys):
    mine = tmp_path / "mine.json"
    mine.write_text('{"my": "notes"}')
    nll = tmp_path / "nll.jsonl"
    nll.write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS[:4]))
    args = ["eval", "--model", str(tiny_model_dirs["llama"]), "--tasks", f"nll:{nll}", "--device", "cpu"]
    assert main(args + ["--out", str(mine)]) == 2
    assert "not a finescope eval results file" in _err_line(capsys)
    assert mine.read_text() == '{"my": "notes"}'
    # a results file of ours: same config → reused; another config → the old one is kept aside
    res = tmp_path / "res.json"
    assert main(args + ["--out", str(res)]) == 0
    first = res.read_text()
    assert main(args + ["--out", str(res)]) == 0 and res.read_text() == first
    assert main(args + ["--out", str(res), "--batch-size", "2"]) == 0
    old = json.loads(first)["eval_config_hash"]
    assert (tmp_path / f"res.superseded-{old}.json").read_text() == first
    assert json.loads(res.read_text())["config"]["batch_size"] == 2
    # --overwrite keeps the user's file aside rather than deleting it
    assert main(args + ["--out", str(mine), "--overwrite"]) == 0
    assert (tmp_path / "mine.superseded-unknown.json").read_text() == '{"my": "notes"}'


def test_run_dir_must_be_new_empty_or_ours(tmp_path, capsys):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "pipeline.yaml").write_text("my: own\n")
    assert main(["run", "--config", "quick", "--run-dir", str(theirs)]) == 2
    assert "not a finescope run directory" in _err_line(capsys)
    assert [p.name for p in theirs.iterdir()] == ["pipeline.yaml"] and (
        theirs / "pipeline.yaml"
    ).read_text() == "my: own\n"
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["run", "--config", "quick", "--run-dir", str(afile)]) == 2
    assert "is a file" in _err_line(capsys)
    assert main(["run", "--config", "quick", "--run-dir", str(afile / "sub")]) == 2
    assert "is a file" in _err_line(capsys) and afile.read_text() == "x"


@pytest.mark.parametrize(
    "stage,extra",
    [
        ("curate", ["--seeds", "/nonexistent/seeds.jsonl", "--method", "random"]),
        ("eval", ["--tasks", "nosuchtask"]),
        ("recover", ["--student", "/nonexistent/model", "--data", "DATA", "--no-teacher"]),
        ("prune", ["--model", "/nonexistent/model", "--data", "DATA"]),
    ],
)
def test_refusals_leave_no_stage_folder(stage, extra, tmp_path, capsys):
    data = _records(tmp_path / "data.jsonl")
    out = tmp_path / "out"
    assert main([stage, *[str(data) if a == "DATA" else a for a in extra], "--out", str(out)]) == 2
    _err_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize("out", ["", "   "])
def test_empty_out_is_refused(out, capsys):
    assert main(["curate", "--method", "random", "--out", out]) == 2
    assert "--out: must not be empty" in _err_line(capsys)


def test_out_under_a_file_is_refused_before_any_work(tmp_path, tiny_model_dirs, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert (
        main(
            ["eval", "--model", str(tiny_model_dirs["llama"]), "--tasks", "nll:math", "--out", str(afile / "res.json")]
        )
        == 2
    )
    assert "is a file" in _err_line(capsys)


# ================================================================================================ configs, warnings


def test_yaml_alias_bomb_is_refused_with_a_short_message(tmp_path, capsys):
    bomb = tmp_path / "bomb.yaml"
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [
        f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, "
        f"*a{i - 1}, *a{i - 1}]"
        for i in range(1, 9)
    ]
    lines += ["curate:", "  top_m: *a8"]
    bomb.write_text("\n".join(lines) + "\n")
    assert main(["run", "--config", str(bomb), "--run-dir", str(tmp_path / "r")]) == 2
    err = _err_line(capsys)
    assert "YAML aliases" in err and len(err) < 400
    assert not (tmp_path / "r").exists()


def test_huge_value_is_quoted_short(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("curate:\n  top_m: '" + "9" * 100_000 + "x'\n")
    assert main(["run", "--config", str(cfg), "--run-dir", str(tmp_path / "r")]) == 2
    err = _err_line(capsys)
    assert "curate.top_m" in err and len(err) < 400


def test_warnings_print_as_one_finescope_line(tmp_path, capsys):
    pool = _records(tmp_path / "pool.jsonl", 5)
    seeds = _records(tmp_path / "seeds.jsonl", 2)
    assert (
        main(
            [
                "curate",
                "--method",
                "random",
                "--pool",
                str(pool),
                "--seeds",
                str(seeds),
                "--top-m",
                "50",
                "--out",
                str(tmp_path / "c"),
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if "top_m" in l]
    assert lines == ["finescope: warning: top_m = 50 is larger than the pool (5 records); keeping all of them"]
    assert "UserWarning" not in err


def test_atomic_dir_removes_half_built_folders_of_dead_builders_only(tmp_path):
    from finescope.child_process import owned_prefix

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        ns = owned_prefix("x").split("-")[2]
        stale = tmp_path / f".model-{dead.pid}-{ns}-abc.tmp"
        alive = tmp_path / f".model-{live.pid}-{ns}-def.tmp"
        other = tmp_path / ".model.unowned.tmp"  # an older version's name: its owner is unknown, so it is kept
        for d in (stale, alive, other):
            (d / "w").mkdir(parents=True)
        with storage.atomic_dir(tmp_path / "model") as tmp:
            (tmp / "weights").write_text("w")
        assert not stale.exists() and alive.exists() and other.exists()
        assert (tmp_path / "model" / "weights").read_text() == "w"
    finally:
        live.kill()
        live.wait()


# ================================================================================================ issue 28


def test_report_on_a_run_directory_being_worked_on_names_the_holders_pid(tmp_path, capsys):
    """`finescope run` holds the run directory before it wrote pipeline.json: the refusal names its PID, not a
    missing pipeline.json."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = hold_lock(run_dir, tmp_path / "ready")
    try:
        assert main(["report", str(run_dir)]) == 2
        err = _err_line(capsys)
        assert f"PID {holder.pid}" in err and "pipeline.json" not in err
    finally:
        _stop(holder)
    assert main(["report", str(run_dir)]) == 2  # no holder: the folder is no run directory
    assert "no pipeline.json" in _err_line(capsys)


def test_num_processes_above_the_machine_is_refused_in_one_line_unless_oversubscribed(tmp_path, capsys, monkeypatch):
    from finescope import pipeline

    cores = len(os.sched_getaffinity(0))
    monkeypatch.setattr(pipeline, "torch_cuda_count", lambda: 0)
    run_dir = tmp_path / "run"
    assert main(["run", "--config", "quick", "--run-dir", str(run_dir), "--num-processes", "999"]) == 2
    err = _err_line(capsys)
    assert f"999: this machine has {cores} CPU cores" in err and "--oversubscribe" in err
    assert not run_dir.exists()
    # with --oversubscribe the bound is not applied: the launch itself is reached (stubbed here)
    monkeypatch.setattr(pipeline, "launch", lambda cfg, root: root)
    monkeypatch.setattr(pipeline, "check_run_dir", lambda root: None)
    assert (
        main(["run", "--config", "quick", "--run-dir", str(run_dir), "--num-processes", "999", "--oversubscribe"]) == 0
    )
    # on a GPU machine the bound is the visible GPUs
    monkeypatch.setattr(pipeline, "torch_cuda_count", lambda: 1)
    assert main(["run", "--config", "quick", "--run-dir", str(run_dir), "--num-processes", "2"]) == 2
    assert "2: this machine has 1 visible GPUs" in _err_line(capsys)


def _descendants(pid: int) -> set[int]:
    """Every live process below `pid` (children, their children, …), from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    out, todo = set(), [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def _start_time(pid: int) -> str | None:
    """The process's start time (field 22 of /proc/PID/stat), None once it is gone: a reused pid differs."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else fields[19]


def _is_rank(pid: int) -> bool:
    try:
        return b"LOCAL_RANK=" in Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and PR_SET_PDEATHSIG are Linux's")
def test_killing_the_launcher_kills_its_ranks_and_the_next_launch_cleans_its_folder(tiny_run, tmp_path):  # noqa: F811
    """`finescope run --num-processes 2`, kill -9 of the launcher while its ranks work: no process of the run is
    left 10 s later, and its launch folder in the temp dir is removed by the next launch."""
    import time

    from finescope import pipeline
    from finescope.child_process import remove_stale

    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(FINESCOPE_HOME=str(tmp_path / "home"), FINESCOPE_PROGRESS="0", HF_HUB_OFFLINE="1", TMPDIR=str(temp))
    cmd = [sys.executable, "-m", "finescope", "run", "--config", str(tiny_run), "--run-dir", str(tmp_path / "run")]
    launcher = subprocess.Popen([*cmd, "--num-processes", "2"], env=env, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600  # two ranks importing torch on a busy 2-core machine: be patient
        tree: set[int] = set()
        while time.monotonic() < deadline and sum(map(_is_rank, tree)) < 2:
            assert launcher.poll() is None, "the launcher ended before its ranks started"
            time.sleep(0.2)
            tree = _descendants(launcher.pid)
        assert sum(map(_is_rank, tree)) == 2, tree
        time.sleep(1.0)  # the ranks are inside finescope now (importing, or at work)
        tree = _descendants(launcher.pid)
        started = {pid: _start_time(pid) for pid in tree}
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        deadline = time.monotonic() + 10
        alive = set(started)
        while alive and time.monotonic() < deadline:
            time.sleep(0.2)
            alive = {pid for pid in alive if _start_time(pid) is not None and _start_time(pid) == started[pid]}
        assert not alive, f"processes of the run still alive 10 s after kill -9 of the launcher: {sorted(alive)}"
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    left = [p for p in temp.iterdir() if p.name.startswith(pipeline.LAUNCH_DIR + "-")]
    assert len(left) == 1  # kill -9 runs no cleanup …
    assert remove_stale(pipeline.LAUNCH_DIR, temp) == left  # … and the next launch removes it (launch() calls this)


def _failing_writes(monkeypatch, name: str, err: int) -> None:
    """Make every write of the file called `name` fail with `err` (as a full disk, `ulimit -f`, a read-only mount
    or a lost permission would) while other files are written as usual."""
    real = os.fdopen

    class Failing:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(err, os.strerror(err))

        def __getattr__(self, attr):
            return getattr(self.f, attr)

    def fdopen(fd, mode="r", *a, **kw):
        target = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        f = real(fd, mode, *a, **kw)
        return Failing(f) if target.startswith(f".{name}-") and "w" in mode else f

    monkeypatch.setattr(os, "fdopen", fdopen)


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EFBIG, errno.EROFS, errno.EACCES])
def test_a_write_that_fails_is_one_line_naming_the_file_and_leaves_nothing_finished(err, tmp_path, capsys, monkeypatch):
    data = str(_records(tmp_path / "calib.jsonl"))
    out = tmp_path / "curate"
    pool = str(_records(tmp_path / "pool.jsonl", 20))
    monkeypatch.setenv("FINESCOPE_HOME", str(tmp_path / "home"))
    _failing_writes(monkeypatch, "selected.jsonl", err)
    rc = main(["curate", "--method", "random", "--pool", pool, "--seeds", data, "--top-m", "5", "--out", str(out)])
    assert rc == 2
    line = _err_line(capsys)
    assert f"{out / 'selected.jsonl'}: cannot be written ({os.strerror(err)})" in line
    assert not (out / "DONE").exists() and not (out / "selected.jsonl").exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ulimit -f of bash")
def test_ulimit_f_is_one_line_exit_2(tmp_path):
    data, pool = _records(tmp_path / "calib.jsonl"), _records(tmp_path / "pool.jsonl", 400)
    out = tmp_path / "curate"
    env = {**os.environ, "FINESCOPE_HOME": str(tmp_path / "home"), "FINESCOPE_PROGRESS": "0"}
    script = f"ulimit -f 8; exec {sys.executable} -m finescope curate --method random --pool {pool} --seeds {data} --top-m 400 --out {out}"
    proc = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "cannot be written (File too large)" in proc.stderr.strip().splitlines()[-1]
    assert not (out / "DONE").exists()


def test_prune_out_in_proc_is_refused_before_model_work(tmp_path, capsys, monkeypatch):
    import finescope.prune.run as prune_run

    monkeypatch.setattr(prune_run, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    data = str(_records(tmp_path / "calib.jsonl"))
    assert main(["prune", "--model", "default", "--data", data, "--out", "/proc/finescope-x"]) == 2
    assert "/proc/finescope-x: /proc is not writable" in _err_line(capsys)


def test_kd_top_k_beyond_the_vocabulary_is_capped_with_a_warning(tmp_path, tiny_model_dirs, capsys):
    from finescope.recover.run import run
    from test_recover import _cfg, write_records

    data = write_records(tmp_path / "data.jsonl")
    teacher, student = tiny_model_dirs["llama"], tiny_model_dirs["qwen2"]
    cfg = _cfg(teacher, student, data, kd_weight=0.5, kd_cache=str(tmp_path / "kd"), kd_top_k=10**9)
    with pytest.warns(UserWarning, match=r"--kd-top-k 1000000000 is more than the teacher's vocabulary"):
        out = run(cfg, tmp_path / "out")
    metrics = json.loads((out / "metrics.json").read_text())
    from safetensors import safe_open

    with safe_open(str(tmp_path / "kd" / "kd-targets.safetensors"), framework="pt") as f:
        k = f.get_slice("ids").get_shape()[1]
    assert metrics["kd"]["top_k"] == k < 10**9


def test_unknown_variant_in_pipeline_json_warns(tmp_path):
    from finescope.report.tables import collect

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "pipeline.json").write_text(
        json.dumps({"variants": {n: {"label": n, "description": "", "stages": {}} for n in ("pruned_magic", "dense")}})
    )
    with pytest.warns(UserWarning, match=r"unknown variant\(s\) 'pruned_magic'"):
        collect(run_dir)


def test_a_failed_rank_error_is_the_launchers_last_line(tmp_path, capsys, monkeypatch):
    """torchrun ends a failed run with its own traceback; the launcher repeats the rank's one error line after it."""
    import subprocess as sp

    from finescope import pipeline

    def fake_torchrun(cmd, env=None, **kw):
        assert env[pipeline.RANK_ERRORS_ENV] and env["FINESCOPE_LAUNCHER_PID"] == str(os.getpid())
        Path(env[pipeline.RANK_ERRORS_ENV]).write_text(
            "rank 0 failed during opening x: pool.jsonl: line 3: invalid JSON\npool.jsonl: line 3: invalid JSON\n"
        )
        print("torch.distributed.elastic.multiprocessing.errors.ChildFailedError:", file=sys.stderr)
        return sp.CompletedProcess(cmd, 1)

    import tempfile

    monkeypatch.setattr(sp, "run", fake_torchrun)
    monkeypatch.setattr(pipeline, "check_run_dir", lambda root: None)
    monkeypatch.setattr(pipeline, "torch_cuda_count", lambda: 0)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    from finescope.child_process import _pid_namespace

    (tmp_path / f"finescope-launch-999999999-{_pid_namespace()}-x").mkdir()  # left by a killed launcher
    assert main(["run", "--config", "quick", "--run-dir", str(tmp_path / "run"), "--num-processes", "2"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("finescope run: error: the 2-process run of") and last.endswith(
        "failed (exit status 1): pool.jsonl: line 3: invalid JSON"
    )
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(pipeline.LAUNCH_DIR)]  # its own, and none stale


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ulimit -f of bash")
def test_ulimit_f_during_prunes_model_save_is_one_line_naming_the_model_folder(tmp_path, tiny_model_dirs):
    """safetensors' own writer fails (its error names no file): the line names the folder being saved."""
    data = _records(tmp_path / "calib.jsonl")
    out = tmp_path / "prune"
    env = {**os.environ, "FINESCOPE_HOME": str(tmp_path / "home"), "FINESCOPE_PROGRESS": "0"}
    args = f"--model {tiny_model_dirs['llama']} --data {data} --ratio 0.3 --calib-samples 4 --calib-length 32"
    script = f"ulimit -f 100; exec {sys.executable} -m finescope prune {args} --out {out}"
    proc = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert (
        proc.stderr.strip().splitlines()[-1]
        == f"finescope prune: error: {out / 'model'}: cannot be written (File too large)"
    )
    assert not (out / "DONE").exists() and not (out / "model").exists()
