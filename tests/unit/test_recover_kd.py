"""Recovery beyond the paper's recipe on tiny models: logit distillation (loss, cache, online), full fine-tuning,
next-ranked and replay data with evaluation overlap removed, the pruned_kd variant."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from conftest import build_model, fake_curation
from finescope import FinescopeError
from finescope.config import ConfigError, PipelineConfig, RecoverConfig, apply_overrides
from finescope.ranking import next_ranked
from finescope.recover import kd_cache
from finescope.recover.distill import OnlineTeacher, kd_summed, kl_full, kl_top_k, top_k_of
from finescope.recover.finetune import (
    FinetuneError,
    TrainSettings,
    batch_loss,
    build_examples,
    collate,
    save_trained,
    summed_loss,
    teacher_targets,
)
from finescope.recover.loss_terms import KdSettings, mixed_loss
from finescope.recover.run import RecoverError, run
from finescope.recover.trainer import fine_tune
from finescope.tokens import IGNORE_INDEX
from test_recover import RECORDS, _cfg, write_records

# ================================================================================================ the loss


def step_loss(model, examples, pad_id: int, kd: KdSettings, online: OnlineTeacher | None = None):
    """The trainer's `batch_loss` of a list of examples (their cached teacher targets unless `online`)."""
    teacher = teacher_targets(examples) if kd.weight > 0 and online is None else None
    return batch_loss(model, collate(examples, pad_id), kd, teacher, online)


def _hand_kl(s: torch.Tensor, t: torch.Tensor, tau: float, direction: str) -> torch.Tensor:
    """KL per row by the definition, in float64, one element at a time."""
    out = []
    for srow, trow in zip(s.double(), t.double()):
        q = torch.exp(srow / tau) / torch.exp(srow / tau).sum()
        p = torch.exp(trow / tau) / torch.exp(trow / tau).sum()
        a, b = (p, q) if direction == "forward" else (q, p)
        out.append(sum(float(a[v]) * math.log(float(a[v]) / float(b[v])) for v in range(len(a))))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_kl_matches_the_definition(direction, tau):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 11, generator=g) * 3, torch.randn(5, 11, generator=g) * 3
    torch.testing.assert_close(
        kl_full(s, t, tau, direction).double(), _hand_kl(s, t, tau, direction), atol=1e-5, rtol=1e-5
    )
    assert kl_full(s, t, tau, "forward").sum() != pytest.approx(float(kl_full(s, t, tau, "reverse").sum()))


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_top_k_targets_equal_the_full_kl_when_k_covers_the_vocabulary_and_never_exceed_it(direction):
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(7, 13, generator=g) * 2, torch.randn(7, 13, generator=g) * 2
    full = kl_full(s, t, 2.0, direction)
    torch.testing.assert_close(kl_top_k(s, top_k_of(t, 2.0, 13), 2.0, direction), full, atol=1e-5, rtol=1e-5)
    for k in (1, 4, 12):
        binned = kl_top_k(s, top_k_of(t, 2.0, k), 2.0, direction)
        assert (binned <= full + 1e-6).all() and (binned >= -1e-6).all()
    assert float(kl_top_k(t, top_k_of(t, 1.0, 3), 1.0, direction).abs().max()) < 1e-5  # same distribution: 0


@pytest.mark.parametrize("target", ["full", "top_k"])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_chunked_kd_loss_equals_one_piece_in_value_and_gradient(target, direction):
    g = torch.Generator().manual_seed(3)
    base, t_logits = torch.randn(2, 8, 40, generator=g) * 2, torch.randn(2, 8, 40, generator=g) * 2
    labels = torch.randint(0, 40, (2, 8), generator=g)
    labels[1, :3] = IGNORE_INDEX
    mask = labels[:, 1:] != IGNORE_INDEX
    teacher = t_logits[:, :-1][mask]
    s = KdSettings(weight=1.0, temperature=2.0, loss=direction)
    targets = teacher if target == "full" else top_k_of(teacher, 2.0, 5)
    out = []
    for chunk in (None, 2 * 40):  # 2 positions per chunk
        student = base.clone().requires_grad_()
        loss = kd_summed(student, labels, targets, s, chunk_elements=chunk)
        loss.backward()
        out.append((loss.detach(), student.grad))
    torch.testing.assert_close(out[1][0], out[0][0], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out[1][1], out[0][1], atol=1e-5, rtol=1e-4)


def test_top_k_of_a_batch_above_the_chunk_size_equals_one_piece(monkeypatch):
    from finescope.recover import distill

    logits = torch.randn(9, 30, generator=torch.Generator().manual_seed(4))
    whole = top_k_of(logits, 1.5, 4)
    monkeypatch.setattr(distill, "LOSS_ONE_PIECE_MAX", 2 * 30)
    monkeypatch.setattr(distill, "LOSS_CHUNK_ELEMENTS", 2 * 30)
    chunked = top_k_of(logits, 1.5, 4)
    for a, b in zip((whole.ids, whole.logp, whole.log_rest), (chunked.ids, chunked.logp, chunked.log_rest)):
        torch.testing.assert_close(b, a)


def test_kd_loss_of_a_tiny_model_equals_a_hand_computation(chat_tokenizer):
    student, teacher = (
        build_model("llama", len(chat_tokenizer), seed=0),
        build_model("llama", len(chat_tokenizer), seed=1),
    )
    examples, _ = build_examples(chat_tokenizer, RECORDS, max_length=128)
    batch = collate(examples[:3], chat_tokenizer.pad_token_id)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        s_logits, t_logits = student(**inputs).logits, teacher(**inputs).logits
    s = KdSettings(weight=1.0, temperature=2.0, loss="forward")
    want, n = 0.0, 0
    for row in range(3):  # every labelled position, one at a time
        for pos in range(batch["labels"].shape[1] - 1):
            if batch["labels"][row, pos + 1] == -100:
                continue
            n += 1
            want += float(_hand_kl(s_logits[row, pos : pos + 1], t_logits[row, pos : pos + 1], 2.0, "forward")[0])
    mask = batch["labels"][:, 1:] != -100
    got = kd_summed(s_logits, batch["labels"], t_logits[:, :-1][mask], s)
    assert n == int(mask.sum()) and n > 0
    assert float(got) == pytest.approx(4.0 * want, rel=1e-4)  # τ² · Σ KL


def test_alpha_zero_is_todays_cross_entropy_step_and_never_asks_the_teacher(chat_tokenizer):
    model = build_model("llama", len(chat_tokenizer))
    examples, _ = build_examples(chat_tokenizer, RECORDS, max_length=128)

    class Boom:
        def __call__(self, batch):
            raise AssertionError("the teacher was consulted with α = 0")

    terms = step_loss(model, examples[:3], chat_tokenizer.pad_token_id, KdSettings(weight=0.0), Boom())
    ref, n_ref = summed_loss(model, collate(examples[:3], chat_tokenizer.pad_token_id))
    assert "kd" not in terms and "hidden" not in terms and torch.equal(terms["ce"], ref)
    assert torch.equal(mixed_loss(terms, n_ref, 0, KdSettings(weight=0.0)), ref / n_ref)  # today's step loss

    s = TrainSettings(rank=4, alpha=8, dropout=0.0, lr=5e-3, batch_size=4, micro_batch_size=2, epochs=2.0, seed=0)
    _, plain = fine_tune(build_model("llama", len(chat_tokenizer)), examples, examples[:2], s, pad_id=0)
    _, with_teacher = fine_tune(
        build_model("llama", len(chat_tokenizer)), examples, examples[:2], s, pad_id=0, online_teacher=model
    )
    assert [p["loss"] for p in plain["train_loss"]] == [p["loss"] for p in with_teacher["train_loss"]]
    assert all("kd" not in p for p in plain["train_loss"])


def test_alpha_mixes_kd_and_ce(chat_tokenizer):
    student, teacher = (
        build_model("llama", len(chat_tokenizer), seed=0),
        build_model("llama", len(chat_tokenizer), seed=1),
    )
    examples, _ = build_examples(chat_tokenizer, RECORDS, max_length=128)
    pad = chat_tokenizer.pad_token_id
    ref, n = summed_loss(student, collate(examples[:2], pad))
    s = KdSettings(weight=0.3, temperature=1.0)
    terms = step_loss(student, examples[:2], pad, s, OnlineTeacher(teacher))
    ce, kd = terms["ce"], terms["kd"]
    assert kd is not None and float(kd) > 0 and float(ce) == pytest.approx(float(ref), rel=1e-6)
    loss = mixed_loss(terms, n, n, s)
    assert float(loss.detach()) == pytest.approx(0.3 * float(kd) / n + 0.7 * float(ce.detach()) / n, rel=1e-5)


def test_kd_over_every_token_covers_the_instruction_too(chat_tokenizer):
    student, teacher = (
        build_model("llama", len(chat_tokenizer), seed=0),
        build_model("llama", len(chat_tokenizer), seed=1),
    )
    examples, _ = build_examples(chat_tokenizer, RECORDS[:2], max_length=128)
    for ex in examples:
        ex.kd_labels = list(ex.input_ids)
    assert all(ex.kd_targets == len(ex.input_ids) - 1 > ex.targets for ex in examples)
    s = KdSettings(weight=1.0, top_k=len(chat_tokenizer))
    online = step_loss(student, examples, 0, s, OnlineTeacher(teacher))["kd"]
    for ex, part in zip(examples, kd_cache.teacher_top_k(teacher, examples, s, micro_batch_size=1, pad_id=0)):
        assert len(part.log_rest) == ex.kd_targets
        ex.teacher = part
    cached = step_loss(student, examples, 0, s)["kd"]
    assert float(cached) == pytest.approx(float(online), rel=1e-4)
    batch = collate(examples, 0)
    with torch.no_grad():
        s_logits, t_logits = (
            student(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits,
            teacher(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits,
        )
    mask = batch["attention_mask"][:, 1:].bool()
    want = kl_full(s_logits[:, :-1][mask], t_logits[:, :-1][mask], 1.0, "forward").sum()
    assert float(online) == pytest.approx(float(want), rel=1e-4)


def test_cached_targets_with_the_whole_vocabulary_train_like_the_online_teacher(chat_tokenizer):
    teacher = build_model("llama", len(chat_tokenizer), seed=1)
    examples, _ = build_examples(chat_tokenizer, RECORDS, max_length=128)
    kd = KdSettings(weight=0.5, temperature=2.0, loss="reverse", top_k=len(chat_tokenizer))
    s = TrainSettings(rank=4, alpha=8, dropout=0.0, lr=5e-3, batch_size=4, micro_batch_size=2, epochs=2.0, kd=kd)
    _, online = fine_tune(build_model("llama", len(chat_tokenizer)), examples, [], s, pad_id=0, online_teacher=teacher)
    for ex, part in zip(examples, kd_cache.teacher_top_k(teacher, examples, kd, micro_batch_size=3, pad_id=0)):
        ex.teacher = part
    _, cached = fine_tune(build_model("llama", len(chat_tokenizer)), examples, [], s, pad_id=0)
    a, b = [p["loss"] for p in online["train_loss"]], [p["loss"] for p in cached["train_loss"]]
    assert a == pytest.approx(b, rel=1e-4) and all(p["kd"] > 0 for p in cached["train_loss"])


def test_missing_cached_targets_are_an_error(chat_tokenizer):
    examples, _ = build_examples(chat_tokenizer, RECORDS, max_length=128)
    with pytest.raises(FinetuneError, match="no teacher targets"):
        step_loss(build_model("llama", len(chat_tokenizer)), examples[:2], 0, KdSettings(weight=1.0))


# ================================================================================================ the stage


def test_stage_with_kd_caches_targets_and_reuses_them(tmp_path, tiny_model_dirs):
    data = write_records(tmp_path / "data.jsonl")
    teacher, other_teacher, student = (tiny_model_dirs[f] for f in ("llama", "mistral", "qwen2"))
    cache = tmp_path / "kd"

    def cfg(t):
        return _cfg(t, student, data, kd_weight=0.5, kd_temperature=2.0, kd_cache=str(cache), kd_top_k=8)

    first = json.loads((run(cfg(teacher), tmp_path / "a") / "metrics.json").read_text())
    assert first["kd"]["targets"] == "top-k cache" and first["kd"]["cache_hit"] is False
    assert first["kd"]["cache"] == str(cache / kd_cache.FILE) and first["seconds"]["kd_targets"] > 0
    assert all(p["kd"] > 0 for p in first["train"]["train_loss"])
    # The step's loss is the mix of its recorded CE and KD terms (α = 0.5); the CE is what held-out measures.
    for p in first["train"]["train_loss"]:
        assert p["loss"] == pytest.approx(0.5 * p["ce"] + 0.5 * p["kd"], rel=1e-9) and p["ce"] > 0
    second = json.loads((run(cfg(teacher), tmp_path / "b") / "metrics.json").read_text())
    assert second["kd"]["cache_hit"] is True
    assert [p["loss"] for p in second["train"]["train_loss"]] == [p["loss"] for p in first["train"]["train_loss"]]
    # The same cache folder with another teacher: detected, rebuilt, never read.
    third = json.loads((run(cfg(other_teacher), tmp_path / "c") / "metrics.json").read_text())
    assert third["kd"]["cache_hit"] is False
    assert [p["kd"] for p in third["train"]["train_loss"]] != [p["kd"] for p in first["train"]["train_loss"]]


def test_kd_cache_of_other_data_is_detected(tmp_path, chat_tokenizer, capsys):
    teacher = build_model("llama", len(chat_tokenizer), seed=1)
    examples, _ = build_examples(chat_tokenizer, RECORDS, max_length=128)
    s = KdSettings(weight=1.0, top_k=4)
    path = tmp_path / kd_cache.FILE
    key_a = kd_cache.cache_key("teacher-a", examples, s)
    parts, hit = kd_cache.load_or_build(path, key_a, lambda: kd_cache.teacher_top_k(teacher, examples, s, 2, 0))
    assert not hit and len(parts) == len(examples)
    again, hit = kd_cache.load_or_build(path, key_a, lambda: pytest.fail("rebuilt a valid cache"))
    assert hit and all(torch.equal(a.ids, b.ids) and torch.equal(a.logp, b.logp) for a, b in zip(parts, again))
    key_b = kd_cache.cache_key("teacher-a", examples[:-1], s)
    assert key_b != key_a and key_a != kd_cache.cache_key("teacher-b", examples, s)
    assert key_a != kd_cache.cache_key("teacher-a", examples, KdSettings(weight=1.0, top_k=4, temperature=2.0))
    rebuilt, hit = kd_cache.load_or_build(path, key_b, lambda: parts[:-1])
    assert not hit and "another teacher or other data" in capsys.readouterr().err
    path.write_bytes(b"not safetensors")
    _, hit = kd_cache.load_or_build(path, key_b, lambda: parts[:-1])
    err = capsys.readouterr().err
    assert not hit and f"{path}: cache entry" in err and "not a safetensors file" in err


def test_online_kd_keeps_no_cache(tmp_path, tiny_model_dirs):
    data = write_records(tmp_path / "data.jsonl")
    cfg = _cfg(tiny_model_dirs["llama"], tiny_model_dirs["llama"], data, kd_weight=1.0, kd_cache="off", no_rewrite=True)
    m = json.loads((run(cfg, tmp_path / "o") / "metrics.json").read_text())
    assert m["kd"]["targets"] == "online" and m["kd"]["cache"] is None
    assert m["mode"] == "sft" and m["rewrite"].get("generated") is None  # --no-rewrite: originals, KD only
    # Teacher == student at the start: the first step's KD term is 0 (identical distributions).
    assert m["train"]["train_loss"][0]["kd"] == pytest.approx(0.0, abs=1e-5)


def test_teacher_with_another_vocabulary_is_refused_with_both_sizes(tmp_path, chat_tokenizer):
    data = write_records(tmp_path / "data.jsonl")
    student, teacher = tmp_path / "student", tmp_path / "teacher"
    build_model("llama", len(chat_tokenizer)).save_pretrained(student)
    build_model("llama", len(chat_tokenizer) + 64).save_pretrained(teacher)
    for d in (student, teacher):
        chat_tokenizer.save_pretrained(d)
    n = len(chat_tokenizer)
    with pytest.raises(RecoverError, match=rf"{n + 64} output logits and student .* {n}: logit distillation"):
        run(_cfg(teacher, student, data, kd_weight=0.5, kd_cache=str(tmp_path / "kd")), tmp_path / "out")
    assert not (tmp_path / "out" / "DONE").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("recover.kd_weight=1.5", "kd_weight"),
        ("recover.kd_weight=-0.1", "kd_weight"),
        ("recover.kd_temperature=0", "kd_temperature"),
        ("recover.kd_loss=sideways", "kd_loss"),
        ("recover.adapter=dora", "adapter"),
    ],
)
def test_bad_kd_settings_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(PipelineConfig(), [override])


def test_kd_cache_that_is_a_file_is_refused_before_any_work(tmp_path, tiny_model_dirs):
    data = write_records(tmp_path / "data.jsonl")
    not_a_folder = tmp_path / "cache.txt"
    not_a_folder.write_text("mine")
    cfg = _cfg(tiny_model_dirs["llama"], tiny_model_dirs["qwen2"], data, kd_weight=0.5, kd_cache=str(not_a_folder))
    with pytest.raises(RecoverError, match="--kd-cache .*cache.txt: not a folder"):
        run(cfg, tmp_path / "out")
    assert not_a_folder.read_text() == "mine" and not (tmp_path / "out").exists()


def test_no_teacher_with_kd_is_refused(tmp_path, tiny_model_dirs):
    data = write_records(tmp_path / "data.jsonl")
    with pytest.raises(RecoverError, match="--no-teacher with --kd-weight"):
        run(_cfg("", tiny_model_dirs["llama"], data, no_teacher=True, kd_weight=0.5), tmp_path / "x")


def test_pruned_kd_needs_a_kd_weight():
    with pytest.raises(ConfigError, match="pruned_kd: recover.kd_weight is 0"):
        PipelineConfig(variants=["dense", "pruned_kd"]).check()
    PipelineConfig(variants=["dense", "pruned_kd"], recover=RecoverConfig(kd_weight=0.5)).check()


def test_a_recovery_volume_larger_than_the_pool_sample_is_refused_before_any_work():
    from finescope.config import CurateConfig

    def cfg(top_m: int, sample: int, variants=("dense", "pruned_kd")) -> PipelineConfig:
        recover = RecoverConfig(kd_weight=0.8, recover_top_m=top_m)
        return PipelineConfig(variants=list(variants), curate=CurateConfig(pool_sample=sample), recover=recover)

    with pytest.raises(ConfigError, match=r"recover_top_m = 900: more records than the 800 .* at most 800"):
        cfg(900, 800).check()
    cfg(800, 800).check()
    cfg(900, 0).check()  # the whole pool: its size is known once it is read (recover refuses then)
    cfg(900, 800, variants=("dense", "pruned_tgd")).check()  # no kd variant reads recover_top_m


# ================================================================================================ full fine-tuning


def test_full_fine_tuning_trains_every_weight_and_saves_a_stock_model(tmp_path, chat_tokenizer, family):
    from transformers import AutoModelForCausalLM

    model = build_model(family, len(chat_tokenizer))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    examples, _ = build_examples(chat_tokenizer, RECORDS, max_length=128)
    s = TrainSettings(adapter="full", lr=1e-3, batch_size=4, micro_batch_size=2, epochs=2.0)
    trained, history = fine_tune(model, examples, examples[:2], s, pad_id=0)
    assert history["trainable_parameters"] == sum(p.numel() for p in model.parameters())
    assert history["eval_loss"][-1]["loss"] < history["eval_loss"][0]["loss"]
    merged = save_trained(trained, chat_tokenizer, None, tmp_path / "model")
    changed = [k for k, v in merged.state_dict().items() if not torch.equal(v, before[k])]
    assert any("mlp" in k for k in changed) and any("embed" in k for k in changed)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    batch = collate(examples[:2], 0)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, merged(**inputs).logits)
    assert not (tmp_path / "adapter").exists()


def test_full_fine_tuning_of_a_bf16_model_trains_float32_weights_and_gives_back_bf16(chat_tokenizer):
    """AdamW on bf16 weights rounds updates below bf16's step away: a half-precision model is trained as float32
    master weights (bf16 autocast on GPUs) and handed back in its own dtype; the memory check counts the copy."""
    from transformers import TrainerCallback

    from finescope.recover.finetune import full_tuning_bytes

    model = build_model("llama", len(chat_tokenizer)).to(torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    assert full_tuning_bytes(model) == 14 * n  # fp32 weights (+2 B), gradients and two moments (4 B each)
    before = {k: v.float().clone() for k, v in model.state_dict().items()}
    seen: set[torch.dtype] = set()

    class Dtypes(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            seen.update(p.dtype for p in model.parameters())

    examples, _ = build_examples(chat_tokenizer, RECORDS, max_length=128)
    s = TrainSettings(adapter="full", lr=1e-4, batch_size=4, micro_batch_size=2, epochs=2.0)
    trained, history = fine_tune(model, examples, examples[:2], s, pad_id=0, callbacks=[Dtypes()])
    assert seen == {torch.float32}
    assert {p.dtype for p in trained.parameters()} == {torch.bfloat16}
    assert history["eval_loss"][-1]["loss"] < history["eval_loss"][0]["loss"]
    assert any(not torch.equal(v.float(), before[k]) for k, v in trained.state_dict().items())


def test_full_fine_tuning_that_cannot_fit_is_refused_before_starting(chat_tokenizer, monkeypatch):
    from finescope.recover import finetune

    monkeypatch.setattr(finetune, "available_bytes", lambda device: 1024**2)
    model = build_model("llama", len(chat_tokenizer))
    examples, _ = build_examples(chat_tokenizer, RECORDS, max_length=128)
    need = 3 * sum(p.numel() * 4 for p in model.parameters()) / 2**30
    with pytest.raises(FinetuneError, match=rf"needs about {need:.1f} GiB more .* 0.0 GiB is free; use --adapter lora"):
        fine_tune(model, examples, [], TrainSettings(adapter="full"), pad_id=0)


def test_stage_with_full_fine_tuning(tmp_path, tiny_model_dirs):
    from transformers import AutoModelForCausalLM

    data = write_records(tmp_path / "data.jsonl")
    out = run(_cfg(tiny_model_dirs["llama"], tiny_model_dirs["llama"], data, adapter="full"), tmp_path / "full")
    m = json.loads((out / "metrics.json").read_text())
    assert m["adapter"] == "full" and not (out / "adapter").exists()
    AutoModelForCausalLM.from_pretrained(out / "model")


# ================================================================================================ data


def test_recover_top_m_adds_the_next_ranked_pool_records(tmp_path):
    pool = [{"id": f"p{i}", "instruction": f"Question {i}?", "response": f"Answer {i}."} for i in range(6)]
    selected = fake_curation(tmp_path, pool)
    assert [r["id"] for r in next_ranked(str(selected), 4, {"p5", "p4"})] == ["p3", "p2"]
    assert next_ranked(str(selected), 2, {"p5", "p4"}) == []
    assert len(next_ranked(str(selected), 6, set())) == 6  # the whole scored pool
    with pytest.raises(FinescopeError, match=r"--recover-top-m 7: the curation scored 6 pool records .*at most 6"):
        next_ranked(str(selected), 7, set())
    with pytest.raises(FinescopeError, match="needs --data from a curate stage folder"):
        next_ranked(str(write_records(tmp_path / "loose.jsonl", pool)), 4, set())
    # the pool is read as a stream and only the wanted records are kept; one gone from the pool is named
    (tmp_path / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pool if r["id"] != "p2"))
    assert [r["id"] for r in next_ranked(str(selected), 3, {"p5", "p4"})] == ["p3"]
    with pytest.raises(FinescopeError, match=r"record 'p2' is not in the pool .* any more"):
        next_ranked(str(selected), 4, {"p5", "p4"})


def test_pipeline_gives_the_kd_recipe_to_the_kd_variants_only(tmp_path):
    from finescope import pipeline

    cfg = PipelineConfig(
        variants=["dense", "pruned_tgd", "pruned_kd", "pruned_sft", "random_kd"],
        recover=RecoverConfig(
            kd_weight=0.5, kd_scope="all", no_rewrite=True, recover_top_m=200, adapter="full", epochs=2
        ),
        kd_epochs=4.5,
    )
    cfg.check()
    _, chains = pipeline.plan(cfg, tmp_path)
    kd, tgd, sft = (chains[v]["recover"].cfg for v in ("pruned_kd", "pruned_tgd", "pruned_sft"))
    assert (kd.kd_weight, kd.kd_scope, kd.no_rewrite, kd.teacher) == (0.5, "all", True, cfg.model)
    assert (tgd.kd_weight, tgd.kd_scope, tgd.no_rewrite, tgd.no_teacher) == (0.0, "response", False, False)
    assert sft.no_teacher and sft.kd_weight == 0.0
    assert (kd.recover_top_m, tgd.recover_top_m, sft.recover_top_m) == (200, 0, 0)  # more records: the kd recipe
    assert kd.adapter == tgd.adapter == sft.adapter == "full"  # the rest of the recover section applies to all
    assert (kd.epochs, tgd.epochs, sft.epochs) == (4.5, 2, 2)
    assert chains["pruned_kd"]["prune"] is chains["pruned_tgd"]["prune"]
    assert chains["random_kd"]["curate"].cfg.method == "random"
    assert chains["random_kd"]["recover"].cfg.kd_weight == 0.5
    assert chains["random_kd"]["recover"].cfg.recover_top_m == 200  # as many random records


def test_the_baselines_curate_on_the_users_device(tmp_path):
    """The baselines' curate stages keep the user's curate.device (it used to fall back to the default silently)."""
    from finescope import pipeline
    from finescope.config import CurateConfig
    from finescope.storage import config_hash

    cfg = PipelineConfig(
        variants=["dense", "pruned_tgd", "embedding_tgd", "pruned_random"], curate=CurateConfig(device="cpu")
    )
    cfg.check()
    _, chains = pipeline.plan(cfg, tmp_path)
    for variant in ("embedding_tgd", "pruned_random"):
        job = chains[variant]["curate"]
        assert job.cfg.device == "cpu"
        assert config_hash(job.cfg) == config_hash(replace(job.cfg, device=None))  # no finished stage reruns
