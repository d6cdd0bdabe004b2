"""Numeric answers as GSM8K scores them."""
import pytest

from deltatune.evaluation.answers import extract_number, numeric_accuracy


@pytest.mark.parametrize("text, number", [
    ("She has 3 apples.\n#### 18", "18"),
    ("#### 1,000", "1000"),
    ("#### -7.50", "-7.5"),
    ("The answer is $42.", "42"),
    ("first 3 then 4.0", "4"),
    ("no digits here", None),
    ("#### +12 and later 99", "12"),  # the marked final answer wins over later numbers
])
def test_extract_number(text, number):
    assert extract_number(text) == number


def test_numeric_accuracy_counts_equal_numbers_only():
    refs = ["Natalia sold 48 clips.\n#### 72", "#### 1,200", "#### 5"]
    preds = ["so the total is 72", "1200.0", "five"]
    assert numeric_accuracy(preds, refs) == pytest.approx(2 / 3)
    assert numeric_accuracy([], []) == 0.0
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        numeric_accuracy(["1", "2"], ["1"])


def test_gsm8k_references_from_shared_data_all_parse():
    import json

    from tests.helpers import SHARED_DATA

    root = SHARED_DATA / "gsm8k"
    files = sorted(root.glob("**/*.jsonl")) + sorted(root.glob("**/*.json"))
    if not files:
        pytest.skip(f"GSM8K not found under {root}")
    rows = [json.loads(line) for line in files[0].read_text().splitlines()[:200] if line.strip()]
    answers = [r["answer"] for r in rows if "answer" in r]
    assert answers and all(extract_number(a) is not None for a in answers)
    assert numeric_accuracy(answers, answers) == 1.0
