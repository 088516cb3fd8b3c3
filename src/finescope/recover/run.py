"""The recover stage: teacher rewrite → filters → fine-tuning of the pruned student (LoRA or full, optionally
with logit distillation from the teacher) → merge → save.

    finescope recover --student runs/demo/prune/model --data runs/demo/curate/selected.jsonl \\
        --out runs/demo/recover --max-new-tokens 128 --batch-size 16 --lr 2e-4 --epochs 2 --kd-weight 0.5

Writes `distilled.jsonl` (original and rewrite, the text used and why), `adapter/` (peft; LoRA only), `model/`
(merged, stock-loadable), `metrics.json` (data by source, rewrite statistics, filter counts, KD settings, loss
curves, wall times) and `DONE`. An interrupted rewrite resumes from `rewrites.partial.jsonl`; prompts another
stage asked the same teacher under the same settings are read back (`answer_cache`). `--no-teacher` is
plain SFT on the originals; `--no-rewrite --kd-weight 1` distils the teacher's logits on the originals.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import shutil
import time
import warnings
from pathlib import Path

import torch

from .. import FinescopeError, distributed, stage_protocol, tokens, vllm_backend
from ..artifacts import (
    FilterStats,
    KdStats,
    OnPolicyStats,
    RecoverMetrics,
    RecoveryData,
    RewriteStats,
    TeacherRewriteStats,
    TrainHistory,
)
from ..config import RecoverConfig
from ..data import read_records
from ..modeling import ModelError, ModelHandle, load, resolve_model_path
from ..storage import CONFIG, check_stage_folder, read_json, write_jsonl_atomic
from . import answer_cache, kd_cache
from .distill import check_hidden_fit
from .filters import REASONS, apply_filters
from .finetune import Example, TrainSettings, build_examples, mean_loss, prompt_fills, save_trained, split_records
from .loss_terms import KdSettings
from .on_policy import OnPolicy
from .rewrite import rank_partials, rewrite_records
from .sources import training_records
from .trainer import check_launch_engine, fine_tune

PARTIAL = "rewrites.partial.jsonl"
CHECKPOINTS = "checkpoints"  # Trainer checkpoints of an unfinished fine-tuning (removed when the stage is done)


class RecoverError(FinescopeError):
    """The recover stage's inputs cannot be used together."""


def default_teacher(student: str) -> str:
    """The model the student was pruned from: `model` in the config.json of the prune stage folder above it."""
    cfg_file = Path(student).expanduser().resolve().parent / CONFIG
    try:
        model = read_json(cfg_file)["config"]["model"]
    except (OSError, ValueError, KeyError, TypeError):
        model = None
    if not isinstance(model, str) or not model:
        raise RecoverError(
            f"{student}: cannot tell which model it was pruned from (no prune config.json beside "
            "it); pass --teacher MODEL, or --no-teacher for plain SFT"
        )
    return model


def check_same_tokenizer(student_tok, teacher_tok, student: str, teacher: str) -> None:
    """Rewrites are trained in the student's vocabulary: refuse a teacher that tokenizes differently."""
    same = (
        student_tok.get_vocab() == teacher_tok.get_vocab()
        and student_tok.eos_token == teacher_tok.eos_token
        and (student_tok.chat_template or None) == (teacher_tok.chat_template or None)
    )
    if not same:
        raise RecoverError(
            f"teacher {teacher} and student {student} have different tokenizers (vocabulary, EOS or "
            "chat template); the teacher must share the student's tokenizer"
        )


def check_same_vocabulary(student_model, teacher_model, student: str, teacher: str) -> None:
    """Logit distillation compares the two output layers token by token: their sizes must match."""
    ns = student_model.get_output_embeddings().weight.shape[0]
    nt = teacher_model.get_output_embeddings().weight.shape[0]
    if ns != nt:
        raise RecoverError(
            f"teacher {teacher} has {nt} output logits and student {student} {ns}: logit distillation "
            "(--kd-weight > 0) needs the same vocabulary"
        )


def _free(*objs) -> None:
    del objs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _check_settings(cfg: RecoverConfig) -> None:
    if not cfg.student:
        raise RecoverError("--student is required: the pruned model folder to fine-tune")
    if not cfg.data:
        raise RecoverError("--data is required: the curated records (e.g. curate/selected.jsonl)")
    if cfg.no_teacher and cfg.kd_weight > 0:
        raise RecoverError(
            "--no-teacher with --kd-weight > 0: logit distillation needs the teacher; use --no-rewrite to "
            "distil without teacher rewrites"
        )
    if cfg.no_teacher and cfg.hidden_weight > 0:
        raise RecoverError(
            "--no-teacher with --hidden-weight > 0: hidden-state distillation needs the teacher; use --no-rewrite "
            "to distil without teacher rewrites"
        )
    if cfg.on_policy > 0 and cfg.kd_weight == 0:
        raise RecoverError(
            f"--on-policy {cfg.on_policy}: the student's own answers are trained on the KD term alone, and "
            "--kd-weight is 0; set --kd-weight > 0 (or --on-policy 0)"
        )
    if cfg.generation_backend == "vllm":
        vllm_backend.check_available()
    check_launch_engine()
    _check_training_device(cfg.device)
    if cfg.device == "auto":
        raise RecoverError(
            "--device auto: the student trains, so its weights stay on one device; use cuda, cuda:N or cpu "
            "(several GPUs: several processes, README → Scaling out)"
        )
    if cfg.kd_cache not in ("auto", "off") and Path(cfg.kd_cache).expanduser().exists():
        if not Path(cfg.kd_cache).expanduser().is_dir():
            raise RecoverError(f"--kd-cache {cfg.kd_cache}: not a folder (give a folder, 'auto' or 'off')")


def _check_training_device(device: str | None) -> None:
    """transformers.Trainer trains on cuda:0 in one process (the first visible GPU) and on cuda:LOCAL_RANK under
    several ranks, whatever the model was loaded on: an explicit GPU index elsewhere is refused before any work."""
    try:
        dev = torch.device(device) if device not in (None, "auto") else None
    except (RuntimeError, TypeError, ValueError):
        return  # not a device name: `load` says so in one line
    if dev is None or dev.type != "cuda" or dev.index is None:
        return
    if distributed.launched_world() > 1:
        raise RecoverError(
            f"--device {device}: under several ranks each rank trains on its own GPU (LOCAL_RANK); leave --device "
            "unset or give cuda"
        )
    if dev.index != 0:
        raise RecoverError(
            f"--device {device}: the fine-tuning (transformers.Trainer) runs on the first visible GPU; to use GPU "
            f"{dev.index}, run with CUDA_VISIBLE_DEVICES={dev.index} and --device cuda"
        )


def run(cfg: RecoverConfig, out: Path) -> Path:
    """Run the stage into the folder `out`; returns it (skips when it is already done with this config)."""
    _check_settings(cfg)
    if stage_protocol.is_done(out, cfg):
        return Path(out)
    check_stage_folder(out, cfg, overwrite=cfg.overwrite)
    t0 = time.perf_counter()
    records = read_records(cfg.data, skip_bad_rows=cfg.skip_bad_rows)
    if not Path(cfg.student).expanduser().is_dir():
        raise ModelError(f"{cfg.student}: student must be a model folder (the prune stage's model/)")
    resolve_model_path(cfg.student)  # "not a model folder" before any work
    rows, data_stats = training_records(cfg, list(records))
    n_instr = sum("instruction" in r for r in rows)
    rewrites = not (cfg.no_teacher or cfg.no_rewrite) and n_instr > 0
    distil = KdSettings.from_config(cfg).needs_teacher
    teacher_spec = (cfg.teacher or default_teacher(cfg.student)) if rewrites or distil else None
    if teacher_spec is not None:
        resolve_model_path(teacher_spec)  # a missing teacher is refused before the folder is opened

    student = distributed.main_first(
        lambda: load(cfg.student, dtype=cfg.dtype, device=cfg.device), f"loading {cfg.student}"
    )
    tok = student.tokenizer
    # Fail on an impossible max_length before spending minutes on the teacher (and before the folder is opened).
    build_examples(tok, rows[:1], cfg.max_length)
    with stage_protocol.locked_on_rank0(out, cfg) as stage:  # rank 0 writes; the others write their rewrite shards
        if stage is None:
            return Path(out)
        _recover_into(stage, cfg, records.skipped, rows, data_stats, student, teacher_spec, rewrites, t0)
        return stage


def _recover_into(
    stage: Path,
    cfg: RecoverConfig,
    skipped: int,
    records: list[dict],
    data_stats: RecoveryData,
    student: ModelHandle,
    teacher_spec: str | None,
    rewrite: bool,
    t0: float,
) -> None:
    """Rewrite, filter, fine-tune, merge and save into the (locked) stage folder; DONE last.

    Several ranks: the teacher rewrites are split over them and every rank gets them all back; each rank filters
    and tokenizes the same rows, the KD cache is built on rank 0 and read by the others, and the fine-tuning is
    data-parallel (`transformers.Trainer`, DDP). Rank 0 writes distilled.jsonl, merges, saves and marks DONE."""
    times: dict[str, float] = {}
    ranks = distributed.ranks()
    teacher = (
        distributed.main_first(lambda: _load_teacher(cfg, student, teacher_spec), f"loading teacher {teacher_spec}")
        if teacher_spec is not None
        else None
    )
    if rewrite and teacher is not None and cfg.generation_backend == "vllm":
        teacher.generator = vllm_backend.VllmEngine(resolve_model_path(teacher.source), dtype=cfg.dtype, seed=cfg.seed)
    # the teacher answers only records the student can train on: a prompt that fills max_length is dropped anyway
    long_prompts = frozenset(
        r["id"]
        for r in records
        if rewrite and "instruction" in r and prompt_fills(student.tokenizer, r, cfg.max_length)
    )
    rewrite_stats, rewrites = _rewrite(stage, cfg, records, teacher if rewrite else None, times, long_prompts)
    if teacher is not None and teacher.generator is not None:
        teacher.generator.close()  # its GPU memory goes back before the student trains
        teacher.generator = None
    rows, filter_stats = _filter(stage if ranks.is_main else None, cfg, records, rewrites, long_prompts)
    train_ex, eval_ex, too_long = _examples(student.tokenizer, cfg, rows)
    kd_stats, online = _kd_targets(cfg, teacher, train_ex, tokens.pad_id(student.tokenizer), times)
    policy = _on_policy(cfg, student, teacher, cached=online is None)
    # the last reference unless KD runs online or on-policy: the teacher's memory is free before the student trains
    teacher = None
    _free()
    trained, history = _finetune(stage, cfg, train_ex, eval_ex, student, online, times, policy)
    online = None
    if policy is not None and kd_stats is not None:
        kd_stats.on_policy = _on_policy_stats(cfg, policy)
    policy = None

    def save() -> dict:
        train = _save(stage, cfg, trained, eval_ex, student, history, times)
        for leftover in [stage / PARTIAL, *rank_partials(stage / PARTIAL)]:
            if leftover.exists():
                os.unlink(leftover)  # distilled.jsonl now holds every rewrite
        shutil.rmtree(stage / CHECKPOINTS, ignore_errors=True)
        times["total"] = round(time.perf_counter() - t0, 2)
        metrics = RecoverMetrics(
            records=len(records),
            skipped_rows=skipped,
            mode="sft" if rewrites is None else "tgd",
            rewrite=rewrite_stats,
            filters=filter_stats,
            too_long_skipped=too_long,
            train=train,
            seconds=times,
            adapter=cfg.adapter,
            kd=kd_stats,
            data=data_stats,
        )
        return metrics.to_json()

    stage_protocol.finish_on_rank0(stage, cfg, save, "saving the recovered model on rank 0")


def _load_teacher(cfg: RecoverConfig, student: ModelHandle, spec: str) -> ModelHandle:
    teacher = load(spec, dtype=cfg.dtype, device=cfg.device)
    check_same_tokenizer(student.tokenizer, teacher.tokenizer, cfg.student, spec)
    if cfg.kd_weight > 0:
        check_same_vocabulary(student.model, teacher.model, cfg.student, spec)
    if cfg.hidden_weight > 0:
        check_hidden_fit(student.model.config, teacher.model.config, tuple(cfg.hidden_layers), cfg.student, spec)
    return teacher


def _rewrite(
    stage: Path,
    cfg: RecoverConfig,
    records: list[dict],
    teacher: ModelHandle | None,
    times: dict[str, float],
    long_prompts: frozenset[str] = frozenset(),
) -> tuple[RewriteStats, dict | None]:
    """The teacher's rewrites of the instruction records (resuming a partial file), or None without rewrites;
    records in `long_prompts` (their prompt fills max_length) are not sent to the teacher."""
    n_instr = sum("instruction" in r for r in records)
    if teacher is None:
        return RewriteStats(instruction_records=n_instr, text_records=len(records) - n_instr), None
    t = time.perf_counter()
    param = next(teacher.model.parameters())
    cache = answer_cache.AnswerCache.for_teacher(
        teacher.source,
        dtype=str(param.dtype),
        device=param.device.type,
        backend=cfg.generation_backend,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        seed=cfg.seed,
    )
    known = distributed.on_main(cache.read, "reading the teacher's cached answers")
    rewrites, stats = rewrite_records(
        teacher.generator or teacher.model,
        teacher.tokenizer,
        [r for r in records if r["id"] not in long_prompts],
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.rewrite_batch_size,
        temperature=cfg.temperature,
        seed=cfg.seed,
        partial_path=stage / PARTIAL,
        sharded=True,
        prompt=cfg.rewrite_prompt,
        known=known,
    )
    if stats["generated"] or stats["resumed"]:  # answers the cache does not hold yet
        distributed.on_main(lambda: cache.add(rewrites.values()), "caching the teacher's answers")
    times["rewrite"] = round(time.perf_counter() - t, 2)
    stats.pop("instruction_records")
    return RewriteStats(
        instruction_records=n_instr,
        text_records=len(records) - n_instr,
        teacher_run=TeacherRewriteStats(**stats, prompt_too_long=len(long_prompts), teacher=teacher.source),
    ), rewrites


def _filter(
    stage: Path | None,
    cfg: RecoverConfig,
    records,
    rewrites: dict | None,
    long_prompts: frozenset[str] = frozenset(),
) -> tuple[list[dict], FilterStats]:
    """Keep or reject each rewrite (falling back to the original response); write distilled.jsonl (into `stage`,
    None on the ranks that do not write)."""
    # own answers are distilled as the teacher gives them; only a rewrite of a reference answer is checked against it
    check = cfg.answer_check and cfg.rewrite_prompt == "reference"
    rows, counts = apply_filters(records, rewrites, answer_check=check, not_rewritten=long_prompts)
    if stage is not None:
        write_jsonl_atomic(stage / "distilled.jsonl", rows)
    judged = sum(counts.get(r, 0) for r in REASONS)
    rate = round(counts.get("accepted", 0) / judged, 4) if rewrites is not None and judged else None
    return rows, FilterStats(counts=counts, acceptance_rate=rate)


def _examples(tok, cfg: RecoverConfig, rows: list[dict]) -> tuple[list[Example], list[Example], int]:
    """Seeded train / held-out split, tokenized; and how many examples were too long to keep."""
    train_recs, eval_recs = split_records(rows, cfg.eval_fraction, cfg.seed)
    train_ex, too_long = build_examples(tok, train_recs, cfg.max_length)
    eval_ex, eval_too_long = build_examples(tok, eval_recs, cfg.max_length)
    return train_ex, eval_ex, len(too_long) + len(eval_too_long)


def _vocab_size(model) -> int | None:
    """Rows of the model's output layer (its vocabulary), None when it has no single one."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    return int(weight.shape[0]) if weight is not None else None


def _kd_targets(
    cfg: RecoverConfig, teacher: ModelHandle | None, train_ex: list[Example], pad_id: int, times: dict[str, float]
) -> tuple[KdStats | None, object | None]:
    """Attach the teacher's cached top-k targets to the training examples (built or read back), or hand back the
    teacher model to run online; the KD statistics. Nothing without KD."""
    s = KdSettings.from_config(cfg)
    if not s.needs_teacher or teacher is None:
        return None, None
    vocab = _vocab_size(teacher.model)
    if vocab and s.top_k is not None and s.top_k > vocab:
        warnings.warn(
            f"--kd-top-k {s.top_k} is more than the teacher's vocabulary ({vocab} tokens): capped at {vocab} (the "
            "whole distribution)",
            stacklevel=2,
        )
        s = dataclasses.replace(s, top_k=vocab)
    if cfg.kd_scope == "all":
        for ex in train_ex:
            ex.kd_labels = list(ex.input_ids)
    stats = KdStats(
        weight=s.weight, temperature=s.temperature, loss=s.loss, scope=cfg.kd_scope, targets="online", top_k=None,
        cache=None, cache_hit=None, seconds=0.0,
    )  # fmt: skip
    if s.hidden_weight > 0:
        stats.hidden_weight, stats.hidden_loss = s.hidden_weight, s.hidden_loss
        stats.hidden_layers = list(s.hidden_layers)
    if cfg.kd_cache == "off" or s.needs_online_teacher:  # hidden states are the batch's own: the teacher runs online
        return stats, teacher.model
    t = time.perf_counter()
    key = kd_cache.cache_key(teacher.source, train_ex, s)
    path = kd_cache.cache_path(cfg.kd_cache, key)
    parts, hit = distributed.main_first(  # rank 0 builds the cache, the other ranks read it
        lambda: kd_cache.load_or_build(
            path, key, lambda: kd_cache.teacher_top_k(teacher.model, train_ex, s, cfg.micro_batch_size, pad_id)
        ),
        "building the KD cache",
    )
    for ex, part in zip(train_ex, parts):
        ex.teacher = part
    times["kd_targets"] = round(time.perf_counter() - t, 2)
    stats.targets, stats.top_k, stats.cache, stats.cache_hit = "top-k cache", s.top_k, str(path), hit
    stats.seconds = 0.0 if hit else times["kd_targets"]
    return stats, None


def _on_policy(
    cfg: RecoverConfig, student: ModelHandle, teacher: ModelHandle | None, *, cached: bool
) -> OnPolicy | None:
    """The on-policy answerer (`on_policy.py`) when --on-policy > 0: it holds the teacher for the top-k of the
    student's answers when the other KD targets are cached (`cached`); with the online teacher the loss reads it."""
    if cfg.on_policy <= 0 or teacher is None:
        return None
    s = KdSettings.from_config(cfg)
    vocab = _vocab_size(teacher.model)
    if vocab and s.top_k > vocab:
        s = dataclasses.replace(s, top_k=vocab)
    return OnPolicy(
        student.model, student.tokenizer, teacher.model if cached else None, s, share=cfg.on_policy,
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.on_policy_temperature, max_length=cfg.max_length,
        scope=cfg.kd_scope, seed=cfg.seed,
    )  # fmt: skip


def _on_policy_stats(cfg: RecoverConfig, policy: OnPolicy) -> OnPolicyStats:
    """This rank's on-policy answers (rank 0's under several ranks: each rank answers its own share)."""
    n = policy.stats["examples"]
    return OnPolicyStats(
        share=cfg.on_policy,
        temperature=cfg.on_policy_temperature,
        answers=int(n),
        mean_tokens=round(policy.stats["tokens"] / n, 2) if n else 0.0,
        ended=round(policy.stats["ended"] / n, 4) if n else 0.0,
        seconds=round(policy.stats["seconds"], 2),
    )


def _finetune(
    stage: Path,
    cfg: RecoverConfig,
    train_ex: list[Example],
    eval_ex: list[Example],
    student: ModelHandle,
    online_teacher,
    times: dict[str, float],
    policy: OnPolicy | None = None,
):
    """Fine-tune the student (LoRA or full) on every rank; the trained model and the raw history."""
    t = time.perf_counter()
    settings = TrainSettings.from_config(cfg, checkpoint_dir=stage / CHECKPOINTS)
    pad_id = tokens.pad_id(student.tokenizer)
    trained, history = fine_tune(
        student.model, train_ex, eval_ex, settings, pad_id=pad_id, online_teacher=online_teacher, on_policy=policy
    )
    times["finetune"] = round(time.perf_counter() - t, 2)
    return trained, history


def _save(
    stage: Path,
    cfg: RecoverConfig,
    trained,
    eval_ex: list[Example],
    student: ModelHandle,
    raw_history: dict,
    times: dict[str, float],
) -> TrainHistory:
    """Save the adapter (LoRA) and the merged model; the training history with the merged model's held-out loss."""
    t = time.perf_counter()
    adapter = stage / "adapter" if cfg.adapter == "lora" else None
    merged = save_trained(trained, student.tokenizer, adapter, stage / "model")
    times["save"] = round(time.perf_counter() - t, 2)
    raw_history["eval_loss_merged"] = mean_loss(
        merged, eval_ex, tokens.pad_id(student.tokenizer), raw_history["micro_batch_size"]
    )
    return TrainHistory.from_json(raw_history, source="fine-tuning history", strict=True)
