"""Adapters on disk, a bounded number resident in stacked per-module buffers (S-LoRA's unified pool).

Any number of LoRA directories (deltatune's or PEFT's files) live under ``adapters_dir``; at most
``num_slots`` are resident. Residents are stacked per wrapped module as in
:mod:`deltatune.serve.batched_lora` (``A [S, R, in]``, ``(B·scale)ᵀ [S, R, out]``, zero-padded to the
pool's ``max_rank``), so one batched matmul serves any mix of them.

Threading: files are read and checked on a background thread (``request``); the decode thread
copies a finished read into a slot between steps (``poll``). A slot is reused least recently used
first, and only when no running request holds it (``acquire``/``release`` count references), so
an adapter in use is never evicted. Reads in flight plus reads waiting for a slot are bounded by
``num_slots``: memory stays bounded however many adapters are on disk.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from deltatune.core.registry import get_method
from deltatune.core.state import CONFIG_FILE, DELTATUNE_FILE, read_delta_config, read_delta_tensors, split_key
from deltatune.methods.lora import LoraConfig
from deltatune.utils.errors import DeltaFileError, DeltatuneError, ShapeMismatchError
from deltatune.utils.io import safe_child


class AdapterNotFoundError(DeltatuneError, LookupError):
    """A request names an adapter that is not in the adapters directory."""


Prepared = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module → (A [r, in], B·scale [out, r])


def read_lora_adapter(path: Path, modules: dict[str, tuple[int, int]], max_rank: int) -> Prepared:
    """Read a LoRA directory through :mod:`deltatune.core.state` and check it fits the served model.

    ``modules``: the wrappable modules, name → (in_features, out_features). Returns the scale
    folded into B. Raises a one-line DeltatuneError naming the file, module and expectation.
    """
    config = read_delta_config(path)
    if not isinstance(config, LoraConfig):
        raise DeltaFileError(f"{path}: method {config.method!r} cannot be served in a mixed batch; the engine serves LoRA deltas")
    if config.modules_to_save:
        raise DeltaFileError(f"{path}: modules_to_save {config.modules_to_save} (full module copies) cannot be batched across requests; merge it instead")
    keys = get_method("lora").branch_keys_for(config)
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in read_delta_tensors(path).items():
        module, local = split_key(key, keys, [], set(modules))
        by_module.setdefault(module, {})[local] = tensor
    prepared: Prepared = {}
    for module, parts in by_module.items():
        if module not in modules:
            raise ShapeMismatchError(f"{path}: LoRA weights for module {module!r}, which the served model has no linear layer for (served: attention/MLP projections)")
        if "lora_A.weight" not in parts or "lora_B.weight" not in parts:
            raise ShapeMismatchError(f"{path}: module {module!r} needs both lora_A.weight and lora_B.weight")
        a, b = parts["lora_A.weight"].float(), parts["lora_B.weight"].float()
        n_in, n_out = modules[module]
        r = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != n_in or tuple(b.shape) != (n_out, r):
            raise ShapeMismatchError(f"{path}: module {module!r} has lora_A {list(a.shape)} / lora_B {list(b.shape)}, expected [r, {n_in}] / [{n_out}, r]")
        if r > max_rank:
            raise ShapeMismatchError(f"{path}: module {module!r} has rank {r}, above the pool's max_rank {max_rank}; start the engine with a larger max_lora_rank")
        if "lora_rank_mask" in parts:  # incremental LoRA: inactive rank directions are masked out
            b = b * parts["lora_rank_mask"].float()
        prepared[module] = (a, b * config.scaling)
    if not prepared:
        raise DeltaFileError(f"{path}: no LoRA tensors in the adapter file")
    return prepared


class AdapterPool:
    def __init__(self, adapters_dir: str | Path | None, modules: dict[str, tuple[int, int]], num_slots: int = 8, max_rank: int = 16,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if num_slots < 1 or max_rank < 1:
            raise DeltatuneError(f"adapter pool needs num_slots >= 1 and max_rank >= 1 (got {num_slots}, {max_rank})")
        self.root = Path(adapters_dir) if adapters_dir is not None else None
        self.modules = dict(modules)
        self.num_slots, self.max_rank = num_slots, max_rank
        self.A = {m: torch.zeros(num_slots, max_rank, i, dtype=dtype, device=device) for m, (i, _) in modules.items()}
        self.Bt = {m: torch.zeros(num_slots, max_rank, o, dtype=dtype, device=device) for m, (_, o) in modules.items()}
        # has[m][s]: whether slot s's adapter touches module m; rows of other slots skip m entirely.
        self.has = {m: torch.zeros(num_slots, dtype=torch.bool, device=device) for m in modules}
        self.has_list = {m: [False] * num_slots for m in modules}  # the same, for per-step planning in Python
        self.covers_all = [False] * num_slots  # slot s's adapter touches every module
        self.resident: OrderedDict[str, int] = OrderedDict()  # name → slot, least recently used first
        self.refs = [0] * num_slots
        self.free = list(range(num_slots))
        self._loading: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-load")
        self.loads = 0
        self.evictions = 0

    # --- names ---
    def path_of(self, name: str) -> Path:
        """The adapter's directory; a name that escapes the directory or does not exist is refused."""
        if self.root is None:
            raise AdapterNotFoundError(f"adapter {name!r}: the engine was started without an adapters directory")
        try:
            path = safe_child(self.root, name)
        except DeltatuneError:
            raise AdapterNotFoundError(f"adapter name {name!r} is not a directory name inside {str(self.root)!r}") from None
        if not ((path / CONFIG_FILE).is_file() or (path / DELTATUNE_FILE).is_file()):
            raise AdapterNotFoundError(f"adapter {name!r} not found in {str(self.root)!r} (expected {name}/{CONFIG_FILE})")
        return path

    def names(self) -> list[str]:
        """Every adapter directory under the adapters dir (not loaded)."""
        if self.root is None or not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if not p.name.startswith(".") and ((p / CONFIG_FILE).is_file() or (p / DELTATUNE_FILE).is_file()))

    # --- loading (any thread) and installing (decode thread) ---
    def request(self, name: str) -> bool:
        """True when ``name`` is resident; otherwise start reading it in the background (if there is room)."""
        if name in self.resident:
            return True
        with self._lock:
            if name not in self._loading and len(self._loading) < self.num_slots:
                path = self.path_of(name)
                self._loading[name] = self._executor.submit(read_lora_adapter, path, self.modules, self.max_rank)
        return False

    def poll(self, keep: frozenset[str] | set[str] = frozenset()) -> dict[str, BaseException]:
        """Install finished reads into slots (free first, then the least recently used idle one not in ``keep``).

        ``keep``: adapters that queued requests are about to use — evicting one of those before its
        request is admitted would only load it again. Returns the adapters whose read failed, with
        the error (their requests should fail)."""
        failed: dict[str, BaseException] = {}
        with self._lock:
            done = [(n, f) for n, f in self._loading.items() if f.done()]
        for name, future in done:
            err = future.exception()
            if err is not None:
                failed[name] = err
                with self._lock:
                    del self._loading[name]
                continue
            slot = self._take_slot(keep)
            if slot is None:
                break  # every slot is in use: keep the read waiting until a request finishes
            self._install(slot, future.result())
            self.resident[name] = slot
            self.loads += 1
            with self._lock:
                del self._loading[name]
        return failed

    def _take_slot(self, keep) -> int | None:
        if self.free:
            return self.free.pop(0)
        for name, slot in self.resident.items():  # least recently used first
            if self.refs[slot] == 0 and name not in keep:
                del self.resident[name]
                self.evictions += 1
                return slot
        return None

    @torch.no_grad()
    def _install(self, slot: int, prepared: Prepared) -> None:
        for m in self.modules:
            self.A[m][slot].zero_()
            self.Bt[m][slot].zero_()
            self.has[m][slot] = m in prepared
            self.has_list[m][slot] = m in prepared
            if m in prepared:
                a, b = prepared[m]
                self.A[m][slot, : a.shape[0]].copy_(a)
                self.Bt[m][slot, : b.shape[1]].copy_(b.T)
        self.covers_all[slot] = all(m in prepared for m in self.modules)

    # --- references (decode thread) ---
    def acquire(self, name: str) -> int:
        slot = self.resident[name]
        self.resident.move_to_end(name)
        self.refs[slot] += 1
        return slot

    def release(self, slot: int) -> None:
        self.refs[slot] -= 1

    def pending(self) -> int:
        with self._lock:
            return len(self._loading)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.A, self.Bt) for t in d.values())
