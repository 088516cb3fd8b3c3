"""Fine-tuning (LoRA with peft, or every weight) on (prompt, completion) pairs; loss on completion tokens only;
merge and save.

Examples are templated with `data.format_example` (the tokenizer's chat template, or Alpaca without one); prompt
and completion are tokenized separately and concatenated, so the model learns exactly the tokens it will later
generate after the prompt. Labels are -100 on prompt and padding. Training is a plain loop: AdamW, linear warmup
then cosine decay, gradient accumulation up to the effective batch, token-weighted loss, a held-out eval loss per
epoch, fully determined by the seed. With `kd.weight` > 0 the loss mixes in logit distillation from the teacher
(`distill.py`): its top-k targets attached to each example (`Example.teacher`), or an `OnlineTeacher`.

    from finescope.recover.finetune import TrainSettings, build_examples, fine_tune, save_trained
    train, skipped = build_examples(handle.tokenizer, records, max_length=256)
    model, history = fine_tune(handle.model, train, [], TrainSettings(rank=8, lr=1e-4), pad_id=0)
    save_trained(model, handle.tokenizer, Path("out/adapter"), Path("out/model"))
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import FinescopeError
from ..data import format_example
from ..progress import progress
from ..storage import atomic_dir
from ..tokens import IGNORE_INDEX, encode_continuation, encode_prompt, next_token_nll, pad_batch
from .distill import KdSettings, OnlineTeacher, TopK, kd_positions, kd_summed

IGNORE = IGNORE_INDEX  # label of prompt and padding positions


class FinetuneError(FinescopeError):
    """Training data or LoRA settings cannot be used with this model."""


@dataclass
class TrainSettings:
    adapter: str = "lora"
    """lora (peft adapters, merged at the end) | full (every weight trained)."""
    rank: int = 32
    alpha: float = 64
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    lr: float = 5e-5
    batch_size: int = 128
    micro_batch_size: int = 8
    epochs: float = 2.0
    warmup_ratio: float = 0.03
    seed: int = 0
    kd: KdSettings = field(default_factory=KdSettings)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    id: str = ""
    kd_labels: list[int] | None = None
    """Positions of the KD term when they differ from `labels` (kd_scope "all": every token), else None."""
    teacher: TopK | None = None
    """The teacher's cached top-k distribution at the KD positions (logit distillation)."""

    @property
    def targets(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)

    @property
    def kd_targets(self) -> int:
        """Positions the KD term covers: labelled tokens after the first (which nothing predicts)."""
        return sum(1 for t in (self.kd_labels or self.labels)[1:] if t != IGNORE)


# ------------------------------------------------------------------------------------------------ examples


def tokenize_pair(tokenizer, prompt: str, completion: str, max_length: int) -> Example | None:
    """Token ids and completion-only labels, cut at `max_length`; None when the prompt leaves no room."""
    if prompt:
        p_ids, c_ids = encode_prompt(tokenizer, prompt), encode_continuation(tokenizer, completion)
    else:  # a text record: all of it is language-modelling target
        p_ids, c_ids = [], encode_prompt(tokenizer, completion)
    if len(p_ids) >= max_length or not c_ids:
        return None
    ids = (p_ids + c_ids)[:max_length]
    labels = ([IGNORE] * len(p_ids) + c_ids)[:max_length]
    return Example(ids, labels)


def template_overhead(tokenizer) -> int:
    """Prompt tokens of the template around a one-word instruction: the floor for `max_length`."""
    prompt, _ = format_example(tokenizer, {"instruction": "Hi", "response": "Hi"})
    return len(encode_prompt(tokenizer, prompt))


def build_examples(tokenizer, records: list[dict], max_length: int) -> tuple[list[Example], list[str]]:
    """Examples of every record (instruction or text) and the ids of records whose prompt fills `max_length`."""
    overhead = template_overhead(tokenizer)
    if overhead + 1 >= max_length:
        raise FinetuneError(
            f"max_length {max_length} is shorter than the prompt template itself ({overhead} tokens "
            f"around a one-word instruction); raise --max-length"
        )
    out, too_long = [], []
    for rec in records:
        prompt, completion = format_example(tokenizer, rec)
        ex = tokenize_pair(tokenizer, prompt, completion, max_length)
        if ex is None:
            too_long.append(rec["id"])
            continue
        ex.id = rec["id"]
        out.append(ex)
    return out, too_long


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels (-100 on padding), and kd_labels when any example
    has its own KD positions."""
    batch = pad_batch([e.input_ids for e in examples], pad_id, labels=[e.labels for e in examples])
    if any(e.kd_labels is not None for e in examples):
        kd = pad_batch([e.input_ids for e in examples], pad_id, labels=[e.kd_labels or e.labels for e in examples])
        batch["kd_labels"] = kd["labels"]
    return batch


def split_records(records: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded train/eval split; at least one record stays in train, eval gets round(n·fraction)."""
    n_eval = int(round(len(records) * eval_fraction)) if eval_fraction > 0 else 0
    n_eval = min(n_eval, len(records) - 1)
    if eval_fraction > 0 and n_eval == 0 and len(records) >= 2:
        n_eval = 1
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


# ------------------------------------------------------------------------------------------------ loss


def summed_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of next-token NLL over labelled tokens, and their count."""
    device = next(model.parameters()).device
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    return next_token_nll(logits, batch["labels"].to(device))


@torch.no_grad()
def mean_loss(model, examples: list[Example], pad_id: int, micro_batch_size: int = 8) -> float | None:
    """Token-weighted mean completion NLL of `examples` (None when there are none)."""
    if not examples:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), micro_batch_size):
        loss, n = summed_loss(model, collate(examples[start : start + micro_batch_size], pad_id))
        total, count = total + float(loss), count + n
    model.train(was_training)
    return total / max(count, 1)


def step_loss(
    model, examples: list[Example], pad_id: int, kd: KdSettings, online: OnlineTeacher | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A micro-batch's summed CE over the labelled tokens and summed KD term over the KD positions (None with α = 0,
    when this is exactly `summed_loss` and the teacher is not consulted)."""
    batch = collate(examples, pad_id)
    if kd.weight == 0:
        return summed_loss(model, batch)[0], None
    device = next(model.parameters()).device
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    ce, _ = next_token_nll(logits, batch["labels"].to(device))
    if online is not None:
        teacher: torch.Tensor | TopK = online(batch)
    else:
        missing = [e.id for e in examples if e.teacher is None]
        if missing:
            raise FinetuneError(f"no teacher targets for examples {', '.join(missing[:3])} (kd weight > 0)")
        teacher = TopK.cat([e.teacher for e in examples if e.teacher is not None])
        teacher = TopK(teacher.ids.to(device), teacher.logp.to(device), teacher.log_rest.to(device))
    return ce, kd_summed(logits, kd_positions(batch).to(device), teacher, kd)


def mixed_loss(ce: torch.Tensor, kd_sum: torch.Tensor | None, n_ce: int, n_kd: int, kd: KdSettings) -> torch.Tensor:
    """The token-weighted training loss: CE / n_ce, or (1 − α)·CE / n_ce + α·KD / n_kd with distillation."""
    if kd_sum is None:
        return ce / max(n_ce, 1)
    return (1 - kd.weight) * ce / max(n_ce, 1) + kd.weight * kd_sum / max(n_kd, 1)


# ------------------------------------------------------------------------------------------------ LoRA / full


def linear_module_names(model) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def attach_lora(model, s: TrainSettings):
    """Wrap `model` in a peft LoRA model (seeded init); unknown target modules are an error naming them."""
    from peft import LoraConfig, get_peft_model

    present = linear_module_names(model)
    missing = [t for t in s.target_modules if t not in present]
    if missing:
        raise FinetuneError(
            f"target_modules {', '.join(missing)} not in the model; its linear modules: {', '.join(sorted(present))}"
        )
    torch.manual_seed(s.seed)
    config = LoraConfig(
        r=s.rank,
        # peft annotates lora_alpha as int, but it only divides by it (scaling = alpha / r); a float alpha is fine.
        lora_alpha=s.alpha,  # type: ignore[arg-type]
        lora_dropout=s.dropout,
        target_modules=list(s.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def full_tuning_bytes(model) -> int:
    """Memory full fine-tuning needs beyond the loaded weights: gradients and AdamW's two moments, one copy of
    every parameter each (activations not counted)."""
    return sum(3 * p.numel() * p.element_size() for p in model.parameters())


def available_bytes(device: torch.device) -> int:
    """Free memory where training runs: the CUDA device's, else the machine's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return int(psutil.virtual_memory().available)


def check_full_tuning_fits(model) -> None:
    """Refuse full fine-tuning, before any step, when its gradients and optimiser state cannot fit."""
    device = next(model.parameters()).device
    need, free = full_tuning_bytes(model), available_bytes(device)
    if need > free:
        n = sum(p.numel() for p in model.parameters())
        raise FinetuneError(
            f"full fine-tuning of {n / 1e6:,.1f}M parameters needs about {need / 2**30:.1f} GiB more memory on "
            f"{device} (gradients and AdamW state, 3 copies of the weights, activations not counted) but "
            f"{free / 2**30:.1f} GiB is free; use --adapter lora"
        )


@dataclass
class _Trainer:
    """A run's trained model (peft-wrapped or plain), optimiser and schedule, and its batch arithmetic."""

    model: Any
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    pad_id: int
    micro: int
    accum: int
    effective: int
    steps_per_epoch: int
    total_steps: int
    kd: KdSettings
    online: OnlineTeacher | None


def fine_tune(
    model,
    train: list[Example],
    held_out: list[Example],
    s: TrainSettings,
    *,
    pad_id: int,
    online_teacher=None,
) -> tuple[Any, dict[str, Any]]:
    """Fine-tune `model` (LoRA adapters or every weight) on `train`; returns the trained model (peft-wrapped for
    LoRA) and the history (losses, steps, timings). `online_teacher`: a teacher model run on every batch for KD
    instead of the examples' cached targets."""
    if not train:
        raise FinetuneError("no training examples left (every record's prompt fills max_length)")
    online = OnlineTeacher(online_teacher) if online_teacher is not None and s.kd.weight > 0 else None
    t = _setup_training(model, len(train), s, pad_id, online)
    start = time.perf_counter()
    history = _initial_history(t, len(train), held_out)
    gen = torch.Generator().manual_seed(s.seed)
    torch.manual_seed(s.seed)  # dropout masks
    t.model.train()
    epochs_run = _train_epochs(t, train, held_out, s.epochs, gen, history, start)
    seconds = time.perf_counter() - start
    history.update(seconds=round(seconds, 2), seconds_per_step=round(seconds / t.total_steps, 3), epochs_run=epochs_run)
    t.model.eval()
    return t.model, history


def _setup_training(model, n_train: int, s: TrainSettings, pad_id: int, online: OnlineTeacher | None) -> _Trainer:
    """Attach LoRA (or unfreeze every weight); size micro-batches, accumulation and steps; AdamW with linear
    warmup then cosine decay."""
    from transformers import get_cosine_schedule_with_warmup

    if s.adapter == "full":
        check_full_tuning_fits(model)
        trained = model
        for p in trained.parameters():
            p.requires_grad_(True)
    else:
        trained = attach_lora(model, s)
    micro = min(s.micro_batch_size, s.batch_size)
    accum = max(1, s.batch_size // micro)
    effective = micro * accum
    steps_per_epoch = math.ceil(n_train / effective)
    total_steps = max(1, math.ceil(s.epochs * steps_per_epoch))
    params = [p for p in trained.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(round(s.warmup_ratio * total_steps)), total_steps)
    return _Trainer(
        trained,
        params,
        optimizer,
        scheduler,
        pad_id,
        micro,
        accum,
        effective,
        steps_per_epoch,
        total_steps,
        s.kd,
        online,
    )


def _initial_history(t: _Trainer, n_train: int, held_out: list[Example]) -> dict[str, Any]:
    """The run's sizes and the held-out loss before training (epoch 0)."""
    return {
        "train_examples": n_train,
        "eval_examples": len(held_out),
        "micro_batch_size": t.micro,
        "grad_accumulation": t.accum,
        "effective_batch": t.effective,
        "steps_per_epoch": t.steps_per_epoch,
        "total_steps": t.total_steps,
        "trainable_parameters": sum(p.numel() for p in t.params),
        "train_loss": [],
        "eval_loss": [{"epoch": 0, "loss": mean_loss(t.model, held_out, t.pad_id, t.micro), "seconds": 0.0}],
    }


def _train_epochs(
    t: _Trainer,
    train: list[Example],
    held_out: list[Example],
    epochs: float,
    gen: torch.Generator,
    history: dict,
    start: float,
) -> int:
    """Seeded-shuffle epochs of optimiser steps up to `total_steps`, each ending in a held-out eval; epochs run."""
    step, epoch = 0, 0
    bar = progress(total=t.total_steps, desc="fine-tune", unit="step")
    while step < t.total_steps:
        epoch += 1
        order = torch.randperm(len(train), generator=gen).tolist()
        for g in range(0, len(order), t.effective):
            if step >= t.total_steps:
                break
            loss, kd = _optimiser_step(t, [train[i] for i in order[g : g + t.effective]])
            step += 1
            point = {"step": step, "epoch": epoch, "loss": loss, "lr": t.scheduler.get_last_lr()[0]}
            history["train_loss"].append(point if kd is None else {**point, "kd": kd})
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
        history["eval_loss"].append(
            {
                "epoch": round(min(step / t.steps_per_epoch, epochs), 3),
                "loss": mean_loss(t.model, held_out, t.pad_id, t.micro),
                "seconds": round(time.perf_counter() - start, 2),
            }
        )
    bar.close()
    return epoch


def _optimiser_step(t: _Trainer, group: list[Example]) -> tuple[float, float | None]:
    """One step on `group`, gradients accumulated over micro-batches; its token-weighted mean loss and mean KD
    term per KD position (None without KD)."""
    n_ce = sum(e.targets for e in group)
    n_kd = sum(e.kd_targets for e in group) if t.kd.weight > 0 else 0
    ce_total, kd_total = 0.0, None
    for m in range(0, len(group), t.micro):
        ce, kd = step_loss(t.model, group[m : m + t.micro], t.pad_id, t.kd, t.online)
        mixed_loss(ce, kd, n_ce, n_kd, t.kd).backward()
        ce_total += float(ce.detach())
        if kd is not None:
            kd_total = (kd_total or 0.0) + float(kd.detach())
    torch.nn.utils.clip_grad_norm_(t.params, 1.0)
    t.optimizer.step()
    t.scheduler.step()
    t.optimizer.zero_grad(set_to_none=True)
    if kd_total is None:
        return ce_total / max(n_ce, 1), None
    kd_mean = kd_total / max(n_kd, 1)
    return (1 - t.kd.weight) * ce_total / max(n_ce, 1) + t.kd.weight * kd_mean, kd_mean


def save_trained(model, tokenizer, adapter_dir: Path | None, model_dir: Path):
    """Save the trained model as a stock `from_pretrained` folder, atomically; a LoRA run also saves its adapter
    (peft layout) to `adapter_dir` first and merges it.

    Returns the plain (merged) model. A peft wrapper is consumed (its base weights now hold the merge)."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        if adapter_dir is not None:
            with atomic_dir(adapter_dir) as tmp:
                model.save_pretrained(str(tmp))
        model = model.merge_and_unload()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    with atomic_dir(model_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return model
