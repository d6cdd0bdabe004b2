"""LISA (Pan et al., 2024): layerwise importance sampling for full fine-tuning.

Embeddings, the LM head and every parameter outside the repeated blocks are always trained.
Of the N repeated blocks (``model.layers``, ``encoder.layer`` …) only γ sampled uniformly are
trainable at a time; every K steps a new set is drawn. Frozen blocks get ``requires_grad=False``
(backward computes no weight gradient for them) and their AdamW state is dropped, so optimizer
state exists only for the active blocks: memory ~ (embeddings + head + γ blocks) instead of N.
"""
from __future__ import annotations

import torch
from torch import nn

from deltatune.optim import register_optimizer
from deltatune.utils.errors import ConfigError


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's repeated blocks: the longest ``nn.ModuleList`` (decoder layers, encoder layers)."""
    best = ("", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and (best[1] is None or len(module) > len(best[1])):
            best = (name, module)
    if best[1] is None or len(best[1]) == 0:
        raise ConfigError(f"optim.name lisa: {type(model).__name__} has no list of layers (nn.ModuleList) to sample from")
    return best


class Lisa(torch.optim.AdamW):
    """AdamW over the always-trained parameters plus γ of the layers, re-drawn every ``interval`` steps."""

    def __init__(self, params, model: nn.Module, n_active: int, interval: int, seed: int = 0, **adamw):
        params = list(params)
        super().__init__(_groups(params), **adamw)
        self.layers_name, layers = find_layers(model)
        if n_active > len(layers):
            raise ConfigError(f"optim.lisa.layers = {n_active} is more than the {len(layers)} layers of {type(model).__name__} "
                              f"({self.layers_name}); use at most {len(layers)}")
        trainable = {id(p) for p in params}
        # Only parameters this run trains at all take part (a delta's branches inside a layer, or every weight).
        self.layer_params = [[p for p in layer.parameters() if id(p) in trainable] for layer in layers]
        self.n_active, self.interval = n_active, interval
        self.generator = torch.Generator().manual_seed(seed)
        self.steps = 0
        self.active_layers: list[int] = []
        self.resample()

    def resample(self) -> None:
        self.active_layers = sorted(torch.randperm(len(self.layer_params), generator=self.generator)[: self.n_active].tolist())
        for i, params in enumerate(self.layer_params):
            on = i in self.active_layers
            for p in params:
                p.requires_grad_(on)
                if not on:
                    p.grad = None
                    self.state.pop(p, None)  # a frozen layer keeps no optimizer state

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        self.steps += 1
        if self.steps % self.interval == 0:
            self.resample()
        return loss

    def state_dict(self):
        state = super().state_dict()
        state["lisa"] = {"steps": self.steps, "active_layers": list(self.active_layers), "generator": self.generator.get_state()}
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        lisa = state_dict.pop("lisa", None)
        if lisa is not None:
            self.steps = lisa["steps"]
            self.generator.set_state(lisa["generator"])
            self.active_layers = list(lisa["active_layers"])
            for i, params in enumerate(self.layer_params):
                for p in params:
                    p.requires_grad_(i in self.active_layers)
        super().load_state_dict(state_dict)


def _groups(params):
    groups = [{"params": [p for p in params if p.ndim >= 2]}, {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


@register_optimizer("lisa")
def build_lisa(params, config, model, objective) -> Lisa:
    if model is None:
        raise ConfigError("optim.name lisa needs the model (to find its layers)")
    kwargs = dict(lr=config.lr, betas=tuple(config.betas), eps=config.eps, weight_decay=config.weight_decay)
    # Fused AdamW updates each tensor without full-size temporaries: with the always-trained
    # embedding (28 M entries in SmolLM2) the per-tensor path's two temporaries cost 226 MB.
    try:
        return Lisa(params, model, config.lisa.layers, config.lisa.interval, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError) as error:
        if isinstance(error, ConfigError):
            raise
        return Lisa(params, model, config.lisa.layers, config.lisa.interval, **kwargs)
