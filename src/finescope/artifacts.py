"""The JSON files stages leave for each other and for the report, each defined once as a dataclass.

Stages talk only through files; this module is the contract of those files. A stage builds one of these objects
and writes it (`.write(path)`, atomically); the pipeline and the report read it back through the same type
(`.read(path)`), so a key lives in one place and a reader cannot ask for one no writer writes.

    from finescope.artifacts import PruneReport
    report = PruneReport.read("runs/demo/prune/p-1/report.json")
    report.parameters.after, report.shapes_after.mlp_width

| file                          | written by                     | type             |
|-------------------------------|--------------------------------|------------------|
| curate/…/metrics.json         | curate/run.py                  | CurateMetrics    |
| curate/…/features.json        | curate/run.py                  | CurateFeatures   |
| prune/…/report.json           | prune/run.py                   | PruneReport      |
| prune/…/metrics.json          | prune/run.py                   | PruneMetrics     |
| recover/…/metrics.json        | recover/run.py                 | RecoverMetrics   |
| eval/…/results.json (or --out)| evaluate/run.py                | EvalResults      |
| eval/…/metrics.json           | evaluate/run.py                | EvalMetrics      |
| <run>/pipeline.json           | pipeline.py                    | PipelineManifest |

On disk the JSON keys are the field names, in field order. Reading tolerates keys it does not know (files of
newer versions) and refuses a file that lacks a required field with one line naming the file and the field.
Fields with a default may be absent (files of older versions). A field marked `flatten` has no key of its own:
its content sits in the enclosing object (free-form extras, or a group of keys only some runs write).
This is a lower layer: it imports nothing from the stage packages.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from . import FinescopeError, typed_data
from .storage import METRICS, write_json_atomic
from .typed_data import FLATTEN

S = TypeVar("S", bound="Schema")


class ArtifactError(FinescopeError):
    """A stage artifact cannot be read: missing, not JSON, or without a field its type requires."""


# ================================================================================================ machinery


@dataclass(kw_only=True)
class Schema:
    """Base of every artifact and of the objects nested in them: JSON ⇄ dataclass, by field name."""

    FILE: ClassVar[str] = ""
    """The artifact's file name in its folder ("" for parts nested in another artifact)."""

    def to_json(self) -> dict[str, Any]:
        """The object as plain JSON data, keys in field order (flattened fields merged in place)."""
        return typed_data.encode(self)

    @classmethod
    def from_json(cls: type[S], data: Any, *, source: str = "<data>", strict: bool = False) -> S:
        """Build from JSON data; `source` (the file) is named in the error when a required field is missing.

        Unknown keys are ignored, unless `strict` (for a writer converting its own dict: a key the schema does not
        know would otherwise be dropped from the file without a word)."""
        rules = ArtifactRules(source, strict)
        if not isinstance(data, dict):
            raise rules.not_a("mapping", "", typed_data.Spec(base=cls), data)
        return typed_data.decode_fields(cls, data, "", rules)

    def write(self, path: str | os.PathLike) -> Path:
        """Write atomically (temp file + rename) with the project's one JSON writer."""
        return write_json_atomic(path, self.to_json())

    @classmethod
    def read(cls: type[S], path: str | os.PathLike) -> S:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ArtifactError(
                f"{path}: missing; the stage that writes it ({cls.__name__}) has not finished"
            ) from None
        except (OSError, ValueError) as e:
            reason = " ".join(str(e).split())[:200]
            raise ArtifactError(
                f"{path}: not a readable JSON file ({reason}); rerun the stage that writes it"
            ) from None
        return cls.from_json(data, source=str(path))

    @classmethod
    def read_if_exists(cls: type[S], path: str | os.PathLike) -> S | None:
        """`read`, or None when there is no such file (e.g. a stage that has not run yet)."""
        return cls.read(path) if Path(path).is_file() else None


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null", bool: "a boolean"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__
    )


class ArtifactRules:
    """`typed_data.decode`'s rules for stage artifacts: JSON a stage wrote is taken as it is (JSON has one number
    type, and a reader formats what it finds); its structure is checked, and every error names the file."""

    def __init__(self, source: str, strict: bool) -> None:
        self.source, self.strict = source, strict

    def is_none(self, value: Any, spec: typed_data.Spec) -> bool:
        return value is None

    def empty(self, where: str, spec: typed_data.Spec) -> Any:
        if spec.dataclass is not None or spec.base in (list, dict):
            raise self.not_a("mapping" if spec.dataclass else spec.base.__name__, where, spec, None)
        return None

    def not_a(self, want: str, where: str, spec: typed_data.Spec, value: Any) -> Exception:
        shape = {"mapping": f"an object ({getattr(spec.base, '__name__', '')})", "list": "a list"}.get(
            want, "an object"
        )
        return ArtifactError(
            f"{self.source}: field {where or '(top level)'!r} should be {shape}, not {_kind(value)}; "
            "rerun the stage that writes this file"
        )

    def as_list(self, value: Any) -> Any:
        return value

    def scalar(self, value: Any, spec: typed_data.Spec, where: str) -> Any:
        return value

    def unknown(self, cls: type, keys: list[str], where: str) -> None:
        if self.strict:
            raise ArtifactError(
                f"{self.source}: {typed_data.join(where, keys[0])!r} is not a field of {cls.__name__}; "
                "add it to finescope/artifacts.py"
            )

    def missing(self, cls: type, name: str, where: str) -> Exception:
        return ArtifactError(
            f"{self.source}: missing field {typed_data.join(where, name)!r} ({cls.__name__}); the file is "
            "incomplete or from another finescope version; rerun the stage that writes it"
        )

    def built(self, obj: Any, where: str) -> Any:
        return obj


def _strict(obj: Any) -> Any:
    """NaN and ±inf (e.g. the stderr of a single question) → None, so the file is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_strict(v) for v in obj]
    return obj


# ================================================================================================ curate


@dataclass(kw_only=True)
class SaeLayerMetrics(Schema):
    """Quality of one hook layer's SAE on its training activations, with its curves."""

    fvu: float
    """Fraction of variance unexplained of the standardised activations (lower is better)."""
    l0: float
    """Mean number of active latents per token."""
    dead_fraction: float
    """Fraction of latents that never fired."""
    tokens: int
    """Training tokens (activation rows)."""
    extra: dict[str, Any] = field(default_factory=dict, metadata=FLATTEN)
    """Any further quality numbers the SAE module reports."""
    curves: dict[str, list[float]]
    """Training curves: `step` and, per step, `fvu`, `l0`, `dead_fraction`, `loss`, …"""
    cache: str
    """Cache folder the SAE was trained in (or reused from)."""


@dataclass(kw_only=True)
class SaeCurationMetrics(Schema):
    """The part of curate metrics only SAE curation writes."""

    layers: list[int]
    """Hook layers read (block indices)."""
    reference_texts: int
    """Reference texts the coordinates and the SAE were computed on."""
    pool_truncated: int
    """Pool records longer than max_length (encoded truncated)."""
    max_length: int
    """Token length records were encoded at."""
    sae: dict[str, SaeLayerMetrics]
    """Per hook layer (`layer<ℓ>`): the SAE's quality and curves."""


@dataclass(kw_only=True)
class CurateMetrics(Schema):
    """`curate/…/metrics.json`: what was selected from how much, and how long it took."""

    FILE: ClassVar[str] = METRICS

    method: str
    """sae | embedding | random | full."""
    pool_records: int
    """Pool records scored (after pool_sample)."""
    seeds: int
    """Seed records."""
    top_m: int
    """Records to keep (top_m, capped at the pool size)."""
    selection: str
    """global | per_seed."""
    timings_s: dict[str, float]
    """Wall seconds per phase (`coords_s_layer15`, `encode_pool_layer15`, …) and `total`."""
    sae_curation: SaeCurationMetrics | None = field(default=None, metadata=FLATTEN)
    """SAE method only: layers, reference size, truncation, SAE quality (keys at the top level)."""
    selected: int
    """Records selected (several layers or per-seed selection may keep more than top_m)."""
    score_quantiles_pool: dict[str, float]
    """min / q25 / median / q75 / max of the pool's scores."""
    score_quantiles_selected: dict[str, float]
    """The same over the selection ({} when nothing was selected)."""
    selected_sources: dict[str, int]
    """Selected records per `source` field, most first."""


@dataclass(kw_only=True)
class PoolSnippet(Schema):
    """A pool record on which an SAE latent fires strongly."""

    id: str
    source: str | None
    activation: float
    text: str
    """The record's encoded text, cut to 240 characters."""


@dataclass(kw_only=True)
class SharedLatent(Schema):
    """An SAE latent that fires more on both the seeds and the selection than on the pool at large."""

    latent: int
    lift: float
    """min(seed mean, selected mean) − pool mean of its pooled activation."""
    seed_mean_activation: float
    selected_mean_activation: float
    pool_mean_activation: float
    top_pool_snippets: list[PoolSnippet]
    """Its top-activating pool records."""


@dataclass(kw_only=True)
class CurateFeatures(Schema):
    """`curate/…/features.json` (SAE method): the latents that explain the selection, per hook layer."""

    FILE: ClassVar[str] = "features.json"

    layers: dict[str, list[SharedLatent]] = field(default_factory=dict, metadata=FLATTEN)
    """`layer<ℓ>` → shared latents, most lift first (the layer names are the file's top-level keys)."""


# ================================================================================================ prune


@dataclass(kw_only=True)
class ModelShapes(Schema):
    """Per-layer shapes of a model (every layer alike)."""

    layers: int
    attention_heads: int
    kv_heads: int
    head_dim: int
    mlp_width: int


@dataclass(kw_only=True)
class ParameterCounts(Schema):
    """Parameters before and after pruning, and the fraction removed."""

    before: int
    after: int
    non_embedding_before: int
    non_embedding_after: int
    ratio: float
    """Fraction of all parameters removed."""
    non_embedding_ratio: float
    """Fraction of non-embedding parameters removed."""


@dataclass(kw_only=True)
class Calibration(Schema):
    """The calibration batches importance was computed on."""

    records: int
    """Records used."""
    skipped: int
    """Records with no loss token within calib_length."""
    tokens: int
    loss_tokens: int
    batches: int
    added_next_ranked: int = 0
    """The curation's next-ranked pool records `calib_top_m` added to the data (before sampling calib_samples)."""


@dataclass(kw_only=True)
class PrunePlan(Schema):
    """The width solver's plan: what prune/solver.py `solve` returns, written into report.json as is."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    depth: int
    """Blocks dropped."""
    params_before: int
    params_after: int
    ratio_target: float | None
    """Requested fraction of parameters to remove (None: explicit shapes)."""
    ratio_achieved: float
    non_embedding_ratio: float
    attention_removed: float
    mlp_removed: float
    granule: float
    """Smallest step in ratio the uniform shapes allow."""


@dataclass(kw_only=True)
class KeptLayer(Schema):
    """What one kept block keeps (indices in the dense model)."""

    layer: int
    """Block index in the dense model."""
    heads: list[int]
    kv_heads: list[int]
    channels: list[int]


@dataclass(kw_only=True)
class LayerImportance(Schema):
    """Importance summary of one dense block."""

    layer: int
    dropped: bool
    scores: dict[str, float | None] = field(default_factory=dict, metadata=FLATTEN)
    """`heads_score_mean`, `heads_score_max`, `channels_…` alike; `block_score` when blocks were scored;
    `heads_kept_score_fraction` / `channels_kept_score_fraction` for kept blocks (None when scores sum to 0)."""


@dataclass(kw_only=True)
class PruneTimings(Schema):
    importance_s: float
    slice_s: float
    save_s: float
    verify_s: float
    total_s: float
    compensate_s: float = 0.0
    """Compensation's statistics pass and solve (0 without compensation); where the statistics were gathered in
    the importance pass (`prune/compensate.Collector`), their time is in `importance_s` and this is the rest."""


@dataclass(kw_only=True)
class PruneCompensation(Schema):
    """What compensation at prune time did (prune/compensate.py)."""

    mode: str
    """bias, refit or bias_refit."""
    ridge: float
    inputs: str = "dense"
    """What the fit reads: the dense model's inputs (one shot) or the pruned model's own (block by block)."""
    tokens: int
    """Calibration tokens the statistics were gathered on."""
    added_parameters: int
    """Bias parameters the compensation added (zero for refit)."""


@dataclass(kw_only=True)
class PeakMemory(Schema):
    rss: float
    """Peak resident memory of the process, MiB."""
    gpu: float | None
    """Peak CUDA memory allocated, MiB (None without CUDA)."""


@dataclass(kw_only=True)
class Verification(Schema):
    """The saved model, reloaded with stock transformers in a fresh process."""

    new_tokens: int
    """Tokens greedy generation produced after the reload."""
    cache_matches_no_cache: bool
    architecture: str
    shapes: list[int]
    """layers, heads, KV heads, head_dim, MLP width of the reloaded config."""
    max_abs_logit_diff: float
    tolerance: float
    logits_match: bool


@dataclass(kw_only=True)
class PruneReport(Schema):
    """`prune/…/report.json`: everything about one pruning, for the report and the model card."""

    FILE: ClassVar[str] = "report.json"

    model: str
    """The dense model pruned (as loaded)."""
    family: str
    architecture: str
    data: str
    """Calibration records file."""
    calibration: Calibration
    importance: str
    """Importance criterion (taylor, …)."""
    head_mode: str
    depth_importance: str | None
    """Block criterion, when blocks were dropped."""
    calibration_loss: float | None
    """Mean loss on the calibration batches (gradient criteria only)."""
    plan: PrunePlan
    parameters: ParameterCounts
    shapes_before: ModelShapes
    shapes_after: ModelShapes
    dropped_blocks: list[int]
    kept: list[KeptLayer]
    importance_summary: list[LayerImportance]
    wall_time: PruneTimings
    peak_memory_mib: PeakMemory
    verification: Verification
    notes: list[str]
    compensation: PruneCompensation | None = None
    """Compensation at prune time (None: none)."""


@dataclass(kw_only=True)
class PruneMetrics(Schema):
    """`prune/…/metrics.json`: the headline numbers of report.json."""

    FILE: ClassVar[str] = METRICS

    parameters: ParameterCounts
    ratio_target: float | None
    ratio_achieved: float
    shapes_after: ModelShapes
    calibration_records: int
    calibration_loss: float | None
    wall_time_s: float
    peak_rss_mib: float
    verified: bool
    """The stock reload matched (a failed verification fails the stage instead)."""


# ================================================================================================ recover


@dataclass(kw_only=True)
class TeacherRewriteStats(Schema):
    """The teacher's rewriting (TGD mode only)."""

    resumed: int
    """Rewrites taken over from an interrupted run."""
    from_cache: int = 0
    """Answers read from the teacher-answer cache (`recover/answer_cache.py`): another stage asked the same teacher,
    under the same settings, the same prompts."""
    generated: int
    prompt_too_long: int = 0
    """Instruction records not sent to the teacher: their prompt alone fills `max_length`, so training drops them
    whatever the response."""
    seconds: float
    new_tokens: int
    tokens_per_second: float | None
    mean_new_tokens: float
    teacher: str
    """The teacher model (as loaded)."""


@dataclass(kw_only=True)
class RewriteStats(Schema):
    instruction_records: int
    """Records with an instruction (the ones a teacher rewrites)."""
    text_records: int
    """Plain-text records (trained on as they are)."""
    teacher_run: TeacherRewriteStats | None = field(default=None, metadata=FLATTEN)
    """TGD mode only (keys at this level)."""


@dataclass(kw_only=True)
class FilterStats(Schema):
    counts: dict[str, int]
    """Records per filter outcome (`accepted` or a rejection reason)."""
    acceptance_rate: float | None
    """Accepted / judged rewrites (None without a teacher)."""


@dataclass(kw_only=True)
class TrainLossPoint(Schema):
    step: int
    epoch: int
    loss: float
    """Token-weighted training loss of the step (α·KD + (1 − α)·CE with logit distillation, plus each other term
    that is on: `recover/loss_terms.py`)."""
    lr: float
    ce: float | None = None
    """The step's token-weighted CE on its labelled tokens: the measure of the held-out loss (`eval_loss`), which
    `loss` is not once a KD or hidden-state term is mixed in. None in runs written before this field."""
    kd: float | None = None
    """The step's mean KD term (τ²·KL per token); None without logit distillation."""
    hidden: float | None = None
    """The step's mean hidden-state term (per KD position, averaged over the matched blocks); None without it."""
    ul: float | None = None
    """The step's mean unlikelihood term (per labelled token); None without it."""


@dataclass(kw_only=True)
class EvalLossPoint(Schema):
    epoch: float
    """Epochs trained when measured (0: before training)."""
    loss: float | None
    seconds: float | None = None
    """Training wall seconds when measured (held-out loss against time)."""


@dataclass(kw_only=True)
class TrainHistory(Schema):
    """LoRA fine-tuning: sizes, schedule and loss curves."""

    train_examples: int
    eval_examples: int
    micro_batch_size: int
    grad_accumulation: int
    effective_batch: int
    steps_per_epoch: int
    total_steps: int
    trainable_parameters: int
    train_loss: list[TrainLossPoint]
    eval_loss: list[EvalLossPoint]
    """Held-out loss before training and after each epoch."""
    seconds: float
    seconds_per_step: float
    epochs_run: int
    eval_loss_merged: float | None
    """Held-out loss of the merged model (equals the last eval_loss up to float error)."""
    resumed_from_step: int | None = None
    """The Trainer checkpoint this run resumed from (train_loss then lists the steps after it only)."""


@dataclass(kw_only=True)
class OnPolicyStats(Schema):
    """On-policy distillation: what the student answered itself during training."""

    share: float
    """λ: the share of training examples answered by the student (prompted examples only)."""
    temperature: float
    answers: int
    """Answers generated over the whole training (an example drawn twice counts twice)."""
    mean_tokens: float
    ended: float
    """Share of the answers that ended with a stop token within the cap."""
    seconds: float
    """Generation and teacher passes inside the training time."""


@dataclass(kw_only=True)
class KdStats(Schema):
    """Distillation from the teacher: logits (kd_weight > 0) and / or hidden states (hidden_weight > 0)."""

    weight: float
    """α: loss = α·KD + (1 − α)·CE."""
    temperature: float
    loss: str
    """forward | reverse KL."""
    scope: str = "response"
    """response | all (every token of the example)."""
    targets: str
    """top-k cache (one teacher pass, read back each epoch) | online (the teacher runs on every batch)."""
    top_k: int | None
    cache: str | None
    """The cache file (top-k targets only)."""
    cache_hit: bool | None
    """The targets were read from an existing cache built for the same teacher, examples, τ and k."""
    seconds: float
    """Teacher pass that built the cache (0 on a hit or online)."""
    hidden_weight: float = 0.0
    """β of the hidden-state term (0 = none; > 0 runs the teacher online)."""
    hidden_loss: str | None = None
    """nmse | cosine (hidden-state distillation only)."""
    hidden_layers: list[int] | None = None
    """Student blocks matched (0-based); empty = every block."""
    on_policy: OnPolicyStats | None = None
    """The student's own answers trained on (on-policy distillation; None when off)."""


@dataclass(kw_only=True)
class RecoveryData(Schema):
    """What the student was trained on, by source."""

    curated: int
    """Records of --data (trained on as given)."""
    next_ranked: int
    """Next-ranked curated records added by --recover-top-m."""
    replay: int
    """Generic replay records (text) added by --replay-fraction."""
    dropped_eval_overlap: dict[str, int]
    """Added records left out because they overlap evaluation data, per source (next_ranked, replay)."""


@dataclass(kw_only=True)
class RecoverMetrics(Schema):
    """`recover/…/metrics.json`."""

    FILE: ClassVar[str] = METRICS

    records: int
    skipped_rows: int
    mode: str
    """tgd (teacher rewrites) | sft (original responses)."""
    rewrite: RewriteStats
    filters: FilterStats
    too_long_skipped: int
    """Examples longer than max_length, left out of training."""
    train: TrainHistory
    seconds: dict[str, float]
    """Wall seconds: rewrite, kd_targets, finetune, save, total."""
    adapter: str = "lora"
    """lora | full fine-tuning."""
    kd: KdStats | None = None
    data: RecoveryData | None = None


# ================================================================================================ eval


@dataclass(kw_only=True)
class ModelIdentity(Schema):
    path: str
    config_hash: str
    """Hash of config.json and the weight files' names and sizes."""
    architecture: str
    parameters: int


@dataclass(kw_only=True)
class TaskResult(Schema):
    """One task under one scoring variant."""

    task: str
    variant: str
    """Scoring variant (letter, cloze, 8-shot cot, greedy, …)."""
    metric: str
    value: float | None
    """None when undefined (e.g. no questions)."""
    stderr: float | None
    n: int
    """Questions scored (documents, for the token-weighted metrics of an `nll:` task)."""
    chance: float | None = None
    """The value of a random guess, for accuracy metrics: 1/choices for multiple choice, 0 for generated answers,
    code and top-1 (strictly 1/vocabulary). None for NLL, and in files of older versions (unknown)."""
    extra: dict[str, Any] = field(default_factory=dict, metadata=FLATTEN)
    """Task-specific extras: shots, by_subject, exact_match_strict, pass@k, perplexity, tokens, …"""
    wall_s: float


@dataclass(kw_only=True)
class EvalResults(Schema):
    """`eval/…/results.json`, or the `--out FILE.json` of `finescope eval`. Strict JSON (no NaN)."""

    FILE: ClassVar[str] = "results.json"

    model: ModelIdentity
    eval_config_hash: str
    """Hash of the eval config: a rerun with the same one is skipped."""
    config: dict[str, Any]
    """The resolved eval config."""
    results: list[TaskResult]
    wall_s: float

    def to_json(self) -> dict[str, Any]:
        return _strict(super().to_json())


@dataclass(kw_only=True)
class EvalMetrics(Schema):
    """`eval/…/metrics.json`: `"<task> [<variant>]"` → value, one key per result; results of one task and variant
    that differ by metric (an `answers:` task's exact_match, looping, cut_off) add it: `"<task> [<variant>] <metric>"`."""

    FILE: ClassVar[str] = METRICS

    values: dict[str, float | None] = field(default_factory=dict, metadata=FLATTEN)

    @classmethod
    def of(cls, results: list[TaskResult]) -> EvalMetrics:
        pairs = [(r.task, r.variant) for r in results]
        return cls(
            values={
                f"{r.task} [{r.variant}]" + (f" {r.metric}" if pairs.count((r.task, r.variant)) > 1 else ""): r.value
                for r in results
            }
        )


# ================================================================================================ pipeline


@dataclass(kw_only=True)
class VariantEntry(Schema):
    """One variant (row of the results table) of a run."""

    label: str
    description: str
    data: str | None = None
    """Curation the data comes from (sae, sae:<selector>, random, …); None = no data."""
    prune: str | None = None
    """Calibration of pruning (data | generic); None = not pruned."""
    recovery: str | None = None
    """tgd | sft | None."""
    stages: dict[str, str]
    """Stage → its folder, relative to the run directory (eval last)."""


@dataclass(kw_only=True)
class PipelineManifest(Schema):
    """`<run>/pipeline.json`: the run's variants and their stage folders. Every field may be absent (an empty
    manifest is a run with nothing in it yet)."""

    FILE: ClassVar[str] = "pipeline.json"

    name: str | None = None
    model: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    """The resolved pipeline config."""
    variants: dict[str, VariantEntry] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    """Stage folder → wall seconds of the run that computed it."""
    last_run_status: dict[str, str] = field(default_factory=dict)
    """Stage folder → done (skipped) | ran, for the last invocation."""
    last_run_wall_s: float | None = None
