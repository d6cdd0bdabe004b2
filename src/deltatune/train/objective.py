"""The training objective as a module: ``batch → (loss_sum, n_targets)``.

Wrapping the objective in an ``nn.Module`` lets DistributedDataParallel wrap it, while the
model itself stays a plain transformers model. Returning a *sum* and a *count* lets the loop
normalise by the number of target tokens (or examples) of the whole optimizer step — across
micro-batches and ranks — so gradient accumulation and data parallelism give the same update
as one big batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.core.inject import DeltaWrapper
from deltatune.train.loss import chunked_lm_loss

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "token_type_ids")


class CausalLMObjective(nn.Module):
    """Next-token cross-entropy on positions whose label is not -100.

    The LM head and the loss are computed in chunks over the target positions only, so the
    ``[batch, seq, vocab]`` logits never exist at once. A head that carries a delta itself is
    called as a module instead (its output needs the delta's forward).
    """

    def __init__(self, model: nn.Module, chunk_size: int = 256):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        hf = getattr(model, "base_model", model) if hasattr(model, "delta_configs") else model
        self.backbone = getattr(hf, hf.base_model_prefix)
        self.head = hf.get_output_embeddings()

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch and k != "token_type_ids"}
        labels = batch["labels"][:, 1:]
        if isinstance(self.head, DeltaWrapper) or not isinstance(self.head, nn.Linear):
            logits = self.model(**inputs).logits[:, :-1]
            loss_sum = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
            return loss_sum, (labels != -100).sum()
        # A tied embedding needs nothing special: the lookup's dense gradient is added in place
        # into the head's [V, H] gradient (a sparse one would not be, and costs a third buffer).
        hidden = self.backbone(**inputs).last_hidden_state[:, :-1]
        # The trainer backpropagates each loss once (LOMO's two passes compute it twice).
        return chunked_lm_loss(hidden, self.head.weight, labels, chunk_size=self.chunk_size, lm_head_bias=self.head.bias,
                               backward_once=True)


class ClassificationObjective(nn.Module):
    """Cross-entropy of the sequence-classification logits ``[batch, num_labels]``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        logits = self.model(**inputs).logits
        loss_sum = F.cross_entropy(logits.float(), batch["labels"], reduction="sum")
        return loss_sum, torch.tensor(batch["labels"].shape[0])


def predict_classes(model: nn.Module, batch: dict[str, torch.Tensor]) -> list[int]:
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    with torch.no_grad():
        return model(**inputs).logits.argmax(-1).tolist()
