"""Run one `finescope` command in this process and record its own peak RSS, for the benchmarks that compare
memory (scale.py, ranks.py). Writes {"rank", "peak_rss_mib"} to $RSS_FILE, or to $RSS_DIR/rank<RANK>.json under a
launcher; the command's exit code is kept.

    RSS_FILE=/tmp/rss.json .venv/bin/python benchmarks/rss_wrapper.py curate --config c.yaml --out runs/x

Peak RSS is VmHWM (this process's high-water mark since exec): `ru_maxrss` would start from the parent's RSS at
fork (Linux carries it over), so a benchmark parent holding torch would put a floor under every child.
"""

import json
import os
import resource
import sys


def peak_rss_mib() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> int:
    from finescope.cli import main as finescope

    code = 1
    try:
        code = finescope(sys.argv[1:])
    finally:
        rank = int(os.environ.get("RANK", "0"))
        target = os.environ.get("RSS_FILE") or os.path.join(os.environ["RSS_DIR"], f"rank{rank}.json")
        with open(target, "w") as f:
            json.dump({"rank": rank, "peak_rss_mib": round(peak_rss_mib(), 1)}, f)
    return code


if __name__ == "__main__":
    sys.exit(main())
