"""Data selection: which examples of a pool to train on, and why.

    from deltatune.select import load_select_recipe, run_selection
    result = run_selection(load_select_recipe("select.yaml"))     # selected.jsonl + selected.report.json

Strategies (``list_strategies()``): ``got_d``, ``grape``, ``diversity``, ``quality``, ``dedup``.
Training-time options live beside them: :mod:`deltatune.select.token_select` (ssToken loss
mask) and :mod:`deltatune.select.augment` (EDA augmentation).
"""
from deltatune.select.config import SelectRecipe, load_select_recipe, validate_select_recipe
from deltatune.select.registry import Selection, get_strategy, list_strategies, register_strategy
from deltatune.select.run import SelectionResult, prepare, run_selection

__all__ = [
    "SelectRecipe",
    "Selection",
    "SelectionResult",
    "get_strategy",
    "list_strategies",
    "load_select_recipe",
    "prepare",
    "register_strategy",
    "run_selection",
    "validate_select_recipe",
]
