"""Text generation for the CLI and the Python API: greedy or sampled, plain or chat, streamed."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from deltatune.utils.errors import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    """``temperature == 0`` means greedy decoding; otherwise sample with top-p / top-k."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1 (got {self.max_new_tokens})")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0 (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1] (got {self.top_p})")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (got {self.top_k})")


def render_prompt(tokenizer, prompt: str, chat: bool) -> str:
    """The text the model sees: the raw prompt, or the tokenizer's chat template applied to it."""
    if not chat:
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("--chat needs a tokenizer with a chat template; this model's tokenizer has none")
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)


@torch.no_grad()
def generate_text(model, tokenizer, prompt: str, sampling: SamplingParams = SamplingParams(), chat: bool = False, stream: bool = False) -> str:
    """Generate a continuation of ``prompt``; with ``stream`` the new text is printed as it comes."""
    from transformers import TextStreamer

    text = render_prompt(tokenizer, prompt, chat)
    # A chat template already contains the BOS/role tokens; don't add special tokens twice.
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=not chat)
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    kwargs = dict(max_new_tokens=sampling.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    if sampling.temperature > 0:
        torch.manual_seed(sampling.seed)
        kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or None)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if stream:
        kwargs["streamer"] = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    model.eval()
    out = model.generate(**enc, **kwargs)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
