"""The token-level unlikelihood term on tiny models: its candidates, a hand computation, chunked = one piece, the mix
with CE (and KD), the recover stage with it, and the settings at their defaults keeping finished stages."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import build_model
from finescope.config import RecoverConfig
from finescope.recover.finetune import batch_loss, build_examples, collate, summed_loss
from finescope.recover.loss_terms import KdSettings, mixed_loss
from finescope.recover.run import run
from finescope.recover.unlikelihood import candidates, unlikelihood_summed
from finescope.storage import config_hash
from finescope.tokens import IGNORE_INDEX
from test_recover import RECORDS, _cfg, write_records

X = IGNORE_INDEX


def test_candidates_are_the_earlier_distinct_response_tokens_but_the_target():
    # prompt 9 9 (not candidates), response 5 6 5 7 5; one padded row with a response of 3 8
    labels = torch.tensor([[X, X, 5, 6, 5, 7, 5], [X, X, X, 3, 8, X, X]])
    got = [[c for c in row if c != -1] for row in candidates(labels).tolist()]
    assert got == [[], [5], [6], [5, 6], [6, 7], [], [3]]


def _hand_ul(logits: torch.Tensor, labels: torch.Tensor) -> float:
    total = 0.0
    for b in range(labels.shape[0]):
        seen: list[int] = []
        for t in range(1, labels.shape[1]):
            y = int(labels[b, t])
            if y == X:
                continue
            p = logits[b, t - 1].double().softmax(-1)
            total += sum(-math.log(1 - float(p[c])) for c in set(seen) if c != y)
            seen.append(y)
    return total


def test_unlikelihood_equals_a_hand_computation_and_chunks_change_nothing(chat_tokenizer):
    model = build_model("llama", len(chat_tokenizer))
    examples, _ = build_examples(chat_tokenizer, RECORDS[:3], max_length=128)
    batch = collate(examples, chat_tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    got = float(unlikelihood_summed(logits, batch["labels"]))
    want = _hand_ul(logits, batch["labels"])
    assert want > 0 and got == pytest.approx(want, rel=1e-4)
    chunked = float(unlikelihood_summed(logits, batch["labels"], chunk_elements=3 * logits.shape[-1]))
    assert chunked == pytest.approx(got, rel=1e-5)


def test_gamma_adds_the_term_to_the_loss_and_its_gradient_lowers_repeats(chat_tokenizer):
    model = build_model("llama", len(chat_tokenizer))
    examples, _ = build_examples(chat_tokenizer, RECORDS[:2], max_length=128)
    batch = collate(examples, chat_tokenizer.pad_token_id)
    ce, n = summed_loss(model, batch)
    s = KdSettings(unlikelihood_weight=0.5)
    terms = batch_loss(model, batch, s)
    assert "kd" not in terms and "hidden" not in terms and "ul" in terms
    assert float(terms["ce"].detach()) == pytest.approx(float(ce.detach()), rel=1e-6)
    loss = mixed_loss(terms, n, n, s)
    assert float(loss.detach()) == pytest.approx(
        float(ce.detach()) / n + 0.5 * float(terms["ul"].detach()) / n, rel=1e-6
    )
    # one plain gradient step on the term alone lowers it
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    before = float(batch_loss(model, batch, s)["ul"])
    opt.zero_grad()
    batch_loss(model, batch, s)["ul"].backward()
    opt.step()
    assert float(batch_loss(model, batch, s)["ul"]) < before


def test_recover_with_unlikelihood_records_the_term_per_step(tmp_path, tiny_model_dirs):
    data = write_records(tmp_path / "data.jsonl")
    cfg = _cfg(
        tiny_model_dirs["llama"], tiny_model_dirs["qwen2"], data,
        kd_weight=0.5, kd_cache=str(tmp_path / "kd"), kd_top_k=8, unlikelihood_weight=0.3,
    )  # fmt: skip
    metrics = json.loads((run(cfg, tmp_path / "out") / "metrics.json").read_text())
    steps = metrics["train"]["train_loss"]
    assert steps and all(p["ul"] >= 0 and p["kd"] > 0 for p in steps) and any(p["ul"] > 0 for p in steps)
    for p in steps:
        assert p["loss"] == pytest.approx(0.5 * p["ce"] + 0.5 * p["kd"] + 0.3 * p["ul"], rel=1e-9)


def test_unlikelihood_at_its_default_keeps_every_finished_recover_stage():
    assert config_hash(RecoverConfig(kd_weight=0.6)) == config_hash(RecoverConfig(kd_weight=0.6, unlikelihood_weight=0))
    assert config_hash(RecoverConfig(kd_weight=0.6)) != config_hash(RecoverConfig(kd_weight=0.6, unlikelihood_weight=1))
