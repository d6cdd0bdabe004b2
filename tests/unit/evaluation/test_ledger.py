"""The cost ledger: derived numbers and the file round trip."""
import pytest

from deltatune.evaluation.ledger import CostLedger, directory_bytes, estimate_training_flops, read_ledger, write_ledger
from deltatune.utils.errors import DeltaFileError


def test_flops_rule_and_derived_rates(tmp_path):
    assert estimate_training_flops(100, 100, 10) == 6 * 100 * 10  # full fine-tuning: Kaplan's 6·N·T
    assert estimate_training_flops(100, 0, 10) == 4 * 100 * 10
    ledger = CostLedger(trainable_params=10, total_params=100, stored_params=10, delta_bytes=80, train_seconds=2.0, steps=5,
                        tokens=400, examples=20, peak_rss_mb=300.0)
    write_ledger(tmp_path, ledger)
    data = read_ledger(tmp_path)
    assert data["tokens_per_second"] == 200.0 and data["examples_per_second"] == 10.0
    assert data["estimated_flops"] == 4 * 100 * 400 + 2 * 10 * 400 and data["delta_bytes"] == 80
    assert read_ledger(tmp_path / "nothing") is None
    (tmp_path / "cost.json").write_text("[1, 2]")
    with pytest.raises(DeltaFileError, match="cost.json: expected a JSON object"):
        read_ledger(tmp_path)


def test_directory_bytes_sums_files(tmp_path):
    (tmp_path / "a").write_bytes(b"x" * 10)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_bytes(b"y" * 5)
    assert directory_bytes(tmp_path) == 15
