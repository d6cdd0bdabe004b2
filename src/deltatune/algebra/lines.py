"""LiNeS: layer-increasing network scaling of a task vector (Wang et al., 2024).

After fine-tuning or merging, the task vector of transformer layer l (0-based, L layers) is scaled by::

    λ(l) = α + β · l / (L − 1)

so shallow layers (general features) stay close to the base and deep layers keep the task update,
which reduces forgetting. Tensors outside the layer stack: token/position embeddings count as the
shallowest (λ = α), everything after the stack (final norm, output head) as the deepest (α + β).
"""
from __future__ import annotations

import re

LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")
EMBEDDING = re.compile(r"(?:embed|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings)")


def num_layers(model_config: dict, tensor_names: list[str]) -> int:
    """L from the model config (``num_hidden_layers`` / ``n_layer``), else the largest layer index + 1."""
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(model_config.get(key), int):
            return model_config[key]
    found = [int(m.group(1)) for n in tensor_names if (m := LAYER_INDEX.search(n))]
    return max(found) + 1 if found else 1


def lines_factor(name: str, layers: int, alpha: float, beta: float) -> float:
    """λ for tensor ``name`` (see the module docstring)."""
    m = LAYER_INDEX.search(name)
    if m is not None:
        return alpha + beta * int(m.group(1)) / max(layers - 1, 1)
    if EMBEDDING.search(name):
        return alpha
    return alpha + beta
