"""BatchStream: seeded order, epochs, exact resume from (epoch, position)."""
from __future__ import annotations

import itertools

import pytest

from deltatune.data import BatchStream, epoch_order, iter_batches
from deltatune.utils.errors import DataError

EXAMPLES = list(range(10))


def take(stream, n):
    return [list(b) for b in itertools.islice(stream, n)]


def test_order_is_deterministic_per_seed_and_epoch():
    assert epoch_order(10, seed=3, epoch=0) == epoch_order(10, seed=3, epoch=0)
    assert epoch_order(10, seed=3, epoch=0) != epoch_order(10, seed=4, epoch=0)
    assert epoch_order(10, seed=3, epoch=0) != epoch_order(10, seed=3, epoch=1)
    assert sorted(epoch_order(10, seed=3, epoch=5)) == EXAMPLES
    assert epoch_order(4, seed=3, epoch=0, shuffle=False) == [0, 1, 2, 3]
    # Pinned: the order must not change between versions, or old checkpoints resume differently.
    assert epoch_order(6, seed=0, epoch=0) == [1, 4, 2, 5, 3, 0]


def test_epochs_cover_every_example_once():
    stream = BatchStream(EXAMPLES, batch_size=4, seed=0)
    batches = take(stream, 6)  # 3 batches per epoch: 4 + 4 + 2
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4, 2]
    assert sorted(sum(batches[:3], [])) == EXAMPLES and sorted(sum(batches[3:], [])) == EXAMPLES
    assert sum(batches[:3], []) == epoch_order(10, 0, 0) and sum(batches[3:], []) == epoch_order(10, 0, 1)
    assert stream.state_dict()["epoch"] == 2 and stream.state_dict()["position"] == 0


def test_drop_last():
    stream = BatchStream(EXAMPLES, batch_size=4, seed=0, drop_last=True)
    assert stream.steps_per_epoch == 2
    assert [len(b) for b in take(stream, 4)] == [4, 4, 4, 4]
    assert stream.epoch == 1 and stream.position == 8


@pytest.mark.parametrize("stop", [1, 3, 5])
def test_resume_continues_exactly(stop):
    reference = take(BatchStream(EXAMPLES, batch_size=3, seed=7), 12)
    first = BatchStream(EXAMPLES, batch_size=3, seed=7, collate=lambda b: [x * 10 for x in b])
    before = take(first, stop)
    state = first.state_dict()
    resumed = BatchStream(EXAMPLES, batch_size=3, seed=7, collate=lambda b: [x * 10 for x in b])
    resumed.load_state_dict(dict(state))
    after = take(resumed, 12 - stop)
    assert [[x // 10 for x in b] for b in before + after] == reference


def test_resume_rejects_different_data():
    state = BatchStream(EXAMPLES, batch_size=3, seed=7).state_dict()
    with pytest.raises(DataError, match=r"checkpoint has num_examples=10, this run has 9"):
        BatchStream(EXAMPLES[:9], batch_size=3, seed=7).load_state_dict(state)
    with pytest.raises(DataError, match=r"checkpoint has seed=7, this run has 8"):
        BatchStream(EXAMPLES, batch_size=3, seed=8).load_state_dict(state)


def test_iter_batches_in_order():
    assert list(iter_batches(EXAMPLES, 4)) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
