"""A memory-bounded key/value cache: a fixed pool of per-request slots of ``max_len`` positions.

The whole pool is allocated once (``2 · layers · slots · kv_heads · max_len · head_dim`` values),
so memory never grows with traffic; a request holds one slot from admission to completion and
the scheduler queues requests while no slot is free.

:class:`StepCache` is what one forward sees: it duck-types transformers' ``Cache.update`` —
the HF attention module calls ``update(k, v, layer_idx)`` with the new keys/values of every row
and gets back the keys/values to attend over — so the HF decoder layers run unchanged.
"""
from __future__ import annotations

import heapq

import torch


class SlotKVCache:
    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (num_layers, num_slots, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_slots, self.max_len = num_slots, max_len
        self._free = list(range(num_slots))  # a heap: the lowest free slot first keeps the batch contiguous

    def allocate(self) -> int | None:
        return heapq.heappop(self._free) if self._free else None

    def release(self, slot: int) -> None:
        heapq.heappush(self._free, slot)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def step(self, slots: list[int], start: torch.Tensor, n_new: torch.Tensor) -> StepCache:
        return StepCache(self, slots, start, n_new)


class StepCache:
    """Row ``i`` of this forward is cache slot ``slots[i]``; its ``n_new[i]`` new tokens go to
    positions ``start[i] … start[i] + n_new[i] − 1`` (padding tokens beyond ``n_new[i]`` are not stored)."""

    def __init__(self, cache: SlotKVCache, slots: list[int], start: torch.Tensor, n_new: torch.Tensor):
        self.cache = cache
        device = cache.k.device
        b, t = len(slots), int(n_new.max())
        q = torch.arange(t, device=device)
        valid = q[None, :] < n_new[:, None]                        # [b, t]
        self.src_row, self.src_q = torch.nonzero(valid, as_tuple=True)
        slot_t = torch.tensor(slots, device=device)
        self.dst_slot = slot_t[self.src_row]
        self.dst_pos = start[self.src_row] + self.src_q
        self.kv_len = int((start + n_new).max())
        # Contiguous slots are read as a view; otherwise gather only the positions in use.
        lo = slots[0]
        self.contiguous = slots == list(range(lo, lo + b))
        self.rows = slice(lo, lo + b) if self.contiguous else slot_t

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Store the new ``key``/``value`` ([b, kv_heads, t, head_dim]) and return the rows' full keys/values."""
        k, v = self.cache.k[layer_idx], self.cache.v[layer_idx]
        k[self.dst_slot, :, self.dst_pos] = key[self.src_row, :, self.src_q].to(k.dtype)
        v[self.dst_slot, :, self.dst_pos] = value[self.src_row, :, self.src_q].to(v.dtype)
        if self.contiguous:
            return k[self.rows, :, : self.kv_len], v[self.rows, :, : self.kv_len]
        return k[:, :, : self.kv_len].index_select(0, self.rows), v[:, :, : self.kv_len].index_select(0, self.rows)


def attention_mask(start: torch.Tensor, n_new: torch.Tensor, t: int, kv_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [b, 1, t, kv_len]: query ``q`` of row ``i`` (at position ``start[i] + q``) sees key
    ``j`` iff ``j <= start[i] + q`` and ``j < start[i] + n_new[i]`` (keys past a row's tokens are stale)."""
    q = torch.arange(t, device=start.device)
    j = torch.arange(kv_len, device=start.device)
    pos = start[:, None] + q[None, :]                                             # [b, t]
    seen = (j[None, None, :] <= pos[:, :, None]) & (j[None, None, :] < (start + n_new)[:, None, None])
    mask = torch.zeros(seen.shape, dtype=dtype, device=start.device).masked_fill_(~seen, torch.finfo(dtype).min)
    return mask[:, None]
