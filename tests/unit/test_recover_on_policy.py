"""On-policy distillation on tiny models: which examples the student answers, what a replaced example holds (its
prompt kept, the answer as KD positions only, the teacher's top-k on it), reproducibility, the recover stage with it
(cached and online teacher) and the settings it refuses."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import build_model
from finescope.config import RecoverConfig
from finescope.recover import kd_cache
from finescope.recover.finetune import Example, build_examples
from finescope.recover.loss_terms import KdSettings
from finescope.recover.on_policy import OnPolicy, prompt_length
from finescope.recover.run import RecoverError, run
from finescope.storage import config_hash
from finescope.tokens import IGNORE_INDEX
from test_recover import RECORDS, _cfg, write_records


def _policy(tok, student, teacher, share=1.0, **kw) -> OnPolicy:
    args = dict(share=share, max_new_tokens=8, temperature=1.0, max_length=128, scope="response", seed=0)
    args.update(kw)
    return OnPolicy(student, tok, teacher, KdSettings(weight=0.5, top_k=4), **args)


def test_the_share_chooses_prompted_examples_only_and_about_lambda_of_them(chat_tokenizer):
    model = build_model("llama", len(chat_tokenizer))
    many = [Example([1, 2, 3, 4], [IGNORE_INDEX, IGNORE_INDEX, 3, 4], id=f"r{i}") for i in range(400)]
    text = Example([1, 2, 3], [1, 2, 3], id="text")
    half = _policy(chat_tokenizer, model, None, share=0.5)
    picked = sum(half.chosen(e) for e in many)
    assert 150 < picked < 250 and not half.chosen(text)
    assert sum(_policy(chat_tokenizer, model, None, share=0.0).chosen(e) for e in many) == 0
    assert all(_policy(chat_tokenizer, model, None, share=1.0).chosen(e) for e in many)
    # fixed per (seed, example): the same choice twice, another one under another seed
    assert [half.chosen(e) for e in many] == [_policy(chat_tokenizer, model, None, share=0.5).chosen(e) for e in many]
    other = _policy(chat_tokenizer, model, None, share=0.5, seed=1)
    assert [half.chosen(e) for e in many] != [other.chosen(e) for e in many]


def test_a_replaced_example_keeps_its_prompt_and_trains_the_answer_on_kd_only(chat_tokenizer):
    student, teacher = (build_model("llama", len(chat_tokenizer), seed=s) for s in (0, 1))
    examples, _ = build_examples(chat_tokenizer, RECORDS[:3], max_length=128)
    policy = _policy(chat_tokenizer, student, teacher)
    state = torch.random.get_rng_state()
    out = policy(examples)
    assert torch.equal(torch.random.get_rng_state(), state)  # training's randomness does not see the draws
    for old, new in zip(examples, out, strict=True):
        n = prompt_length(old)
        assert new.id == old.id and new.input_ids[:n] == old.input_ids[:n]
        answer = new.input_ids[n:]
        assert 1 <= len(answer) <= 8
        assert all(t == IGNORE_INDEX for t in new.labels)  # no CE on the student's own tokens
        assert new.kd_labels == [IGNORE_INDEX] * n + answer and new.kd_targets == len(answer)
        assert new.teacher is not None and new.teacher.ids.shape == (len(answer), 4)
        # the targets are the teacher's top-k on exactly this example
        assert torch.equal(new.teacher.ids, kd_cache.batch_top_k(teacher, [new], policy.kd, policy.pad)[0].ids)
    assert policy.stats["examples"] == 3 and policy.stats["tokens"] == sum(
        len(n.input_ids) - prompt_length(o) for o, n in zip(examples, out)
    )
    # greedy answers are the student's greedy continuation, whatever the draw
    greedy = _policy(chat_tokenizer, student, None, temperature=0.0)
    a, b = greedy(examples[:1])[0], greedy(examples[:1])[0]
    assert a.input_ids == b.input_ids and a.teacher is None


def test_scope_all_puts_every_token_under_kd(chat_tokenizer):
    student = build_model("llama", len(chat_tokenizer))
    examples, _ = build_examples(chat_tokenizer, RECORDS[:2], max_length=128)
    for new in _policy(chat_tokenizer, student, None, scope="all")(examples):
        assert new.kd_labels == new.input_ids and new.kd_targets == len(new.input_ids) - 1


def test_answers_fit_max_length(chat_tokenizer):
    student = build_model("llama", len(chat_tokenizer))
    examples, _ = build_examples(chat_tokenizer, RECORDS[:2], max_length=128)
    longest = max(prompt_length(e) for e in examples)
    out = _policy(chat_tokenizer, student, None, max_length=longest + 2, max_new_tokens=50)(examples)
    assert all(len(e.input_ids) <= longest + 2 for e in out)


@pytest.mark.parametrize("kd_cache_setting", ["cached", "off"])
def test_recover_with_on_policy_answers_reports_them(tmp_path, tiny_model_dirs, kd_cache_setting):
    data = write_records(tmp_path / "data.jsonl")
    cache = str(tmp_path / "kd") if kd_cache_setting == "cached" else "off"
    cfg = _cfg(
        tiny_model_dirs["llama"], tiny_model_dirs["qwen2"], data,
        kd_weight=0.5, kd_cache=cache, kd_top_k=8, on_policy=0.5, on_policy_temperature=1.0,
    )  # fmt: skip
    out = run(cfg, tmp_path / "out")
    metrics = json.loads((out / "metrics.json").read_text())
    op = metrics["kd"]["on_policy"]
    assert op["share"] == 0.5 and op["answers"] > 0 and 1 <= op["mean_tokens"] <= cfg.max_new_tokens
    assert 0 <= op["ended"] <= 1 and op["seconds"] > 0
    steps = metrics["train"]["train_loss"]
    assert steps and all(p["kd"] > 0 for p in steps)
    AutoModelForCausalLM.from_pretrained(out / "model")  # still a stock model


def test_on_policy_without_kd_is_refused_before_any_work(tmp_path, tiny_model_dirs):
    data = write_records(tmp_path / "data.jsonl")
    with pytest.raises(RecoverError, match="--on-policy 0.5.*--kd-weight"):
        run(_cfg(tiny_model_dirs["llama"], tiny_model_dirs["llama"], data, on_policy=0.5), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_on_policy_settings_at_their_defaults_keep_every_finished_recover_stage():
    assert config_hash(RecoverConfig(kd_weight=0.6)) == config_hash(
        RecoverConfig(kd_weight=0.6, on_policy=0.0, on_policy_temperature=1.0)
    )
    assert config_hash(RecoverConfig(kd_weight=0.6)) != config_hash(RecoverConfig(kd_weight=0.6, on_policy=0.5))
