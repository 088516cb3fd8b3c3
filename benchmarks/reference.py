"""The machine's reference throughput, printed beside every timing a benchmark reports (machines differ ~3x, so a
wall time means little without it): tokens/s of a plain forward of the model, in the benchmark's own process.

    from reference import reference_throughput   # benchmarks/ is on sys.path: the script's own folder
    reference_throughput()                       # the embedded default model, loaded here
    reference_throughput(model)                  # a loaded model (a folder path also works)

One definition for every benchmark: batch 8 x 128 random token ids, one warm-up, median of 3 forwards, no gradients.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch


def token_ids(model, shape: tuple[int, ...]) -> torch.Tensor:
    """Random token ids for a timing forward: ids 100…20,000 of a real vocabulary (any id of a tiny test model's)."""
    vocab = model.config.vocab_size
    low, high = (100, 20000) if vocab >= 20000 else (0, vocab)
    return torch.randint(low, high, shape, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def reference_throughput(model: Any = None) -> float:
    """Tokens/s of a plain forward (batch 8 × 128 tokens), median of 3. `model`: a loaded model, a model folder,
    or None for the embedded default."""
    if model is None or isinstance(model, (str, Path)):
        from finescope.modeling import load

        model = load(str(model) if model is not None else "default", device="cpu").model
    ids = token_ids(model, (8, 128))
    model(input_ids=ids[:2, :16])  # warm-up
    rates = []
    for _ in range(3):
        t = time.perf_counter()
        model(input_ids=ids)
        rates.append(ids.numel() / (time.perf_counter() - t))
    return round(statistics.median(rates), 1)
