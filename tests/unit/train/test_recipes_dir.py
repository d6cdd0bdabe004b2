"""Every example recipe in recipes/ and the built-in default job validate, each with the loader
of the command it is for (the file name's prefix: merge_*, select_*, anything else is training)."""
from pathlib import Path

import pytest

from deltatune.cli.train_cmd import default_recipe
from deltatune.train.config import load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[3] / "recipes").rglob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(p.parents[1] if p.parent.name != "recipes" else p.parent)))
def test_example_recipe_validates(path):
    if path.name.startswith("merge_"):
        from deltatune.algebra.recipe import load_merge_recipe

        assert load_merge_recipe(path).inputs
    elif path.name.startswith("select_"):
        from deltatune.select.config import load_select_recipe

        assert load_select_recipe(path).strategy_config()
    else:
        assert load_recipe(path).train.max_steps > 0


def test_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"smollm2_lora_instruct.yaml", "minilm_lora_sst2.yaml", "smollm2_full_finetune.yaml"} <= names


def test_default_job():
    recipe = load_recipe(None, default=default_recipe())
    assert recipe.generate.task == "addition" and recipe.eval.metric == "exact_match" and recipe.eval.before_training
    assert recipe.delta_config().r == 16 and recipe.delta_config().targets == "all-linear"
