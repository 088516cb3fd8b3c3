"""The labelled pools of `benchmarks/curate.py`: domain records and surface-form distractors from the packaged data.

Pure Python (no model): `build_labelled_pool(scale, seed, pool)` returns the records and their composition.

Two pools (issue 29). The **tuning** pool (`pool="tuning"`, the default) is the one the curation levers were chosen
on, extended by two domains (finance, security); its seeds are the presets for math/law/medicine/code and
`benchmarks/seeds_tuning/<domain>.jsonl` for the two new ones. The **test** pool (`pool="test"`) is built from source
sets the tuning pool does not use (other evals registry sets of the same domains, other distractor slices) and is
scored with its own seed sets, `benchmarks/seeds_test/<domain>.jsonl` (10 per domain, written for it, never
evaluation data). No record is in both pools: the test pool is built after the tuning pool (same scale and seed) and
every candidate whose text key (below) is a tuning record's is dropped before sampling ("in_tuning_pool" in the
composition's drops). Where the registry has no second English set of a domain, the test pool takes rows of the
tuning pool's set that the tuning pool did not sample (HELD_OUT_ROWS: medicine only); those rows share a source, not a
record, with the tuning pool, and the results say so.

Sources. BBC News (`bbc/<topic>`), Wikipedia and OpenWebText snippets come
from the embedded pool file (`finescope.corpora.default_pool_path()`); OpenAI-evals registry sets (`evals/<set>`)
are read whole from the packaged `evals` wheel, because the embedded pool keeps only 20 rows per set. An evals row
becomes a record the way the embedded pool makes it (last user turn → instruction, `ideal` → response).

Labels come from the source only (`label_of`): a record is relevant to a domain when its source is one of that
domain's sets below, whatever its text says. Distractors are chosen for sharing surface form with a domain (figures,
legal or medical vocabulary, technology) and carry no label; their `kind` records why they were picked.

Tuning pool. Relevant records (counts at scale 1; each set sampled without replacement after de-duplication):
- math 240: numbers_game 60, jee-math 60, probability_questions 40, math_equations 20, math-derivatives 15,
  multistep-word-problems 15, probabilities-word-problems 15, math_for_5th-grader 15 (until pool v1, 120 of these
  were BIG-bench MathQA problems, which the package index no longer serves: figures measured before differ);
- law 240: us_tort_law 205 (of 340 rows, 277 remain once 32 MMLU professional-law questions and 31 repeats are
  dropped), adultery-state-laws 20, singapore_data_protection_decisions 15 (14 distinct);
- medicine 240: medmcqa 160, population_span_extraction 80 (clinical-trial abstracts);
- code 240: sql 72, infiniteloop-match 50, test_comp_sci 28, code_combination 26, syntax-check 19,
  python_list_comprehension 15, csharp-linq 15 (14 distinct), code_progress 15;
- finance 139: stock_options 100 (of 200 rows, 100 distinct), logical-black-scholes 24, financial-derivatives 15;
- security 140: cissp-study-questions 140 (of 143 distinct).

Distractors (1,000 at scale 1), in the order they claim records (a record serves one kind):
- tech_news 150: BBC tech articles ranked by software/computing vocabulary in their first 1,000 characters;
- legal_news 150: BBC articles (any topic; politics and business dominate) ranked by court/law vocabulary;
- health_news 100: BBC articles and OpenWebText snippets (news-like web text; BBC alone has ~55 that qualify)
  ranked by health/medical vocabulary;
- figures 250, numbers without maths: BBC business and sports articles (140) and Wikipedia/OpenWebText snippets
  (80) ranked by the density of numbers in their first 600 characters, plus evals rows of figures that ask for
  no arithmetic (lat_long_identify 15, event_categories 15);
- exam_qa 150: exam-style Q&A of other subjects, in the same evals format as most relevant records
  (fcc_amateur_extra 45, logiqa 40, emotional-intelligence 25, moral_exceptQA 25, atpl_exams 15);
- general_text 200: random Wikipedia (100) and OpenWebText (100) snippets.
Ranked kinds need at least 2 vocabulary hits (figures: 1 number); fewer qualifying records give a smaller kind,
and the composition printed by the benchmark is the one actually built.

Test pool. Relevant records (other sets of the same domains; ~120–150 per domain):
- math 145: linear_equations 40, solve-for-variable 30, multi-step-equations 15, aime_evaluation 15,
  euler_problems 15, tricky-word-problems 15, chinese-remainder-theorem 15;
- law 120: utah_real_estate 120 (real-estate law exam questions: the registry's only other English law set with
  distinct rows; left out of the tuning pool for being licensing practice as much as law, so law is the test pool's
  hardest label);
- medicine 120, HELD_OUT_ROWS: medmcqa 80 and population_span_extraction 40, rows the tuning pool did not sample
  (the registry's other medical sets are not English, tabular, or share one instruction);
- code 150: regex-match 40, css-selectors 40, crontab 21, gpt-protocol-buffers 25, json_patch_object 24 (the
  tuning pool leaves the first two out of its distractors as well; here they are code);
- finance 146: finance_calc 60, taxes 51, accounting_audit 30, finance 5;
- security 123: cybersecurity 93, security_guide 16, reverse-shell 14.
Distractors (~800), the same kinds from other slices: tech_news 100, legal_news 100, health_news 80 (the next
BBC/OpenWebText/Wikipedia records by the same rankings once the tuning pool's are excluded, any BBC topic; health
needs only 1 vocabulary hit, since the tuning pool took nearly every record with 2); figures 150 (BBC business/sports
and Wikipedia/OpenWebText by number density 100, compare-countries-area 30, monthly_metric_comparison 20); exam_qa
150 (music-theory 40, physics-interaction 30, ordered-history-events 30, soc_codes 30, food 20); general_text 200
(Wikipedia 100, OpenWebText 100, none in the tuning pool).

Left out on purpose (their label would be ambiguous, or their language would decide the result): utah_real_estate
(licensing practice more than law), illinois-law (its last user turn is only the charge's name), medication_dose
(one instruction shared by all rows), brazilian_laws and the Japanese/Russian medical exams (not English),
heart-disease, diabetes and nutrition (tabular health data), regex-match, css-selectors and the other
programming-adjacent puzzles, ner_finance (loan contracts).

Evaluation data never enters: any candidate that shares a word 13-gram with the MMLU test, GSM8K test or HumanEval
(`finescope.decontam`, the GPT-3 contamination test) or with a seed preset is dropped before sampling, and the drops
are counted (the seed check covers both pools' seed sets). De-duplication is on the first 400 characters of the encoded text (lower-cased, whitespace
collapsed), about what the model sees at --max-length 96, so no two records start the same way.

    .venv/bin/python benchmarks/curate.py --pool-only                # builds and prints the tuning pool
    .venv/bin/python benchmarks/curate.py --pool-only --pool test    # the test pool (and its collisions dropped)
"""

from __future__ import annotations

import json
import random
import re
import zipfile
from collections import Counter
from pathlib import Path

from finescope import assets, decontam
from finescope.corpora import PRESETS, _evals_record, default_pool_path, seed_preset_path
from finescope.data import read_records, record_text

POOLS = ("tuning", "test")
DOMAINS = ("math", "law", "medicine", "code", "finance", "security")
BENCH_DIR = Path(__file__).resolve().parent

# domain → {source: records at scale 1}
RELEVANT: dict[str, dict[str, int]] = {
    "math": {
        "evals/numbers_game": 60,
        "evals/jee-math": 60,
        "evals/probability_questions": 40,
        "evals/math_equations": 20,
        "evals/math-derivatives": 15,
        "evals/multistep-word-problems": 15,
        "evals/probabilities-word-problems": 15,
        "evals/math_for_5th-grader": 15,
    },
    "law": {
        "evals/us_tort_law": 205,
        "evals/adultery-state-laws": 20,
        "evals/singapore_data_protection_decisions": 15,
    },
    "medicine": {
        "evals/medmcqa": 160,
        "evals/population_span_extraction": 80,
    },
    "code": {
        "evals/sql": 72,
        "evals/infiniteloop-match": 50,
        "evals/test_comp_sci": 28,
        "evals/code_combination": 26,
        "evals/syntax-check": 19,
        "evals/python_list_comprehension": 15,
        "evals/csharp-linq": 15,
        "evals/code_progress": 15,
    },
    "finance": {
        "evals/stock_options": 100,
        "evals/logical-black-scholes": 24,
        "evals/financial-derivatives": 15,
    },
    "security": {"evals/cissp-study-questions": 140},
}

# The test pool: other sets of the same domains (module docstring).
RELEVANT_TEST: dict[str, dict[str, int]] = {
    "math": {
        "evals/linear_equations": 40,
        "evals/solve-for-variable": 30,
        "evals/multi-step-equations": 15,
        "evals/aime_evaluation": 15,
        "evals/euler_problems": 15,
        "evals/tricky-word-problems": 15,
        "evals/chinese-remainder-theorem": 15,
    },
    "law": {"evals/utah_real_estate": 120},
    "medicine": {"evals/medmcqa": 80, "evals/population_span_extraction": 40},
    "code": {
        "evals/regex-match": 40,
        "evals/css-selectors": 40,
        "evals/crontab": 21,
        "evals/gpt-protocol-buffers": 25,
        "evals/json_patch_object": 24,
    },
    "finance": {"evals/finance_calc": 60, "evals/taxes": 51, "evals/accounting_audit": 30, "evals/finance": 5},
    "security": {"evals/cybersecurity": 93, "evals/security_guide": 16, "evals/reverse-shell": 14},
}
HELD_OUT_ROWS = {"evals/medmcqa", "evals/population_span_extraction"}
"""Test-pool sources that the tuning pool also samples (the test pool gets rows it did not sample)."""


def _words(alternatives: str) -> re.Pattern:
    return re.compile(rf"\b(?:{alternatives})\b", re.IGNORECASE)


_TECH = _words(
    r"software|computers?|programs?|programm\w*|code|coding|linux|microsoft|windows|hack\w*|virus\w*|internet|web"
    r"|online|browsers?|open source|developers?|databases?|algorithms?|digital|broadband|spam|e-?mail"
)
_LEGAL = _words(
    r"courts?|judges?|laws?|lawyers?|legal|legislation|trial|rul(?:ing|ed)|sued|lawsuits?|prosecut\w*|convicted"
    r"|verdict|appeal\w*|tribunal|bill|illegal|barrister|solicitors?|jury|charged|police"
)
_HEALTH = _words(
    r"health|nhs|hospitals?|patients?|doctors?|drugs?|medical|medicine|cancer|diseases?|nurses?|obesity|smoking"
    r"|gps?|surgery|treatment|clinics?|vaccines?|illness"
)
_NUMBER = re.compile(r"\d[\d,.]*%?")

# Distractor kinds, in claiming order: (kind, [(sources, count)], ranking). `sources` is "|"-separated source names
# ("bbc/*": every BBC topic). A ranking (regex, characters of the text it reads, minimum matches) takes the records
# with the most matches per word first; None samples at random (the count split evenly over the sources).
Ranking = tuple[re.Pattern, int, int]
DISTRACTORS: list[tuple[str, list[tuple[str, int]], Ranking | None]] = [
    ("tech_news", [("bbc/tech", 150)], (_TECH, 1000, 2)),
    ("legal_news", [("bbc/*", 150)], (_LEGAL, 1000, 2)),
    ("health_news", [("bbc/*|openwebtext", 100)], (_HEALTH, 1000, 2)),
    ("figures", [("bbc/business|bbc/sports", 140), ("wikipedia|openwebtext", 80)], (_NUMBER, 600, 1)),
    ("figures", [("evals/lat_long_identify", 15), ("evals/event_categories", 15)], None),
    (
        "exam_qa",
        [
            ("evals/fcc_amateur_extra", 45),
            ("evals/logiqa", 40),
            ("evals/emotional-intelligence", 25),
            ("evals/moral_exceptQA", 25),
            ("evals/atpl_exams", 15),
        ],
        None,
    ),
    ("general_text", [("wikipedia", 100), ("openwebtext", 100)], None),
]

DISTRACTORS_TEST: list[tuple[str, list[tuple[str, int]], Ranking | None]] = [
    ("tech_news", [("bbc/*|openwebtext|wikipedia", 100)], (_TECH, 1000, 2)),
    ("legal_news", [("bbc/*|openwebtext|wikipedia", 100)], (_LEGAL, 1000, 2)),
    ("health_news", [("bbc/*|openwebtext|wikipedia", 80)], (_HEALTH, 1000, 1)),
    ("figures", [("bbc/business|bbc/sports|wikipedia|openwebtext", 100)], (_NUMBER, 600, 1)),
    ("figures", [("evals/compare-countries-area", 30), ("evals/monthly_metric_comparison", 20)], None),
    (
        "exam_qa",
        [
            ("evals/music-theory", 40),
            ("evals/physics-interaction", 30),
            ("evals/ordered-history-events", 30),
            ("evals/soc_codes", 30),
            ("evals/food", 20),
        ],
        None,
    ),
    ("general_text", [("wikipedia", 100), ("openwebtext", 100)], None),
]

SPECS = {"tuning": (RELEVANT, DISTRACTORS), "test": (RELEVANT_TEST, DISTRACTORS_TEST)}

_SOURCE_LABEL = {
    source: domain for spec in (RELEVANT, RELEVANT_TEST) for domain, srcs in spec.items() for source in srcs
}


def label_of(source: str | None) -> str | None:
    """The domain a record is relevant to, from its source alone (None: a distractor); the same in both pools."""
    return _SOURCE_LABEL.get(source or "")


def nominal_size(pool: str = "tuning") -> int:
    """The pool's record count at scale 1 as specified (the built pool can be smaller: shortfalls, distinct rows)."""
    relevant, distractors = SPECS[pool]
    return sum(n for srcs in relevant.values() for n in srcs.values()) + sum(
        n for _, parts, _ in distractors for _, n in parts
    )


def seeds_spec(pool: str, domain: str) -> str:
    """The seed set a pool is scored with: presets (tuning pool, preset domains), else benchmarks/seeds_<pool>/."""
    if pool == "tuning" and domain in PRESETS:
        return f"preset:{domain}"
    return str(BENCH_DIR / f"seeds_{pool}" / f"{domain}.jsonl")


def seed_records(pool: str, domain: str) -> list[dict]:
    spec = seeds_spec(pool, domain)
    return read_records(seed_preset_path(spec.split(":", 1)[1]) if spec.startswith("preset:") else Path(spec))


def collisions(a: list[dict], b: list[dict]) -> set[str]:
    """Text keys (below) present in both record lists."""
    return {_key(r) for r in a} & {_key(r) for r in b}


def _key(rec: dict) -> str:
    return " ".join(record_text(rec).lower().split())[:400]


def _evals_sets(names: set[str]) -> dict[str, list[dict]]:
    """Every row of the named evals registry sets (all their .jsonl files), as embedded-pool records."""
    archive = assets.fetch_pin(assets.PACKAGES["evals"].pins[0])
    out: dict[str, list[dict]] = {n: [] for n in names}
    with zipfile.ZipFile(archive) as z:
        for member in sorted(z.namelist()):
            parts = member.split("/")
            if member.startswith("evals/registry/data/") and member.endswith(".jsonl") and parts[3] in names:
                for line in z.read(member).decode("utf-8", "replace").splitlines():
                    rec = _evals_record(line)
                    if rec is not None:
                        out[parts[3]].append({**rec, "source": f"evals/{parts[3]}"})
    missing = sorted(n for n, rows in out.items() if not rows)
    if missing:
        raise SystemExit(f"evals registry sets with no usable rows in {archive.name}: {', '.join(missing)}")
    return out


def _candidates(pool: str = "tuning") -> dict[str, list[dict]]:
    """source → its records, in file order: the embedded pool's non-evals sources plus the evals sets used here."""
    relevant, distractors = SPECS[pool]
    wanted = {s for sources in relevant.values() for s in sources}
    wanted |= {p for _, parts, _ in distractors for pat, _ in parts for p in pat.split("|")}
    by_source: dict[str, list[dict]] = {}
    for rec in read_records(default_pool_path()):
        src = rec.get("source", "")
        if not src.startswith("evals/"):
            rec = {k: v for k, v in rec.items() if k != "id"}
            by_source.setdefault(src, []).append(rec)
    evals = _evals_sets({s.split("/", 1)[1] for s in wanted if s.startswith("evals/")})
    by_source.update({f"evals/{name}": rows for name, rows in evals.items()})
    return by_source


def seed_ngrams() -> set[str]:
    """Word 13-grams of every seed set of both pools (presets included)."""
    index: set[str] = set()
    for pool in POOLS:
        for domain in DOMAINS:
            for rec in seed_records(pool, domain):
                index |= decontam.ngrams(record_text(rec))
    return index


def _clean(
    by_source: dict[str, list[dict]],
    exclude: frozenset[str] | set[str] = frozenset(),
    evals_index: frozenset[str] | set[str] | None = None,
    seed_index: frozenset[str] | set[str] | None = None,
) -> tuple[dict[str, list[dict]], dict[str, Counter]]:
    """Drop another pool's records (`exclude`: text keys), evaluation-data and seed overlaps and repeated texts;
    returns the rest and the drop counts per reason."""
    evals_grams = decontam.eval_ngrams() if evals_index is None else evals_index
    seed_grams = seed_ngrams() if seed_index is None else seed_index
    dropped: dict[str, Counter] = {
        "in_tuning_pool": Counter(),
        "evaluation_data": Counter(),
        "seed_overlap": Counter(),
        "duplicate": Counter(),
    }
    seen: set[str] = set()
    out: dict[str, list[dict]] = {}
    for src in sorted(by_source):
        keep = []
        for rec in by_source[src]:
            text, key = record_text(rec), _key(rec)
            if key in exclude:
                dropped["in_tuning_pool"][src] += 1
            elif decontam.overlaps(text, evals_grams):
                dropped["evaluation_data"][src] += 1
            elif decontam.overlaps(text, seed_grams):
                dropped["seed_overlap"][src] += 1
            elif key in seen:
                dropped["duplicate"][src] += 1
            else:
                seen.add(key)
                keep.append(rec)
        out[src] = keep
    return out, dropped


def _rank(recs: list[dict], ranking: Ranking, rng: random.Random) -> list[dict]:
    """Records with at least `min_hits` matches in their first `chars` characters, most matches per word first."""
    rx, chars, min_hits = ranking
    scored = []
    for rec in recs:
        head = record_text(rec)[:chars]
        hits = len(rx.findall(head))
        if hits >= min_hits:
            scored.append((-hits / max(1, len(head.split())), rng.random(), rec))
    scored.sort(key=lambda t: (t[0], t[1]))
    return [rec for *_, rec in scored]


def _matching(available: dict[str, list[dict]], sources: str) -> list[str]:
    names = sources.split("|")
    return sorted(s for s in available if any(s == n or (n.endswith("/*") and s.startswith(n[:-1])) for n in names))


def build_labelled_pool(scale: float = 1.0, seed: int = 0, pool: str = "tuning") -> tuple[list[dict], dict]:
    """(records, composition): the shuffled labelled pool and its counts per domain, source and distractor kind.

    Every count of the module docstring is multiplied by `scale` (rounded, at least 1). The test pool is built after
    the tuning pool of the same scale and seed, without any of its records."""
    if pool not in SPECS:
        raise SystemExit(f"--pool: unknown pool {pool!r}; known: {', '.join(POOLS)}")
    relevant_spec, distractor_spec = SPECS[pool]
    exclude: set[str] = set()
    tuning: list[dict] = []
    if pool == "test":
        tuning, _ = build_labelled_pool(scale, seed, "tuning")
        exclude = {_key(r) for r in tuning}
    rng = random.Random(seed)
    available, dropped = _clean(_candidates(pool), exclude)
    records: list[dict] = []
    shortfall: dict[str, str] = {}

    def scaled(n: int) -> int:
        return max(1, round(n * scale))

    def claim(chosen: list[dict], kind: str, want: int, what: str) -> None:
        if len(chosen) < want:
            shortfall[f"{kind}: {what}"] = f"{len(chosen)} of {want}"
        taken = {id(r) for r in chosen}
        for src in {r["source"] for r in chosen}:
            available[src] = [r for r in available[src] if id(r) not in taken]
        records.extend({**r, "kind": kind} for r in chosen)

    for domain, sources in relevant_spec.items():
        for src, n in sources.items():
            recs = available.get(src, [])
            claim(rng.sample(recs, min(scaled(n), len(recs))), domain, scaled(n), src)
    for kind, parts, ranking in distractor_spec:
        for names, n in parts:
            matched = _matching(available, names)
            if ranking is not None:
                claim(
                    _rank([r for s in matched for r in available[s]], ranking, rng)[: scaled(n)], kind, scaled(n), names
                )
                continue
            for src in matched:
                want = scaled(n // len(matched))
                claim(rng.sample(available[src], min(want, len(available[src]))), kind, want, src)
    rng.shuffle(records)
    composition = {"pool": pool, **_composition(records, dropped, shortfall, scale)}
    if pool == "test":  # 0 by construction; counted on the built pools, not assumed
        composition["records_also_in_tuning_pool"] = len(collisions(records, tuning))
    return records, composition


def _composition(pool: list[dict], dropped: dict[str, Counter], shortfall: dict[str, str], scale: float) -> dict:
    relevant = Counter(label_of(r["source"]) for r in pool if label_of(r["source"]))
    kinds = Counter(r["kind"] for r in pool if not label_of(r["source"]))
    by_kind: dict[str, Counter] = {}
    for r in pool:
        by_kind.setdefault(r["kind"], Counter())[r["source"]] += 1
    return {
        "records": len(pool),
        "scale": scale,
        "relevant": {d: relevant[d] for d in DOMAINS if relevant[d]},
        "distractors": sum(kinds.values()),
        "distractor_kinds": dict(kinds),
        "sources": {k: dict(sorted(v.items(), key=lambda kv: -kv[1])) for k, v in by_kind.items()},
        "dropped_before_sampling": {reason: dict(c) for reason, c in dropped.items() if c},
        "shortfall": shortfall,
    }


def write_pool(pool: list[dict], path) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in pool), encoding="utf-8")
