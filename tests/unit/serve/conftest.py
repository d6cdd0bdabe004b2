"""A tiny llama saved to disk with a few LoRA adapters of different ranks and targets."""
from __future__ import annotations

import pytest

from tests.helpers import randomize_delta, save_tiny_lm

ADAPTERS = {  # name → (rank, targets)
    "qv4": (4, ["q_proj", "v_proj"]),
    "all8": (8, "all-linear"),
    "down2": (2, ["down_proj"]),
}


@pytest.fixture(scope="package")
def served(tmp_path_factory):
    """``(base_dir, adapters_dir)``: adapters with large random weights so each visibly changes the output."""
    import deltatune

    root = tmp_path_factory.mktemp("served")
    save_tiny_lm(root / "base")
    for i, (name, (r, targets)) in enumerate(ADAPTERS.items()):
        model = deltatune.attach(deltatune.load_model(root / "base", task="causal-lm"), deltatune.LoraConfig(r=r, alpha=2 * r, targets=targets))
        randomize_delta(model, std=0.3, seed=i)
        model.save_delta(root / "adapters" / name)
    return root / "base", root / "adapters"
