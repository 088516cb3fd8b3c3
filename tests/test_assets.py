from __future__ import annotations

import zipfile

import pytest

from finescope import assets
from finescope.assets import AssetError, Package


@pytest.fixture
def fake_home(tmp_path, monkeypatch):
    monkeypatch.setenv("FINESCOPE_HOME", str(tmp_path / "home"))
    downloads = tmp_path / "home" / "downloads"
    downloads.mkdir(parents=True)
    with zipfile.ZipFile(downloads / "fake_corpus-1.0.post1-py3-none-any.whl", "w") as z:
        z.writestr("fake_corpus/__init__.py", "")
        z.writestr("fake_corpus/data/small/samples.jsonl", '{"text": "a"}\n')
        z.writestr("fake_corpus/data/big/samples.jsonl", '{"text": "b"}\n')
        z.writestr("fake_corpus/data/big/extra.jsonl", '{"text": "c"}\n')
    packages = {
        "whole": Package("whole", ("fake-corpus==1.0.post1",), "fake", "MIT"),
        "part": Package("part", ("fake-corpus==1.0.post1",), "fake", "MIT", eager=("fake_corpus/data/small/*",)),
        "missing": Package("missing", ("finescope-no-such-package==0.0.0",), "absent", "-"),
    }
    monkeypatch.setattr(assets, "PACKAGES", packages)
    return tmp_path / "home"


def test_partial_install_then_lazy_member(fake_home):
    root = assets.install("part")
    assert root == fake_home / "packages" / "fake-corpus-1.0.post1"
    assert (root / "fake_corpus/data/small/samples.jsonl").is_file()
    assert not (root / "fake_corpus/data/big").exists()
    assert assets.package_listing("part", "fake_corpus/data/*/samples.jsonl") == [
        "fake_corpus/data/big/samples.jsonl",
        "fake_corpus/data/small/samples.jsonl",
    ]
    big = assets.package_file("part", "fake_corpus/data/big")
    assert sorted(p.name for p in big.iterdir()) == ["extra.jsonl", "samples.jsonl"]
    with pytest.raises(AssetError, match="not part of the package fake-corpus==1.0.post1"):
        assets.package_file("part", "fake_corpus/data/none.jsonl")
    assert any((fake_home / "downloads").glob("*.whl"))  # kept for later lazy members


def test_whole_install_is_idempotent_and_drops_the_wheel(fake_home):
    root = assets.install("whole")
    assert (root / "fake_corpus/data/big/extra.jsonl").read_text() == '{"text": "c"}\n'
    assert not any((fake_home / "downloads").glob("*.whl"))
    (root / "marker").write_text("still here")
    assert assets.install("whole") == root and (root / "marker").exists()  # no refetch, no re-unpack


def test_offline_fetch_names_package_and_manual_command(fake_home, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(fake_home / "nowhere"))
    with pytest.raises(
        AssetError,
        match=r"could not fetch finescope-no-such-package==0\.0\.0 .*"
        r"pip download --no-deps -d .*downloads finescope-no-such-package==0\.0\.0",
    ) as err:
        assets.install("missing")
    assert "matching distribution" in str(err.value) or "satisfies the requirement" in str(err.value)
    assert not (fake_home / "packages").exists()


def test_unknown_names(fake_home):
    with pytest.raises(AssetError, match="unknown asset 'nope'; known: whole, part, missing"):
        assets.install("nope")
    with pytest.raises(AssetError, match="unknown embedded data 'nope'"):
        assets.data_path("nope")


def test_real_registry_is_consistent():
    for key, (pkg, _member) in assets.DATA_FILES.items():
        assert pkg in assets.PACKAGES, key
    defaults = [k for k, p in assets.PACKAGES.items() if p.default]
    assert defaults[0] == "smollm2" and all("==" in r for p in assets.PACKAGES.values() for r in p.requirements)
