"""The causal-LM objective on a model whose input embedding is tied to the LM head."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from deltatune.train.objective import CausalLMObjective
from tests.helpers import tiny_llama_config


def _model(tied: bool):
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=tied)).float()


def _batch(vocab: int):
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :4] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def test_tied_embedding_gradient_is_dense_and_equals_plain_autograd():
    model = _model(tied=True)
    embed = model.get_input_embeddings()
    assert embed.weight is model.get_output_embeddings().weight
    batch = _batch(model.config.vocab_size)
    objective = CausalLMObjective(model, chunk_size=5)
    assert objective.tied_embedding is embed
    loss_sum, n = objective(batch)
    (loss_sum / n).backward()
    got = embed.weight.grad
    # the lookup's gradient was sparse only inside the sum: what optimizers see is dense
    assert not got.is_sparse and got.shape == embed.weight.shape
    assert embed.sparse is False  # the model is left as it was

    reference = _model(tied=True)
    logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    F.cross_entropy(logits.flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100).backward()
    torch.testing.assert_close(got, reference.get_input_embeddings().weight.grad, rtol=1e-5, atol=1e-6)


def test_untied_or_frozen_embedding_is_not_touched():
    untied = _model(tied=False)
    assert CausalLMObjective(untied).tied_embedding is None
    frozen = _model(tied=True)
    frozen.get_input_embeddings().weight.requires_grad_(False)
    objective = CausalLMObjective(frozen)
    loss_sum, n = objective(_batch(frozen.config.vocab_size))
    (loss_sum / n).backward()
    assert frozen.get_input_embeddings().weight.grad is None
