"""Read records from every supported format and normalise them to the Record contract (DESIGN.md §4).

A record is `{"id", "instruction", "response"}` (instruction data) or `{"id", "text"}` (plain text), plus any
extra fields carried through untouched. Accepted aliases: Alpaca `instruction`/`input`/`output`,
`prompt`/`completion`, `question`/`answer`, chat `messages` (first user turn → instruction, last assistant turn
→ response; a system turn is kept as `system`). A missing `id` becomes a stable hash of the content.

Formats: .jsonl (also .jsonl.gz), .json (a list, or an object holding one list), .parquet, .csv/.tsv, a folder of
.txt files (recursively), and a folder written by `datasets.Dataset.save_to_disk` (read with pyarrow alone).

    from finescope.data import read_records
    records = read_records("data/pool.jsonl")                      # error names file and line on a bad row
    records = read_records("data/pool.jsonl", skip_bad_rows=True)  # skipped rows are counted on .skipped
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io as _io
import json
import os
from pathlib import Path
from typing import Any, Iterator

from . import FinescopeError

# One row source yields (location, raw row); location is e.g. "line 12", "row 3", "item 7".
RawRow = tuple[str, Any]


class RecordError(FinescopeError):
    """Malformed or empty record input; the message names the file and the line/row and field."""


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
    return value


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
_PAIRS = (("instruction", "response"), ("instruction", "output"), ("prompt", "completion"),
          ("prompt", "response"), ("question", "answer"))
_CONSUMED = {"instruction", "input", "output", "response", "prompt", "completion", "question", "answer",
             "messages", "text"}


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
                f"prompt/completion, question/answer or messages; got {', '.join(map(repr, raw)) or 'nothing'}"
            )
    content = rec.get("text", "") or rec.get("instruction", "") + rec.get("response", "")
    if not content.strip():
        raise ValueError("record has no text (all text fields are empty)")
    if "instruction" in rec and not rec["instruction"].strip():
        raise ValueError("field 'instruction' is empty")
    rec.update(extras)
    if raw.get("id") not in (None, ""):
        rec = {"id": str(raw["id"]), **rec}
    return rec


def content_id(rec: dict) -> str:
    """Stable id from the content: the same text always gets the same id, on any machine."""
    if "text" in rec:
        key = {"text": rec["text"]}
    else:
        key = {"instruction": rec["instruction"], "response": rec["response"]}
    blob = json.dumps(key, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


# ================================================================================================ formats


def _open_text(path: Path) -> _io.TextIOBase:
    if path.suffix == ".gz":
        return _io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8", newline="")


def _rows_jsonl(path: Path) -> Iterator[RawRow]:
    with _open_text(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"line {n}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"line {n}", _Bad(f"invalid JSON ({e.msg} at column {e.colno})")


def _rows_json(path: Path) -> Iterator[RawRow]:
    with _open_text(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise RecordError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from None
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
    with _open_text(path) as f:
        reader = csv.DictReader(f, delimiter="\t" if ".tsv" in path.suffixes else ",")
        try:
            for row in reader:
                if None in row:
                    yield f"line {reader.line_num}", _Bad("more values than header columns")
                else:
                    yield f"line {reader.line_num}", {k: v for k, v in row.items() if v is not None}
        except csv.Error as e:
            raise RecordError(f"{path}: line {reader.line_num}: {e}") from None


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
        raise RecordError(f"{path}: not a readable parquet file ({e})") from None
    yield from _rows_arrow_table(table)


def _rows_hf_dataset(path: Path) -> Iterator[RawRow]:
    """A `save_to_disk` folder: state.json lists the arrow files (Arrow IPC stream format)."""
    import pyarrow as pa

    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    files = [path / f["filename"] for f in state.get("_data_files", [])]
    if not files:
        raise RecordError(f"{path}: state.json lists no data files")
    offset = 0
    for file in files:
        with pa.memory_map(str(file)) as source:
            table = pa.ipc.open_stream(source).read_all()
        yield from _rows_arrow_table(table, start=offset)
        offset += table.num_rows


def _rows_txt_dir(path: Path) -> Iterator[RawRow]:
    files = sorted(p for p in path.rglob("*.txt") if p.is_file())
    for p in files:
        rel = p.relative_to(path).as_posix()
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            text = p.read_text(encoding="latin-1")
        yield f"file {rel}", {"id": rel, "text": text, "source_file": rel}


class _Bad:
    """A row that could not even be parsed; carries the reason."""

    def __init__(self, reason: str):
        self.reason = reason


def _row_source(path: Path) -> Iterator[RawRow]:
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
            raise RecordError(
                f"{path}: a saved DatasetDict with splits {', '.join(splits)}; pass one split's folder, "
                f"e.g. {path / (splits[0] if splits else 'train')}"
            )
        if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
            return _rows_hf_dataset(path)
        return _rows_txt_dir(path)
    suffixes = [s.lower() for s in path.suffixes]
    last = suffixes[-1] if suffixes else ""
    if last == ".gz":
        last = suffixes[-2] if len(suffixes) > 1 else ""
    readers = {".jsonl": _rows_jsonl, ".ndjson": _rows_jsonl, ".json": _rows_json, ".parquet": _rows_parquet,
               ".csv": _rows_csv, ".tsv": _rows_csv}
    if last not in readers:
        raise RecordError(
            f"{path}: unsupported file type {last or '(none)'}; use .jsonl, .json, .parquet, .csv, .tsv, a folder "
            "of .txt files, or a datasets save_to_disk folder"
        )
    return readers[last](path)


# ================================================================================================ public API


def read_records(path: str | os.PathLike, *, skip_bad_rows: bool = False, limit: int | None = None) -> Records:
    """Read and normalise every record of `path`; ids are unique within the file.

    A malformed row raises RecordError naming the file and line (or is skipped and counted when
    `skip_bad_rows`). A file with no usable record raises RecordError.
    """
    path = Path(path)
    if not path.exists():
        raise RecordError(f"{path}: no such file or folder")
    out = Records(source=str(path))
    seen: dict[str, str] = {}
    for where, raw in _row_source(path):
        try:
            if isinstance(raw, _Bad):
                raise ValueError(raw.reason)
            rec = normalise_record(raw)
            explicit = "id" in rec
            rid = rec["id"] if explicit else content_id(rec)
            if rid in seen:
                if explicit:
                    raise ValueError(f"duplicate id {rid!r} (first seen at {seen[rid]})")
                n = 2
                while f"{rid}-{n}" in seen:
                    n += 1
                rid = f"{rid}-{n}"
            seen[rid] = where
            out.append({"id": rid, **{k: v for k, v in rec.items() if k != "id"}})
        except ValueError as e:
            if not skip_bad_rows:
                raise RecordError(f"{path}: {where}: {e}") from None
            out.skipped += 1
            out.skipped_reasons.append(f"{where}: {e}")
        if limit is not None and len(out) >= limit:
            break
    if not out:
        detail = f" ({out.skipped} malformed rows skipped; first: {out.skipped_reasons[0]})" if out.skipped else ""
        raise RecordError(f"{path}: no usable records{detail}")
    return out


def record_text(rec: dict, fields: str = "instruction+response") -> str:
    """Plain text of a record for encoding: the text, or instruction (+ response), joined by a blank line."""
    if "text" in rec:
        return rec["text"]
    if fields == "instruction":
        return rec["instruction"]
    return f"{rec['instruction']}\n\n{rec['response']}" if rec.get("response") else rec["instruction"]


# ================================================================================================ prompt formatting

ALPACA_PROMPT = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a prompt: the tokenizer's special tokens (BOS) are added unless the text already starts with
    the BOS token, as a chat template that renders BOS does. The one rule for every stage that tokenizes a prompt,
    so training, scoring and generation see the same ids."""
    bos = tokenizer.bos_token
    return tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]


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
        if full.startswith(prompt) and rec["response"] in full[len(prompt):]:
            return prompt, full[len(prompt):]
    return prompt, rec["response"] + eos
