from __future__ import annotations

import csv
import gzip
import json

import pytest

from finescope.data import RecordError, content_id, format_example, format_prompt, read_records, record_text

ROWS = [
    {"instruction": "Add 2 and 3.", "response": "5", "domain": "math"},
    {"instruction": "Summarise the ruling.", "input": "The court held the contract void.", "output": "Void."},
    {"prompt": "Capital of France?", "completion": "Paris"},
    {"question": "What is 12*7?", "answer": "84"},
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "draft"},
            {"role": "user", "content": "again"},
            {"role": "assistant", "content": "Hello!"},
        ]
    },
    {"text": "Plain text about shares and earnings.", "id": 42},
]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _check_normalised(records):
    assert len(records) == 6
    r = records
    assert r[0]["instruction"] == "Add 2 and 3." and r[0]["response"] == "5" and r[0]["domain"] == "math"
    assert r[1]["instruction"] == "Summarise the ruling.\n\nThe court held the contract void."
    assert r[1]["response"] == "Void."
    assert (r[2]["instruction"], r[2]["response"]) == ("Capital of France?", "Paris")
    assert (r[3]["instruction"], r[3]["response"]) == ("What is 12*7?", "84")
    assert (r[4]["instruction"], r[4]["response"], r[4]["system"]) == ("Hi", "Hello!", "Be brief.")
    assert r[5]["text"].startswith("Plain text") and r[5]["id"] == "42" and "instruction" not in r[5]
    assert len({x["id"] for x in records}) == 6


def test_jsonl_all_aliases(tmp_path):
    _check_normalised(read_records(_write_jsonl(tmp_path / "a.jsonl", ROWS)))


def test_jsonl_gz(tmp_path):
    path = tmp_path / "a.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in ROWS)
    _check_normalised(read_records(path))


def test_json_list_and_wrapped_list(tmp_path):
    (tmp_path / "l.json").write_text(json.dumps(ROWS))
    _check_normalised(read_records(tmp_path / "l.json"))
    (tmp_path / "w.json").write_text(json.dumps({"version": 1, "data": ROWS}))
    _check_normalised(read_records(tmp_path / "w.json"))
    (tmp_path / "bad.json").write_text(json.dumps({"a": [1], "b": [2]}))
    with pytest.raises(RecordError, match="bad.json: expected a JSON list"):
        read_records(tmp_path / "bad.json")


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"question": f"q{i}", "answer": f"a{i}", "id": f"r{i}"} for i in range(5)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    recs = read_records(tmp_path / "a.parquet")
    assert [r["id"] for r in recs] == [f"r{i}" for i in range(5)]
    assert recs[4] == {"id": "r4", "instruction": "q4", "response": "a4"}


@pytest.mark.parametrize("ext,delim", [(".csv", ","), (".tsv", "\t")])
def test_csv_and_tsv(tmp_path, ext, delim):
    path = tmp_path / f"a{ext}"
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter=delim)
        w.writerow(["instruction", "output", "topic"])
        w.writerow(["Say hi,\nplease", "hi", "greet"])
        w.writerow(["Count to 3", "1 2 3", "math"])
    recs = read_records(path)
    assert recs[0]["instruction"] == "Say hi,\nplease" and recs[0]["topic"] == "greet"
    assert recs[1]["response"] == "1 2 3"


def test_csv_bad_row_names_line(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("instruction,output\nok,fine\n,empty instruction\n")
    with pytest.raises(RecordError, match=r"a\.csv: line 3: field 'instruction' is empty"):
        read_records(path)


def test_txt_folder_recursive(tmp_path):
    (tmp_path / "news" / "tech").mkdir(parents=True)
    (tmp_path / "news" / "tech" / "001.txt").write_text("Chips are fast.")
    (tmp_path / "news" / "002.txt").write_bytes("Caf\xe9 prices".encode("latin-1"))
    (tmp_path / "news" / "ignore.md").write_text("not text data")
    recs = read_records(tmp_path / "news")
    assert [r["id"] for r in recs] == ["002.txt", "tech/001.txt"]
    assert recs[0]["text"] == "Café prices" and recs[1]["source_file"] == "tech/001.txt"


def test_hf_saved_dataset_and_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(7)])
    ds.save_to_disk(tmp_path / "ds")
    recs = read_records(tmp_path / "ds")
    assert [r["instruction"] for r in recs] == [f"p{i}" for i in range(7)]
    datasets.DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(tmp_path / "dd")
    with pytest.raises(RecordError, match=r"DatasetDict with splits .*train.*pass one split's folder"):
        read_records(tmp_path / "dd")
    assert len(read_records(tmp_path / "dd" / "test")) == 2


def test_ids_are_stable_and_unique(tmp_path):
    rows = [{"text": "same"}, {"text": "same"}, {"text": "other"}]
    a = read_records(_write_jsonl(tmp_path / "a.jsonl", rows))
    b = read_records(_write_jsonl(tmp_path / "b.jsonl", rows))
    assert [r["id"] for r in a] == [r["id"] for r in b]
    assert a[0]["id"] == content_id({"text": "same"}) and a[1]["id"] == a[0]["id"] + "-2"
    assert len({r["id"] for r in a}) == 3


def test_duplicate_explicit_ids(tmp_path):
    path = _write_jsonl(tmp_path / "a.jsonl", [{"id": 1, "text": "x"}, {"id": "1", "text": "y"}])
    with pytest.raises(RecordError, match=r"line 2: duplicate id '1' \(first seen at line 1\)"):
        read_records(path)
    assert len(read_records(path, skip_bad_rows=True)) == 1


def test_bad_rows_error_or_skip(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(
        '{"text": "good"}\n'
        "\n"
        '{"text": broken\n'
        '["not", "an", "object"]\n'
        '{"instruction": "no partner"}\n'
        '{"text": ""}\n'
        '{"text": 3.5e}\n'
        '{"messages": [{"role": "assistant", "content": "x"}]}\n'
        '{"instruction": "ok", "response": 7}\n'
        '{"instruction": "ok", "response": ["list"]}\n'
        '{"foo": "bar"}\n'
    )
    with pytest.raises(RecordError, match=r"a\.jsonl: line 3: invalid JSON"):
        read_records(path)
    recs = read_records(path, skip_bad_rows=True)
    assert [r.get("text") or r["response"] for r in recs] == ["good", "7"]
    assert recs.skipped == 8
    reasons = "\n".join(recs.skipped_reasons)
    for expected in (
        "line 4: expected an object",
        "line 5: field 'instruction' needs a partner field ('output' or 'response')",
        "line 6: record has no text",
        "line 8: field 'messages' has no user turn",
        "line 10: field 'response' must be a string",
        "line 11: no usable fields",
    ):
        assert expected in reasons


def test_empty_and_missing_inputs(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(RecordError, match=r"e\.jsonl: no usable records"):
        read_records(tmp_path / "e.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"x": 1}\n')
    with pytest.raises(RecordError, match=r"no usable records \(1 malformed rows skipped; first: line 1"):
        read_records(tmp_path / "bad.jsonl", skip_bad_rows=True)
    with pytest.raises(RecordError, match="no such file"):
        read_records(tmp_path / "nope.jsonl")
    (tmp_path / "x.xml").write_text("<a/>")
    with pytest.raises(RecordError, match=r"unsupported file type \.xml"):
        read_records(tmp_path / "x.xml")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(RecordError, match="no usable records"):
        read_records(tmp_path / "empty_dir")


def test_limit(tmp_path):
    path = _write_jsonl(tmp_path / "a.jsonl", [{"text": f"t{i}"} for i in range(10)])
    assert len(read_records(path, limit=3)) == 3


def test_record_text():
    rec = {"id": "1", "instruction": "Q", "response": "A"}
    assert record_text(rec) == "Q\n\nA" and record_text(rec, "instruction") == "Q"
    assert record_text({"id": "2", "text": "T"}) == "T"


def test_prompt_formatting_with_and_without_chat_template(tiny_tokenizer, chat_tokenizer):
    plain = format_prompt(tiny_tokenizer, "Add 2 and 3.")
    assert plain.endswith("### Instruction:\nAdd 2 and 3.\n\n### Response:\n")
    chat = format_prompt(chat_tokenizer, "Add 2 and 3.", system="Be brief.")
    assert chat == "<|system|>\nBe brief.</s>\n<|user|>\nAdd 2 and 3.</s>\n<|assistant|>\n"
    rec = {"id": "1", "instruction": "Add 2 and 3.", "response": "5"}
    prompt, completion = format_example(chat_tokenizer, rec)
    assert prompt.endswith("<|assistant|>\n") and completion == "5</s>\n"
    prompt, completion = format_example(tiny_tokenizer, rec)
    assert prompt == plain and completion == "5</s>"
    assert format_example(tiny_tokenizer, {"id": "t", "text": "hello"}) == ("", "hello")
