"""Evaluate stage: log-likelihood scoring, answer extraction, task registry, results files, CLI errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import build_model
from finescope import cli
from finescope.config import EvalConfig
from finescope.evaluate import answers as gen
from finescope.evaluate.code_exec import CodeExecutionError, pass_at_k
from finescope.evaluate.mc import Request, encode_pair, pick, score_requests
from finescope.evaluate.perplexity import domain_nll
from finescope.evaluate.run import prepare_tasks, run
from finescope.evaluate.tasks import (
    TaskError,
    load_math,
    load_mbpp,
    math_type_key,
    mbpp_program,
    mmlu_cloze_prompt,
    mmlu_letter_prompt,
    resolve_task,
    select_subset,
)

FIX = Path(__file__).parents[1] / "fixtures" / "eval"

REQUESTS = [
    Request("What is 12 times 7? The answer is", [" 84.", " 12", " the court held that"]),
    Request("The patient presented with fever and a cough. Shares rose", [" 3%", " after strong quarterly earnings."]),
    Request("def add(a, b):\n    return ", ["a + b\n", "a"]),  # trailing space moves to the continuation
    Request("", ["Natalia sold clips"]),
]


def _reference_logprob(model, tok, context: str, continuation: str) -> float:
    """One plain, unpadded forward over context+continuation; sum the continuation tokens' log-probs."""
    ctx, cont = encode_pair(tok, context, continuation)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].float(), -1)
    return sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))


def test_scoring_matches_plain_forward(family, chat_tokenizer):
    model = build_model(family, len(chat_tokenizer))
    got = score_requests(model, chat_tokenizer, REQUESTS, batch_size=3)
    for req, scores in zip(REQUESTS, got):
        assert len(scores) == len(req.continuations)
        for cont, s in zip(req.continuations, scores):
            assert s.logprob == pytest.approx(_reference_logprob(model, chat_tokenizer, req.context, cont), abs=1e-4)
            assert s.tokens == len(encode_pair(chat_tokenizer, req.context, cont)[1])


def test_scoring_hand_computed_uniform_model(chat_tokenizer):
    """A zero LM head gives every token probability 1/V, so log P(continuation) = −n·log V exactly."""
    model = build_model("llama", len(chat_tokenizer))
    torch.nn.init.zeros_(model.lm_head.weight)
    vocab = model.config.vocab_size
    got = score_requests(model, chat_tokenizer, REQUESTS, batch_size=2)
    for req, scores in zip(REQUESTS, got):
        for cont, s in zip(req.continuations, scores):
            n = len(encode_pair(chat_tokenizer, req.context, cont)[1])
            assert s.logprob == pytest.approx(-n * math.log(vocab), rel=1e-5)


def test_batch_size_does_not_change_scores(chat_tokenizer):
    model = build_model("qwen2", len(chat_tokenizer))
    a = score_requests(model, chat_tokenizer, REQUESTS, batch_size=1)
    b = score_requests(model, chat_tokenizer, REQUESTS, batch_size=4)
    for x, y in zip(a, b):
        assert [s.logprob for s in x] == pytest.approx([s.logprob for s in y], abs=1e-4)


def test_encode_pair_moves_trailing_space(chat_tokenizer):
    ctx, cont = encode_pair(chat_tokenizer, "The answer is ", "84")
    assert chat_tokenizer.decode(ctx) == "The answer is"
    assert chat_tokenizer.decode(cont) == " 84"


def test_pick_and_normalisation():
    from finescope.evaluate.mc import Score

    scores = [Score(-4.0, 2, False, 0), Score(-6.0, 3, False, 0)]
    assert pick(scores, ["ab", "abcdef"], "none") == 0
    assert pick(scores, ["ab", "abcdef"], "chars") == 1  # −1.0 per char beats −2.0
    assert pick([Score(-4.0, 2, False, 0), Score(-5.0, 4, False, 0)], ["ab", "cd"], "tokens") == 1  # −1.25 beats −2
    assert pick([Score(-1.0, 1, False, 0)] * 3, ["a", "b", "c"]) == 0  # ties → first, as np.argmax


def test_mmlu_prompts_follow_lm_eval_templates():
    doc = {
        "id": "x",
        "subject": "high_school_physics",
        "question": " What is g? ",
        "choices": ["1", "9.8", "3", "4"],
        "answer": 1,
    }
    shot = {**doc, "id": "y", "question": "Unit of force?", "choices": ["N", "J", "W", "Pa"], "answer": 0}
    assert mmlu_letter_prompt(doc, [shot]) == (
        "The following are multiple choice questions (with answers) about high school physics.\n\n"
        "Unit of force?\nA. N\nB. J\nC. W\nD. Pa\nAnswer: A\n\n"
        "What is g?\nA. 1\nB. 9.8\nC. 3\nD. 4\nAnswer:"
    )
    assert mmlu_cloze_prompt(doc, []) == (
        "The following are questions (with answers) about high school physics.\n\nQuestion: What is g?\nAnswer:"
    )


# ---------------------------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    "completion, strict, flexible",
    [
        (" 15 - 6 = 9 trees. The answer is 9.", "9", "9"),
        (" She pays $1,200 in all. The answer is $1,200.", "1200", "1200"),
        (" So 3.50 + 1.50 = 5.00 dollars.", None, "5"),
        (" First 4 * 2 = 8, then 8 - 10 = -2. The answer is -2.", "-2", "-2"),
        (" I do not know.", None, None),
        (" #### 72", "72", "72"),
    ],
)
def test_gsm8k_extraction(completion, strict, flexible):
    assert gen.extract_gsm8k(completion) == (strict, flexible)


def test_gsm8k_target():
    assert gen.gsm8k_target("She sells 9 * 2 = $<<9*2=18>>18.\n#### 18") == "18"
    assert gen.gsm8k_target("...\n#### 1,000") == "1000"


@pytest.mark.parametrize(
    "text, boxed",
    [
        ("so $x = \\boxed{5}$.", "5"),
        ("first \\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{\\sqrt{x^{2}}}", "\\sqrt{x^{2}}"),
        ("no box here", None),
        ("\\boxed 7$", "7"),
    ],
)
def test_last_boxed(text, boxed):
    assert gen.last_boxed(text) == boxed


@pytest.mark.parametrize(
    "pred, ref, equal",
    [
        ("\\frac12", "\\frac{1}{2}", True),
        ("\\dfrac{1}{2}", "\\frac{1}{2}", True),
        ("0.5", "\\frac{1}{2}", True),
        ("1/2", "\\frac{1}{2}", True),
        ("x = 3", "3", True),
        ("10^\\circ", "10", True),
        ("\\$5.00", "5", True),
        ("5 \\text{ cm}", "5", True),
        ("\\left( 1, 2 \\right)", "(1,2)", True),
        ("3", "4", False),
        (None, "4", False),
        ("\\sqrt2", "\\sqrt{2}", True),
    ],
)
def test_math_normalisation(pred, ref, equal):
    assert gen.math_equal(pred, ref) is equal


def test_math_answer_from_completion():
    assert gen.extract_math_answer("We get $\\boxed{12}$.\n") == "12"
    assert gen.extract_math_answer("Final Answer: The final answer is $7$. I hope it is correct.") == "7"


def test_pass_at_k():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 − C(3,2)/C(5,2)
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 4, 2) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(1, 1, 10)


# ---------------------------------------------------------------------------------------------- registry


def test_unknown_task_lists_known():
    with pytest.raises(TaskError, match=r"unknown task 'mmlu:stme'.*did you mean 'mmlu:stem'.*gsm8k"):
        resolve_task("mmlu:stme")


def test_math_file_task_types_and_filter():
    docs = load_math(FIX / "math_small.jsonl")
    assert [d["reference"] for d in docs] == ["5", "4", "2", "\\frac{1}{2}", "9"]
    assert {d["type"] for d in docs} == {"prealgebra", "algebra", "counting_and_probability", "number_theory"}
    picked = load_math(FIX / "math_small.jsonl", ["Pre-Algebra", "Counting & Probability"])
    assert [d["reference"] for d in picked] == ["5", "2", "\\frac{1}{2}"]
    assert math_type_key("Counting & Probability") == "counting_and_probability"
    with pytest.raises(TaskError, match="no problems of type 'geometry'"):
        load_math(FIX / "math_small.jsonl", ["geometry"])


def test_task_file_missing_field_names_file_line_field():
    with pytest.raises(TaskError, match=r"math_bad.jsonl: line 2: missing field 'solution'"):
        resolve_task(f"math:{FIX / 'math_bad.jsonl'}").docs()
    with pytest.raises(TaskError, match=r"mbpp_bad.jsonl: line 1: missing field 'test_list'"):
        resolve_task(f"mbpp:{FIX / 'mbpp_bad.jsonl'}").docs()


def test_mbpp_reference_code_passes_and_wrong_code_fails():
    docs = load_mbpp(FIX / "mbpp_small.jsonl")
    from finescope.evaluate.code_exec import run_program

    assert all(run_program(mbpp_program(d, d["code"])).passed for d in docs)
    assert not run_program(mbpp_program(docs[0], "def add(a, b):\n    return a - b")).passed


def test_select_subset_spreads_evenly():
    assert select_subset(10, 0) == list(range(10))
    assert select_subset(10, 5) == [0, 2, 4, 6, 8]
    assert select_subset(3, 3) == [0, 1, 2]


def test_limit_larger_than_task_and_code_flag():
    with pytest.raises(TaskError, match=r"has 3 questions; --limit 10 is larger"):
        prepare_tasks(EvalConfig(tasks=[f"nll:{FIX / 'nll_small.jsonl'}"], limit=10))
    with pytest.raises(CodeExecutionError, match="--allow-code-execution"):
        prepare_tasks(EvalConfig(tasks=[f"mbpp:{FIX / 'mbpp_small.jsonl'}"]))


# ---------------------------------------------------------------------------------------------- NLL and the stage


def test_domain_nll_equals_manual(chat_tokenizer):
    from finescope.data import format_example, read_records

    model = build_model("llama", len(chat_tokenizer))
    recs = list(read_records(FIX / "nll_small.jsonl"))
    metrics, samples = domain_nll(model, chat_tokenizer, recs, batch_size=2)
    total, tokens = 0.0, 0
    for r in recs:
        prompt, completion = format_example(chat_tokenizer, r)
        total -= _reference_logprob(model, chat_tokenizer, prompt, completion)
        tokens += len(encode_pair(chat_tokenizer, prompt, completion)[1])
    assert metrics["tokens"] == tokens
    assert metrics["nll"] == pytest.approx(total / tokens, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(total / tokens), rel=1e-5)
    assert len(samples) == 3


def _overfit(model, tok, texts: list[str], steps: int = 12) -> None:
    """A few Adam steps on `texts`, so the model's argmax hits some tokens (a random model hits none)."""
    batch = tok(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(**batch, labels=labels).loss.backward()
        opt.step()
    model.eval()


def test_top1_equals_argmax_hand_count(chat_tokenizer):
    """top1 = Σ [argmax of a plain unpadded forward == target] / Σ tokens over the completion tokens."""
    from finescope.data import format_example, read_records

    torch.manual_seed(0)
    model = build_model("llama", len(chat_tokenizer))
    recs = list(read_records(FIX / "nll_small.jsonl"))
    pairs = [format_example(chat_tokenizer, r) for r in recs]
    _overfit(model, chat_tokenizer, [p + c for p, c in pairs])
    metrics, samples = domain_nll(model, chat_tokenizer, recs, batch_size=2)
    hits, tokens = [], []
    for prompt, completion in pairs:
        ctx, cont = encode_pair(chat_tokenizer, prompt, completion)
        with torch.no_grad():
            pred = model(torch.tensor([ctx + cont])).logits[0].argmax(-1)
        hits.append(sum(int(pred[len(ctx) - 1 + i]) == t for i, t in enumerate(cont)))
        tokens.append(len(cont))
    assert [s["top1_hits"] for s in samples] == hits
    assert 0 < sum(hits) < sum(tokens)  # neither trivially 0 nor 1
    assert metrics["top1"] == pytest.approx(sum(hits) / sum(tokens))
    assert metrics["top1_stderr"] > 0  # per-document (cluster) standard error


def test_mc_results_record_chance_from_the_number_of_choices(chat_tokenizer):
    from types import SimpleNamespace

    from finescope.evaluate.run import evaluate_task
    from finescope.evaluate.tasks import Task

    docs = [
        {"id": f"q{i}", "subject": "arithmetic", "question": f"{i} + 1 =", "choices": ["1", "2", "3", "4"], "answer": i}
        for i in range(3)
    ]
    handle = SimpleNamespace(model=build_model("llama", len(chat_tokenizer)), tokenizer=chat_tokenizer)
    cfg = EvalConfig(tasks=["mmlu:x"], mmlu_scoring="both", batch_size=2)
    got = [res for res, _ in evaluate_task(Task("mmlu:x", "mc", lambda: docs), handle, cfg)]
    assert [(r["variant"], r["chance"]) for r in got] == [("letter", 0.25), ("cloze", 0.25)]


def test_run_writes_results_and_skips_rerun(tiny_model_dirs, tmp_path):
    model = str(tiny_model_dirs["llama"])
    cfg = EvalConfig(
        model=model,
        tasks=[
            f"nll:{FIX / 'nll_small.jsonl'}",
            f"math:{FIX / 'math_small.jsonl'}",
            f"mbpp:{FIX / 'mbpp_small.jsonl'}",
            f"answers:{FIX / 'answers_small.jsonl'}",
        ],
        allow_code_execution=True,
        max_new_tokens=8,
        batch_size=2,
        write_samples=True,
        device="cpu",
    )
    out = tmp_path / "eval" / "dense"
    path = run(cfg, out)
    assert path == out / "results.json" and (out / "DONE").is_file()
    report = json.loads(path.read_text())
    by_task = {r["task"].split(":")[0]: r for r in report["results"] if r["metric"] != "top1"}
    assert by_task["nll"]["n"] == 3 and by_task["nll"]["value"] > 0 and by_task["nll"]["chance"] is None
    (top1,) = [r for r in report["results"] if r["metric"] == "top1"]
    assert top1["task"] == by_task["nll"]["task"] and top1["n"] == 3 and 0 <= top1["value"] <= 1
    assert top1["chance"] == 0.0 and top1["wall_s"] == by_task["nll"]["wall_s"]  # one pass, two results
    assert by_task["math"]["chance"] == by_task["mbpp"]["chance"] == 0.0
    assert by_task["math"]["n"] == 5 and set(by_task["math"]["by_type"]) >= {"prealgebra", "algebra"}
    assert by_task["mbpp"]["metric"] == "pass@1" and 0 <= by_task["mbpp"]["value"] <= 1
    assert all("wall_s" in r and "stderr" in r for r in report["results"])
    assert report["model"]["path"] == model and len(report["model"]["config_hash"]) == 16
    assert len(list((out / "samples").glob("*.jsonl"))) == 4
    # metrics.json: one key per result, the metric added where one task and variant give several
    metrics = json.loads((out / "metrics.json").read_text())
    answers = [r for r in report["results"] if r["task"].startswith("answers:")]
    assert [r["metric"] for r in answers] == ["looping", "cut_off"] and len(metrics) == len(report["results"])
    assert metrics[f"{answers[1]['task']} [{answers[1]['variant']}] cut_off"] == answers[1]["value"]
    mtime = path.stat().st_mtime_ns
    assert run(cfg, out) == path and path.stat().st_mtime_ns == mtime  # done with this config: skipped


def test_run_single_file_output(tiny_model_dirs, tmp_path):
    cfg = EvalConfig(
        model=str(tiny_model_dirs["qwen3"]), tasks=[f"nll:{FIX / 'nll_small.jsonl'}"], limit=2, device="cpu"
    )
    out = tmp_path / "eval" / "pruned.json"
    assert run(cfg, out) == out
    assert json.loads(out.read_text())["results"][0]["n"] == 2


def test_cli_errors_exit_2(tmp_path, capsys):
    assert cli.main(["eval", "--tasks", "nope", "--out", str(tmp_path / "e")]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert cli.main(["eval", "--tasks", "humaneval", "--out", str(tmp_path / "e")]) == 2
    assert "--allow-code-execution" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- answers:


def test_answers_task_counts_right_looping_and_cut_off(monkeypatch, chat_tokenizer):
    """Each reply is checked on its own (last number vs the reference's, the repetition check, the cap), the
    shares are their means, and the first three answers go into the results file."""
    from types import SimpleNamespace

    from finescope.data import format_prompt
    from finescope.evaluate import run as eval_run
    from finescope.evaluate.run import evaluate_task
    from finescope.evaluate.tasks import Task

    loop = "She has 6 apples. " * 12
    replies = [("2 + 2 = 4, so the answer is 4.", False), (loop, True), ("It is 7", False), ("The answer is 9", True)]
    docs = [
        {"id": f"q{i}", "instruction": f"question {i}?", "response": f"… #### {t}", "target": t}
        for i, t in enumerate(["4", "5", "8", "9"])
    ]
    docs[3]["system"] = "Answer in one line."  # asked as format_example scores it: with its system turn
    asked: list[list[str]] = []

    def fake_generate(model, tok, prompts, **kw):
        asked.append(prompts)
        return [[{"text": t, "new_tokens": 3, "cut_off": c}] for t, c in replies[: len(prompts)]]

    monkeypatch.setattr(eval_run, "generate", fake_generate)
    handle = SimpleNamespace(model=None, generator=None, tokenizer=chat_tokenizer)
    got = evaluate_task(Task("answers:x", "answers", lambda: docs), handle, EvalConfig(max_new_tokens=16))
    assert asked == [[format_prompt(chat_tokenizer, d["instruction"], d.get("system")) for d in docs]]
    assert "Answer in one line." in asked[0][3] and "Answer in one line." not in asked[0][2]
    by_metric = {res["metric"]: (res, samples) for res, samples in got}
    assert list(by_metric) == ["exact_match", "looping", "cut_off"]
    assert by_metric["exact_match"][0]["value"] == 0.5  # q0 and q3 (a cut reply still has its last number)
    assert by_metric["exact_match"][0]["chance"] == 0.0 and by_metric["looping"][0]["chance"] is None
    assert by_metric["looping"][0]["value"] == 0.25 and by_metric["cut_off"][0]["value"] == 0.5
    assert all(r["n"] == 4 and r["variant"] == "greedy, chat, 16 tokens" for r, _ in got)
    samples = by_metric["exact_match"][1]
    assert [(s["right"], s["looping"], s["cut_off"]) for s in samples] == [
        (True, False, False),
        (False, True, True),
        (False, False, False),
        (True, False, True),
    ]
    assert by_metric["exact_match"][0]["examples"] == samples[:3] and samples[1]["answer"] == loop
    assert "examples" not in by_metric["looping"][0]


def test_answers_task_on_a_record_file_runs_and_refuses_text_records(tiny_model_dirs, tmp_path):
    """A record file: the model's replies are counted (no right/wrong: records have no target) and kept; a text
    record is refused before any model loads, naming the file and the record."""
    rows = [{"instruction": f"What is {i} plus {i}?", "response": f"{2 * i}"} for i in range(1, 5)]
    good = tmp_path / "asks.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = EvalConfig(
        model=str(tiny_model_dirs["llama"]), tasks=[f"answers:{good}"], max_new_tokens=6, batch_size=2, device="cpu"
    )
    report = json.loads(run(cfg, tmp_path / "eval" / "dense").read_text())
    assert [r["metric"] for r in report["results"]] == ["looping", "cut_off"]
    loop, cut = report["results"]
    assert loop["n"] == cut["n"] == 4 and 0 <= loop["value"] <= 1 and 0 <= cut["value"] <= 1
    assert [e["question"] for e in loop["examples"]] == [r["instruction"] for r in rows[:3]]
    assert all(set(e) == {"id", "question", "reference", "answer", "looping", "cut_off"} for e in loop["examples"])
    # a tiny random model never ends its turn within 6 tokens: every reply is cut at the cap
    assert cut["value"] == sum(e["cut_off"] for e in loop["examples"]) / 3 == 1.0
    bad = tmp_path / "mixed.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"text": "The court held that the contract was void."}))
    with pytest.raises(TaskError, match=r"mixed\.jsonl: record 2 .* is a text record; an answers: task needs"):
        prepare_tasks(EvalConfig(tasks=[f"answers:{bad}"]))
    # answers_limit sets the answers: task's count alone (and is checked against it); 0 leaves it to limit
    cfg.answers_limit, cfg.limit, cfg.tasks = 2, 3, [f"answers:{good}", f"nll:{good}"]
    report = json.loads(run(cfg, tmp_path / "eval" / "two").read_text())
    assert [(r["task"].split(":")[0], r["n"]) for r in report["results"]] == [
        ("answers", 2),
        ("answers", 2),
        ("nll", 3),
        ("nll", 3),
    ]
    cfg.answers_limit = 5
    with pytest.raises(TaskError, match=r"has 4 questions; --answers-limit 5 is larger"):
        prepare_tasks(cfg)


def test_answers_math_is_gsm8k_with_targets():
    task = resolve_task("answers:math")
    docs = task.docs()
    assert task.kind == "answers" and task.generative and len(docs) == 1319
    assert docs[0]["instruction"].startswith("Janet") and docs[0]["target"] == "18"  # GSM8K test row 0
    with pytest.raises(TaskError, match="neither an answers preset"):
        resolve_task("answers:nowhere.jsonl")
