"""The training order (`recover.group_by_length`): steps of like lengths, in random order, every example once per
epoch, the same on every rank and after a resume; and the Trainer draws exactly that order."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import build_model
from finescope.recover import trainer as trainer_mod
from finescope.recover.finetune import Example, TrainSettings, build_examples
from finescope.recover.length_batches import LengthBatches
from finescope.recover.trainer import fine_tune


def _lengths(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(10, 250) for _ in range(n)]


def _padded(lengths: list[int], order: list[int], micro: int) -> int:
    return sum(
        max(lengths[i] for i in order[a : a + micro]) * len(order[a : a + micro]) for a in range(0, len(order), micro)
    )


def _batches(order: list[int], micro: int) -> list[list[int]]:
    return [order[a : a + micro] for a in range(0, len(order), micro)]


@pytest.mark.parametrize("n, step, micro", [(400, 4, 4), (354, 4, 4), (7, 3, 3), (5, 8, 8), (1, 1, 1), (30, 8, 4)])
def test_every_example_once_per_epoch_and_only_the_last_step_short(n, step, micro):
    """Only the last step may be short, so the data loader's cut into micro-batches stays on step boundaries."""
    sampler = LengthBatches(_lengths(n), step=step, seed=3, epoch=lambda: 0)
    for epoch in range(3):
        order = sampler.order(epoch)
        assert sorted(order) == list(range(n))
        sizes = [len(b) for b in _batches(order, step)]
        assert all(s == step for s in sizes[:-1]) and 1 <= sizes[-1] <= step
        micro_batches = _batches(order, micro)
        assert all(len(b) == micro for b in micro_batches[: (n // step) * (step // micro)])


def test_two_ranks_together_take_each_full_step_of_the_order():
    """Under DDP accelerate deals the micro-batches out (`BatchSamplerShard`): rank r takes micro-batches r, r + W,
    …; the accumulation steps of both ranks together are exactly the sampler's step, as in one process."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    lengths, micro, accum, world = _lengths(64), 2, 2, 2
    step = micro * accum * world
    sampler = LengthBatches(lengths, step=step, seed=0, epoch=lambda: 0)
    per_rank = [
        list(BatchSamplerShard(BatchSampler(sampler, micro, drop_last=False), num_processes=world, process_index=r))
        for r in range(world)
    ]
    order = sampler.order(0)
    for u in range(len(order) // step):
        taken = [i for r in range(world) for b in per_rank[r][u * accum : (u + 1) * accum] for i in b]
        assert sorted(taken) == sorted(order[u * step : (u + 1) * step])


def test_micro_batches_hold_like_lengths_in_random_order():
    lengths, micro = _lengths(400), 4
    sampler = LengthBatches(lengths, step=micro, seed=0, epoch=lambda: 0)
    drawn = torch.randperm(400, generator=torch.Generator().manual_seed(0)).tolist()
    real = sum(lengths)
    waste_random = 1 - real / _padded(lengths, drawn, micro)
    for epoch in range(3):
        order = sampler.order(epoch)
        assert 1 - real / _padded(lengths, order, micro) < waste_random / 3  # ~5 % against ~33 %
        longest = [max(lengths[i] for i in b) for b in _batches(order, micro)]
        assert longest != sorted(longest, reverse=True) and longest != sorted(longest)  # not longest first


def test_the_order_is_a_function_of_seed_and_epoch():
    lengths = _lengths(50)
    a, b = (LengthBatches(lengths, step=4, seed=1, epoch=lambda: 0) for _ in range(2))
    assert a.order(0) == b.order(0) and a.order(1) == b.order(1)  # every rank draws the same
    assert a.order(0) != a.order(1)
    assert a.order(0) != LengthBatches(lengths, step=4, seed=2, epoch=lambda: 0).order(0)
    epoch = [0]
    sampler = LengthBatches(lengths, step=4, seed=1, epoch=lambda: epoch[0])
    assert list(sampler) == a.order(0)
    epoch[0] = 1
    assert list(sampler) == a.order(1) and len(sampler) == 50


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="step"):
        LengthBatches([3, 4], step=0, seed=0, epoch=lambda: 0)


def _varied_examples(tokenizer, n: int = 12) -> list[Example]:
    records = [
        {"id": f"r{i}", "instruction": f"Count to {i}.", "response": " ".join(["ok"] * (1 + 3 * i))} for i in range(n)
    ]
    examples, _ = build_examples(tokenizer, records, max_length=128)
    assert len({len(e.input_ids) for e in examples}) == n
    return examples


@pytest.mark.parametrize("by_length, batch, micro", [(True, 2, 2), (True, 4, 2), (False, 2, 2)])
def test_the_trainer_draws_the_samplers_order_each_epoch(chat_tokenizer, monkeypatch, by_length, batch, micro):
    """The sampler's unit is the optimiser step (micro-batch × accumulation × ranks), cut into micro-batches."""
    examples = _varied_examples(chat_tokenizer)
    seen: list[list[str]] = []
    collate = trainer_mod._Collator.__call__

    def recording(self, batch):
        seen.append([e.id for e in batch])
        return collate(self, batch)

    monkeypatch.setattr(trainer_mod._Collator, "__call__", recording)
    s = TrainSettings(
        rank=4, alpha=8, dropout=0.0, lr=1e-3, batch_size=batch, micro_batch_size=micro, epochs=2.0, seed=5,
        group_by_length=by_length,
    )  # fmt: skip
    fine_tune(build_model("llama", len(chat_tokenizer)), examples, [], s, pad_id=0)
    sampler = LengthBatches([len(e.input_ids) for e in examples], step=batch, seed=5, epoch=lambda: 0)
    want = [[examples[i].id for i in b] for epoch in (0, 1) for b in _batches(sampler.order(epoch), micro)]
    per_epoch = len(examples) // micro
    assert sorted(sum(seen[:per_epoch], [])) == sorted(e.id for e in examples)  # epoch 0: each example once
    assert (seen == want) is by_length
