"""The recover stage: teacher rewrite → filters → LoRA fine-tuning of the pruned student → merge → save.

    finescope recover --student runs/demo/prune/model --data runs/demo/curate/selected.jsonl \\
        --out runs/demo/recover --max-new-tokens 128 --batch-size 16 --lr 2e-4 --epochs 2

Writes `distilled.jsonl` (original and rewrite, the text used and why), `adapter/` (peft), `model/` (merged,
stock-loadable), `metrics.json` (rewrite statistics, filter counts, loss curves, wall times) and `DONE`.
An interrupted rewrite resumes from `rewrites.partial.jsonl`. `--no-teacher` is plain SFT on the originals.
"""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path

import torch

from .. import FinescopeError, tokens
from ..artifacts import FilterStats, RecoverMetrics, RewriteStats, TeacherRewriteStats, TrainHistory
from ..config import RecoverConfig
from ..data import read_records
from ..modeling import ModelError, load, resolve_model_path
from ..storage import CONFIG, check_stage_folder, is_done, mark_done, read_json, stage_folder, write_jsonl_atomic
from .filters import REASONS, apply_filters
from .finetune import LoraSettings, build_examples, mean_loss, save_adapter_and_merged, split_records, train_lora
from .rewrite import rewrite_records

PARTIAL = "rewrites.partial.jsonl"


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


def _free(*objs) -> None:
    del objs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run(cfg: RecoverConfig, out: Path) -> Path:
    """Run the stage into the folder `out`; returns it (skips when it is already done with this config)."""
    if not cfg.student:
        raise RecoverError("--student is required: the pruned model folder to fine-tune")
    if not cfg.data:
        raise RecoverError("--data is required: the curated records (e.g. curate/selected.jsonl)")
    if is_done(out, cfg):
        return Path(out)
    check_stage_folder(out, cfg, overwrite=cfg.overwrite)
    t0 = time.perf_counter()
    records = read_records(cfg.data, skip_bad_rows=cfg.skip_bad_rows)
    n_instr = sum("instruction" in r for r in records)
    if not Path(cfg.student).expanduser().is_dir():
        raise ModelError(f"{cfg.student}: student must be a model folder (the prune stage's model/)")
    resolve_model_path(cfg.student)  # "not a model folder" before any work
    teacher_spec = None if cfg.no_teacher or n_instr == 0 else (cfg.teacher or default_teacher(cfg.student))
    if teacher_spec is not None:
        resolve_model_path(teacher_spec)  # a missing teacher is refused before the folder is opened

    student = load(cfg.student)
    tok = student.tokenizer
    # Fail on an impossible max_length before spending minutes on the teacher (and before the folder is opened).
    build_examples(tok, records[:1], cfg.max_length)
    with stage_folder(out, cfg, overwrite=cfg.overwrite) as stage:
        if stage is None:
            return Path(out)
        return _recover_into(stage, cfg, records, student, teacher_spec, t0)


def _recover_into(stage: Path, cfg: RecoverConfig, records, student, teacher_spec: str | None, t0: float) -> Path:
    """Rewrite, filter, fine-tune, merge and save into the (locked) stage folder; DONE last."""
    times: dict[str, float] = {}
    rewrite_stats, rewrites = _rewrite(stage, cfg, records, student.tokenizer, teacher_spec, times)
    rows, filter_stats = _filter(stage, cfg, records, rewrites)
    history, too_long = _finetune_and_save(stage, cfg, rows, student, times)
    if (stage / PARTIAL).exists():
        os.unlink(stage / PARTIAL)  # distilled.jsonl now holds every rewrite
    times["total"] = round(time.perf_counter() - t0, 2)
    metrics = RecoverMetrics(
        records=len(records),
        skipped_rows=records.skipped,
        mode="sft" if rewrites is None else "tgd",
        rewrite=rewrite_stats,
        filters=filter_stats,
        too_long_skipped=too_long,
        train=history,
        seconds=times,
    )
    mark_done(stage, cfg, metrics.to_json())
    return stage


def _rewrite(
    stage: Path, cfg: RecoverConfig, records, tok, teacher_spec: str | None, times: dict[str, float]
) -> tuple[RewriteStats, dict | None]:
    """The teacher's rewrites of the instruction records (resuming a partial file), or None without a teacher."""
    n_instr = sum("instruction" in r for r in records)
    if teacher_spec is None:
        return RewriteStats(instruction_records=n_instr, text_records=len(records) - n_instr), None
    t = time.perf_counter()
    teacher = load(teacher_spec)
    check_same_tokenizer(tok, teacher.tokenizer, cfg.student, teacher_spec)
    rewrites, stats = rewrite_records(
        teacher.model,
        teacher.tokenizer,
        records,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.rewrite_batch_size,
        temperature=cfg.temperature,
        seed=cfg.seed,
        partial_path=stage / PARTIAL,
    )
    source = teacher.source
    del teacher  # the last reference: the teacher's memory is free before the student trains
    _free()
    times["rewrite"] = round(time.perf_counter() - t, 2)
    instruction_records = stats.pop("instruction_records")
    return RewriteStats(
        instruction_records=instruction_records,
        text_records=len(records) - n_instr,
        teacher_run=TeacherRewriteStats(**stats, teacher=source),
    ), rewrites


def _filter(stage: Path, cfg: RecoverConfig, records, rewrites: dict | None) -> tuple[list[dict], FilterStats]:
    """Keep or reject each rewrite (falling back to the original response); write distilled.jsonl."""
    rows, counts = apply_filters(records, rewrites, answer_check=cfg.answer_check)
    write_jsonl_atomic(stage / "distilled.jsonl", rows)
    judged = sum(counts.get(r, 0) for r in REASONS)
    rate = round(counts.get("accepted", 0) / judged, 4) if rewrites is not None and judged else None
    return rows, FilterStats(counts=counts, acceptance_rate=rate)


def _finetune_and_save(
    stage: Path, cfg: RecoverConfig, rows: list[dict], student, times: dict[str, float]
) -> tuple[TrainHistory, int]:
    """LoRA-tune the student on `rows`, save adapter and merged model; the history and the too-long count."""
    tok = student.tokenizer
    t = time.perf_counter()
    train_recs, eval_recs = split_records(rows, cfg.eval_fraction, cfg.seed)
    train_ex, too_long = build_examples(tok, train_recs, cfg.max_length)
    eval_ex, eval_too_long = build_examples(tok, eval_recs, cfg.max_length)
    settings = LoraSettings(
        rank=cfg.lora_rank,
        alpha=cfg.lora_alpha,
        dropout=cfg.lora_dropout,
        target_modules=list(cfg.target_modules),
        lr=cfg.lr,
        batch_size=cfg.batch_size,
        micro_batch_size=cfg.micro_batch_size,
        epochs=cfg.epochs,
        warmup_ratio=cfg.warmup_ratio,
        seed=cfg.seed,
    )
    pad_id = tokens.pad_id(tok)
    peft_model, raw_history = train_lora(student.model, train_ex, eval_ex, settings, pad_id=pad_id)
    times["finetune"] = round(time.perf_counter() - t, 2)

    t = time.perf_counter()
    merged = save_adapter_and_merged(peft_model, tok, stage / "adapter", stage / "model")
    times["save"] = round(time.perf_counter() - t, 2)
    raw_history["eval_loss_merged"] = mean_loss(merged, eval_ex, pad_id, settings.micro_batch_size)
    history = TrainHistory.from_json(raw_history, source="train_lora history", strict=True)
    return history, len(too_long) + len(eval_too_long)
