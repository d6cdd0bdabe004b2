"""The KV-cache argument under both of its names: ``past_key_values`` (transformers < 5.25) and
``cache`` (5.25 on). The locked transformers has one of them; the other is built here as a shim."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM
from transformers.modeling_outputs import BaseModelOutputWithPast

import deltatune
from deltatune.utils.hf_cache import cache_arg_name, get_cache, output_cache, pop_cache
from tests.helpers import randomize_delta, tiny_llama_config


class NewName(nn.Module):
    def forward(self, input_ids=None, cache=None, use_cache=None):
        return input_ids


class OldName(nn.Module):
    def forward(self, input_ids=None, past_key_values=None, use_cache=None):
        return input_ids


class Facade(nn.Module):  # forwards **kwargs to base_model, as DeltaModel does
    def __init__(self, inner):
        super().__init__()
        self.base_model = inner

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)


def test_the_callee_says_which_name_it_takes():
    assert cache_arg_name(NewName()) == "cache"
    assert cache_arg_name(OldName()) == "past_key_values"
    assert cache_arg_name(Facade(OldName())) == "past_key_values"
    assert cache_arg_name(nn.Linear(2, 2)) is None


def test_a_call_may_use_either_name_but_not_both():
    marker = object()
    for name in ("cache", "past_key_values"):
        kw = {name: marker, "use_cache": True}
        assert get_cache(kw) is marker and pop_cache(kw) is marker and kw == {"use_cache": True}
    assert pop_cache({"cache": None}) is None
    with pytest.raises(TypeError, match="both"):
        pop_cache({"cache": marker, "past_key_values": object()})


def test_output_cache_reads_either_field():
    marker = object()
    fields = set(BaseModelOutputWithPast.__dataclass_fields__)
    new_field = "cache" if "cache" in fields else "past_key_values"
    assert output_cache(BaseModelOutputWithPast(**{new_field: marker})) is marker

    class Old:
        past_key_values = marker

    assert output_cache(Old()) is marker


class OldNameBackbone(nn.Module):
    """A llama backbone whose forward names the cache ``past_key_values``, as before transformers 5.25."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.arg = cache_arg_name(inner)

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, inputs_embeds=None, use_cache=None, **kwargs):
        for name in ("cache", "past_key_values"):
            assert name not in kwargs, f"the backbone got {name!r} besides its own argument"
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, inputs_embeds=inputs_embeds,
                          use_cache=use_cache, **{self.arg: past_key_values}, **kwargs)


@pytest.mark.parametrize("method", ["prefix_tuning", "prompt_tuning"])
def test_virtual_tokens_give_the_same_logits_and_generation_under_both_names(method):
    torch.manual_seed(0)
    plain = LlamaForCausalLM(tiny_llama_config()).eval()
    shimmed = LlamaForCausalLM(tiny_llama_config()).eval()
    shimmed.load_state_dict(plain.state_dict())
    shimmed.model = OldNameBackbone(shimmed.model)
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    out = []
    for model in (plain, shimmed):
        dm = deltatune.attach(model, {"method": method, "num_virtual_tokens": 3})
        randomize_delta(dm, std=0.5, seed=2)
        with torch.no_grad():
            logits = dm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        generated = dm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
        out.append((logits, generated))
    assert (out[0][0] - out[1][0]).abs().max() < 1e-5
    assert torch.equal(out[0][1], out[1][1])
