"""Adapters on disk, a bounded number resident in stacked per-module buffers (S-LoRA's unified pool).

Any number of delta directories (deltatune's or PEFT's files) live under ``adapters_dir``; at most
``num_slots`` are resident. Residents are stacked per wrapped module as in
:mod:`deltatune.serve.batched_lora` (``A [S, R, in]``, ``(B·scale)ᵀ [S, R, out]``, zero-padded to the
pool's ``max_rank``), so one batched matmul serves any mix of them.

The pool never interprets a file's tensors itself: for each module it builds the delta's own branch
(the method's code) over the served base weight, loads the file into it, and asks the branch for
exact ``low_rank_factors()`` — so PiSSA (rank 2r: ``[s·B, −s·B₀] [A; A₀]``), rank masks and
per-module scales are served exactly as ``deltatune generate`` runs them. Methods whose
capabilities do not include ``low_rank_factors`` are refused with a one-line reason.

Every check runs on the reading thread, before the adapter can take a slot: tensor names, dtypes,
shapes against the method's own branch, finite values, file size and rank. A file that fails fails
only the requests for that adapter; the next request may try to load it again.

Threading: files are read and checked on a background thread (``request``); the decode thread
copies a finished read into a slot between steps (``poll``). A slot is reused least recently used
first, and only when no running request holds it (``acquire``/``release`` count references), so
an adapter in use is never evicted. Reads in flight plus reads waiting for a slot are bounded by
``num_slots``: memory stays bounded however many adapters are on disk.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from deltatune.core.registry import get_method, list_methods
from deltatune.core.state import CONFIG_FILE, DELTATUNE_FILE, WEIGHTS_FILE, read_delta_config, read_delta_tensors, split_key
from deltatune.core.stub import stub_module
from deltatune.utils.errors import CapabilityError, ConfigError, DeltaFileError, DeltatuneError, ShapeMismatchError
from deltatune.utils.io import safe_child

log = logging.getLogger("deltatune.serve")


class AdapterNotFoundError(DeltatuneError, LookupError):
    """A request names an adapter that is not in the adapters directory."""


Prepared = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module → (A [r, in], B·scale [out, r])


LORA_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_lora_dtype(value: str | torch.dtype | None, model_dtype: torch.dtype) -> torch.dtype:
    """The adapter pool's dtype: ``None``/``"auto"`` → the model's; a name from LORA_DTYPES or a torch dtype."""
    if value is None or value == "auto":
        return model_dtype
    if isinstance(value, torch.dtype) and value in LORA_DTYPES.values():
        return value
    if isinstance(value, str) and value in LORA_DTYPES:
        return LORA_DTYPES[value]
    raise ConfigError(f"lora_dtype {value!r}: expected 'auto' or one of {', '.join(LORA_DTYPES)}")


def served_methods() -> list[str]:
    """The registered methods whose deltas the pool batches (capability ``low_rank_factors``)."""
    return [n for n in list_methods() if get_method(n).capabilities.low_rank_factors]


def max_file_bytes(weights: dict[str, torch.Tensor], max_rank: int) -> int:
    """The largest weights file the pool reads: every module at ``max_rank`` in fp32, twice over
    (a file may hold more than the served factors, e.g. a rank mask), plus 1 MiB of header."""
    return 2 * 4 * max_rank * sum(w.shape[0] + w.shape[1] for w in weights.values()) + (1 << 20)


def _check_tensor(where: str, key: str, tensor: torch.Tensor, expected: torch.Tensor) -> None:
    if not tensor.is_floating_point():
        raise DeltaFileError(f"{where}: tensor {key!r} has dtype {str(tensor.dtype).removeprefix('torch.')}, expected a floating-point tensor")
    if tuple(tensor.shape) != tuple(expected.shape):
        raise ShapeMismatchError(f"{where}: tensor {key!r} has shape {list(tensor.shape)}, expected {list(expected.shape)} for the served model")
    if not bool(torch.isfinite(tensor).all()):
        raise DeltaFileError(f"{where}: tensor {key!r} holds NaN or infinite values")


@torch.no_grad()
def read_adapter(path: Path, weights: dict[str, torch.Tensor], max_rank: int) -> Prepared:
    """Read a delta directory and return each module's exact low-rank factors, fully checked.

    ``weights``: the served model's wrappable linear layers, module name → base weight [out, in]
    (PiSSA's branch needs it). Returns fp32 ``(A [r, in], B·scale [out, r])`` per module, with
    ``B·scale @ A`` equal to the branch's ``delta_weight()``. Raises a one-line DeltatuneError naming
    the file, module or tensor and what was expected.
    """
    config = read_delta_config(path)
    method = get_method(config.method)
    if not method.capabilities.low_rank_factors:
        raise DeltaFileError(f"{path}: method {config.method!r} cannot be served in a mixed batch; the pool serves {', '.join(served_methods())}")
    if config.modules_to_save:
        raise DeltaFileError(f"{path}: modules_to_save {config.modules_to_save} (full module copies) cannot be batched across requests; merge it instead")
    weights_file = path / WEIGHTS_FILE
    limit = max_file_bytes(weights, max_rank)
    if weights_file.is_file() and weights_file.stat().st_size > limit:
        raise DeltaFileError(f"{weights_file}: {weights_file.stat().st_size} bytes, above the pool's limit of {limit} for rank {max_rank}")
    keys = method.branch_keys_for(config)
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in read_delta_tensors(path).items():
        module, local = split_key(key, keys, [], set(weights))
        by_module.setdefault(module, {})[local] = tensor
    prepared: Prepared = {}
    for module, parts in by_module.items():
        if module not in weights:
            raise ShapeMismatchError(f"{path}: weights for module {module!r}, which the served model has no linear layer for (served: attention/MLP projections)")
        branch = method.make_branch(module, stub_module(weights[module].detach()), config).float()
        expected = branch.state_dict()
        unknown = sorted(parts.keys() - expected.keys())
        if unknown:
            raise DeltaFileError(f"{path}: tensor {module}.{unknown[0]} is not part of a {config.method} delta at this module (expected {', '.join(sorted(expected))})")
        for local, ref in expected.items():
            if local not in parts:
                raise DeltaFileError(f"{path}: module {module!r} lacks tensor {local!r} (a {config.method} delta there has {', '.join(sorted(expected))})")
            _check_tensor(str(path), f"{module}.{local}", parts[local], ref)
        branch.load_state_dict({k: v.float() for k, v in parts.items()})
        try:
            a, b = branch.low_rank_factors()
        except CapabilityError as err:
            raise DeltaFileError(f"{path}: {config.method} delta at {module!r} cannot be served in a mixed batch ({err})") from None
        if a.shape[0] > max_rank:
            raise ShapeMismatchError(f"{path}: module {module!r} has rank {a.shape[0]}, above the pool's max_rank {max_rank}; start the engine with a larger max_lora_rank")
        if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
            raise DeltaFileError(f"{path}: module {module!r} gives non-finite low-rank factors")
        prepared[module] = (a.float().contiguous(), b.float().contiguous())
    if not prepared:
        raise DeltaFileError(f"{path}: no delta tensors in the adapter file")
    return prepared


def _read_for_client(name: str, path: Path, weights: dict[str, torch.Tensor], max_rank: int) -> Prepared:
    """:func:`read_adapter`, with the server's directory replaced by the adapter's name in errors:
    the message goes back to a client, who must not learn server paths."""
    try:
        return read_adapter(path, weights, max_rank)
    except DeltatuneError as err:
        log.warning("adapter %r failed to load: %s", name, err)
        raise type(err)(str(err).replace(str(path), name).replace(str(path.parent), "<adapters>")) from None
    except Exception as err:  # a bug or a broken file seen by a library: the request fails, the server stays up
        log.exception("adapter %r failed to load", name)
        raise DeltaFileError(f"{name}: the adapter could not be read ({type(err).__name__})") from None


class AdapterPool:
    """``weights``: the served linear layers, module name → base weight [out, in] (not copied)."""

    def __init__(self, adapters_dir: str | Path | None, weights: dict[str, torch.Tensor], num_slots: int = 8, max_rank: int = 16,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if num_slots < 1 or max_rank < 1:
            raise DeltatuneError(f"adapter pool needs num_slots >= 1 and max_rank >= 1 (got {num_slots}, {max_rank})")
        self.root = Path(adapters_dir) if adapters_dir is not None else None
        self.weights = dict(weights)
        modules = {m: (w.shape[1], w.shape[0]) for m, w in self.weights.items()}
        self.modules = modules
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
        # Messages go back to clients: they name the adapter, never the server's directory.
        if self.root is None:
            raise AdapterNotFoundError(f"adapter {name!r}: the engine was started without an adapters directory")
        try:
            path = safe_child(self.root, name)
        except DeltatuneError:
            raise AdapterNotFoundError(f"adapter name {name!r} is not a directory name inside the adapters directory") from None
        if not ((path / CONFIG_FILE).is_file() or (path / DELTATUNE_FILE).is_file()):
            raise AdapterNotFoundError(f"adapter {name!r} not found in the adapters directory (expected {name}/{CONFIG_FILE})")
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
                self._loading[name] = self._executor.submit(_read_for_client, name, path, self.weights, self.max_rank)
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
            with self._lock:
                del self._loading[name]
            try:
                self._install(slot, future.result())
            except Exception as err:  # checked on read, so a bug: fail this adapter, keep the slot
                log.exception("adapter %r failed to install", name)
                self._clear(slot)
                self.free.append(slot)
                failed[name] = DeltaFileError(f"{name}: the adapter could not be installed ({type(err).__name__})")
                continue
            self.resident[name] = slot
            self.loads += 1
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
        self._clear(slot)
        for m, (a, b) in prepared.items():
            self.A[m][slot, : a.shape[0]].copy_(a)
            self.Bt[m][slot, : b.shape[1]].copy_(b.T)
            self.has[m][slot] = True
            self.has_list[m][slot] = True
        self.covers_all[slot] = all(m in prepared for m in self.modules)

    @torch.no_grad()
    def _clear(self, slot: int) -> None:
        """An empty slot: zero factors, no module covered (what a half-done install leaves is undone)."""
        for m in self.modules:
            self.A[m][slot].zero_()
            self.Bt[m][slot].zero_()
            self.has[m][slot] = False
            self.has_list[m][slot] = False
        self.covers_all[slot] = False

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
