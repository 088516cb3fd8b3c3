"""Token-level unlikelihood against repetition (Welleck et al. 2019, "Neural text generation with unlikelihood
training", eq. 4): at each labelled position t the model is pushed away from the tokens the response has already
produced, other than the one it should produce now,

    UL_t = − Σ_{c ∈ C_t} log(1 − p(c | x_<t)),   C_t = {y_1, …, y_{t−1}} \\ {y_t}

where y are the labelled (response) tokens of the example, each distinct token counted once. The prompt's tokens
are not candidates: an answer must be free to copy the numbers of its question. The term is summed over the
labelled positions like the cross-entropy and divided by the same count; the step's loss gains γ·UL. Taken in
checkpointed chunks of positions above `tokens.LOSS_ONE_PIECE_MAX` logits, like the other loss terms.
"""

from __future__ import annotations

import torch

from ..tokens import IGNORE_INDEX, chunked_row_sum

_NO_CANDIDATE = -1
_P_MAX = 1 - 1e-6  # log(1 − p) stays finite when the model is certain of a candidate


def candidates(labels: torch.Tensor) -> torch.Tensor:
    """(N, K) candidate token ids per labelled position of a (batch, T) label tensor, row-major like the labelled
    logits (`distill.labelled_logits`), padded with -1: the distinct labelled tokens before the position's target,
    the target itself excluded."""
    rows: list[list[int]] = []
    for seq in labels[:, 1:].tolist():
        seen: list[int] = []
        known: set[int] = set()
        for y in seq:
            if y == IGNORE_INDEX:
                continue
            rows.append([c for c in seen if c != y])
            if y not in known:
                known.add(y)
                seen.append(y)
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), max(width, 1)), _NO_CANDIDATE, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def _ul_sum(rows: torch.Tensor, cands: torch.Tensor) -> torch.Tensor:
    probs = rows.float().softmax(-1)
    valid = cands != _NO_CANDIDATE
    p = probs.gather(-1, cands.clamp(min=0)).clamp(max=_P_MAX)
    return -(torch.log1p(-p) * valid).sum()


def unlikelihood_summed(logits: torch.Tensor, labels: torch.Tensor, *, chunk_elements: int | None = None):
    """Σ over the labelled positions of a batch of the token-level unlikelihood term (float32 scalar)."""
    mask = labels[:, 1:] != IGNORE_INDEX
    rows = logits[:, :-1][mask]
    if rows.shape[0] == 0:
        return logits.sum() * 0.0
    cands = candidates(labels.cpu()).to(rows.device)
    return chunked_row_sum(_ul_sum, rows, cands, chunk_elements=chunk_elements)
