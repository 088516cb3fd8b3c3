"""Teacher rewrites next to recovered students' answers to the same prompts: the evidence behind a recovery's NLL.

Takes a recover stage's `distilled.jsonl` (each record's original response and the teacher's rewrite), picks the
first N records whose rewrite was accepted (or any, with --any), and has each given model answer the same
instruction greedily under its chat template. Prints JSON.

    .venv/bin/python benchmarks/recover_samples.py --distilled runs/bench-recover-budget/tgd/distilled.jsonl \\
        --model tgd=runs/bench-recover-budget/tgd/model --model kd=runs/bench-recover-budget/<row>/model --n 3
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from finescope.data import format_prompt
from finescope.generation import generate
from finescope.modeling import load


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--distilled", required=True, help="a recover stage's distilled.jsonl")
    p.add_argument("--model", action="append", default=[], help="NAME=DIR, repeatable")
    p.add_argument("--n", type=int, default=3)
    p.add_argument("--any", action="store_true", help="also records whose rewrite was rejected")
    p.add_argument("--max-new-tokens", type=int, default=128)
    args = p.parse_args()
    torch.set_num_threads(2)
    rows = [json.loads(line) for line in Path(args.distilled).read_text(encoding="utf-8").splitlines() if line]
    rows = [r for r in rows if "instruction" in r and (args.any or r.get("used") == "rewrite")][: args.n]
    out = [
        {"id": r["id"], "instruction": r["instruction"], "original": r["original"], "teacher_rewrite": r["rewrite"]}
        for r in rows
    ]
    for spec in args.model:
        name, folder = spec.split("=", 1)
        h = load(folder, device="cpu")
        prompts = [format_prompt(h.tokenizer, r["instruction"], r.get("system") or None) for r in rows]
        answers = generate(h.model, h.tokenizer, prompts, max_new_tokens=args.max_new_tokens, desc=name)
        for o, a in zip(out, answers):
            o[name] = a[0]["text"].strip()
    print(json.dumps(out, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
