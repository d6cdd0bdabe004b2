"""deltatune: every adaptation is a delta on a frozen base model.

Stable public API::

    base = deltatune.load_model("smollm2-135m-instruct")
    model = deltatune.attach(base, LoraConfig(r=16, alpha=32, targets="all-linear"))
    model.save_delta("out/adapter"); deltatune.load_delta(base, "out/adapter")
    model.merge(); model.unmerge()
    deltatune.list_methods()
"""
from __future__ import annotations

__version__ = "0.1.0"

from deltatune.api import attach, load_delta, load_model, load_tokenizer, save_delta  # noqa: E402
from deltatune.core.config import DeltaConfig  # noqa: E402
from deltatune.core.delta_model import DeltaModel  # noqa: E402
from deltatune.core.registry import get_method, list_methods  # noqa: E402
from deltatune.graft import graft, graft_report  # noqa: E402
from deltatune.methods.lora import LoraConfig  # noqa: E402
from deltatune.utils.errors import DeltatuneError  # noqa: E402
import deltatune.algebra.compress  # noqa: E402,F401  (registers the "compeft" method: compressed deltas load like any other)

__all__ = [
    "DeltaConfig", "DeltaModel", "DeltatuneError", "LoraConfig", "attach", "get_method", "graft", "graft_report",
    "list_methods", "load_delta", "load_model", "load_tokenizer", "save_delta",
]
