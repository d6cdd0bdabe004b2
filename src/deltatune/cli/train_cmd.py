"""``deltatune train`` (placeholder until the trainer lands)."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a delta from a recipe")
    p.add_argument("recipe", nargs="?")
    p.set_defaults(run=run)


def run(args) -> int:
    from deltatune.utils.errors import DeltatuneError

    raise DeltatuneError("train is not available yet")
