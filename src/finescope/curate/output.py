"""The curate stage's selection outputs: selected.jsonl and scores.parquet, and the statistics of metrics.json."""

from __future__ import annotations

from pathlib import Path

import torch

from .. import storage
from .pool import Pool


def write_outputs(stage: Path, pool: Pool, seeds, scores, nearest, chosen) -> dict:
    """Write selected.jsonl and scores.parquet (in chunks, from a pass over the pool); return the selection
    statistics of metrics.json."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rank = {i: r for r, i in enumerate(chosen, 1)}
    seed_ids = [s["id"] for s in seeds]

    def seed_of(i: int):
        j = int(nearest[i])
        return seed_ids[j] if j >= 0 else None

    picked = pool.pick(rank)
    storage.write_jsonl_atomic(
        stage / "selected.jsonl",
        ({**picked[i], "score": float(scores[i]), "rank": rank[i], "nearest_seed": seed_of(i)} for i in chosen),
    )
    schema = pa.schema(
        [
            ("id", pa.string()),
            ("source", pa.string()),
            ("score", pa.float64()),
            ("nearest_seed", pa.string()),
            ("selected", pa.bool_()),
            ("rank", pa.int64()),
        ]
    )
    tmp = stage / ".scores.parquet.tmp"
    offset = 0
    with pq.ParquetWriter(tmp, schema) as writer:
        for chunk in pool.chunks(8192):  # records with their texts: a chunk's worth in memory at a time
            idx = range(offset, offset + len(chunk))
            near = nearest[offset : offset + len(chunk)].tolist()
            writer.write_table(
                pa.table(
                    {
                        "id": [r["id"] for r in chunk],
                        "source": [_source(r) for r in chunk],
                        "score": scores[offset : offset + len(chunk)].double().tolist(),
                        "nearest_seed": [seed_ids[j] if j >= 0 else None for j in near],
                        "selected": [i in rank for i in idx],
                        "rank": [rank.get(i) for i in idx],
                    },
                    schema=schema,
                )
            )
            offset += len(chunk)
    tmp.replace(stage / "scores.parquet")
    sel = torch.tensor([float(scores[i]) for i in chosen]) if chosen else torch.zeros(0)
    q = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    names = ["min", "q25", "median", "q75", "max"]
    return {
        "selected": len(chosen),
        "score_quantiles_pool": dict(zip(names, torch.quantile(scores.float(), q).tolist())),
        "score_quantiles_selected": dict(zip(names, torch.quantile(sel, q).tolist())) if len(sel) else {},
        "selected_sources": _count(picked[i].get("source") for i in chosen),
    }


def _source(rec: dict) -> str | None:
    source = rec.get("source")
    return None if source is None else str(source)


def _count(values) -> dict:
    out: dict = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))
