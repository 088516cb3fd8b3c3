"""Read records from every supported format and normalise them to the Record contract (docs/design.md §8).

A record is `{"id", "instruction", "response"}` (instruction data) or `{"id", "text"}` (plain text), plus any
extra fields carried through untouched. Accepted aliases: Alpaca `instruction`/`input`/`output`,
`prompt`/`completion`, `question`/`answer`, chat `messages` (first user turn → instruction, last assistant turn
→ response; a system turn is kept as `system`). A missing `id` becomes a stable hash of the content.

Formats: .jsonl, .json (a list, or an object holding one list), .parquet, .csv/.tsv (the text formats also
compressed: .gz, .bz2, .xz), a folder of .txt files (recursively), and a folder written by
`datasets.Dataset.save_to_disk` (read with pyarrow alone). Text must be UTF-8 (a UTF-8 byte-order mark is fine).

Every way an input can be unusable (missing, a folder or pipe where a file is expected, a symlink loop, not UTF-8,
truncated compression, nesting too deep, a broken save_to_disk folder, corrupt parquet) is a one-line RecordError
naming the file (and line/row and field); a row that is not UTF-8 counts as a bad row for `skip_bad_rows`.

    from finescope.data import read_records
    records = read_records("data/pool.jsonl")                      # error names file and line on a bad row
    records = read_records("data/pool.jsonl", skip_bad_rows=True)  # skipped rows are counted on .skipped
"""

from __future__ import annotations

import bz2
import csv
import errno
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import stat
import sys
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path, PurePath
from typing import Any

from . import FinescopeError
from .digest_set import DigestSet
from .hashing import sha256_hex
from .messages import flat, one_line, quote

# One row source yields (location, raw row); location is e.g. "line 12", "row 3", "item 7".
RawRow = tuple[str, Any]


class RecordError(FinescopeError):
    """Malformed or empty record input; the message names the file and the line/row and field."""

    def __init__(self, message: str = ""):
        super().__init__(flat(message))


def check_input_path(
    path: str | os.PathLike,
    *,
    want: str = "file or folder",
    what: str = "record file",
    error: type[FinescopeError] = RecordError,
) -> os.stat_result:
    """stat `path` without opening it; every way it is unusable becomes one clear `error`.

    Missing, a dangling symlink, a symlink loop, an inaccessible parent, a folder when `want` is "file", and a
    FIFO, socket or device (reading those would block or never end) are each named as what they are.
    """
    path = Path(path)
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise error(f"{path}: a symlink loop (the link leads back to itself); point it at a real {what}") from None
        if os.path.islink(path):
            target = os.readlink(path)
            raise error(
                f"{path}: a symlink to {quote(target)}, which does not exist; fix the link or pass the {what} itself"
            ) from None
        if e.errno == errno.ENOENT:
            raise error(f"{path}: no such {want}") from None
        if e.errno == errno.ENOTDIR:
            raise error(f"{path}: no such {want} (a folder in the path is a file)") from None
        raise error(f"{path}: cannot access it ({e.strerror or e}); check the path and its permissions") from None
    except ValueError as e:  # e.g. an embedded NUL character in the path
        raise error(f"{quote(str(path))}: not a usable path ({e})") from None
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        if want == "file":
            raise error(f"{path}: is a folder, not a file; pass a {what}")
    elif not stat.S_ISREG(mode):
        kind = (
            "a named pipe (FIFO)"
            if stat.S_ISFIFO(mode)
            else "a socket"
            if stat.S_ISSOCK(mode)
            else "a device"
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "not a regular file"
        )
        raise error(f"{path}: is {kind}, not a regular file; pass a {what}")
    return st


class Records(list):
    """A list of normalised records that also remembers where they came from and how many rows were skipped."""

    def __init__(self, items=(), *, source: str = "", skipped: int = 0, skipped_reasons: list[str] | None = None):
        super().__init__(items)
        self.source = source
        self.skipped = skipped
        self.skipped_reasons = skipped_reasons or []


# ================================================================================================ normalisation


def _text(value: Any, field: str) -> str:
    if value is None:
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise ValueError(f"field {field!r} must be a string, got {type(value).__name__}")
    bad = _SURROGATE.search(value)
    if bad:
        raise ValueError(
            f"field {field!r} holds a lone surrogate (\\u{ord(bad.group()):04x} at character "
            f"{bad.start()}), which is not valid Unicode text; fix that escape in the file"
        )
    return value


# A character of U+D800..U+DFFF: a lone surrogate from a JSON escape, or (U+DC80..U+DCFF) a byte that was not
# UTF-8, kept by the reader's surrogateescape decoding so the row (not the file) can be reported.
_SURROGATE = re.compile("[\ud800-\udfff]")
_UNDECODED = re.compile("[\udc80-\udcff]")


def _not_utf8(text: str, where: str = "") -> str | None:
    """The reason `text` (decoded with surrogateescape) holds a byte that was not UTF-8, or None."""
    m = _UNDECODED.search(text)
    if m is None:
        return None
    return (
        f"not UTF-8 text (byte 0x{ord(m.group()) - 0xDC00:02x} at {where or 'column'} {m.start() + 1}); "
        "re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
    )


def _from_messages(messages: Any) -> tuple[str, str, str | None]:
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ValueError("field 'messages' must be a list of {role, content} objects")
    for i, m in enumerate(messages):
        if "role" not in m or "content" not in m:
            raise ValueError(f"field 'messages[{i}]' needs 'role' and 'content'")
    users = [m for m in messages if m["role"] == "user"]
    assistants = [m for m in messages if m["role"] == "assistant"]
    if not users:
        raise ValueError("field 'messages' has no user turn")
    system = next((_text(m["content"], "messages.content") for m in messages if m["role"] == "system"), None)
    response = _text(assistants[-1]["content"], "messages.content") if assistants else ""
    return _text(users[0]["content"], "messages.content"), response, system


# (instruction field, response field) pairs, checked in order; Alpaca's `input` is appended to the instruction.
_PAIRS = (
    ("instruction", "response"),
    ("instruction", "output"),
    ("prompt", "completion"),
    ("prompt", "response"),
    ("question", "answer"),
)
_CONSUMED = {
    "instruction",
    "input",
    "output",
    "response",
    "prompt",
    "completion",
    "question",
    "answer",
    "messages",
    "text",
}


def normalise_record(raw: Any) -> dict:
    """One raw row → a Record (without id). Raises ValueError with the offending field on bad input."""
    if not isinstance(raw, dict):
        raise ValueError(f"expected an object with fields, got {type(raw).__name__}")
    extras = {k: v for k, v in raw.items() if k not in _CONSUMED and k != "id"}
    if "messages" in raw and raw["messages"] is not None:
        instruction, response, system = _from_messages(raw["messages"])
        if system is not None and "system" not in extras:
            extras["system"] = system
        rec = {"instruction": instruction, "response": response}
    else:
        pair = next(((i, r) for i, r in _PAIRS if i in raw and r in raw), None)
        if pair is not None:
            instruction = _text(raw[pair[0]], pair[0])
            extra_input = _text(raw.get("input"), "input") if pair[0] == "instruction" else ""
            if extra_input.strip():
                instruction = f"{instruction}\n\n{extra_input}"
            rec = {"instruction": instruction, "response": _text(raw[pair[1]], pair[1])}
        elif "text" in raw:
            rec = {"text": _text(raw["text"], "text")}
        else:
            lone = next((f for pair in _PAIRS for f in pair if f in raw), None)
            if lone is not None:
                partners = sorted({b for a, b in _PAIRS if a == lone} | {a for a, b in _PAIRS if b == lone})
                raise ValueError(f"field {lone!r} needs a partner field ({' or '.join(map(repr, partners))})")
            raise ValueError(
                "no usable fields: expected text, instruction/response, instruction/input/output, "
                "prompt/completion, question/answer or messages; got "
                f"{one_line(', '.join(map(quote, raw))) or 'nothing'}"
            )
    content = rec.get("text", "") or rec.get("instruction", "") + rec.get("response", "")
    if not content.strip():
        raise ValueError("record has no text (all text fields are empty)")
    if "instruction" in rec and not rec["instruction"].strip():
        raise ValueError("field 'instruction' is empty")
    if extras:
        try:
            dumped = json.dumps(extras, ensure_ascii=False, default=str)
        except RecursionError:
            raise ValueError("extra fields are nested too deeply") from None
        except (TypeError, ValueError):  # keys that are not strings: nothing to check
            dumped = ""
        bad = _SURROGATE.search(dumped)
        if bad:
            raise ValueError(
                f"an extra field holds a lone surrogate (\\u{ord(bad.group()):04x}), which is not valid "
                "Unicode text; fix that escape in the file"
            )
    rec.update(extras)
    if raw.get("id") not in (None, ""):
        rid = str(raw["id"])
        if _SURROGATE.search(rid):
            raise ValueError("field 'id' holds a lone surrogate, which is not valid Unicode text")
        rec = {"id": rid, **rec}
    return rec


def content_id(rec: dict) -> str:
    """Stable id from the content: the same text always gets the same id, on any machine."""
    if "text" in rec:
        key = {"text": rec["text"]}
    else:
        key = {"instruction": rec["instruction"], "response": rec["response"]}
    return sha256_hex(json.dumps(key, sort_keys=True, ensure_ascii=False), 16)


# ================================================================================================ formats

# Compressions read transparently (stdlib), and ones refused with the command that unpacks them.
_COMPRESSED: dict[str, Callable[..., io.BufferedIOBase]] = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_UNSUPPORTED_COMPRESSION = {
    ".zst": ("zstd", "zstd -d"),
    ".zstd": ("zstd", "zstd -d"),
    ".lz4": ("lz4", "lz4 -d"),
    ".zip": ("zip", "unzip"),
    ".7z": ("7z", "7z x"),
    ".br": ("brotli", "brotli -d"),
    ".lzma": ("lzma", "unxz --format=lzma"),
}
# Leading bytes of formats a text file must not hold, so a misnamed file is named as what it is.
_MAGIC = (
    (b"\x1f\x8b", "gzip-compressed data", "name it {name}.gz"),
    (b"BZh", "bzip2-compressed data", "name it {name}.bz2"),
    (b"\xfd7zXZ\x00", "xz-compressed data", "name it {name}.xz"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed data", "decompress it first (zstd -d)"),
    (b"PK\x03\x04", "a zip archive", "unzip it first"),
    (b"PAR1", "a parquet file", "name it with a .parquet suffix"),
)
_BOMS = (
    (b"\xff\xfe\x00\x00", "UTF-32"),
    (b"\x00\x00\xfe\xff", "UTF-32"),
    (b"\xff\xfe", "UTF-16"),
    (b"\xfe\xff", "UTF-16"),
)


def _open_binary(path: Path):
    opener = _COMPRESSED.get(path.suffix.lower())
    return opener(path, "rb") if opener else open(path, "rb")


def _check_text_head(path: Path) -> None:
    """Refuse, by its first bytes, a text file that is UTF-16/32 or binary (compressed, parquet) data."""
    with _open_binary(path) as f:
        head = f.read(4096)
    for bom, name in _BOMS:
        if head.startswith(bom):
            raise RecordError(
                f"{path}: {name} text (it starts with a {name} byte-order mark); re-save it as UTF-8 "
                f"(e.g. iconv -f {name} -t UTF-8)"
            )
    compressed = path.suffix.lower() in _COMPRESSED
    for magic, what, fix in _MAGIC:
        if head.startswith(magic) and not compressed and (magic != b"BZh" or head[4:10] == b"1AY&SY"):
            raise RecordError(f"{path}: holds {what}, not text; {fix.format(name=path.name)}")
    if len(head) >= 8 and head.count(b"\x00") * 4 >= len(head):
        raise RecordError(
            f"{path}: mostly NUL bytes: UTF-16/32 text without a byte-order mark, or binary data; "
            "re-save it as UTF-8 text"
        )


def _open_text(path: Path) -> io.TextIOBase:
    """UTF-8 text (a UTF-8 BOM is dropped); bytes that are not UTF-8 come through as U+DC80..U+DCFF (surrogateescape)
    so that the row holding them can be reported, or skipped, instead of the whole file failing."""
    _check_text_head(path)
    return io.TextIOWrapper(_open_binary(path), encoding="utf-8-sig", errors="surrogateescape", newline="")


def _parse_json(text: str):
    """json.loads, with nesting too deep for the parser reported as a plain ValueError."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(
            f"JSON nested too deeply to read (more than about {sys.getrecursionlimit()} levels); flatten the record"
        ) from None


def _rows_jsonl(path: Path) -> Iterator[RawRow]:
    with _open_text(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            bad = _not_utf8(line)
            if bad:
                yield f"line {n}", _Bad(bad)
                continue
            try:
                yield f"line {n}", _parse_json(line)
            except json.JSONDecodeError as e:
                hint = "; the line holds NUL bytes (binary data?)" if "\x00" in line else ""
                yield f"line {n}", _Bad(f"invalid JSON ({e.msg.removesuffix(' at')} at column {e.colno}){hint}")
            except ValueError as e:
                yield f"line {n}", _Bad(str(e))


def _rows_json(path: Path) -> Iterator[RawRow]:
    with _open_text(path) as f:
        text = f.read()
    m = _UNDECODED.search(text)
    if m:
        line = text.count("\n", 0, m.start()) + 1
        column = m.start() - (text.rfind("\n", 0, m.start()) + 1) + 1
        raise RecordError(
            f"{path}: line {line}: not UTF-8 text (byte 0x{ord(m.group()) - 0xDC00:02x} at column "
            f"{column}); re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        )
    try:
        data = _parse_json(text)
    except json.JSONDecodeError as e:
        raise RecordError(
            f"{path}: line {e.lineno}: invalid JSON ({e.msg.removesuffix(' at')} at column {e.colno})"
        ) from None
    except ValueError as e:
        raise RecordError(f"{path}: {e}") from None
    if isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if len(lists) != 1:
            raise RecordError(f"{path}: expected a JSON list of records (or an object holding exactly one list)")
        data = data[lists[0]]
    if not isinstance(data, list):
        raise RecordError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    for n, item in enumerate(data):
        yield f"item {n}", item


def _rows_csv(path: Path) -> Iterator[RawRow]:
    # Long documents are fine (the default limit is 128 KiB a field); strict: a stray quote that would silently
    # swallow the rest of the file into one field is an error naming the line.
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    with _open_text(path) as f:
        reader = csv.DictReader(f, delimiter="\t" if ".tsv" in [s.lower() for s in path.suffixes] else ",", strict=True)
        try:
            for row in reader:
                where = f"line {reader.line_num}"
                if None in row:
                    yield where, _Bad("more values than header columns")
                    continue
                bad = next((k for k, v in row.items() if _UNDECODED.search(f"{k}{v or ''}")), None)
                if bad is not None:
                    m = _UNDECODED.search(f"{bad}{row[bad] or ''}")
                    assert m is not None, "the same search just matched this column"
                    yield (
                        where,
                        _Bad(
                            f"not UTF-8 text (byte 0x{ord(m.group()) - 0xDC00:02x} in column "
                            f"{quote(bad, 60)}); re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
                        ),
                    )
                    continue
                yield where, {k: v for k, v in row.items() if v is not None}
        except csv.Error as e:
            raise RecordError(
                f"{path}: line {reader.line_num}: {one_line(e)}; check the quoting (a field holding "
                "the delimiter, a quote or a line break must be in double quotes, inner quotes "
                "doubled)"
            ) from None


def _rows_arrow_table(table, start: int = 0) -> Iterator[RawRow]:
    n = start
    for batch in table.to_batches(max_chunksize=4096):
        for row in batch.to_pylist():
            yield f"row {n}", row
            n += 1


def _rows_parquet(path: Path) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise RecordError(
            f"{path}: not a readable parquet file ({one_line(e)}); re-write it (e.g. with pandas or pyarrow)"
        ) from None
    yield from _rows_arrow_table(table)


def _hf_state_files(path: Path) -> list[Path]:
    """The data files a `save_to_disk` folder's state.json lists, each checked to lie inside the folder."""
    state_file = path / "state.json"
    fix = "re-save the dataset with save_to_disk"
    try:
        state = _parse_json(state_file.read_bytes().decode("utf-8-sig"))
    except json.JSONDecodeError as e:
        raise RecordError(f"{state_file}: line {e.lineno}: invalid JSON ({e.msg}); {fix}") from None
    except UnicodeDecodeError as e:
        raise RecordError(f"{state_file}: not UTF-8 text (byte {e.start}); {fix}") from None
    except ValueError as e:
        raise RecordError(f"{state_file}: {e}") from None
    except OSError as e:
        raise RecordError(f"{state_file}: cannot read it ({e.strerror or e}); {fix}") from None
    if not isinstance(state, dict):
        raise RecordError(f"{state_file}: expected a JSON object, got {type(state).__name__}; {fix}")
    entries = state.get("_data_files")
    if not isinstance(entries, list) or not entries:
        got = "nothing" if entries is None else quote(entries)
        raise RecordError(
            f"{state_file}: field '_data_files' must be a non-empty list of {{\"filename\": …}} "
            f"objects, got {got}; {fix}"
        )
    try:
        root = path.resolve(strict=True)
    except (OSError, RuntimeError) as e:
        raise RecordError(f"{path}: cannot resolve the folder ({one_line(e)})") from None
    files = []
    for i, entry in enumerate(entries):
        field = f"_data_files[{i}].filename"
        name = entry.get("filename") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name.strip() or "\x00" in name:
            got = quote(entry) if not isinstance(entry, dict) else quote(name)
            raise RecordError(f"{state_file}: field {field!r} must be a file name inside the folder, got {got}; {fix}")
        target = path / name
        escapes = PurePath(name).is_absolute() or ".." in PurePath(name).parts
        if not escapes:
            try:
                escapes = not target.resolve().is_relative_to(root)
            except (OSError, RuntimeError):  # a symlink loop: reported by check_input_path below
                escapes = False
        if escapes:
            raise RecordError(
                f"{state_file}: field {field!r} = {quote(name)} points outside the dataset folder; "
                f"refusing to read it ({fix})"
            )
        try:
            check_input_path(target, want="file", what="Arrow data file")
        except RecordError as e:
            raise RecordError(f"{state_file}: field {field!r} names a data file that cannot be read: {e}") from None
        files.append(target)
    return files


def _rows_hf_dataset(path: Path) -> Iterator[RawRow]:
    """A `save_to_disk` folder: state.json lists the arrow files (Arrow IPC stream format)."""
    import pyarrow as pa

    offset = 0
    for file in _hf_state_files(path):
        try:
            with pa.memory_map(str(file)) as source:
                table = pa.ipc.open_stream(source).read_all()
        except (pa.ArrowException, OSError, ValueError) as e:
            raise RecordError(
                f"{file}: not a readable Arrow stream file ({one_line(e)}); re-save the dataset with save_to_disk"
            ) from None
        yield from _rows_arrow_table(table, start=offset)
        offset += table.num_rows


def _rows_txt_dir(path: Path) -> Iterator[RawRow]:
    files = sorted(p for p in path.rglob("*.txt") if p.is_file())
    if not files:
        raise RecordError(
            f"{path}: no usable records: a folder with no .txt files (and not a datasets save_to_disk "
            "folder); pass a record file (.jsonl, .json, .parquet, .csv, .tsv) or a folder of .txt files"
        )
    for p in files:
        rel = p.relative_to(path).as_posix()
        try:
            data = p.read_bytes()
        except OSError as e:
            raise RecordError(f"{p}: cannot read it ({e.strerror or e}); check its permissions") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = data.decode("latin-1")  # legacy 8-bit text; binary data is refused below
        why = _binary(text)
        if why:
            raise RecordError(
                f"{p}: binary data, not text ({why}); remove it from the folder (a .txt name does not make an "
                "image, PDF or archive text)"
            )
        yield f"file {rel}", {"id": rel, "text": text, "source_file": rel}


BINARY_CONTROL_SHARE = 0.05
"""Share of control characters (other than tab, line and page breaks) above which a .txt file is binary data:
real text, legacy 8-bit text included, has next to none; random bytes decoded as latin-1 have about 13 %."""
_NOT_CP1252 = "\x7f\x81\x8d\x8f\x90\x9d"
"""DEL and the bytes 0x80–0x9f that are not even Windows-1252 text (whose quotes and dashes live in that range)."""


def _binary(text: str) -> str | None:
    """Why a decoded .txt file is binary data (a NUL byte, or mostly control characters), or None for text."""
    if "\0" in text:
        return "it holds NUL bytes"
    sample = text[: 1 << 20]
    control = sum(1 for c in sample if (c < " " and c not in "\t\n\r\f\v") or c in _NOT_CP1252)
    if sample and control > BINARY_CONTROL_SHARE * len(sample):
        return f"{control / len(sample):.0%} control characters"
    return None


class _Bad:
    """A row that could not even be parsed; carries the reason."""

    def __init__(self, reason: str):
        self.reason = reason


def _read_dataset_dict(path: Path) -> None:
    """Refuse a saved DatasetDict, naming its splits."""
    index = path / "dataset_dict.json"
    try:
        splits = _parse_json(index.read_bytes().decode("utf-8-sig")).get("splits", [])
    except (ValueError, OSError, AttributeError) as e:
        raise RecordError(
            f"{index}: a saved DatasetDict whose index cannot be read ({one_line(e, 120)}); pass one "
            f"split's folder, e.g. {path / 'train'}"
        ) from None
    splits = [s for s in splits if isinstance(s, str)] if isinstance(splits, list) else []
    shown = ", ".join(quote(s, 60) for s in splits[:10]) or "(none listed)"
    raise RecordError(
        f"{path}: a saved DatasetDict with splits {shown}; pass one split's folder, "
        f"e.g. {path / (splits[0] if splits else 'train')}"
    )


def _guarded(path: Path, rows: Iterator[RawRow]) -> Iterator[RawRow]:
    """`rows`, with every way reading the file can fail turned into a one-line RecordError naming it."""
    compressed = path.suffix.lower() in _COMPRESSED
    try:
        yield from rows
    except FinescopeError:
        raise
    except gzip.BadGzipFile as e:
        raise RecordError(
            f"{path}: not gzip data although it is named {path.suffix} ({one_line(e)}); rename it "
            "without .gz, or compress it with gzip"
        ) from None
    except (EOFError, zlib.error, lzma.LZMAError) as e:
        raise RecordError(
            f"{path}: the compressed data is truncated or corrupt ({one_line(e) or 'ended early'}); "
            "re-create or re-download the file"
        ) from None
    except OSError as e:
        if compressed and e.errno is None:  # bz2 reports bad data as a bare OSError
            raise RecordError(
                f"{path}: the compressed data is corrupt ({one_line(e)}); re-create or re-download the file"
            ) from None
        raise RecordError(
            f"{path}: cannot read it ({e.strerror or one_line(e)}); check that it is a readable file"
        ) from None
    except UnicodeError as e:
        raise RecordError(f"{path}: not UTF-8 text ({one_line(e)}); re-save it as UTF-8") from None
    except RecursionError:
        raise RecordError(f"{path}: data nested too deeply to read; flatten the records") from None


def _row_source(path: Path) -> Iterator[RawRow]:
    st = check_input_path(path)
    if stat.S_ISDIR(st.st_mode):
        if (path / "dataset_dict.json").is_file():
            _read_dataset_dict(path)
        if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
            return _guarded(path, _rows_hf_dataset(path))
        return _guarded(path, _rows_txt_dir(path))
    suffixes = [s.lower() for s in path.suffixes]
    last = suffixes[-1] if suffixes else ""
    if last in _UNSUPPORTED_COMPRESSION:
        name, command = _UNSUPPORTED_COMPRESSION[last]
        raise RecordError(
            f"{path}: {name}-compressed files are not supported; decompress it first ({command}), or "
            "compress it with gzip (.gz), bzip2 (.bz2) or xz (.xz)"
        )
    if last in _COMPRESSED:
        last = suffixes[-2] if len(suffixes) > 1 else ""
    readers = {
        ".jsonl": _rows_jsonl,
        ".ndjson": _rows_jsonl,
        ".json": _rows_json,
        ".parquet": _rows_parquet,
        ".csv": _rows_csv,
        ".tsv": _rows_csv,
    }
    if last == ".parquet" and suffixes[-1] != ".parquet":
        raise RecordError(
            f"{path}: a compressed parquet file; decompress it first (parquet compresses its data itself)"
        )
    if last not in readers:
        raise RecordError(
            f"{path}: unsupported file type {last[:40] or '(none)'}; use .jsonl, .json, .parquet, "
            ".csv, .tsv (the text formats also as .gz, .bz2, .xz), a folder of .txt files, or a datasets "
            "save_to_disk folder"
        )
    if st.st_size == 0:
        raise RecordError(f"{path}: no usable records: the file is empty (0 bytes)")
    return _guarded(path, readers[last](path))


def raw_rows(path: str | os.PathLike) -> Iterator[RawRow]:
    """(location, raw row) of every row of a record file, unnormalised; a row that cannot be parsed comes as a
    `BadRow` carrying the reason. File-level problems raise RecordError (lazily, on iteration for most)."""
    return _row_source(Path(path))


BadRow = _Bad


# ================================================================================================ public API


class RecordStream:
    """The normalised records of a file, read row by row and never held whole: iterate it (again and again, each
    time from the file). Ids are unique within the file; what `read_records` checks, this checks while reading,
    keeping a 16-byte digest per id (`DigestSet`, ~30 bytes each) rather than the ids. After a full pass, `count`, `skipped` and
    `skipped_reasons` describe that pass.

        stream = RecordStream("pool.jsonl.gz")
        for rec in stream: ...
    """

    def __init__(self, path: str | os.PathLike, *, skip_bad_rows: bool = False, limit: int | None = None):
        self.path = Path(path)
        self.skip_bad_rows = skip_bad_rows
        self.limit = limit
        self.count = 0
        self.skipped = 0
        self.skipped_reasons: list[str] = []

    def __iter__(self) -> Iterator[dict]:
        path = self.path
        self.count, self.skipped, self.skipped_reasons = 0, 0, []
        seen = DigestSet()

        def key(rid: str) -> bytes:
            return hashlib.blake2b(rid.encode("utf-8", "surrogatepass"), digest_size=16).digest()

        for where, raw in _row_source(path):
            try:
                if isinstance(raw, _Bad):
                    raise ValueError(raw.reason)
                rec = normalise_record(raw)
                explicit = "id" in rec
                rid = rec["id"] if explicit else content_id(rec)
                if not seen.add(key(rid)):
                    if explicit:
                        first = "earlier" if self.skip_bad_rows else f"at {_first_row_with_id(path, rid)}"
                        raise ValueError(f"duplicate id {quote(rid)} (first seen {first})")
                    n = 2
                    while not seen.add(key(f"{rid}-{n}")):
                        n += 1
                    rid = f"{rid}-{n}"
                out = {"id": rid, **{k: v for k, v in rec.items() if k != "id"}}
            except (ValueError, RecursionError) as e:
                reason = one_line(e, 400) if isinstance(e, ValueError) else "nested too deeply to read"
                if not self.skip_bad_rows:
                    raise RecordError(f"{path}: {where}: {reason}") from None
                self.skipped += 1
                if len(self.skipped_reasons) < 1000:
                    self.skipped_reasons.append(f"{where}: {reason}")
                continue
            self.count += 1
            yield out
            if self.limit is not None and self.count >= self.limit:
                break
        if not self.count:
            detail = (
                f" ({self.skipped} malformed rows skipped; first: {self.skipped_reasons[0]})" if self.skipped else ""
            )
            raise RecordError(f"{path}: no usable records{detail}")


def _first_row_with_id(path: Path, rid: str) -> str:
    """Where the first row with the explicit id `rid` is (one more pass, on the error path only: the stream keeps
    digests, not locations)."""
    for where, raw in _row_source(path):
        if isinstance(raw, _Bad):
            continue
        try:
            if normalise_record(raw).get("id") == rid:
                return where
        except (ValueError, RecursionError):
            continue
    return "earlier"


def read_records(path: str | os.PathLike, *, skip_bad_rows: bool = False, limit: int | None = None) -> Records:
    """Read and normalise every record of `path`; ids are unique within the file.

    A malformed row raises RecordError naming the file and line (or is skipped and counted when
    `skip_bad_rows`). A file with no usable record raises RecordError. (`RecordStream` reads without holding
    the records.)
    """
    stream = RecordStream(path, skip_bad_rows=skip_bad_rows, limit=limit)
    out = Records(stream, source=str(Path(path)))
    out.skipped, out.skipped_reasons = stream.skipped, stream.skipped_reasons
    return out


def record_text(rec: dict, fields: str = "instruction+response") -> str:
    """Plain text of a record for encoding: the text, or instruction (+ response), joined by a blank line."""
    if "text" in rec:
        return rec["text"]
    if fields == "instruction":
        return rec["instruction"]
    if fields == "response":
        return rec.get("response") or rec["instruction"]
    return f"{rec['instruction']}\n\n{rec['response']}" if rec.get("response") else rec["instruction"]


# ================================================================================================ prompt formatting

ALPACA_PROMPT = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"


def format_prompt(tokenizer, instruction: str, system: str | None = None) -> str:
    """The prompt a model sees for an instruction: its chat template with the generation prompt, or Alpaca."""
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": instruction}
        ]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prefix = f"{system}\n\n" if system else ""
    return prefix + ALPACA_PROMPT.format(instruction=instruction)


def format_example(tokenizer, rec: dict) -> tuple[str, str]:
    """(prompt, completion) for training/scoring: the loss falls on `completion` only.

    With a chat template, the completion is the response plus the template's end-of-turn text, found by rendering
    the whole conversation and cutting off the prompt. If a template does not render the prompt as a prefix of
    the conversation (some add reasoning tags), the completion falls back to response + EOS.
    For a text record the prompt is empty and the completion is the text.
    """
    if "text" in rec:
        return "", rec["text"]
    system = rec.get("system") if isinstance(rec.get("system"), str) else None
    prompt = format_prompt(tokenizer, rec["instruction"], system)
    eos = tokenizer.eos_token or ""
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": rec["instruction"]},
            {"role": "assistant", "content": rec["response"]},
        ]
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if full.startswith(prompt) and rec["response"] in full[len(prompt) :]:
            return prompt, full[len(prompt) :]
    return prompt, rec["response"] + eos
