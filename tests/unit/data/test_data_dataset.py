"""build_datasets end to end on small temp files, config validation, and one real shared file."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from deltatune.core.config import validate_config
from deltatune.data import DataConfig, build_datasets, make_collator
from deltatune.utils.errors import ConfigError, DataError
from tests.helpers import SHARED_DATA


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def instruction_rows(n):
    return [{"instruction": f"what is {i} plus {i}", "input": "", "output": f"it is {2 * i}"} for i in range(n)]


def test_auto_instruction_with_eval_fraction_is_seeded(tmp_path, bert_tokenizer):
    f = write_jsonl(tmp_path / "train.jsonl", instruction_rows(20))
    cfg = DataConfig(path=str(f), eval_fraction=0.25, max_length=64)
    train, evaluation, report = build_datasets(cfg, bert_tokenizer, seed=1)
    assert (report.format, report.template, report.records_read) == ("instruction", "alpaca", 20)
    assert (len(train), len(evaluation), report.train_examples, report.eval_examples) == (15, 5, 15, 5)
    again, eval_again, _ = build_datasets(cfg, bert_tokenizer, seed=1)
    assert again == train and eval_again == evaluation
    _, eval_other, _ = build_datasets(cfg, bert_tokenizer, seed=2)
    assert eval_other != evaluation
    train_ids = {tuple(e["input_ids"]) for e in train}
    assert not train_ids & {tuple(e["input_ids"]) for e in evaluation}
    assert report.trained_tokens == sum(sum(lab != -100 for lab in e["labels"]) for e in train)


def test_bad_records_raise_or_are_skipped(tmp_path, bert_tokenizer):
    rows = instruction_rows(5)
    rows[1] = '{"instruction": "x", "output": }'  # line 2: invalid JSON
    rows[3] = {"instruction": "x", "output": ""}  # line 4: empty response
    f = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError, match=rf"^{f}:2: invalid JSON \(Expecting value at column 32\); expected one JSON object per line$"):
        build_datasets(DataConfig(path=str(f)), bert_tokenizer)
    train, _, report = build_datasets(DataConfig(path=str(f), on_error="skip"), bert_tokenizer)
    assert (len(train), report.skipped) == (3, 2)
    assert report.errors[0].startswith(f"{f}:2: invalid JSON")
    assert report.errors[1] == f"{f}:4: field 'output' is empty; expected non-empty text"
    assert "skipped=2" in report.summary()


def test_classification_tsv_without_header(tmp_path, bert_tokenizer):
    f = tmp_path / "cola.tsv"
    f.write_text("s1\t1\t\tthe cat sat .\ns1\t0\t*\tcat the sat\ns2\t1\t\ta dog ran .\n", encoding="utf-8")
    eval_f = tmp_path / "dev.tsv"
    eval_f.write_text("s3\t0\t*\tran dog a\n", encoding="utf-8")
    cfg = DataConfig(path=str(f), eval_path=str(eval_f), header=False, columns={"text": "3", "label": "1"})
    train, evaluation, report = build_datasets(cfg, bert_tokenizer)
    assert (report.format, report.num_labels, report.label_names) == ("classification", 2, None)
    assert [e["label"] for e in train] == [1, 0, 1] and evaluation[0]["label"] == 0
    batch = make_collator(bert_tokenizer, packing=False)(train)
    assert batch["labels"].tolist() == [1, 0, 1]
    assert batch["input_ids"].shape[0] == 3 and "token_type_ids" in batch


def test_string_labels_use_sorted_order_over_train_and_eval(tmp_path, bert_tokenizer):
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": "sports"}, {"text": "b", "label": "business"}])
    e = write_jsonl(tmp_path / "e.jsonl", [{"text": "c", "label": "world"}])
    train, evaluation, report = build_datasets(DataConfig(path=str(f), eval_path=str(e)), bert_tokenizer)
    assert report.label_names == ["business", "sports", "world"]
    assert [x["label"] for x in train] == [1, 0] and evaluation[0]["label"] == 2


def test_packing_builds_rows(tmp_path, plain_tokenizer):
    f = write_jsonl(tmp_path / "lm.jsonl", [{"text": "the quick brown fox " * (1 + i % 3)} for i in range(12)])
    cfg = DataConfig(path=str(f), packing=True, max_length=32)
    rows, _, report = build_datasets(cfg, plain_tokenizer, seed=0)
    assert report.packed_rows == len(rows) < 12
    assert sum(sum(r["lengths"]) for r in rows) == report.train_tokens
    assert all(len(r["input_ids"]) <= 32 for r in rows)
    assert report.packing_efficiency == report.train_tokens / (len(rows) * 32)  # real tokens / row capacity
    batch = make_collator(plain_tokenizer, packing=True)(rows[:2])
    assert batch["attention_mask"].dim() == 4
    rows_again, _, _ = build_datasets(cfg, plain_tokenizer, seed=0)
    assert rows_again == rows


def test_max_examples_and_empty_errors(tmp_path, bert_tokenizer):
    f = write_jsonl(tmp_path / "t.jsonl", instruction_rows(10))
    train, _, _ = build_datasets(DataConfig(path=str(f), max_examples=4), bert_tokenizer)
    assert len(train) == 4
    with pytest.raises(ConfigError, match="data.path is not set"):
        build_datasets(DataConfig(), bert_tokenizer)
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(DataError, match=r"empty\.jsonl: no records found"):
        build_datasets(DataConfig(path=str(empty)), bert_tokenizer)


def test_config_validation():
    with pytest.raises(ConfigError, match=r"unknown key 'data.max_lenght' \(did you mean 'max_length'"):
        validate_config(DataConfig, {"path": "x.jsonl", "max_lenght": 10}, where="data")
    with pytest.raises(ConfigError, match="set either eval_fraction or eval_path/eval_split, not both"):
        validate_config(DataConfig, {"eval_fraction": 0.1, "eval_path": "e.jsonl"})
    with pytest.raises(ConfigError, match=r"key 'columns': .*unknown field 'outptu' \(did you mean 'output'"):
        validate_config(DataConfig, {"columns": {"outptu": "answer"}})
    with pytest.raises(ConfigError, match="packing applies to language-modelling formats"):
        validate_config(DataConfig, {"format": "classification", "packing": True})


@pytest.mark.skipif(not (SHARED_DATA / "alpaca_en_demo/alpaca_en_demo.json").exists(), reason="shared data not present")
def test_real_alpaca_file(bert_tokenizer):
    path = SHARED_DATA / "alpaca_en_demo/alpaca_en_demo.json"
    cfg = DataConfig(path=str(path), max_examples=50, max_length=256, eval_fraction=0.1)
    train, evaluation, report = build_datasets(cfg, bert_tokenizer, seed=0)
    assert (report.format, report.records_read, len(train), len(evaluation), report.skipped) == ("instruction", 50, 45, 5, 0)
    assert all(len(e["input_ids"]) <= 256 and e["labels"][0] == -100 for e in train)
    assert all(any(lab != -100 for lab in e["labels"]) for e in train)


@pytest.mark.skipif(not (SHARED_DATA / "sst2/validation.tsv").exists(), reason="shared data not present")
def test_real_sst2_tsv(bert_tokenizer):
    cfg = DataConfig(path=str(SHARED_DATA / "sst2/validation.tsv"), max_examples=200)
    train, _, report = build_datasets(cfg, bert_tokenizer)
    assert (report.format, report.num_labels, len(train)) == ("classification", 2, 200)
    assert {e["label"] for e in train} == {0, 1}
