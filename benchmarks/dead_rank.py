"""How long the surviving ranks of a 2-process `torchrun` take to give up when one rank dies without a word before
a collective (`distributed.barrier`), against the collective timeout they were given. Prints one JSON object.

    .venv/bin/python benchmarks/dead_rank.py                          # FINESCOPE_COLLECTIVE_TIMEOUT=20, 3 rounds
    .venv/bin/python benchmarks/dead_rank.py --timeout 60 --rounds 1
    .venv/bin/python benchmarks/dead_rank.py --smoke                  # one round, timeout 5 s

Each round runs the job twice in fresh processes: once with rank 1 exiting before the barrier (`dead`), once with
both ranks reaching it (`healthy`, the launcher's own start and stop cost). The JSON gives each round's wall time,
the medians, whether the survivors exited non-zero with finescope's one-line message, and `dead_minus_healthy_s`:
the part of the wait the timeout accounts for (expected: about the timeout, far below 2x). This figure used to be
asserted in tests/integration/test_distributed.py (< 120 s); a wall time is a benchmark's figure, not a test's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]

JOB = """
import os, sys
from finescope import distributed
r = distributed.ranks()
if r.rank == 1 and sys.argv[1] == "dead":
    os._exit(0)  # dies without a word before the collective
try:
    distributed.barrier("pool encoding")
except distributed.DistributedError as e:
    print("ERR", e, file=sys.stderr)
    sys.exit(3)
"""

MESSAGE = "ERR rank 0/2: pool encoding failed"


def run_once(job: Path, mode: str, timeout_s: int, home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.update({"FINESCOPE_HOME": str(home), "FINESCOPE_COLLECTIVE_TIMEOUT": str(timeout_s), "HF_HUB_OFFLINE": "1"})
    start = time.monotonic()
    proc = subprocess.run(
        [*TORCHRUN, str(job), mode], env=env, capture_output=True, text=True, timeout=max(600, 10 * timeout_s)
    )
    return {
        "wall_s": round(time.monotonic() - start, 2),
        "returncode": proc.returncode,
        "one_line_error": MESSAGE in proc.stderr and "another rank died or hangs" in proc.stderr,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--timeout", type=int, default=20, help="FINESCOPE_COLLECTIVE_TIMEOUT given to the ranks (s)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="one round with a 5 s timeout (the test suite's check)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.timeout, args.rounds = 5, 1
    with tempfile.TemporaryDirectory(prefix="finescope-dead-rank-") as tmp:
        job = Path(tmp) / "job.py"
        job.write_text(textwrap.dedent(JOB))
        rounds = []
        for _ in range(args.rounds):
            dead = run_once(job, "dead", args.timeout, Path(tmp) / "home")
            healthy = run_once(job, "healthy", args.timeout, Path(tmp) / "home")
            rounds.append({"dead": dead, "healthy": healthy})
            print(f"dead-rank: dead {dead['wall_s']} s, healthy {healthy['wall_s']} s", file=sys.stderr)
    dead_s = statistics.median(r["dead"]["wall_s"] for r in rounds)
    healthy_s = statistics.median(r["healthy"]["wall_s"] for r in rounds)
    out = {
        "collective_timeout_s": args.timeout,
        "rounds": rounds,
        "dead_median_s": dead_s,
        "healthy_median_s": healthy_s,
        "dead_minus_healthy_s": round(dead_s - healthy_s, 2),
        "dead_exits_nonzero_with_the_message": all(
            r["dead"]["returncode"] != 0 and r["dead"]["one_line_error"] for r in rounds
        ),
        "healthy_exits_zero": all(r["healthy"]["returncode"] == 0 for r in rounds),
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
