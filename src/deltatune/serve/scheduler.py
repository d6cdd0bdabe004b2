"""Requests and the continuous-batching scheduler (which requests run in the next step).

Between two decode steps the scheduler retires finished requests (freeing their KV slot and
adapter reference), admits waiting requests while a KV slot is free and their adapter is
resident (admission control: a request waits in the queue instead of over-allocating), and
hands out at most ``prefill_budget`` prompt tokens per step — a long prompt is prefilled in
chunks, so running requests keep decoding while it is read.
"""
from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from deltatune.serve.sampling import SamplingParams

_ids = itertools.count()


@dataclass
class Request:
    prompt_ids: list[int]
    sampling: SamplingParams
    adapter: str | None = None
    on_event: Callable[[dict], None] | None = None   # called on the engine thread: {"text": delta} … {"finish_reason": …}
    id: int = field(default_factory=lambda: next(_ids))
    # Runtime state, owned by the engine thread.
    kv_slot: int | None = None
    lora_slot: int = -1
    cached: int = 0                                   # tokens already in the KV cache
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    streamed: int = 0                                 # characters of ``text`` already sent
    finish_reason: str | None = None
    cancelled: bool = False                           # set from any thread; the engine drops the request at its next step
    error: BaseException | None = None
    generator: torch.Generator | None = None
    decoder: Any = None                               # the engine's IncrementalDecoder for output_ids
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def prefilling(self) -> bool:
        return self.cached < len(self.prompt_ids)

    def next_chunk(self, budget: int) -> list[int]:
        """Input tokens for the next forward: a prompt chunk, or the last generated token."""
        if self.prefilling:
            return self.prompt_ids[self.cached: self.cached + budget]
        return [self.output_ids[-1]]


class Scheduler:
    def __init__(self, prefill_budget: int, release_kv: Callable[[int], None]):
        self.prefill_budget = prefill_budget
        self._release_kv = release_kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def admit(self, allocate_kv: Callable[[], int | None], adapter_ready: Callable[[Request], int | None]) -> None:
        """Move waiting requests into the batch, first come first served, while KV slots are free.

        ``adapter_ready(req)`` returns the request's adapter slot (taking a reference; -1 for no
        adapter) or None while the adapter is still loading: that request keeps its place in the
        queue and does not hold up the ones behind it."""
        passed: list[Request] = []
        while self.waiting:
            slot = allocate_kv()
            if slot is None:  # KV pool full: everyone left waits
                break
            while self.waiting:
                req = self.waiting.popleft()
                lora = adapter_ready(req)
                if lora is not None:
                    req.kv_slot, req.lora_slot = slot, lora
                    self.running.append(req)
                    slot = None
                    break
                passed.append(req)
            if slot is not None:
                self._release_kv(slot)
        self.waiting.extendleft(reversed(passed))

    def decode_batch(self) -> list[Request]:
        return [r for r in self.running if not r.prefilling]

    def prefill_batch(self) -> list[tuple[Request, list[int]]]:
        """Prompt chunks for this step, oldest request first, ``prefill_budget`` tokens in all."""
        budget, chosen = self.prefill_budget, []
        for req in self.running:
            if budget <= 0:
                break
            if req.prefilling:
                chunk = req.next_chunk(budget)
                chosen.append((req, chunk))
                budget -= len(chunk)
        return chosen

    def retire(self) -> list[Request]:
        finished = [r for r in self.running if r.finish_reason is not None]
        self.running = [r for r in self.running if r.finish_reason is None]
        return finished
