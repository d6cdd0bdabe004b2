"""Training on the real shipped models and the real data sets in ../shared/data."""
from pathlib import Path

import pytest

from deltatune.cli.train_cmd import default_recipe
from deltatune.train.config import load_recipe
from deltatune.train.loop import train
from tests.helpers import SHARED_DATA

ALPACA = SHARED_DATA / "alpaca_en_demo" / "alpaca_en_demo.json"

pytestmark = pytest.mark.slow


@pytest.mark.skipif(not ALPACA.exists(), reason="../shared/data/alpaca_en_demo is not present")
def test_lora_instruction_tuning_lowers_held_out_loss(tmp_path):
    recipe = load_recipe(Path(__file__).resolve().parents[2] / "recipes" / "smollm2_lora_instruct.yaml", [
        f"data.path={ALPACA}", "data.max_examples=200", "data.eval_fraction=0.1", "data.max_length=160", "data.on_error=skip",
        "train.max_steps=12", "train.batch_size=4", "train.grad_accum=1", "train.eval_every=null", "train.save_every=null",
        "train.progress=false", "optim.lr=1e-3", "schedule.warmup_ratio=0.0", "eval.before_training=true", "eval.max_batches=4",
        f"output.dir={tmp_path}",
    ])
    result = train(recipe)
    before, after = result["before"]["loss"], result["after"]["loss"]
    assert after < before - 0.05, (before, after)
    assert (tmp_path / "smollm2-alpaca" / "adapter" / "adapter_model.safetensors").is_file()


def test_default_job_short_run_learns(tmp_path):
    """The built-in job, cut to 40 steps: the held-out loss drops by a lot (the full job is `make demo`)."""
    recipe = load_recipe(None, ["train.max_steps=40", "generate.n_eval=24", "train.progress=false",
                                "train.save_every=null", f"output.dir={tmp_path}"], default=default_recipe())
    result = train(recipe)
    assert result["before"]["exact_match"] == 0.0
    assert result["after"]["loss"] < 0.5 * result["before"]["loss"]
    assert (tmp_path / "default" / "loss.png").is_file()
