"""humaneval:instruct: the chat prompt, the end-of-turn stops, code extraction from a reply, the program built
from it (run in the sandbox), and the task end to end on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finescope.config import EvalConfig
from finescope.evaluate import run as eval_run
from finescope.evaluate import tasks
from finescope.evaluate.code_exec import Limits, run_program
from finescope.evaluate.run import prepare_tasks, run
from finescope.evaluate.tasks import (
    end_of_turn_stops,
    extract_code,
    humaneval_instruct_program,
    humaneval_instruct_prompt,
    humaneval_instruct_source,
    known_task_names,
    load_humaneval,
    resolve_task,
)

FIX = Path(__file__).parents[1] / "fixtures" / "eval"
BODY = "    balance = 0\n    for op in operations:\n        balance += op\n        if balance < 0:\n            return True\n    return False\n"
FUNCTION = "def below_zero(operations):\n" + BODY


@pytest.fixture
def docs() -> list[dict]:
    return load_humaneval(FIX / "humaneval_small.jsonl")


@pytest.fixture
def small_humaneval(monkeypatch):
    """The packaged HumanEval replaced by the two-problem fixture (the task resolves to the patched loader)."""
    monkeypatch.setattr(tasks, "load_humaneval", lambda path=None: load_humaneval(FIX / "humaneval_small.jsonl"))


def _passes(doc: dict, reply: str) -> bool:
    return run_program(humaneval_instruct_program(doc, reply), Limits(timeout_s=10)).passed


# ---------------------------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    "reply, code",
    [
        ("```python\nx = 1\n```", "x = 1\n"),
        ("```\nx = 1\n```", "x = 1\n"),  # a fence without a language
        ("Sure! Here it is:\n\n```python\nx = 1\n```\n\nIt sets x.", "x = 1\n"),  # prose around the fence
        ("```text\nnot code\n```\n```py\nx = 2\n```", "x = 2\n"),  # a python block wins over an earlier one
        ("```bash\npip install x\n```", "pip install x\n"),  # no python block: the first block
        ("```python\nx = 1\n```\n```python\nx = 2\n```", "x = 1\n"),  # the first python block
        ("```python\nx = 1\ny = 2", "x = 1\ny = 2"),  # left open (token limit): runs to the end
        ("    return 1\n", "    return 1\n"),  # no fence: the whole reply
        # seen from SmolLM2-135M-Instruct: a stray empty fence before the python block
        ("```\n\n```python\nx = 1\n```\n\nIt sets x.", "x = 1\n"),
        # … and code whose opening fence is missing, then a closing fence and prose
        ("def f():\n    return 1\n```\n\nThis function returns 1.", "def f():\n    return 1\n"),
        ("```\nx = 1", "x = 1"),  # a single untagged fence with nothing before it opens the block
        ("```\n\n```\n```\nx = 1\n```", "x = 1\n"),  # the first non-empty block
    ],
)
def test_extract_code(reply, code):
    assert extract_code(reply) == code


def test_full_function_keeps_the_prompt_header(docs):
    source = humaneval_instruct_source(docs[0], f"Here you go:\n```python\n{FUNCTION}```\nDone.")
    assert source.startswith("from typing import List\n") and source.count("def below_zero") == 1
    assert source.endswith(FUNCTION)
    # a helper defined before the entry point in the prompt stays available to the reply's function
    helper = humaneval_instruct_source(docs[1], "```python\ndef count_even(xs):\n    return 0\n```")
    assert "def is_even" in helper and helper.count("def count_even") == 1


def test_body_only_is_appended_to_the_prompt(docs):
    assert humaneval_instruct_source(docs[0], f"```python\n{BODY}```") == docs[0]["prompt"] + BODY
    unindented = (
        "balance = 0\nfor op in operations:\n    balance += op\n    if balance < 0:\n        return True\nreturn False"
    )
    assert humaneval_instruct_source(docs[0], unindented) == docs[0]["prompt"] + BODY  # re-indented


@pytest.mark.parametrize(
    "reply",
    [
        f"```python\n{FUNCTION}```",
        f"```\nfrom typing import List\n\n{FUNCTION}```",
        f"The balance is tracked step by step.\n\n```python\n{FUNCTION}```\n\nThis returns True early.",
        f"```python\n{BODY}```",
        FUNCTION,
        BODY,
    ],
    ids=["fenced-function", "bare-fence-with-imports", "prose-around", "fenced-body", "unfenced-function", "body"],
)
def test_programs_from_replies_pass(docs, reply):
    assert _passes(docs[0], reply)


def test_wrong_or_empty_reply_fails(docs):
    assert not _passes(docs[0], "```python\ndef below_zero(operations):\n    return False\n```")
    assert not _passes(docs[0], "I cannot help with that.")
    assert _passes(docs[1], "```python\ndef count_even(xs):\n    return sum(is_even(x) for x in xs)\n```")


# ---------------------------------------------------------------------------------------------- prompt, stops, task


def test_prompt_in_chat_template_and_end_of_turn_stops(docs, chat_tokenizer, tiny_tokenizer):
    prompt = humaneval_instruct_prompt(chat_tokenizer, docs[0])
    assert prompt.startswith("<|user|>\nComplete the following Python function. Reply with the full function in a")
    assert "def below_zero(operations: List[int]) -> bool:" in prompt and prompt.endswith("<|assistant|>\n")
    assert end_of_turn_stops(chat_tokenizer) == ["</s>"]
    assert "### Instruction:" in humaneval_instruct_prompt(tiny_tokenizer, docs[0])  # no template: Alpaca
    assert end_of_turn_stops(tiny_tokenizer) == ["</s>"]


def test_task_is_registered_and_needs_code_execution():
    assert "humaneval:instruct" in known_task_names()
    task = resolve_task("humaneval:instruct")
    assert task.kind == "code" and task.needs_code_execution and task.options["instruct"]
    assert not resolve_task("humaneval").options["instruct"]
    with pytest.raises(Exception, match="--allow-code-execution"):
        prepare_tasks(EvalConfig(tasks=["humaneval:instruct"]))


def test_generation_sees_chat_prompts_and_stops_at_end_of_turn(tiny_model_dirs, tmp_path, small_humaneval, monkeypatch):
    """With the model's replies fixed, every step after generation is the real one: extraction, program, sandbox."""
    seen = {}
    replies = {"below_zero": f"Sure.\n```python\n{FUNCTION}```", "count_even": "return 0"}

    def fake_generate(model, tokenizer, prompts, *, stop, num_samples, **kwargs):
        seen["prompts"], seen["stop"] = prompts, stop
        return [[{"text": replies[name]}] for p in prompts for name in replies if f"def {name}(" in p]

    monkeypatch.setattr(eval_run, "generate", fake_generate)
    cfg = EvalConfig(
        model=str(tiny_model_dirs["llama"]),
        tasks=["humaneval:instruct"],
        allow_code_execution=True,
        write_samples=True,
        device="cpu",
    )
    out = run(cfg, tmp_path / "he.json")
    (res,) = json.loads(out.read_text())["results"]
    assert (res["metric"], res["n"], res["value"], res["chance"]) == ("pass@1", 2, 0.5, 0.0)
    assert all(p.startswith("<|user|>\nComplete the following") for p in seen["prompts"]) and seen["stop"] == ["</s>"]
    samples = [json.loads(x) for x in (tmp_path / "he.samples" / "humaneval_instruct-greedy.jsonl").open()]
    assert [s["statuses"] for s in samples] == [["passed"], ["failed"]]
    assert samples[0]["extracted"] == [FUNCTION]


def test_runs_end_to_end_on_a_tiny_model(tiny_model_dirs, tmp_path, small_humaneval):
    cfg = EvalConfig(
        model=str(tiny_model_dirs["qwen2"]),
        tasks=["humaneval:instruct"],
        allow_code_execution=True,
        max_new_tokens=8,
        write_samples=True,
        device="cpu",
    )
    out = tmp_path / "eval"
    run(cfg, out)
    (res,) = json.loads((out / "results.json").read_text())["results"]
    assert res["task"] == "humaneval:instruct" and res["variant"] == "greedy" and res["n"] == 2
    assert 0 <= res["value"] <= 1 and res["chance"] == 0.0
    (samples_file,) = (out / "samples").glob("*.jsonl")
    for s in map(json.loads, samples_file.open()):
        assert len(s["completions"]) == len(s["extracted"]) == len(s["statuses"]) == 1
