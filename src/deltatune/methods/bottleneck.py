"""Bottleneck adapters: Houlsby-style sequential and He et al.'s parallel placement.

A small MLP ``f(z) = W_up · act(W_down · z + b_down) + b_up`` (``W_down`` [size, d_in],
``W_up`` [d_out, size]) added around a target module::

    sequential:  y = h + s · f(h)      h = module(x); after the attention / FFN output (Houlsby)
    parallel:    y = h + s · f(x)      beside the module, from its input (He et al., 2022)

``W_up`` and ``b_up`` start at zero, so the model is unchanged at attach time. Targets may be
linear layers (llama ``o_proj``/``down_proj``, BERT ``output.dense``) or whole blocks (llama
``mlp``); a block's input/output sizes are those of its first and last linear layer. Adapters
are non-linear, so they do not merge into the weights.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from deltatune.core.config import DeltaConfig
from deltatune.core.method import Capabilities, DeltaBranch, DeltaMethod
from deltatune.core.registry import register
from deltatune.utils.errors import TargetError

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
SEQUENTIAL_TARGETS = {"llama": ["o_proj", "down_proj"], "bert": ["output.dense"]}
PARALLEL_TARGETS = {"llama": ["mlp"], "bert": ["output.dense"]}


class BottleneckConfig(DeltaConfig):
    """``size``: bottleneck width; ``placement``: sequential | parallel; ``scaling``: s;
    ``activation``: relu | gelu | silu | tanh. Default targets depend on placement and architecture."""

    method: Literal["bottleneck"] = "bottleneck"
    size: int = Field(64, gt=0)
    placement: Literal["sequential", "parallel"] = "sequential"
    scaling: float = 1.0
    activation: Literal["relu", "gelu", "silu", "tanh"] = "relu"


def block_features(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a linear layer, or of a block from its first and last linear layer."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise TargetError(f"bottleneck adapters need a linear layer or a block containing one, not {type(module).__name__}")
    return linears[0].in_features, linears[-1].out_features


class BottleneckBranch(DeltaBranch):
    def __init__(self, d_in: int, d_out: int, config: BottleneckConfig, dtype: torch.dtype):
        super().__init__()
        self.parallel = config.placement == "parallel"
        self.adapter_down = nn.Linear(d_in if self.parallel else d_out, config.size, dtype=dtype)
        self.adapter_up = nn.Linear(config.size, d_out, dtype=dtype)
        self.act = ACTIVATIONS[config.activation]()
        self.scaling = config.scaling
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)

    def forward(self, x: torch.Tensor, base_out):
        # Blocks such as attention return tuples; the adapter acts on the hidden states (first item).
        h = base_out[0] if isinstance(base_out, tuple) else base_out
        z = x if self.parallel else h
        # The dtype from the bias: nn.Linear and Compacter's PHM layers both have one.
        y = h + self.scaling * self.adapter_up(self.act(self.adapter_down(z.to(self.adapter_down.bias.dtype)))).to(h.dtype)
        return (y, *base_out[1:]) if isinstance(base_out, tuple) else y


@register
class BottleneckMethod(DeltaMethod):
    name = "bottleneck"
    config_class = BottleneckConfig
    capabilities = Capabilities(mergeable=False)
    target_kind = "nn.Linear or blocks containing one"
    branch_keys = ("adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias")

    def can_wrap(self, module: nn.Module) -> bool:
        return any(isinstance(m, nn.Linear) for m in module.modules())

    def resolve_config(self, model: nn.Module, config: BottleneckConfig) -> BottleneckConfig:
        if config.targets is not None:
            return config
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        table = PARALLEL_TARGETS if config.placement == "parallel" else SEQUENTIAL_TARGETS
        if model_type not in table:
            raise TargetError(f"bottleneck: no default targets for model type {model_type!r}; set targets (e.g. the FFN output layer)")
        return config.model_copy(update={"targets": table[model_type]})

    def make_branch(self, module_name: str, module: nn.Module, config: BottleneckConfig) -> BottleneckBranch:
        d_in, d_out = block_features(module)
        dtype = next(module.parameters()).dtype
        return BottleneckBranch(d_in, d_out, config, dtype)
