"""Typed configs: one dataclass per stage plus the pipeline config; YAML, dotted overrides, validation, CLI flags.

Each field carries a one-line docstring (the string literal right after it); those docstrings are the `--help`
text of the CLI and the reference table of the README. Allowed values live in the type: `Literal[...]` for
choices, `Annotated[str, Choices(registry)]` for a method chosen from a registry (`finescope.registry`: the names
are written there once), `Annotated[T, Range(...)]` for numeric ranges. Validation names the field and the allowed range:

    cfg = load_config(PipelineConfig, "configs/default.yaml", overrides=["curate.top_m=200"])
    # → ConfigError: configs/default.yaml: curate.top_m = 0: must be ≥ 1

Unknown keys in a YAML or `config.json` are ignored with a warning (old configs keep loading); unknown keys on
the command line are errors with a suggestion (a typo must not be silently ignored).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import math
import os
import re
import textwrap
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from . import FinescopeError, typed_data
from .messages import QUOTE_LIMIT, count_values, quote
from .registry import DEPTH_IMPORTANCE, IMPORTANCE, SELECTION_METHODS
from .typed_data import Choices, Range, Spec, join, marked
from .variants import VARIANTS


class ConfigError(FinescopeError):
    """A config value or key is invalid; the message names the source, the field and what is allowed."""


@dataclass(frozen=True)
class KdRecipe:
    """Marks a `RecoverConfig` field as the recipe of the pipeline's kd variants only (`Annotated[T, KD]`): the TGD and
    SFT variants reset it to its default. `KD_SETTINGS` is derived from the marks."""


KD = KdRecipe()


@dataclass(frozen=True)
class SetBy:
    """Marks a stage field that `finescope run` sets itself, from the top-level keys and each variant's recipe
    (`Annotated[T, SetBy("the key to use instead")]`): a pipeline config that sets it would be silently
    overwritten, so it is refused, naming `instead`. `PIPELINE_SETS` is derived from the marks."""

    instead: str


@dataclass(frozen=True)
class SaeOnly:
    """Marks a `CurateConfig` field that only the SAE method (and hybrid, which runs it) reads (`Annotated[T,
    SAE_ONLY]`): the pipeline's baseline curations (embedding, dsir, random, full) reset it to its default, so e.g.
    changing `sae_steps` keeps the finished baselines. `SAE_SETTINGS` is derived from the marks."""


SAE_ONLY = SaeOnly()


@dataclass(frozen=True)
class RankedCalibration:
    """Marks a `PruneConfig` field that reads the curation's ranking beside the calibration data (`Annotated[T,
    RANKED]`): the pipeline resets it to its default where a variant calibrates on generic text, which has no ranking.
    `RANKED_CALIBRATION` is derived from the marks."""


RANKED = RankedCalibration()


Positive = Annotated[int, Range(min=1)]
Fraction = Annotated[float, Range(min=0, max=1, min_open=True, max_open=True)]


# ================================================================================================ stage configs
# Defaults are the paper's where it gives one (docs/method.md §7 lists where they depart from it).

CurateMethod = Annotated[str, Choices(SELECTION_METHODS)]
"""Values of CurateConfig.method: the names of `registry.SELECTION_METHODS`."""
Selector = Literal["jacobian", "gradient", "magnitude", "variance", "pca", "random"]
"""Values of CurateConfig.selector."""


@dataclass
class CurateConfig:
    """Stage 1: SAE-guided selection of domain records from a pool (docs/method.md §2)."""

    model: Annotated[str, SetBy("the top-level `model`")] = "default"
    """Model: "default" (embedded SmolLM2-135M-Instruct), a local HF folder, a hub id, or a .gguf file."""
    pool: str = "default"
    """Candidate records to select from (jsonl/json/parquet/csv/txt folder/HF dataset) or "default"."""
    seeds: str = "preset:math"
    """Seed examples of the domain: a record file, or a built-in preset (preset:math|code|medicine|law)."""
    method: Annotated[
        CurateMethod,
        SetBy(
            "`variants` (embedding_tgd, pruned_random and pruned_full use the other methods; the FineScope variants' own curation may be sae or hybrid)"
        ),
    ] = "sae"
    """Selection method: SAE codes (the paper's), sentence-embedding kNN, DSIR (hashed n-grams), random subset, or the full pool."""
    selector: Annotated[Selector, SAE_ONLY] = "jacobian"
    """How the K activation coordinates read by the SAE are chosen (jacobian = v3, gradient = v1)."""
    layers: Annotated[list[int], SAE_ONLY] = field(default_factory=list)
    """Hook layers ℓ (0-based block index; the hidden state after block ℓ); empty = the block at `layer_depth`."""
    layer_depth: Annotated[float, Range(min=0, max=1, max_open=True), SAE_ONLY] = 0.87
    """Hook layer when `layers` is empty, as a fraction of the model's depth: block int(depth × blocks) (0.87 = block 26 of SmolLM2's 30, the best measured; 0.5 = the middle block, the paper's choice)."""
    num_coords: Annotated[int, Range(min=1), SAE_ONLY] = 128
    """K: number of activation coordinates the SAE reads at each hook layer."""
    probes: Annotated[int, Range(min=1, max=64), SAE_ONLY] = 2
    """R: Rademacher probes (Jacobian-vector products) per reference text for the jacobian selector."""
    reference: Annotated[str, SAE_ONLY] = "default"
    """Reference corpus for coordinate selection and SAE training: a record file or "default" (generic text)."""
    reference_samples: Annotated[int, Range(min=1), SAE_ONLY] = 1000
    """Reference texts used for SAE training (sampled with the seed when the corpus is larger)."""
    coord_samples: Annotated[int, Range(min=1), SAE_ONLY] = 64
    """Reference texts used to score coordinates (the jacobian/gradient passes are the costly ones)."""
    sae_kind: Annotated[Literal["topk", "relu"], SAE_ONLY] = "topk"
    """SAE variant: TopK with AuxK dead-latent loss (v3) or ReLU with L1 penalty (v1)."""
    sae_expansion: Annotated[int, Range(min=1), SAE_ONLY] = 16
    """SAE width as a multiple of K."""
    sae_k: Annotated[int, Range(min=1), SAE_ONLY] = 32
    """Active latents per token for the TopK SAE."""
    sae_l1: Annotated[float, Range(min=0), SAE_ONLY] = 1e-3
    """L1 coefficient λ (relu SAE)."""
    sae_auxk_alpha: Annotated[float, Range(min=0), SAE_ONLY] = 1 / 32
    """AuxK loss weight α (topk SAE)."""
    sae_lr: Annotated[float, Range(min=0, min_open=True), SAE_ONLY] = 5e-4
    """SAE AdamW learning rate."""
    sae_data: Annotated[Literal["reference", "pool+reference"], SAE_ONLY] = "reference"
    """SAE training activations: the reference corpus only (the paper), or also every pool token, harvested once by the pool encoding's own forward (cached per pool and coordinates; the pool is then encoded from that cache, with no second forward)."""
    sae_steps: Annotated[int, Range(min=1), SAE_ONLY] = 2000
    """SAE optimisation steps."""
    sae_batch_size: Annotated[int, Range(min=1), SAE_ONLY] = 256
    """Token activations per SAE step."""
    pooling: Annotated[Literal["mean", "max", "mean+max"], SAE_ONLY] = "mean"
    """How per-token SAE codes are pooled into one vector per record (special tokens excluded; mean+max: both, concatenated)."""
    encode_fields: Literal["instruction+response", "instruction", "response"] = "instruction+response"
    """Which part of an instruction record is encoded (text records are encoded whole; response falls back to the instruction when there is none)."""
    latent_weighting: Annotated[Literal["none", "center", "idf", "zscore"], SAE_ONLY] = "zscore"
    """SAE method: reweight pooled codes by pool statistics before the cosine (zscore: each latent centred and scaled by its pool mean and std, the best measured; center; idf: × log inverse pool frequency; none = the paper)."""
    seed_top_k: Annotated[int, Range(min=1), SAE_ONLY] = 5
    """SAE method: score = mean of a record's top-k cosines over the seeds (5: the best measured; 1 = max over seeds, the paper)."""
    selection: Literal["global", "per_seed"] = "global"
    """global: top-M by max cosine over seeds; per_seed: top-M per seed, union de-duplicated."""
    top_m: Annotated[int, Range(min=1)] = 100
    """M: records kept (global) or kept per seed (per_seed)."""
    pool_sample: Annotated[int, Range(min=0)] = 0
    """Encode a random sample of this many pool records (0 = the whole pool)."""
    max_length: Annotated[int, Range(min=8), SAE_ONLY] = 128
    """Token limit per encoded record."""
    batch_size: Annotated[int, Range(min=1), SAE_ONLY] = 8
    """Records per forward pass."""
    seed: int = 0
    """Random seed (sampling, probes, SAE init)."""
    skip_bad_rows: bool = False
    """Skip malformed input rows (and count them) instead of stopping at the first one."""
    dtype: Annotated[Literal["auto", "float32", "bfloat16", "float16"], SAE_ONLY] = "auto"
    """SAE method: the model's dtype for its forwards (auto = fp32 on CPU, bf16 on GPU); SAEs train in fp32."""
    device: str | None = None
    """SAE method: cpu, cuda, cuda:1, or auto (one model spread over the GPUs, forwards only); none = cuda if available (under several ranks: each rank's own GPU). The sentence encoder (embedding, hybrid) runs there too (auto: this rank's GPU if any)."""
    overwrite: bool = False
    """Replace an existing output folder that is not a previous curate output (it is kept aside, never deleted)."""

    HASH_EXCLUDE = ("device", "overwrite")
    HASH_OMIT_AT = {"sae_data": "reference", "dtype": "auto", "layer_depth": 0.5}


@dataclass
class PruneConfig:
    """Stage 2: domain-calibrated structured pruning to a stock-loadable model (docs/method.md §3)."""

    model: Annotated[str, SetBy("the top-level `model`")] = "default"
    """Model to prune: "default", a local HF folder, a hub id, or a .gguf file."""
    data: Annotated[str, SetBy("`variants` (each prunes on its own curated set) or `generic_calibration`")] = ""
    """Calibration records (e.g. curate/selected.jsonl); any record file works."""
    ratio: Fraction = 0.35
    """Target fraction of *total* parameters removed (the paper's ~35%)."""
    importance: Annotated[str, Choices(IMPORTANCE)] = "taylor"
    """Width importance: first-order Taylor (LLM-Pruner param_first) by default."""
    head_mode: Literal["query", "kv_group"] = "query"
    """Prune query heads inside each KV group (same count per group) or whole KV groups."""
    attention_ratio: Annotated[float, Range(min=0, max=1, max_open=True)] | None = None
    """Explicit fraction of attention heads removed (default: chosen by the width solver)."""
    mlp_ratio: Annotated[float, Range(min=0, max=1, max_open=True)] | None = None
    """Explicit fraction of MLP channels removed (default: chosen by the width solver)."""
    mlp_multiple: Annotated[int, Range(min=1)] = 8
    """MLP width is rounded to a multiple of this."""
    depth: Annotated[int, Range(min=0)] = 0
    """Whole decoder blocks to drop (depth pruning)."""
    depth_importance: Annotated[str, Choices(DEPTH_IMPORTANCE)] = "block_influence"
    """Block score for depth pruning."""
    calib_samples: Annotated[int, Range(min=1)] = 128
    """Calibration records used (at most; a seeded sample of the data when it holds more)."""
    calib_top_m: Annotated[int, Range(min=0), RANKED] = 0
    """Calibrate on the curation's top N records instead of only --data (the next-ranked pool records join, those that overlap evaluation data left out; needs --data from a curate stage); 0 = --data as it is. The pipeline ignores it for generic calibration."""
    calib_length: Annotated[int, Range(min=8)] = 256
    """Token limit per calibration record."""
    calib_loss: Literal["text", "response"] = "text"
    """Calibration loss: LM loss on every token of the record's plain text (instruction + response, as
    LLM-Pruner's plain-text calibration) or only on the response tokens of the chat-formatted record. It also sets
    what every importance and the compensation read: `response` runs the records through the chat template, the
    form the recovery trains on and the eval scores (the default preset's choice: docs/results.md §2.1)."""
    batch_size: Annotated[int, Range(min=1)] = 4
    """Calibration records per forward/backward pass."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype while pruning and of the saved model (auto: fp32 on CPU, bf16 on GPU)."""
    device: str | None = None
    """Device: cpu, cuda, cuda:1; none = cuda if available (under several ranks: each rank's own GPU). Not auto:
    importance takes gradients of, and slicing rewrites, every weight on one device."""
    seed: int = 0
    """Random seed (record sampling, random importance)."""
    compensation: Literal["none", "bias", "refit", "bias_refit"] = "none"
    """Compensation at prune time, on the calibration data, before any training (prune/compensate.py): `bias` puts
    the removed heads' / channels' mean contribution into o_proj / down_proj biases (FLAP; Llama family only),
    `refit` re-fits the kept columns by least squares to the dense layer's output (SlimGPT), `bias_refit` both."""
    refit_ridge: Annotated[float, Range(min=0)] = 0.01
    """Ridge of the re-fit, relative to the mean diagonal of the kept inputs' second moment."""
    compensation_inputs: Literal["dense", "pruned"] = "dense"
    """What the compensation fits on: the dense model's inputs, gathered in the importance pass or one pass of their
    own (`dense`), or block by block
    the inputs the already-pruned earlier blocks give (`pruned`: also corrects the error carried in; ~4 forwards
    of the calibration data, rank 0 only)."""
    compensation_memory_gib: Annotated[float, Range(min=0, min_open=True)] = 4.0
    """Device memory the compensation statistics may hold at once (float64 sums; a re-fit's grow as width² per layer). Where every projection's full matrix fits (~0.6 GiB for SmolLM2-135M) and the importance forwards the calibration data anyway, they are gathered in that pass; else in a pass of their own (~0.4 GiB of kept columns for SmolLM2, ~34 GiB for an 8B Llama), split into as many passes as keep them within this budget. The results agree up to float rounding."""
    overwrite: bool = False
    """Replace an existing output folder that is not a previous prune output."""

    HASH_EXCLUDE = ("overwrite", "device", "compensation_memory_gib")
    HASH_OMIT_AT = {"compensation": "none", "refit_ridge": 0.01, "compensation_inputs": "dense", "calib_top_m": 0}


@dataclass
class RecoverConfig:
    """Stage 3: teacher-guided distillation + LoRA fine-tuning of the pruned model (docs/method.md §4)."""

    teacher: Annotated[str, SetBy("the top-level `model` (the teacher of TGD recovery)")] = ""
    """Teacher that rewrites responses (and gives the KD targets); empty = the model the student was pruned from (read from the prune stage's config.json)."""
    student: Annotated[str, SetBy("`variants` (each recovers its own pruned model)")] = ""
    """Pruned model folder to fine-tune (e.g. prune/model)."""
    data: Annotated[str, SetBy("`variants` (each recovers on its own curated set)")] = ""
    """Curated records (e.g. curate/selected.jsonl); any record file works."""
    no_teacher: Annotated[bool, SetBy("`variants` (pruned_sft is the recovery without teacher)")] = False
    """Plain SFT on the original responses (the paper's w/o-TGD ablation): no teacher at all."""
    no_rewrite: Annotated[bool, KD] = False
    """Train on the original responses, without teacher rewrites (with --kd-weight > 0: logit distillation alone)."""
    kd_weight: Annotated[float, Range(min=0, max=1), KD] = 0.0
    """Logit distillation weight α: loss = α·τ²·KL(teacher, student) + (1 − α)·CE, each per token of its positions (--kd-scope); 0 = none (TGD alone)."""
    kd_temperature: Annotated[float, Range(min=0, min_open=True), KD] = 1.0
    """Softmax temperature τ of both distributions in the KD term (the term is scaled by τ²)."""
    kd_loss: Annotated[Literal["forward", "reverse"], KD] = "forward"
    """KL direction: forward KL(teacher ‖ student) (mean-seeking) or reverse KL(student ‖ teacher) (mode-seeking)."""
    kd_scope: Annotated[Literal["response", "all"], KD] = "response"
    """Tokens the KD term covers: the response (as the CE term), or every token, instruction text included (more teacher signal per record)."""
    kd_cache: Annotated[str, KD] = "auto"
    """Teacher targets for KD: "auto" = its top-k distributions cached under $FINESCOPE_HOME/cache/recover (one teacher pass), a folder = cached there, "off" = the teacher runs on every batch (whole vocabulary, teacher kept in memory)."""
    kd_top_k: Annotated[int, Range(min=1), KD] = 64
    """Teacher tokens kept per position in the KD cache (the rest of the vocabulary is one bin)."""
    hidden_weight: Annotated[float, Range(min=0), KD] = 0.0
    """Hidden-state distillation weight β: adds β × the per-token loss between the student's and the teacher's residual stream after each matched block (--hidden-layers); 0 = none. The teacher then runs on every batch (online)."""
    hidden_loss: Annotated[Literal["nmse", "cosine"], KD] = "nmse"
    """Hidden-state loss per token: nmse = ‖h_s − h_t‖² / ‖h_t‖², cosine = 1 − cos(h_s, h_t)."""
    hidden_layers: Annotated[list[int], KD] = field(default_factory=list)
    """Student blocks (0-based) whose outputs are matched; empty = every block (a deeper teacher: block i ↔ round((i+1)·L_t/L_s) − 1)."""
    unlikelihood_weight: Annotated[float, Range(min=0), KD] = 0.0
    """Token-level unlikelihood weight γ against repetition (Welleck et al. 2019): adds γ × Σ −log(1 − p) over the response tokens already produced (other than the one due), per labelled token; 0 = none."""
    on_policy: Annotated[float, Range(min=0, max=1), KD] = 0.0
    """On-policy distillation (GKD's λ): the share of training examples whose response is, each time its batch is drawn, the student's own continuation of the prompt (sampled at --on-policy-temperature, up to --max-new-tokens), trained on the KD term alone; 0 = none. Needs --kd-weight > 0 and keeps the teacher in memory during training."""
    on_policy_temperature: Annotated[float, Range(min=0), KD] = 1.0
    """Sampling temperature of the student's on-policy answers; 0 = greedy."""
    adapter: Literal["lora", "full"] = "lora"
    """lora = LoRA adapters merged at the end (paper); full = every weight trained (small models; memory checked first)."""
    recover_top_m: Annotated[int, Range(min=0), KD] = 0
    """Train on the curation's top N records instead of only --data (the next-ranked pool records join; needs --data from a curate stage); 0 = --data as it is."""
    replay: str = "default"
    """Generic replay text for --replay-fraction: "default" (Wikipedia, OpenWebText, BBC News) or a record file."""
    replay_fraction: Annotated[float, Range(min=0, max=10)] = 0.0
    """Generic replay records added, as a fraction of the domain records (against forgetting); 0 = none."""
    max_new_tokens: Annotated[int, Range(min=1)] = 256
    """Token limit of each teacher rewrite; a rewrite that hits it is rejected as cut off."""
    rewrite_prompt: Annotated[Literal["reference", "own"], KD] = "reference"
    """What the teacher sees when it rewrites (needs rewrites: not --no-rewrite): `reference` = SDFT's prompt, the
    instruction with the original response as a reference answer (TGD's, always); `own` = the student's own prompt
    (the record's chat prompt, no reference), so the student trains on the teacher's own answers (sequence-level
    KD). Own answers are not answer-checked: the teacher is distilled as it is, right or wrong, as its logits are."""
    temperature: Annotated[float, Range(min=0)] = 0.0
    """Teacher sampling temperature; 0 = greedy decoding (the default)."""
    rewrite_batch_size: Annotated[int, Range(min=1)] = 8
    """Prompts per batched generate call at most (left padding; fewer where a batch would be more than half
    padding)."""
    answer_check: bool = True
    """Reject rewrites whose final number / option letter differs from the original's (when it has one); reference
    rewrites only (--rewrite-prompt)."""
    lora_rank: Annotated[int, Range(min=1)] = 32
    """LoRA rank r (paper: 32)."""
    lora_alpha: Annotated[float, Range(min=0, min_open=True)] = 64
    """LoRA α (default 2·r)."""
    lora_dropout: Annotated[float, Range(min=0, max=1, max_open=True)] = 0.05
    """LoRA dropout."""
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Linear projections that get LoRA adapters (default: all of them, LLM-Pruner style)."""
    lr: Annotated[float, Range(min=0, min_open=True)] = 5e-5
    """Peak learning rate (paper: 5e-5)."""
    batch_size: Annotated[int, Range(min=1)] = 128
    """Effective batch size (micro batch × gradient accumulation; paper: 128)."""
    micro_batch_size: Annotated[int, Range(min=1)] = 8
    """Records per forward/backward pass."""
    group_by_length: bool = True
    """Steps of records of like length, drawn in random order (their micro-batches pad little: a CPU step costs its
    padded tokens); false: records drawn at random."""
    max_length: Annotated[int, Range(min=16)] = 256
    """Token cutoff per training example, prompt included (paper: 256)."""
    epochs: Annotated[float, Range(min=0, min_open=True)] = 2.0
    """Training epochs (fractions allowed)."""
    warmup_ratio: Annotated[float, Range(min=0, max=1)] = 0.03
    """Fraction of steps with linear warmup before the cosine decay."""
    eval_fraction: Annotated[float, Range(min=0, max=1, max_open=True)] = 0.1
    """Held-out fraction of the records for the per-epoch eval loss (0 = none)."""
    seed: int = 0
    """Random seed (split, LoRA init, dropout, data order, sampling)."""
    skip_bad_rows: bool = False
    """Skip malformed input rows (and count them) instead of stopping at the first one."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Student and teacher dtype (auto = fp32 on CPU, bf16 on GPU)."""
    device: str | None = None
    """Student and teacher device: cpu, cuda, cuda:1; none = cuda if available (under several ranks: each rank's own GPU). Not auto: the student trains, its weights stay on one device."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory for large models and long examples, more time."""
    generation_backend: Literal["transformers", "vllm"] = "transformers"
    """Teacher rewrites through transformers' generate or vLLM (needs the vllm package and a CUDA GPU)."""
    checkpoint_steps: Annotated[int, Range(min=0)] = 0
    """Save a Trainer checkpoint every N optimiser steps into <out>/checkpoints; a rerun resumes from the newest
    (0 = none). Removed when the stage is done."""
    overwrite: bool = False
    """Replace an existing output folder that is not a previous recover output."""

    HASH_EXCLUDE = ("device", "overwrite", "gradient_checkpointing", "checkpoint_steps")
    HASH_OMIT_AT = {
        "dtype": "auto",
        "generation_backend": "transformers",
        "hidden_weight": 0.0,
        "hidden_loss": "nmse",
        "hidden_layers": [],
        "rewrite_prompt": "reference",
        "on_policy": 0.0,
        "unlikelihood_weight": 0.0,
        "on_policy_temperature": 1.0,
        "group_by_length": False,
    }


@dataclass
class EvalConfig:
    """Stage 4: domain benchmarks and domain NLL of a model folder."""

    model: Annotated[str, SetBy("the top-level `model` and `variants`")] = "default"
    """Model to evaluate: "default", a local HF folder, a hub id, or a .gguf file."""
    tasks: list[str] = field(default_factory=lambda: ["nll:math", "gsm8k", "mmlu:stem"])
    """Tasks, comma-separated: mmlu[:stem|humanities|social_sciences|other|<subject>], gsm8k, humaneval[:instruct], nll:<math|code|file>, answers:<math|file>, math:<file>[@type+type], mbpp:<file>."""
    off_domain: list[str] = field(default_factory=list)
    """Tasks of `tasks` that measure off-domain quality (what a domain model may lose, e.g. nll:code for a maths run); every other task is domain. Read by the report only (its answer section); results do not depend on it."""
    shots: Annotated[int | None, Range(min=0)] = None
    """Few-shot examples per question; none = each task's default (mmlu 0, gsm8k 8 CoT exemplars, others 0)."""
    limit: Annotated[int, Range(min=0)] = 0
    """Questions per task, evenly spaced through it (0 = all)."""
    answers_limit: Annotated[int, Range(min=0)] = 0
    """Questions per `answers:` task, evenly spaced (0 = `limit`): its replies run to `max_new_tokens`, so they cost far more per question than the scoring tasks."""
    batch_size: Annotated[int, Range(min=1)] = 8
    """Questions per forward pass / prompts per generate call (at most: fewer where a batch would be more than half
    padding)."""
    max_new_tokens: Annotated[int, Range(min=1)] = 256
    """Token limit for generation tasks."""
    mmlu_scoring: Literal["letter", "cloze", "both"] = "cloze"
    """MMLU scoring: log-likelihood of the letter (lm-eval mmlu), of the answer text per character (cloze), or both."""
    allow_code_execution: bool = False
    """Run generated code (humaneval, mbpp) in a confined subprocess; required by those tasks."""
    num_samples: Annotated[int, Range(min=1)] = 1
    """Completions per code problem: 1 = greedy pass@1; n > 1 = sampled, unbiased pass@k for k ≤ n."""
    temperature: Annotated[float, Range(min=0, min_open=True)] = 0.8
    """Sampling temperature when num_samples > 1."""
    exec_timeout_s: Annotated[float, Range(min=0, min_open=True)] = 10.0
    """Wall-clock limit per executed program, in seconds."""
    write_samples: bool = False
    """Also write per-sample predictions as JSONL."""
    seed: int = 0
    """Random seed (few-shot choice, sampling)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype: auto = fp32 on CPU, bf16 on GPU."""
    device: str | None = None
    """Device: cpu, cuda, cuda:1, auto (spread over GPUs); none = cuda if available."""
    overwrite: bool = False
    """Replace an existing --out (folder or .json file) that is not a previous eval output (kept aside, never deleted)."""

    generation_backend: Literal["transformers", "vllm"] = "transformers"
    """Generative tasks through transformers' generate or vLLM (needs the vllm package and a CUDA GPU)."""

    HASH_EXCLUDE = ("device", "overwrite", "off_domain")
    HASH_OMIT_AT = {"generation_backend": "transformers", "answers_limit": 0}


KD_SETTINGS = marked(RecoverConfig, KD)
"""RecoverConfig fields that are the recipe of the pipeline's kd variants only (TGD / SFT variants reset them)."""

RANKED_CALIBRATION = marked(PruneConfig, RANKED)
"""PruneConfig fields that read the curation's ranking (the pipeline resets them for generic calibration)."""

FINESCOPE_METHODS = ("sae", "hybrid")
"""What a pipeline config's `curate.method` may say: the selection of every variant whose data is FineScope's own
("sae", "sae:<selector>" keeps the SAE alone); the other methods are variants of their own (`variants`)."""

SAE_SETTINGS = marked(CurateConfig, SAE_ONLY)
"""CurateConfig fields only the SAE method reads (the baseline curations of the pipeline reset them)."""


def _set_by_pipeline(cls: type) -> dict[str, str]:
    hints = typed_data.hints(cls)
    return {
        name: mark.instead
        for name in hints
        if typing.get_origin(hints[name]) is Annotated
        for mark in hints[name].__metadata__
        if isinstance(mark, SetBy)
    }


PIPELINE_SETS: dict[str, dict[str, str]] = {
    section: _set_by_pipeline(cls)
    for section, cls in (
        ("curate", CurateConfig),
        ("prune", PruneConfig),
        ("recover", RecoverConfig),
        ("eval", EvalConfig),
    )
}
"""Per stage section, the fields `finescope run` sets itself (marked `SetBy`) and the key to use instead."""


@dataclass
class PipelineConfig:
    """The whole run: curate → prune → recover → eval → report in one run directory."""

    name: str = "default"
    """Run name: outputs go to <runs_dir>/<name>/."""
    runs_dir: str = "runs"
    """Folder that holds run directories."""
    model: str = "default"
    """Dense model of every stage (replaces curate.model and prune.model; the teacher of TGD recovery)."""
    variants: list[str] = field(default_factory=lambda: ["dense", "pruned", "pruned_tgd", "pruned_sft"])
    """Rows of the results table (finescope.variants.VARIANTS); variants share identical stage outputs (one curation, one dense eval, …)."""
    generic_calibration: str = "default"
    """Generic calibration records of the *generic* variants: a record file, or "default" (Wikipedia, OpenWebText, BBC News snippets)."""
    sweep_ratios: list[Fraction] = field(default_factory=list)
    """Extra pruning ratios (curated calibration, no recovery) evaluated on the nll tasks, for an NLL-vs-ratio plot."""
    prune_schedule: list[Fraction] = field(default_factory=list)
    """Iterative pruning: the share of the dense model's parameters removed after each step, e.g. [0.2, 0.35]; the last must be prune.ratio. Every variant that prunes and recovers then runs prune → recover per step (importance recomputed on the recovered model; each recovery gets 1/k of the variant's epochs, so the total budget is one-shot's). Empty = one-shot."""
    kd_epochs: Annotated[float | None, Range(min=0, min_open=True)] = None
    """Epochs of the kd variants' recoveries (none = recover.epochs): distillation without rewrites saves the rewrite's time, which the budgeted recipe spends on epochs."""
    num_processes: Annotated[int, Range(min=1)] = 1
    """Data-parallel processes on this machine (>1: `finescope run` relaunches itself under torchrun, one rank per process; on GPUs, one per GPU). Several nodes: launch `torchrun … -m finescope run` on each (README → Scaling out)."""
    report: bool = True
    """Write report.md, report.html and the final model's card after the stages."""
    curate: CurateConfig = field(default_factory=CurateConfig)
    """Curate stage settings."""
    prune: PruneConfig = field(default_factory=PruneConfig)
    """Prune stage settings."""
    recover: RecoverConfig = field(default_factory=RecoverConfig)
    """Recover stage settings."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Eval stage settings."""

    def check(self) -> None:
        for i, name in enumerate(self.variants):
            if name not in VARIANTS:
                raise ConfigError(f"variants[{i}] = {quote(name)}: unknown variant{_suggest(name, list(VARIANTS))}")
        kd = [name for name in self.variants if VARIANTS[name].recovery == "kd"]
        if kd and self.recover.kd_weight == 0:
            raise ConfigError(
                f"variants {', '.join(kd)}: recover.kd_weight is 0; set it (0 < α ≤ 1) for their logit distillation"
            )
        steps = self.prune_schedule
        for i in range(1, len(steps)):
            if steps[i] <= steps[i - 1]:
                raise ConfigError(
                    f"prune_schedule = {steps}: step {i + 1} ({steps[i]:g}) does not remove more than step {i} "
                    f"({steps[i - 1]:g}); give increasing shares of the dense model's parameters"
                )
        if len(steps) > 1 and not any(VARIANTS[v].prune and VARIANTS[v].recovery for v in self.variants):
            raise ConfigError(
                f"prune_schedule = {steps}: no variant of variants ({', '.join(self.variants)}) prunes and recovers, "
                "and iterative pruning recovers between its steps; add one (e.g. pruned_kd) or drop the schedule"
            )
        if steps and not math.isclose(steps[-1], self.prune.ratio, abs_tol=1e-9):
            raise ConfigError(
                f"prune_schedule = {steps}: its last step reaches {steps[-1]:g}, not the target prune.ratio = "
                f"{self.prune.ratio:g}; end the schedule at the target (e.g. [{self.prune.ratio / 2:g}, "
                f"{self.prune.ratio:g}])"
            )
        sample = self.curate.pool_sample
        curated_calibration = bool(self.sweep_ratios) or any(VARIANTS[v].prune == "data" for v in self.variants)
        for key, want, reads in (
            ("recover.recover_top_m", self.recover.recover_top_m, kd),
            ("prune.calib_top_m", self.prune.calib_top_m, curated_calibration),
        ):
            if reads and sample and want > sample:
                raise ConfigError(
                    f"{key} = {want}: more records than the {sample} that curate.pool_sample draws from the pool "
                    f"for the curation to rank; ask for at most {sample}, or raise curate.pool_sample"
                )
        for i, task in enumerate(self.eval.off_domain):
            if task not in self.eval.tasks:
                raise ConfigError(
                    f"eval.off_domain[{i}] = {quote(task)}: not one of eval.tasks ({', '.join(self.eval.tasks)})"
                )
        for section, fields in PIPELINE_SETS.items():
            cfg = getattr(self, section)
            default = type(cfg)()
            for name, instead in fields.items():
                if section == "curate" and name == "method" and cfg.method in FINESCOPE_METHODS:
                    continue  # the method of the variants whose data is "sae" (Planner.curate)
                if getattr(cfg, name) != getattr(default, name):
                    raise ConfigError(
                        f"{section}.{name}: set by the pipeline for every variant, not in a pipeline "
                        f"config; use {instead}"
                    )


# ================================================================================================ introspection


def field_docs(cls: type) -> dict[str, str]:
    """Field name → the docstring written under it in the class body (base classes included)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


# ================================================================================================ coercion


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


class ConfigRules:
    """`typed_data.decode`'s rules for configs: values people typed are coerced to the field's type and checked
    (choices, ranges); every error is a `ConfigError` naming the file and the dotted field."""

    def __init__(self, strict: bool, origins: dict[str, str] | None = None, prefix: str = "") -> None:
        self.strict = strict
        self.origins = origins or {}
        self.prefix = prefix

    def at(self, where: str) -> str:
        """`where` naming the file that set the key: a key an `extends:` base brought in is that base's error, not
        the extending file's (`origins`: dotted key → file, `prefix`: the extending file's "path: ")."""
        if not self.origins or not where.startswith(self.prefix):
            return where
        key = where[len(self.prefix) :]
        parts = re.sub(r"\[\d+\]", "", key).split(".")
        for n in range(len(parts), 0, -1):
            origin = self.origins.get(".".join(parts[:n]))
            if origin is not None:
                return f"{origin}: {key}"
        return where

    def is_none(self, value: Any, spec: Spec) -> bool:
        return value is None or (isinstance(value, str) and spec.optional and value.strip().lower() in ("none", "null"))

    def empty(self, where: str, spec: Spec) -> Any:
        raise ConfigError(f"{self.at(where)} must not be empty")

    def not_a(self, want: str, where: str, spec: Spec, value: Any) -> Exception:
        where = self.at(where)
        if want == "mapping":
            return ConfigError(f"{where} must be a mapping of {spec.base.__name__} fields, got {quote(value)}")
        if want == "list":
            return ConfigError(f"{where} must be a list (or comma-separated), got {quote(value)}")
        return ConfigError(f"{where} must be a mapping, got {quote(value)}")

    def as_list(self, value: Any) -> Any:
        return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value

    def scalar(self, value: Any, spec: Spec, where: str) -> Any:
        base = spec.base
        where = self.at(where)
        out: Any
        try:
            if base is bool:
                if isinstance(value, bool):
                    out = value
                elif isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
                    out = value.strip().lower() in _TRUE
                else:
                    raise ValueError
            elif base is int:
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError
                out = int(value) if not isinstance(value, str) else int(value.strip())
            elif base is float:
                if isinstance(value, bool):
                    raise ValueError
                out = float(value)
            elif base is str:
                if isinstance(value, (dict, list)):
                    raise ValueError
                out = str(value)
            else:
                out = value
        except (TypeError, ValueError):
            raise ConfigError(f"{where} = {quote(value)}: must be {_type_name(spec)}") from None
        if spec.choices is not None and out not in spec.choices:
            raise ConfigError(f"{where} = {quote(out)}: must be one of {', '.join(map(str, spec.choices))}")
        if spec.range is not None and not spec.range.contains(out):
            raise ConfigError(f"{where} = {quote(out)}: must be {spec.range.describe()}")
        return out

    def unknown(self, cls: type, keys: list[str], where: str) -> None:
        names = [f.name for f in typed_data.fields(cls)]
        for key in keys:
            key = key[:QUOTE_LIMIT]
            msg = f"{self.at(join(where, key))}: unknown config key{_suggest(key, names)}"
            if self.strict:
                raise ConfigError(msg)
            warnings.warn(msg + " (ignored)", stacklevel=4)

    def missing(self, cls: type, name: str, where: str) -> Exception:  # every config field has a default
        return ConfigError(f"{join(where, name)} must be given")

    def built(self, cfg: Any, where: str) -> Any:
        check = getattr(cfg, "check", None)
        if callable(check):
            try:
                check()
            except ConfigError as e:
                raise ConfigError(f"{where}{e}" if where.endswith(": ") else str(e)) from None
        return cfg


def _type_name(spec: Spec) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list"}
    return names.get(spec.base, getattr(spec.base, "__name__", str(spec.base)))


# ================================================================================================ dicts, YAML, overrides


def from_dict(
    cls: type, data: dict, *, where: str = "", strict: bool = False, origins: dict[str, str] | None = None
) -> Any:
    """Build and validate a config of type `cls` from a (possibly partial) mapping; missing keys keep defaults.

    Unknown keys warn (or raise when `strict`). `where` prefixes messages, e.g. "configs/x.yaml: curate";
    `origins` (dotted key → file, from `read_config_origins`) names the `extends:` base a key came from instead.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__} must be a mapping, got {type(data).__name__}")
    return typed_data.decode_fields(cls, data, where, ConfigRules(strict, origins, where))


def _suggest(key: str, names: list[str]) -> str:
    close = difflib.get_close_matches(key, names, n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(names)})"


def to_dict(cfg: Any) -> dict:
    """The config as plain data (YAML/JSON), keys in field order."""
    return typed_data.encode(cfg)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def apply_overrides(cfg: Any, overrides: list[str], *, where: str = "command line") -> Any:
    """Return a copy of `cfg` with dotted `key=value` overrides applied (e.g. `curate.top_m=200`)."""
    data = to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{where}: override {quote(item)} must look like key=value (e.g. curate.top_m=200)")
        key, value = item.split("=", 1)
        node, cls, parts = data, type(cfg), key.strip().split(".")
        for depth, part in enumerate(parts):
            names = [f.name for f in typed_data.fields(cls)]
            if part not in names:
                dotted = ".".join(parts[:depth])
                raise ConfigError(
                    f"{where}: unknown config key {quote(key.strip())}{_suggest(part, names)}"
                    + (f" under {dotted!r}" if dotted else "")
                )
            if depth == len(parts) - 1:
                node[part] = value
            else:
                sub = typed_data.specs(cls)[part].dataclass
                if sub is None:
                    raise ConfigError(f"{where}: {'.'.join(parts[: depth + 1])!r} has no sub-keys")
                node, cls = node[part], sub
    return from_dict(type(cfg), data, where=f"{where}: ", strict=True)


# A real config has a few hundred values; a YAML alias bomb ("billion laughs") expands to billions.
MAX_CONFIG_VALUES = 100_000
MAX_CONFIG_BYTES = 4 * 2**20


def _read_yaml(path: Path) -> Any:
    try:
        if path.is_dir():
            raise ConfigError(f"{path}: is a folder, not a YAML config file")
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"{path}: {path.stat().st_size:,} bytes is not a config file (limit {MAX_CONFIG_BYTES // 2**20} MiB)"
            )
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); save the config as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file: {e.strerror}") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid YAML: nested too deeply") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(
            f"{path}:{line} invalid YAML: {getattr(e, 'problem', None) or str(e).splitlines()[0]}"
        ) from None
    if count_values(data, MAX_CONFIG_VALUES) >= MAX_CONFIG_VALUES:
        raise ConfigError(f"{path}: expands to more than {MAX_CONFIG_VALUES:,} values (YAML aliases?); not a config")
    return data


def preset_dir() -> Path:
    """The packaged presets (`--config default`, `quick`, …): src/finescope/configs/<name>.yaml."""
    return Path(__file__).resolve().parent / "configs"


EXTENDS = "extends"
MAX_EXTENDS_DEPTH = 8


def _merged(base: dict, over: dict) -> dict:
    """`over` on top of `base`: sections (mappings) merge key by key, every other value (lists too) replaces."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _extended_base(path: Path, spec: Any) -> Path:
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(
            f"{path}: {EXTENDS} = {quote(spec)}: must name a packaged preset ({', '.join(preset_names())}) or a YAML file"
        )
    spec = spec.strip()
    if spec.endswith((".yaml", ".yml")) or "/" in spec:
        base = Path(spec).expanduser()
        return base if base.is_absolute() else path.parent / base
    base = preset_dir() / f"{spec}.yaml"
    if not base.is_file():
        raise ConfigError(f"{path}: {EXTENDS} = {quote(spec)}: no such preset; presets: {', '.join(preset_names())}")
    return base


def preset_names() -> list[str]:
    """The packaged presets, by name (default, quick, quality, …)."""
    return sorted(p.stem for p in preset_dir().glob("*.yaml"))


def read_config_file(path: Path) -> Any:
    """A config file's mapping, with `extends: <preset or file>` resolved: the named config first (itself possibly
    extending another), this file's keys on top (sections merge key by key; lists and values replace)."""
    return read_config_origins(path)[0]


def _origins(data: dict, source: str, prefix: str = "") -> dict[str, str]:
    """Dotted key → `source` for every key and section of one file's mapping."""
    out: dict[str, str] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        out[dotted] = source
        if isinstance(value, dict):
            out.update(_origins(value, source, f"{dotted}."))
    return out


def read_config_origins(path: Path, chain: tuple[Path, ...] = ()) -> tuple[Any, dict[str, str]]:
    """`read_config_file`'s mapping and, for each dotted key an `extends:` base set and no file above it replaced,
    that base's path (a key of `path` itself is absent: errors name `path` already)."""
    data = _read_yaml(path)
    if not isinstance(data, dict) or EXTENDS not in data:
        return data, {}
    data = dict(data)
    base = _extended_base(path, data.pop(EXTENDS))
    here = (*chain, path.resolve())
    if base.resolve() in here:
        loop = " → ".join(str(p) for p in (*here, base.resolve()))
        raise ConfigError(f"{path}: {EXTENDS}: a loop ({loop})")
    if len(here) > MAX_EXTENDS_DEPTH:
        raise ConfigError(f"{path}: {EXTENDS}: more than {MAX_EXTENDS_DEPTH} configs deep")
    inherited, origins = read_config_origins(base, here)
    if not isinstance(inherited, dict):
        raise ConfigError(f"{base}: not a mapping of config keys (extended by {path})")
    origins = {**_origins(inherited, str(base)), **origins}
    for key in _origins(data, str(path)):
        origins.pop(key, None)
    return _merged(inherited, data), origins


def load_config(cls: type, path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Any:
    """Defaults ← YAML file (if given; `extends:` another first) ← dotted overrides; validated, with the file named
    in every error."""
    cfg = cls()
    if path is not None:
        path = Path(path)
        data, origins = read_config_origins(path)
        cfg = from_dict(cls, data, where=f"{path}: ", origins=origins)
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    return cfg


# ================================================================================================ argparse


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One `--flag` per field of a flat stage config, with the field docstring as help text."""
    docs = field_docs(cls)
    for f in typed_data.fields(cls):
        spec = typed_data.specs(cls)[f.name]
        if spec.dataclass is not None:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        else:
            assert f.default_factory is not dataclasses.MISSING, f"{cls.__name__}.{f.name} has no default"
            default = f.default_factory()
        help_text = docs.get(f.name, "")
        if spec.choices:
            help_text += f" Choices: {', '.join(map(str, spec.choices))}."
        elif spec.range is not None:
            help_text += f" Must be {spec.range.describe()}."
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        help_text += f" [default: {shown}]"
        help_text = help_text.replace("%", "%%")  # argparse %-formats help strings
        if spec.base is bool and f.name.startswith("no_"):
            # A negated field (`no_teacher`) is a plain switch: BooleanOptionalAction would read `--no-teacher` as
            # the negation of a `--teacher` flag and set the field to False.
            parser.add_argument(
                _flag(f.name), dest=f.name, action="store_const", const=True, default=None, help=help_text
            )
        elif spec.base is bool:
            parser.add_argument(
                _flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            parser.add_argument(_flag(f.name), dest=f.name, default=None, metavar=f.name.upper(), help=help_text)


def config_from_args(cls: type, args: argparse.Namespace, base: Any | None = None) -> Any:
    """The config `base` (or defaults) with every flag the user gave applied, validated."""
    data = to_dict(base if base is not None else cls())
    given = {f.name: getattr(args, f.name) for f in typed_data.fields(cls) if getattr(args, f.name, None) is not None}
    data.update(given)
    return from_dict(cls, data, where="", strict=True)
