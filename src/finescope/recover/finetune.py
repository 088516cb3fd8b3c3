"""LoRA fine-tuning with peft on (prompt, completion) pairs; loss on completion tokens only; merge and save.

Examples are templated with `data.format_example` (the tokenizer's chat template, or Alpaca without one); prompt
and completion are tokenized separately and concatenated, so the model learns exactly the tokens it will later
generate after the prompt. Labels are -100 on prompt and padding. Training is a plain loop: AdamW, linear warmup
then cosine decay, gradient accumulation up to the effective batch, token-weighted loss, a held-out eval loss per
epoch, fully determined by the seed.

    from finescope.recover.finetune import LoraSettings, build_examples, train_lora, save_adapter_and_merged
    train, skipped = build_examples(handle.tokenizer, records, max_length=256)
    peft_model, history = train_lora(handle.model, train, [], LoraSettings(rank=8, lr=1e-4), pad_id=0)
    save_adapter_and_merged(peft_model, handle.tokenizer, Path("out/adapter"), Path("out/model"))
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

IGNORE = IGNORE_INDEX  # label of prompt and padding positions


class FinetuneError(FinescopeError):
    """Training data or LoRA settings cannot be used with this model."""


@dataclass
class LoraSettings:
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


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    id: str = ""

    @property
    def targets(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


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
    """Right-padded batch: input_ids, attention_mask, labels (-100 on padding)."""
    return pad_batch([e.input_ids for e in examples], pad_id, labels=[e.labels for e in examples])


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


# ------------------------------------------------------------------------------------------------ LoRA


def linear_module_names(model) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def attach_lora(model, s: LoraSettings):
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


@dataclass
class _Trainer:
    """A LoRA run's peft model, optimiser and schedule, and its batch arithmetic."""

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


def train_lora(
    model,
    train: list[Example],
    held_out: list[Example],
    s: LoraSettings,
    *,
    pad_id: int,
) -> tuple[Any, dict[str, Any]]:
    """Fine-tune LoRA adapters on `train`; returns the peft model and the history (losses, steps, timings)."""
    if not train:
        raise FinetuneError("no training examples left (every record's prompt fills max_length)")
    t = _setup_training(model, len(train), s, pad_id)
    history = _initial_history(t, len(train), held_out)
    gen = torch.Generator().manual_seed(s.seed)
    torch.manual_seed(s.seed)  # dropout masks
    t.model.train()
    start = time.perf_counter()
    epochs_run = _train_epochs(t, train, held_out, s.epochs, gen, history)
    seconds = time.perf_counter() - start
    history.update(seconds=round(seconds, 2), seconds_per_step=round(seconds / t.total_steps, 3), epochs_run=epochs_run)
    t.model.eval()
    return t.model, history


def _setup_training(model, n_train: int, s: LoraSettings, pad_id: int) -> _Trainer:
    """Attach LoRA; size micro-batches, accumulation and steps; AdamW with linear warmup then cosine decay."""
    from transformers import get_cosine_schedule_with_warmup

    peft_model = attach_lora(model, s)
    micro = min(s.micro_batch_size, s.batch_size)
    accum = max(1, s.batch_size // micro)
    effective = micro * accum
    steps_per_epoch = math.ceil(n_train / effective)
    total_steps = max(1, math.ceil(s.epochs * steps_per_epoch))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(round(s.warmup_ratio * total_steps)), total_steps)
    return _Trainer(
        peft_model, params, optimizer, scheduler, pad_id, micro, accum, effective, steps_per_epoch, total_steps
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
        "eval_loss": [{"epoch": 0, "loss": mean_loss(t.model, held_out, t.pad_id, t.micro)}],
    }


def _train_epochs(
    t: _Trainer, train: list[Example], held_out: list[Example], epochs: float, gen: torch.Generator, history: dict
) -> int:
    """Seeded-shuffle epochs of optimiser steps up to `total_steps`, each ending in a held-out eval; epochs run."""
    step, epoch = 0, 0
    bar = progress(total=t.total_steps, desc="lora", unit="step")
    while step < t.total_steps:
        epoch += 1
        order = torch.randperm(len(train), generator=gen).tolist()
        for g in range(0, len(order), t.effective):
            if step >= t.total_steps:
                break
            loss = _optimiser_step(t, [train[i] for i in order[g : g + t.effective]])
            step += 1
            history["train_loss"].append(
                {"step": step, "epoch": epoch, "loss": loss, "lr": t.scheduler.get_last_lr()[0]}
            )
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
        history["eval_loss"].append(
            {
                "epoch": round(min(step / t.steps_per_epoch, epochs), 3),
                "loss": mean_loss(t.model, held_out, t.pad_id, t.micro),
            }
        )
    bar.close()
    return epoch


def _optimiser_step(t: _Trainer, group: list[Example]) -> float:
    """One step on `group`, gradients accumulated over micro-batches; its token-weighted mean loss."""
    n_tokens = sum(e.targets for e in group)
    total = 0.0
    for m in range(0, len(group), t.micro):
        loss, _ = summed_loss(t.model, collate(group[m : m + t.micro], t.pad_id))
        (loss / max(n_tokens, 1)).backward()
        total += float(loss.detach())
    torch.nn.utils.clip_grad_norm_(t.params, 1.0)
    t.optimizer.step()
    t.scheduler.step()
    t.optimizer.zero_grad(set_to_none=True)
    return total / max(n_tokens, 1)


def save_adapter_and_merged(peft_model, tokenizer, adapter_dir: Path, model_dir: Path):
    """Save the LoRA adapter (peft layout) and the merged model (stock `from_pretrained`), each atomically.

    Returns the merged plain model. The peft wrapper is consumed (its base weights now hold the merge)."""
    with atomic_dir(adapter_dir) as tmp:
        peft_model.save_pretrained(tmp)
    merged = peft_model.merge_and_unload()
    merged.eval()
    with atomic_dir(model_dir) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return merged
