"""Slow: replay and next-ranked records lose what overlaps the embedded benchmarks (read, and fetched on first
use, from the real assets); the recover stage's metrics count what was dropped. (From test_recover_kd.py.)"""

from __future__ import annotations

import json

from finescope import decontam
from finescope.recover.run import run
from finescope.recover.sources import training_records
from test_recover import RECORDS, _cfg, write_records

GSM8K_QUESTION = (
    "Janet’s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for her friends "
    "every day with four. She sells the remainder at the farmers' market daily for $2 per fresh duck egg. How much "
    "in dollars does she make every day at the farmers' market?"
)


def test_replay_and_next_ranked_records_never_contain_evaluation_data(tmp_path, tiny_model_dirs):
    assert decontam.overlaps(GSM8K_QUESTION, decontam.eval_ngrams())
    assert decontam.overlaps("Prefix words. " + GSM8K_QUESTION[:120] + " and more", decontam.eval_ngrams())
    clean = "The committee met on Tuesday to discuss the budget for the new library and the repairs to the roof."
    assert not decontam.overlaps(clean, decontam.eval_ngrams())
    replay = write_records(
        tmp_path / "replay.jsonl", [{"text": clean}, {"text": GSM8K_QUESTION}, {"text": clean + " Again."}]
    )
    data = write_records(tmp_path / "data.jsonl")
    cfg = _cfg("", tiny_model_dirs["llama"], data, no_teacher=True, replay=str(replay), replay_fraction=0.5)
    rows, stats = training_records(cfg, RECORDS)
    assert stats.replay == 2 and stats.dropped_eval_overlap == {"next_ranked": 0, "replay": 1}
    assert GSM8K_QUESTION not in [r.get("text") for r in rows] and len(rows) == len(RECORDS) + 2
    m = json.loads((run(cfg, tmp_path / "r") / "metrics.json").read_text())
    assert m["data"] == {
        "curated": 6,
        "next_ranked": 0,
        "replay": 2,
        "dropped_eval_overlap": {"next_ranked": 0, "replay": 1},
    }
