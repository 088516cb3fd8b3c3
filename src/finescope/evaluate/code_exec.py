"""Run untrusted, model-generated Python in a confined subprocess, and the unbiased pass@k estimator.

Each program runs in its own fresh interpreter, in its own process group, with its current directory in a new
temporary folder and a minimal environment (PATH, HOME and TMPDIR pointing at that folder, LANG; nothing
inherited, so no tokens or keys leak). Limits, all applied before the program starts (see `_sandbox_launch.py`):

| threat                 | containment                                                                                 |
|------------------------|---------------------------------------------------------------------------------------------|
| infinite loop          | RLIMIT_CPU (cpu_s) and a wall-clock timeout (timeout_s); the whole process group is SIGKILLed |
| unbounded allocation   | RLIMIT_AS (memory_mb): the allocation fails with MemoryError                                 |
| fork bomb              | RLIMIT_NPROC (enforced for non-root users; as root the program first drops to `nobody`), and the process group is killed at the end |
| writes outside its dir | Landlock (Linux ≥ 5.13): file creation/writes/removal allowed only under the temp folder; also no TCP and no signals to outside processes. As root, additionally runs as `nobody` in a private network namespace |
| huge outputs           | RLIMIT_FSIZE (file_mb) on every file, stdout/stderr included                                  |
| finescope killed       | a supervisor between finescope and the program gets SIGTERM from the kernel when finescope dies (even by SIGKILL) and SIGKILLs the process group and, as root, the pids cgroup; the program itself also has a death signal in case the supervisor is killed |
| leftovers of a kill    | the first `run_program` of a process removes temp folders and pids cgroups whose owning process is dead (the owner pid is in their name), killing anything still in such a cgroup |

Honest limits: this is not a container. Without Landlock (old kernels, macOS) writes outside the folder are
stopped only by file permissions (as `nobody` when started as root; not at all for an ordinary user running
as themselves), and reads are never restricted. Without root (no pids cgroup) a child that calls setsid() leaves
the process group; it keeps the CPU, memory and process limits but is not killed at the end, nor when finescope
dies (as root the pids cgroup holds it: it is killed at the end, when finescope dies, or at the latest by the
next run's cleanup if the supervisor itself was SIGKILLed). Death signals are Linux-only: elsewhere a killed
finescope leaves its program running (a sleeping one indefinitely), and its temp folder until the next run.
For hostile code, run inside a container/VM.

    from finescope.evaluate.code_exec import run_program
    r = run_program("assert 1 + 1 == 2")
    r.passed, r.status   # True, "passed"
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import FinescopeError
from ..child_process import is_stale, owned_prefix, remove_stale

_LAUNCHER = Path(__file__).with_name("_sandbox_launch.py")
_NOBODY = 65534
_KIND = "finescope-exec"  # temp folders and cgroups: `<kind>-<owner pid>-<pid namespace>-…`
_stale_cleaned = False


class CodeExecutionError(FinescopeError):
    """Code execution was requested without permission, or the sandbox cannot be set up."""


@dataclass
class Limits:
    timeout_s: float = 10.0
    """Wall-clock limit per program."""
    cpu_s: int = 5
    """CPU-time limit per process (RLIMIT_CPU)."""
    memory_mb: int = 1024
    """Address-space limit per process (RLIMIT_AS)."""
    file_mb: int = 16
    """Largest file a program may write (RLIMIT_FSIZE), stdout/stderr included."""
    nproc: int = 32
    """Processes the sandbox user may run (RLIMIT_NPROC)."""


@dataclass
class ExecResult:
    status: str
    """passed | failed (non-zero exit) | timeout (wall clock) | killed (signal: CPU limit, …)."""
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float
    pgid: int
    confinement: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _tail(path: Path, n: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _check_reachable_by_nobody(folder: Path) -> None:
    """As root, programs run as `nobody`: every folder above their work folder must let others pass (o+x), or each
    program would fail to open its own file and every pass@k would silently read 0."""
    for d in [folder, *folder.parents]:
        if not d.stat().st_mode & 0o001:
            raise CodeExecutionError(
                f"{d}: not searchable by other users (mode {d.stat().st_mode & 0o777:o}), so the "
                f"sandbox user nobody cannot reach its programs under {folder}; set TMPDIR to a "
                "folder all users can enter (e.g. /tmp)"
            )


def run_program(code: str, limits: Limits | None = None) -> ExecResult:
    """Run `code` (a complete Python program) confined; exit status 0 = passed."""
    limits = limits or Limits()
    _remove_stale_once()
    root, program, python, drop = _prepare_sandbox(code)
    work = program.parent
    nproc = limits.nproc if drop else _user_process_count() + 1 + limits.nproc  # +1: the launcher's supervisor
    cgroup = _make_pids_cgroup(limits.nproc) if os.geteuid() == 0 else None
    spec = {
        "memory_mb": limits.memory_mb,
        "cpu_s": limits.cpu_s,
        "file_mb": limits.file_mb,
        "nproc": nproc,
        "work_dir": str(work),
        "report": str(root / "report.json"),
        "python": python,
        "cgroup": str(cgroup) if cgroup else None,
        "parent_pid": os.getpid(),
        "drop_to_uid": _NOBODY if drop else None,
        "drop_to_gid": _NOBODY if drop else None,
    }
    start = time.perf_counter()
    status, rc, pgid = _launch_and_wait(spec, program, root, limits.timeout_s, cgroup)
    wall = time.perf_counter() - start
    try:
        confinement = json.loads((root / "report.json").read_text())
    except (OSError, json.JSONDecodeError):
        confinement = {}
    confinement["pids_cgroup"] = cgroup is not None
    result = ExecResult(status, rc, _tail(root / "stdout"), _tail(root / "stderr"), wall, pgid, confinement)
    shutil.rmtree(root, ignore_errors=True)
    return result


def _remove_stale_once() -> None:
    """Once per process: remove what runs killed before us (kill -9, OOM) could not."""
    global _stale_cleaned
    if not _stale_cleaned:
        _stale_cleaned = True
        remove_stale(_KIND)
        _remove_stale_cgroups()


def _prepare_sandbox(code: str) -> tuple[Path, Path, str, bool]:
    """A private folder holding work/program.py → (root, program, interpreter, drop privileges to nobody?).

    `root` (parent-only) receives the outputs and the launcher's report; `root/work` is the only place the program
    may write. As root, the program runs as nobody when an interpreter nobody can run exists."""
    root = Path(tempfile.mkdtemp(prefix=owned_prefix(_KIND)))
    work = root / "work"
    work.mkdir()
    program = work / "program.py"
    program.write_text(code, encoding="utf-8")
    nobody_python = _interpreter_for_nobody() if os.geteuid() == 0 else None
    if nobody_python is None:
        return root, program, sys.executable, False
    try:
        _check_reachable_by_nobody(root.parent)
    except CodeExecutionError:
        shutil.rmtree(root, ignore_errors=True)
        raise
    os.chmod(root, 0o711)
    os.chown(work, _NOBODY, _NOBODY)
    os.chown(program, _NOBODY, _NOBODY)
    return root, program, nobody_python, True


def _launch_and_wait(
    spec: dict, program: Path, root: Path, timeout_s: float, cgroup: Path | None
) -> tuple[str, int | None, int]:
    """Start the launcher in its own session, wait up to `timeout_s`, then kill whatever is left of it →
    (status, exit code or None on timeout, process group id)."""
    work = program.parent
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(work),
        "TMPDIR": str(work),
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONHASHSEED": "0",
        "OMP_NUM_THREADS": "1",
    }
    with open(root / "stdout", "wb") as out, open(root / "stderr", "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", str(_LAUNCHER), json.dumps(spec), str(program)],
            cwd=work,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
            close_fds=True,
        )
        pgid = proc.pid  # start_new_session: the child leads its own session and process group
        rc: int | None
        try:
            rc = proc.wait(timeout=timeout_s)
            status = "passed" if rc == 0 else ("killed" if rc < 0 else "failed")
        except subprocess.TimeoutExpired:
            rc, status = None, "timeout"
        _kill_group(pgid)
        if cgroup is not None:
            _kill_cgroup(cgroup)
        if rc is None:
            proc.wait()
    return status, rc, pgid


def live_group_members(pgid: int) -> list[int]:
    """Pids of the group's processes that are still running (zombies, already dead, excluded). Linux /proc."""
    if not os.path.isdir("/proc/self"):
        try:
            os.killpg(pgid, 0)
            return [pgid]
        except (ProcessLookupError, PermissionError):
            return []
    live = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            live.append(int(entry))
    return live


def _kill_group(pgid: int) -> None:
    """SIGKILL every process left in the group (forked children, a fork bomb) until none is running."""
    for _ in range(200):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return
        if not live_group_members(pgid):
            return
        time.sleep(0.01)


_CGROUP_BASES = (Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup"))  # cgroup v1 pids hierarchy, v2 root


def _make_pids_cgroup(max_pids: int) -> Path | None:
    """A fresh pids cgroup (v1 or v2) capped at `max_pids`, or None when cgroups are not writable here."""
    for base in _CGROUP_BASES:
        if not (base / "cgroup.procs").exists() or not os.access(base, os.W_OK):
            continue
        path = base / f"{owned_prefix(_KIND)}{time.monotonic_ns()}"
        try:
            path.mkdir()
            (path / "pids.max").write_text(str(max_pids))
            return path
        except OSError:
            with _suppress():
                path.rmdir()
    return None


def _kill_cgroup(path: Path) -> None:
    """SIGKILL every process in the cgroup (including ones that left the process group), then remove it."""
    for _ in range(200):
        try:
            pids = [int(p) for p in (path / "cgroup.procs").read_text().split()]
        except OSError:
            break
        if not pids:
            break
        for pid in pids:
            with _suppress():
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)
    with _suppress():
        path.rmdir()


def _remove_stale_cgroups() -> None:
    """Kill what is left in pids cgroups whose creating process is dead (escapees of a killed run), remove them."""
    for base in _CGROUP_BASES:
        try:
            names = [n for n in os.listdir(base) if n.startswith(_KIND + "-")]
        except OSError:
            continue
        for name in names:
            if is_stale(name, _KIND) and (base / name / "cgroup.procs").exists():
                _kill_cgroup(base / name)


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], OSError)


def _world_usable(path: str) -> bool:
    """Every directory above `path` is world-searchable and the file world-readable/executable."""
    p = Path(os.path.realpath(path))
    try:
        if (p.stat().st_mode & 0o005) != 0o005:
            return False
        return all(d.stat().st_mode & 0o001 for d in p.parents)
    except OSError:
        return False


def _interpreter_for_nobody() -> str | None:
    """A Python the `nobody` user can run: ours if its files are world-readable, else a system python3."""
    import sysconfig

    stdlib = sysconfig.get_paths()["stdlib"]
    if _world_usable(sys.executable) and _world_usable(os.path.join(stdlib, "os.py")):
        return sys.executable
    for cand in ("/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3"):
        if os.path.exists(cand) and _world_usable(cand):
            return cand
    return None


def _user_process_count() -> int:
    uid = os.getuid()
    n = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    n += 1
            except OSError:
                pass
    return n


# ================================================================================================ pass@k


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 − C(n−c, k) / C(n, k), for n samples of which c pass."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))
