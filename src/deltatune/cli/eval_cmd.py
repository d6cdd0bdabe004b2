"""``deltatune eval`` (placeholder until the trainer lands)."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="train a delta from a recipe")
    p.add_argument("recipe", nargs="?")
    p.set_defaults(run=run)


def run(args) -> int:
    from deltatune.utils.errors import DeltatuneError

    raise DeltatuneError("eval is not available yet")
