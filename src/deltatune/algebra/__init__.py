"""Delta algebra: merge, compose and compress deltas and fine-tuned models.

``ops`` (registered tensor ops) · ``stream`` (header-first, tensor-at-a-time reads) · ``task_vector``
(inputs as θ − θ_base) · ``recipe`` (the YAML schema) · ``merge`` (the engine) · ``lora_merge``
(LoRA → LoRA) · ``lines`` (LiNeS) · ``soup`` (greedy soup) · ``sparse`` (index + value deltas) ·
``compress`` (ComPEFT). Optimal-transport fusion lives in ``ot_fusion`` and registers a model-level op.
"""
from __future__ import annotations

from deltatune.algebra.ops import OpParams, list_ops, register_model_op, register_op

__all__ = ["OpParams", "list_ops", "register_model_op", "register_op"]
