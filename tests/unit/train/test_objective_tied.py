"""The causal-LM objective on a model whose input embedding is tied to the LM head."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from deltatune.train.objective import CausalLMObjective
from tests.helpers import tiny_llama_config


def _model():
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True)).float()


def test_tied_embedding_gradient_equals_plain_autograd_and_reuses_the_head_buffer():
    model = _model()
    embed = model.get_input_embeddings()
    assert embed.weight is model.get_output_embeddings().weight
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :4] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    objective = CausalLMObjective(model, chunk_size=5)
    loss_sum, n = objective(batch)
    head_buffer = loss_sum.grad_fn.grads[1].data_ptr()  # dL/dW of the head, computed in forward
    (loss_sum / n).backward()
    got = embed.weight.grad
    # the lookup's gradient was added in place into the head's: one [V, H] buffer, not a third
    assert got.data_ptr() == head_buffer and not got.is_sparse

    reference = _model()
    logits = reference(input_ids=ids, attention_mask=batch["attention_mask"]).logits[:, :-1]
    F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100).backward()
    torch.testing.assert_close(got, reference.get_input_embeddings().weight.grad, rtol=1e-5, atol=1e-6)
