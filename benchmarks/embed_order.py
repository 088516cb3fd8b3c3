"""MiniLM pool-embedding throughput: texts batched by token length (what `MiniLM.embed` does) against batches in
pool order (each batch padded to a random text's length, what it did before), side by side in one process.

The hybrid and embedding selection methods embed every pool record with all-MiniLM-L6-v2 (max 256 tokens, batch
32). Both arms embed the same texts of the default pool (a seeded sample) with the same encoder; the arms alternate
over the repeats and the medians are printed, with the plain SmolLM2 forward's throughput as the machine's
reference, and the largest difference between the two arms' vectors (float rounding only: padding is masked).

    python benchmarks/embed_order.py --texts 1024 --repeats 3
    python benchmarks/embed_order.py --smoke --model <tiny model dir>   # a tiny random BERT, a few texts
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch


def tiny_encoder(model: str, into: Path) -> str:
    """A 1-layer random BERT with `model`'s tokenizer, standing in for all-MiniLM-L6-v2."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(model, local_files_only=True)
    cfg = BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    BertModel(cfg).save_pretrained(into)
    tok.save_pretrained(into)
    return str(into)


def pool_texts(n: int, seed: int) -> list[str]:
    from finescope.corpora import default_pool_path
    from finescope.data import read_records, record_text

    records = read_records(default_pool_path())
    return [record_text(r) for r in random.Random(seed).sample(records, min(n, len(records)))]


def reference_throughput() -> float:
    from reference import reference_throughput as ref  # benchmarks/reference.py: the embedded default model

    return ref()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", type=int, default=1024, help="pool texts to embed (a seeded sample of the default pool)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="a tiny random BERT and 12 synthetic texts")
    ap.add_argument("--model", help="--smoke: the model folder whose tokenizer the tiny BERT uses")
    args = ap.parse_args()

    from finescope.curate.baselines import MiniLM

    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            if not args.model:
                raise SystemExit("--smoke needs --model (a model folder whose tokenizer the tiny BERT uses)")
            encoder = MiniLM(tiny_encoder(args.model, Path(tmp) / "enc"))
            rng = random.Random(args.seed)
            texts = [" ".join(["word"] * rng.randint(1, 40)) for _ in range(12)]
            reference: float | str = "not measured (--smoke)"
        else:
            encoder = MiniLM()
            texts = pool_texts(args.texts, args.seed)
            reference = reference_throughput()
        bs = args.batch_size

        def by_length() -> torch.Tensor:
            return encoder.embed(texts, batch_size=bs)

        def pool_order() -> torch.Tensor:  # one call per batch: no text is moved to another batch
            return torch.cat([encoder.embed(texts[i : i + bs], batch_size=bs) for i in range(0, len(texts), bs)])

        times: dict[str, list[float]] = {"by_length": [], "pool_order": []}
        vectors: dict[str, torch.Tensor] = {}
        for r in range(args.repeats):
            arms = [("by_length", by_length), ("pool_order", pool_order)]
            for name, fn in arms if r % 2 == 0 else arms[::-1]:
                t = time.perf_counter()
                vectors[name] = fn()
                times[name].append(time.perf_counter() - t)

    tokens = [len(ids) for ids in encoder.tokenizer(texts, truncation=True, max_length=256)["input_ids"]]
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        json.dumps(
            {
                "texts": len(texts),
                "tokens_mean": round(statistics.mean(tokens), 1),
                "batch_size": bs,
                "repeats": args.repeats,
                "threads": torch.get_num_threads(),
                "reference_smollm2_forward_tok_s": reference,
                "texts_per_s": {k: round(len(texts) / v, 1) for k, v in med.items()},
                "seconds": {k: [round(x, 2) for x in v] for k, v in times.items()},
                "speedup_by_length": round(med["pool_order"] / med["by_length"], 2),
                "max_abs_vector_difference": float((vectors["by_length"] - vectors["pool_order"]).abs().max()),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
