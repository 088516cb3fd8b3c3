"""What the student trains on: the curated records, optionally the curation's next-ranked pool records
(`--recover-top-m`) and generic replay text (`--replay-fraction`), with evaluation data left out.

Every added record (next-ranked or replay) that overlaps an embedded benchmark (`decontam`: a shared word 13-gram
with GSM8K, MMLU or HumanEval) is dropped and counted per source in metrics.json. The curated records themselves
are the user's `--data` and are trained on as given; the check (which needs the embedded benchmarks, fetched on
first use) runs only when something is added.
"""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

from .. import FinescopeError, decontam
from ..artifacts import RecoveryData
from ..config import RecoverConfig
from ..corpora import default_reference_texts, resolve_records_path
from ..data import read_records, record_text
from ..storage import CONFIG, read_json


class SourceError(FinescopeError):
    """Extra training data cannot be gathered from these inputs."""


def next_ranked(data: str, top_m: int, have: set[str]) -> list[dict]:
    """The curation's best-scored pool records not in `have`, until there are `top_m` in all; `data` must be a
    curate stage's selected.jsonl (its scores.parquet and config.json lie beside it)."""
    import pyarrow.parquet as pq

    folder = Path(data).expanduser().parent
    scores, config = folder / "scores.parquet", folder / CONFIG
    if not scores.is_file() or not config.is_file():
        raise SourceError(
            f"{data}: --recover-top-m needs --data from a curate stage folder (no scores.parquet and config.json "
            f"beside it)"
        )
    try:
        pool_spec = read_json(config)["config"]["pool"]
    except (KeyError, TypeError, ValueError):
        raise SourceError(f"{config}: missing field 'config.pool' (not a curate stage's config.json)") from None
    table = pq.read_table(scores, columns=["id", "score"]).to_pydict()
    if top_m > len(table["id"]):
        raise SourceError(
            f"--recover-top-m {top_m}: the curation scored {len(table['id'])} pool records ({scores}); ask for at "
            f"most {len(table['id'])}, or curate a larger pool (curate.pool_sample)"
        )
    order = sorted(range(len(table["id"])), key=lambda i: -table["score"][i])  # stable: pool order on ties
    wanted = [table["id"][i] for i in order if table["id"][i] not in have][: max(0, top_m - len(have))]
    if not wanted:
        return []
    pool = {r["id"]: r for r in read_records(resolve_records_path(pool_spec, "pool"))}
    missing = [i for i in wanted if i not in pool]
    if missing:
        raise SourceError(f"{scores}: record {missing[0]!r} is not in the pool {pool_spec!r} any more")
    return [pool[i] for i in wanted]


def replay_records(spec: str, n: int, seed: int) -> list[dict]:
    """`n` generic texts (seeded sample), as text records."""
    if n <= 0:
        return []
    if spec == "default":
        texts = default_reference_texts()
    else:
        texts = [record_text(r) for r in read_records(spec)]
    random.Random(seed).shuffle(texts)
    return [{"id": f"replay-{i}", "text": t, "source": "replay"} for i, t in enumerate(texts[:n])]


def training_records(cfg: RecoverConfig, curated: list[dict]) -> tuple[list[dict], RecoveryData]:
    """The curated records plus the additions the config asks for, those that overlap evaluation data removed."""
    more = next_ranked(cfg.data, cfg.recover_top_m, {r["id"] for r in curated}) if cfg.recover_top_m else []
    replay = replay_records(cfg.replay, math.ceil(cfg.replay_fraction * (len(curated) + len(more))), cfg.seed)
    dropped = {"next_ranked": 0, "replay": 0}
    kept = list(curated)
    if more or replay:
        index = decontam.eval_ngrams()
        for source, recs in (("next_ranked", more), ("replay", replay)):
            clean = [r for r in recs if not decontam.overlaps(record_text(r), index)]
            dropped[source] = len(recs) - len(clean)
            kept += clean
    if any(dropped.values()):
        print(
            f"recover: left out {sum(dropped.values())} added records that overlap evaluation data {dropped}",
            file=sys.stderr,
        )
    stats = RecoveryData(
        curated=len(curated),
        next_ranked=len(more) - dropped["next_ranked"],
        replay=len(replay) - dropped["replay"],
        dropped_eval_overlap=dropped,
    )
    return kept, stats
