"""Recover stage on tiny random models: templating, rewrite (batched, resumable), filters, LoRA, run(), CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import build_model, build_tokenizer
from finescope import FinescopeError
from finescope.cli import main
from finescope.config import RecoverConfig
from finescope.data import RecordError, format_example, format_prompt
from finescope.generation import generate
from finescope.modeling import ModelError
from finescope.recover import filters
from finescope.recover.filters import apply_filters, check_rewrite
from finescope.recover.finetune import (
    IGNORE,
    FinetuneError,
    TrainSettings,
    build_examples,
    collate,
    save_trained,
    split_records,
    summed_loss,
    tokenize_pair,
)
from finescope.recover.length_batches import LengthBatches
from finescope.recover.rewrite import DISTILL_SYSTEM, prompt_hash, read_partial, rewrite_prompt, rewrite_records
from finescope.recover.run import PARTIAL, RecoverError, run
from finescope.recover.trainer import fine_tune
from finescope.storage import is_done, read_json

RECORDS = [
    {"id": "r1", "instruction": "What is 12 times 7?", "response": "12 * 7 = 84.\n#### 84"},
    {
        "id": "r2",
        "instruction": "Natalia sold 48 clips in April and half as many in May. How many in all?",
        "response": "48 + 24 = 72. The answer is 72.",
    },
    {"id": "r3", "instruction": "Which is larger?\n(A) 3\n(B) 5\n", "response": "Therefore, the correct answer is (B)"},
    {"id": "r4", "instruction": "Name a primary colour.", "response": "Red is a primary colour."},
    {"id": "r5", "instruction": "Add 2 and 3.", "response": "5"},
    {"id": "t1", "text": "The court held that the contract was void because one party lacked capacity."},
]


def write_records(path: Path, records=RECORDS) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def plain_model_dir(tmp_path: Path, family: str = "llama", seed: int = 0) -> Path:
    """A tiny model saved with a tokenizer that has no chat template."""
    tok = build_tokenizer()
    out = tmp_path / f"plain-{family}-{seed}"
    build_model(family, len(tok), seed=seed).save_pretrained(out)
    tok.save_pretrained(out)
    return out


# ================================================================================================ templating


def test_rewrite_prompt_with_chat_template(chat_tokenizer):
    rec = {**RECORDS[0], "system": "Answer with a number."}
    prompt = rewrite_prompt(chat_tokenizer, rec)
    assert prompt.startswith("<|system|>\n" + DISTILL_SYSTEM)
    assert "Answer with a number." in prompt.split("<|user|>")[0]  # the record's own system prompt is kept
    assert "### Instruction:\nWhat is 12 times 7?" in prompt and "### Reference Answer:\n12 * 7 = 84." in prompt
    assert prompt.endswith("<|assistant|>\n")


def test_rewrite_prompt_without_chat_template(tiny_tokenizer):
    prompt = rewrite_prompt(tiny_tokenizer, RECORDS[0])
    assert prompt.startswith(DISTILL_SYSTEM + "\n\n### Instruction:\nWhat is 12 times 7?")
    assert "### Reference Answer:\n12 * 7 = 84.\n#### 84" in prompt
    assert prompt.endswith("### Response:\n") and "<|" not in prompt


@pytest.mark.parametrize("chat", [True, False])
def test_own_rewrite_prompt_is_the_students_prompt_without_the_reference(chat, chat_tokenizer, tiny_tokenizer):
    tok = chat_tokenizer if chat else tiny_tokenizer
    rec = {**RECORDS[0], "system": "Answer with a number."}
    prompt = rewrite_prompt(tok, rec, "own")
    assert prompt == format_prompt(tok, rec["instruction"], "Answer with a number.")
    assert prompt == format_example(tok, rec)[0]  # exactly the prompt the student trains and is scored on
    assert "12 * 7 = 84" not in prompt and DISTILL_SYSTEM not in prompt and "Reference" not in prompt
    with pytest.raises(ValueError, match="reference or own"):
        rewrite_prompt(tok, rec, "mine")


def test_own_rewrites_are_the_teachers_own_answers_and_a_switch_redoes_them(tmp_path, chat_tokenizer):
    model = build_model("llama", len(chat_tokenizer))
    partial = tmp_path / PARTIAL
    recs = RECORDS[:3]
    rows, _ = rewrite_records(model, chat_tokenizer, recs, max_new_tokens=5, batch_size=2, partial_path=partial)
    own, stats = rewrite_records(
        model, chat_tokenizer, recs, max_new_tokens=5, batch_size=2, partial_path=partial, prompt="own"
    )
    assert stats["resumed"] == 0 and stats["generated"] == 3  # the reference prompts' rows are not reused
    plain = generate(
        model,
        chat_tokenizer,
        [format_prompt(chat_tokenizer, r["instruction"]) for r in recs],
        max_new_tokens=5,
        batch_size=2,
    )
    assert [own[r["id"]]["rewrite"] for r in recs] == [p[0]["text"].strip() for p in plain]
    assert all(
        own[r["id"]]["prompt_hash"] == prompt_hash(format_prompt(chat_tokenizer, r["instruction"])) for r in recs
    )
    assert [own[r["id"]]["rewrite"] for r in recs] != [rows[r["id"]]["rewrite"] for r in recs]


@pytest.mark.parametrize("chat", [True, False])
def test_completion_only_labels(chat, chat_tokenizer, tiny_tokenizer):
    tok = chat_tokenizer if chat else tiny_tokenizer
    prompt, completion = format_example(tok, RECORDS[1])
    ex = tokenize_pair(tok, prompt, completion, max_length=512)
    n_prompt = sum(1 for t in ex.labels if t == IGNORE)
    assert n_prompt == len(tok(prompt, add_special_tokens=not chat)["input_ids"]) > 0
    assert all(t == IGNORE for t in ex.labels[:n_prompt])
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]
    assert tok.decode(ex.labels[n_prompt:]) == completion
    assert completion.startswith(RECORDS[1]["response"]) and completion != RECORDS[1]["response"]  # + end of turn


def test_text_record_is_all_target_and_cutoff(chat_tokenizer):
    examples, too_long = build_examples(chat_tokenizer, [RECORDS[5]], max_length=512)
    ex = examples[0]
    assert not too_long and ex.labels == ex.input_ids
    # nothing predicts the first token: the label count is the CE's own count, one less than the tokens
    labels = collate(examples, pad_id=chat_tokenizer.pad_token_id)["labels"]
    assert ex.targets == int((labels[:, 1:] != IGNORE).sum()) == len(ex.input_ids) - 1
    short, _ = build_examples(chat_tokenizer, [RECORDS[5]], max_length=24)
    assert len(short[0].input_ids) == 24


def test_prompt_filling_max_length_is_skipped_and_short_template_refused(chat_tokenizer):
    long = {"id": "long", "instruction": "word " * 80, "response": "ok"}
    examples, too_long = build_examples(chat_tokenizer, [long, RECORDS[0]], max_length=40)
    assert too_long == ["long"] and [e.id for e in examples] == ["r1"]
    with pytest.raises(FinetuneError, match="max_length 16 is shorter than the prompt template"):
        build_examples(chat_tokenizer, [RECORDS[0]], max_length=16)


def test_collate_masks_padding_and_loss_counts_completion_only(chat_tokenizer):
    examples, _ = build_examples(chat_tokenizer, RECORDS[:3], max_length=256)
    batch = collate(examples, pad_id=chat_tokenizer.pad_token_id)
    assert ((batch["attention_mask"] == 0) <= (batch["labels"] == IGNORE)).all()
    model = build_model("llama", len(chat_tokenizer))
    with torch.no_grad():
        loss, n = summed_loss(model, batch)
    assert n == sum(e.targets for e in examples)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    by_hand, count = 0.0, 0
    for i, e in enumerate(examples):
        for pos in range(1, len(e.input_ids)):
            if e.labels[pos] != IGNORE:
                by_hand += float(F.cross_entropy(logits[i, pos - 1], torch.tensor(e.labels[pos])))
                count += 1
    assert count == n
    assert float(loss) == pytest.approx(by_hand, rel=1e-5)


def test_split_is_seeded_and_keeps_train_nonempty():
    a = split_records(RECORDS, 0.34, seed=1)
    assert a == split_records(RECORDS, 0.34, seed=1)
    assert len(a[1]) == 2 and len(a[0]) == 4
    assert len({tuple(r["id"] for r in split_records(RECORDS, 0.34, seed=k)[1]) for k in range(6)}) > 1
    assert split_records(RECORDS[:1], 0.5, seed=0) == (RECORDS[:1], [])
    assert split_records(RECORDS, 0.0, seed=0) == (RECORDS, [])


# ================================================================================================ rewrite


def test_rewrite_resumes_from_partial_file(tmp_path, chat_tokenizer):
    model = build_model("llama", len(chat_tokenizer))
    partial = tmp_path / PARTIAL
    kw = dict(max_new_tokens=4, batch_size=2, partial_path=partial)
    first, stats = rewrite_records(model, chat_tokenizer, RECORDS[:2], **kw)
    assert stats["generated"] == 2 and stats["resumed"] == 0
    with open(partial, "a", encoding="utf-8") as f:
        f.write('{"id": "r3", "rewrite": "torn')  # a run killed mid-write
    assert set(read_partial(partial)) == {"r1", "r2"}
    changed = [RECORDS[0], {**RECORDS[1], "response": "a different reference"}] + RECORDS[2:]
    rows, stats = rewrite_records(model, chat_tokenizer, changed, **kw)
    assert stats["resumed"] == 1 and stats["generated"] == 4  # r1 reused; r2 (prompt changed) and r3..r5 new
    assert stats["instruction_records"] == 5 and set(rows) == {"r1", "r2", "r3", "r4", "r5"}
    assert rows["r1"] == first["r1"]
    fresh, _ = rewrite_records(model, chat_tokenizer, changed, max_new_tokens=4, batch_size=3)
    assert {k: v["rewrite"] for k, v in fresh.items()} == {k: v["rewrite"] for k, v in rows.items()}
    assert set(read_partial(partial)) == set(rows)


def test_rewrite_takes_known_answers_by_prompt_and_generates_the_rest(tmp_path, chat_tokenizer):
    model = build_model("llama", len(chat_tokenizer))
    kw = dict(max_new_tokens=4, batch_size=2)
    first, _ = rewrite_records(model, chat_tokenizer, RECORDS[:2], **kw)
    known = {row["prompt_hash"]: {k: v for k, v in row.items() if k != "id"} for row in first.values()}
    renamed = [{**RECORDS[0], "id": "other-id"}, {**RECORDS[1], "response": "a different reference"}, RECORDS[2]]
    rows, stats = rewrite_records(model, chat_tokenizer, renamed, known=known, partial_path=tmp_path / PARTIAL, **kw)
    # r1's prompt under another id is known; r2's prompt changed with its reference, r3 is new
    assert (stats["resumed"], stats["from_cache"], stats["generated"]) == (0, 1, 2)
    assert rows["other-id"] == {**first["r1"], "id": "other-id"}
    assert set(read_partial(tmp_path / PARTIAL)) == {"other-id", "r2", "r3"}


def test_answer_cache_keeps_rows_across_writes_and_skips_altered_ones(cache_home, capsys):
    from finescope.recover.answer_cache import AnswerCache

    settings = dict(dtype="torch.float32", device="cpu", backend="transformers", max_new_tokens=8, temperature=0.0)
    cache = AnswerCache.for_teacher("some/teacher", seed=0, **settings)
    assert cache.path.parent == cache_home / "cache" / "recover" and cache.read() == {}
    assert AnswerCache.for_teacher("some/teacher", seed=1, **settings).path != cache.path
    assert AnswerCache.for_teacher("other/teacher", seed=0, **settings).path != cache.path
    rows = [{"id": f"x{i}", "rewrite": f"answer {i}", "new_tokens": i, "cut_off": False, "prompt_hash": f"h{i}"}
            for i in range(3)]  # fmt: skip
    assert cache.add(rows[:2]) == 2 and cache.add(rows) == 1 and cache.add(rows) == 0
    assert set(cache.read()) == {"h0", "h1", "h2"} and cache.read()["h1"]["rewrite"] == "answer 1"
    lines = cache.path.read_text().splitlines()
    lines[0] = lines[0].replace("answer 0", "answer 9")  # altered: its check no longer matches
    cache.path.write_text("\n".join(lines) + '\n{"prompt_hash": "h3", "rewr')  # and a torn last line
    assert set(cache.read()) == {"h1", "h2"}
    assert "2 cached teacher answer(s) altered or torn" in capsys.readouterr().err
    blocked = AnswerCache(cache_home / "a-file" / "answers.jsonl")  # its folder cannot be made
    (cache_home / "a-file").write_text("")
    assert blocked.add(rows) == 0 and "teacher answers not kept for later stages" in capsys.readouterr().err


# ================================================================================================ filters


@pytest.mark.parametrize(
    "rec, rewrite, cut_off, reason",
    [
        (RECORDS[0], "7 * 12 = 84, so the result is 84.", False, "accepted"),
        (RECORDS[0], "   ", False, "empty"),
        (RECORDS[0], "7 * 12 = 84", True, "cut_off"),
        (RECORDS[0], "Following the reference answer, 84.", False, "leakage"),
        (RECORDS[0], "Your response: 84", False, "leakage"),
        (RECORDS[0], "84 is it. " * 12, False, "degenerate"),
        (RECORDS[0], "step\nstep\nstep\nstep\n84", False, "degenerate"),
        (RECORDS[0], "=" * 40 + " 84", False, "degenerate"),
        (RECORDS[0], "12 * 7 = 74. The answer is 74.", False, "answer_mismatch"),
        (RECORDS[0], "I cannot compute that.", False, "answer_mismatch"),
        (RECORDS[1], "In May she sold 24, so 48 + 24 = 72 clips.", False, "accepted"),
        (RECORDS[2], "5 is more than 3. The answer is (B).", False, "accepted"),
        (RECORDS[2], "3 is bigger. Therefore, the correct answer is (A)", False, "answer_mismatch"),
        (RECORDS[3], "Blue is a primary colour, founded 1666.", False, "accepted"),  # nothing checkable
        (RECORDS[4], "2 + 3 = 5.0", False, "accepted"),
        ({"id": "m", "instruction": "Rate it", "response": "[4.0000]"}, "It is 4 hours.", False, "accepted"),
    ],
)
def test_each_filter_reason(rec, rewrite, cut_off, reason):
    assert check_rewrite(rec, rewrite, cut_off) == reason


def test_leakage_phrase_in_the_task_itself_is_allowed_and_answer_check_can_be_off():
    rec = {"id": "x", "instruction": "Explain what a reference answer is.", "response": "A model solution."}
    assert check_rewrite(rec, "A reference answer is a model solution.") == "accepted"
    assert check_rewrite(RECORDS[0], "The answer is 74.", answer_check=False) == "accepted"


def test_expected_answers():
    assert filters.expected_answer("q", "so #### 1,440") == ("number", 1440)
    assert filters.expected_answer("q", "\\boxed{3/4}") == ("number", filters.Fraction(3, 4))
    assert filters.expected_answer("q\n(A) 1\n(B) 2\n(C) 3\n", "C") == ("letter", "C")
    assert filters.expected_answer("q", "The answer is a bit unclear") is None
    assert filters.rewrite_answer("number", "It costs $18.") == 18


def test_apply_filters_falls_back_and_counts():
    rewrites = {
        "r1": {"rewrite": "7 * 12 = 84. The answer is 84.", "cut_off": False},
        "r2": {"rewrite": "The answer is 70.", "cut_off": False},
        "r3": {"rewrite": "As the reference answer says, (B).", "cut_off": False},
        "r4": {"rewrite": "Yellow is a primary colour.", "cut_off": True},
        "r5": {"rewrite": "2 + 3 = 5", "cut_off": False},
    }
    rows, counts = apply_filters(RECORDS, rewrites)
    assert counts == {"accepted": 2, "answer_mismatch": 1, "leakage": 1, "cut_off": 1, "text_record": 1}
    by_id = {r["id"]: r for r in rows}
    assert by_id["r1"]["response"] == rewrites["r1"]["rewrite"] and by_id["r1"]["used"] == "rewrite"
    for rid, reason in (("r2", "answer_mismatch"), ("r3", "leakage"), ("r4", "cut_off")):
        row = by_id[rid]
        assert (row["used"], row["reason"]) == ("original", reason)
        assert row["response"] == row["original"] == next(r["response"] for r in RECORDS if r["id"] == rid)
        assert row["rewrite"] == rewrites[rid]["rewrite"]
    assert by_id["t1"]["text"] == RECORDS[5]["text"] and by_id["t1"]["used"] == "text"
    sft_rows, sft_counts = apply_filters(RECORDS, None)
    assert sft_counts == {"no_teacher": 5, "text_record": 1}
    assert all(r.get("response") == r.get("original") for r in sft_rows if "instruction" in r)


def test_own_answers_are_not_answer_checked_reference_rewrites_are(tmp_path):
    from finescope.recover.run import _filter

    rewrites = {"r1": {"rewrite": "12 * 7 = 74. The answer is 74.", "cut_off": False}}
    recs = RECORDS[:1]
    for prompt, reason in (("reference", "answer_mismatch"), ("own", "accepted")):
        cfg = RecoverConfig(student="s", data="d", rewrite_prompt=prompt)
        rows, _ = _filter(None, cfg, recs, rewrites)
        assert rows[0]["reason"] == reason
    rows, _ = _filter(None, RecoverConfig(student="s", data="d", answer_check=False), recs, rewrites)
    assert rows[0]["reason"] == "accepted"


# ================================================================================================ LoRA


def _train(tok, seed=0, lr=5e-3, steps_epochs=3.0, family="llama"):
    model = build_model(family, len(tok))
    train, _ = build_examples(tok, RECORDS, max_length=128)
    s = TrainSettings(
        rank=4,
        alpha=8,
        dropout=0.0,
        lr=lr,
        batch_size=4,
        micro_batch_size=2,
        epochs=steps_epochs,
        warmup_ratio=0.0,
        seed=seed,
    )
    return model, train, fine_tune(model, train, train[:2], s, pad_id=tok.pad_token_id)


def test_lora_is_deterministic_and_learns(chat_tokenizer, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, _, (_, h1) = _train(chat_tokenizer, seed=0)
    assert not list(tmp_path.iterdir())  # the Trainer's output folder is a temporary one, not in the cwd
    _, _, (_, h2) = _train(chat_tokenizer, seed=0)
    _, _, (_, h3) = _train(chat_tokenizer, seed=1)
    losses = [r["loss"] for r in h1["train_loss"]]
    assert losses == [r["loss"] for r in h2["train_loss"]]
    assert losses != [r["loss"] for r in h3["train_loss"]]
    assert h1["grad_accumulation"] == 2 and h1["steps_per_epoch"] == 2 and h1["total_steps"] == 6
    assert [e["epoch"] for e in h1["eval_loss"]] == [0, 1, 2, 3]
    assert h1["eval_loss"][-1]["loss"] < h1["eval_loss"][0]["loss"]


def test_merged_logits_equal_base_plus_adapter_and_reload(tmp_path, chat_tokenizer, family):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, train, (peft_model, _) = _train(chat_tokenizer, family=family)
    batch = collate(train[:3], chat_tokenizer.pad_token_id)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        adapted = peft_model(**inputs).logits
        with peft_model.disable_adapter():
            base = peft_model(**inputs).logits
    assert not torch.allclose(adapted, base, atol=1e-4)  # the adapter learned something
    merged = save_trained(peft_model, chat_tokenizer, tmp_path / "adapter", tmp_path / "model")
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, adapted, rtol=1e-4, atol=1e-4)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    assert not any("lora" in k for k in reloaded.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, adapted, rtol=1e-4, atol=1e-4)
    fresh = PeftModel.from_pretrained(build_model(family, len(chat_tokenizer)), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).logits, adapted, rtol=1e-4, atol=1e-4)


def test_unknown_target_module_is_refused(chat_tokenizer):
    model = build_model("llama", len(chat_tokenizer))
    train, _ = build_examples(chat_tokenizer, RECORDS, max_length=128)
    with pytest.raises(FinetuneError, match="c_attn not in the model"):
        fine_tune(model, train, [], TrainSettings(target_modules=["q_proj", "c_attn"]), pad_id=0)


# ================================================================================================ stage


def _cfg(teacher, student, data, **kw) -> RecoverConfig:
    base = dict(
        teacher=str(teacher),
        student=str(student),
        data=str(data),
        max_new_tokens=6,
        rewrite_batch_size=4,
        lora_rank=4,
        lora_alpha=8,
        lr=1e-3,
        batch_size=4,
        micro_batch_size=2,
        max_length=128,
        epochs=1.0,
        eval_fraction=0.2,
    )
    base.update(kw)
    return RecoverConfig(**base)


def test_run_writes_distilled_adapter_model_metrics(tmp_path, tiny_model_dirs, cache_home):
    from transformers import AutoModelForCausalLM

    data = write_records(tmp_path / "data.jsonl")
    cfg = _cfg(tiny_model_dirs["llama"], tiny_model_dirs["llama"], data)
    out = run(cfg, tmp_path / "recover")
    rows = [json.loads(l) for l in (out / "distilled.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [r["id"] for r in RECORDS]
    assert all({"original", "rewrite", "used", "reason"} <= set(r) for r in rows if "instruction" in r)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mode"] == "tgd" and metrics["rewrite"]["generated"] == 5
    assert metrics["filters"]["counts"]["cut_off"] == 5  # a random 6-token teacher never finishes
    assert metrics["filters"]["acceptance_rate"] == 0.0
    assert metrics["train"]["train_examples"] == 5 and metrics["train"]["eval_examples"] == 1
    assert len(metrics["train"]["eval_loss"]) == 2 and metrics["seconds"]["total"] > 0
    assert (out / "DONE").is_file() and (out / "adapter" / "adapter_config.json").is_file()
    assert not (out / PARTIAL).exists()
    AutoModelForCausalLM.from_pretrained(out / "model")
    stamp = (out / "DONE").stat().st_mtime_ns
    assert run(cfg, tmp_path / "recover") == tmp_path / "recover" and (out / "DONE").stat().st_mtime_ns == stamp


def test_a_prompt_that_fills_max_length_is_not_sent_to_the_teacher(tmp_path, tiny_model_dirs, cache_home):
    long = {"id": "long", "instruction": "How many apples are there? " * 40, "response": "Seven."}
    data = write_records(tmp_path / "data.jsonl", [*RECORDS, long])
    cfg = _cfg(tiny_model_dirs["llama"], tiny_model_dirs["llama"], data, rewrite_prompt="own")
    out = run(cfg, tmp_path / "recover")
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["rewrite"]["instruction_records"], metrics["rewrite"]["generated"]) == (6, 5)
    assert metrics["rewrite"]["prompt_too_long"] == 1 and metrics["filters"]["counts"]["prompt_too_long"] == 1
    assert metrics["too_long_skipped"] == 1  # training drops it, as it did when the teacher answered it
    row = [json.loads(l) for l in (out / "distilled.jsonl").read_text().splitlines()][-1]
    assert (row["id"], row["reason"], row["rewrite"], row["response"]) == ("long", "prompt_too_long", None, "Seven.")
    short = _cfg(tiny_model_dirs["llama"], tiny_model_dirs["llama"], data, rewrite_prompt="own", max_length=1024)
    metrics = json.loads((run(short, tmp_path / "roomy") / "metrics.json").read_text())
    # the five prompts the first run's teacher answered are read back from the answer cache; the long one is new
    assert (metrics["rewrite"]["from_cache"], metrics["rewrite"]["generated"]) == (5, 1)
    assert metrics["rewrite"]["prompt_too_long"] == 0


def test_no_teacher_is_plain_sft_without_chat_template(tmp_path):
    student = plain_model_dir(tmp_path)
    data = write_records(tmp_path / "data.jsonl")
    out = run(_cfg("", student, data, no_teacher=True), tmp_path / "sft")  # no teacher needed at all
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mode"] == "sft" and metrics["filters"]["acceptance_rate"] is None
    assert metrics["filters"]["counts"] == {"no_teacher": 5, "text_record": 1}
    rows = [json.loads(l) for l in (out / "distilled.jsonl").read_text().splitlines()]
    assert all(r["rewrite"] is None and r["response"] == r["original"] for r in rows if "instruction" in r)


def test_interrupted_run_resumes_the_rewrite(tmp_path, tiny_model_dirs, monkeypatch):
    import finescope.recover.run as recover_run

    data = write_records(tmp_path / "data.jsonl")
    cfg = _cfg(tiny_model_dirs["qwen2"], tiny_model_dirs["qwen2"], data)

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(recover_run, "fine_tune", boom)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, tmp_path / "recover")
    assert len(read_partial(tmp_path / "recover" / PARTIAL)) == 5
    monkeypatch.undo()
    out = run(cfg, tmp_path / "recover")
    rewrite = json.loads((out / "metrics.json").read_text())["rewrite"]
    assert (rewrite["resumed"], rewrite["generated"]) == (5, 0)


def test_a_second_stage_reads_the_teachers_answers_back(tmp_path, tiny_model_dirs, cache_home):
    data = write_records(tmp_path / "data.jsonl")
    cfg = _cfg(tiny_model_dirs["qwen2"], tiny_model_dirs["qwen2"], data)
    first = run(cfg, tmp_path / "a")
    # another stage (here another learning rate; in a run, another pruned student) asks the same prompts
    second = run(_cfg(tiny_model_dirs["qwen2"], tiny_model_dirs["qwen2"], data, lr=2e-3), tmp_path / "b")
    one, two = (json.loads((d / "metrics.json").read_text())["rewrite"] for d in (first, second))
    assert (one["from_cache"], one["generated"]) == (0, 5) and (two["from_cache"], two["generated"]) == (5, 0)
    rows = [
        [json.loads(l).get("rewrite") for l in (d / "distilled.jsonl").read_text().splitlines()]
        for d in (first, second)
    ]
    assert rows[0] == rows[1] and sum(r is not None for r in rows[0]) == 5
    # other generation settings are another cache entry
    third = run(_cfg(tiny_model_dirs["qwen2"], tiny_model_dirs["qwen2"], data, max_new_tokens=5), tmp_path / "c")
    assert json.loads((third / "metrics.json").read_text())["rewrite"]["generated"] == 5


def test_default_teacher_is_read_from_the_prune_stage(tmp_path, tiny_model_dirs):
    from finescope.recover.run import default_teacher

    prune = tmp_path / "prune"
    (prune / "model").mkdir(parents=True)
    (prune / "config.json").write_text(json.dumps({"config_hash": "x", "config": {"model": "dense-dir"}}))
    assert default_teacher(str(prune / "model")) == "dense-dir"
    with pytest.raises(RecoverError, match="pass --teacher"):
        default_teacher(str(tiny_model_dirs["llama"]))


# ================================================================================================ bad input


def test_teacher_with_another_tokenizer_is_refused(tmp_path, tiny_model_dirs):
    data = write_records(tmp_path / "data.jsonl")
    with pytest.raises(RecoverError, match="different tokenizers"):
        run(_cfg(plain_model_dir(tmp_path), tiny_model_dirs["llama"], data), tmp_path / "out")


def test_student_that_is_not_a_model_is_refused(tmp_path):
    data = write_records(tmp_path / "data.jsonl")
    (tmp_path / "notamodel").mkdir()
    with pytest.raises(ModelError, match="not a model folder"):
        run(_cfg("", tmp_path / "notamodel", data, no_teacher=True), tmp_path / "out")
    with pytest.raises(ModelError, match="must be a model folder"):
        run(_cfg("", tmp_path / "missing", data, no_teacher=True), tmp_path / "out")


def test_data_without_records_is_refused(tmp_path, tiny_model_dirs):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(RecordError, match="no usable records"):
        run(_cfg("", tiny_model_dirs["llama"], empty, no_teacher=True), tmp_path / "out")


def test_max_length_below_the_template_is_refused_before_the_teacher(tmp_path, tiny_model_dirs):
    data = write_records(tmp_path / "data.jsonl")
    with pytest.raises(FinetuneError, match="shorter than the prompt template"):
        run(_cfg(tiny_model_dirs["llama"], tiny_model_dirs["llama"], data, max_length=16), tmp_path / "out")
    assert not (tmp_path / "out" / PARTIAL).exists()


def test_cli_recover_and_one_line_errors(tmp_path, tiny_model_dirs, capsys):
    data = write_records(tmp_path / "data.jsonl")
    student = str(tiny_model_dirs["mistral"])
    args = [
        "recover",
        "--student",
        student,
        "--teacher",
        student,
        "--data",
        str(data),
        "--max-new-tokens",
        "4",
        "--lora-rank",
        "2",
        "--batch-size",
        "4",
        "--micro-batch-size",
        "4",
        "--epochs",
        "0.5",
        "--max-length",
        "96",
    ]
    assert main(args + ["--out", str(tmp_path / "cli")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli")
    metrics = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    assert metrics["train"]["total_steps"] == 1
    assert (
        main(["recover", "--student", str(tmp_path), "--data", str(data), "--no-teacher", "--out", str(tmp_path / "x")])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("finescope recover: error:") and "\n" not in err
    with pytest.raises(SystemExit):
        main(["recover", "--help"])
    assert "--no-teacher" in capsys.readouterr().out


def test_errors_are_finescope_errors():
    assert issubclass(RecoverError, FinescopeError) and issubclass(FinetuneError, FinescopeError)


@pytest.mark.parametrize("killed_after, micro", [(2, 1), (3, 2), (4, 2)])  # first epoch, at its end, second
def test_killed_fine_tuning_resumes_from_its_trainer_checkpoint(tmp_path, chat_tokenizer, killed_after, micro):
    """Checkpoints every step; a run killed after step k resumes at step k + 1 and ends where an uninterrupted run
    ends (optimiser, schedule and data order restored, in the first epoch and in a later one)."""
    from transformers import TrainerCallback

    class Killed(Exception):
        pass

    class KillAfter(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == killed_after:
                raise Killed

    train, _ = build_examples(chat_tokenizer, RECORDS, max_length=128)  # 6 examples: 3 steps of 2 per epoch
    pad = chat_tokenizer.pad_token_id
    drawn = LengthBatches([len(e.input_ids) for e in train], step=2, seed=0, epoch=lambda: 0)
    assert drawn.order(0) != drawn.order(1)  # so resuming in the wrong epoch would train on other steps

    def settings(folder):
        return TrainSettings(
            rank=4, alpha=8, dropout=0.0, lr=5e-3, batch_size=2, micro_batch_size=micro, epochs=2.0, seed=0,
            checkpoint_dir=folder, checkpoint_steps=1,
        )  # fmt: skip

    whole, h_whole = fine_tune(build_model("llama", len(chat_tokenizer)), train, train[:2], settings(None), pad_id=pad)
    ckpt = tmp_path / "checkpoints"
    with pytest.raises(Killed):
        fine_tune(
            build_model("llama", len(chat_tokenizer)), train, [], settings(ckpt), pad_id=pad, callbacks=[KillAfter()]
        )
    assert sorted(p.name for p in ckpt.iterdir()) == [f"checkpoint-{killed_after}"]  # the newest only
    resumed, h = fine_tune(build_model("llama", len(chat_tokenizer)), train, train[:2], settings(ckpt), pad_id=pad)
    assert h["resumed_from_step"] == killed_after
    assert [p["step"] for p in h["train_loss"]] == list(range(killed_after + 1, 7))
    want = [p["loss"] for p in h_whole["train_loss"][killed_after:]]
    assert [p["loss"] for p in h["train_loss"]] == pytest.approx(want)
    assert h["eval_loss"][-1]["loss"] == pytest.approx(h_whole["eval_loss"][-1]["loss"], rel=1e-5)
    a, b = whole.state_dict(), resumed.state_dict()
    assert any("lora" in k for k in a) and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a if "lora" in k)


def test_stage_with_checkpoints_and_gradient_checkpointing(tmp_path, tiny_model_dirs):
    """Both are operational settings: the stage's hash ignores them, the result matches the plain run, and the
    Trainer checkpoints are gone once the stage is done."""
    data = write_records(tmp_path / "data.jsonl")
    plain = _cfg(tiny_model_dirs["llama"], tiny_model_dirs["llama"], data, lora_dropout=0.0)
    cfg = _cfg(
        tiny_model_dirs["llama"], tiny_model_dirs["llama"], data, lora_dropout=0.0, checkpoint_steps=1,
        gradient_checkpointing=True,
    )  # fmt: skip
    out = run(cfg, tmp_path / "ckpt")
    assert is_done(out, plain) and not (out / "checkpoints").exists()
    ref = run(plain, tmp_path / "plain")
    h, h_ref = (read_json(d / "metrics.json")["train"] for d in (out, ref))
    assert [p["loss"] for p in h["train_loss"]] == pytest.approx([p["loss"] for p in h_ref["train_loss"]], rel=1e-5)


def test_weight_sharding_engines_are_refused():
    """FSDP / ZeRO-3 (from an accelerate config) would hand rank 0 a shard to merge: refused in one line, from the
    Trainer's state and, before any work, from the launcher's environment."""
    from types import SimpleNamespace

    from finescope.recover.trainer import _check_engine, check_launch_engine

    def trainer(fsdp=False, deepspeed=False, stage=0):
        state = SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=stage) if deepspeed else None)
        return SimpleNamespace(
            is_fsdp_enabled=fsdp, is_deepspeed_enabled=deepspeed, accelerator=SimpleNamespace(state=state)
        )

    with pytest.raises(FinetuneError, match="FSDP .from the accelerate config. shards the weights"):
        _check_engine(trainer(fsdp=True))
    with pytest.raises(FinetuneError, match="DeepSpeed ZeRO-3 .* shards the weights"):
        _check_engine(trainer(deepspeed=True, stage=3))
    _check_engine(trainer(deepspeed=True, stage=2))
    _check_engine(trainer())

    with pytest.raises(FinetuneError, match="^FSDP .*use DDP"):
        check_launch_engine({"ACCELERATE_USE_FSDP": "true"})
    ds = {"ACCELERATE_USE_DEEPSPEED": "true"}
    with pytest.raises(FinetuneError, match="^DeepSpeed ZeRO-3"):
        check_launch_engine({**ds, "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"})
    check_launch_engine({**ds, "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"})
    check_launch_engine(ds)  # accelerate's default stage: 2
    check_launch_engine({"ACCELERATE_USE_FSDP": "false", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"})  # no DeepSpeed


def test_zero_3_in_a_deepspeed_config_file_is_refused_before_anything_is_written(
    tmp_path, tiny_model_dirs, monkeypatch
):
    from finescope.recover.trainer import check_launch_engine

    ds = tmp_path / "ds.json"
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ds))
    for stage, refused in [(3, True), ("3", True), (2, False), (None, False)]:
        ds.write_text(json.dumps({"zero_optimization": {} if stage is None else {"stage": stage}}))
        if refused:
            with pytest.raises(FinetuneError, match="ZeRO-3"):
                check_launch_engine()
        else:
            check_launch_engine()
    ds.write_text("{not json")
    check_launch_engine()  # DeepSpeed itself reports an unreadable config
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    data = write_records(tmp_path / "data.jsonl")
    cfg = _cfg(tiny_model_dirs["llama"], tiny_model_dirs["llama"], data)
    with pytest.raises(FinetuneError, match="ZeRO-3"):
        run(cfg, tmp_path / "recover")
    assert not (tmp_path / "recover").exists()


def test_a_gpu_the_trainer_would_not_train_on_is_refused_before_any_work(tmp_path, tiny_model_dirs, monkeypatch):
    """The Trainer trains on cuda:0 in one process and on cuda:LOCAL_RANK under ranks, wherever the model was
    loaded: --device cuda:1 (one process) and an indexed GPU under several ranks are refused up front."""
    data = write_records(tmp_path / "data.jsonl")
    with pytest.raises(RecoverError, match=r"--device cuda:1: .* CUDA_VISIBLE_DEVICES=1 and --device cuda"):
        run(_cfg(tiny_model_dirs["llama"], tiny_model_dirs["llama"], data, device="cuda:1"), tmp_path / "a")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RecoverError, match=r"--device cuda:0: under several ranks each rank trains on its own GPU"):
        run(_cfg(tiny_model_dirs["llama"], tiny_model_dirs["llama"], data, device="cuda:0"), tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
