"""Curate-stage wall time of the default run's curation under candidate settings, side by side, cold caches.
Prints one JSON object (progress goes to stderr).

    .venv/bin/python benchmarks/curate_budget.py --candidates "layer_depth=0.87;layer_depth=0.5" \
        --base-src /tmp/finescope-base        # a worktree of the commit the budget is measured against

The base is the `curate` section of `configs/default.yaml` (the embedded default: a 2,000-record pool sample,
max_length 128, the middle block), run as `finescope curate` in a fresh process with its own curate cache (a
FINESCOPE_HOME that links the shared model and data assets but not cache/), so every run computes coordinates,
SAE and pool encoding. Runs alternate base, candidate 1, …, for `--reps` rounds; the JSON gives each setting's
median stage time (metrics.json "total") and its ratio to the base's, each run's timing breakdown (metrics.json
"timings_s": coordinates, SAE, encoding, the MiniLM pass "embed" of hybrid/embedding, ...), with a plain forward's
tokens/s measured in this process as the machine's reference. `--skip-base` runs the candidates only (the share of
a part of the stage, such as hybrid's MiniLM pass, is then read from one run's breakdown).

    .venv/bin/python benchmarks/curate_budget.py --candidates "method=hybrid" --skip-base   # hybrid's MiniLM share
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ranks import cold_home, reference_throughput  # noqa: E402


def parse(spec: str) -> dict:
    """ "layers=26,max_length=64" → {"layers": [26], "max_length": 64}."""
    out: dict = {}
    for part in [p for p in spec.split(",") if p.strip()]:
        key, value = part.split("=", 1)
        out[key.strip()] = [int(value)] if key.strip() == "layers" else yaml.safe_load(value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--candidates", default="layer_depth=0.87;layer_depth=0.5")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument(
        "--base-src",
        default=None,
        help="run the base with the finescope of this checkout (its src/ first on PYTHONPATH), e.g. a git worktree "
        "of the commit whose curate stage is the budget; candidates run with this checkout",
    )
    ap.add_argument("--skip-base", action="store_true", help="run the candidates only (no base, no ratios)")
    ap.add_argument("--out", default="runs/bench-curate-budget")
    args = ap.parse_args()
    root = Path(args.out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="work-", dir=root))
    preset = Path(__file__).resolve().parents[1] / "src" / "finescope" / "configs" / "default.yaml"
    base = yaml.safe_load(preset.read_text())["curate"]
    settings: dict[str, dict] = {} if args.skip_base else {"base": {}}
    settings |= {spec: parse(spec) for spec in args.candidates.split(";") if spec.strip()}
    times: dict[str, list[float]] = {name: [] for name in settings}
    breakdown: dict[str, list[dict]] = {name: [] for name in settings}
    for rep in range(args.reps):
        for name, overrides in settings.items():
            cfg = {**base, **overrides}
            config = work / f"curate-{len(times[name])}-{abs(hash(name))}.yaml"
            config.write_text(yaml.safe_dump(cfg))
            out = work / config.stem
            env = {**os.environ, "FINESCOPE_HOME": str(cold_home(work)), "FINESCOPE_PROGRESS": "0"}
            if name == "base" and args.base_src:
                env["PYTHONPATH"] = str(Path(args.base_src).resolve() / "src")
            print(f"[budget] round {rep + 1}: {name}", file=sys.stderr, flush=True)
            cmd = [sys.executable, "-m", "finescope.cli", "curate", "--config", str(config), "--out", str(out)]
            subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
            metrics = json.loads((out / "metrics.json").read_text())
            times[name].append(round(metrics["timings_s"]["total"], 1))
            breakdown[name].append({k: round(v, 1) for k, v in metrics["timings_s"].items()})
    base_s = statistics.median(times["base"]) if "base" in times else None
    print(
        json.dumps(
            {
                "base": base,
                "base_src": args.base_src or "this checkout",
                "reference_forward_tok_s": reference_throughput(),
                "stage_s": times,
                "stage_timings_s": breakdown,
                "median_s": {k: statistics.median(v) for k, v in times.items()},
                "ratio_to_base": {k: round(statistics.median(v) / base_s, 3) for k, v in times.items()}
                if base_s
                else None,
                "finished": time.strftime("%Y-%m-%d %H:%M"),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
