"""Fine-tuning on `transformers.Trainer`: LoRA (peft) or every weight, completion-only labels, token-weighted loss
(optionally mixed with logit distillation), a held-out loss before training and after every epoch.

The Trainer brings the engines: one process, DDP over the ranks of `torchrun` / `accelerate launch` (gloo on CPU,
NCCL on GPUs), bf16 on GPUs, gradient checkpointing, checkpoints to resume from. What stays ours:

- the loss: the summed CE over labelled tokens divided by the labelled-token count of the whole optimiser step,
  counted across every micro-batch *and every rank* (`num_items_in_batch`), so a step's gradient is the same
  token-weighted mean whatever the process count or accumulation (× world size, because DDP averages gradients);
  with KD, (1 − α)·CE / n_ce + α·KD / n_kd, both counts global;
- the batch arithmetic: `batch_size` is the global batch; each rank accumulates batch_size / (micro × world)
  micro-batches;
- the history (`TrainHistory`): per-step loss and learning rate, held-out loss per epoch, timings.

    from finescope.recover.trainer import fine_tune
    model, history = fine_tune(handle.model, train, held_out, TrainSettings(rank=8, lr=1e-4), pad_id=0)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .. import distributed
from ..progress import progress
from ..tokens import IGNORE_INDEX
from .distill import OnlineTeacher, TopK, kd_positions
from .finetune import (
    Example,
    FinetuneError,
    TrainSettings,
    attach_lora,
    batch_loss,
    check_full_tuning_fits,
    collate,
    mean_loss,
    teacher_targets,
)
from .length_batches import LengthBatches
from .loss_terms import TERMS, mixed_loss, term_means
from .on_policy import OnPolicy

CHECKPOINT_PREFIX = "checkpoint-"


class _Examples(torch.utils.data.Dataset):
    """The training examples as the map-style dataset the Trainer's sampler shuffles."""

    def __init__(self, examples: list[Example]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]


class _Collator:
    """Right-padded batch (`collate`), plus the examples' cached teacher top-k concatenated over KD positions; with
    on-policy distillation the chosen examples first get the student's own answers (`OnPolicy`)."""

    def __init__(self, pad_id: int, with_teacher: bool, on_policy: OnPolicy | None = None):
        self.pad_id, self.with_teacher, self.on_policy = pad_id, with_teacher, on_policy

    def __call__(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        if self.on_policy is not None:
            examples = self.on_policy(examples)
        batch = collate(examples, self.pad_id)
        if self.with_teacher:
            top = teacher_targets(examples)
            batch.update(teacher_ids=top.ids, teacher_logp=top.logp, teacher_log_rest=top.log_rest)
        return batch


def batch_shape(s: TrainSettings, world: int) -> tuple[int, int, int]:
    """(micro-batch per rank, accumulation steps per rank, effective global batch) for the global `batch_size`."""
    micro = max(1, min(s.micro_batch_size, s.batch_size // world))
    accum = max(1, s.batch_size // (micro * world))
    return micro, accum, micro * accum * world


def _trainer_class():
    """`CompletionTrainer`, built on first use (importing transformers' Trainer costs seconds)."""
    from transformers import Trainer

    class CompletionTrainer(Trainer):
        """Trainer whose loss is ours: token-weighted over the global step, CE on completions, optional KD."""

        loss_is_scaled_for_ga = True  # normalised by the step's global token count already

        def __init__(self, *args, kd, online: OnlineTeacher | None, by_length_step: int | None, **kwargs):
            super().__init__(*args, **kwargs)
            self.kd, self.online, self.by_length_step = kd, online, by_length_step
            self.names = ["ce"] + [t.name for t in TERMS]
            self.step_sums = torch.zeros(len(self.names), dtype=torch.float64)  # this rank's sums of the step
            self.step_counts = torch.zeros(2, dtype=torch.float64)  # the step's global CE and KD token counts

        def _get_train_sampler(self, train_dataset=None):
            """Steps (`by_length_step` examples: the global batch) of like lengths in random order
            (`length_batches`), or the Trainer's random order."""
            data = train_dataset if train_dataset is not None else self.train_dataset
            if self.by_length_step is None or not isinstance(data, _Examples):
                return super()._get_train_sampler(train_dataset)
            a = self.args
            return LengthBatches(
                [len(e.input_ids) for e in data.examples],
                step=self.by_length_step,
                seed=a.data_seed if a.data_seed is not None else a.seed,
                # state.epoch is e + steps done / steps per epoch (exactly e + 1.0 after an epoch's last step), read
                # when the epoch's first batch is drawn: a resumed run redraws the epoch it stopped in
                epoch=lambda: int(self.state.epoch or 0),
            )

        def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor:
            """Labelled tokens (CE) and KD positions of the whole optimiser step, summed over every rank."""
            counts = _counts(batch_samples).to(device)
            if self.accelerator.num_processes > 1:
                counts = self.accelerator.reduce(counts, reduction="sum")
            return counts

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            teacher = _pop_teacher(inputs)
            terms = batch_loss(model, inputs, self.kd, teacher, self.online)
            if num_items_in_batch is None:  # outside a training step: this batch's own counts
                num_items_in_batch = _counts([inputs])
            n_ce, n_kd = num_items_in_batch.tolist()
            self.step_counts = num_items_in_batch.detach().double().cpu()
            for name, term in terms.items():
                self.step_sums[self.names.index(name)] += float(term.detach())
            # DDP (and DeepSpeed) average gradients over ranks; each rank's share of the global mean is summed.
            loss = mixed_loss(terms, n_ce, n_kd, self.kd) * self.accelerator.num_processes
            return (loss, None) if return_outputs else loss

        def take_step_means(self) -> tuple[float, dict[str, float]]:
            """The finished step's token-weighted loss and the per-token mean of each term ("ce", then each term of
            `loss_terms.TERMS` that is on), over every rank."""
            sums = self.step_sums.to(self.args.device)
            if self.accelerator.num_processes > 1:
                sums = self.accelerator.reduce(sums, reduction="sum")
            values = dict(zip(self.names, (float(x) for x in sums.cpu().tolist())))
            on = ["ce"] + [t.name for t in self.kd.terms_on()]
            n_ce, n_kd = (float(x) for x in self.step_counts.tolist())
            self.step_sums = torch.zeros(len(self.names), dtype=torch.float64)
            means = term_means({name: values[name] for name in on}, n_ce, n_kd)
            return float(mixed_loss(means, 1, 1, self.kd)), means  # the means mixed with the loss's weights

    return CompletionTrainer


def _counts(batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Labelled tokens (the CE normaliser, as `Example.targets`) and KD positions (`Example.kd_targets`)."""
    n_ce = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    n_kd = sum(int((kd_positions(b)[:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    return torch.tensor([n_ce, n_kd], dtype=torch.float64)


def _pop_teacher(inputs: dict[str, Any]) -> TopK | None:
    if "teacher_ids" not in inputs:
        return None
    return TopK(inputs.pop("teacher_ids"), inputs.pop("teacher_logp"), inputs.pop("teacher_log_rest"))


def _history_callback(trainer, held_out: list[Example], pad_id: int, micro: int, history: dict, start: float):
    from transformers import TrainerCallback

    class History(TrainerCallback):
        """Per-step loss and learning rate, held-out loss after each epoch, a progress bar."""

        def __init__(self):
            self.bar = None

        def on_train_begin(self, args, state, control, **kw):
            desc = "fine-tune" + distributed.ranks().tag
            self.bar = progress(total=state.max_steps, initial=state.global_step, desc=desc, unit="step")

        def on_step_end(self, args, state, control, **kw):
            loss, means = trainer.take_step_means()
            point = {
                "step": state.global_step,
                "epoch": max(1, math.ceil(state.epoch - 1e-9)),
                "loss": loss,
                "ce": means.pop("ce"),
                "lr": kw["lr_scheduler"].get_last_lr()[0],
            }
            point.update(means)  # each term that is on, by its name in loss_terms.TERMS
            history["train_loss"].append(point)
            if self.bar is not None:  # postfix first, without a redraw: in a log, update() draws at most every 30 s
                self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
                self.bar.update(1)

        def on_epoch_end(self, args, state, control, **kw):
            history["eval_loss"].append(
                {
                    "epoch": round(min(state.global_step / history["steps_per_epoch"], args.num_train_epochs), 3),
                    "loss": mean_loss(trainer.model, held_out, pad_id, micro),
                    "seconds": round(time.perf_counter() - start, 2),
                }
            )

        def on_train_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.close()

    return History()


def _refuse_weight_sharding(engine: str) -> FinetuneError:
    return FinetuneError(
        f"{engine} (from the accelerate config) shards the weights over the ranks, and the LoRA merge and save "
        "need them whole: not supported yet; use DDP (accelerate's default multi-GPU setting) or DeepSpeed ZeRO-1/2"
    )


def check_launch_engine(environ: Mapping[str, str] | None = None) -> None:
    """Refuse FSDP and DeepSpeed ZeRO-3 as `accelerate launch` asks for them (its environment variables), before
    a stage spends hours on teacher rewrites. On CPU accelerate would quietly run DDP instead; refused there too,
    since it is not what the config says."""
    env = os.environ if environ is None else environ
    if env.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise _refuse_weight_sharding("FSDP")
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and _zero_stage(env) == 3:
        raise _refuse_weight_sharding("DeepSpeed ZeRO-3")


def _zero_stage(env: Mapping[str, str]) -> int | None:
    """The ZeRO stage of a DeepSpeed launch: from its config file when one is given (unreadable: None, DeepSpeed
    reports it), else accelerate's --zero_stage (default 2)."""
    config = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if config != "none":
        try:
            stage = json.loads(Path(config).read_text()).get("zero_optimization", {}).get("stage")
        except (OSError, ValueError, AttributeError):
            return None
        return int(stage) if isinstance(stage, int | str) and str(stage).isdigit() else None
    raw = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    return int(raw) if raw.isdigit() else None


def _check_engine(trainer) -> None:
    """The same refusal from the Trainer's accelerator state (DDP and ZeRO-1/2 keep a full copy per rank)."""
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    zero3 = trainer.is_deepspeed_enabled and plugin is not None and getattr(plugin, "zero_stage", 0) == 3
    if trainer.is_fsdp_enabled or zero3:
        raise _refuse_weight_sharding("FSDP" if trainer.is_fsdp_enabled else "DeepSpeed ZeRO-3")


def latest_checkpoint(folder: Path | None) -> Path | None:
    """The newest complete Trainer checkpoint in `folder` (one holding trainer_state.json), or None."""
    if folder is None or not folder.is_dir():
        return None
    done = [p for p in folder.glob(CHECKPOINT_PREFIX + "*") if (p / "trainer_state.json").is_file()]
    steps = [(int(p.name[len(CHECKPOINT_PREFIX) :]), p) for p in done if p.name[len(CHECKPOINT_PREFIX) :].isdigit()]
    return max(steps)[1] if steps else None


def _use_bf16(model, s: TrainSettings) -> bool:
    """bf16 mixed precision: asked for, or (auto) a bf16 model on a CUDA device that supports it."""
    if s.bf16 is not None:
        return s.bf16
    p = next(model.parameters())
    return p.device.type == "cuda" and p.dtype == torch.bfloat16 and torch.cuda.is_bf16_supported()


def fine_tune(
    model,
    train: list[Example],
    held_out: list[Example],
    s: TrainSettings,
    *,
    pad_id: int,
    online_teacher=None,
    on_policy: OnPolicy | None = None,
    callbacks: list | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Fine-tune `model` (LoRA adapters or every weight) on `train` with `transformers.Trainer`; returns the trained
    model (peft-wrapped for LoRA) and the history (losses, steps, timings). Under several ranks every rank calls
    this with the same examples (the Trainer's sampler splits them). `online_teacher`: a teacher model run on every
    batch for KD instead of the examples' cached targets; `on_policy`: the share of examples the student answers
    itself at each draw (bound here to the model in training); `callbacks`: more `TrainerCallback`s. With
    `s.checkpoint_dir`, Trainer checkpoints are written there every `s.checkpoint_steps` steps and the newest one
    found is resumed; without it nothing is written outside a temporary folder."""
    if not train:
        raise FinetuneError("no training examples left (every record's prompt fills max_length)")
    world = distributed.ranks().world
    online = OnlineTeacher(online_teacher) if online_teacher is not None and s.kd.needs_teacher else None
    s = dataclasses.replace(s, bf16=_use_bf16(model, s))  # decided on the loaded dtype, before any upcast
    load_dtype = next(model.parameters()).dtype
    if s.adapter == "full":
        check_full_tuning_fits(model)
        # float32 master weights (bf16 autocast still computes in bf16 on GPUs); saved back in the loaded dtype.
        trained = model.float()
        for p in trained.parameters():
            p.requires_grad_(True)
    else:
        trained = attach_lora(model, s)  # peft keeps the adapters in float32
    if on_policy is not None:
        on_policy.student = trained  # it answers as the model being trained, adapters included
    with contextlib.ExitStack() as stack:
        # The Trainer wants an output folder even when it saves nothing: a temporary one then, never the cwd.
        out_dir = s.checkpoint_dir or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="finescope-trainer-"))
        )
        out, history = _fine_tune(
            trained, model, train, held_out, s, pad_id, online, callbacks, world, out_dir, on_policy
        )
    if s.adapter == "full" and load_dtype != torch.float32:
        out = out.to(load_dtype)
    return out, history


def _fine_tune(trained, model, train, held_out, s, pad_id, online, callbacks, world, out_dir: Path, on_policy=None):
    """`fine_tune` once the trained model (`trained`: peft-wrapped or `model` itself) and the folder are set."""
    from transformers import PrinterCallback, TrainingArguments

    micro, accum, effective = batch_shape(s, world)
    steps_per_epoch = math.ceil(len(train) / effective)
    total_steps = max(1, math.ceil(s.epochs * steps_per_epoch))
    device = next(model.parameters()).device
    resume = latest_checkpoint(s.checkpoint_dir)
    args = TrainingArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accum,
        max_steps=total_steps,
        num_train_epochs=s.epochs,
        learning_rate=s.lr,
        weight_decay=0.0,
        lr_scheduler_type="cosine",
        warmup_steps=int(round(s.warmup_ratio * total_steps)),
        max_grad_norm=1.0,
        optim="adamw_torch",
        seed=s.seed,
        data_seed=s.seed,
        bf16=bool(s.bf16),
        activation_checkpointing=s.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if s.gradient_checkpointing else None,
        save_strategy="steps" if s.checkpoint_dir is not None and s.checkpoint_steps > 0 else "no",
        save_steps=max(1, s.checkpoint_steps),
        save_total_limit=1,
        logging_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_pin_memory=device.type == "cuda",
        use_cpu=device.type == "cpu",
        ddp_find_unused_parameters=False,
    )
    if world == 1 and args.n_gpu > 1:
        # One process on a machine with several GPUs: the Trainer would wrap the model in nn.DataParallel and read
        # n_gpu × micro-batches per step; train on one GPU (several: launch one rank per GPU).
        args._n_gpu = 1
    history: dict[str, Any] = {
        "train_examples": len(train),
        "eval_examples": len(held_out),
        "micro_batch_size": micro,
        "grad_accumulation": accum,
        "effective_batch": effective,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "trainable_parameters": sum(p.numel() for p in trained.parameters() if p.requires_grad),
        "train_loss": [],
        "eval_loss": [{"epoch": 0, "loss": mean_loss(trained, held_out, pad_id, micro), "seconds": 0.0}],
    }
    torch.manual_seed(s.seed)  # dropout masks
    trainer = _trainer_class()(
        model=trained,
        args=args,
        train_dataset=_Examples(train),
        data_collator=_Collator(pad_id, s.kd.reads_teacher_logits and online is None, on_policy),
        kd=s.kd,
        online=online,
        by_length_step=effective if s.group_by_length else None,
    )
    trainer.remove_callback(PrinterCallback)
    _check_engine(trainer)
    start = time.perf_counter()
    trainer.add_callback(_history_callback(trainer, held_out, pad_id, micro, history, start))
    for cb in callbacks or []:
        trainer.add_callback(cb)
    if resume is not None:
        history["resumed_from_step"] = int(resume.name[len(CHECKPOINT_PREFIX) :])
    trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    seconds = time.perf_counter() - start
    steps_run = max(1, total_steps - history.get("resumed_from_step", 0))
    epochs_run = math.ceil(trainer.state.epoch - 1e-9)
    history.update(seconds=round(seconds, 2), seconds_per_step=round(seconds / steps_run, 3), epochs_run=epochs_run)
    out = trainer.accelerator.unwrap_model(trainer.model)
    out.eval()
    return out, history
