"""SIGKILL every stage at several points; the rerun completes, its artifacts equal an uninterrupted run's, and no
process, temp folder or cgroup of the killed run survives.

Each stage runs as a real `python -m finescope.cli` subprocess (the direct child of the test) on the tiny models
of conftest.py. Kill points are found by polling the filesystem and /proc — production code has no test hooks:

| stage   | kill point   | trigger                                               | proof the point was reached (after the kill) |
|---------|--------------|-------------------------------------------------------|----------------------------------------------|
| prune   | importance   | config.json appears                                   | neither `model/` nor its temp folder exists   |
| prune   | save         | the temp folder of `model/` appears (`.model…tmp`)    | it is still there, `model/` is not            |
| prune   | verification | the stock-reload subprocess runs (`finescope-verify-…`)| its temp folder is left, it was our child     |
| recover | rewrite      | rewrites.partial.jsonl has a finished batch           | it holds some but not all rewrites           |
| recover | finetune     | distilled.jsonl appears (LoRA training follows)       | no adapter/model saved yet                   |
| recover | save         | the adapter folder (temp or final) appears            | DONE absent, merged model incomplete or unevaluated |
| curate  | coordinates  | config.json appears                                   | nothing selected yet                         |
| curate  | encoding     | the trained SAE is in the cache                       | nothing selected yet                         |
| eval    | sandbox      | the generated program runs in the sandbox             | `finescope-exec-…` left, program was our grandchild |

A point the process outran (it finished, or passed the point before the signal landed) is retried in a fresh
folder, then skipped with the reason — never passed vacuously. Each test sets its own TMPDIR (world-searchable,
in the system temp dir: the sandbox runs programs as `nobody` when started as root), so the temp dir of the stage
and of its sandbox and verification children is a folder only this test looks at.

The atomic-write primitives are also killed mid-write outside any stage folder (a cache): the next write of the
same target must remove what the killed one left.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import CORPUS

SRC = Path(__file__).resolve().parents[2] / "src"
ATTEMPTS = 4  # tries to land a kill inside a narrow window (e.g. a 15 ms model save)
RUN_TIMEOUT = 600  # generous: a loaded 2-core machine
GONE_DEADLINE = 60  # seconds for the kernel to end the killed run's children

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and Linux death signals")


# ================================================================================================ processes


@dataclass
class Proc:
    pid: int
    ppid: int
    state: str
    start: str  # starttime in clock ticks since boot: with the pid, identifies one process (pids get reused)
    uid: int
    cmdline: list[str]

    @property
    def live(self) -> bool:
        return self.state not in ("Z", "X")


def _proc(pid: int) -> Proc | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
        uid = os.stat(f"/proc/{pid}").st_uid
    except (OSError, IndexError):
        return None
    return Proc(pid, int(fields[1]), fields[0], fields[19], uid, cmdline)


def _processes() -> dict[int, Proc]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            p = _proc(int(entry))
            if p is not None:
                out[p.pid] = p
    return out


def _descendants(root: int, procs: dict[int, Proc]) -> list[Proc]:
    children: dict[int, list[Proc]] = {}
    for p in procs.values():
        children.setdefault(p.ppid, []).append(p)
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c.pid)
    return out


@dataclass
class Killed:
    pid: int
    descendants: dict[tuple[int, str], Proc] = field(default_factory=dict)  # every one seen while it ran
    log: Path | None = None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log else ""


def _env(home: Path, tmpdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TMPDIR", "TMP", "TEMP")}
    env.update(
        PYTHONPATH=str(SRC),
        HF_HUB_OFFLINE="1",
        FINESCOPE_PROGRESS="0",
        FINESCOPE_HOME=str(home),
        TMPDIR=str(tmpdir),
        TRANSFORMERS_VERBOSITY="error",
    )
    return env


def _cmd(stage: str, args: list[str], out: Path) -> list[str]:
    return [sys.executable, "-m", "finescope.cli", stage, *args, "--out", str(out)]


def run_to_end(cmd: list[str], env: dict, log: Path) -> None:
    with open(log, "wb") as f:
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT, cwd=env["TMPDIR"])
    text = log.read_text(errors="replace")
    assert proc.returncode == 0, f"{cmd[3]} exited {proc.returncode}:\n{text[-4000:]}"
    assert "Traceback" not in text, text[-4000:]


def run_and_kill(cmd: list[str], env: dict, log: Path, trigger: Callable[[int], bool]) -> Killed | None:
    """Start `cmd`, SIGKILL it the moment `trigger(pid)` holds; None when it finished first.

    Every descendant seen while it ran is recorded (pid + start time), including at the moment of the kill."""
    f = open(log, "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=env.get("TMPDIR"))
    killed = Killed(proc.pid, log=log)
    deadline = time.monotonic() + RUN_TIMEOUT
    last_scan = 0.0
    try:
        while True:
            now = time.monotonic()
            if now - last_scan > 0.05:  # a /proc scan costs a few ms: not on every poll of a narrow window
                last_scan = now
                killed.descendants.update({(p.pid, p.start): p for p in _descendants(proc.pid, _processes())})
            if proc.poll() is not None:
                return None
            if trigger(proc.pid):
                # Record the process tree right before the kill: afterwards the orphans are reparented (to init or
                # a subreaper) and no longer found under the killed pid.
                killed.descendants.update({(p.pid, p.start): p for p in _descendants(proc.pid, _processes())})
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                assert proc.returncode == -signal.SIGKILL, f"not killed (rc {proc.returncode}):\n{killed.log_text()}"
                return killed
            assert now < deadline, "stage did not reach the kill point nor finish"
            time.sleep(0.002)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        f.close()


def assert_nothing_survives(killed: Killed, *paths: Path) -> None:
    """Within a generous deadline: no descendant of the killed run, nothing whose parent was the killed process,
    and no process whose command line names the stage's out folder or its temp dir is still running."""
    deadline = time.monotonic() + GONE_DEADLINE
    while True:
        procs = _processes()
        alive = []
        for pid, start in killed.descendants:
            p = procs.get(pid)
            if p is not None and p.start == start and p.live:
                alive.append(p)
        for p in procs.values():
            if not p.live or p.pid == os.getpid() or p in alive:
                continue
            text = "\0".join(p.cmdline)
            if p.ppid == killed.pid or any(str(path) in text for path in paths):
                alive.append(p)
        if not alive:
            return
        if time.monotonic() > deadline:
            pytest.fail(
                "processes of the killed run survive:\n"
                + "\n".join(
                    f"  pid {p.pid} ppid {p.ppid} uid {p.uid} state {p.state}: {' '.join(p.cmdline)[:300]}"
                    for p in alive
                )
            )
        time.sleep(0.1)


def _owned(kind: str, pid: int, folder: Path) -> list[Path]:
    return [Path(p) for p in glob.glob(str(folder / f"{kind}-{pid}-*"))]


def _cgroups(pid: int) -> list[str]:
    return [
        p for base in ("/sys/fs/cgroup/pids", "/sys/fs/cgroup") for p in glob.glob(f"{base}/finescope-exec-{pid}-*")
    ]


def assert_clean_after_rerun(killed: Killed, out: Path, tmpdir: Path) -> None:
    """After the rerun (the "next start"): no temp file/folder in the stage folder, no folder set aside, no temp
    folder or pids cgroup owned by the killed pid, in the stage's temp dir or the system one."""
    assert (out / "DONE").is_file()
    temps = [p for p in out.rglob("*") if p.name.endswith(".tmp") or ".old-" in p.name]
    assert not temps, f"temp files left in the stage folder: {temps}"
    aside = [p for p in out.parent.iterdir() if p.name.startswith(out.name + ".superseded")]
    assert not aside, f"the rerun set the killed run's folder aside instead of resuming it: {aside}"
    for folder in {tmpdir, Path("/tmp")}:
        for kind in ("finescope-exec", "finescope-verify"):
            left = _owned(kind, killed.pid, folder)
            assert not left, f"temp folders of the killed pid {killed.pid} survive the next start: {left}"
    assert not _cgroups(killed.pid), f"pids cgroups of the killed pid survive the next start: {_cgroups(killed.pid)}"


# ================================================================================================ comparisons


def _safetensors(folder: Path) -> dict[str, bytes]:
    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no weights in {folder}"
    return {f.name: f.read_bytes() for f in files}


def assert_same_weights(got: Path, want: Path) -> None:
    """Byte-identical safetensors files (else: name the tensors that differ, for the report)."""
    a, b = _safetensors(got), _safetensors(want)
    if a == b:
        return
    import torch
    from safetensors.torch import load_file

    diffs = []
    for name in sorted(set(a) | set(b)):
        ta, tb = load_file(str(got / name)) if name in a else {}, load_file(str(want / name)) if name in b else {}
        for key in sorted(set(ta) | set(tb)):
            if key not in ta or key not in tb or ta[key].shape != tb[key].shape or not torch.equal(ta[key], tb[key]):
                extra = ""
                if key in ta and key in tb and ta[key].shape == tb[key].shape:
                    extra = f" max abs diff {float((ta[key].float() - tb[key].float()).abs().max()):.3g}"
                diffs.append(f"{name}:{key}{extra}")
    pytest.fail(f"{got} differs from the uninterrupted run's {want}: {diffs[:10] or 'metadata only'}")


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


# ================================================================================================ kill harness


@dataclass
class Case:
    stage: str
    args: list[str]
    trigger: Callable[[Path, Path, Path], Callable[[int], bool]]  # (out, tmpdir, home) → trigger(pid)
    reached: Callable[[Killed, Path, Path, Path], str | None]  # None when the kill landed at the point, else why not


def kill_and_resume(case: Case, tmp_path: Path, tmpdir: Path) -> tuple[Killed, Path]:
    """Kill `case` at its point (retrying a missed window), check nothing survives, rerun, check the leftovers
    are gone. Returns the killed run and the finished stage folder, for the stage-specific comparison."""
    home = tmp_path / "home"
    home.mkdir()
    env = _env(home, tmpdir)
    misses = []
    for attempt in range(ATTEMPTS):
        out = tmp_path / f"{case.stage}-{attempt}"
        cmd = _cmd(case.stage, case.args, out)
        killed = run_and_kill(cmd, env, tmp_path / f"killed-{attempt}.log", case.trigger(out, tmpdir, home))
        if killed is None:
            misses.append(f"attempt {attempt}: the stage finished before the kill point was seen")
            continue
        assert not (out / "DONE").exists(), "killed run wrote DONE"
        assert_nothing_survives(killed, out, tmpdir)
        left = [p.name for kind in ("finescope-exec", "finescope-verify") for p in _owned(kind, killed.pid, tmpdir)]
        left += _cgroups(killed.pid) + [p.name for p in out.rglob("*") if p.name.endswith(".tmp")]
        why_not = case.reached(killed, out, tmpdir, home)
        if why_not is not None:
            misses.append(f"attempt {attempt}: {why_not}")
            continue
        run_to_end(cmd, env, tmp_path / f"rerun-{attempt}.log")
        assert_clean_after_rerun(killed, out, tmpdir)
        print(
            f"{case.stage}: killed pid {killed.pid} on attempt {attempt + 1}; children seen: "
            f"{[' '.join(p.cmdline)[:80] for p in killed.descendants.values()]}; left for the next start: {left}; "
            f"misses: {misses}"
        )
        return killed, out
    pytest.skip(f"{case.stage}: kill point not reached in {ATTEMPTS} attempts: " + "; ".join(misses))


TEMP = ".{}[.-]*.tmp"  # atomic_dir's temp folder of a target: `.<name>.<random>.tmp` or `.<name>-<pid>-<ns>-….tmp`


def _exists(out: Path, pattern: str) -> bool:
    return any(out.glob(pattern))


def _when(pred: Callable[[], bool]) -> Callable[[int], bool]:
    return lambda pid: pred()


# ================================================================================================ inputs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("kill-inputs")
    calib = [{"instruction": f"Say something about item {i}.", "response": t} for i, t in enumerate(CORPUS)]
    calib += [{"text": t} for t in CORPUS[:4]]
    (base / "calib.jsonl").write_text("".join(json.dumps(r) + "\n" for r in calib))
    data = [
        {"id": f"r{i}", "instruction": f"Question {i}: {CORPUS[i % 6]}", "response": f"Answer {i}."} for i in range(12)
    ]
    data.append({"id": "t1", "text": CORPUS[1]})
    (base / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    math = [
        f"Tom has {i} apples and buys {i + 3} more. How many apples does he have now? {2 * i + 3}." for i in range(20)
    ]
    news = [
        f"Shares of company {i} rose {i % 7}% on Monday after strong quarterly earnings were reported."
        for i in range(20)
    ]
    pool = [{"instruction": t, "response": "ok", "source": "math"} for t in math]
    pool += [{"text": t, "source": "news"} for t in news] + [{"text": news[0], "source": "news"}]
    (base / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pool))
    (base / "ref.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in news + math))
    (base / "seeds.jsonl").write_text("".join(json.dumps({"instruction": t, "response": "x"}) + "\n" for t in math[:3]))
    # An MBPP task whose program sleeps whatever the (random, garbage) completion is: the completion lands inside
    # a raw triple-quoted string opened by the setup code and closed by the first test line.
    mbpp = {
        "task_id": "sleepy",
        "text": "Write a function that returns one.",
        "code": "def one():\n    return 1",
        "test_setup_code": "import time\ntime.sleep(3)\n_completion = r'''",
        "test_list": ["'''", "assert 1 + 1 == 2"],
    }
    (base / "mbpp_sleepy.jsonl").write_text(json.dumps(mbpp) + "\n")
    return {p.stem: p for p in base.iterdir()}


@contextlib.contextmanager
def _system_tmpdir():
    """A fresh TMPDIR for one stage run, in the system temp dir: world-searchable, as the sandbox needs when it
    runs programs as `nobody` (pytest's own tmp_path sits under a 0700 folder that `nobody` cannot enter)."""
    path = Path(tempfile.mkdtemp(prefix="finescope-killtest-"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def tmpdir_for_stage():
    with _system_tmpdir() as path:
        yield path


def _reference(tmp_path_factory, stage: str, args: list[str]) -> Path:
    base = tmp_path_factory.mktemp(f"ref-{stage}")
    (base / "home").mkdir()
    out = base / stage
    with _system_tmpdir() as tmpdir:
        run_to_end(_cmd(stage, args, out), _env(base / "home", tmpdir), base / "run.log")
    return out


# ================================================================================================ prune


def _prune_args(models, inputs) -> list[str]:
    return [
        "--model",
        str(models["llama"]),
        "--data",
        str(inputs["calib"]),
        "--ratio",
        "0.4",
        "--depth",
        "1",
        "--batch-size",
        "8",
    ]


@pytest.fixture(scope="module")
def prune_reference(tmp_path_factory, tiny_model_dirs, inputs) -> Path:
    return _reference(tmp_path_factory, "prune", _prune_args(tiny_model_dirs, inputs))


def _verify_child(pid: int, tmpdir: Path) -> bool:
    """The stock-reload subprocess of `pid` is running (exec'd past the die-with-parent wrapper)."""
    if not _owned("finescope-verify", pid, tmpdir):
        return False
    return any(
        p.live and p.cmdline[1:2] == ["-c"] and "from_pretrained(folder" in " ".join(p.cmdline)
        for p in _descendants(pid, _processes())
    )


def _prune_reached(point: str):
    def check(killed: Killed, out: Path, tmpdir: Path, home: Path) -> str | None:
        saving, saved = _exists(out, TEMP.format("model")), (out / "model").exists()
        if point == "importance":
            return (
                None
                if (out / "config.json").is_file() and not saving and not saved
                else "killed after the model save had begun"
            )
        if point == "save":
            return None if saving and not saved else "killed after the save finished"
        verifiers = [p for p in killed.descendants.values() if "from_pretrained(folder" in " ".join(p.cmdline)]
        assert verifiers, "the verification subprocess was never seen among the killed run's children"
        assert _owned("finescope-verify", killed.pid, tmpdir), "no verification temp folder of the killed run"
        return None if saved else "killed before the model was saved"

    return check


PRUNE_TRIGGERS = {
    "importance": lambda out, tmpdir, home: _when(lambda: (out / "config.json").is_file()),
    "save": lambda out, tmpdir, home: _when(lambda: _exists(out, TEMP.format("model"))),
    "verification": lambda out, tmpdir, home: lambda pid: _verify_child(pid, tmpdir),
}


@pytest.mark.parametrize("point", list(PRUNE_TRIGGERS))
def test_prune_killed_then_rerun_equals_uninterrupted(
    point, tmp_path, tmpdir_for_stage, tiny_model_dirs, inputs, prune_reference
):
    case = Case("prune", _prune_args(tiny_model_dirs, inputs), PRUNE_TRIGGERS[point], _prune_reached(point))
    killed, out = kill_and_resume(case, tmp_path, tmpdir_for_stage)
    assert_same_weights(out / "model", prune_reference / "model")
    got, want = (json.loads((d / "report.json").read_text()) for d in (out, prune_reference))
    for key in ("plan", "kept", "dropped_blocks", "parameters", "shapes_after", "calibration_loss"):
        assert got[key] == want[key], key
    assert got["verification"]["logits_match"]


# ================================================================================================ recover


def _recover_args(models, inputs) -> list[str]:
    model = str(models["llama"])
    return [
        "--student",
        model,
        "--teacher",
        model,
        "--data",
        str(inputs["data"]),
        "--max-new-tokens",
        "16",
        "--rewrite-batch-size",
        "2",
        "--lora-rank",
        "2",
        "--batch-size",
        "4",
        "--micro-batch-size",
        "2",
        "--epochs",
        "1",
        "--max-length",
        "128",
    ]


@pytest.fixture(scope="module")
def recover_reference(tmp_path_factory, tiny_model_dirs, inputs) -> Path:
    return _reference(tmp_path_factory, "recover", _recover_args(tiny_model_dirs, inputs))


def _partial_rows(out: Path) -> int:
    try:
        return sum(1 for line in _lines(out / "rewrites.partial.jsonl") if line.strip())
    except OSError:
        return 0


def _recover_reached(point: str):
    def check(killed: Killed, out: Path, tmpdir: Path, home: Path) -> str | None:
        rows = _partial_rows(out)
        if point == "rewrite":
            if (out / "distilled.jsonl").exists() or rows >= 12:
                return "killed after the rewrites were finished"
            return None if rows >= 1 else "killed before a rewrite batch was saved"
        adapter = _exists(out, TEMP.format("adapter")) or (out / "adapter").exists()
        if point == "finetune":
            return (
                None if (out / "distilled.jsonl").is_file() and not adapter else "killed after the adapter save began"
            )
        return None if adapter else "killed before the adapter save began"

    return check


RECOVER_TRIGGERS = {
    "rewrite": lambda out, tmpdir, home: _when(lambda: _partial_rows(out) >= 1),
    "finetune": lambda out, tmpdir, home: _when(lambda: (out / "distilled.jsonl").is_file()),
    "save": lambda out, tmpdir, home: _when(lambda: _exists(out, TEMP.format("adapter")) or (out / "adapter").exists()),
}


@pytest.mark.parametrize("point", list(RECOVER_TRIGGERS))
def test_recover_killed_then_rerun_equals_uninterrupted(
    point, tmp_path, tmpdir_for_stage, tiny_model_dirs, inputs, recover_reference
):
    case = Case("recover", _recover_args(tiny_model_dirs, inputs), RECOVER_TRIGGERS[point], _recover_reached(point))
    killed, out = kill_and_resume(case, tmp_path, tmpdir_for_stage)
    assert (out / "distilled.jsonl").read_bytes() == (recover_reference / "distilled.jsonl").read_bytes()
    assert_same_weights(out / "model", recover_reference / "model")
    assert_same_weights(out / "adapter", recover_reference / "adapter")
    assert not (out / "rewrites.partial.jsonl").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    want = json.loads((recover_reference / "metrics.json").read_text())
    if point == "rewrite":  # the rerun resumed the killed run's rewrites instead of regenerating them
        assert 1 <= metrics["rewrite"]["resumed"] < 12 and metrics["rewrite"]["generated"] >= 1
    assert [r["loss"] for r in metrics["train"]["train_loss"]] == [r["loss"] for r in want["train"]["train_loss"]]


def test_recover_sampled_rewrite_killed_then_rerun_equals_uninterrupted(
    tmp_path, tmpdir_for_stage, tiny_model_dirs, inputs
):
    args = _recover_args(tiny_model_dirs, inputs) + ["--temperature", "0.7", "--epochs", "0.25"]
    ref = tmp_path / "reference"
    (tmp_path / "ref-home").mkdir()
    run_to_end(_cmd("recover", args, ref), _env(tmp_path / "ref-home", tmpdir_for_stage), tmp_path / "ref.log")
    case = Case("recover", args, RECOVER_TRIGGERS["rewrite"], _recover_reached("rewrite"))
    killed, out = kill_and_resume(case, tmp_path, tmpdir_for_stage)
    assert json.loads((out / "metrics.json").read_text())["rewrite"]["resumed"] >= 1
    assert (out / "distilled.jsonl").read_bytes() == (ref / "distilled.jsonl").read_bytes()


# ================================================================================================ curate


def _curate_args(models, inputs) -> list[str]:
    return [
        "--model",
        str(models["llama"]),
        "--pool",
        str(inputs["pool"]),
        "--seeds",
        str(inputs["seeds"]),
        "--reference",
        str(inputs["ref"]),
        "--num-coords",
        "16",
        "--sae-expansion",
        "4",
        "--sae-k",
        "4",
        "--sae-steps",
        "60",
        "--sae-batch-size",
        "64",
        "--top-m",
        "10",
        "--max-length",
        "32",
        "--coord-samples",
        "8",
        "--batch-size",
        "8",
    ]


@pytest.fixture(scope="module")
def curate_reference(tmp_path_factory, tiny_model_dirs, inputs) -> Path:
    return _reference(tmp_path_factory, "curate", _curate_args(tiny_model_dirs, inputs))  # its own, cold cache


def _sae_cached(home: Path) -> bool:
    return bool(glob.glob(str(home / "cache" / "curate" / "sae-*" / "sae" / "cfg.json")))


def _curate_reached(point: str):
    def check(killed: Killed, out: Path, tmpdir: Path, home: Path) -> str | None:
        if (out / "selected.jsonl").exists():
            return "killed after the selection was written"
        if point == "encoding" and not _sae_cached(home):
            return "killed before the SAE was cached"
        return None

    return check


CURATE_TRIGGERS = {
    "coordinates": lambda out, tmpdir, home: _when(lambda: (out / "config.json").is_file()),
    "encoding": lambda out, tmpdir, home: _when(lambda: _sae_cached(home)),
}


@pytest.mark.parametrize("point", list(CURATE_TRIGGERS))
def test_curate_killed_then_rerun_equals_uninterrupted(
    point, tmp_path, tmpdir_for_stage, tiny_model_dirs, inputs, curate_reference
):
    import pyarrow.parquet as pq

    case = Case("curate", _curate_args(tiny_model_dirs, inputs), CURATE_TRIGGERS[point], _curate_reached(point))
    killed, out = kill_and_resume(case, tmp_path, tmpdir_for_stage)
    assert (out / "selected.jsonl").read_bytes() == (curate_reference / "selected.jsonl").read_bytes()
    assert pq.read_table(out / "scores.parquet").equals(pq.read_table(curate_reference / "scores.parquet"))
    assert (out / "coords.safetensors").read_bytes() == (curate_reference / "coords.safetensors").read_bytes()
    assert_same_weights(out / "sae" / "layer2", curate_reference / "sae" / "layer2")
    cache_temps = [p for p in (tmp_path / "home").rglob("*") if p.name.endswith(".tmp")]
    assert not cache_temps, f"temp files of the killed run left in the curate cache: {cache_temps}"


# ================================================================================================ eval


def _eval_args(models, inputs) -> list[str]:
    return [
        "--model",
        str(models["llama"]),
        "--tasks",
        f"mbpp:{inputs['mbpp_sleepy']}",
        "--allow-code-execution",
        "--max-new-tokens",
        "8",
        "--batch-size",
        "2",
        "--exec-timeout-s",
        "60",
        "--write-samples",
        "--device",
        "cpu",
    ]


@pytest.fixture(scope="module")
def eval_reference(tmp_path_factory, tiny_model_dirs, inputs) -> Path:
    out = _reference(tmp_path_factory, "eval", _eval_args(tiny_model_dirs, inputs))
    result = json.loads((out / "results.json").read_text())["results"][0]
    # The program slept and passed: the sandbox really ran it (a kill can land while it runs).
    assert result["value"] == 1.0, result
    return out


def _sandboxed_program(pid: int, tmpdir: Path) -> bool:
    """The generated program itself (exec'd by the sandbox launcher) is running under `pid`."""
    if not _owned("finescope-exec", pid, tmpdir):
        return False
    return any(
        p.live and "-B" in p.cmdline and p.cmdline[-1].endswith("program.py") for p in _descendants(pid, _processes())
    )


def _eval_reached(killed: Killed, out: Path, tmpdir: Path, home: Path) -> str | None:
    programs = [p for p in killed.descendants.values() if p.cmdline and p.cmdline[-1].endswith("program.py")]
    assert len(programs) >= 2, "the sandbox launcher and the program were not both seen among the killed run's children"
    assert _owned("finescope-exec", killed.pid, tmpdir), "no sandbox temp folder of the killed run"
    return None if not (out / "results.json").exists() else "killed after the results were written"


def test_eval_killed_during_sandboxed_execution_then_rerun_equals_uninterrupted(
    tmp_path, tmpdir_for_stage, tiny_model_dirs, inputs, eval_reference
):
    case = Case(
        "eval",
        _eval_args(tiny_model_dirs, inputs),
        lambda out, tmpdir, home: lambda pid: _sandboxed_program(pid, tmpdir),
        _eval_reached,
    )
    killed, out = kill_and_resume(case, tmp_path, tmpdir_for_stage)

    def values(folder: Path) -> list[dict]:
        return [
            {k: v for k, v in r.items() if k != "wall_s"}
            for r in json.loads((folder / "results.json").read_text())["results"]
        ]

    assert values(out) == values(eval_reference)
    samples = sorted((out / "samples").glob("*.jsonl"))
    assert [p.read_bytes() for p in samples] == [
        eval_reference.joinpath("samples", p.name).read_bytes() for p in samples
    ]


# ================================================================================================ atomic writes


_WRITERS = {
    # a big payload keeps the temp file open long enough to be seen and killed in
    "write_atomic": "storage.write_atomic(target, b'\\0' * ({mib} << 20))",
    "atomic_dir": "with storage.atomic_dir(target) as tmp:\n    (tmp / 'weights').write_bytes(b'\\0' * ({mib} << 20))",
}


@pytest.mark.parametrize("primitive", list(_WRITERS))
def test_killed_atomic_write_outside_a_stage_is_cleaned_by_the_next_write(primitive, tmp_path):
    """A cache (curate's shards, the converted default model) has no locked stage folder whose reopening removes
    temp files: the next write of the same target must remove what a killed writer left, never a live one's."""
    target = tmp_path / "cache" / "shard.safetensors"
    target.parent.mkdir()
    env = {**os.environ, "PYTHONPATH": str(SRC)}

    def code(mib: int) -> str:
        return (
            "import sys\nfrom pathlib import Path\nfrom finescope import storage\ntarget = Path(sys.argv[1])\n"
            + _WRITERS[primitive].format(mib=mib)
            + "\n"
        )

    def temps() -> list[Path]:
        return list(target.parent.glob(f".{target.name}*.tmp"))

    for attempt in range(ATTEMPTS):
        killed = run_and_kill(
            [sys.executable, "-c", code(256 << attempt), str(target)],
            env,
            tmp_path / f"killed-{attempt}.log",
            _when(lambda: bool(temps())),
        )
        if killed is not None and temps() and not target.exists():
            break
        for p in temps() + [target]:  # missed the window: start over with a bigger payload
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    else:
        pytest.skip(f"{primitive}: never killed while the temp file existed in {ATTEMPTS} attempts")
    left = temps()
    subprocess.run([sys.executable, "-c", code(0), str(target)], env=env, check=True, timeout=RUN_TIMEOUT)
    assert target.exists()
    assert not temps(), f"the killed {primitive} left {left}; the next write of the same target kept {temps()}"
