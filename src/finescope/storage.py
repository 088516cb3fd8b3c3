"""Files of run directories: atomic writes, stage folders with DONE markers, config hashing, locks.

A run directory holds, per stage, one folder per distinct stage config (`runs/<name>/<stage>/<label>-<hash8>/`).
Each stage folder has `config.json` (the resolved config), `metrics.json`, its artifacts, and a `DONE` marker
written last. A stage whose `DONE`
records the hash of the current config is skipped on rerun; anything else is recomputed.

    from finescope import storage
    stage = storage.open_stage("runs/demo/curate", cfg)   # None if already done with this config
    if stage is not None:
        storage.write_json_atomic(stage / "metrics.json", {...})
        storage.mark_done(stage, cfg)
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from . import FinescopeError, hashing

DONE = "DONE"
CONFIG = "config.json"
METRICS = "metrics.json"


# ---------------------------------------------------------------------------------------------- atomic writes


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write `data` to `path` via a temporary file in the same folder and a rename: never half-written.

    As in `atomic_dir`, the temporary name records this process's pid, so the partial file a killed earlier write
    of the same target left (a cache shard outside any locked stage folder, say) is removed here."""
    from .child_process import owned_prefix, remove_stale

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(f".{path.name}", path.parent)
    fd, tmp = tempfile.mkstemp(prefix=owned_prefix(f".{path.name}"), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, WriteError) and e.errno in WRITE_ERRNOS:
            raise WriteError(e.errno, e.strerror, os.fspath(path)) from None
        raise
    return path


WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EIO}
"""The OS errors of a write that failed for a reason the user can fix (disk full, file too large, read-only,
permission, quota, I/O error): `cli.main` turns them into one line naming the file, exit status 2."""


class WriteError(FinescopeError, OSError):
    """A file that could not be written: one line naming it and the OS reason (still an OSError, errno kept)."""

    def __str__(self) -> str:
        return f"{self.filename}: cannot be written ({self.strerror})"


def os_errno(e: BaseException) -> int | None:
    """The OS error number of an exception: an OSError's, or the `os error N` a library (safetensors' Rust
    writer) put into its message."""
    if isinstance(e, OSError):
        return e.errno
    import re

    m = re.search(r"\(os error (\d+)\)", str(e))
    return int(m.group(1)) if m else None


def as_write_error(e: BaseException, target: Path, tmp: Path | None = None) -> WriteError | None:
    """A WriteError for a failed write under `target` (built in `tmp`), naming the file (its final name) and the
    OS reason; None when `e` is no such failure."""
    if isinstance(e, WriteError):
        return None
    code = os_errno(e)
    if code not in WRITE_ERRNOS:
        return None
    name = getattr(e, "filename", None)
    where = os.fspath(target)
    if isinstance(name, str) and tmp is not None and Path(name).is_relative_to(tmp):
        where = os.fspath(target / Path(name).relative_to(tmp))
    return WriteError(code, os.strerror(code), where)


def write_error_line(e: OSError) -> str:
    """One line for an OSError of a failed write: the file (when the OS named it) and the reason."""
    where = e.filename if e.filename is not None else "an output file"
    return f"{where}: cannot be written ({e.strerror or e})"


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

    An existing folder at `path` is replaced only after the new one is complete. The temporary name records this
    process's pid, so the half-built folders of killed earlier builds (a multi-GB model save or GGUF conversion)
    are recognised and removed here.
    """
    from .child_process import owned_prefix, remove_stale

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(f".{path.name}", path.parent)
    tmp = Path(tempfile.mkdtemp(prefix=owned_prefix(f".{path.name}"), suffix=".tmp", dir=path.parent))
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
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        failed = as_write_error(e, path, tmp)
        if failed is not None:
            raise failed from None
        raise


# ---------------------------------------------------------------------------------------------- config hashing


def config_hash(cfg: Any) -> str:
    """Stable short hash of a config (dataclass or dict): canonical JSON, sorted keys, sha256.

    Fields listed in the dataclass's `HASH_EXCLUDE` (e.g. progress-bar switches) do not change results and are
    left out, so toggling them does not invalidate finished stages. `HASH_OMIT_AT` maps fields added after a
    release to the value that reproduces the earlier behaviour: at that value they are left out too, so adding
    them keeps every finished stage of an earlier version valid.
    """
    data = to_jsonable(cfg)
    for name in hash_excluded(cfg):
        data.pop(name, None)
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashing.sha256_hex(blob, 16)


def hash_excluded(cfg: Any) -> list[str]:
    """The fields `config_hash` leaves out of this config: HASH_EXCLUDE, and HASH_OMIT_AT fields at their value."""
    data = to_jsonable(cfg) if not isinstance(cfg, dict) else cfg
    omitted = [k for k, v in getattr(cfg, "HASH_OMIT_AT", {}).items() if k in data and data[k] == v]
    return [*getattr(cfg, "HASH_EXCLUDE", ()), *omitted]


# ---------------------------------------------------------------------------------------------- stage folders


class StageError(FinescopeError):
    """A stage folder cannot be used (e.g. an unrelated folder is in the way, or another process holds it)."""


def _read_hash(path: Path, key: str = "config_hash") -> str | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _config_file_hash(stage: Path) -> str | None:
    """The hash config.json claims, provided its recorded config really hashes to it (else None)."""
    try:
        data = json.loads((stage / CONFIG).read_text(encoding="utf-8"))
        claimed, config = data["config_hash"], data["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(config, dict) or not isinstance(claimed, str):
        return None
    if "hash_exclude" not in data:
        return claimed  # written before config.json listed its excluded fields: its content cannot be re-hashed
    for name in data["hash_exclude"] if isinstance(data["hash_exclude"], list) else ():
        config.pop(name, None)
    return claimed if config_hash(config) == claimed else None


def done_hash(stage: str | os.PathLike) -> str | None:
    """The config hash a stage folder's DONE marker certifies, or None when the stage is not finished.

    DONE counts only when config.json beside it records the same hash and its config really hashes to it: a
    folder whose files come from two different runs is never trusted."""
    stage = Path(stage)
    certified = _read_hash(stage / DONE)
    if certified is None or _config_file_hash(stage) != certified:
        return None
    return certified


def is_done(stage: str | os.PathLike, cfg: Any) -> bool:
    """True when the stage folder is finished and was produced by this very config."""
    return done_hash(stage) == config_hash(cfg)


def stage_kind(cfg: Any) -> str:
    return type(cfg).__name__


def check_output_target(path: str | os.PathLike, *, what: str = "--out") -> Path:
    """Refuse, before any work, an output path that cannot be written: empty, under a file, or unwritable."""
    if not os.fspath(path).strip():
        raise StageError(f"{what}: must not be empty (give a folder or file name)")
    path = Path(path).expanduser()
    probe = path if path.exists() else next((p for p in path.absolute().parents if p.exists()), None)
    for parent in path.absolute().parents:
        if parent.exists() and not parent.is_dir():
            raise StageError(f"{path}: cannot be created: {parent} is a file, not a folder")
    if probe is not None and probe.is_dir() and not os.access(probe, os.W_OK | os.X_OK):
        raise StageError(f"{path}: {probe} is not writable")
    if probe is not None and probe.is_dir():
        # access() says yes to root everywhere, and nothing of a read-only mount or a pseudo filesystem (/proc,
        # /sys): create and remove a hidden file there, so such an output is refused before any model work.
        try:
            fd, tmp = tempfile.mkstemp(prefix=".finescope-probe-", dir=probe)
        except OSError as e:
            raise StageError(f"{path}: {probe} is not writable ({e.strerror or e})") from None
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return path


def check_stage_folder(path: str | os.PathLike, cfg: Any, *, overwrite: bool = False) -> Path:
    """Refuse, before anything is read or written, a folder `open_stage` would refuse (same rules, no side effect)."""
    path = check_output_target(path)
    if path.is_file():
        raise StageError(f"{path}: exists and is a file, not a stage folder")
    if not path.is_dir() or overwrite or not any(path.iterdir()):
        return path
    recorded = _read_hash(path / CONFIG, "stage")
    if recorded is not None and recorded != stage_kind(cfg):
        raise StageError(f"{path}: holds a {recorded} stage, not a {stage_kind(cfg)} one; choose another output folder")
    if done_hash(path) is None and _read_hash(path / CONFIG) is None:
        flag = (
            " or pass --overwrite (it is then kept aside as <name>.superseded-unknown)"
            if "overwrite" in {f.name for f in dataclasses.fields(cfg)}
            else ""
        )
        raise StageError(f"{path}: exists and is not a finescope stage folder; choose another output folder{flag}")
    return path


def open_stage(path: str | os.PathLike, cfg: Any, *, overwrite: bool = False) -> Path | None:
    """Prepare the stage folder `path` for a run of `cfg`; return None when it is already done with this config.

    Call it while holding the folder's lock (`stage_folder` does both).
    - Done with the same config hash → None (skip).
    - Unfinished with the same config → kept as is, so a stage may resume what it wrote (e.g. rewrites); temp
      files of a killed earlier run are removed.
    - A stage folder of another config (done or not) is moved aside to `<name>.superseded-<hash>`, never deleted,
      and a fresh folder is started.
    - A non-empty folder that is not a stage folder is refused (StageError), or moved aside with `overwrite`.
    The resolved config is written to `config.json` before the stage starts.
    """
    path = check_stage_folder(path, cfg, overwrite=overwrite)
    want = config_hash(cfg)
    if done_hash(path) == want:
        return None
    have = done_hash(path) or _read_hash(path / CONFIG)
    if path.is_dir() and have != want and any(path.iterdir()):
        aside = path.with_name(f"{path.name}.superseded-{have or 'unknown'}")
        if aside.exists():
            aside = aside.with_name(f"{aside.name}-{time.strftime('%Y%m%d%H%M%S')}")
        os.replace(path, aside)
    path.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(path)
    write_json_atomic(
        path / CONFIG,
        {
            "config_hash": want,
            "stage": stage_kind(cfg),
            "hash_exclude": hash_excluded(cfg),
            "config": cfg,
        },
    )
    return path


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete what `write_atomic` / `atomic_dir` of a killed process left in `folder` (hidden `.*.tmp` files and
    folders, `.*.old-<pid>` folders). Only safe under the folder's lock: no live writer can own them then."""
    removed = []
    for p in sorted(folder.rglob(".*")):
        if p.name.endswith(".tmp") or ".old-" in p.name:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            removed.append(p)
    return removed


def mark_done(stage: str | os.PathLike, cfg: Any, metrics: dict | None = None) -> Path:
    """Write `metrics.json` (if given) and then the DONE marker — always the last file a stage writes."""
    stage = Path(stage)
    if metrics is not None:
        write_json_atomic(stage / METRICS, metrics)
    return write_json_atomic(
        stage / DONE,
        {"config_hash": config_hash(cfg), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
    )


# ---------------------------------------------------------------------------------------------- locks


def lock_file(path: str | os.PathLike) -> Path:
    """The lock file of a stage folder, run directory or results file: hidden, beside it (so it stays put when
    the folder is moved aside), never deleted (deleting a lock file lets two processes lock different files)."""
    path = Path(path).expanduser().absolute()
    return path.with_name(f".{path.name}.lock")


@contextlib.contextmanager
def exclusive(path: str | os.PathLike, what: str = "stage folder") -> Iterator[Path]:
    """Hold an exclusive `flock` on `path`'s lock file for the block; the kernel releases it if the process dies.

    A second process is refused at once (StageError naming the holder's PID) instead of waiting: two runs
    writing one folder is always a mistake, and waiting would hide it."""
    import fcntl

    lock = lock_file(path)
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    except OSError as e:
        raise StageError(f"{path}: cannot create the lock file {lock}: {e.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise StageError(
                f"{path}: {what} in use by another finescope process (PID {holder}); wait for it to "
                "finish or choose another output"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        yield Path(path)
    finally:
        os.close(fd)


@contextlib.contextmanager
def stage_folder(path: str | os.PathLike, cfg: Any, *, overwrite: bool = False) -> Iterator[Path | None]:
    """`open_stage` under the folder's exclusive lock, held until the block ends (the stage's whole life).

    with storage.stage_folder(out, cfg) as stage:
        if stage is None:      # already done with this config
            return out
        ...; storage.mark_done(stage, cfg, metrics)
    """
    with exclusive(path, "stage folder"):
        yield open_stage(path, cfg, overwrite=overwrite)
