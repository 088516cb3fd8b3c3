"""Hidden-state distillation on tiny models: the loss against a hand computation, the block map, the mix with CE /
KD, the recover stage with it, and the teachers it refuses."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import build_model, tiny_config
from finescope.config import ConfigError, PipelineConfig, RecoverConfig, apply_overrides
from finescope.recover.distill import (
    HiddenStateError,
    OnlineTeacher,
    check_hidden_fit,
    hidden_summed,
    layer_pairs,
)
from finescope.recover.finetune import TrainSettings, build_examples, collate, summed_loss
from finescope.recover.loss_terms import KdSettings, mixed_loss
from finescope.recover.run import RecoverError, run
from finescope.recover.trainer import fine_tune
from finescope.storage import config_hash, hash_excluded, to_jsonable
from finescope.tokens import IGNORE_INDEX
from test_recover import RECORDS, _cfg, write_records
from test_recover_kd import step_loss


def _hand_hidden(student, teacher, batch, blocks, loss: str) -> float:
    """Σ over labelled-predicting positions of the per-position loss, averaged over blocks; loops, float64."""
    with torch.no_grad():
        hs = student(**{k: batch[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True).hidden_states
        ht = teacher(**{k: batch[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True).hidden_states
    labels = batch["labels"]
    total = 0.0
    for b in blocks:
        for row in range(labels.shape[0]):
            for pos in range(labels.shape[1] - 1):
                if labels[row, pos + 1] == IGNORE_INDEX:
                    continue
                s, t = hs[b + 1][row, pos].double(), ht[b + 1][row, pos].double()
                if loss == "nmse":
                    total += float(((s - t) ** 2).sum() / (t**2).sum())
                else:
                    total += float(1 - (s @ t) / (s.norm() * t.norm()))
    return total / len(blocks)


@pytest.mark.parametrize("loss, blocks", [("nmse", ()), ("cosine", (0, 2)), ("nmse", (1,))])
def test_hidden_loss_equals_a_hand_computation(chat_tokenizer, loss, blocks):
    student, teacher = (build_model("llama", len(chat_tokenizer), seed=s) for s in (0, 1))
    examples, _ = build_examples(chat_tokenizer, RECORDS[:3], max_length=128)
    batch = collate(examples, chat_tokenizer.pad_token_id)
    s = KdSettings(hidden_weight=1.0, hidden_loss=loss, hidden_layers=blocks)
    with torch.no_grad():
        out = student(**{k: batch[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True)
        _, t_hidden = OnlineTeacher(teacher).states(batch, hidden=True)
        got = hidden_summed(out.hidden_states, t_hidden, batch["labels"], s)
    want = _hand_hidden(student, teacher, batch, list(blocks) or [0, 1, 2], loss)
    assert want > 0 and float(got) == pytest.approx(want, rel=1e-4)


def test_a_student_equal_to_its_teacher_has_zero_hidden_loss(chat_tokenizer):
    model = build_model("llama", len(chat_tokenizer))
    examples, _ = build_examples(chat_tokenizer, RECORDS[:2], max_length=128)
    terms = step_loss(model, examples, 0, KdSettings(hidden_weight=0.5), OnlineTeacher(model))
    assert "kd" not in terms and "hidden" in terms and float(terms["hidden"].detach()) == pytest.approx(0.0, abs=1e-6)


def test_beta_adds_the_hidden_term_to_ce_and_kd(chat_tokenizer):
    student, teacher = (build_model("llama", len(chat_tokenizer), seed=s) for s in (0, 1))
    examples, _ = build_examples(chat_tokenizer, RECORDS[:2], max_length=128)
    pad = chat_tokenizer.pad_token_id
    ref, n = summed_loss(student, collate(examples, pad))
    s = KdSettings(weight=0.3, hidden_weight=0.2)
    terms = step_loss(student, examples, pad, s, OnlineTeacher(teacher))
    assert "kd" in terms and "hidden" in terms
    assert float(terms["ce"]) == pytest.approx(float(ref), rel=1e-6)
    loss = float(mixed_loss(terms, n, n, s).detach())
    assert loss == pytest.approx(
        (0.7 * float(terms["ce"]) + 0.3 * float(terms["kd"]) + 0.2 * float(terms["hidden"])) / n
    )
    # β alone: CE keeps its full weight
    s0 = KdSettings(weight=0.0, hidden_weight=0.2)
    t0 = step_loss(student, examples, pad, s0, OnlineTeacher(teacher))
    assert "kd" not in t0
    assert float(mixed_loss(t0, n, n, s0).detach()) == pytest.approx((float(t0["ce"]) + 0.2 * float(t0["hidden"])) / n)


def test_the_hidden_term_needs_the_online_teacher(chat_tokenizer):
    examples, _ = build_examples(chat_tokenizer, RECORDS[:2], max_length=128)
    with pytest.raises(Exception, match="needs the online teacher"):
        step_loss(build_model("llama", len(chat_tokenizer)), examples, 0, KdSettings(hidden_weight=1.0))


def test_block_map_equal_depth_deeper_teacher_and_bad_blocks():
    assert layer_pairs(3, 3, ()) == [(1, 1), (2, 2), (3, 3)]
    assert layer_pairs(3, 6, ()) == [(1, 2), (2, 4), (3, 6)]  # block i ↔ round((i+1)·6/3) − 1, +1 for embeddings
    assert layer_pairs(4, 4, (3, 1, 3)) == [(4, 4), (2, 2)]
    with pytest.raises(HiddenStateError, match="hidden_layers 5: the student has blocks 0-2"):
        layer_pairs(3, 3, (0, 5))


def test_teachers_that_do_not_fit_are_refused_in_one_line(chat_tokenizer):
    student = tiny_config("llama", len(chat_tokenizer))
    wide = tiny_config("llama", len(chat_tokenizer))
    wide.hidden_size = 128
    with pytest.raises(HiddenStateError, match=r"^t: hidden size 128, the student s has 64; ") as e:
        check_hidden_fit(student, wide, (), "s", "t")
    assert "\n" not in str(e.value)
    shallow = tiny_config("llama", len(chat_tokenizer), layers=2)
    with pytest.raises(HiddenStateError, match="t: 2 blocks, fewer than the student's 3"):
        check_hidden_fit(student, shallow, (), "s", "t")
    check_hidden_fit(student, tiny_config("llama", len(chat_tokenizer), layers=6), (0, 2), "s", "t")


def test_fine_tune_with_hidden_states_records_the_term_and_lowers_it(chat_tokenizer):
    student, teacher = (build_model("llama", len(chat_tokenizer), seed=s) for s in (0, 1))
    examples, _ = build_examples(chat_tokenizer, RECORDS, max_length=128)
    s = TrainSettings(
        rank=8, alpha=16, dropout=0.0, lr=1e-2, batch_size=4, micro_batch_size=2, epochs=6.0, seed=0,
        kd=KdSettings(hidden_weight=1.0),
    )  # fmt: skip
    _, history = fine_tune(student, examples, [], s, pad_id=0, online_teacher=teacher)
    hidden = [p["hidden"] for p in history["train_loss"]]
    assert all("kd" not in p for p in history["train_loss"]) and all(h > 0 for h in hidden)
    assert hidden[-1] < hidden[0]


def test_recover_with_hidden_states_runs_online_and_reports_it(tmp_path, tiny_model_dirs):
    data = write_records(tmp_path / "data.jsonl")
    cfg = _cfg(
        tiny_model_dirs["llama"], tiny_model_dirs["llama"], data,
        no_rewrite=True, kd_weight=0.5, hidden_weight=0.5, hidden_layers=[1, 2],
    )  # fmt: skip
    out = run(cfg, tmp_path / "out")
    metrics = json.loads((out / "metrics.json").read_text())
    kd = metrics["kd"]
    assert kd["targets"] == "online" and kd["hidden_weight"] == 0.5 and kd["hidden_layers"] == [1, 2]
    steps = metrics["train"]["train_loss"]
    assert steps and all("hidden" in p and "kd" in p for p in steps)
    AutoModelForCausalLM.from_pretrained(out / "model")  # still a stock model


def test_recover_refuses_a_teacher_of_another_width_before_any_work(tmp_path, chat_tokenizer):
    data = write_records(tmp_path / "data.jsonl")
    student, teacher = tmp_path / "student", tmp_path / "teacher"
    build_model("llama", len(chat_tokenizer)).save_pretrained(student)
    wide = tiny_config("llama", len(chat_tokenizer))
    wide.hidden_size, wide.head_dim = 128, 32
    AutoModelForCausalLM.from_config(wide).save_pretrained(teacher)
    for d in (student, teacher):
        chat_tokenizer.save_pretrained(d)
    with pytest.raises(HiddenStateError, match="hidden size 128, the student .* has 64"):
        run(_cfg(teacher, student, data, no_rewrite=True, hidden_weight=1.0), tmp_path / "out")
    assert not (tmp_path / "out" / "DONE").exists()


def test_no_teacher_with_hidden_states_is_refused(tmp_path, tiny_model_dirs):
    data = write_records(tmp_path / "data.jsonl")
    with pytest.raises(RecoverError, match="--no-teacher with --hidden-weight"):
        run(_cfg("", tiny_model_dirs["llama"], data, no_teacher=True, hidden_weight=0.5), tmp_path / "x")


@pytest.mark.parametrize(
    "override, message",
    [("recover.hidden_weight=-1", "hidden_weight"), ("recover.hidden_loss=l1", "hidden_loss")],
)
def test_bad_hidden_settings_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(PipelineConfig(), [override])


def test_hidden_settings_at_their_defaults_keep_every_finished_recover_stage():
    cfg = RecoverConfig(student="s", data="d")
    excluded = set(hash_excluded(cfg))
    assert {"hidden_weight", "hidden_loss", "hidden_layers"} <= excluded
    old = {k: v for k, v in to_jsonable(cfg).items() if k not in excluded}  # the config as an earlier release saw it
    assert config_hash(cfg) == config_hash(old)
    assert config_hash(RecoverConfig(student="s", data="d", hidden_weight=0.1)) != config_hash(cfg)
