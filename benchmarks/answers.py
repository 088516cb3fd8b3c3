"""A few answers to unseen GSM8K questions, side by side: each model answers the same test questions (chat template,
greedy, a fixed number of new tokens), and the reference answer is printed beside them. The questions are rows of
the GSM8K test split outside both subsets the benchmarks score (the eval's `nll:math --limit 60` rows and the
64 `tune` rows of benchmarks/compensation.py), so no lever was chosen on them. Prints one JSON object: the answers,
and per model how many are right (lm-eval's flexible GSM8K extraction: the last number), loop (the recover
filters' repetition check) and run to the token cap without ending. Many rows (`--rows 1001-1030`) make these rates.

    FINESCOPE_HOME=<the run's home> .venv/bin/python benchmarks/answers.py \
        --model dense=default --model kd=runs/default/recover/<the pruned_kd stage>/model
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from compensation import gsm8k_subsets  # noqa: E402
from finescope import assets  # noqa: E402
from finescope.data import format_prompt  # noqa: E402
from finescope.evaluate.answers import extract_gsm8k, gsm8k_target  # noqa: E402
from finescope.generation import is_degenerate  # noqa: E402

ROWS = (1001, 1103, 1207)


def model_arg(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: want NAME=MODEL_DIR (or NAME=default for the embedded model)")
    return name, path


def rows_arg(text: str) -> list[int]:
    rows: list[int] = []
    try:
        for part in (x.strip() for x in text.split(",") if x.strip()):
            first, dash, last = part.partition("-")
            rows += list(range(int(first), int(last) + 1)) if dash else [int(first)]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: want comma-separated row numbers or ranges, e.g. 1001,1103 or 1001-1030"
        ) from None
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=model_arg, action="append", required=True, help="NAME=MODEL_DIR (repeatable)")
    ap.add_argument("--rows", type=rows_arg, default=list(ROWS), help="GSM8K test rows [1001,1103,1207]")
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument(
        "--repetition-penalty",
        type=float,
        default=None,
        help="passed to generate (CTRL's penalty; 1 = none); unset = the model's generation_config",
    )
    args = ap.parse_args()
    if args.max_new_tokens < 1:
        ap.error("--max-new-tokens must be at least 1")
    if args.repetition_penalty is not None and args.repetition_penalty <= 0:
        ap.error("--repetition-penalty must be positive (1 = none)")
    if not args.rows:
        ap.error("--rows: name at least one row")
    rows = [json.loads(line) for line in assets.data_path("gsm8k").read_text().splitlines() if line.strip()]
    scored = {int(r["id"]) for subset in gsm8k_subsets(64, 60).values() for r in subset}
    for i in args.rows:
        if not 0 <= i < len(rows):
            ap.error(f"--rows: {i} is not a row of the GSM8K test split (0..{len(rows) - 1})")
    left_out = [i for i in args.rows if i in scored]  # a range may cross them; no lever was chosen on the rest
    args.rows = [i for i in args.rows if i not in scored]
    if not args.rows:
        ap.error(f"--rows: {left_out} are all rows the benchmarks score (eval or tune subset); pick unseen ones")
    decoding = "greedy, under the model's chat template (Alpaca's prompt where it has none)"
    out: dict = {"rows": args.rows, "max_new_tokens": args.max_new_tokens, "decoding": decoding}
    penalty = {} if args.repetition_penalty is None else {"repetition_penalty": args.repetition_penalty}
    out["repetition_penalty"] = args.repetition_penalty
    if left_out:
        out["left_out_scored_rows"] = left_out
    out["questions"] = [
        {"row": i, "question": rows[i]["question"], "reference": rows[i]["answer"].split("####")[-1].strip()}
        for i in args.rows
    ]
    out["answers"] = {}
    for name, path in args.model:
        folder = assets.model_folder() if path == "default" else Path(path)
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        answers, correct, loops, capped = [], [], [], []
        for i in args.rows:
            # the chat template's text, tokenized without added specials: what apply_chat_template(tokenize=True) gives
            enc = tok(format_prompt(tok, rows[i]["question"]), return_tensors="pt", add_special_tokens=False)
            with torch.no_grad():
                gen = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False, **penalty)
            new = gen[0, enc["input_ids"].shape[1] :]
            text = str(tok.decode(new, skip_special_tokens=True))
            answers.append(text)
            correct.append(extract_gsm8k(text)[1] == gsm8k_target(rows[i]["answer"]))
            loops.append(is_degenerate(text))
            capped.append(len(new) >= args.max_new_tokens and int(new[-1]) != tok.eos_token_id)
            print(f"{name} row {i}: {answers[-1][:100]!r}", file=sys.stderr, flush=True)
        out["answers"][name] = {
            "model": str(folder),
            "text": answers,
            "correct": correct,
            "loops": loops,
            "cut_off": capped,
            "summary": {"rows": len(answers), "correct": sum(correct), "loops": sum(loops), "cut_off": sum(capped)},
        }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
