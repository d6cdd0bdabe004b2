"""A deterministic, resumable stream of batches.

The order of epoch ``e`` is a permutation drawn from ``random.Random(f"deltatune:{seed}:{epoch}")``
(string seeding hashes with SHA-512, so it is the same on every machine, Python version and
``PYTHONHASHSEED``). The whole stream is therefore a pure function of (examples, batch size,
seed), and ``(epoch, position)`` — position = examples of this epoch already handed out — is
all a checkpoint needs to continue exactly where it stopped.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from deltatune.utils.errors import DataError


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """Indices of the ``n`` examples in the order epoch ``epoch`` visits them."""
    order = list(range(n))
    if shuffle:
        random.Random(f"deltatune:{seed}:{epoch}").shuffle(order)
    return order


class BatchStream:
    """Yield collated batches forever, epoch after epoch, reshuffling every epoch.

    The state advances *when a batch is handed out*: after ``batch = next(stream)`` and a
    training step on it, ``state_dict()`` describes the stream after that batch, so a
    checkpoint taken then resumes with the next one. With ``drop_last`` a final short batch of
    an epoch is skipped; otherwise it is yielded as is (smaller than ``batch_size``).

    Usage::

        stream = BatchStream(train, batch_size=8, seed=0, collate=collator)
        for step, batch in zip(range(max_steps), stream): ...
        ckpt["data"] = stream.state_dict()
        # later
        stream.load_state_dict(ckpt["data"])
    """

    def __init__(
        self,
        examples: Sequence[Any],
        batch_size: int,
        seed: int,
        collate: Callable[[list[Any]], Any] | None = None,
        drop_last: bool = False,
        shuffle: bool = True,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not examples:
            raise DataError("no examples to iterate over (the data set is empty after filtering)")
        if drop_last and len(examples) < batch_size:
            raise DataError(f"drop_last with {len(examples)} examples and batch_size={batch_size} would yield no batch")
        self.examples = examples
        self.batch_size = batch_size
        self.seed = seed
        self.collate = collate
        self.drop_last = drop_last
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self._order: list[int] | None = None
        self._order_epoch = -1

    @property
    def steps_per_epoch(self) -> int:
        n, b = len(self.examples), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def state_dict(self) -> dict[str, int | bool]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_examples": len(self.examples),
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved state; the stream must be built over the same data and settings."""
        for key in ("seed", "num_examples", "batch_size", "shuffle", "drop_last"):
            mine = self.state_dict()[key]
            if key in state and state[key] != mine:
                raise DataError(
                    f"cannot resume the batch stream: checkpoint has {key}={state[key]!r}, this run has {mine!r}; "
                    "resume with the same data and settings"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= len(self.examples):
            raise DataError(f"cannot resume the batch stream: invalid position (epoch={epoch}, position={position})")
        self.epoch, self.position = epoch, position

    def _current_order(self) -> list[int]:
        if self._order_epoch != self.epoch:
            self._order = epoch_order(len(self.examples), self.seed, self.epoch, self.shuffle)
            self._order_epoch = self.epoch
        return self._order  # type: ignore[return-value]

    def next_indices(self) -> list[int]:
        """Indices of the next batch; advances the state."""
        n = len(self.examples)
        while True:
            remaining = n - self.position
            if remaining <= 0 or (self.drop_last and remaining < self.batch_size):
                self.epoch, self.position = self.epoch + 1, 0
                continue
            start = self.position
            indices = self._current_order()[start : start + self.batch_size]
            self.position = start + len(indices)
            if self.position >= n:  # normalise "end of epoch e" to "start of epoch e+1"
                self.epoch, self.position = self.epoch + 1, 0
            return indices

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        batch = [self.examples[i] for i in self.next_indices()]
        return self.collate(batch) if self.collate is not None else batch


def iter_batches(examples: Sequence[Any], batch_size: int, collate: Callable[[list[Any]], Any] | None = None) -> Iterator[Any]:
    """One pass in order, last batch possibly short: for evaluation."""
    for start in range(0, len(examples), batch_size):
        batch = list(examples[start : start + batch_size])
        yield collate(batch) if collate is not None else batch
