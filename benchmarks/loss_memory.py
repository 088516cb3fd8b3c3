"""Memory of the training loss at a 7-8B model's vocabulary: the KD recipe's loss (cross-entropy on the labelled
tokens plus forward KL against cached top-64 teacher targets, as `recover.finetune.batch_loss` takes it) forward and
backward on bf16 logits of a Llama-3-sized vocabulary (128,256), taken in one piece (what FineScope did before
`tokens.LOSS_ONE_PIECE_MAX`) and in checkpointed chunks of positions (now, above that size). Each setting runs in
its own process, three times; the peak resident memory of that process (ru_maxrss) minus its resident memory just
before the loss (logits, targets and their gradient buffer already allocated) is the loss's own working memory.
On a GPU (`--device cuda`, run by benchmarks/gpu_check.sh) the working memory is the peak of the allocated device
memory minus what was allocated before the loss. Prints one JSON object.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/loss_memory.py [--positions 2048] [--device cuda] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

VOCAB = 128_256  # Llama-3 / 3.1 8B
BATCH = 4


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(positions: int, chunked: bool, device: str) -> dict:
    import torch

    from finescope.recover.distill import TopK, kd_summed
    from finescope.recover.loss_terms import KdSettings
    from finescope.tokens import next_token_nll

    torch.manual_seed(0)
    length = positions // BATCH + 1
    # made in bf16 directly: no float32 temporary raises the process's high-water mark before the loss
    logits = torch.randn(BATCH, length, VOCAB, dtype=torch.bfloat16, device=device).mul_(2).requires_grad_()
    labels = torch.randint(0, VOCAB, (BATCH, length), device=device)
    labels[:, 0] = -100
    mass = torch.log_softmax(torch.randn(positions, 65, device=device), dim=-1)  # 64 teacher tokens, the rest's bin
    ids = torch.randint(0, VOCAB, (positions, 64), device=device)
    teacher = TopK(ids, mass[:, :64].contiguous(), mass[:, 64].contiguous())
    limit = None if chunked else 1 << 62  # None: the shipped sizes (tokens.LOSS_ONE_PIECE_MAX, LOSS_CHUNK_ELEMENTS)
    kd = KdSettings(weight=0.8, temperature=1.0)
    logits.grad = torch.zeros_like(logits)  # the gradient buffer exists in training before the loss's backward
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() / 2**20 if cuda else rss_mib()
    t = time.perf_counter()
    ce, n = next_token_nll(logits, labels, chunk_elements=limit)
    kl = kd_summed(logits, labels, teacher, kd, chunk_elements=limit)
    loss = (0.2 * ce + 0.8 * kl) / n
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    peak = (
        torch.cuda.max_memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {"loss": float(loss), "seconds": seconds, "before_mib": before, "peak_mib": peak, "positions": n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--positions", type=int, default=2048, help="labelled positions per step (batch 4)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="cpu (peak RSS) or cuda (peak allocated device memory)")
    ap.add_argument("--model", default="default", help="the model of the reference throughput (a folder; smoke tests)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", choices=["whole", "chunked"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.positions, args.child == "chunked", args.device)))
        return
    from finescope.tokens import LOSS_CHUNK_ELEMENTS, LOSS_ONE_PIECE_MAX
    from reference import reference_throughput

    result: dict = {
        "vocab": VOCAB,
        "positions": args.positions,
        "logits_dtype": "bfloat16",
        "device": args.device,
        "chunk_elements": LOSS_CHUNK_ELEMENTS,
        "one_piece_max": LOSS_ONE_PIECE_MAX,
        "threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or None,
        "reference_tok_s": reference_throughput(None if args.model == "default" else args.model),  # CPU forward
        "settings": {},
    }
    runs: dict[str, list[dict]] = {"whole": [], "chunked": []}
    for _ in range(args.repeats):  # interleaved, so drift in the machine's state hits both alike
        for name in runs:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                name,
                "--positions",
                str(args.positions),
                "--device",
                args.device,
            ]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs[name].append(json.loads(out.strip().splitlines()[-1]))
            print(name, runs[name][-1], file=sys.stderr, flush=True)
    for name, rs in runs.items():
        result["settings"][name] = {
            "loss": rs[0]["loss"],
            "working_mib_median": round(statistics.median(r["peak_mib"] - r["before_mib"] for r in rs), 1),
            "peak_mib_median": round(statistics.median(r["peak_mib"] for r in rs), 1),
            "seconds_median": round(statistics.median(r["seconds"] for r in rs), 3),
            "runs": rs,
        }
    w, c = result["settings"]["whole"], result["settings"]["chunked"]
    result["working_memory_ratio"] = round(c["working_mib_median"] / w["working_mib_median"], 3)
    result["time_ratio"] = round(c["seconds_median"] / w["seconds_median"], 3)
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
