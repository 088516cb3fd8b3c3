"""On-policy distillation (GKD, Agarwal et al. 2024): part of the training examples are answered by the student
itself, as it is at that step, and trained towards the teacher's distribution on those tokens.

Teacher-forced distillation only ever shows the student the teacher's (or the record's) text; at generation time
it reads its own, and a prefix the teacher would never write (a repeated line) is one it was never corrected on.
Here a share λ (`on_policy`) of the examples get, each time a batch holding them is drawn, a new response: the
student's continuation of the example's prompt, sampled at `temperature` up to `max_new_tokens` (the stop token
kept). The teacher's distribution at those tokens is the target of the KD term; the cross-entropy term skips them
(the student's own tokens are no target). Which examples is fixed by (seed, example id) and each draw's sampling
is seeded by the batch's ids and the draw count, so a run is reproducible (one resumed from a checkpoint draws
anew after it); the rest of training's randomness
(dropout) does not see the draws (the generator is forked). Examples without a prompt (text records) stay as
they are.

    policy = OnPolicy(student_model, tokenizer, teacher_model, kd_settings, share=0.5, max_new_tokens=64, ...)
    batch_examples = policy(batch_examples)   # in the collator, before padding
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from .. import hashing
from ..generation import generate_ids, stop_token_ids
from ..tokens import IGNORE_INDEX, pad_id
from .finetune import Example
from .kd_cache import batch_top_k
from .loss_terms import KdSettings


def prompt_length(ex: Example) -> int:
    """Tokens before the first labelled one: the example's prompt (0 for a text record)."""
    return next((i for i, t in enumerate(ex.labels) if t != IGNORE_INDEX), len(ex.labels))


class OnPolicy:
    """Replaces the chosen examples of a batch by the student's own answers, with the teacher's top-k on them when
    the KD targets are cached (`teacher` given); with the online teacher (`teacher` None) the loss reads the
    teacher on the batch itself."""

    def __init__(
        self,
        student,
        tokenizer,
        teacher,
        kd: KdSettings,
        *,
        share: float,
        max_new_tokens: int,
        temperature: float,
        max_length: int,
        scope: str,
        seed: int,
    ):
        self.student, self.teacher, self.kd = student, teacher, kd
        self.share, self.max_new_tokens, self.temperature = share, max_new_tokens, temperature
        self.max_length, self.scope, self.seed = max_length, scope, seed
        self.stops = stop_token_ids(student, tokenizer)
        self.pad = pad_id(tokenizer, fallback=min(self.stops, default=0))
        self.draws = 0
        self.stats: dict[str, float] = {"examples": 0, "tokens": 0, "ended": 0, "seconds": 0.0}

    def chosen(self, ex: Example) -> bool:
        """Whether this example is one of the on-policy share (fixed per seed and example id)."""
        if self.share <= 0 or prompt_length(ex) == 0:
            return False
        u = int(hashing.digest_parts("on-policy", self.seed, ex.id, len(ex.input_ids), length=8), 16) / 16**8
        return u < self.share

    def __call__(self, examples: list[Example]) -> list[Example]:
        picked = [i for i, ex in enumerate(examples) if self.chosen(ex)]
        if not picked:
            return examples
        t = time.perf_counter()
        self.draws += 1
        prompts = [examples[i].input_ids[: prompt_length(examples[i])] for i in picked]
        room = max(1, min(self.max_new_tokens, self.max_length - max(len(p) for p in prompts)))
        draw_seed = int(hashing.digest_parts(self.seed, self.draws, [examples[i].id for i in picked]), 16) % 2**31
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(draw_seed)
            answers = generate_ids(
                self.student, prompts, stops=self.stops, pad=self.pad, max_new_tokens=room,
                temperature=self.temperature,
            )  # fmt: skip
        out = list(examples)
        fresh = []
        for i, prompt, answer in zip(picked, prompts, answers):
            answer = answer or [next(iter(sorted(self.stops)), self.pad)]  # an empty row still ends
            ids = (prompt + answer)[: self.max_length]
            kd = ids if self.scope == "all" else [IGNORE_INDEX] * len(prompt) + ids[len(prompt) :]
            out[i] = replace(examples[i], input_ids=ids, labels=[IGNORE_INDEX] * len(ids), kd_labels=kd, teacher=None)
            fresh.append(i)
            self.stats["tokens"] += len(ids) - len(prompt)
            self.stats["ended"] += int(answer[-1] in self.stops)
        if self.teacher is not None:
            for i, top in zip(fresh, batch_top_k(self.teacher, [out[i] for i in fresh], self.kd, self.pad)):
                out[i].teacher = top
        self.stats["examples"] += len(fresh)
        self.stats["seconds"] += time.perf_counter() - t
        return out
