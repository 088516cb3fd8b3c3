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

from ..artifacts import RecoveryData
from ..config import RecoverConfig
from ..corpora import default_reference_texts
from ..data import read_records, record_text
from ..ranking import next_ranked, without_eval_overlap


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
    for source, recs in (("next_ranked", more), ("replay", replay)):
        clean = without_eval_overlap(recs)
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
