"""Run-directory layout, atomic writes, DONE markers and config hashing; progress bars.

A run directory holds one folder per stage (`runs/<name>/<stage>/`). Each stage folder has `config.json`
(the resolved config), `metrics.json`, its artifacts, and a `DONE` marker written last. A stage whose `DONE`
records the hash of the current config is skipped on rerun; anything else is recomputed.

    from finescope import io
    stage = io.open_stage("runs/demo/curate", cfg)   # None if already done with this config
    if stage is not None:
        io.write_json_atomic(stage / "metrics.json", {...})
        io.mark_done(stage, cfg)
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from . import FinescopeError

DONE = "DONE"
CONFIG = "config.json"
METRICS = "metrics.json"


# ---------------------------------------------------------------------------------------------- atomic writes


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write `data` to `path` via a temporary file in the same folder and a rename: never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, paths, tuples and numpy/torch scalars → plain JSON types."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        return obj.item()
    return obj


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    return write_atomic(path, json.dumps(to_jsonable(obj), indent=2, ensure_ascii=False) + "\n")


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    text = "".join(json.dumps(to_jsonable(r), ensure_ascii=False) + "\n" for r in rows)
    return write_atomic(path, text)


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a folder under a temporary name and rename it into place only if the block succeeds.

    An existing folder at `path` is replaced only after the new one is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------------- config hashing


def config_hash(cfg: Any) -> str:
    """Stable short hash of a config (dataclass or dict): canonical JSON, sorted keys, sha256.

    Fields listed in the dataclass's `HASH_EXCLUDE` (e.g. progress-bar switches) do not change results and are
    left out, so toggling them does not invalidate finished stages.
    """
    data = to_jsonable(cfg)
    for name in getattr(cfg, "HASH_EXCLUDE", ()):
        data.pop(name, None)
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- stage folders


class StageError(FinescopeError):
    """A stage folder cannot be used (e.g. an unrelated folder is in the way)."""


def done_hash(stage: str | os.PathLike) -> str | None:
    """The config hash recorded in a stage folder's DONE marker, or None when the stage is not finished."""
    marker = Path(stage) / DONE
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text(encoding="utf-8")).get("config_hash")
    except (json.JSONDecodeError, AttributeError):
        return None


def is_done(stage: str | os.PathLike, cfg: Any) -> bool:
    """True when the stage folder is finished and was produced by this very config."""
    return done_hash(stage) == config_hash(cfg)


def open_stage(path: str | os.PathLike, cfg: Any, *, overwrite: bool = False) -> Path | None:
    """Prepare the stage folder `path` for a run of `cfg`; return None when it is already done with this config.

    - Done with the same config hash → None (skip).
    - Unfinished with the same config → kept as is, so a stage may resume what it wrote (e.g. rewrites).
    - A stage folder of another config (done or not) is moved aside to `<name>.superseded-<hash>`, never deleted,
      and a fresh folder is started.
    - A non-empty folder that is not a stage folder is refused (StageError), or moved aside with `overwrite`.
    The resolved config is written to `config.json` before the stage starts.
    """
    path = Path(path)
    want = config_hash(cfg)
    if done_hash(path) == want:
        return None
    have = done_hash(path) or _hash_of_config_file(path / CONFIG)
    if path.is_file():
        raise StageError(f"{path}: exists and is a file, not a stage folder")
    if path.is_dir() and have is None and any(path.iterdir()):
        if not overwrite:
            raise StageError(f"{path}: exists and is not a finescope stage folder; choose another output folder "
                             "or pass --overwrite (it is then kept aside as <name>.superseded-unknown)")
    if path.is_dir() and have != want and any(path.iterdir()):
        aside = path.with_name(f"{path.name}.superseded-{have or 'unknown'}")
        if aside.exists():
            aside = aside.with_name(f"{aside.name}-{time.strftime('%Y%m%d%H%M%S')}")
        os.replace(path, aside)
    path.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path / CONFIG, {"config_hash": want, "config": cfg})
    return path


def _hash_of_config_file(path: Path) -> str | None:
    try:
        return read_json(path).get("config_hash")
    except (json.JSONDecodeError, OSError, AttributeError):
        return None


def mark_done(stage: str | os.PathLike, cfg: Any, metrics: dict | None = None) -> Path:
    """Write `metrics.json` (if given) and then the DONE marker — always the last file a stage writes."""
    stage = Path(stage)
    if metrics is not None:
        write_json_atomic(stage / METRICS, metrics)
    return write_json_atomic(
        stage / DONE,
        {"config_hash": config_hash(cfg), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
    )


# ---------------------------------------------------------------------------------------------- progress


class _LogLines:
    """A file for tqdm that turns its carriage-return redraws into whole lines (for logs and CI output)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress(iterable: Iterable | None = None, *, desc: str, total: int | None = None, unit: str = "it", **kw):
    """A progress bar on stderr. On a terminal, a live tqdm bar; otherwise (a log file, CI) one line every
    `FINESCOPE_PROGRESS_INTERVAL` seconds (default 30) plus the final line. FINESCOPE_PROGRESS=0 silences it."""
    from tqdm.auto import tqdm

    if os.environ.get("FINESCOPE_PROGRESS") == "0":
        return tqdm(iterable, desc=desc, total=total, unit=unit, disable=True, **kw)
    if sys.stderr.isatty():
        return tqdm(iterable, desc=desc, total=total, unit=unit, file=sys.stderr, dynamic_ncols=True, **kw)
    interval = float(os.environ.get("FINESCOPE_PROGRESS_INTERVAL", "30"))
    return tqdm(iterable, desc=desc, total=total, unit=unit, file=_LogLines(sys.stderr), ncols=100, ascii=True,
                mininterval=interval, maxinterval=max(interval, 10.0), **kw)
