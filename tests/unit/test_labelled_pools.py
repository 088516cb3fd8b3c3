"""The labelled pools of benchmarks/curate.py (issue 29): the test pool keeps out the tuning pool's records and
sets, its seeds are its own, and the degraded seed sets do what their names say. Pure Python, no model."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import labelled_pool as lp  # noqa: E402
import seed_variants as sv  # noqa: E402
from finescope import decontam  # noqa: E402
from finescope.data import record_text  # noqa: E402


def _rec(source: str, text: str) -> dict:
    return {"instruction": text, "response": "answer", "source": source}


def test_clean_drops_records_of_the_other_pool_and_counts_them():
    tuning = [_rec("evals/medmcqa", "Which nerve supplies the deltoid muscle of the shoulder?")]
    candidates = {
        "evals/medmcqa": [
            _rec("evals/medmcqa", "  which nerve supplies the DELTOID muscle of the shoulder? "),  # same text key
            _rec("evals/medmcqa", "Which artery supplies the sinoatrial node in most people?"),
        ]
    }
    exclude = {lp._key(r) for r in tuning}
    kept, dropped = lp._clean(candidates, exclude, evals_index=set(), seed_index=set())
    assert [r["instruction"] for r in kept["evals/medmcqa"]] == [candidates["evals/medmcqa"][1]["instruction"]]
    assert dropped["in_tuning_pool"] == Counter({"evals/medmcqa": 1})
    assert lp.collisions(tuning, candidates["evals/medmcqa"]) == {lp._key(tuning[0])}
    assert lp.collisions(tuning, kept["evals/medmcqa"]) == set()


def test_test_pool_sets_are_not_tuning_sets_except_the_declared_held_out_rows():
    tuning_sets = {s for srcs in lp.RELEVANT.values() for s in srcs}
    tuning_sets |= {p for _, parts, _ in lp.DISTRACTORS for pat, _ in parts for p in pat.split("|")}
    test_relevant = {s for srcs in lp.RELEVANT_TEST.values() for s in srcs}
    test_evals_distractors = {
        p for _, parts, _ in lp.DISTRACTORS_TEST for pat, _ in parts for p in pat.split("|") if p.startswith("evals/")
    }
    assert test_relevant & tuning_sets == lp.HELD_OUT_ROWS
    assert not test_evals_distractors & tuning_sets
    # a source has one label whichever pool it is in, and no relevant source of one pool is a distractor of the other
    for spec in (lp.RELEVANT, lp.RELEVANT_TEST):
        assert set(spec) == set(lp.DOMAINS)
        for domain, srcs in spec.items():
            assert all(lp.label_of(s) == domain for s in srcs)
    assert all(lp.label_of(s) is None for s in test_evals_distractors)


def test_each_pool_has_ten_seeds_per_domain_and_the_test_seeds_are_its_own():
    for pool in lp.POOLS:
        for domain in lp.DOMAINS:
            seeds = lp.seed_records(pool, domain)
            assert len(seeds) >= 10, (pool, domain)
            assert all(s["instruction"].strip() and s.get("response", "").strip() for s in seeds)
    for domain in lp.DOMAINS:
        test_grams = set().union(*(decontam.ngrams(record_text(s)) for s in lp.seed_records("test", domain)))
        tuning_grams = set().union(*(decontam.ngrams(record_text(s)) for s in lp.seed_records("tuning", domain)))
        assert not test_grams & tuning_grams, domain
        assert lp.seeds_spec("test", domain).endswith(f"seeds_test/{domain}.jsonl")


SEEDS = [
    {"id": f"s{i}", "instruction": f"What is the tort of negligence, case {i}?", "response": "r"} for i in range(10)
]


def test_off_topic_replaces_exactly_one_seed():
    out = sv.degrade(SEEDS, "off_topic")
    assert len(out) == len(SEEDS)
    assert out[:-1] == SEEDS[:-1]
    assert out[-1]["instruction"] == sv.OFF_TOPIC["instruction"] and out[-1] not in SEEDS


def test_three_keeps_the_first_three_and_clean_copies():
    assert sv.degrade(SEEDS, "three") == SEEDS[:3]
    clean = sv.degrade(SEEDS, "clean")
    assert clean == SEEDS and clean[0] is not SEEDS[0]


def test_terse_is_keywords():
    seeds = [{**s, "response": "The defendant breached a duty of reasonable care."} for s in SEEDS]
    out = sv.degrade(seeds, "terse")
    assert len(out) == len(seeds)
    assert out[3] == {
        "id": "s3",
        "instruction": "tort negligence case 3",
        "response": "defendant breached duty reasonable care",
    }
    assert sv.terse("What are the elements of a valid contract, in the U.S.?") == "elements valid contract u.s"
    assert all(len(s["instruction"].split()) <= sv.TERSE_WORDS for s in sv.degrade(SEEDS * 3, "terse"))


def test_unknown_variant_is_one_line():
    with pytest.raises(SystemExit, match="unknown variant 'chatty'"):
        sv.degrade(SEEDS, "chatty")
