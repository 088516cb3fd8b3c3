"""The code-execution sandbox contains hangs, huge allocations, fork bombs and writes outside its folder."""

from __future__ import annotations

import os
import tempfile
import time

import pytest

from conftest import sandbox_capabilities
from finescope.evaluate.code_exec import CodeExecutionError, Limits, live_group_members, run_program

CAPS = sandbox_capabilities()
FAST = Limits(timeout_s=3, cpu_s=2, memory_mb=512)


def _group_gone(pgid: int) -> bool:
    """No process of the group is still running (killed children may linger as zombies until init reaps them)."""
    return not live_group_members(pgid)


def test_passing_and_failing_programs():
    ok = run_program("assert sum([1, 2]) == 3\nprint('fine')", FAST)
    assert ok.passed and "fine" in ok.stdout
    bad = run_program("assert 1 == 2", FAST)
    assert bad.status == "failed" and "AssertionError" in bad.stderr


def test_infinite_loop_is_stopped():
    busy = run_program("while True:\n    pass", FAST)
    assert busy.status in ("killed", "timeout") and not busy.passed
    idle = run_program("import time\ntime.sleep(60)\nprint('woke')", FAST)  # no CPU burnt: only the wall clock stops it
    assert idle.status == "timeout" and idle.returncode is None and "woke" not in idle.stdout
    assert _group_gone(idle.pgid)


def test_10gb_allocation_fails_inside_the_sandbox():
    r = run_program("x = bytearray(10 * 2**30)\nprint('allocated', len(x))", FAST)
    assert not r.passed and "allocated" not in r.stdout
    assert "MemoryError" in r.stderr or r.status == "killed"


def test_fork_bomb_is_contained():
    bomb = (
        "import os, time\n"
        "deadline = time.time() + 8  # the bomb itself stops after 8 s, in case the sandbox did not\n"
        "while time.time() < deadline:\n"
        "    try:\n"
        "        os.fork()\n"
        "    except OSError:\n"
        "        print('fork refused', flush=True)\n"
        "        os._exit(3)\n"
    )
    r = run_program(bomb, Limits(timeout_s=4, cpu_s=2, memory_mb=512, nproc=16))
    assert not r.passed
    assert "fork refused" in r.stdout  # the process limit was hit, not the machine's
    time.sleep(0.2)
    assert _group_gone(r.pgid)


@pytest.mark.skipif(
    not (CAPS["landlock_abi"] or CAPS["drops_privileges"]),
    reason="neither Landlock nor root (to drop to nobody): writes outside cannot be stopped here",
)
def test_write_outside_its_folder_is_refused(tmp_path):
    victim = tmp_path / "outside" / "victim.txt"
    victim.parent.mkdir()
    victim.write_text("original")
    new = victim.parent / "created.txt"
    program = (
        f"import os\n"
        f"errors = 0\n"
        f"for action in (lambda: open({str(victim)!r}, 'w').write('pwned'),\n"
        f"               lambda: open({str(new)!r}, 'w').write('pwned'),\n"
        f"               lambda: os.remove({str(victim)!r})):\n"
        f"    try:\n"
        f"        action()\n"
        f"    except OSError:\n"
        f"        errors += 1\n"
        f"open('inside.txt', 'w').write('ok')  # its own folder stays writable\n"
        f"assert errors == 0, f'{{errors}} writes refused'\n"
    )
    r = run_program(program, FAST)
    assert r.status == "failed" and "3 writes refused" in r.stderr
    assert victim.read_text() == "original" and not new.exists()
    if CAPS["landlock_abi"]:  # Landlock also protects world-writable places such as /tmp
        probe = f"/tmp/finescope-escape-{os.getpid()}"
        r = run_program(f"open({probe!r}, 'w').write('x')", FAST)
        assert not r.passed and not os.path.exists(probe)


def test_environment_is_not_inherited(monkeypatch):
    monkeypatch.setenv("FINESCOPE_TEST_SECRET", "hunter2")
    r = run_program("import os\nprint(sorted(os.environ))\nassert 'FINESCOPE_TEST_SECRET' not in os.environ", FAST)
    assert r.passed and "hunter2" not in r.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="only root drops to nobody")
def test_temp_folder_nobody_cannot_reach_is_refused_not_scored_zero(tmp_path, monkeypatch):
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    monkeypatch.setattr(tempfile, "tempdir", str(private))
    with pytest.raises(CodeExecutionError, match="not searchable by other users"):
        run_program("assert True")
    assert list(private.iterdir()) == []  # the refused program's folder is not left behind
