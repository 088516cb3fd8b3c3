"""Fine-tuning (LoRA with peft, or every weight) on (prompt, completion) pairs; loss on completion tokens only;
merge and save.

Examples are templated with `data.format_example` (the tokenizer's chat template, or Alpaca without one); prompt
and completion are tokenized separately and concatenated, so the model learns exactly the tokens it will later
generate after the prompt. Labels are -100 on prompt and padding. The training itself runs on
`transformers.Trainer` (`trainer.py`): AdamW, linear warmup then cosine decay, gradient accumulation up to the
effective batch, token-weighted loss, a held-out eval loss per epoch, fully determined by the seed. With
`kd.weight` > 0 the loss mixes in logit distillation from the teacher (`distill.py`): its top-k targets attached to
each example (`Example.teacher`), or an `OnlineTeacher`; every term of the loss is a row of `loss_terms.TERMS`.

    from finescope.recover.finetune import TrainSettings, build_examples, save_trained
    from finescope.recover.trainer import fine_tune
    train, skipped = build_examples(handle.tokenizer, records, max_length=256)
    model, history = fine_tune(handle.model, train, [], TrainSettings(rank=8, lr=1e-4), pad_id=0)
    save_trained(model, handle.tokenizer, Path("out/adapter"), Path("out/model"))
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import FinescopeError
from ..config import RecoverConfig
from ..data import format_example
from ..storage import atomic_dir
from ..tokens import IGNORE_INDEX, encode_continuation, encode_prompt, next_token_nll, pad_batch
from .distill import OnlineTeacher, TopK, kd_positions
from .loss_terms import KdSettings, TermInputs, Terms

IGNORE = IGNORE_INDEX  # label of prompt and padding positions


class FinetuneError(FinescopeError):
    """Training data or LoRA settings cannot be used with this model."""


_R = RecoverConfig()  # the defaults are declared once, on the config


@dataclass
class TrainSettings:
    """The fine-tuning of `RecoverConfig` (its LoRA / schedule fields) plus where checkpoints go."""

    adapter: str = _R.adapter
    """lora (peft adapters, merged at the end) | full (every weight trained)."""
    rank: int = _R.lora_rank
    alpha: float = _R.lora_alpha
    dropout: float = _R.lora_dropout
    target_modules: list[str] = field(default_factory=lambda: list(_R.target_modules))
    lr: float = _R.lr
    batch_size: int = _R.batch_size
    micro_batch_size: int = _R.micro_batch_size
    epochs: float = _R.epochs
    warmup_ratio: float = _R.warmup_ratio
    seed: int = _R.seed
    kd: KdSettings = field(default_factory=KdSettings)
    group_by_length: bool = _R.group_by_length
    """Steps of like lengths, in random order (`length_batches`); else drawn at random."""
    gradient_checkpointing: bool = _R.gradient_checkpointing
    """Recompute activations in the backward pass (less memory, ~30 % more time)."""
    bf16: bool | None = None
    """bf16 mixed precision; None = when the model is bf16 on a CUDA device that supports it."""
    checkpoint_dir: Path | None = None
    """Where Trainer checkpoints go (and the newest is resumed from); None = no checkpoints."""
    checkpoint_steps: int = _R.checkpoint_steps
    """Save a checkpoint every N optimiser steps (0 = never)."""

    @classmethod
    def from_config(cls, cfg: RecoverConfig, checkpoint_dir: Path | None = None) -> TrainSettings:
        return cls(
            adapter=cfg.adapter,
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
            kd=KdSettings.from_config(cfg),
            group_by_length=cfg.group_by_length,
            gradient_checkpointing=cfg.gradient_checkpointing,
            checkpoint_dir=checkpoint_dir if cfg.checkpoint_steps > 0 else None,
            checkpoint_steps=cfg.checkpoint_steps,
        )


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
        """Labelled tokens after the first, the positions the CE covers: a text record's first token is labelled, and
        nothing predicts it."""
        return sum(1 for t in self.labels[1:] if t != IGNORE)

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


def prompt_fills(tokenizer, record: dict, max_length: int) -> bool:
    """Whether an instruction record's prompt alone fills `max_length`: training drops it whatever its response."""
    prompt, _ = format_example(tokenizer, {**record, "response": ""})
    return bool(prompt) and len(encode_prompt(tokenizer, prompt)) >= max_length


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
    by_length = sorted(examples, key=lambda e: -len(e.input_ids))  # like lengths per batch: little padding
    for start in range(0, len(by_length), micro_batch_size):
        loss, n = summed_loss(model, collate(by_length[start : start + micro_batch_size], pad_id))
        total, count = total + float(loss), count + n
    model.train(was_training)
    return total / max(count, 1)


def teacher_targets(examples: list[Example]) -> TopK:
    """The examples' cached teacher top-k, concatenated over their KD positions in batch order."""
    missing = [e.id for e in examples if e.teacher is None]
    if missing:
        raise FinetuneError(f"no teacher targets for examples {', '.join(missing[:3])} (kd weight > 0)")
    return TopK.cat([e.teacher for e in examples if e.teacher is not None])


def batch_loss(
    model,
    batch: dict[str, torch.Tensor],
    kd: KdSettings,
    teacher: TopK | None = None,
    online: OnlineTeacher | None = None,
) -> Terms:
    """A collated micro-batch's summed loss terms (`loss_terms.TERMS`: CE, then each term that is on) against the
    cached `teacher` targets or the `online` teacher. With every term off this is exactly `summed_loss`, and the
    teacher is not consulted; a term that reads the teacher's hidden states needs the online teacher."""
    on = kd.terms_on()
    if not on:
        return {"ce": summed_loss(model, batch)[0]}
    device = next(model.parameters()).device
    hidden = any(t.teacher == "hidden" for t in on)
    out = model(
        input_ids=batch["input_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device),
        output_hidden_states=hidden,
    )
    labels = batch["labels"].to(device)
    positions = kd_positions(batch).to(device)
    student_hidden = out.hidden_states if hidden else None
    # the terms that read the student alone first, as the CE: the teacher's logits are not held while they run
    terms: Terms = {"ce": next_token_nll(out.logits, labels)[0]}
    own = TermInputs(out.logits, labels, positions, student_hidden)
    for t in on:
        if t.teacher == "none":
            terms[t.name] = t.compute(own, kd)
    if any(t.teacher != "none" for t in on):
        target: torch.Tensor | TopK | None = None
        teacher_hidden = None
        if online is not None:
            target, teacher_hidden = online.states(batch, hidden=hidden)
        elif hidden:
            needs = ", ".join(f"{t.config} > 0" for t in on if t.teacher == "hidden")
            raise FinetuneError(f"{needs}: the term reads the teacher's hidden states and needs the online teacher")
        elif teacher is not None:
            target = TopK(teacher.ids.to(device), teacher.logp.to(device), teacher.log_rest.to(device))
        else:
            raise FinetuneError("kd weight > 0 but the batch has no teacher targets and no online teacher")
        inputs = TermInputs(out.logits, labels, positions, student_hidden, target, teacher_hidden)
        for t in on:
            if t.teacher != "none":
                terms[t.name] = t.compute(inputs, kd)
    return terms


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
    """Memory full fine-tuning needs beyond the loaded weights: it trains float32 weights (a half-precision model
    is upcast: AdamW on bf16 weights rounds small updates away), their gradients and AdamW's two moments, 4 bytes
    each per parameter (activations not counted)."""
    return sum(p.numel() * (3 * 4 + max(0, 4 - p.element_size())) for p in model.parameters())


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
            f"{device} (float32 weights, gradients and AdamW state, activations not counted) but "
            f"{free / 2**30:.1f} GiB is free; use --adapter lora"
        )


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
