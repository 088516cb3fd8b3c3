"""The curation's ranking as the later stages read it: its best-scored pool records beyond the selection.

A curate stage folder holds `selected.jsonl` (the top M), `scores.parquet` (a score for every pool record it ranked)
and `config.json` (which pool). `recover.recover_top_m` and `prune.calib_top_m` extend the selection with the
next-ranked records from there, decontaminated against the embedded benchmarks (`decontam`).
"""

from __future__ import annotations

from pathlib import Path

from . import FinescopeError, decontam
from .corpora import resolve_records_path
from .data import RecordStream, record_text
from .storage import CONFIG, read_json


class RankingError(FinescopeError):
    """The curation's ranking cannot be read from these inputs."""


def next_ranked(data: str, top_m: int, have: set[str], *, setting: str = "--recover-top-m") -> list[dict]:
    """The curation's best-scored pool records not in `have`, until there are `top_m` in all; `data` must be a
    curate stage's selected.jsonl (its scores.parquet and config.json lie beside it). `setting` names the option
    that asked, for the errors."""
    import pyarrow.parquet as pq

    folder = Path(data).expanduser().parent
    scores, config = folder / "scores.parquet", folder / CONFIG
    if not scores.is_file() or not config.is_file():
        raise RankingError(
            f"{data}: {setting} needs --data from a curate stage folder (no scores.parquet and config.json beside it)"
        )
    try:
        pool_spec = read_json(config)["config"]["pool"]
    except (KeyError, TypeError, ValueError):
        raise RankingError(f"{config}: missing field 'config.pool' (not a curate stage's config.json)") from None
    table = pq.read_table(scores, columns=["id", "score"]).to_pydict()
    if top_m > len(table["id"]):
        raise RankingError(
            f"{setting} {top_m}: the curation scored {len(table['id'])} pool records ({scores}); ask for at "
            f"most {len(table['id'])}, or curate a larger pool (curate.pool_sample)"
        )
    order = sorted(range(len(table["id"])), key=lambda i: -table["score"][i])  # stable: pool order on ties
    wanted = [table["id"][i] for i in order if table["id"][i] not in have][: max(0, top_m - len(have))]
    if not wanted:
        return []
    # one streamed pass over the pool, holding only the wanted records (a pool can be larger than memory)
    want, found = set(wanted), {}
    for rec in RecordStream(resolve_records_path(pool_spec, "pool")):
        if rec["id"] in want:
            found[rec["id"]] = rec
            if len(found) == len(want):
                break
    missing = [i for i in wanted if i not in found]
    if missing:
        raise RankingError(f"{scores}: record {missing[0]!r} is not in the pool {pool_spec!r} any more")
    return [found[i] for i in wanted]


def without_eval_overlap(records: list[dict]) -> list[dict]:
    """The records that share no word 13-gram with an embedded benchmark (GSM8K, MMLU, HumanEval)."""
    if not records:
        return []
    index = decontam.eval_ngrams()
    return [r for r in records if not decontam.overlaps(record_text(r), index)]
