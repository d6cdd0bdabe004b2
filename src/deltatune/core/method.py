"""The contract every delta method implements.

A *method* (LoRA, IA3, an adapter …) is registered once under a name. Given a model and a
config it says which modules to wrap and builds one :class:`DeltaBranch` per wrapped module.
A branch is the delta's contribution at that module, in He et al.'s unified view::

    h = base(x)                 # the frozen module's output
    h = branch(x, h)            # LoRA: h + s·B(A(x)); IA3: h ⊙ l; adapter: h + f(h) …

Capabilities are data on the method, so the core never asks "is this LoRA?".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from deltatune.core.config import DeltaConfig
from deltatune.utils.errors import CapabilityError, DeltatuneError


@dataclass(frozen=True)
class Capabilities:
    mergeable: bool = False         # merge()/unmerge() fold the delta into base weights exactly
    linear_delta: bool = False      # delta_weight() gives ΔW with W' = W + ΔW
    # Its branches give exact low_rank_factors(): the serving pool batches it across requests and
    # LoRA-aware merges (concat / SVD) keep it low-rank; tools that need factors refuse the others.
    low_rank_factors: bool = False
    unchanged_at_init: bool = True  # the model's outputs are identical right after attach


class DeltaBranch(nn.Module):
    """One named delta at one wrapped module. Parameters of a branch are its delta parameters.

    A branch acts on the module's output (``forward``) and, if ``transforms_input`` is set,
    also on its input before the base module runs (``transform_input``) — where a delta is
    inserted is data, not a subclass.
    """

    transforms_input: bool = False
    # A branch with ``wraps_call`` runs *around* the whole module call (``around_call``): it may
    # rewrite every argument and the result. Model-level deltas (prefix/prompt tuning) need this:
    # they change the sequence (extra key/value positions, extra input embeddings), not one tensor.
    wraps_call: bool = False

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def around_call(self, call, *args, **kwargs):
        """Run ``call(*args, **kwargs)`` (the module with the other branches), possibly changed."""
        return call(*args, **kwargs)

    def saved_state(self) -> dict[str, torch.Tensor]:
        """The tensors a delta file stores for this branch. Default: the branch's state dict; a
        branch with a training-only parametrisation (prefix tuning's MLP) returns the folded tensors."""
        return self.state_dict()

    def training_state(self) -> dict[str, Any]:
        """Everything besides the trainable parameters that training changes and an exact resume
        needs (tensors, numbers, bools or nested dicts of them); trainer checkpoints hold it.

        Default: every buffer, non-persistent ones included (sparse indices, rank masks, importance
        averages). A branch that keeps state in plain attributes (a step count, a phase) adds it."""
        return dict(self.named_buffers())

    @torch.no_grad()
    def load_training_state(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`training_state` (called before the checkpoint's parameters are loaded)."""
        for name, buffer in self.named_buffers():
            if name not in state:
                raise DeltatuneError(f"checkpoint training state of {type(self).__name__} has no {name!r}; resume with the recipe the run was started with")
            buffer.copy_(state[name])

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def regularization(self) -> torch.Tensor | None:
        """A penalty added to the training loss while this branch is active (LoFiT's L1 on head
        scales), or None. Summed over branches by ``DeltaModel.regularization_loss()``."""
        return None

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        """ΔW such that the merged weight is ``base.weight + ΔW`` (linear deltas only)."""
        raise NotImplementedError(f"{type(self).__name__} is not a linear delta")

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact factors ``(A [r, in], B_s [out, r])`` with ``B_s @ A == delta_weight(base)``.

        Tools that keep a delta low-rank (the serving pool, LoRA-aware merges) ask for these instead
        of reading a file's tensors, so a parametrisation they do not know (PiSSA's frozen offset, a
        rank mask) is still served exactly. A branch that has no such factors raises
        :class:`CapabilityError`, which the tool reports as a refusal.
        """
        raise CapabilityError(f"{type(self).__name__} has no exact low-rank factors")

    @torch.no_grad()
    def merge(self, base: nn.Module) -> None:
        """Fold this branch into ``base``'s weights. Default: W ← W + ΔW."""
        base.weight.data += self.delta_weight(base).to(base.weight.dtype)

    @torch.no_grad()
    def unmerge(self, base: nn.Module) -> None:
        """Exact inverse of :meth:`merge`. Default: W ← W − ΔW."""
        base.weight.data -= self.delta_weight(base).to(base.weight.dtype)


class DeltaMethod:
    """A registered method: its config class, capabilities, default targets and branch factory.

    Subclasses set the class attributes and implement :meth:`make_branch`; everything else
    (target selection, injection, save/load, merge bookkeeping) is shared core code.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[DeltaConfig]]
    capabilities: ClassVar[Capabilities] = Capabilities()
    # model_type → default target patterns when the config gives none; "*" is the fallback.
    default_targets: ClassVar[dict[str, str | list[str]]] = {"*": "all-linear"}
    wraps: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear,)
    target_kind: ClassVar[str] = "nn.Linear"  # what can_wrap accepts, for error messages
    # Branch-local parameter keys as saved (e.g. "lora_A.weight"); used to split file keys.
    branch_keys: ClassVar[tuple[str, ...]] = ()
    # PEFT's peft_type for this method, or None when PEFT has no equivalent.
    peft_type: ClassVar[str | None] = None
    # Other PEFT types whose files this method reads (converted in from_peft_config / from_peft_tensors).
    peft_imports: ClassVar[tuple[str, ...]] = ()
    # Branch keys that files store without the module path (PEFT's prompt learning keeps
    # ``prompt_embeddings`` at the top level); only for methods with a single target module.
    unprefixed_keys: ClassVar[tuple[str, ...]] = ()
    # Prefix of the other file keys: PEFT writes "base_model.model.<module>…" for tuners and
    # "base_model.<module>…" for prompt learning (where the model is not wrapped in a tuner).
    file_prefix: ClassVar[str] = "base_model.model."

    def can_wrap(self, module: nn.Module) -> bool:
        return isinstance(module, self.wraps)

    def resolve_targets(self, model: nn.Module, config: DeltaConfig) -> str | list[str]:
        if config.targets is not None:
            return config.targets
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        return self.default_targets.get(model_type, self.default_targets["*"])

    def resolve_config(self, model: nn.Module, config: DeltaConfig) -> DeltaConfig:
        """Fill architecture-dependent defaults into ``config`` (the stored, saved config)."""
        return config

    def make_branch(self, module_name: str, module: nn.Module, config: DeltaConfig) -> DeltaBranch:
        raise NotImplementedError

    def on_train_step(self, branches: dict[str, DeltaBranch], config: DeltaConfig, step: int) -> None:
        """Called by the trainer after each optimizer step (gradients still present) with this
        delta's branches by module name; e.g. incremental LoRA grows ranks here. Default: nothing."""

    def saved_config(self, config: DeltaConfig) -> DeltaConfig:
        """The config written next to the saved tensors (must describe :meth:`DeltaBranch.saved_state`)."""
        return config

    def branch_keys_for(self, config: DeltaConfig) -> tuple[str, ...]:
        """Branch-local saved keys for this config (a bundle's depend on its members)."""
        return self.branch_keys

    # --- PEFT file compatibility (only for methods with a peft_type) ---
    def to_peft_config(self, config: DeltaConfig, target_patterns: list[str], target_names: list[str]) -> dict[str, Any]:
        """PEFT's adapter_config fields. ``target_patterns``: the shortest equivalent pattern list;
        ``target_names``: the exact logical module names."""
        raise NotImplementedError

    def from_peft_config(self, peft_config: dict[str, Any], source: str) -> DeltaConfig:
        raise NotImplementedError

    def from_peft_tensors(self, peft_config: dict[str, Any], tensors: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
        """A PEFT file's tensors (keys without the file prefix) → this method's; by default unchanged."""
        return tensors

    def converts_peft_tensors(self, peft_config: dict[str, Any]) -> bool:
        """True when :meth:`from_peft_tensors` changes this file's tensors (readers that go to the file
        directly, like the merge engine, must then read through it)."""
        return peft_config.get("peft_type") != self.peft_type
