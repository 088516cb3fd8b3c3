"""What the teacher says at a student's own replies: does it lead the student out of a loop, or into it? Reads the
replies an `answers:` eval wrote (`finescope eval --tasks answers:math --write-samples`), teacher-forces each prompt
(chat template, as the eval asked it) + reply through the teacher and the student, and reports per reply token the
teacher's probability of the student's token, whether that token is the teacher's argmax, and the teacher's
probability of stopping (EOS), over the reply's first quarter (the way in) and its last half (inside a loop, for a
looping reply). Medians over the looping replies and over the replies that ended. Prints one JSON object.

    FINESCOPE_HOME=<the run's home> .venv/bin/python benchmarks/teacher_at_loops.py --teacher default \
        --student <stage>/model --samples <eval out>/samples/answers_math-greedy_chat_128_tokens.jsonl

On-policy distillation (recover.on_policy) trains the student towards the teacher's distribution at exactly such
prefixes; if the teacher continues a loop it is shown, that training cannot teach the student to leave it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from finescope.data import format_prompt  # noqa: E402
from finescope.modeling import load  # noqa: E402
from finescope.tokens import encode_continuation, encode_prompt  # noqa: E402


@torch.no_grad()
def token_stats(teacher, student, tok, question: str, answer: str) -> dict[str, float] | None:
    """Per-reply means of the teacher's view of the student's tokens (None for an empty reply)."""
    prompt = encode_prompt(tok, format_prompt(tok, question))
    reply = encode_continuation(tok, answer)
    if not reply:
        return None
    ids = torch.tensor([prompt + reply])
    lt = teacher(ids).logits[0, len(prompt) - 1 : -1].float().log_softmax(-1)
    ls = student(ids).logits[0, len(prompt) - 1 : -1].float().log_softmax(-1)
    target = torch.tensor(reply)[:, None]
    p_teacher, p_student = lt.gather(-1, target)[:, 0].exp(), ls.gather(-1, target)[:, 0].exp()
    argmax = (lt.argmax(-1) == target[:, 0]).float()
    stop = lt[:, tok.eos_token_id].exp()
    n = len(reply)
    quarter, half = slice(0, max(1, n // 4)), slice(n // 2, n)
    return {
        "tokens": n,
        "teacher_p_first_quarter": float(p_teacher[quarter].mean()),
        "teacher_argmax_first_quarter": float(argmax[quarter].mean()),
        "teacher_p_last_half": float(p_teacher[half].mean()),
        "student_p_last_half": float(p_student[half].mean()),
        "teacher_argmax_last_half": float(argmax[half].mean()),
        "teacher_p_stop_last_half_max": float(stop[half].max()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="default")
    ap.add_argument("--student", required=True)
    ap.add_argument("--samples", required=True, help="an answers: task's samples file (eval --write-samples)")
    args = ap.parse_args()
    rows = [json.loads(line) for line in Path(args.samples).read_text().splitlines() if line.strip()]
    teacher, student = (load(m, dtype="float32", device="cpu") for m in (args.teacher, args.student))
    groups: dict[str, list[dict[str, float]]] = {"looping": [], "ended": []}
    for r in rows:
        kind = "looping" if r["looping"] else "ended" if not r["cut_off"] else None
        if kind is None:  # cut off without a loop: neither group, so no forward passes
            continue
        stats = token_stats(teacher.model, student.model, teacher.tokenizer, r["question"], r["answer"])
        if stats is not None:
            groups[kind].append({"id": r["id"], **stats})
    out = {"teacher": args.teacher, "student": args.student, "samples": args.samples, "replies": len(rows)}
    for kind, items in groups.items():
        keys = [k for k in (items[0] if items else {}) if k != "id"]
        out[kind] = {
            "replies": len(items),
            "median": {k: round(statistics.median(x[k] for x in items), 4) for k in keys},
        }
        out[kind]["per_reply"] = items
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
