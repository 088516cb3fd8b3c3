"""Child processes that die with their parent, and cleanup of what killed runs left behind.

A `kill -9` of finescope runs no cleanup code, so two things are needed:

- the kernel must end the children: `die_with_parent(cmd)` wraps a command so that it gets SIGKILL when the
  process that started it dies (Linux `PR_SET_PDEATHSIG`; elsewhere the command runs unwrapped);
- the next run must remove the leftovers: temp folders are named `owned_prefix(kind)` + random, which records
  the owner's pid, and `remove_stale(kind)` deletes those whose owner is gone — never a live process's.

Also runnable as a stdlib-only script (`python -I -S child_process.py PARENT_PID CMD...`): that is the wrapper.
Stdlib only, no finescope imports: it is the lowest layer.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import sys
import tempfile
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def set_death_signal(parent_pid: int, sig: int = signal.SIGKILL) -> bool:
    """In a child: have the kernel send `sig` when the parent dies; if `parent_pid` is already gone, die now.

    The death signal is cleared by setuid/setgid and by fork, so call it after any privilege drop, in the process
    that must die. It fires when the parent *thread* that forked us exits; our callers wait for the child on
    that thread, so the thread outlives it. Returns False where unsupported (not Linux).
    """
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    if os.getppid() != parent_pid:  # the parent died before prctl took effect: the kernel will not tell us
        os.kill(os.getpid(), sig)
        os._exit(128 + int(sig))  # for a catchable `sig` whose handler returned
    return True


def die_with_parent(cmd: list[str]) -> list[str]:
    """`cmd` wrapped so it is SIGKILLed when this process dies (death signal set in the child, kept across exec).

    A wrapper process rather than `preexec_fn`: Python code between fork and exec can deadlock a multithreaded
    parent (torch), while the wrapper is a fresh single-threaded interpreter.
    """
    if not sys.platform.startswith("linux"):
        return list(cmd)
    return [sys.executable, "-I", "-S", os.path.abspath(__file__), str(os.getpid()), *cmd]


LAUNCHER_ENV = "FINESCOPE_LAUNCHER_PID"


def watch_launcher(interval_s: float = 0.5) -> bool:
    """In a rank that `finescope run --num-processes N` started (through torchrun): die when the launcher dies.

    The launcher's own child (torchrun) already gets SIGKILL when the launcher dies (`die_with_parent`), but
    torchrun's ranks would be left running with PPID 1. So each rank sets its own death signal on torchrun, and a
    daemon thread kills the rank when its parent changes (torchrun gone) or the launcher named by
    $FINESCOPE_LAUNCHER_PID is gone: either alone would do, together they cover a death signal lost to the
    spawning thread's exit. Returns False (nothing done) outside such a rank."""
    import threading
    import time

    raw = os.environ.get(LAUNCHER_ENV, "")
    if not raw.isdigit():
        return False
    launcher, parent = int(raw), os.getppid()
    if parent == 1 or not pid_alive(launcher):
        os.kill(os.getpid(), signal.SIGKILL)
    set_death_signal(parent)

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent or not pid_alive(launcher):
                os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="finescope-launcher-watch", daemon=True).start()
    return True


# ================================================================================== stale-leftover cleanup


def _pid_namespace() -> int:
    """Identifies this pid namespace: a pid from another one (a container sharing /tmp) says nothing here."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def owned_prefix(kind: str) -> str:
    """Name prefix recording the owner: `<kind>-<pid>-<pid namespace>-`, e.g. for `tempfile.mkdtemp(prefix=…)`."""
    return f"{kind}-{os.getpid()}-{_pid_namespace()}-"


def pid_alive(pid: int) -> bool:
    """The process exists (a zombie counts: its pid is not free yet). Unknown (EPERM) counts as alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale(name: str, kind: str) -> bool:
    """`name` came from `owned_prefix(kind)` in this pid namespace and its owner is dead.

    Names without an owner (other tools, older versions) are never stale: we cannot know they are abandoned.
    A reused pid only makes us keep a dead owner's leftovers longer, never remove a live one's.
    """
    m = re.fullmatch(rf"{re.escape(kind)}-(\d+)-(\d+)-.*", name)
    if not m or int(m.group(2)) != _pid_namespace():
        return False
    pid = int(m.group(1))
    return pid != os.getpid() and not pid_alive(pid)


def remove_stale(kind: str, directory: str | os.PathLike | None = None) -> list[Path]:
    """Delete folders and files `<directory>/<kind>-…` (default: the temp dir) left by dead owners; return what was
    removed.

    Only entries owned by our own user are touched, and symlinks never are.
    """
    base = Path(directory or tempfile.gettempdir())
    removed: list[Path] = []
    try:
        entries = list(os.scandir(base))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(kind + "-") or not is_stale(entry.name, kind):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if st.st_uid != os.geteuid() or entry.is_symlink():
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        elif entry.is_file(follow_symlinks=False):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
        if not os.path.lexists(entry.path):
            removed.append(Path(entry.path))
    return removed


def _main(argv: list[str]) -> None:
    """The wrapper: `PARENT_PID CMD...` → set the death signal, then become CMD."""
    set_death_signal(int(argv[0]))
    os.execvp(argv[1], argv[1:])


if __name__ == "__main__":
    _main(sys.argv[1:])
