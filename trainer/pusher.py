"""Gradient pushes in background threads: PERSIA's asynchronous backward.

:meth:`trainer.ctx.TrainCtx.backward` computes a batch's embedding gradients and hands their
push to a :class:`GradientPusher`, then steps the dense optimizer while the push travels to the
shards. A push queues behind at most ``buffer_size`` others (PERSIA's ``backward_buffer_size``;
``backward`` waits when the queue is full) and ``workers`` threads send them (PERSIA's
``backward_workers_size``). After each push, applied or failed, its ``after`` callback runs: the
batch's staleness permit is given back there (:mod:`trainer.lookahead`), so a lookup waiting for
that permit starts only once the gradients it must see are on the servers.

Ordered pushes (``ordered=True``, what ``reproducible`` lookaheads ask for) start only when every
push submitted before them has finished, so the shards apply gradients in batch order. A push
that fails is kept: :meth:`GradientPusher.raise_failure` raises it (once) on the training loop's
thread, which the training context calls in its next ``forward``, ``backward`` and on exit.

Example:
    >>> pusher = GradientPusher(client.push_gradients, buffer_size=10, workers=8)  # doctest: +SKIP
    >>> pusher.submit(lookup_result, after=prefetched.release)  # doctest: +SKIP
    >>> pusher.close()  # waits for every push; raises the first failure  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class _Job:
    seq: int
    payload: Any
    before: Callable[[], None] | None
    after: Callable[[], None] | None
    ordered: bool
    label: str


class GradientPusher:
    """Runs gradient pushes in background threads (see the module docstring).

    Args:
        push: applies one payload on the servers (``EmbeddingClient.push_gradients``).
        buffer_size: pushes waiting for a worker before :meth:`submit` blocks (>= 1).
        workers: threads running pushes (>= 1).

    Raises:
        ValueError: a size below 1.

    Example:
        >>> pusher = GradientPusher(lambda payload: None, buffer_size=2, workers=1)
        >>> pusher.submit("gradients of batch 0")
        >>> pusher.close()
        >>> pusher.stats()["done"]
        1
    """

    def __init__(self, push: Callable[[Any], None], buffer_size: int = 10, workers: int = 8):
        for name, value in (("backward_buffer_size", buffer_size), ("backward_workers_size", workers)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self._push = push
        self.buffer_size = buffer_size
        self.workers = workers
        self._queue: queue.Queue[_Job | None] = queue.Queue(buffer_size)
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        #: :meth:`close` was called: no more pushes are taken
        self.closed = False
        #: sequence numbers of finished pushes above the lowest unfinished one
        self._finished: set[int] = set()
        self._first_unfinished = 0
        self._failure: BaseException | None = None
        self._failures_after = 0  # later failures while ``_failure`` waits to be raised
        self.submitted = 0
        self.done = 0
        self.failed = 0
        self.waiting = 0

    def stats(self) -> dict[str, int]:
        """Counters: pushes ``submitted``, ``done`` (applied or failed), ``failed``,
        ``in_flight`` (submitted, not done) and ``waiting`` (ordered pushes a worker holds until
        the earlier ones finish)."""
        with self._cond:
            return {
                "submitted": self.submitted,
                "done": self.done,
                "failed": self.failed,
                "in_flight": self.submitted - self.done,
                "waiting": self.waiting,
            }

    def submit(
        self,
        payload: Any,
        before: Callable[[], None] | None = None,
        after: Callable[[], None] | None = None,
        ordered: bool = False,
        label: str = "",
    ) -> None:
        """Queue the push of ``payload``; blocks while ``buffer_size`` pushes wait for a worker.

        Args:
            payload: what ``push`` takes.
            before: runs on the worker right before the push (after the ordering wait).
            after: runs on the worker when the push has finished, applied or failed.
            ordered: start only once every push submitted earlier has finished.
            label: names the push in a failure's note (e.g. the training step).

        Raises:
            RuntimeError: the pusher is closed.
        """
        with self._cond:
            if self.closed:
                raise RuntimeError("the gradient pusher is closed")
            seq = self.submitted
            self.submitted += 1
        if len(self._threads) < self.workers and self.submitted > len(self._threads):
            self._start_worker()
        self._queue.put(_Job(seq, payload, before, after, ordered, label))

    def _start_worker(self) -> None:
        thread = threading.Thread(target=self._work, name=f"gradient-push-{len(self._threads)}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def wait(self) -> None:
        """Wait until every submitted push has finished (applied or failed); raises nothing."""
        with self._cond:
            while self.done < self.submitted:
                self._cond.wait()

    def raise_failure(self) -> None:
        """Raise the first push failure not raised yet (with a note naming the push and how
        many later pushes failed too); nothing when there is none."""
        with self._cond:
            failure, self._failure = self._failure, None
            later, self._failures_after = self._failures_after, 0
        if failure is not None:
            if later:
                _add_note(failure, f"{later} later gradient push(es) failed too")
            raise failure

    def close(self) -> None:
        """Wait for every push, stop the workers, then :meth:`raise_failure`."""
        self.wait()
        with self._cond:
            self.closed = True
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()
        self._threads = []
        self.raise_failure()

    # ------------------------------------------------------------------ workers

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                if job.ordered:
                    with self._cond:
                        self.waiting += 1
                        while self._first_unfinished < job.seq:
                            self._cond.wait()
                        self.waiting -= 1
                if job.before is not None:
                    job.before()
                self._push(job.payload)
            except BaseException as exc:  # raised on the training loop's thread by raise_failure
                self._record_failure(job, exc)
            finally:
                try:
                    if job.after is not None:
                        job.after()
                finally:
                    self._finish(job.seq)

    def _record_failure(self, job: _Job, exc: BaseException) -> None:
        log.error("gradient push %s failed: %s", job.label or job.seq, exc)
        with self._cond:
            self.failed += 1
            if self._failure is None:
                _add_note(exc, f"raised by the background gradient push of {job.label or f'push {job.seq}'}")
                self._failure = exc
            else:
                self._failures_after += 1

    def _finish(self, seq: int) -> None:
        with self._cond:
            self.done += 1
            self._finished.add(seq)
            while self._first_unfinished in self._finished:
                self._finished.discard(self._first_unfinished)
                self._first_unfinished += 1
            self._cond.notify_all()


def _add_note(exc: BaseException, note: str) -> None:
    """Attach ``note`` to ``exc`` (shown with its traceback; Python 3.11+, where notes exist)."""
    add_note = getattr(exc, "add_note", None)
    if add_note is not None:
        add_note(note)
