#!/usr/bin/env bash
# The GPU path in one script, for a CUDA machine (README → Scaling out). Prints one JSON object on stdout; each
# check's log goes to $OUT/<check>.log. Budget: ~10 minutes on one modern GPU with the embedded default model.
#
#   bash benchmarks/gpu_check.sh                 # uses .venv/bin/python, writes under runs/gpu-check
#   OUT=/tmp/gpu PY=python bash benchmarks/gpu_check.sh
#
# Checks (each one: exit code, wall seconds, and what it measured):
#   env         torch / CUDA / GPU names and count, bf16 support
#   quick_bf16  `finescope run --config quick` on the GPU (auto dtype = bf16): the whole pipeline, every stage
#   launch_all  one stage (eval nll:math + gsm8k on 64 questions) under `accelerate launch` with every GPU, and
#               the same in one process: values must agree (1e-3 relative: bf16 sums in another batch order)
#   ranks       with ≥ 2 GPUs: benchmarks/ranks.py with N = GPU count (1 vs N per stage, same_output per stage);
#               with 1 GPU: the CPU equivalence tests (tests/integration/test_distributed.py, gloo, CUDA hidden)
#   loss_memory benchmarks/loss_memory.py on the GPU: the KD loss's peak device memory at up to 8 × 2,048 positions
#               of a 128k vocabulary (bf16 logits), in one piece against the checkpointed chunks FineScope takes there;
#               the one piece needs ~3.3 MiB per position, so the positions are sized to the card (2,048 per 9 GiB)
#   full_eval   the dense default on the whole of MMLU (cloze), GSM8K (8-shot CoT) and HumanEval (pass@1, code
#               execution on): the figures README → Evaluation quotes from CPU subsets
# Nothing here is faked on CPU: without CUDA the script stops after `env` with "no CUDA". SMOKE=1 runs every
# command with tiny sizes on whatever device there is (CPU too), to check the script itself, not the GPU path.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/gpu-check}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 FINESCOPE_PROGRESS_INTERVAL=${FINESCOPE_PROGRESS_INTERVAL:-60}
declare -A RC SECS

step() {  # step NAME COMMAND...: run, log, record exit code and seconds
  local name=$1; shift
  local t0
  t0=$(date +%s%N)
  "$@" >"$OUT/$name.log" 2>&1
  RC[$name]=$?
  SECS[$name]=$(awk -v a="$t0" -v b="$(date +%s%N)" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')
  echo "[gpu_check] $name: exit ${RC[$name]} in ${SECS[$name]} s" >&2
}

step env "$PY" - <<'EOF'
import json, torch
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "available": torch.cuda.is_available(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "bf16": torch.cuda.is_available() and torch.cuda.is_bf16_supported()}
print(json.dumps(info))
raise SystemExit(0 if info["available"] else 3)
EOF
SMOKE=${SMOKE:-0}
if [ "${RC[env]}" != 0 ] && [ "$SMOKE" != 1 ]; then
  echo "{\"env\": $(tail -1 "$OUT/env.log" | sed 's/^[^{]*//' || echo null), \"error\": \"no CUDA: nothing to check\"}"
  exit 1
fi
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
LIMIT=64 FULL_LIMIT=0 NPROC=$NGPU LOSS_POSITIONS=16384 LOSS_DEVICE=cuda
if [ "$SMOKE" = 1 ]; then LIMIT=4 FULL_LIMIT=2 NPROC=$((NGPU > 1 ? NGPU : 2)) LOSS_POSITIONS=256; fi
if [ "$NGPU" = 0 ]; then LOSS_DEVICE=cpu; fi
if [ "$SMOKE" != 1 ] && [ "$NGPU" != 0 ]; then  # 2,048 positions per 9 GiB of the first GPU, 2,048 … 16,384
  LOSS_POSITIONS=$("$PY" -c "import torch; g = torch.cuda.get_device_properties(0).total_memory / 2**30; \
print(max(1, min(8, int(g // 9))) * 2048)")
fi

if [ "$SMOKE" = 1 ]; then
  echo "[gpu_check] SMOKE=1: quick preset skipped" >&2
else
  step quick_bf16 "$PY" -m finescope run --config quick --run-dir "$OUT/quick"
fi

EVAL_ARGS=(--model default --tasks nll:math,gsm8k --limit "$LIMIT" --batch-size 16 --max-new-tokens 192)
step launch_one "$PY" -m finescope eval "${EVAL_ARGS[@]}" --out "$OUT/eval-one"
step launch_all "$PY" -m accelerate.commands.launch --num_processes "$NPROC" -m finescope eval "${EVAL_ARGS[@]}" \
  --out "$OUT/eval-all"

if [ "$SMOKE" = 1 ]; then
  echo "[gpu_check] SMOKE=1: equivalence checks skipped" >&2
elif [ "$NGPU" -ge 2 ]; then
  step ranks bash -c "'$PY' benchmarks/ranks.py --processes $NGPU --out '$OUT/ranks' > '$OUT/ranks.json'"
else
  step ranks env CUDA_VISIBLE_DEVICES= "$PY" -m pytest -q -p no:warnings tests/integration/test_distributed.py
fi

step loss_memory "$PY" benchmarks/loss_memory.py --device "$LOSS_DEVICE" --positions "$LOSS_POSITIONS" --repeats 1 \
  --out "$OUT/loss_memory.json"

step full_eval "$PY" -m finescope eval --model default --tasks mmlu,gsm8k,humaneval --limit "$FULL_LIMIT" --batch-size 64 \
  --allow-code-execution --out "$OUT/eval-full"

OUT="$OUT" NGPU="$NGPU" SMOKE="$SMOKE" RCS="$(for k in "${!RC[@]}"; do echo "$k=${RC[$k]}=${SECS[$k]}"; done)" "$PY" - <<'EOF'
import json, os
from pathlib import Path
out = Path(os.environ["OUT"])
checks = {}
for line in os.environ["RCS"].split():
    name, rc, secs = line.split("=")
    checks[name] = {"exit": int(rc), "seconds": float(secs)}

def results(folder):
    f = out / folder / "results.json"
    if not f.is_file():
        return None
    rows = json.loads(f.read_text())["results"]
    return {f'{r["task"]} {r["variant"]} {r["metric"]}': r["value"] for r in rows if r["value"] is not None}

env_line = (out / "env.log").read_text().strip().splitlines()[-1]
one, many = results("eval-one"), results("eval-all")
agree = None
if one and many:
    agree = one.keys() == many.keys() and all(abs(one[k] - many[k]) <= 1e-3 * max(1.0, abs(one[k])) for k in one)
report = {
    "env": json.loads(env_line),
    "gpus": int(os.environ["NGPU"]),
    "smoke": os.environ.get("SMOKE") == "1",
    "checks": checks,
    "quick_bf16_report": str(out / "quick" / "report.md") if (out / "quick" / "report.md").is_file() else None,
    "launch": {"one_process": one, "all_gpus": many, "agree_1e-3": agree},
    "ranks": json.loads((out / "ranks.json").read_text()) if (out / "ranks.json").is_file() else None,
    "full_eval": results("eval-full"),
    "loss_memory": json.loads((out / "loss_memory.json").read_text()) if (out / "loss_memory.json").is_file() else None,
    # SMOKE=1 on a machine without CUDA: the env check fails by design, the rest must pass
    "ok": all(c["exit"] == 0 for k, c in checks.items() if not (k == "env" and os.environ.get("SMOKE") == "1"))
    and agree is not False,
}
print(json.dumps(report, indent=2))
EOF
