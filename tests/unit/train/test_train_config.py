import pytest

from deltatune.train.config import apply_overrides, load_recipe
from deltatune.utils.errors import ConfigError

RECIPE = """\
model:
  name: some-model
delta:
  method: lora
  r: 4
data:
  path: data.jsonl
optim:
  lrr: 0.001
"""


def write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_unknown_key_names_file_line_and_closest(tmp_path):
    path = write(tmp_path, RECIPE)
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}:9: unknown key 'optim.lrr' (did you mean 'lr'?)")


def test_wrong_type_names_key_and_type(tmp_path):
    path = write(tmp_path, RECIPE.replace("lrr: 0.001", "lr: fast"))
    with pytest.raises(ConfigError, match=r"recipe.yaml:9: key 'optim.lr': Input should be a valid number.*got 'fast'"):
        load_recipe(path)


def test_delta_section_validated_by_method(tmp_path):
    path = write(tmp_path, RECIPE.replace("lrr: 0.001", "lr: 0.001").replace("r: 4", "rank: 4"))
    with pytest.raises(ConfigError, match=r"recipe.yaml:3: .*unknown key 'delta.rank' \(did you mean 'rank_pattern'\?\); valid keys: .*\br\b"):
        load_recipe(path)


def test_overrides_and_yaml_errors(tmp_path):
    path = write(tmp_path, RECIPE.replace("lrr: 0.001", "lr: 0.001"))
    recipe = load_recipe(path, ["optim.lr=1e-4", "delta.r=8", "data.path=my.jsonl", "train.bf16=true"])
    assert recipe.optim.lr == 1e-4 and recipe.delta_config().r == 8 and recipe.data.path == "my.jsonl" and recipe.train.bf16
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_recipe(path, ["optim.lr"])
    bad = write(tmp_path, "model:\n  name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"recipe.yaml:3: invalid YAML"):
        load_recipe(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")


def test_needs_data(tmp_path):
    with pytest.raises(ConfigError, match="no training data"):
        load_recipe(write(tmp_path, "model:\n  name: x\n"))


def test_apply_overrides_creates_sections():
    assert apply_overrides({}, ["a.b.c=3", "a.d=[1, 2]"]) == {"a": {"b": {"c": 3}, "d": [1, 2]}}
