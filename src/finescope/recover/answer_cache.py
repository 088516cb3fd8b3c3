"""The teacher's answers, kept across stages: one JSONL file per teacher and generation settings under
`$FINESCOPE_HOME/cache/recover/`, one row per prompt (by its hash).

Recovery variants that share the teacher and the curated data (pruned at other ratios, with other importances or
calibrations) ask the teacher the same prompts; the answers depend only on the teacher and how it generates, so
the second variant reads them back instead of generating them again (minutes on a CPU per few hundred records).
The key digests the teacher (`hashing.model_fingerprint`: path, config and weight files), its dtype and device
type, the backend, the token cap, the temperature and the seed. Each row carries a digest of its own fields; a
row that does not match it, or does not parse, is skipped (said in one line) and its prompt is answered again.

Greedy answers generated in another batch can differ from a fresh batch's in rare ties (padding changes the
float sums), as with a resumed stage; the rows are the same teacher's answers under the same settings.

    cache = AnswerCache.for_teacher(source, dtype="torch.float32", device="cpu", backend="transformers",
                                    max_new_tokens=64, temperature=0.0, seed=0)
    known = cache.read()          # {prompt_hash: row}
    cache.add(rows)               # rows: {"id", "rewrite", "new_tokens", "cut_off", "prompt_hash"}
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .. import assets, hashing
from ..storage import write_atomic

VERSION = "1"
_FIELDS = ("prompt_hash", "rewrite", "new_tokens", "cut_off")


def _say(msg: str) -> None:
    print(f"recover: {msg}", file=sys.stderr, flush=True)


def _check(row: dict) -> str:
    return hashing.digest_parts(*(row[f] for f in _FIELDS))


@dataclass(frozen=True)
class AnswerCache:
    path: Path

    @classmethod
    def for_teacher(
        cls,
        source: str,
        *,
        dtype: str,
        device: str,
        backend: str,
        max_new_tokens: int,
        temperature: float,
        seed: int,
    ) -> AnswerCache:
        key = hashing.digest_parts(
            VERSION, hashing.model_fingerprint(source), dtype, device, backend, max_new_tokens, temperature, seed
        )
        return cls(assets.home() / "cache" / "recover" / f"answers-{key}.jsonl")

    def read(self) -> dict[str, dict]:
        """The cached answers by prompt hash; nothing when the file is missing or unreadable."""
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines() if self.path.is_file() else []
        except (OSError, UnicodeDecodeError) as e:
            _say(f"{self.path}: teacher answers not readable ({type(e).__name__}); answering again")
            return {}
        rows, bad = {}, 0
        for line in lines:
            try:
                row = json.loads(line)
                ok = isinstance(row, dict) and row.get("check") == _check(row)
            except (json.JSONDecodeError, KeyError, TypeError):
                ok = False
            if ok:
                rows[row["prompt_hash"]] = {f: row[f] for f in _FIELDS}
            else:
                bad += 1
        if bad:
            _say(f"{self.path}: {bad} cached teacher answer(s) altered or torn; their prompts are answered again")
        return rows

    def add(self, rows: Iterable[dict]) -> int:
        """Merge `rows` (rewrite rows with their prompt hash) into the file, written whole and atomically; how
        many were new. Rows already there stay as they are. A file that cannot be written is said in one line and
        skipped (two runs writing at once: the last one's rows win, none is torn)."""
        known = self.read()
        new = {}
        for row in rows:
            if row["prompt_hash"] not in known:
                new[row["prompt_hash"]] = {f: row[f] for f in _FIELDS}
        if not new:
            return 0
        merged = {**known, **new}
        text = "".join(json.dumps({**r, "check": _check(r)}, ensure_ascii=False) + "\n" for r in merged.values())
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, text)
        except OSError as e:  # the stage has its answers; only a later stage would have read them back
            _say(f"{self.path}: teacher answers not kept for later stages ({e.strerror or e})")
            return 0
        return len(new)
