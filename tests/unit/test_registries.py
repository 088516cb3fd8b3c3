"""The method registries (importance, selection methods, eval tasks) and the stage protocol.

A registry row is the one place a method's name is written: config validation, `--help` choices and error
messages read it, the stages ask it what to gather and call its implementation."""

from __future__ import annotations

import inspect
import json
import typing

import pytest

from finescope import config, stage_protocol, storage, typed_data
from finescope.config import ConfigError, CurateConfig, PipelineConfig, PruneConfig, load_config
from finescope.registry import (
    ACTIVATIONS,
    DEPTH_IMPORTANCE,
    FISHER,
    GRADIENTS,
    IMPORTANCE,
    MODEL,
    SELECTION_METHODS,
    Method,
    Registry,
)

ALL = [IMPORTANCE, DEPTH_IMPORTANCE, SELECTION_METHODS]


@pytest.mark.parametrize("registry", ALL, ids=lambda r: r.kind)
def test_every_row_has_an_implementation_of_its_kind(registry):
    for row in registry:
        impl = row.implementation()
        if registry is SELECTION_METHODS:  # a module with score(inputs), maybe finish(scored, inputs)
            assert inspect.ismodule(impl) and callable(impl.score), row.name
            assert len(inspect.signature(impl.score).parameters) == 1, row.name
        elif registry is IMPORTANCE:  # (adapter, layer, gathered, generator) -> (heads, kv, channels)
            assert len(inspect.signature(impl).parameters) == 4, row.name
        else:  # (adapter, gathered) -> block scores
            assert len(inspect.signature(impl).parameters) == 2, row.name


def test_config_choices_and_help_are_the_registry_names():
    hints = typing.get_type_hints(PruneConfig, include_extras=True)
    assert typed_data.spec(hints["importance"]).choices == IMPORTANCE.names()
    assert typed_data.spec(hints["depth_importance"]).choices == DEPTH_IMPORTANCE.names()
    curate_hints = typing.get_type_hints(CurateConfig, include_extras=True)
    assert typed_data.spec(curate_hints["method"]).choices == SELECTION_METHODS.names()
    import argparse

    parser = argparse.ArgumentParser()
    config.add_config_arguments(parser, PruneConfig)
    help_text = " ".join(parser.format_help().split())
    assert f"Choices: {', '.join(IMPORTANCE.names())}. [default: taylor]" in help_text


def test_an_unknown_name_is_refused_with_the_registry_list():
    with pytest.raises(ConfigError) as e:
        load_config(PipelineConfig, None, ["prune.importance=taylr"])
    assert str(e.value) == f"command line: prune.importance = 'taylr': must be one of {', '.join(IMPORTANCE.names())}"
    with pytest.raises(ValueError, match=r"unknown importance 'taylr'; known: taylor, taylor2"):
        IMPORTANCE["taylr"]


def test_declared_needs_are_what_the_stages_gather():
    assert {r.name for r in IMPORTANCE if GRADIENTS in r.needs} == {"taylor", "taylor2", "taylor_mix", "taylor_vector"}
    assert {r.name for r in IMPORTANCE if FISHER in r.needs} == {"taylor2", "taylor_mix"}
    assert {r.name for r in IMPORTANCE if ACTIVATIONS in r.needs} == {"wanda_sp", "flap"}
    assert {r.name for r in SELECTION_METHODS if MODEL in r.needs} == {"sae", "hybrid"}


def test_a_registry_refuses_a_duplicate_or_an_undeclared_need():
    row = Method("a", "one", "x:y")
    with pytest.raises(AssertionError, match="declared twice"):
        Registry("thing", (), [row, row])
    with pytest.raises(AssertionError, match="unknown needs"):
        Registry("thing", ("gradients",), [Method("b", "two", "x:y", frozenset({"telepathy"}))])


def test_eval_tasks_resolve_through_their_registered_kind():
    from finescope.evaluate.tasks import TASK_KINDS, TaskError, known_task_names, resolve_task

    assert list(TASK_KINDS) == ["mmlu", "gsm8k", "humaneval", "nll", "answers", "math", "mbpp"]
    assert resolve_task("gsm8k").kind == "gsm8k" and resolve_task("nll:code").options == {"preset": "code"}
    assert "mmlu:anatomy" in known_task_names() and "nll:<record file>" in known_task_names()
    for bad in ("gsm8k:x", "nll:", "answers:", "mmlu:", "nope"):
        with pytest.raises(TaskError, match=f"unknown task '{bad}'.*known: mmlu, mmlu:stem.*mbpp:<file>"):
            resolve_task(bad)


def test_stage_protocol_writes_metrics_then_done_and_skips_a_done_stage(tmp_path):
    cfg = PruneConfig(data="x.jsonl")
    out = tmp_path / "stage"
    assert not stage_protocol.is_done(out, cfg)
    with stage_protocol.locked_on_rank0(out, cfg) as stage:
        assert stage == out and (out / storage.CONFIG).is_file() and not (out / storage.DONE).exists()

        def write() -> dict:
            (stage / "result.txt").write_text("r")
            assert not (stage / storage.DONE).exists()  # DONE comes after everything the stage writes
            return {"value": 1}

        stage_protocol.finish_on_rank0(stage, cfg, write, "test write")
    assert json.loads((out / storage.METRICS).read_text()) == {"value": 1}
    assert stage_protocol.is_done(out, cfg)
    with stage_protocol.locked_on_rank0(out, cfg) as again:
        assert again is None  # done with this config: nothing to do


def test_stage_protocol_write_failure_leaves_no_done(tmp_path):
    cfg = PruneConfig(data="x.jsonl")
    out = tmp_path / "stage"

    def failing() -> dict:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"), stage_protocol.locked_on_rank0(out, cfg) as stage:
        stage_protocol.finish_on_rank0(stage, cfg, failing, "test write")
    assert not (out / storage.DONE).exists() and not stage_protocol.is_done(out, cfg)


def test_finish_without_a_stage_folder_writes_no_done(tmp_path):
    written = []
    stage_protocol.finish_on_rank0(None, PruneConfig(), lambda: written.append(1) or None, "results file")
    assert written == [1] and not list(tmp_path.iterdir())


def test_taylor_vector_is_the_abs_of_each_groups_summed_first_order_term(chat_tokenizer):
    """The importance added through the registry alone (a row and a function): LLM-Pruner's vector-wise score."""
    from conftest import build_model
    from finescope.modeling import ArchAdapter
    from finescope.prune.importance import compute_scores
    from test_prune import _batches

    model = build_model("llama", len(chat_tokenizer))
    adapter = ArchAdapter(model)
    batches = _batches(chat_tokenizer)
    vector = compute_scores(adapter, batches, "taylor_vector")
    elementwise = compute_scores(adapter, batches, "taylor")
    # |Σ x| ≤ Σ |x| for every group, and strictly below somewhere (the signs of w·g differ within a group).
    for v, e in (
        (vector.heads, elementwise.heads),
        (vector.kv, elementwise.kv),
        (vector.channels, elementwise.channels),
    ):
        assert v.shape == e.shape and bool((v <= e + 1e-6).all()) and bool((v < e - 1e-9).any())
    # One MLP channel by hand: gate and up rows, down column, summed, then abs.
    from finescope.prune import importance

    gathered = importance._Gathered()
    importance._calibration_pass(adapter, batches, gathered, need_grad=True, fisher=False, desc="test")
    mlp, j = adapter.mlp(0), 3
    total = sum(
        float((w.detach().float() * gathered.grads[w].float())[idx].sum())
        for w, idx in ((mlp.gate_proj.weight, j), (mlp.up_proj.weight, j), (mlp.down_proj.weight, (slice(None), j)))
    )
    assert abs(float(vector.channels[0, j]) - abs(total)) <= 1e-6 * max(1.0, abs(total))
    assert vector.loss == elementwise.loss  # the same gradient pass
