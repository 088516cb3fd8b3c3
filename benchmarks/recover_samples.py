"""Teacher rewrites next to recovered students' answers to the same prompts: the evidence behind a recovery's NLL.

Takes a recover stage's `distilled.jsonl` (each record's original response and the teacher's rewrite), picks the
first N records whose rewrite was accepted (or any, with --any), and has each given model answer the same
instruction greedily under its chat template. Prints JSON.

`--gsm8k N` adds a generation check on unseen questions (the first N GSM8K test questions, zero-shot, under the
chat template, greedy): per model the share of answers that end before --max-new-tokens (degenerate students loop
until the cut-off), the share whose last number is the reference answer (lm-eval's flexible extract), and the
mean length. NLL alone does not show whether a recovered model still writes usable answers.

    .venv/bin/python benchmarks/recover_samples.py --distilled runs/bench-recover-budget/tgd/distilled.jsonl \\
        --model tgd=runs/bench-recover-budget/tgd/model --model kd=runs/bench-recover-budget/<row>/model --n 3 \
        --gsm8k 40
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from finescope.data import format_prompt
from finescope.evaluate.answers import extract_gsm8k, gsm8k_target
from finescope.evaluate.tasks import load_gsm8k
from finescope.generation import generate
from finescope.modeling import load


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--distilled", required=True, help="a recover stage's distilled.jsonl")
    p.add_argument("--model", action="append", default=[], help="NAME=DIR, repeatable")
    p.add_argument("--n", type=int, default=3)
    p.add_argument("--any", action="store_true", help="also records whose rewrite was rejected")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--gsm8k", type=int, default=0, help="generation check on the first N GSM8K test questions")
    args = p.parse_args()
    torch.set_num_threads(2)
    rows = [json.loads(line) for line in Path(args.distilled).read_text(encoding="utf-8").splitlines() if line]
    rows = [r for r in rows if "instruction" in r and (args.any or r.get("used") == "rewrite")][: args.n]
    out = [
        {"id": r["id"], "instruction": r["instruction"], "original": r["original"], "teacher_rewrite": r["rewrite"]}
        for r in rows
    ]
    questions = load_gsm8k()[: args.gsm8k]
    check: dict[str, dict] = {}
    for spec in args.model:
        name, folder = spec.split("=", 1)
        h = load(folder, device="cpu")
        prompts = [format_prompt(h.tokenizer, r["instruction"], r.get("system") or None) for r in rows]
        answers = generate(h.model, h.tokenizer, prompts, max_new_tokens=args.max_new_tokens, desc=name)
        for o, a in zip(out, answers):
            o[name] = a[0]["text"].strip()
        if questions:
            prompts = [format_prompt(h.tokenizer, q["question"]) for q in questions]
            gen = [a[0] for a in generate(h.model, h.tokenizer, prompts, max_new_tokens=args.max_new_tokens, desc=name)]
            right = [extract_gsm8k(g["text"])[1] == gsm8k_target(q["answer"]) for g, q in zip(gen, questions)]
            check[name] = {
                "ended": round(sum(not g["cut_off"] for g in gen) / len(gen), 3),
                "last_number_correct": round(sum(right) / len(gen), 3),
                "mean_new_tokens": round(sum(g["new_tokens"] for g in gen) / len(gen), 1),
                "first_answers": [g["text"].strip()[:200] for g in gen[:2]],
            }
    result: dict = {"samples": out}
    if questions:
        result["gsm8k_generation_check"] = {"questions": len(questions), "max_new_tokens": args.max_new_tokens, **check}
    print(json.dumps(result, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
