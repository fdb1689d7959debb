"""trainer.pusher: background gradient pushes, their order, their failures, their bound."""

from __future__ import annotations

import threading

import pytest

from embedding_server.core.errors import ShardUnavailableError
from trainer.pusher import GradientPusher

pytestmark = pytest.mark.unit


class Recorder:
    """A push target recording the order payloads are applied in; payloads named in ``gates``
    wait for their event first (a slow shard)."""

    def __init__(self, gates: dict | None = None, fail: set | None = None):
        self.applied: list = []
        self.gates = gates or {}
        self.fail = fail or set()
        self.lock = threading.Lock()

    def __call__(self, payload) -> None:
        gate = self.gates.get(payload)
        if gate is not None:
            assert gate.wait(30), f"push {payload} was never let through"
        if payload in self.fail:
            raise ShardUnavailableError(f"embedding shard 1 unavailable while pushing {payload}")
        with self.lock:
            self.applied.append(payload)


def test_ordered_pushes_wait_for_earlier_ones_while_unordered_ones_overtake(wait_until):
    gate = threading.Event()
    target = Recorder({0: gate})
    pusher = GradientPusher(target, buffer_size=4, workers=3)
    pusher.submit(0)
    pusher.submit(1)  # unordered: overtakes the stuck push 0
    wait_until(lambda: target.applied == [1], what="push 1 applied before push 0")
    pusher.submit(2, ordered=True)  # must wait for push 0
    wait_until(lambda: pusher.stats()["waiting"] == 1, what="push 2 waiting for push 0")
    assert target.applied == [1]
    gate.set()
    pusher.close()
    assert target.applied == [1, 0, 2]
    assert pusher.stats() == {"submitted": 3, "done": 3, "failed": 0, "in_flight": 0, "waiting": 0}


def test_before_and_after_run_around_each_push_in_order():
    events: list[str] = []
    pusher = GradientPusher(lambda p: events.append(f"push {p}"), buffer_size=2, workers=2)
    for k in range(5):
        pusher.submit(
            k,
            before=lambda k=k: events.append(f"before {k}"),
            after=lambda k=k: events.append(f"after {k}"),
            ordered=True,
        )
    pusher.close()
    assert events == [f"{what} {k}" for k in range(5) for what in ("before", "push", "after")]


def test_a_failed_push_is_raised_once_with_a_note_and_its_after_still_runs():
    released: list[int] = []
    pusher = GradientPusher(Recorder(fail={1, 2}), buffer_size=4, workers=1)
    for k in range(4):
        pusher.submit(k, after=lambda k=k: released.append(k), label=f"training step {k}")
    pusher.wait()
    assert released == [0, 1, 2, 3]  # permits come back even for failed pushes
    with pytest.raises(ShardUnavailableError, match="while pushing 1") as caught:
        pusher.raise_failure()
    notes = "\n".join(caught.value.__notes__)
    assert "training step 1" in notes and "1 later gradient push(es) failed too" in notes
    pusher.raise_failure()  # reported once
    assert pusher.stats()["failed"] == 2
    pusher.close()


def test_close_waits_for_every_push_and_raises_a_failure_not_yet_raised():
    gate = threading.Event()
    target = Recorder({0: gate}, fail={2})
    pusher = GradientPusher(target, buffer_size=8, workers=2)
    for k in range(3):
        pusher.submit(k)
    opener = threading.Timer(0.05, gate.set)  # the slow push finishes while close() waits
    opener.start()
    with pytest.raises(ShardUnavailableError, match="pushing 2"):
        pusher.close()
    assert sorted(target.applied) == [0, 1]
    with pytest.raises(RuntimeError, match="closed"):
        pusher.submit(3)


def test_submit_blocks_while_the_buffer_is_full(wait_until):
    gate = threading.Event()
    pusher = GradientPusher(Recorder({0: gate}), buffer_size=1, workers=1)
    pusher.submit(0)  # taken by the worker, stuck
    wait_until(lambda: pusher._queue.empty(), what="the worker taking push 0")
    pusher.submit(1)  # fills the buffer
    returned = threading.Event()
    submitter = threading.Thread(target=lambda: (pusher.submit(2), returned.set()))
    submitter.start()
    # the third submit cannot return before the stuck push is let through
    assert not returned.wait(0.2)
    gate.set()
    assert returned.wait(30)
    submitter.join()
    pusher.close()
    assert pusher.stats()["done"] == 3


@pytest.mark.parametrize("size", [0, -1, True, 1.5])
def test_bad_sizes_are_refused(size):
    with pytest.raises(ValueError, match="backward_buffer_size"):
        GradientPusher(print, buffer_size=size)
    with pytest.raises(ValueError, match="backward_workers_size"):
        GradientPusher(print, workers=size)
