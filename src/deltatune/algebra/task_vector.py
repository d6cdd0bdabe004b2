"""Merge inputs as task vectors τ = θ_input − θ_base, one module at a time.

Two kinds of input, told apart by their files:

- a full fine-tuned HF directory (``config.json`` + safetensors): τ = θ_ft − θ_base for every tensor;
- a delta directory (deltatune's or PEFT's files) of any mergeable method: τ comes from the method's
  own contract — ``delta_weight()`` for linear deltas (LoRA: s·B·A), else ``merge()`` applied to a
  copy of the base module minus the base module (IA3: W·diag(l) − W). No method is special-cased:
  LoRA-aware merges ask the branch for ``low_rank_factors()`` (PiSSA: ``[s·B, −s·B₀] [A; A₀]``)
  rather than reading its tensors.

Everything is validated (architecture, names, shapes) when the input is opened, from file headers
only; tensors are read when :meth:`task_vectors` is called for a module.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from deltatune.algebra.stream import MemoryTensors, TensorFile, checkpoint_files, read_header
from deltatune.core.full_copy import FULL_COPY_KEY
from deltatune.core.registry import get_method
from deltatune.core.stub import stub_module
from deltatune.core.state import (
    CONFIG_FILE,
    DELTATUNE_FILE,
    WEIGHTS_FILE,
    converted_on_read,
    from_file_key,
    read_delta_config,
    read_delta_tensors,
    split_key,
    to_file_key,
)
from deltatune.utils.errors import CapabilityError, ConfigError, DeltaFileError, ModelLoadError, ShapeMismatchError, closest


def module_of(tensor_name: str) -> str:
    return tensor_name.rsplit(".", 1)[0]


def read_model_config(directory: Path) -> dict:
    try:
        return json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{directory}/config.json: cannot read the model config ({err})") from None


class BaseCheckpoint:
    """The base model's tensors (an alias, a GGUF file or a HF directory, resolved to a HF directory)."""

    def __init__(self, name_or_path: str):
        from deltatune.models.load import resolve_source

        source, local = resolve_source(name_or_path)
        if not local:
            raise ModelLoadError(f"base {name_or_path!r}: merging reads local checkpoints only; download it first")
        self.name, self.dir = str(name_or_path), Path(source)
        self.config = read_model_config(self.dir)
        self.tensors = TensorFile(checkpoint_files(self.dir), str(self.dir))

    def architecture(self) -> tuple:
        return (self.config.get("model_type"), tuple(self.config.get("architectures") or ()))


class FullInput:
    """A full fine-tuned checkpoint of the same architecture as the base."""

    kind = "full"

    def __init__(self, path: Path):
        self.path = path
        self.config = read_model_config(path)
        self.tensors = TensorFile(checkpoint_files(path), str(path))

    def validate(self, base: BaseCheckpoint) -> None:
        mine, theirs = self.config.get("model_type"), base.config.get("model_type")
        if mine != theirs:
            raise ShapeMismatchError(f"input {str(self.path)!r} is a {mine!r} model but the base {base.name!r} is {theirs!r}; merged models must share an architecture")
        for name in base.tensors.keys():
            if name not in self.tensors.infos:
                raise ShapeMismatchError(f"input {str(self.path)!r} has no tensor {name!r}, which the base {base.name!r} has; is it another architecture?")
            if self.tensors.shape(name) != base.tensors.shape(name):
                raise ShapeMismatchError(
                    f"input {str(self.path)!r}: tensor {name!r} has shape {list(self.tensors.shape(name))}, base {base.name!r} has "
                    f"{list(base.tensors.shape(name))}; merged models must have the same shapes"
                )

    def touches(self, module: str) -> bool:
        return True

    def task_vectors(self, module: str, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: self.tensors.get(name).float() - t.float() for name, t in base.items()}

    def close(self) -> None:
        self.tensors.close()


class AdapterInput:
    """A delta directory; its modules' task vectors come from the method's delta_weight()/merge()."""

    kind = "adapter"

    def __init__(self, path: Path):
        self.path = path
        self.config = read_delta_config(path)
        self.method = get_method(self.config.method)
        weights = path / WEIGHTS_FILE
        if not weights.is_file():
            raise DeltaFileError(f"{path}: missing {WEIGHTS_FILE}")
        self.file = TensorFile([weights], str(path))
        if converted_on_read(path):  # another PEFT format read as this method's (AdaLoRA → LoRA)
            self.file.close()
            tensors = read_delta_tensors(path)
            self.file = MemoryTensors({to_file_key(k): v for k, v in tensors.items()}, str(path))
        self.base_model_name = self._base_name()
        self.modules: dict[str, dict[str, str]] = {}   # base module name → {branch-local key: file key}
        self.saved: dict[str, str] = {}                 # base tensor name → file key (modules_to_save)
        self.logical: dict[str, str] = {}               # base module name → the delta's own module name
        self.ranks: dict[str, int] = {}                 # base module name → rank of its low-rank factors

    def _base_name(self) -> str | None:
        cfg = self.path / CONFIG_FILE
        try:
            return json.loads(cfg.read_text()).get("base_model_name_or_path") if cfg.is_file() else None
        except (OSError, ValueError):
            return None

    def validate(self, base: BaseCheckpoint) -> None:
        if not (self.method.capabilities.linear_delta or self.method.capabilities.mergeable):
            raise DeltaFileError(f"input {str(self.path)!r}: {self.method.name} deltas cannot be merged into weights, so they have no task vector")
        base_names = set(base.tensors.keys())
        base_modules = {module_of(n) for n in base_names}
        rename = _module_renamer(base_modules)
        by_module: dict[str, dict[str, str]] = {}
        for file_key in self.file.keys():
            key = from_file_key(file_key)
            module, local = split_key(key, self.method.branch_keys_for(self.config), self.config.modules_to_save, _prefixes(key))
            target = rename(module)
            if target is None:
                near = closest(module, base_modules, 1)
                raise ShapeMismatchError(
                    f"input {str(self.path)!r}: the delta has weights for module {module!r}, which the base {base.name!r} does not have"
                    + (f" (closest: {near[0]!r})" if near else "") + "; was it trained on another base model?"
                )
            if local.startswith(FULL_COPY_KEY + "."):
                name = f"{target}.{local[len(FULL_COPY_KEY) + 1:]}"
                if name not in base_names or self.file.shape(file_key) != base.tensors.shape(name):
                    raise ShapeMismatchError(f"input {str(self.path)!r}: saved module tensor {key!r} has no same-shaped tensor {name!r} in the base {base.name!r}")
                self.saved[name] = file_key
            else:
                by_module.setdefault(target, {})[local] = file_key
                self.logical[target] = module
        for module, keys in by_module.items():
            if f"{module}.weight" not in base_names:
                raise ShapeMismatchError(f"input {str(self.path)!r}: base module {module!r} has no weight to apply the delta to")
            branch = self._branch(module, base, meta=True)
            expected = {k: tuple(v.shape) for k, v in branch.state_dict().items()}
            for local, file_key in keys.items():
                if local not in expected:
                    raise ShapeMismatchError(f"input {str(self.path)!r}: unexpected tensor {file_key!r} for module {module!r}")
                if self.file.shape(file_key) != expected[local]:
                    raise ShapeMismatchError(
                        f"input {str(self.path)!r}: tensor {file_key!r} has shape {list(self.file.shape(file_key))}, but module {module!r} "
                        f"of the base {base.name!r} needs {list(expected[local])}; the delta was saved for another base model"
                    )
            if self.method.capabilities.low_rank_factors:  # shapes only: the branch is on the meta device
                self.ranks[module] = branch.low_rank_factors()[0].shape[0]
        self.modules = by_module
        self._base = base

    def _branch(self, module: str, base: BaseCheckpoint, meta: bool, weights: dict[str, torch.Tensor] | None = None):
        w_name, b_name = f"{module}.weight", f"{module}.bias"
        if weights is None:
            # Zeros, not meta tensors: a branch may compute from W when built (PiSSA's SVD, LIFT's and
            # DSEE's index selection), which meta tensors cannot do; one module's weight at a time.
            w = torch.zeros(base.tensors.shape(w_name))
            b = torch.zeros(base.tensors.shape(b_name)) if b_name in base.tensors.infos else None
        else:
            w, b = weights[w_name].float(), weights.get(b_name)
            b = None if b is None else b.float()
        stub = stub_module(w, b)
        branch = self.method.make_branch(self._logical(module), stub, self.config)
        return branch.to(device="meta") if meta else branch.float()

    def _logical(self, module: str) -> str:
        # The delta's own name: patterns in its stored config (IA3's feedforward modules) refer to it.
        return self.logical.get(module, module)

    def touches(self, module: str) -> bool:
        return module in self.modules or any(module_of(n) == module for n in self.saved)

    def _loaded_branch(self, module: str, base: dict[str, torch.Tensor]):
        """The method's branch at ``module`` over the base tensors ``base``, holding the file's tensors."""
        branch = self._branch(module, self._base, meta=False, weights=base)
        branch.load_state_dict({local: self.file.get(fk).float() for local, fk in self.modules[module].items()})
        return branch

    @torch.no_grad()
    def low_rank_factors(self, module: str, base: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Exact ``(A [r, in], B_s [out, r])`` with ``B_s @ A`` = this delta's ΔW at ``module``, as the
        method's branch gives them; None where the delta leaves ``module`` alone. ``base``: the module's
        base tensors (``<module>.weight`` …), which a branch may need (PiSSA's B₀, A₀)."""
        if module not in self.modules:
            return None
        try:
            a, b = self._loaded_branch(module, base).low_rank_factors()
        except CapabilityError as err:
            raise ConfigError(f"input {str(self.path)!r}: the {self.method.name} delta at module {module!r} has no exact low-rank factors ({err}); "
                              "write a HF model directory instead") from None
        return a.float(), b.float()

    @torch.no_grad()
    def task_vectors(self, module: str, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, file_key in self.saved.items():
            if name in base:
                out[name] = self.file.get(file_key).float() - base[name].float()
        if module not in self.modules:
            return out
        branch = self._loaded_branch(module, base)
        w_name, b_name = f"{module}.weight", f"{module}.bias"
        if self.method.capabilities.linear_delta:
            out[w_name] = branch.delta_weight(stub_module(base[w_name].float(), None)).float()
            return out
        merged = stub_module(base[w_name].float().clone(), None if b_name not in base else base[b_name].float().clone())
        branch.merge(merged)
        out[w_name] = merged.weight.detach() - base[w_name].float()
        if getattr(merged, "bias", None) is not None:
            if b_name not in base:
                raise ShapeMismatchError(f"input {str(self.path)!r}: the delta adds a bias to {module!r}, which the base has not; it cannot be merged as a task vector")
            out[b_name] = merged.bias.detach() - base[b_name].float()
        return out

    def close(self) -> None:
        self.file.close()


def _prefixes(key: str) -> set[str]:
    parts = key.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def _module_renamer(base_modules: set[str]):
    """Adapter module name → base checkpoint module name. A delta trained on a task model
    (``bert.encoder.layer.0…`` in BertForSequenceClassification) applies to a bare encoder
    checkpoint (``encoder.layer.0…``) and the other way round: drop or add one leading component."""
    prefixes = {m.split(".", 1)[0] for m in base_modules}

    def rename(module: str) -> str | None:
        if module in base_modules:
            return module
        head, _, rest = module.partition(".")
        if rest and rest in base_modules:
            return rest
        for p in prefixes:
            if f"{p}.{module}" in base_modules:
                return f"{p}.{module}"
        return None

    return rename


def open_input(path: str | Path):
    """A :class:`FullInput`, :class:`AdapterInput` or sparse delta by what the directory holds."""
    from deltatune.algebra.sparse import SparseInput, is_sparse_dir

    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"merge input {str(path)!r} does not exist (expected a HF model directory or a delta directory)")
    if is_sparse_dir(path):
        return SparseInput(path)
    if (path / DELTATUNE_FILE).is_file() or (path / CONFIG_FILE).is_file():
        return AdapterInput(path)
    if (path / "config.json").is_file():
        return FullInput(path)
    raise ModelLoadError(f"merge input {str(path)!r} is neither a HF model directory (config.json) nor a delta directory ({CONFIG_FILE})")


__all__ = ["AdapterInput", "BaseCheckpoint", "FullInput", "module_of", "open_input", "read_header"]


def check_full_inputs(paths: list[str], method: str) -> list[str]:
    """For methods that average whole models (soups, OT fusion): every input is a full model
    directory with the first one's tensor names and shapes — checked from headers, before any
    tensor is read. Returns the tensor names of the first input."""
    reference = BaseCheckpoint(paths[0])
    try:
        for p in paths:
            inp = open_input(p)
            try:
                if not isinstance(inp, FullInput):
                    raise ConfigError(f"{method} averages full models; {p!r} is a delta — merge it into its base first")
                inp.validate(reference)
            finally:
                inp.close()
        return list(reference.tensors.keys())
    finally:
        reference.tensors.close()
