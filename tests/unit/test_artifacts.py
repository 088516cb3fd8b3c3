"""The artifact types (finescope/artifacts.py): every file round-trips through its writer and reader, a missing
field is refused in one line naming file and field, unknown keys are tolerated, optional groups stay absent."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import types
import typing
from typing import Any, Union

import pytest

from finescope import artifacts, typed_data
from finescope.artifacts import (
    ArtifactError,
    CurateFeatures,
    CurateMetrics,
    EvalMetrics,
    EvalResults,
    PipelineManifest,
    PruneReport,
    RewriteStats,
    Schema,
    TaskResult,
    TeacherRewriteStats,
    TrainHistory,
)

ARTIFACTS = [cls for cls in vars(artifacts).values() if isinstance(cls, type) and issubclass(cls, Schema) and cls.FILE]


def _group(tp) -> type[Schema] | None:
    if typing.get_origin(tp) in (Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return tp if isinstance(tp, type) and issubclass(tp, Schema) else None


def example(tp: Any) -> Any:
    """A value of type `tp` with every field filled (optional groups and extras included), from the type alone."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        return example(next(a for a in typing.get_args(tp) if a is not type(None)))
    if isinstance(tp, type) and issubclass(tp, Schema):
        hints, kwargs = typing.get_type_hints(tp), {}
        for f in dataclasses.fields(tp):
            if f.metadata.get("flatten") and _group(hints[f.name]) is None:
                kwargs[f.name] = {f"extra_of_{tp.__name__}": example(typing.get_args(hints[f.name])[1])}
            else:
                kwargs[f.name] = example(hints[f.name])
        return tp(**kwargs)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list:
        return [example(args[0]), example(args[0])]
    if origin is dict:
        return {"key": example(args[1])}
    return {int: 3, float: 0.25, str: "text", bool: True}.get(tp, {"anything": [1, "a", None]})


def _required_paths(cls: type[Schema]) -> list[str]:
    """Top-level keys a file of `cls` must have (fields of present optional groups included)."""
    out, hints = [], typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        group = _group(hints[f.name])
        if f.metadata.get("flatten"):
            if group is not None:
                out += [g.name for g in dataclasses.fields(group) if typed_data.required(g)]
        elif typed_data.required(f):
            out.append(f.name)
    return out


@pytest.mark.parametrize("cls", ARTIFACTS, ids=lambda c: c.__name__)
def test_every_artifact_round_trips_through_its_file(cls, tmp_path):
    obj = example(cls)
    path = obj.write(tmp_path / cls.FILE)
    assert cls.read(path) == obj
    assert cls.from_json(json.loads(path.read_text())) == obj
    assert json.loads(path.read_text()) == obj.to_json()


def test_on_disk_keys_are_the_field_names_in_field_order_with_groups_in_place(tmp_path):
    data = example(CurateMetrics).to_json()
    assert list(data) == [
        "method",
        "pool_records",
        "seeds",
        "top_m",
        "selection",
        "timings_s",
        "layers",
        "reference_texts",
        "pool_truncated",
        "max_length",
        "sae",
        "selected",
        "score_quantiles_pool",
        "score_quantiles_selected",
        "selected_sources",
    ]
    layer = data["sae"]["key"]
    assert list(layer) == ["fvu", "l0", "dead_fraction", "tokens", "extra_of_SaeLayerMetrics", "curves", "cache"]
    result = TaskResult(
        task="gsm8k",
        variant="8-shot cot",
        metric="exact_match",
        value=0.5,
        stderr=0.1,
        n=4,
        chance=0.0,
        extra={"shots": 8, "exact_match_strict": 0.25},
        wall_s=3.0,
    )
    assert list(result.to_json()) == [
        "task",
        "variant",
        "metric",
        "value",
        "stderr",
        "n",
        "chance",
        "shots",
        "exact_match_strict",
        "wall_s",
    ]
    assert EvalMetrics.of([result]).to_json() == {"gsm8k [8-shot cot]": 0.5}


def test_optional_groups_are_absent_from_the_file_and_none_when_read(tmp_path):
    """Keys only some runs write (SAE curation, a teacher's rewrites) are absent otherwise, not null."""
    metrics = dataclasses.replace(example(CurateMetrics), method="random", sae_curation=None)
    data = json.loads(metrics.write(tmp_path / "metrics.json").read_text())
    assert not {"layers", "sae", "reference_texts"} & set(data)
    assert CurateMetrics.read(tmp_path / "metrics.json").sae_curation is None
    sft = RewriteStats(instruction_records=3, text_records=1)
    assert sft.to_json() == {"instruction_records": 3, "text_records": 1}
    # Present, a group keeps its null values: tokens_per_second is null when nothing was generated.
    tgd = RewriteStats(
        instruction_records=3,
        text_records=1,
        teacher_run=TeacherRewriteStats(
            resumed=3, generated=0, seconds=0.0, new_tokens=0, tokens_per_second=None, mean_new_tokens=5.0, teacher="t"
        ),
    )
    assert tgd.to_json()["tokens_per_second"] is None
    assert RewriteStats.from_json(tgd.to_json()) == tgd


@pytest.mark.parametrize("cls", ARTIFACTS, ids=lambda c: c.__name__)
def test_a_missing_field_is_one_line_naming_file_and_field(cls, tmp_path):
    full = example(cls).to_json()
    required = _required_paths(cls)
    if cls in (PipelineManifest, CurateFeatures, EvalMetrics):
        assert required == []  # an empty manifest is a run with nothing in it yet; the others are plain maps
        assert cls.from_json({}) == cls()
        return
    assert required
    for name in required:
        data = {k: v for k, v in full.items() if k != name}
        path = tmp_path / f"{name}-{cls.FILE}"
        path.write_text(json.dumps(data))
        with pytest.raises(ArtifactError) as err:
            cls.read(path)
        msg = str(err.value)
        assert msg.startswith(f"{path}: missing field '{name}'") and "\n" not in msg, msg


def test_a_missing_nested_field_names_its_path(tmp_path):
    data = example(PruneReport).to_json()
    del data["calibration"]["records"]
    (tmp_path / "report.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=r"report\.json: missing field 'calibration\.records' \(Calibration\)"):
        PruneReport.read(tmp_path / "report.json")
    data = example(EvalResults).to_json()
    del data["results"][1]["value"]
    with pytest.raises(ArtifactError, match=r"results\.json: missing field 'results\[1\]\.value'"):
        EvalResults.from_json(data, source="results.json")
    data = example(PipelineManifest).to_json()
    del data["variants"]["key"]["stages"]
    with pytest.raises(ArtifactError, match=r"pipeline\.json: missing field 'variants\.key\.stages'"):
        PipelineManifest.from_json(data, source="pipeline.json")


def test_a_half_written_optional_group_is_refused(tmp_path):
    data = example(CurateMetrics).to_json()
    del data["layers"]  # the other SAE keys are there: the group is present, and incomplete
    with pytest.raises(ArtifactError, match=r"m\.json: missing field 'layers' \(SaeCurationMetrics\)"):
        CurateMetrics.from_json(data, source="m.json")


def _has_extras(obj: Schema) -> bool:
    hints = typing.get_type_hints(type(obj))
    return any(f.metadata.get("flatten") and _group(hints[f.name]) is None for f in dataclasses.fields(obj))


def _json_with_newcomers(obj: Any) -> Any:
    """`obj` as JSON with an unknown key in every object a schema reads (those with extras keep them by design)."""
    if isinstance(obj, Schema):
        data: dict = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if not f.metadata.get("flatten"):
                data[f.name] = _json_with_newcomers(value)
            elif isinstance(value, Schema):
                data.update(_json_with_newcomers(value))
            elif value is not None:
                data.update(typed_data.encode(value))
        if not _has_extras(obj):
            data["written_by_a_later_version"] = {"x": [1]}
        return data
    if isinstance(obj, dict):
        return {k: _json_with_newcomers(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_with_newcomers(v) for v in obj]
    return obj


@pytest.mark.parametrize("cls", ARTIFACTS, ids=lambda c: c.__name__)
def test_unknown_keys_are_tolerated(cls, tmp_path):
    obj = example(cls)
    data = _json_with_newcomers(obj)
    assert data != obj.to_json() or _has_extras(obj)
    (tmp_path / cls.FILE).write_text(json.dumps(data))
    assert cls.read(tmp_path / cls.FILE) == obj


def test_extras_keep_what_a_task_adds():
    data = {
        "task": "t",
        "variant": "v",
        "metric": "m",
        "value": 1.0,
        "stderr": None,
        "n": 2,
        "chance": 0.0,
        "pass@10": 0.5,
        "wall_s": 1.0,
    }
    assert TaskResult.from_json(data).extra == {"pass@10": 0.5}
    assert TaskResult.from_json(data).to_json() == data
    old = {k: v for k, v in data.items() if k != "chance"}  # a file from before `chance` was recorded
    assert TaskResult.from_json(old).chance is None
    assert TaskResult.from_json(old).to_json() == {**old, "chance": None}


def test_wrong_shapes_and_unreadable_files_are_one_line_errors(tmp_path):
    data = example(EvalResults).to_json()
    data["results"] = {"not": "a list"}
    with pytest.raises(ArtifactError, match=r"r\.json: field 'results' should be a list, not an object"):
        EvalResults.from_json(data, source="r.json")
    with pytest.raises(ArtifactError, match=r"should be an object \(PipelineManifest\), not a list"):
        PipelineManifest.from_json([], source="p.json")
    (tmp_path / "pipeline.json").write_text('{"name": "x", ')
    with pytest.raises(ArtifactError, match=r"pipeline\.json: not a readable JSON file") as err:
        PipelineManifest.read(tmp_path / "pipeline.json")
    assert "\n" not in str(err.value)
    with pytest.raises(ArtifactError, match=r"nothing\.json: missing"):
        PipelineManifest.read(tmp_path / "nothing.json")
    assert PipelineManifest.read_if_exists(tmp_path / "nothing.json") is None


def test_strict_conversion_refuses_a_key_the_schema_would_drop():
    """Writers convert their own dicts strictly: a new key must be added to the schema, not lost on the way."""
    history = example(TrainHistory).to_json()
    assert TrainHistory.from_json(history, strict=True) == example(TrainHistory)
    history["train_loss"][0]["grad_norm"] = 1.0
    with pytest.raises(ArtifactError, match=r"'train_loss\[0\]\.grad_norm' is not a field of TrainLossPoint"):
        TrainHistory.from_json(history, source="history", strict=True)
    TrainHistory.from_json(history)  # reading a file stays tolerant


def test_eval_results_are_strict_json(tmp_path):
    res = dataclasses.replace(
        example(EvalResults),
        results=[
            TaskResult(
                task="mmlu:x",
                variant="letter",
                metric="acc",
                value=1.0,
                stderr=float("nan"),
                n=1,
                wall_s=0.1,
                extra={"by_subject": {"x": {"value": float("inf"), "n": 1}}},
            )
        ],
    )
    text = res.write(tmp_path / "results.json").read_text()
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert data["results"][0]["stderr"] is None and data["results"][0]["by_subject"]["x"]["value"] is None


def test_artifacts_import_no_stage_package():
    code = (
        "import sys, finescope.artifacts; "
        "print([m for m in sys.modules if m.split('.')[:2][-1] in ('curate', 'prune', 'recover', 'evaluate', "
        "'report', 'pipeline')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
