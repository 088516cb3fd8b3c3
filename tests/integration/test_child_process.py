"""Children die with finescope (even on `kill -9`), and the next start removes what the killed run left behind."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from conftest import sandbox_capabilities
from finescope import child_process
from finescope.child_process import die_with_parent, owned_prefix, remove_stale
from finescope.evaluate.code_exec import _CGROUP_BASES

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="death signals and /proc are Linux-only")

DEADLINE_S = 60  # generous: polls end as soon as the condition holds


def _identity(pid: int) -> tuple[int, str] | None:
    """(pid, start time) while the process runs; None once it is gone or a zombie. Guards against pid reuse."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else (pid, fields[19])


def _running(ident: tuple[int, str]) -> bool:
    return _identity(ident[0]) == ident


def _wait_for(cond, what: str):
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"gave up waiting for: {what}")


def _python(code: str, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], stdin=subprocess.DEVNULL, **kw)


def _kill_parent_and_check(parent: subprocess.Popen, pids: list[int]) -> None:
    """SIGKILL the parent (no cleanup code runs), reap it like a shell would, then every pid must stop running."""
    idents = [i for i in map(_identity, pids) if i]
    assert len(idents) == len(pids), "the children should be running before the parent is killed"
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    _wait_for(lambda: not any(_running(i) for i in idents), f"processes {pids} to die with their parent")


def _read_marker(pattern: str, parent: subprocess.Popen) -> list[int]:
    def found():
        assert parent.poll() is None, f"the parent exited early ({parent.returncode})"
        hits = glob.glob(pattern)
        return hits and Path(hits[0]).read_text().split()

    return [int(p) for p in _wait_for(found, pattern)]


# ======================================================================================= the code sandbox

SLEEPER = """
import os, time
with open("pids.tmp", "w") as f:
    f.write(f"{os.getppid()} {os.getpid()}")
os.rename("pids.tmp", "pids")
time.sleep(600)
"""

ESCAPEE = """
import os, time
kid = os.fork()
if kid == 0:  # a grandchild that leaves the process group and session
    os.setsid()
    time.sleep(600)
    os._exit(0)
with open("pids.tmp", "w") as f:
    f.write(f"{os.getppid()} {os.getpid()} {kid}")
os.rename("pids.tmp", "pids")
time.sleep(600)
"""

PARENT = """
import sys
from finescope.evaluate.code_exec import Limits, run_program
run_program(sys.argv[1], Limits(timeout_s=600, cpu_s=600))  # only the parent's death can end it early
"""

NEXT_START = """
from finescope.evaluate.code_exec import run_program
assert run_program("pass").passed
"""


def _cgroups_of(pid: int) -> list[str]:
    return [p for base in _CGROUP_BASES for p in glob.glob(f"{base}/finescope-exec-{pid}-*")]


@pytest.mark.parametrize("program", ["sleeper", "setsid_grandchild"])
def test_killing_the_parent_kills_the_sandbox_and_next_start_cleans_up(program):
    code = SLEEPER if program == "sleeper" else ESCAPEE
    parent = _python(PARENT, code, stdout=subprocess.DEVNULL)
    try:
        # supervisor, program (and the grandchild), as the program itself reported them
        pids = _read_marker(f"{tempfile.gettempdir()}/finescope-exec-{parent.pid}-*/work/pids", parent)
        folders = glob.glob(f"{tempfile.gettempdir()}/finescope-exec-{parent.pid}-*")
        cgroups = _cgroups_of(parent.pid)
        if program == "setsid_grandchild" and not cgroups:
            pytest.skip("no pids cgroup here (needs root and writable cgroups): a setsid() child escapes the group")
        _kill_parent_and_check(parent, pids)
    finally:
        parent.kill()
        parent.wait()
    assert folders and all(os.path.isdir(f) for f in folders)  # a kill -9 leaves them: nothing ran to remove them
    subprocess.run([sys.executable, "-c", NEXT_START], check=True)
    assert not any(os.path.exists(f) for f in folders)
    assert not any(os.path.exists(c) for c in cgroups)


def test_sandbox_reports_the_death_signal():
    from finescope.evaluate.code_exec import run_program

    r = run_program("pass")
    assert r.passed and r.confinement["dies_with_parent"] is True
    if sandbox_capabilities()["drops_privileges"]:
        assert r.confinement["uid"] != 0  # the death signal was set after the drop (setuid would clear it)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGSEGV])
def test_supervisor_relays_the_programs_death_by_signal(sig):
    from finescope.evaluate.code_exec import run_program

    r = run_program(f"import os\nos.kill(os.getpid(), {int(sig)})")
    assert r.status == "killed" and r.returncode == -sig
    assert run_program("raise SystemExit(3)").returncode == 3


# ===================================================================================== prune verification

VERIFY_PARENT = """
import importlib, sys, torch
from pathlib import Path
run = importlib.import_module("finescope.prune.run")  # the stage module (the package exports nothing)
# the real verify_saved, with a child that announces itself in its temp folder and then blocks
run._VERIFY = "import os, sys, time; open(os.path.dirname(sys.argv[3]) + '/pid', 'w').write(str(os.getpid())); time.sleep(600)"
run.verify_saved(Path("unused"), torch.zeros(1, 2, dtype=torch.long), torch.zeros(1), dtype=torch.float32, device="cpu")
"""

VERIFY_NEXT_START = """
import importlib, torch
from pathlib import Path
run = importlib.import_module("finescope.prune.run")
run._VERIFY = "raise SystemExit(1)"
try:
    run.verify_saved(Path("unused"), torch.zeros(1, 2, dtype=torch.long), torch.zeros(1), dtype=torch.float32,
                     device="cpu")
except run.PruneError:
    pass
"""


def test_killing_the_parent_kills_prune_verification_and_next_start_cleans_up():
    parent = _python(VERIFY_PARENT)
    try:
        pids = _read_marker(f"{tempfile.gettempdir()}/finescope-verify-{parent.pid}-*/pid", parent)
        folders = glob.glob(f"{tempfile.gettempdir()}/finescope-verify-{parent.pid}-*")
        _kill_parent_and_check(parent, pids)
    finally:
        parent.kill()
        parent.wait()
    assert folders  # (another finescope process starting meanwhile may already have removed them: that is fine)
    subprocess.run([sys.executable, "-c", VERIFY_NEXT_START], check=True)
    assert not any(os.path.exists(f) for f in folders)


def test_die_with_parent_launcher_kills_a_plain_command(tmp_path):
    """The shared launcher alone: a parent starts `sleep` through it and is killed."""
    marker = tmp_path / "pid"
    parent = _python(
        """
        import subprocess, sys
        from finescope.child_process import die_with_parent
        subprocess.run(die_with_parent(["sh", "-c", f"echo $$ > {sys.argv[1]}.tmp; mv {sys.argv[1]}.tmp {sys.argv[1]}; exec sleep 600"]))
    """,
        str(marker),
    )
    try:
        pids = _read_marker(str(marker), parent)
        _kill_parent_and_check(parent, pids)
    finally:
        parent.kill()
        parent.wait()


def test_die_with_parent_runs_the_command_normally_and_never_after_the_parent_died(tmp_path):
    ok = subprocess.run(
        die_with_parent([sys.executable, "-c", "import sys; print('hi'); sys.exit(3)"]), capture_output=True, text=True
    )
    assert ok.returncode == 3 and ok.stdout == "hi\n"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a dead parent pid: the race where the parent dies before the death signal is set
    marker = tmp_path / "ran"
    late = subprocess.run([sys.executable, "-I", "-S", child_process.__file__, str(gone.pid), "touch", str(marker)])
    assert late.returncode == -signal.SIGKILL and not marker.exists()


# ===================================================================================== the cleanup itself


def test_cleanup_removes_only_dead_owners_folders(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        ns = owned_prefix("k").split("-")[2]
        folders = {
            "live": tmp_path / f"finescope-exec-{live.pid}-{ns}-abc",
            "dead": tmp_path / f"finescope-exec-{dead.pid}-{ns}-abc",
            "ours": Path(tempfile.mkdtemp(prefix=owned_prefix("finescope-exec"), dir=tmp_path)),
            "no_owner": tmp_path / "finescope-exec-abc123",  # older versions and other tools: left alone
            "other_pid_namespace": tmp_path / f"finescope-exec-{dead.pid}-{int(ns) + 1}-abc",
            "other_kind": tmp_path / f"finescope-verify-{dead.pid}-{ns}-abc",
        }
        for f in folders.values():
            f.mkdir(exist_ok=True)
            (f / "file").write_text("x")
        assert remove_stale("finescope-exec", tmp_path) == [folders["dead"]]
        assert {k for k, f in folders.items() if f.exists()} == set(folders) - {"dead"}
        live.kill()
        live.wait()
        assert remove_stale("finescope-exec", tmp_path) == [folders["live"]]  # once its owner is gone
    finally:
        live.kill()
        live.wait()
