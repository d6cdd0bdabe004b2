"""Generated number tasks: formats, determinism, train/eval disjointness, errors, JSONL output."""
from __future__ import annotations

import json
import re

import pytest

from deltatune.tasks import DEFAULT_TASK, TASK_NAMES, make_number_task, number_to_words, write_jsonl
from deltatune.utils.errors import ConfigError, DataError


def test_default_task_is_addition():
    assert DEFAULT_TASK == "addition"
    assert set(TASK_NAMES) == {"addition", "comparison", "digit_count", "word_addition"}


@pytest.mark.parametrize(
    ("n", "words"),
    [
        (0, "zero"),
        (7, "seven"),
        (13, "thirteen"),
        (20, "twenty"),
        (41, "forty-one"),
        (100, "one hundred"),
        (312, "three hundred twelve"),
        (1001, "one thousand one"),
        (21045, "twenty-one thousand forty-five"),
        (3_000_017, "three million seventeen"),
        (2_000_000_000, "two billion"),
    ],
)
def test_number_to_words(n, words):
    assert number_to_words(n) == words


@pytest.mark.parametrize("bad", [-1, 10**12, 1.5, True])
def test_number_to_words_rejects_out_of_range(bad):
    with pytest.raises(ConfigError, match="number_to_words"):
        number_to_words(bad)


def test_addition_format():
    train, evals = make_number_task("addition", n_train=200, n_eval=50, seed=0, digits=3)
    for ex in train + evals:
        m = re.fullmatch(r"(\d{3})\+(\d{3})=", ex["prompt"])
        assert m, ex
        assert ex["response"] == str(int(m[1]) + int(m[2]))
        assert ex["task"] == "addition"


def test_comparison_format():
    train, _ = make_number_task("comparison", n_train=200, n_eval=0, seed=1, digits=3)
    for ex in train:
        m = re.fullmatch(r"Which is larger, (\d{3}) or (\d{3})\?", ex["prompt"])
        assert m and m[1] != m[2], ex
        assert ex["response"] == str(max(int(m[1]), int(m[2])))


def test_digit_count_format_covers_lengths_1_to_2d():
    train, _ = make_number_task("digit_count", n_train=300, n_eval=0, seed=2, digits=3)
    answers = set()
    for ex in train:
        m = re.fullmatch(r"How many digits in (\d+)\?", ex["prompt"])
        assert m, ex
        assert ex["response"] == str(len(m[1]))
        assert m[1] == str(int(m[1]))  # no leading zeros
        answers.add(ex["response"])
    assert answers == {"1", "2", "3", "4", "5", "6"}


def test_word_addition_format():
    from_words = {number_to_words(n): n for n in range(1000)}
    train, _ = make_number_task("word_addition", n_train=200, n_eval=0, seed=3, digits=3)
    for ex in train:
        left, right = ex["prompt"].removesuffix("=").split(" plus ")
        assert ex["prompt"].endswith("=")
        assert ex["response"] == str(from_words[left] + from_words[right])


def test_prompts_have_no_trailing_space_and_responses_no_leading_space():
    train, _ = make_number_task(list(TASK_NAMES), n_train=100, n_eval=0, seed=0)
    assert all(ex["prompt"] == ex["prompt"].rstrip() for ex in train)
    assert all(ex["response"] == ex["response"].strip() for ex in train)


def test_deterministic_for_a_seed_and_different_across_seeds():
    a = make_number_task("addition", 100, 20, seed=7)
    b = make_number_task("addition", 100, 20, seed=7)
    c = make_number_task("addition", 100, 20, seed=8)
    assert a == b
    assert a != c


def test_train_and_eval_are_disjoint_and_unique():
    train, evals = make_number_task(list(TASK_NAMES), n_train=2000, n_eval=400, seed=0, digits=2)
    assert len(train) == 2000 and len(evals) == 400
    train_prompts = {ex["prompt"] for ex in train}
    eval_prompts = {ex["prompt"] for ex in evals}
    assert len(train_prompts) == 2000 and len(eval_prompts) == 400
    assert not train_prompts & eval_prompts


def test_eval_set_does_not_depend_on_n_train():
    _, eval_small = make_number_task("addition", n_train=10, n_eval=30, seed=4)
    _, eval_large = make_number_task("addition", n_train=1000, n_eval=30, seed=4)
    assert eval_small == eval_large


def test_mix_interleaves_tasks_evenly_and_accepts_comma_string():
    train, evals = make_number_task("addition, comparison", n_train=10, n_eval=4, seed=0)
    assert [ex["task"] for ex in evals] == ["addition", "comparison"] * 2
    assert [ex["task"] for ex in train] == ["addition", "comparison"] * 5
    assert (train, evals) == make_number_task(["addition", "comparison"], 10, 4, seed=0)


def test_unknown_task_lists_valid_names_and_closest():
    with pytest.raises(ConfigError) as err:
        make_number_task("additon", 10, 10, seed=0)
    message = str(err.value)
    assert "'additon'" in message and "did you mean 'addition'" in message
    for name in TASK_NAMES:
        assert name in message


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_train": -1}, "n_train"),
        ({"n_eval": 1.5}, "n_eval"),
        ({"digits": 0}, "digits"),
        ({"digits": 13}, "digits"),
        ({"task": []}, "no task name"),
    ],
)
def test_bad_arguments_raise_config_error(kwargs, match):
    args = {"task": "addition", "n_train": 10, "n_eval": 10, "seed": 0} | kwargs
    with pytest.raises(ConfigError, match=match):
        make_number_task(**args)


def test_more_examples_than_distinct_prompts_raises():
    # digits=1 addition has 10 * 10 = 100 distinct prompts; at most half may be drawn.
    make_number_task("addition", n_train=40, n_eval=10, seed=0, digits=1)
    with pytest.raises(ConfigError, match="100 distinct prompts"):
        make_number_task("addition", n_train=41, n_eval=10, seed=0, digits=1)


def test_write_jsonl_round_trips_atomically(tmp_path):
    train, _ = make_number_task("word_addition", n_train=5, n_eval=0, seed=0)
    path = tmp_path / "sub" / "train.jsonl"
    write_jsonl(train, path)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == train
    assert sorted(p.name for p in path.parent.iterdir()) == ["train.jsonl"]  # no temp file left


def test_write_jsonl_rejects_bad_record_and_keeps_old_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("old\n")
    with pytest.raises(DataError, match=r"example 1 field 'response'"):
        write_jsonl([{"prompt": "1+1=", "response": "2"}, {"prompt": "1+2=", "response": 3}], path)
    assert path.read_text() == "old\n"
