"""A few answers to unseen GSM8K questions, side by side: each model answers the same test questions (chat template,
greedy, a fixed number of new tokens), and the reference answer is printed beside them. The questions are rows of
the GSM8K test split outside both subsets the benchmarks score (the eval's `nll:math --limit 60` rows and the
64 `tune` rows of benchmarks/compensation.py), so no lever was chosen on them. Prints one JSON object.

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

ROWS = (1001, 1103, 1207)


def model_arg(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: want NAME=MODEL_DIR (or NAME=default for the embedded model)")
    return name, path


def rows_arg(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: want comma-separated row numbers, e.g. 1001,1103") from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=model_arg, action="append", required=True, help="NAME=MODEL_DIR (repeatable)")
    ap.add_argument("--rows", type=rows_arg, default=list(ROWS), help="GSM8K test rows [1001,1103,1207]")
    ap.add_argument("--max-new-tokens", type=int, default=160)
    args = ap.parse_args()
    if args.max_new_tokens < 1:
        ap.error("--max-new-tokens must be at least 1")
    if not args.rows:
        ap.error("--rows: name at least one row")
    rows = [json.loads(line) for line in assets.data_path("gsm8k").read_text().splitlines() if line.strip()]
    scored = {int(r["id"]) for subset in gsm8k_subsets(64, 60).values() for r in subset}
    for i in args.rows:
        if not 0 <= i < len(rows):
            ap.error(f"--rows: {i} is not a row of the GSM8K test split (0..{len(rows) - 1})")
        if i in scored:
            ap.error(f"--rows: {i} is one of the rows the benchmarks score (eval or tune subset); pick an unseen one")
    decoding = "greedy, under the model's chat template (Alpaca's prompt where it has none)"
    out: dict = {"rows": args.rows, "max_new_tokens": args.max_new_tokens, "decoding": decoding}
    out["questions"] = [
        {"row": i, "question": rows[i]["question"], "reference": rows[i]["answer"].split("####")[-1].strip()}
        for i in args.rows
    ]
    out["answers"] = {}
    for name, path in args.model:
        folder = assets.model_folder() if path == "default" else Path(path)
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        answers = []
        for i in args.rows:
            # the chat template's text, tokenized without added specials: what apply_chat_template(tokenize=True) gives
            enc = tok(format_prompt(tok, rows[i]["question"]), return_tensors="pt", add_special_tokens=False)
            with torch.no_grad():
                gen = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False)
            answers.append(tok.decode(gen[0, enc["input_ids"].shape[1] :], skip_special_tokens=True))
            print(f"{name} row {i}: {answers[-1][:100]!r}", file=sys.stderr, flush=True)
        out["answers"][name] = {"model": str(folder), "text": answers}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
