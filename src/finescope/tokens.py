"""Token ids to model inputs: the BOS rule for prompts, padded batches with attention masks, the masked LM loss.

The one place where FineScope turns token-id lists into tensors, so that pruning (calibration), fine-tuning,
activation harvesting, generation and log-likelihood scoring pad, mask and score the same way. A lower layer:
it imports torch and nothing from the stage packages.

    from finescope.tokens import encode_prompt, pad_batch, pad_id, next_token_nll
    rows = [encode_prompt(tok, "Q: 2+2?\\nA:"), encode_prompt(tok, "Hi")]
    batch = pad_batch(rows, pad_id(tok), side="left")        # {"input_ids", "attention_mask"}
    batch = pad_batch(rows, pad_id(tok), labels=rows)        # right-padded, labels -100 on padding
    loss_sum, n = next_token_nll(model(**batch).logits, batch["labels"])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

IGNORE_INDEX = -100
"""Label of a position that carries no loss (prompt tokens, padding): the default of `F.cross_entropy`."""


# ================================================================================================ encoding


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a prompt: the tokenizer's special tokens (BOS) are added unless the text already starts with
    the BOS token, as a chat template that renders BOS does. The one rule for every stage that tokenizes a prompt
    (or a whole text), so calibration, training, scoring and generation see the same ids."""
    bos = tokenizer.bos_token
    return tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]


def encode_continuation(tokenizer, text: str) -> list[int]:
    """Token ids of text that follows a prompt: no special tokens at all (an empty text gives no ids)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


# ================================================================================================ batches


def pad_id(tokenizer, fallback: int = 0) -> int:
    """The id that fills padding: the tokenizer's pad token, else its EOS, else `fallback`.

    Padding is always masked out, so the choice never changes a score; it only has to be a valid id (and, for
    generation, one that ends a completion, which EOS does)."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return fallback


def pad_rows(rows: Sequence[Sequence[int]], value: int, width: int, *, side: str = "right") -> torch.Tensor:
    """(len(rows), width) long tensor: each row's values at the right end (`side="left"` padding) or the start
    (`side="right"`), `value` elsewhere. Rows longer than `width` are an error (cut them first)."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', not {side!r}")
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for r, row in enumerate(rows):
        n = len(row)
        if n:
            cols = slice(width - n, width) if side == "left" else slice(0, n)
            out[r, cols] = torch.tensor(list(row), dtype=torch.long)
    return out


def pad_batch(
    rows: Sequence[Sequence[int]],
    pad: int,
    *,
    side: str = "right",
    labels: Sequence[Sequence[int]] | None = None,
    min_width: int = 0,
) -> dict[str, torch.Tensor]:
    """`input_ids` and `attention_mask` (1 on real tokens) of token-id rows padded to the longest row (at least
    `min_width`), plus `labels` (`IGNORE_INDEX` on padding) when `labels` are given, row by row.

    Left padding puts every row's last token in the last column (prompts to generate from, contexts to score);
    right padding keeps positions 0… for the real tokens (training and loss batches)."""
    width = max([min_width, *(len(r) for r in rows)])
    batch = {
        "input_ids": pad_rows(rows, pad, width, side=side),
        "attention_mask": pad_rows([[1] * len(r) for r in rows], 0, width, side=side),
    }
    if labels is not None:
        batch["labels"] = pad_rows(labels, IGNORE_INDEX, width, side=side)
    return batch


# ================================================================================================ loss


LOSS_CHUNK_ELEMENTS = 1 << 25
"""Logits per chunk when a loss is taken in chunks of positions: 32 Mi elements, 128 MiB in float32 (~260 positions
of a Llama-3 vocabulary, 128,256). Each chunk's float32 log-softmax is recomputed in the backward pass (activation
checkpointing) instead of kept, so one chunk of them exists at a time, however long the batch."""

LOSS_ONE_PIECE_MAX = 1 << 27
"""Logits (positions × vocabulary) up to which a loss is taken in one piece: 128 Mi elements, 512 MiB in float32, e.g.
~1,000 positions of a Llama-3 vocabulary. Every CPU run of the 135M default (4 × 256 positions × 49,152) stays below
it, with the arithmetic of before to the bit; a 7-8B model's batch of 8 × 2,048 positions is 16× above it."""


def chunked_row_sum(fn, rows: torch.Tensor, *aligned, chunk_elements: int | None = None) -> torch.Tensor:
    """Σ over chunks of `fn(rows[a:b], *(x[a:b] for x in aligned))`: a float32 scalar summed over the rows of an
    (N, vocab) tensor, each chunk recomputed in the backward pass when gradients are on. `aligned` are row-aligned
    companions (targets, teacher rows, anything sliced by rows). One piece, no checkpoint, up to
    `LOSS_ONE_PIECE_MAX` elements; above, chunks of `LOSS_CHUNK_ELEMENTS`. An explicit `chunk_elements` sets both
    (one piece up to it, chunks of it above)."""
    size = LOSS_CHUNK_ELEMENTS if chunk_elements is None else chunk_elements
    one_piece = LOSS_ONE_PIECE_MAX if chunk_elements is None else chunk_elements
    if rows.numel() <= one_piece:
        return fn(rows, *aligned)
    step = max(1, size // max(1, rows[0].numel()))
    grad = torch.is_grad_enabled() and rows.requires_grad
    total = torch.zeros((), dtype=torch.float32, device=rows.device)
    for a in range(0, rows.shape[0], step):
        part = (rows[a : a + step], *(x[a : a + step] for x in aligned))
        if grad:  # fn draws no random numbers: no RNG state to save and restore for the recomputation
            total = total + torch.utils.checkpoint.checkpoint(fn, *part, use_reentrant=False, preserve_rng_state=False)
        else:
            total = total + fn(*part)
    return total


def _nll_sum(rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(rows.float(), targets, reduction="sum")


def next_token_nll(
    logits: torch.Tensor, labels: torch.Tensor, *, chunk_elements: int | None = None
) -> tuple[torch.Tensor, int]:
    """Summed next-token negative log-likelihood (float32) of every labelled position, and how many there are.

    `logits` (batch, T, vocab) predict position t+1 from position t; `labels` (batch, T) hold the token ids, with
    `IGNORE_INDEX` where no loss falls. Divide the sum by the total count of a step for the token-weighted mean
    (what fine-tuning optimises and Taylor importance differentiates). Logits above `LOSS_ONE_PIECE_MAX` elements
    (or `chunk_elements`) are scored on their labelled positions only, in checkpointed chunks (`chunked_row_sum`):
    the same sum, without a float32 copy of the whole batch's logits and their log-softmax."""
    targets = labels[:, 1:]
    count = int((targets != IGNORE_INDEX).sum())
    one_piece = LOSS_ONE_PIECE_MAX if chunk_elements is None else chunk_elements
    if logits.numel() > one_piece and count:
        mask = targets != IGNORE_INDEX
        rows = logits[:, :-1][mask]  # (N, vocab) in the model's dtype; each chunk is upcast inside the checkpoint
        return chunked_row_sum(_nll_sum, rows, targets[mask], chunk_elements=chunk_elements), count
    logits = logits[:, :-1].float()
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss, count
