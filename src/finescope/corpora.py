"""Embedded corpora built from the packaged assets (docs/design.md §7): the default pool, the generic reference corpus,
and the seed presets. Stages and the pipeline read them from here; this module knows no stage.

Default pool (`default_pool_path()`, built once into `$FINESCOPE_HOME/pools/`), every record tagged with a
`source` that selection never reads:
- `evals/<set>` for the maths sets of MATH_SETS: every row (~1,900 word problems, equations, probability,
  counting and JEE questions): last user turn → `ideal` answer;
- `evals/<set>`: up to 20 rows from each of the other ~440 OpenAI-evals registry sets (law, finance, medicine,
  SQL, puzzles, languages, …);
- `bbc/<topic>`: 2,225 BBC News articles; `wikipedia`, `openwebtext`: 1,000 snippets each.
Evaluation data (GSM8K test, MMLU, HumanEval) is never included: sets named after them are skipped, and every
record that shares a word 13-gram with them (`decontam`) is dropped when the pool is built; exact duplicate texts
are dropped. What was dropped is counted in the pool's manifest (`default-<version>.json` beside it).

Until pool v1 the maths records were 1,500 BIG-bench MathQA problems; the package index stopped serving that
archive, so the default needs it no more (`bigbench` stays an optional asset).

Default reference corpus for coordinate selection and SAE training (`default_reference_texts()`): the generic
text (Wikipedia, OpenWebText, BBC) standing in for the paper's RedPajama.

Seed presets: `preset:math|code|medicine|law`, ~10 examples each, written for FineScope (src/finescope/seeds/).
"""

from __future__ import annotations

import json
import random
import sys
import zipfile
from pathlib import Path

from . import FinescopeError, assets, decontam, hashing
from .data import read_records
from .messages import one_line
from .progress import progress
from .storage import write_atomic, write_json_atomic

POOL_VERSION = "v2"
EVALS_PER_SET = 20
# The English maths sets of the evals registry whose every row enters the default pool (the others give 20 each):
# word problems, equations, probability, counting, series and JEE questions. Not here: sets of bare formulas
# (count_intersections_polynomial), number words in other languages, and the sets named after an eval benchmark.
MATH_SETS = (
    "aime_evaluation",
    "algebra_word_problems",
    "arithmetical_puzzles",
    "geometry_puzzle",
    "jee-math",
    "linear_equations",
    "logic_and_probability",
    "math-derivatives",
    "math_equations",
    "math_for_5th-grader",
    "matrix_mult_rows",
    "multi-step-equations",
    "multistep-word-problems",
    "number_series_test",
    "numbers_game",
    "probabilities-word-problems",
    "probability_questions",
    "simple_math",
)
PRESETS = ("math", "code", "medicine", "law")
EXCLUDED_SETS = ("mmlu", "gsm8k", "humaneval", "human_eval")  # evaluation data never enters the pool


def _evals_rows(rng: random.Random) -> list[dict]:
    archive = assets.fetch_pin(assets.PACKAGES["evals"].pins[0])
    by_set: dict[str, list[dict]] = {}
    with zipfile.ZipFile(archive) as z:
        names = sorted(n for n in z.namelist() if n.startswith("evals/registry/data/") and n.endswith(".jsonl"))
        for name in progress(names, desc="pool: evals registry", unit="file"):
            set_name = name.split("/")[3]
            if any(x in set_name.lower() for x in EXCLUDED_SETS):
                continue
            for line in z.read(name).decode("utf-8", "replace").splitlines():
                rec = _evals_record(line)
                if rec is not None:
                    by_set.setdefault(set_name, []).append(rec)
    out = []
    for set_name, rows in sorted(by_set.items()):
        take = len(rows) if set_name in MATH_SETS else min(EVALS_PER_SET, len(rows))
        for rec in rng.sample(rows, take):
            out.append({**rec, "source": f"evals/{set_name}"})
    return out


def _evals_record(line: str) -> dict | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(row, dict) or "input" not in row or "ideal" not in row:
        return None
    prompt, ideal = row["input"], row["ideal"]
    if isinstance(prompt, list):
        turns = [m.get("content") for m in prompt if isinstance(m, dict) and isinstance(m.get("content"), str)]
        users = [
            m.get("content")
            for m in prompt
            if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str)
        ]
        prompt = users[-1] if users else (turns[-1] if turns else "")
    if isinstance(ideal, list):
        ideal = next((x for x in ideal if isinstance(x, str)), "")
    if not isinstance(prompt, str) or not isinstance(ideal, str) or not prompt.strip() or not ideal.strip():
        return None
    return {"instruction": prompt.strip(), "response": ideal.strip()}


def _text_rows() -> list[dict]:
    rows = []
    for name in ("wikipedia", "openwebtext"):
        for line in assets.data_path(name).read_text(encoding="utf-8").splitlines():
            if line.strip():
                rows.append({"text": json.loads(line)["0"], "source": name})
    for rec in read_records(assets.data_path("bbc_news")):
        rows.append({"text": rec["text"], "source": "bbc/" + rec["source_file"].split("/")[0]})
    return rows


def build_default_pool(path: Path, seed: int = 0) -> Path:
    """Write the default pool to `path` and its manifest (counts per source, what was dropped and why) beside it."""
    rng = random.Random(seed)
    rows = _evals_rows(rng) + _text_rows()
    index = decontam.eval_ngrams()
    seen: set[str] = set()
    unique: list[dict] = []
    duplicates, overlapping = 0, []
    for row in progress(rows, desc="pool: decontaminate", unit="rec"):
        key = row.get("text") or row["instruction"] + "\n" + row["response"]
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        if decontam.overlaps(key, index):
            overlapping.append(row)
            continue
        unique.append(row)
    sources: dict[str, int] = {}
    for row in unique:
        sources[row["source"]] = sources.get(row["source"], 0) + 1
    dropped_by: dict[str, int] = {}
    for row in overlapping:
        dropped_by[row["source"]] = dropped_by.get(row["source"], 0) + 1
    manifest = {
        "version": POOL_VERSION,
        "seed": seed,
        "records": len(unique),
        "math_records": sum(n for s, n in sources.items() if s.removeprefix("evals/") in MATH_SETS),
        "dropped_duplicates": duplicates,
        "dropped_eval_overlap": len(overlapping),
        "dropped_eval_overlap_by_source": dict(sorted(dropped_by.items())),
        "eval_overlap_test": f"a shared word {decontam.N}-gram with {', '.join(decontam.BENCHMARKS)} (decontam.py)",
        "sources": dict(sorted(sources.items())),
    }
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in unique)
    manifest["sha256"] = hashing.sha256_hex(text)  # checked before every use (`default_pool_path`)
    write_json_atomic(manifest_path(path), manifest)
    return write_atomic(path, text)


def manifest_path(pool: Path) -> Path:
    return pool.with_suffix(".json")


def default_pool_path() -> Path:
    """The embedded mixed-domain pool (jsonl), built on first use."""
    path = assets.home() / "pools" / f"default-{POOL_VERSION}.jsonl"
    if not _pool_intact(path):
        try:
            build_default_pool(path)
        except OSError as e:
            raise FinescopeError(
                f"{e.filename or path}: cannot write the default pool ({e.strerror or e}); set FINESCOPE_HOME to a "
                "writable folder with ~300 MiB free"
            ) from None
    return path


_checked_pools: dict[str, tuple[int, int, int, int]] = {}


def _pool_intact(path: Path) -> bool:
    """The built default pool matches the sha256 its manifest recorded (checked once per process while the file is
    unchanged). A missing pool is False; a bad one (altered, truncated, unreadable, no checksum record) is said in
    one line and False, so it is built again."""
    if not path.is_file():
        return False
    try:
        st = path.stat()
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if _checked_pools.get(str(path)) == stamp:
            return True
        want = json.loads(manifest_path(path).read_text(encoding="utf-8")).get("sha256")
        if not isinstance(want, str):
            problem = f"{manifest_path(path)} records no checksum (built by an older finescope)"
        elif hashing.file_sha256(path) != want:
            problem = f"{path}: content does not match the checksum its manifest records (altered or truncated)"
        else:
            _checked_pools[str(path)] = stamp
            return True
    except (OSError, ValueError, AttributeError) as e:
        problem = (
            f"{path}: default pool or its manifest unreadable ({getattr(e, 'strerror', None) or one_line(e, 120)})"
        )
    print(f"finescope: {problem}; building the default pool again", file=sys.stderr, flush=True)
    return False


def default_reference_texts() -> list[str]:
    """Generic text for coordinate selection and SAE training (Wikipedia, OpenWebText, BBC News)."""
    return [r["text"] for r in _text_rows()]


def seed_preset_path(name: str) -> Path:
    if name not in PRESETS:
        raise FinescopeError(f"unknown seed preset {name!r}; known: {', '.join('preset:' + p for p in PRESETS)}")
    return Path(__file__).resolve().parent / "seeds" / f"{name}.jsonl"


def resolve_records_path(spec: str, kind: str) -> Path:
    """`preset:<name>` / "default" / a path → a record file path."""
    if spec.startswith("preset:"):
        try:
            return seed_preset_path(spec.split(":", 1)[1])
        except FinescopeError as e:
            raise FinescopeError(f"{kind} = {spec!r}: {e}") from None
    if spec == "default":
        return default_pool_path() if kind == "pool" else Path("default")
    if not spec:
        raise FinescopeError(f"no {kind} given")
    return Path(spec)
