"""Reading records: every kind of source, origins as file:line, and clear errors."""
from __future__ import annotations

import json

import pytest

from deltatune.data import read_records
from deltatune.utils.errors import DataError


def test_jsonl_origins_and_bad_line(tmp_path):
    f = tmp_path / "train.jsonl"
    f.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": oops}\n[1, 2]\n', encoding="utf-8")
    records = list(read_records(f))
    assert [r.origin for r in records] == [f"{f}:1", f"{f}:3", f"{f}:4", f"{f}:5"]
    assert [r.data for r in records[:2]] == [{"text": "a"}, {"text": "b"}]
    assert records[2].data is None
    assert records[2].error.startswith(f"{f}:4: invalid JSON (Expecting value at column 10)")
    assert records[2].error.endswith("expected one JSON object per line")
    assert "expected a JSON object per line, found list" in records[3].error


def test_json_list_gives_line_numbers(tmp_path):
    f = tmp_path / "data.json"
    items = [{"instruction": "a", "output": "b"}, {"instruction": "c\nd", "output": "e"}, 7]
    f.write_text(json.dumps(items, indent=2), encoding="utf-8")
    records = list(read_records(f))
    # json.dumps(indent=2): "[" on line 1, item 0 opens on line 2 and spans 4 lines.
    assert [r.origin for r in records] == [f"{f}:2", f"{f}:6", f"{f}:10"]
    assert records[1].data == {"instruction": "c\nd", "output": "e"}
    assert records[2].error == f"{f}:10: list item 2 is a int; expected a JSON object"


def test_json_syntax_error_names_line(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text('[\n {"a": 1},\n {"a": 2,,}\n]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.json:3: invalid JSON \(Expecting property name"):
        list(read_records(f))
    g = tmp_path / "obj.json"
    g.write_text('{"a": 1}', encoding="utf-8")
    with pytest.raises(DataError, match=r"obj\.json:1: expected a JSON list of objects, found a single object"):
        list(read_records(g))


def test_tsv_unquoted_with_header_and_bom(tmp_path):
    f = tmp_path / "dev.tsv"
    # A bare, unbalanced quote (as in GLUE's MRPC) must not swallow the following lines.
    f.write_text('\ufeffsentence\tlabel\n"it is fine\t1\nnot "bad" at all\t0\n', encoding="utf-8")
    records = list(read_records(f))
    assert [r.data for r in records] == [{"sentence": '"it is fine', "label": "1"}, {"sentence": 'not "bad" at all', "label": "0"}]
    assert [r.origin for r in records] == [f"{f}:2", f"{f}:3"]


def test_tsv_without_header(tmp_path):
    f = tmp_path / "cola.tsv"
    f.write_text("src1\t1\t\tgood sentence.\nsrc2\t0\t*\tbad sentence\nsrc3\t1\n", encoding="utf-8")
    named = list(read_records(f, header=False, column_names=["source", "label", "judgment", "text"]))
    assert named[0].data == {"source": "src1", "label": "1", "judgment": "", "text": "good sentence."}
    assert named[1].origin == f"{f}:2"
    assert named[2].error == f"{f}:3: expected 4 tab-separated fields (source, label, judgment, text), found 2"
    numbered = list(read_records(f, header=False))
    assert numbered[1].data == {"0": "src2", "1": "0", "2": "*", "3": "bad sentence"}


def test_csv_quoted_multiline_keeps_start_line(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text('text,label\n"one, two",a\n"multi\nline",b\nplain,c\n', encoding="utf-8")
    records = list(read_records(f))
    assert [r.data["text"] for r in records] == ["one, two", "multi\nline", "plain"]
    assert [r.origin for r in records] == [f"{f}:2", f"{f}:3", f"{f}:5"]


def test_txt_lines(tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text("first line\n\nsecond line\n", encoding="utf-8")
    assert [(r.data, r.origin) for r in read_records(f)] == [({"text": "first line"}, f"{f}:1"), ({"text": "second line"}, f"{f}:3")]


def test_missing_file_suggests_sibling(tmp_path):
    (tmp_path / "train.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match=r"trian\.jsonl: no such file or directory \(did you mean 'train\.jsonl'\?\)"):
        read_records(tmp_path / "trian.jsonl")
    with pytest.raises(DataError, match=r"unsupported file type '\.xml'"):
        (tmp_path / "a.xml").write_text("<a/>", encoding="utf-8")
        read_records(tmp_path / "a.xml")


def test_plain_directory_is_rejected(tmp_path):
    (tmp_path / "x.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match=r"not one written by datasets' save_to_disk .*found: x\.jsonl"):
        read_records(tmp_path)


def test_parquet_rows(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["x", "y", "z"], "label": [0, 1, 0]}), f)
    records = list(read_records(f))
    assert [r.data for r in records] == [{"text": "x", "label": 0}, {"text": "y", "label": 1}, {"text": "z", "label": 0}]
    assert records[2].origin == f"{f}:row 2"


def test_hf_save_to_disk_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"text": ["a", "b"]}), validation=datasets.Dataset.from_dict({"text": ["c"]})
    )
    dd.save_to_disk(str(tmp_path / "ds"))
    records = list(read_records(tmp_path / "ds", split="validation"))
    assert [(r.data, r.origin) for r in records] == [({"text": "c"}, f"{tmp_path / 'ds'}[validation]:row 0")]
    with pytest.raises(DataError, match=r"no split 'tran' \(did you mean 'train'\?\)"):
        read_records(tmp_path / "ds", split="tran")


@pytest.mark.parametrize("suffix", [".jsonl", ".tsv", ".json"])
def test_non_utf8_byte_is_reported_at_its_line(tmp_path, suffix):
    """A bad byte far into a file (past the readers' decode buffer) is reported at its own line."""
    f = tmp_path / f"data{suffix}"
    good = {".jsonl": b'{"text": "fine"}\n', ".tsv": b"fine\t1\n", ".json": b' {"text": "fine"},\n'}[suffix]
    head = b"[\n" if suffix == ".json" else (b"text\tlabel\n" if suffix == ".tsv" else b"")
    bad_line = good.replace(b"fine", b"caf\xe9")
    f.write_bytes(head + good * 3000 + bad_line + good * 10 + (b' {"text": "end"}\n]\n' if suffix == ".json" else b""))
    expected = head.count(b"\n") + 3001
    with pytest.raises(DataError, match=rf"data\{suffix}:{expected}: not valid UTF-8 \(byte 0xe9 at column"):
        list(read_records(f))
