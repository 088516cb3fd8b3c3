"""Sandbox launcher, run as a fresh interpreter (`python -I -S _sandbox_launch.py SPEC_JSON PROGRAM`).

It forks: the child confines itself, then `exec`s the program, so every limit holds for the program and all its
children: resource limits → (root only) join the pids cgroup → (root only) a private network namespace → Landlock
(writes only under the work dir, no TCP, no signals to processes outside the sandbox) → (root only) drop to the
unprivileged `nobody` user → die with the supervisor (death signal, set after the uid drop that would clear it) →
exec. This process stays behind, unconfined, as the supervisor: it relays the program's exit status, and when
finescope dies (even by SIGKILL: the kernel sends us SIGTERM) it kills the whole sandbox — the process group and,
as root, the pids cgroup, which also holds children that left the group with setsid().
Stdlib only; kept out of the parent so nothing runs between fork and exec in the (multithreaded) parent.
"""

import ctypes
import importlib.util
import json
import os
import resource
import signal
import sys
import time
import traceback

# Landlock (Linux ≥ 5.13). Syscall numbers are the same on every architecture (new-style numbering).
_SYS_CREATE, _SYS_ADD_RULE, _SYS_RESTRICT = 444, 445, 446
_PR_SET_NO_NEW_PRIVS = 38
_FS_WRITE_RIGHTS = {  # access right bit → first ABI that knows it
    1 << 1: 1,  # WRITE_FILE
    1 << 4: 1,  # REMOVE_DIR
    1 << 5: 1,  # REMOVE_FILE
    1 << 6: 1,  # MAKE_CHAR
    1 << 7: 1,  # MAKE_DIR
    1 << 8: 1,  # MAKE_REG
    1 << 9: 1,  # MAKE_SOCK
    1 << 10: 1,  # MAKE_FIFO
    1 << 11: 1,  # MAKE_BLOCK
    1 << 12: 1,  # MAKE_SYM
    1 << 13: 2,  # REFER
    1 << 14: 3,  # TRUNCATE
}


def _landlock(work_dir: str) -> int:
    """Restrict filesystem writes to `work_dir`, deny TCP bind/connect and outside signals. Returns the ABI (0 = none)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    abi = libc.syscall(_SYS_CREATE, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if abi < 1:
        return 0
    fs = sum(bit for bit, since in _FS_WRITE_RIGHTS.items() if abi >= since)
    net = 3 if abi >= 4 else 0  # BIND_TCP | CONNECT_TCP, with no rule allowing any port
    scoped = 3 if abi >= 6 else 0  # abstract unix sockets | signals, to processes outside the domain
    attr = (ctypes.c_uint64 * 3)(fs, net, scoped)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    ruleset = libc.syscall(_SYS_CREATE, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        return 0

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    for path, rights in ((work_dir, fs), ("/dev/null", 1 << 1)):
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        rule = PathBeneath(rights, fd)
        libc.syscall(_SYS_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(1), ctypes.byref(rule), ctypes.c_uint32(0))
        os.close(fd)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        return 0
    if libc.syscall(_SYS_RESTRICT, ctypes.c_int(ruleset), ctypes.c_uint32(0)) != 0:
        return 0
    os.close(ruleset)
    return abi


def _load_child_process():
    """finescope/child_process.py (stdlib only) by path: under `-I -S` the finescope package is not importable."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "child_process.py")
    spec = importlib.util.spec_from_file_location("_finescope_child_process", path)
    assert spec is not None and spec.loader is not None, "a .py path always has a source loader"
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _confine_and_exec(spec: dict, program: str, supervisor: int, child_process) -> None:
    """In the forked child: apply every limit, then become the program. Never returns."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    mem = spec["memory_mb"] * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_CPU, (spec["cpu_s"], spec["cpu_s"] + 1))
    fsize = spec["file_mb"] * 2**20
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
    resource.setrlimit(resource.RLIMIT_NPROC, (spec["nproc"], spec["nproc"]))
    report = open(spec["report"], "w")  # opened before Landlock and the uid drop forbid it
    if spec.get("cgroup"):
        try:  # a pids cgroup (created by the parent): caps the process count even for root, kills escapees
            with open(os.path.join(spec["cgroup"], "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
        except OSError:
            pass
    if os.getuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.unshare(0x40000000)  # CLONE_NEWNET: best effort, no network at all
    applied = {"landlock_abi": _landlock(spec["work_dir"]) if spec.get("landlock", True) else 0}
    if os.getuid() == 0 and spec.get("drop_to_uid") is not None:
        os.setgroups([])
        os.setgid(spec["drop_to_gid"])
        os.setuid(spec["drop_to_uid"])
    # After the uid drop (setuid clears it). The program may clear it again; the supervisor is what guarantees
    # cleanup, this covers the supervisor itself being SIGKILLed.
    applied["dies_with_parent"] = child_process.set_death_signal(supervisor)
    applied["uid"] = os.getuid()
    json.dump(applied, report)
    report.close()
    os.execv(spec["python"], [spec["python"], "-I", "-B", program])


def _kill_sandbox(cgroup) -> None:
    """SIGKILL everything in the cgroup (escapees included), then the process group — this process last."""
    for _ in range(200 if cgroup else 0):
        try:
            with open(os.path.join(cgroup, "cgroup.procs")) as f:
                pids = [int(p) for p in f.read().split() if int(p) != os.getpid()]
        except OSError:
            break
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.01)
    os.killpg(0, signal.SIGKILL)


def main() -> None:
    spec = json.loads(sys.argv[1])
    program = sys.argv[2]
    child_process = _load_child_process()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # the status relay below may re-raise SIGXCPU/SIGSEGV here
    # finescope's death → SIGTERM → kill the sandbox. Installed before fork so no window lacks it.
    signal.signal(signal.SIGTERM, lambda *_: _kill_sandbox(spec.get("cgroup")))
    child_process.set_death_signal(spec["parent_pid"], signal.SIGTERM)
    supervisor = os.getpid()
    pid = os.fork()
    if pid == 0:
        try:
            _confine_and_exec(spec, program, supervisor, child_process)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(1)  # confinement failed: never run the program unconfined, never return into main()
    try:
        status = os.waitpid(pid, 0)[1]
    except ChildProcessError:  # cannot happen (only we reap it); count it as a failure, never a pass
        status = 1 << 8
    if os.WIFSIGNALED(status):  # relay "killed by signal N" so finescope sees it as its child's own death
        sig = os.WTERMSIG(status)
        if sig != signal.SIGKILL:  # its disposition cannot be set (and is always the default)
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        sys.exit(128 + sig)
    sys.exit(os.WEXITSTATUS(status))


if __name__ == "__main__":
    main()
