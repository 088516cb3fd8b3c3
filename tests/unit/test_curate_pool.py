"""The curate stage's streamed pool: one validating pass, the same sample as sampling the list, every format."""

from __future__ import annotations

import gzip
import json
import random

import pytest

from finescope import hashing
from finescope.curate.pool import Pool
from finescope.data import RecordError, read_records, record_text


def _rows(n: int) -> list[dict]:
    return [{"instruction": f"Question {i}?", "response": f"Answer {i}.", "source": f"s{i % 3}"} for i in range(2 * n)]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".parquet", ".csv"])
def test_pool_streams_every_format_like_read_records(tmp_path, suffix):
    rows = _rows(30)
    path = tmp_path / f"pool{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".jsonl.gz":
        with gzip.open(path, "wt") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import pyarrow as pa
        import pyarrow.csv as pcsv
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist(
            [{k: r.get(k) for k in ("instruction", "response", "text", "source")} for r in rows]
        )
        pq.write_table(table, path) if suffix == ".parquet" else pcsv.write_csv(table, path)
    expected = list(read_records(path))
    pool = Pool.open(path, fields="instruction+response")
    assert len(pool) == 60 and pool.sampled is None
    assert list(pool) == expected and list(pool) == expected  # re-readable
    assert [r for chunk in pool.chunks(7) for r in chunk] == expected
    assert pool.digest == hashing.digest_texts(record_text(r) for r in expected)
    assert pool.pick({0, 59}) == {0: expected[0], 59: expected[59]}


def test_pool_sample_is_the_sample_of_the_list(tmp_path):
    path = tmp_path / "pool.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows(500)))
    records = list(read_records(path))
    for seed in (0, 1, 7):
        pool = Pool.open(path, fields="instruction+response", sample=50, seed=seed)
        assert pool.sampled == random.Random(seed).sample(records, 50)  # what the in-memory sampling drew
        assert list(pool) == pool.sampled and len(pool) == 50
        assert pool.digest == hashing.digest_texts(record_text(r) for r in pool.sampled)
    assert Pool.open(path, fields="instruction+response", sample=5000).sampled is None  # larger: the whole pool


def test_pool_errors_are_the_readers_errors(tmp_path):
    path = tmp_path / "pool.jsonl"
    path.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(RecordError, match="pool.jsonl: line 2"):
        Pool.open(path, fields="instruction+response")
    pool = Pool.open(path, fields="instruction+response", skip_bad_rows=True)
    assert len(pool) == 1 and pool.skipped == 1
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n')
    with pytest.raises(RecordError, match="duplicate id 'a' \\(first seen at line 1\\)"):
        Pool.open(dup, fields="instruction+response")
