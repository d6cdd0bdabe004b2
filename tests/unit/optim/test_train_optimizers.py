"""Every memory-efficient optimizer lowers the loss in a short train() run of a tiny llama (full
fine-tuning, ``delta: null``); settings that cannot fit the model fail before the first step."""
import json
import textwrap

import pytest

from deltatune.train.config import load_recipe
from deltatune.train.loop import train
from deltatune.utils.errors import ConfigError
from tests.helpers import save_tiny_lm


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return save_tiny_lm(tmp_path_factory.mktemp("tiny") / "lm")


def recipe(lm_dir, tmp_path, name, optim: dict, steps=16, **train_over):
    text = textwrap.dedent(f"""\
        model:
          name: {lm_dir}
        delta: null
        generate:
          task: addition
          n_train: 64
          n_eval: 16
          digits: 2
        data:
          template: plain
        train:
          max_steps: {steps}
          batch_size: 8
          log_every: 1
          progress: false
        eval:
          metric: loss
          before_training: true
        schedule:
          name: constant
        output:
          dir: {tmp_path}
          name: {name}
        """)
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    over = [f"optim.{k}={v}" for k, v in optim.items()] + [f"train.{k}={v}" for k, v in train_over.items()]
    return load_recipe(path, over)


SETTINGS = {
    "adamw": {"lr": 0.01},
    "galore": {"lr": 0.01, "galore.rank": 4, "galore.update_gap": 5, "galore.scale": 1.0},
    "galore_layerwise": {"name": "galore", "lr": 0.01, "galore.rank": 4, "galore.update_gap": 5, "galore.scale": 1.0, "galore.layerwise": "true"},
    "lisa": {"lr": 0.01, "lisa.layers": 1, "lisa.interval": 4},
    "lomo": {"lr": 0.5, "max_grad_norm": 1.0},
    "adalomo": {"lr": 0.01},
    "mezo": {"lr": 0.003, "mezo.eps": 0.001},
    "sparse_mezo": {"lr": 0.003, "mezo.eps": 0.001, "mezo.density": 0.5},
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_every_optimizer_lowers_the_loss(name, lm_dir, tmp_path):
    result = train(recipe(lm_dir, tmp_path, name, {"name": name, **SETTINGS[name]}))
    before, after = result["before"]["loss"], result["after"]["loss"]
    print(f"{name}: eval loss {before:.4f} -> {after:.4f}")
    assert after < before - 0.05, (before, after)
    assert (tmp_path / name / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize("optim, over, message", [
    ({"name": "galore", "galore.rank": 64}, {}, r"optim.galore.rank = 64 is larger than the smaller dimension of model.layers.0.self_attn.q_proj.weight \[32, 32\]"),
    ({"name": "lisa", "lisa.layers": 3}, {}, r"optim.lisa.layers = 3 is more than the 2 layers"),
    ({"name": "lomo"}, {"grad_accum": 2}, r"train.grad_accum = 2: LOMO/AdaLomo"),
])
def test_settings_that_cannot_fit_fail_before_any_step(optim, over, message, lm_dir, tmp_path):
    with pytest.raises(ConfigError, match=message):
        train(recipe(lm_dir, tmp_path, "bad", optim, **over))
    metrics = tmp_path / "bad" / "metrics.jsonl"
    rows = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
    assert not [r for r in rows if "loss" in r]  # no training step was logged


def test_bad_optimizer_values_name_the_key(lm_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"optim.mezo.density"):
        recipe(lm_dir, tmp_path, "x", {"name": "sparse_mezo", "mezo.density": 1.5})
    with pytest.raises(ConfigError, match=r"optim.name"):
        recipe(lm_dir, tmp_path, "x", {"name": "sgdx"})
