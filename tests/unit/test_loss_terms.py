"""The table of the recovery loss's terms (`recover/loss_terms.py`): every row is wired to its settings, its
config field and its metrics field, the loss is put together from the rows, and a new row is all a new term needs
to be trained on and recorded per step."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from finescope.artifacts import TrainLossPoint
from finescope.config import RecoverConfig
from finescope.recover import loss_terms, trainer
from finescope.recover.loss_terms import TERMS, KdSettings, LossTerm, mixed_loss, term_means
from finescope.recover.run import run
from finescope.tokens import IGNORE_INDEX
from test_recover import _cfg, write_records


def test_every_term_is_wired_to_its_settings_config_and_metrics():
    names = [t.name for t in TERMS]
    assert len(set(names)) == len(names) and "ce" not in names
    point_fields = {f.name for f in dataclasses.fields(TrainLossPoint)}
    defaults = RecoverConfig()
    for t in TERMS:
        assert t.over in ("ce", "kd"), t.name
        assert t.name in point_fields, f"{t.name}: no field on artifacts.TrainLossPoint, metrics.json would refuse it"
        assert t.weight in {f.name for f in dataclasses.fields(KdSettings)}, t.name
        assert getattr(defaults, t.config) == 0, f"{t.config}: a term is off at the config's default"
        assert t.weight_of(KdSettings()) == 0 and t.weight_of(KdSettings.from_config(defaults)) == 0
        on = KdSettings.from_config(dataclasses.replace(defaults, **{t.config: 0.5}))
        assert t.weight_of(on) == 0.5 and on.terms_on() == [t], f"{t.config} does not reach KdSettings.{t.weight}"
        if t.config in RecoverConfig.HASH_OMIT_AT:  # added after a release: finished stages keep their hash
            assert RecoverConfig.HASH_OMIT_AT[t.config] == 0
    assert not KdSettings().terms_on() and not KdSettings().needs_teacher


def test_what_the_terms_that_are_on_need_of_the_teacher():
    assert KdSettings(weight=0.5).needs_teacher and not KdSettings(weight=0.5).needs_online_teacher
    assert KdSettings(weight=0.5).reads_teacher_logits and not KdSettings(hidden_weight=0.1).reads_teacher_logits
    assert KdSettings(hidden_weight=0.1).needs_online_teacher and KdSettings(hidden_weight=0.1).needs_teacher
    assert not KdSettings(unlikelihood_weight=1.0).needs_teacher


def test_the_loss_of_summed_terms_by_hand_in_tensors_and_in_floats():
    s = KdSettings(weight=0.6, hidden_weight=0.2, unlikelihood_weight=0.3)
    sums = {"ce": 12.0, "kd": 3.0, "hidden": 1.5, "ul": 6.0}
    want = 0.4 * 12.0 / 8 + 0.6 * 3.0 / 10 + 0.2 * 1.5 / 10 + 0.3 * 6.0 / 8
    assert mixed_loss(sums, 8, 10, s) == pytest.approx(want, rel=1e-12)
    tensors = {k: torch.tensor(v, dtype=torch.float64) for k, v in sums.items()}
    assert float(mixed_loss(tensors, 8, 10, s)) == pytest.approx(want, rel=1e-12)
    # a term that is off is absent, and the CE keeps its whole share without a term that shares it
    assert mixed_loss({"ce": 12.0, "ul": 6.0}, 8, 10, s) == pytest.approx(12.0 / 8 + 0.3 * 6.0 / 8, rel=1e-12)
    assert mixed_loss({"ce": 12.0}, 0, 0, s) == 12.0  # an empty step divides by 1, not 0
    assert term_means(sums, 8, 10) == {"ce": 1.5, "kd": 0.3, "hidden": 0.15, "ul": 0.75}


def test_a_new_row_is_trained_on_and_recorded_per_step(tmp_path, tiny_model_dirs, monkeypatch):
    """Each position the CE covers adds exactly 1 to the new term's sum, so its per-step mean (divided by the step's
    label count, the CE's normaliser) is 1 and each step's loss is CE + 0.25: a row is all the loss, the Trainer's
    step means over ranks and the history need. (The data hold a text record, whose first token is labelled and
    predicted by nothing: the normaliser must not count it.)"""

    def per_labelled_token(x, s):
        return (x.labels[:, 1:] != IGNORE_INDEX).sum().float() + 0.0 * x.logits.sum()

    # The new row borrows the unlikelihood term's weight field and metrics field (`ul`): a real term adds its own.
    row = LossTerm(
        name="ul",
        weight="unlikelihood_weight",
        config="unlikelihood_weight",
        over="ce",
        compute=per_labelled_token,
        summary="1 per label",
    )
    monkeypatch.setattr(loss_terms, "TERMS", (row,))
    monkeypatch.setattr(trainer, "TERMS", (row,))
    data = write_records(tmp_path / "data.jsonl")
    cfg = _cfg(tiny_model_dirs["llama"], tiny_model_dirs["qwen2"], data, no_rewrite=True, unlikelihood_weight=0.25)
    steps = json.loads((run(cfg, tmp_path / "out") / "metrics.json").read_text())["train"]["train_loss"]
    assert steps
    for p in steps:
        assert p["ul"] == pytest.approx(1.0, rel=1e-12) and p["kd"] is None
        assert p["loss"] == pytest.approx(p["ce"] + 0.25, rel=1e-9)
