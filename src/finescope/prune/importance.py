"""Importance of coupled structures (query heads, KV groups, MLP channels, whole blocks) on calibration records.

One pass over the calibration batches gathers what the chosen scores need: gradients of the calibration LM loss
(on every text token, or on the response tokens with calib_loss=response) for the Taylor scores, input
statistics of o_proj/down_proj (wanda_sp, flap), and each block's input/output cosine (block influence).
Scores are then summed over each coupled group. The methods, what each needs gathered and the function that
implements it are declared once in `finescope.registry.IMPORTANCE` / `DEPTH_IMPORTANCE`:

| name        | element score (summed over a group)                  | source                       |
|-------------|------------------------------------------------------|------------------------------|
| taylor      | abs(w·g)                                             | LLM-Pruner `param_first`     |
| taylor2     | abs(w·g) + ½·w²·F                                    | first + Fisher-diagonal term |
| taylor_mix  | abs(w·g − ½·w²·F)                                    | LLM-Pruner `param_mix`       |
| taylor_vector | abs(Σ w·g) over the group (abs after the sum)      | LLM-Pruner vector-wise       |
| magnitude   | w² (group score = L2 norm)                           |                              |
| wanda_sp    | abs(W[:, j])·‖X_j‖₂ on o_proj/down_proj inputs       | Wanda-sp (FLAP paper)        |
| flap        | Var(X_j)·‖W[:, j]‖² on o_proj/down_proj inputs       | FLAP fluctuation metric      |
| random      | uniform random (seeded)                              | baseline                     |

g is the gradient of the token-mean loss over all calibration tokens; F the empirical Fisher diagonal over
mini-batches (mean of squared per-batch gradients). Blocks: `block_influence` = 1 − cos(block input, block
output) averaged over tokens (ShortGPT); `taylor_block` = Σ abs(w·g) over the block's projections.

    batches, info = calibration_batches(tok, records, samples=128, length=256, batch_size=4, seed=0)
    scores = compute_scores(handle.adapter, batches, "taylor")
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import FinescopeError, distributed
from ..data import format_example, record_text
from ..modeling import ArchAdapter
from ..progress import progress
from ..registry import ACTIVATIONS, BLOCK_COSINES, DEPTH_IMPORTANCE, FISHER, GRADIENTS, IMPORTANCE
from ..tokens import IGNORE_INDEX, encode_continuation, encode_prompt, next_token_nll, pad_batch, pad_id

WIDTH_IMPORTANCE = IMPORTANCE.names()
"""Every width importance, in the registry's order."""


class CalibrationError(FinescopeError):
    """The calibration records give no usable tokens."""


# ================================================================================================ calibration data


def calibration_batches(
    tokenizer,
    records,
    *,
    samples: int,
    length: int,
    batch_size: int,
    seed: int,
    source: str = "calibration data",
    loss_on: str = "text",
) -> tuple[list[dict], dict]:
    """Tokenised, right-padded batches with their loss labels (padding = -100).

    `loss_on="text"`: each record's plain text (instruction + response) with the LM loss on every token;
    `loss_on="response"`: the chat-formatted record with the loss on the completion tokens only (prompt = -100).

    At most `samples` records are used (a seeded sample when there are more); records whose completion is cut
    off entirely by `length` are skipped and counted. The batches hold records of like lengths, longest first: every
    score and statistic is a sum over tokens, so the order changes nothing but the padding the forwards compute
    (1.63× the real tokens in sampled order on the default run's top 256 records, 43–256 tokens long).
    """
    records = list(records)
    if len(records) > samples:
        records = random.Random(seed).sample(records, samples)
    rows, skipped = [], 0
    for rec in records:
        prompt, completion = ("", record_text(rec)) if loss_on == "text" else format_example(tokenizer, rec)
        if prompt:
            p, c = encode_prompt(tokenizer, prompt), encode_continuation(tokenizer, completion)
        else:  # a text: all of it is target (its first token, with no left context, never is: labels shift by one)
            p, c = [], encode_prompt(tokenizer, completion)
        ids = (p + c)[:length]
        n_prompt = min(len(p), len(ids))
        labels = [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
        if sum(1 for x in labels[1:] if x != IGNORE_INDEX) == 0:
            skipped += 1
            continue
        rows.append((ids, labels))
    if not rows:
        raise CalibrationError(
            f"{source}: no usable calibration text ({len(records)} records, {skipped} with no "
            f"response tokens within calib_length = {length})"
        )
    rows.sort(key=lambda row: -len(row[0]))  # longest first (stable): batches of like lengths waste little on padding
    pad = pad_id(tokenizer)
    batches = [
        pad_batch([ids for ids, _ in chunk], pad, labels=[lab for _, lab in chunk])
        for chunk in (rows[start : start + batch_size] for start in range(0, len(rows), batch_size))
    ]
    tokens = sum(len(ids) for ids, _ in rows)
    loss_tokens = sum(sum(1 for x in lab[1:] if x != IGNORE_INDEX) for _, lab in rows)
    return batches, {
        "records": len(rows),
        "skipped": skipped,
        "tokens": tokens,
        "loss_tokens": loss_tokens,
        "batches": len(batches),
    }


# ================================================================================================ scores


@dataclass
class Scores:
    """Per-layer importance of every coupled unit (higher = keep)."""

    heads: torch.Tensor
    """(layers, heads): query heads."""
    kv: torch.Tensor
    """(layers, kv_heads): KV groups, their query heads included."""
    channels: torch.Tensor
    """(layers, intermediate): MLP channels."""
    blocks: torch.Tensor | None = None
    """(layers,): whole blocks, when depth pruning asked for it."""
    loss: float | None = None
    """Mean calibration loss of the dense model (when a backward pass ran)."""
    extra: dict = field(default_factory=dict)


def _projections(adapter: ArchAdapter, i: int) -> dict[str, nn.Linear]:
    a, m = adapter.attention(i), adapter.mlp(i)
    return {
        "q": a.q_proj,
        "k": a.k_proj,
        "v": a.v_proj,
        "o": a.o_proj,
        "gate": m.gate_proj,
        "up": m.up_proj,
        "down": m.down_proj,
    }


def _group_sums(adapter: ArchAdapter, i: int, elem: dict[str, tuple[torch.Tensor, torch.Tensor | None]]):
    """Sum element scores (weight, bias) over each coupled group of layer i → (heads, kv, channels)."""
    d, H, K = adapter.head_dim, adapter.num_heads, adapter.num_kv_heads

    def rows(name: str, n: int) -> torch.Tensor:
        w, b = elem[name]
        s = w.reshape(n, -1).sum(1)
        return s + b.reshape(n, -1).sum(1) if b is not None else s

    head = rows("q", H) + elem["o"][0].reshape(elem["o"][0].shape[0], H, d).sum((0, 2))
    kv = rows("k", K) + rows("v", K) + head.reshape(K, H // K).sum(1)
    gate_w, gate_b = elem["gate"]
    up_w, up_b = elem["up"]
    ch = gate_w.sum(1) + up_w.sum(1) + elem["down"][0].sum(0)
    for b in (gate_b, up_b):
        if b is not None:
            ch = ch + b
    return head, kv, ch


def _element_scores(lin: nn.Linear, kind: str, grads: dict, fisher: dict):
    """(weight, bias) element scores of one projection for a Taylor or magnitude kind, in float32."""
    out = []
    for p in (lin.weight, lin.bias):
        if p is None:
            out.append(None)
            continue
        w = p.detach().float()
        if kind == "magnitude":
            out.append(w * w)
            continue
        g = grads[p].float()
        first = w * g
        if kind in ("taylor", "taylor_block"):
            out.append(first.abs())
        elif kind == "taylor2":
            out.append(first.abs() + 0.5 * w * w * fisher[p].float())
        elif kind == "taylor_mix":
            out.append((first - 0.5 * w * w * fisher[p].float()).abs())
        else:
            raise ValueError(kind)
    return tuple(out)


class _Stats:
    """Forward hooks: o_proj/down_proj input moments over real tokens, and block input/output cosines."""

    def __init__(self, adapter: ArchAdapter, activations: bool, blocks: bool):
        self.adapter = adapter
        self.moments = activations
        self.mask: torch.Tensor | None = None
        """attention_mask of the batch being forwarded (set by the calibration pass before each forward)."""
        L = adapter.num_layers
        self.sum: dict[tuple[int, str], torch.Tensor] = {}
        self.sq: dict[tuple[int, str], torch.Tensor] = {}
        self.count = 0
        self.cos = torch.zeros(L, dtype=torch.float64)
        self.block_inputs: dict[int, torch.Tensor] = {}
        self.handles = []
        for i in range(L):
            if activations:
                for name, lin in (("o", adapter.attention(i).o_proj), ("down", adapter.mlp(i).down_proj)):
                    self.handles.append(lin.register_forward_pre_hook(self._moments(i, name)))
            if blocks:
                layer = adapter.layers[i]
                self.handles.append(layer.register_forward_pre_hook(self._block_in(i), with_kwargs=True))
                self.handles.append(layer.register_forward_hook(self._block_out(i)))

    def _real(self, x: torch.Tensor) -> torch.Tensor:
        assert self.mask is not None, "the calibration pass sets the mask before each forward"
        return x.detach().float()[self.mask.to(x.device).bool()]  # (tokens, features)

    def _moments(self, i: int, name: str):
        def hook(_m, args):
            x = self._real(args[0])
            key = (i, name)
            if key not in self.sum:
                self.sum[key] = torch.zeros(x.shape[-1], dtype=torch.float64, device=x.device)
                self.sq[key] = torch.zeros(x.shape[-1], dtype=torch.float64, device=x.device)
            self.sum[key] += x.sum(0).double()
            self.sq[key] += (x * x).sum(0).double()

        return hook

    def _block_in(self, i: int):
        def hook(_m, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            self.block_inputs[i] = self._real(h)

        return hook

    def _block_out(self, i: int):
        def hook(_m, _args, output):
            h = output[0] if isinstance(output, tuple) else output
            cos = nn.functional.cosine_similarity(self.block_inputs.pop(i), self._real(h), dim=-1)
            self.cos[i] += (1 - cos).sum().double().cpu()

        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def compute_scores(
    adapter: ArchAdapter,
    batches: list[dict],
    importance: str,
    *,
    depth_importance: str | None = None,
    seed: int = 0,
    desc: str = "calibration",
    on_batch: Callable[[dict], None] | None = None,
) -> Scores:
    """Scores of every head, KV group and MLP channel (and block, if `depth_importance`) of the model.

    Phases: one pass over the calibration batches gathers what the scores need (`_calibration_pass`), then the
    width scores are summed over coupled groups (`_width_scores`) and the block scores taken (the depth importance's
    registry implementation).

    on_batch: called with each batch (on the model's device) before its forward, so that hooks of the caller's
    (compensation's `Collector`) gather their own statistics in the same pass; the pass then runs even for a
    score that needs none."""
    width = IMPORTANCE[importance]  # an unknown name: ValueError listing the known ones
    depth = DEPTH_IMPORTANCE[depth_importance] if depth_importance is not None else None
    needs = _needs(importance, depth_importance)
    need_grad = GRADIENTS in needs
    need_act = ACTIVATIONS in needs
    need_bi = BLOCK_COSINES in needs
    gathered = _Gathered(stats=_Stats(adapter, need_act, need_bi) if (need_act or need_bi) else None)
    if need_act or need_bi or need_grad or on_batch is not None:
        fisher = FISHER in width.needs
        _calibration_pass(adapter, batches, gathered, need_grad=need_grad, fisher=fisher, desc=desc, on_batch=on_batch)
    heads, kv, channels = _width_scores(adapter, width.implementation(), gathered, seed)
    blocks = depth.implementation()(adapter, gathered) if depth is not None else None
    loss = gathered.loss_sum / gathered.loss_tokens if need_grad and gathered.loss_tokens else None
    return Scores(heads=heads, kv=kv, channels=channels, blocks=blocks, loss=loss)


def _needs(importance: str, depth_importance: str | None) -> frozenset:
    depth = DEPTH_IMPORTANCE[depth_importance].needs if depth_importance is not None else frozenset()
    return IMPORTANCE[importance].needs | depth


def runs_a_pass(importance: str, depth_importance: str | None = None) -> bool:
    """Whether `compute_scores` forwards the calibration batches for these scores (magnitude and random read the
    weights only): where it does, other statistics can ride on that pass (`on_batch`)."""
    return bool(_needs(importance, depth_importance) & {GRADIENTS, ACTIVATIONS, BLOCK_COSINES})


@dataclass
class _Gathered:
    """What the pass over the calibration batches collected."""

    stats: _Stats | None = None
    """Input moments / block cosines (activation and block-influence scores)."""
    grads: dict = field(default_factory=dict)
    """Parameter → gradient of the token-mean loss over all calibration tokens."""
    fisher: dict = field(default_factory=dict)
    """Parameter → empirical Fisher diagonal over mini-batches (second-order Taylor scores)."""
    loss_sum: float = 0.0
    loss_tokens: int = 0


def _scored_parameters(adapter: ArchAdapter) -> list[torch.Tensor]:
    return [
        p
        for i in range(adapter.num_layers)
        for lin in _projections(adapter, i).values()
        for p in (lin.weight, lin.bias)
        if p is not None
    ]


def _calibration_pass(
    adapter: ArchAdapter,
    batches: list[dict],
    gathered: _Gathered,
    *,
    need_grad: bool,
    fisher: bool,
    desc: str,
    on_batch: Callable[[dict], None] | None = None,
) -> None:
    """Forward every batch (hooks of `gathered.stats` record activations); with `need_grad`, backpropagate the
    token-mean loss into the projections only. Restores every parameter's `requires_grad` and removes the hooks."""
    model = adapter.model
    params = _scored_parameters(adapter)
    stats = gathered.stats
    device = next(model.parameters()).device
    total_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    ranks = distributed.ranks()
    mine = [batches[i] for i in ranks.mine(len(batches))]  # several ranks: each its share, summed below
    desc += ranks.tag
    saved_flags = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        if need_grad:
            for param in params:
                param.requires_grad_(True)
        for batch in progress(mine, desc=desc, unit="batch"):
            batch = {k: v.to(device) for k, v in batch.items()}
            if on_batch is not None:
                on_batch(batch)
            if stats is not None:
                stats.mask = batch["attention_mask"]
                stats.count += int(batch["attention_mask"].sum())
            with torch.set_grad_enabled(need_grad):
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
                loss, n = next_token_nll(out.logits, batch["labels"])
            gathered.loss_sum += float(loss.detach())
            gathered.loss_tokens += n
            if need_grad:
                (loss / total_tokens).backward()
                _accumulate_gradients(params, gathered, n, total_tokens, fisher)
            del out, loss
    finally:
        for p, flag in saved_flags.items():
            p.requires_grad_(flag)
        if stats is not None:
            stats.close()
    if ranks.world > 1:
        _sum_over_ranks(adapter, gathered, params, need_grad=need_grad, fisher=fisher)


def _sum_over_ranks(
    adapter: ArchAdapter, gathered: _Gathered, params: list[torch.Tensor], *, need_grad: bool, fisher: bool
) -> None:
    """All-reduce what each rank gathered over its batches: gradient sums, Fisher terms, activation moments,
    block cosines, loss. A rank without batches (more ranks than batches) contributes zeros."""
    what = "pruning importance (sum over ranks)"
    totals = distributed.all_reduce_sum(torch.tensor([gathered.loss_sum, float(gathered.loss_tokens)]), what)
    gathered.loss_sum, gathered.loss_tokens = float(totals[0]), int(totals[1])
    if need_grad:
        for p in params:
            zero_grad = torch.zeros_like(p, dtype=torch.float32)
            gathered.grads[p] = distributed.all_reduce_sum(gathered.grads.get(p, zero_grad), what)
            if fisher:
                zero = torch.zeros_like(p, dtype=torch.float32)
                gathered.fisher[p] = distributed.all_reduce_sum(gathered.fisher.get(p, zero), what)
    stats = gathered.stats
    if stats is None:
        return
    counts = distributed.all_reduce_sum(torch.tensor([float(stats.count)]), what)
    stats.count = int(counts[0])
    stats.cos = distributed.all_reduce_sum(stats.cos, what)
    if stats.moments:
        dev = next(adapter.model.parameters()).device
        for i in range(adapter.num_layers):
            for name, lin in (("o", adapter.attention(i).o_proj), ("down", adapter.mlp(i).down_proj)):
                zero = torch.zeros(lin.in_features, dtype=torch.float64, device=dev)
                stats.sum[(i, name)] = distributed.all_reduce_sum(stats.sum.get((i, name), zero.clone()), what)
                stats.sq[(i, name)] = distributed.all_reduce_sum(stats.sq.get((i, name), zero.clone()), what)


def _accumulate_gradients(
    params: list[torch.Tensor], gathered: _Gathered, n: int, total_tokens: int, fisher: bool
) -> None:
    """Add this batch's gradients (of loss / total_tokens) to the sums, and their Fisher term; clear `.grad`."""
    for p in params:
        g = p.grad
        assert g is not None, "every scored projection takes part in the forward, so backward gave it a gradient"
        # Summed in float32: over many batches, bf16 sums (a bf16 model's gradients) lose percent-level precision.
        gathered.grads[p] = g.detach().float() if p not in gathered.grads else gathered.grads[p].add_(g)
        if fisher:
            # Empirical Fisher over mini-batches: per-batch mean-loss gradient, squared, weighted.
            gb = g.float() * (total_tokens / max(n, 1))
            sq = gb * gb * (n / total_tokens)
            gathered.fisher[p] = sq if p not in gathered.fisher else gathered.fisher[p].add_(sq)
        p.grad = None


LayerScores = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""(heads, kv, channels) scores of one layer."""


def _width_scores(adapter: ArchAdapter, score_layer, gathered: _Gathered, seed: int) -> LayerScores:
    """(heads, kv, channels) of every layer, by one width importance's `score_layer` (its registry implementation)."""
    L, H, K = adapter.num_layers, adapter.num_heads, adapter.num_kv_heads
    heads, kv, channels = torch.zeros(L, H), torch.zeros(L, K), torch.zeros(L, adapter.intermediate_size)
    gen = torch.Generator().manual_seed(seed)
    for i in range(L):
        heads[i], kv[i], channels[i] = score_layer(adapter, i, gathered, gen)
    return heads, kv, channels


# ------------------------------------------------------------------------- the width importances (registry rows)
# Each: (adapter, layer, gathered, generator) -> (heads, kv, channels) of that layer.


def taylor(adapter: ArchAdapter, i: int, gathered: _Gathered, gen: torch.Generator) -> LayerScores:
    return _weight_group_scores(adapter, i, "taylor", gathered)


def taylor2(adapter: ArchAdapter, i: int, gathered: _Gathered, gen: torch.Generator) -> LayerScores:
    return _weight_group_scores(adapter, i, "taylor2", gathered)


def taylor_mix(adapter: ArchAdapter, i: int, gathered: _Gathered, gen: torch.Generator) -> LayerScores:
    return _weight_group_scores(adapter, i, "taylor_mix", gathered)


def taylor_vector(adapter: ArchAdapter, i: int, gathered: _Gathered, gen: torch.Generator) -> LayerScores:
    """LLM-Pruner's vector-wise importance: abs of the summed w·g over each coupled group (the first-order change
    of the loss when the whole group is removed), where `taylor` sums the elements' abs values."""
    elem = {
        k: tuple(None if p is None else p.detach().float() * gathered.grads[p].float() for p in (lin.weight, lin.bias))
        for k, lin in _projections(adapter, i).items()
    }
    h, g, c = _group_sums(adapter, i, elem)
    return h.abs().cpu(), g.abs().cpu(), c.abs().cpu()


def magnitude(adapter: ArchAdapter, i: int, gathered: _Gathered, gen: torch.Generator) -> LayerScores:
    return _weight_group_scores(adapter, i, "magnitude", gathered)


def wanda_sp(adapter: ArchAdapter, i: int, gathered: _Gathered, gen: torch.Generator) -> LayerScores:
    assert gathered.stats is not None, "activation importances gather input statistics"
    return _activation_group_scores(adapter, i, "wanda_sp", gathered.stats)


def flap(adapter: ArchAdapter, i: int, gathered: _Gathered, gen: torch.Generator) -> LayerScores:
    assert gathered.stats is not None, "activation importances gather input statistics"
    return _activation_group_scores(adapter, i, "flap", gathered.stats)


def random_scores(adapter: ArchAdapter, i: int, gathered: _Gathered, gen: torch.Generator) -> LayerScores:
    H, K = adapter.num_heads, adapter.num_kv_heads
    heads = torch.rand(H, generator=gen)
    kv = torch.rand(K, generator=gen)
    return heads, kv, torch.rand(adapter.intermediate_size, generator=gen)


def _weight_group_scores(adapter: ArchAdapter, i: int, importance: str, gathered: _Gathered):
    """Taylor or magnitude scores of layer i's heads, KV groups and channels (element scores summed per group)."""
    elem = {
        k: _element_scores(lin, importance, gathered.grads, gathered.fisher)
        for k, lin in _projections(adapter, i).items()
    }
    h, g, c = _group_sums(adapter, i, elem)
    if importance == "magnitude":
        h, g, c = h.sqrt(), g.sqrt(), c.sqrt()
    return h.cpu(), g.cpu(), c.cpu()


def _activation_group_scores(adapter: ArchAdapter, i: int, importance: str, stats: _Stats):
    """wanda_sp / flap scores of layer i from the o_proj and down_proj input statistics."""
    proj = _projections(adapter, i)
    cols = {}
    for name in ("o", "down"):
        s, sq = stats.sum[(i, name)], stats.sq[(i, name)]
        w = proj[name].weight.detach().float()
        if importance == "wanda_sp":
            cols[name] = w.abs().sum(0).double() * sq.sqrt()
        else:  # flap: sample variance of each input feature × squared column norm
            mean = s / stats.count
            var = (sq / stats.count - mean * mean).clamp_min(0)
            cols[name] = var * (w * w).sum(0).double()
    heads = cols["o"].reshape(adapter.num_heads, adapter.head_dim).sum(1).float().cpu()
    return heads, heads.reshape(adapter.num_kv_heads, -1).sum(1), cols["down"].float().cpu()


# ------------------------------------------------------------------------- the depth importances (registry rows)
# Each: (adapter, gathered) -> (layers,) block scores.


def block_influence(adapter: ArchAdapter, gathered: _Gathered) -> torch.Tensor:
    assert gathered.stats is not None, "block influence gathers block cosines"
    return (gathered.stats.cos / max(gathered.stats.count, 1)).float()


def taylor_block(adapter: ArchAdapter, gathered: _Gathered) -> torch.Tensor:
    blocks = torch.zeros(adapter.num_layers)
    for i in range(adapter.num_layers):
        blocks[i] = sum(
            float(s.sum())
            for lin in _projections(adapter, i).values()
            for s in _element_scores(lin, "taylor_block", gathered.grads, gathered.fisher)
            if s is not None
        )
    return blocks


# ================================================================================================ selection


def select_blocks(scores: Scores, depth: int) -> list[int]:
    """The `depth` least important blocks (to drop)."""
    if depth == 0:
        return []
    assert scores.blocks is not None, "depth pruning needs block scores (compute_scores with depth_importance)"
    order = torch.argsort(scores.blocks, stable=True)
    return sorted(int(i) for i in order[:depth])


def select_attention(
    head_scores: torch.Tensor, kv_scores: torch.Tensor, *, heads: int, kv_heads: int, mode: str
) -> tuple[list[int], list[int]]:
    """Kept (query heads, KV heads) of one layer: top query heads inside every KV group (same count per group),
    or the top KV groups with all their query heads."""
    H, K = head_scores.numel(), kv_scores.numel()
    g = H // K
    if mode == "query":
        if kv_heads != K:
            raise ValueError("query mode keeps every KV head")
        per = heads // K
        kept = []
        for grp in range(K):
            local = head_scores[grp * g : (grp + 1) * g]
            top = torch.argsort(local, descending=True, stable=True)[:per]
            kept += [grp * g + int(t) for t in top]
        return sorted(kept), list(range(K))
    if heads != kv_heads * g:
        raise ValueError("kv_group mode keeps whole groups")
    groups = sorted(int(t) for t in torch.argsort(kv_scores, descending=True, stable=True)[:kv_heads])
    return [grp * g + j for grp in groups for j in range(g)], groups


def select_channels(channel_scores: torch.Tensor, width: int) -> list[int]:
    return sorted(int(t) for t in torch.argsort(channel_scores, descending=True, stable=True)[:width])
