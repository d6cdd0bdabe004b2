"""Delta algebra: merge, compose and compress deltas and fine-tuned models.

``ops`` (registered tensor ops) · ``stream`` (header-first, tensor-at-a-time reads) · ``task_vector``
(inputs as θ − θ_base) · ``recipe`` (the YAML schema) · ``merge`` (the engine) · ``lora_merge``
(LoRA → LoRA) · ``lines`` (LiNeS) · ``soup`` (greedy soup) · ``sparse`` (index + value deltas) ·
``compress`` (ComPEFT). Optimal-transport fusion (``ot_fusion``) and the greedy soup register model-level ops.
"""
from __future__ import annotations

from deltatune.algebra.ops import OpParams, list_ops, register_model_op, register_op
from deltatune.algebra.ot_fusion import merge_op as _ot_fusion_merge
from deltatune.algebra.soup import greedy_soup as _greedy_soup

register_model_op("ot_fusion", _ot_fusion_merge)
# Greedy soup ignores the input weights: it decides membership by the eval score.
register_model_op("greedy_soup", _greedy_soup, needs_eval=True, weighted=False)

__all__ = ["OpParams", "list_ops", "register_model_op", "register_op"]
