"""Hostile inputs to every reader and to model loading.

Each case goes through the public CLI (`finescope.cli.main`) and must end as a user error: exit status 2, stderr
exactly one line `finescope <cmd>: error: …` naming the bad file, no traceback, and the --out location not created.
"""

from __future__ import annotations

import builtins
import bz2
import gzip
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from finescope.cli import main
from finescope.data import read_records

GOOD_ROWS = [{"instruction": f"Add {i} and {i + 1}.", "response": str(2 * i + 1)} for i in range(4)]
MATH_ROW = {"problem": "What is 2 + 3?", "solution": "It is $\\boxed{5}$.", "type": "Prealgebra"}
DEEP = 100_000  # far past the JSON parser's recursion limit


def _jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# ================================================================================================ bad record files
# Each builder writes a bad input under `d` and returns (path, substring the message must hold).


def latin1_row(d):
    data = _jsonl(GOOD_ROWS[:1]) + '{"text": "café"}\n'.encode("latin-1")
    return _write(d / "latin1.jsonl", data), "line 2: not UTF-8"


def utf16_bom(d):
    return _write(d / "utf16.jsonl", _jsonl(GOOD_ROWS).decode().encode("utf-16")), "UTF-16"


def utf16_no_bom(d):
    return _write(d / "utf16le.jsonl", _jsonl(GOOD_ROWS).decode().encode("utf-16-le")), "NUL bytes"


def surrogate_bytes(d):  # a UTF-16 surrogate encoded as if it were UTF-8: not valid UTF-8
    return _write(d / "surrogate.jsonl", b'{"text": "a\xed\xa0\x80b"}\n'), "line 1: not UTF-8 text (byte 0xed"


def surrogate_escape(d):  # valid JSON, but the string holds a lone surrogate: not valid Unicode
    path = _write(d / "escape.jsonl", b'{"text": "a\\ud800b", "id": "x"}\n')
    return path, "line 1: field 'text' holds a lone surrogate"


def nul_bytes(d):
    return _write(d / "nul.jsonl", b'{"te\x00xt": \x00}\n{"text": "a"}\n'), "line 1: invalid JSON"


def latin1_json(d):
    data = json.dumps(GOOD_ROWS[:2], indent=1).replace("Add 1", "Caf\u00e9 1").encode("latin-1")
    return _write(d / "latin1.json", data), "not UTF-8"


def latin1_csv(d):
    return _write(d / "latin1.csv", b"instruction,response\nok,fine\ncaf\xe9,x\n"), "line 3: not UTF-8"


def csv_stray_quote(d):
    return _write(d / "quote.csv", b'instruction,response\n"unterminated,x\nsecond,y\n'), "quote.csv: line"


def truncated_gz(d):
    blob = gzip.compress(_jsonl(GOOD_ROWS * 50))
    return _write(d / "trunc.jsonl.gz", blob[: len(blob) // 2]), "truncated or corrupt"


def not_gzip(d):
    return _write(d / "plain.jsonl.gz", _jsonl(GOOD_ROWS)), "not gzip data"


def corrupt_gz(d):
    blob = bytearray(gzip.compress(_jsonl(GOOD_ROWS * 50)))
    blob[20:40] = b"\xff" * 20
    return _write(d / "corrupt.jsonl.gz", bytes(blob)), "corrupt.jsonl.gz"


def gzip_named_jsonl(d):
    return _write(d / "secretly.jsonl", gzip.compress(_jsonl(GOOD_ROWS))), "gzip-compressed data"


def truncated_bz2(d):
    blob = bz2.compress(_jsonl(GOOD_ROWS * 50))
    return _write(d / "trunc.jsonl.bz2", blob[: len(blob) // 2]), "truncated or corrupt"


def zstd_file(d):
    return _write(d / "data.jsonl.zst", b"\x28\xb5\x2f\xfd" + os.urandom(64)), "zstd-compressed files are not supported"


def empty_file(d):
    return _write(d / "empty.jsonl", b""), "empty"


def deep_jsonl(d):
    return _write(d / "deep.jsonl", b"[" * DEEP + b"]" * DEEP + b"\n"), "line 1: JSON nested too deeply"


def deep_json(d):
    return _write(d / "deep.json", b"[" * DEEP + b"]" * DEEP), "nested too deeply"


def huge_line(d):  # one 10 MB line of broken JSON: the message must stay short
    return _write(d / "huge.jsonl", b'{"text": "' + b"x" * 10_000_000 + b'"\n'), "line 1: invalid JSON"


def huge_duplicate_id(d):  # a 1 MB id, duplicated: quoted in the message, but capped
    row = {"id": "i" * 1_000_000, "text": "t"}
    return _write(d / "dup.jsonl", _jsonl([row, row])), "line 2: duplicate id"


def folder_not_file(d):
    (d / "data.jsonl").mkdir(parents=True)
    return d / "data.jsonl", "folder"  # records: "a folder with no .txt files"; task files: "is a folder"


def symlink_loop(d):
    d.mkdir(parents=True, exist_ok=True)
    os.symlink(d / "loop.jsonl", d / "loop.jsonl")
    return d / "loop.jsonl", "symlink loop"


def dangling_symlink(d):
    d.mkdir(parents=True, exist_ok=True)
    os.symlink(d / "gone.jsonl", d / "link.jsonl")
    return d / "link.jsonl", "which does not exist"


def fifo(d):
    d.mkdir(parents=True, exist_ok=True)
    os.mkfifo(d / "pipe.jsonl")
    return d / "pipe.jsonl", "named pipe"


def unreadable(d):  # we run as root, so chmod 000 would still read: see the `open` patch in the test
    return _write(d / "locked.jsonl", _jsonl(GOOD_ROWS)), "Permission denied"


def _saved_dataset(d, state) -> Path:
    folder = d / "ds"
    folder.mkdir(parents=True)
    (folder / "dataset_info.json").write_text("{}")
    (folder / "state.json").write_text(state if isinstance(state, str) else json.dumps(state))
    return folder


def ds_state_not_json(d):
    return _saved_dataset(d, "{broken"), "state.json: line 1: invalid JSON"


def ds_state_wrong_types(d):
    return _saved_dataset(d, {"_data_files": "data-00000-of-00001.arrow"}), "field '_data_files' must be"


def ds_state_entry_not_object(d):
    return _saved_dataset(d, {"_data_files": [17]}), "'_data_files[0].filename'"


def ds_state_escapes(d):
    return _saved_dataset(d, {"_data_files": [{"filename": "../../etc/passwd"}]}), "points outside the dataset folder"


def ds_state_absolute(d):
    return _saved_dataset(d, {"_data_files": [{"filename": "/etc/passwd"}]}), "points outside the dataset folder"


def ds_arrow_corrupt(d):
    folder = _saved_dataset(d, {"_data_files": [{"filename": "data-00000-of-00001.arrow"}]})
    (folder / "data-00000-of-00001.arrow").write_bytes(os.urandom(256))
    return folder, "data-00000-of-00001.arrow: not a readable Arrow stream"


def ds_dict_broken(d):
    folder = d / "dd"
    folder.mkdir(parents=True)
    (folder / "dataset_dict.json").write_text("{nope")
    return folder, "dataset_dict.json: a saved DatasetDict"


def broken_parquet(d):
    return _write(d / "broken.parquet", b"PAR1" + os.urandom(300) + b"PAR1"), "not a readable parquet file"


def text_named_parquet(d):
    return _write(d / "text.parquet", _jsonl(GOOD_ROWS)), "not a readable parquet file"


def _txt_folder(d: Path, name: str, data: bytes) -> Path:
    _write(d / "texts" / "good.txt", b"Natalia sold 48 clips in April and half as many in May.")
    _write(d / "texts" / name, data)
    return d / "texts"


def binary_txt_random(d):  # random bytes named .txt: the latin-1 fallback decodes anything, so it is checked
    rng = __import__("random").Random(0)
    data = bytes(rng.randrange(256) for _ in range(8192)).replace(b"\0", b"\1")
    return _txt_folder(d, "notes.txt", data), "notes.txt: binary data, not text"


def binary_txt_image(d):  # a PNG renamed .txt (NUL bytes in its header)
    data = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + bytes(range(256)) * 8
    return _txt_folder(d, "photo.txt", data), "photo.txt: binary data, not text (it holds NUL bytes)"


def binary_txt_pdf(d):  # a PDF renamed .txt: a text header, then a compressed stream
    import zlib

    rng = __import__("random").Random(1)
    stream = zlib.compress(bytes(rng.randrange(256) for _ in range(6000)), 9).replace(b"\0", b"\2")
    data = b"%PDF-1.7\n1 0 obj << /Length 6000 /Filter /FlateDecode >> stream\n" + stream + b"\nendstream\n"
    return _txt_folder(d, "paper.txt", data), "paper.txt: binary data, not text"


# (case, builder, command): the command routes the file to one reader; together they cover every one.
RECORD_CASES = [
    ("binary-txt-random-pool", binary_txt_random, "curate-pool"),
    ("binary-txt-image-seeds", binary_txt_image, "curate-seeds"),
    ("binary-txt-pdf-seeds", binary_txt_pdf, "curate-seeds"),
    ("latin1-row", latin1_row, "prune"),
    ("latin1-row-pool", latin1_row, "curate-pool"),
    ("utf16-bom", utf16_bom, "curate-pool"),
    ("utf16-no-bom", utf16_no_bom, "eval-nll"),
    ("surrogate-bytes", surrogate_bytes, "eval-math"),
    ("surrogate-escape", surrogate_escape, "recover"),
    ("nul-bytes", nul_bytes, "prune"),
    ("nul-bytes-mbpp", nul_bytes, "eval-mbpp"),
    ("latin1-json", latin1_json, "eval-nll"),
    ("latin1-csv", latin1_csv, "curate-seeds"),
    ("csv-stray-quote", csv_stray_quote, "prune"),
    ("truncated-gz", truncated_gz, "prune"),
    ("truncated-gz-math", truncated_gz, "eval-math"),
    ("not-gzip", not_gzip, "eval-mbpp"),
    ("corrupt-gz", corrupt_gz, "eval-nll"),
    ("gzip-named-jsonl", gzip_named_jsonl, "curate-pool"),
    ("truncated-bz2", truncated_bz2, "recover"),
    ("zstd", zstd_file, "prune"),
    ("empty", empty_file, "prune"),
    ("empty-math", empty_file, "eval-math"),
    ("deep-jsonl", deep_jsonl, "prune"),
    ("deep-jsonl-math", deep_jsonl, "eval-math"),
    ("deep-json", deep_json, "curate-seeds"),
    ("huge-line", huge_line, "prune"),
    ("huge-duplicate-id", huge_duplicate_id, "recover"),
    ("folder-not-file", folder_not_file, "prune"),
    ("folder-not-file-math", folder_not_file, "eval-math"),
    ("symlink-loop", symlink_loop, "prune"),
    ("symlink-loop-nll", symlink_loop, "eval-nll"),
    ("symlink-loop-mbpp", symlink_loop, "eval-mbpp"),
    ("dangling-symlink", dangling_symlink, "curate-pool"),
    ("fifo", fifo, "prune"),
    ("fifo-math", fifo, "eval-math"),
    ("unreadable", unreadable, "prune"),
    ("unreadable-reference", unreadable, "curate-reference"),
    ("ds-state-not-json", ds_state_not_json, "recover"),
    ("ds-state-wrong-types", ds_state_wrong_types, "prune"),
    ("ds-state-entry-not-object", ds_state_entry_not_object, "curate-pool"),
    ("ds-state-escapes", ds_state_escapes, "prune"),
    ("ds-state-absolute", ds_state_absolute, "eval-nll"),
    ("ds-arrow-corrupt", ds_arrow_corrupt, "prune"),
    ("ds-dict-broken", ds_dict_broken, "prune"),
    ("broken-parquet", broken_parquet, "curate-pool"),
    ("text-named-parquet", text_named_parquet, "prune"),
]


@pytest.fixture(scope="module")
def tiny(tiny_model_dirs):
    return str(tiny_model_dirs["llama"])


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("FINESCOPE_HOME", str(tmp_path / "home"))


def _argv(command: str, bad: Path, tiny: str, good: Path, out: Path) -> list[str]:
    bad_s, good_s, out_s = str(bad), str(good), str(out)
    return {
        "curate-pool": ["curate", "--pool", bad_s, "--seeds", good_s, "--method", "random", "--out", out_s],
        "curate-seeds": ["curate", "--seeds", bad_s, "--pool", good_s, "--method", "random", "--out", out_s],
        "curate-reference": [
            "curate",
            "--reference",
            bad_s,
            "--pool",
            good_s,
            "--seeds",
            good_s,
            "--model",
            tiny,
            "--num-coords",
            "8",
            "--out",
            out_s,
        ],
        "prune": ["prune", "--data", bad_s, "--model", tiny, "--out", out_s],
        "recover": ["recover", "--data", bad_s, "--student", tiny, "--no-teacher", "--out", out_s],
        "eval-nll": ["eval", "--model", tiny, "--tasks", f"nll:{bad_s}", "--device", "cpu", "--out", out_s],
        "eval-math": ["eval", "--model", tiny, "--tasks", f"math:{bad_s}", "--device", "cpu", "--out", out_s],
        "eval-mbpp": [
            "eval",
            "--model",
            tiny,
            "--tasks",
            f"mbpp:{bad_s}",
            "--allow-code-execution",
            "--device",
            "cpu",
            "--out",
            out_s,
        ],
    }[command]


def _assert_user_error(rc: int, err: str, command: str, name: str, expected: str, out: Path) -> None:
    assert "Traceback" not in err, err[-3000:]
    assert rc == 2, err[-3000:]
    lines = err.rstrip("\n").split("\n")
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith(f"finescope {command}: error:"), lines[0]
    assert name in lines[0], lines[0]
    assert expected in lines[0], lines[0]
    assert len(lines[0]) < 1200, f"message of {len(lines[0]):,} characters"
    assert "weights_only=False" not in err
    assert not out.exists(), f"{out} was created"


def _deny_open(monkeypatch, bad: Path) -> None:
    """Simulate an unreadable file (chmod 000 does not stop root): open() of it raises PermissionError."""
    real_open = builtins.open

    def fake_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and Path(file).name == bad.name:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)


def _forbid_reading_outside(monkeypatch, root: Path) -> list:
    """Record any Arrow file opened outside `root` (a state.json must never make us read /etc/passwd)."""
    import pyarrow as pa

    opened = []
    real = pa.memory_map

    def spy(path, *a, **k):
        if not Path(path).resolve().is_relative_to(root.resolve()):
            opened.append(path)
        return real(path, *a, **k)

    monkeypatch.setattr(pa, "memory_map", spy)
    return opened


@pytest.mark.parametrize("case,builder,command", RECORD_CASES, ids=[c[0] for c in RECORD_CASES])
def test_bad_record_input_is_one_line_error(case, builder, command, tiny, tmp_path, capsys, monkeypatch):
    bad, expected = builder(tmp_path / "in")
    good = _write(
        tmp_path / "good" / ("math.jsonl" if command == "eval-math" else "good.jsonl"),
        _jsonl([MATH_ROW] if command == "eval-math" else GOOD_ROWS),
    )
    if builder is unreadable:
        _deny_open(monkeypatch, bad)
    opened = _forbid_reading_outside(monkeypatch, tmp_path)
    out = tmp_path / "out"
    rc = main(_argv(command, bad, tiny, good, out))
    err = capsys.readouterr().err
    cmd = command.split("-")[0]
    _assert_user_error(rc, err, cmd, bad.name, expected, out)
    assert not opened
    if builder in (symlink_loop, dangling_symlink):
        assert "no such file" not in err


# ================================================================================================ bad models


def _copy_model(tiny: str, d: Path) -> Path:
    folder = d / "model"
    shutil.copytree(tiny, folder)
    return folder


def fake_gguf(d, tiny):
    return _write(d / "fake.gguf", os.urandom(4096)), "not a GGUF file"


def gguf_magic_garbage(d, tiny):
    return _write(d / "garbage.gguf", b"GGUF" + os.urandom(4096)), "cannot convert this GGUF file"


def truncated_safetensors(d, tiny):
    folder = _copy_model(tiny, d)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return folder, "model.safetensors: not a readable safetensors file"


def safetensors_header_only(d, tiny):
    folder = _copy_model(tiny, d)
    (folder / "model.safetensors").write_bytes(b"\x10")
    return folder, "model.safetensors"


def pickle_bin(d, tiny):
    from safetensors.torch import load_file

    folder = _copy_model(tiny, d)
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    state["extra"] = _Opaque()  # a global outside torch's weights_only allowlist
    torch.save(state, folder / "pytorch_model.bin")
    return folder, "pytorch_model.bin: a pickle checkpoint"


class _Opaque:
    pass


def config_not_json(d, tiny):
    folder = _copy_model(tiny, d)
    (folder / "config.json").write_text("{not json")
    return folder, "config.json: invalid JSON"


def config_no_model_type(d, tiny):
    folder = _copy_model(tiny, d)
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["model_type"]
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder, "config.json: no 'model_type' field"


def config_model_type_not_str(d, tiny):
    folder = _copy_model(tiny, d)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = ["llama"] * 1000
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder, "field 'model_type' must be a string"


def config_bad_field_type(d, tiny):
    folder = _copy_model(tiny, d)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["hidden_size"] = "wide"
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder, "config.json: invalid model config"


def config_is_list(d, tiny):
    folder = _copy_model(tiny, d)
    (folder / "config.json").write_text("[]")
    return folder, "expected a JSON object"


def tokenizer_not_json(d, tiny):
    folder = _copy_model(tiny, d)
    (folder / "tokenizer.json").write_text("{garbage")
    return folder, "tokenizer.json: cannot load the tokenizer"


def model_symlink_loop(d, tiny):
    d.mkdir(parents=True, exist_ok=True)
    os.symlink(d / "m", d / "m")
    return d / "m", "symlink loop"


def model_fifo(d, tiny):
    d.mkdir(parents=True, exist_ok=True)
    os.mkfifo(d / "model-pipe")
    return d / "model-pipe", "named pipe"


MODEL_CASES = [
    ("fake-gguf", fake_gguf, "info"),
    ("gguf-magic-garbage", gguf_magic_garbage, "info"),
    ("truncated-safetensors", truncated_safetensors, "info"),
    ("truncated-safetensors-prune", truncated_safetensors, "prune"),
    ("truncated-safetensors-eval", truncated_safetensors, "eval"),
    ("safetensors-header-only", safetensors_header_only, "info"),
    ("pickle-bin", pickle_bin, "info"),
    ("pickle-bin-curate", pickle_bin, "curate"),
    ("config-not-json", config_not_json, "info"),
    ("config-no-model-type", config_no_model_type, "info"),
    ("config-no-model-type-prune", config_no_model_type, "prune"),
    ("config-model-type-not-str", config_model_type_not_str, "info"),
    ("config-bad-field-type", config_bad_field_type, "info"),
    ("config-is-list", config_is_list, "info"),
    ("tokenizer-not-json", tokenizer_not_json, "info"),
    ("model-symlink-loop", model_symlink_loop, "info"),
    ("model-fifo", model_fifo, "info"),
]


def _model_argv(command: str, model: Path, data: Path, out: Path) -> list[str]:
    return {
        "info": ["info", str(model), "--device", "cpu"],
        "prune": ["prune", "--data", str(data), "--model", str(model), "--out", str(out)],
        "eval": ["eval", "--model", str(model), "--tasks", f"nll:{data}", "--device", "cpu", "--out", str(out)],
        "curate": ["curate", "--model", str(model), "--pool", str(data), "--seeds", str(data), "--out", str(out)],
    }[command]


@pytest.mark.parametrize("case,builder,command", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_bad_model_is_one_line_error(case, builder, command, tiny, tmp_path, capsys):
    model, expected = builder(tmp_path / "in", tiny)
    data = _write(tmp_path / "data.jsonl", _jsonl(GOOD_ROWS))
    out = tmp_path / "out"
    rc = main(_model_argv(command, model, data, out))
    err = capsys.readouterr().err
    _assert_user_error(rc, err, command, model.name, expected, out)
    assert "weights_only" not in err  # never repeat torch's advice to unpickle arbitrary code
    if builder is pickle_bin:
        assert "safetensors" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_device_without_cuda(device, tiny, tmp_path, capsys):
    data = _write(tmp_path / "data.jsonl", _jsonl(GOOD_ROWS))
    out = tmp_path / "out"
    assert main(["info", tiny, "--device", device]) == 2
    err = capsys.readouterr().err
    _assert_user_error(2, err, "info", Path(tiny).name, "CUDA is not available", out)
    rc = main(["eval", "--model", tiny, "--tasks", f"nll:{data}", "--device", device, "--out", str(out)])
    _assert_user_error(rc, capsys.readouterr().err, "eval", Path(tiny).name, "--device cpu", out)


def test_unknown_device_name(tiny, capsys):
    assert main(["info", tiny, "--device", "gpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "device 'gpu': not a device name" in err


# ================================================================================================ skip-bad-rows


def test_skip_bad_rows_skips_and_counts_non_utf8_rows(tmp_path):
    path = _write(tmp_path / "mixed.jsonl", _jsonl(GOOD_ROWS[:2]) + b'{"text": "caf\xe9"}\n' + _jsonl(GOOD_ROWS[2:]))
    recs = read_records(path, skip_bad_rows=True)
    assert len(recs) == 4 and recs.skipped == 1
    assert recs.skipped_reasons[0].startswith("line 3: not UTF-8 text (byte 0xe9")
    csv_path = _write(tmp_path / "mixed.csv", b"text\nfine\ncaf\xe9\nalso fine\n")
    recs = read_records(csv_path, skip_bad_rows=True)
    assert [r["text"] for r in recs] == ["fine", "also fine"] and recs.skipped == 1
    esc = _write(tmp_path / "esc.jsonl", b'{"text": "ok"}\n{"text": "bad \\udc80"}\n')
    recs = read_records(esc, skip_bad_rows=True)
    assert len(recs) == 1 and "lone surrogate" in recs.skipped_reasons[0]


def test_skip_bad_rows_through_the_cli(tmp_path, capsys):
    pool = _write(tmp_path / "pool.jsonl", _jsonl(GOOD_ROWS) + b'{"text": "caf\xe9"}\n')
    seeds = _write(tmp_path / "seeds.jsonl", _jsonl(GOOD_ROWS[:1]))
    out = tmp_path / "out"
    argv = ["curate", "--pool", str(pool), "--seeds", str(seeds), "--method", "random", "--top-m", "2"]
    assert main(argv + ["--out", str(tmp_path / "refused")]) == 2
    assert "pool.jsonl: line 5: not UTF-8" in capsys.readouterr().err
    assert main(argv + ["--skip-bad-rows", "--out", str(out)]) == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["pool_records"] == 4


# ================================================================================================ what still reads


def test_friendly_encodings_and_compressions_still_read(tmp_path):
    import lzma

    data = _jsonl(GOOD_ROWS)
    assert len(read_records(_write(tmp_path / "bom.jsonl", b"\xef\xbb\xbf" + data))) == 4
    assert len(read_records(_write(tmp_path / "bom.csv", b"\xef\xbb\xbfinstruction,response\na,b\n"))) == 1
    assert read_records(tmp_path / "bom.csv")[0]["instruction"] == "a"
    assert len(read_records(_write(tmp_path / "a.jsonl.bz2", bz2.compress(data)))) == 4
    assert len(read_records(_write(tmp_path / "a.jsonl.xz", lzma.compress(data)))) == 4
    big = "y" * 300_000  # past csv's default 128 KiB field limit
    assert read_records(_write(tmp_path / "big.csv", f"text\n{big}\n".encode()))[0]["text"] == big
    crlf = _write(tmp_path / "crlf.jsonl", data.replace(b"\n", b"\r\n"))
    assert len(read_records(crlf)) == 4


def test_huge_line_is_reported_in_a_short_message(tmp_path):
    """The 10 MB line is reported in a few hundred characters that name the line, without quoting the line."""
    from finescope.data import RecordError

    path, expected = huge_line(tmp_path)
    with pytest.raises(RecordError) as e:
        read_records(path)
    message = str(e.value)
    assert expected in message and len(message) < 500 and "x" * 500 not in message
    assert sys.getrecursionlimit() < DEEP


def test_legacy_8_bit_text_files_are_still_read(tmp_path):
    """The binary check keeps the latin-1 fallback for real legacy text: accents and cp1252 quotes pass."""
    from finescope.data import read_records

    folder = tmp_path / "legacy"
    _write(
        folder / "a.txt",
        "Caf\u00e9 cr\u00e8me, na\u00efve r\u00e9sum\u00e9 \u2014 \u201cquoted\u201d.\n".encode("cp1252"),
    )
    _write(folder / "b.txt", ("Zo\u00eb's \u00bd price.\t" * 50).encode("latin-1"))
    rows = read_records(folder)
    assert [r["id"] for r in rows] == ["a.txt", "b.txt"] and rows[0]["text"].startswith("Café crème")
