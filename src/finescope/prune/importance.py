"""Importance of coupled structures (query heads, KV groups, MLP channels, whole blocks) on calibration records.

One pass over the calibration batches gathers what the chosen scores need: gradients of the LM loss on the
response tokens (Taylor scores), input statistics of o_proj/down_proj (wanda_sp, flap), and each block's
input/output cosine (block influence). Scores are then summed over each coupled group:

| name        | element score (summed over a group)                  | source                       |
|-------------|------------------------------------------------------|------------------------------|
| taylor      | abs(w·g)                                             | LLM-Pruner `param_first`     |
| taylor2     | abs(w·g) + ½·w²·F                                    | first + Fisher-diagonal term |
| taylor_mix  | abs(w·g − ½·w²·F)                                    | LLM-Pruner `param_mix`       |
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
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import FinescopeError
from ..data import format_example, record_text
from ..progress import progress
from ..modeling import ArchAdapter

WIDTH_IMPORTANCE = ("taylor", "taylor2", "taylor_mix", "magnitude", "wanda_sp", "flap", "random")
DEPTH_IMPORTANCE = ("block_influence", "taylor_block")


class CalibrationError(FinescopeError):
    """The calibration records give no usable tokens."""


# ================================================================================================ calibration data


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def calibration_batches(tokenizer, records, *, samples: int, length: int, batch_size: int, seed: int,
                        source: str = "calibration data", loss_on: str = "text") -> tuple[list[dict], dict]:
    """Tokenised, right-padded batches with their loss labels (padding = -100).

    `loss_on="text"`: each record's plain text (instruction + response) with the LM loss on every token;
    `loss_on="response"`: the chat-formatted record with the loss on the completion tokens only (prompt = -100).

    At most `samples` records are used (a seeded sample when there are more); records whose completion is cut
    off entirely by `length` are skipped and counted.
    """
    records = list(records)
    if len(records) > samples:
        records = random.Random(seed).sample(records, samples)
    bos = tokenizer.bos_token_id
    add_bos = bos is not None and (_probe := tokenizer("a")["input_ids"]) and _probe[0] == bos
    rows, skipped = [], 0
    for rec in records:
        if loss_on == "text":
            prompt, completion = "", record_text(rec)
        else:
            prompt, completion = format_example(tokenizer, rec)
        p, c = _encode(tokenizer, prompt), _encode(tokenizer, completion)
        if add_bos and not (p or c)[:1] == [bos]:
            p = [bos] + p
        ids = (p + c)[:length]
        n_prompt = min(len(p), len(ids))
        # The first token of a text record has no left context to be predicted from.
        labels = [-100] * n_prompt + ids[n_prompt:]
        if sum(1 for x in labels[1:] if x != -100) == 0:
            skipped += 1
            continue
        rows.append((ids, labels))
    if not rows:
        raise CalibrationError(f"{source}: no usable calibration text ({len(records)} records, {skipped} with no "
                               f"response tokens within calib_length = {length})")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, (ids, lab) in enumerate(chunk):
            input_ids[i, :len(ids)] = torch.tensor(ids)
            labels[i, :len(lab)] = torch.tensor(lab)
            mask[i, :len(ids)] = 1
        batches.append({"input_ids": input_ids, "attention_mask": mask, "labels": labels})
    tokens = sum(len(ids) for ids, _ in rows)
    loss_tokens = sum(sum(1 for x in lab[1:] if x != -100) for _, lab in rows)
    return batches, {"records": len(rows), "skipped": skipped, "tokens": tokens, "loss_tokens": loss_tokens,
                     "batches": len(batches)}


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
    return {"q": a.q_proj, "k": a.k_proj, "v": a.v_proj, "o": a.o_proj,
            "gate": m.gate_proj, "up": m.up_proj, "down": m.down_proj}


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
        self.adapter, self.mask = adapter, None
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


def compute_scores(adapter: ArchAdapter, batches: list[dict], importance: str, *, depth_importance: str | None = None,
                   seed: int = 0, desc: str = "calibration") -> Scores:
    """Scores of every head, KV group and MLP channel (and block, if `depth_importance`) of the model."""
    if importance not in WIDTH_IMPORTANCE:
        raise ValueError(f"unknown importance {importance!r}")
    model = adapter.model
    taylor = importance.startswith("taylor")
    second = importance in ("taylor2", "taylor_mix")
    need_grad = taylor or depth_importance == "taylor_block"
    need_act = importance in ("wanda_sp", "flap")
    need_bi = depth_importance == "block_influence"
    L = adapter.num_layers
    params = [p for i in range(L) for lin in _projections(adapter, i).values() for p in (lin.weight, lin.bias)
              if p is not None]
    grads: dict = {}
    fisher: dict = {}
    loss_sum, loss_tokens = 0.0, 0
    stats = _Stats(adapter, need_act, need_bi) if (need_act or need_bi) else None
    device = next(model.parameters()).device
    total_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    saved_flags = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        if need_grad:
            for p in params:
                p.requires_grad_(True)
        if need_act or need_bi or need_grad:
            for batch in progress(batches, desc=desc, unit="batch"):
                batch = {k: v.to(device) for k, v in batch.items()}
                if stats is not None:
                    stats.mask = batch["attention_mask"]
                    stats.count += int(batch["attention_mask"].sum())
                n = int((batch["labels"][:, 1:] != -100).sum())
                with torch.set_grad_enabled(need_grad):
                    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
                    logits = out.logits[:, :-1].float()
                    loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                       batch["labels"][:, 1:].reshape(-1), ignore_index=-100,
                                                       reduction="sum")
                loss_sum += float(loss.detach())
                loss_tokens += n
                if need_grad:
                    (loss / total_tokens).backward()
                    for p in params:
                        g = p.grad
                        grads[p] = g.detach().clone() if p not in grads else grads[p].add_(g)
                        if second:
                            # Empirical Fisher over mini-batches: per-batch mean-loss gradient, squared, weighted.
                            gb = g.float() * (total_tokens / max(n, 1))
                            sq = gb * gb * (n / total_tokens)
                            fisher[p] = sq if p not in fisher else fisher[p].add_(sq)
                        p.grad = None
                del out, logits, loss
    finally:
        for p, flag in saved_flags.items():
            p.requires_grad_(flag)
        if stats is not None:
            stats.close()

    heads = torch.zeros(L, adapter.num_heads)
    kv = torch.zeros(L, adapter.num_kv_heads)
    channels = torch.zeros(L, adapter.intermediate_size)
    blocks = None
    gen = torch.Generator().manual_seed(seed)
    d, H = adapter.head_dim, adapter.num_heads
    for i in range(L):
        proj = _projections(adapter, i)
        if importance == "random":
            heads[i] = torch.rand(H, generator=gen)
            kv[i] = torch.rand(adapter.num_kv_heads, generator=gen)
            channels[i] = torch.rand(adapter.intermediate_size, generator=gen)
        elif taylor or importance == "magnitude":
            elem = {k: _element_scores(lin, importance, grads, fisher) for k, lin in proj.items()}
            h, g, c = _group_sums(adapter, i, elem)
            if importance == "magnitude":
                h, g, c = h.sqrt(), g.sqrt(), c.sqrt()
            heads[i], kv[i], channels[i] = h.cpu(), g.cpu(), c.cpu()
        else:
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
            heads[i] = cols["o"].reshape(H, d).sum(1).float().cpu()
            kv[i] = heads[i].reshape(adapter.num_kv_heads, -1).sum(1)
            channels[i] = cols["down"].float().cpu()
    if depth_importance == "block_influence":
        blocks = (stats.cos / max(stats.count, 1)).float()
    elif depth_importance == "taylor_block":
        blocks = torch.zeros(L)
        for i in range(L):
            blocks[i] = sum(float(s.sum()) for lin in _projections(adapter, i).values()
                            for s in _element_scores(lin, "taylor_block", grads, fisher) if s is not None)
    loss = loss_sum / loss_tokens if loss_tokens else None
    return Scores(heads=heads, kv=kv, channels=channels, blocks=blocks, loss=loss if need_grad else None)


# ================================================================================================ selection


def select_blocks(scores: Scores, depth: int) -> list[int]:
    """The `depth` least important blocks (to drop)."""
    if depth == 0:
        return []
    order = torch.argsort(scores.blocks, stable=True)
    return sorted(int(i) for i in order[:depth])


def select_attention(head_scores: torch.Tensor, kv_scores: torch.Tensor, *, heads: int, kv_heads: int,
                     mode: str) -> tuple[list[int], list[int]]:
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
            local = head_scores[grp * g:(grp + 1) * g]
            top = torch.argsort(local, descending=True, stable=True)[:per]
            kept += [grp * g + int(t) for t in top]
        return sorted(kept), list(range(K))
    if heads != kv_heads * g:
        raise ValueError("kv_group mode keeps whole groups")
    groups = sorted(int(t) for t in torch.argsort(kv_scores, descending=True, stable=True)[:kv_heads])
    return [grp * g + j for grp in groups for j in range(g)], groups


def select_channels(channel_scores: torch.Tensor, width: int) -> list[int]:
    return sorted(int(t) for t in torch.argsort(channel_scores, descending=True, stable=True)[:width])
