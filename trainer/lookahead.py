"""Embedding lookups started ahead of the training step: PERSIA's ``embedding_staleness``.

A :class:`Lookahead` takes a stream of batches and yields them as :class:`PrefetchedBatch`
objects whose lookups run in background threads while the model trains on earlier batches.
Training batches take one of ``staleness`` permits when their lookup starts and give it back
when their gradients have been applied on the servers (:meth:`PrefetchedBatch.release`, called
after the push :meth:`trainer.ctx.TrainCtx.backward` queued, see :mod:`trainer.pusher`; a batch
whose push was not queued when the loop asks for the next batch gives it back then, as no
gradients will come for it), so at most ``staleness`` batches are looked up whose gradients are
not applied yet: ``staleness=1`` is synchronous training (the next lookup waits for the previous
push), ``staleness=N`` lets the lookups of the next N-1 batches and the pushes of earlier ones
overlap the current step, the lookups reading rows without the gradients of up to N-1 earlier
batches. ``None`` bounds the lookahead by ``buffer_size`` only. Batches that do not train
(``requires_grad`` false: evaluation) take no permit.

``reproducible=True`` makes the order of lookups and gradient pushes a function of the stream
alone: one thread looks batches up in order, the pushes are applied in batch order, and the push
of training batch ``k`` waits until the lookup of batch ``k + staleness - 1`` is done (or the
stream has ended), so lookup ``j`` always sees exactly the gradients of training batches
``0 .. j - staleness``.

Example:
    >>> engine = ctx.lookahead(staleness=4, buffer_size=10)  # doctest: +SKIP
    >>> for batch in engine.iterate(batches):  # doctest: +SKIP
    ...     output, target = ctx.forward(batch)
    ...     ctx.backward(loss_fn(output, target))
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

log = logging.getLogger(__name__)

#: how often blocked background threads look whether the lookahead was closed
_POLL_S = 0.1


class _End:
    """The ready queue's last item: the source ended (``error`` None) or raised ``error``."""

    def __init__(self, error: BaseException | None = None):
        self.error = error


class PrefetchedBatch:
    """A batch whose embedding lookup was started ahead of the step that trains on it.

    :meth:`trainer.ctx.TrainCtx.forward` (and ``predict``) take it in place of the batch and use
    its lookup; any other attribute reads through to :attr:`batch`.

    Args:
        batch: the batch itself.
        index: its position in the stream.
        requires_grad: whether the lookup collects gradients (a training batch).
        insert: whether unseen ids were inserted by the lookup.
        engine: the :class:`Lookahead` that looks it up (permits, ordering).

    Example:
        >>> prefetched = next(engine.iterate([batch]))  # doctest: +SKIP
        >>> prefetched.batch is batch  # doctest: +SKIP
        True
    """

    def __init__(self, batch: Any, index: int, requires_grad: bool, insert: bool, engine: Lookahead):
        self.batch = batch
        self.index = index
        self.requires_grad = requires_grad
        self.insert = insert
        #: position among the stream's training batches (-1: not a training batch)
        self.train_index = -1
        self._engine = engine
        self._holds_permit = False
        #: its gradient push is queued: the pusher gives the permit back, not the loop
        self._push_queued = False
        self._done = threading.Event()
        self._value: Any = None
        self._error: BaseException | None = None

    def __getattr__(self, name: str) -> Any:
        # Only called for names this object lacks: the batch's own parts (targets, dense, ...).
        if name.startswith("__") or name == "batch":
            raise AttributeError(name)
        return getattr(self.batch, name)

    @property
    def reproducible(self) -> bool:
        """Whether its lookahead orders lookups and pushes (its push must be applied in order)."""
        return self._engine.reproducible

    def push_queued(self) -> None:
        """Its gradient push was handed to background threads, which :meth:`release` its permit
        once the push is applied; asking for the next batch no longer gives it back."""
        self._push_queued = True

    def matches(self, requires_grad: bool, insert: bool) -> bool:
        """Whether the prefetched lookup is the one a step with these settings needs."""
        return self.requires_grad == requires_grad and self.insert == insert

    def result(self) -> Any:
        """The lookup's result, waiting for it to finish.

        Raises:
            Exception: whatever the lookup raised (a malformed batch, an unreachable shard).
        """
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value

    def before_push(self) -> None:
        """Called right before this batch's gradients are pushed (see ``reproducible``)."""
        self._engine._before_push(self)

    def release(self) -> None:
        """Give back this batch's permit: its gradients are pushed, or never will be."""
        self._engine._release(self)


class Lookahead:
    """Runs the lookups of upcoming batches ahead of training (see the module docstring).

    Args:
        lookup: ``lookup(batch, requires_grad, insert)``, what a step needs from the embedding
            servers (:meth:`trainer.ctx.TrainCtx.prepare`'s work); run in background threads.
        requires_grad: whether a batch trains (decides ``requires_grad`` and ``insert``).
        staleness: at most this many training batches looked up whose gradients are not pushed
            yet (>= 1); ``None``: ``buffer_size``.
        buffer_size: looked-up batches waiting for the training loop (PERSIA's
            ``forward_buffer_size``).
        num_workers: threads running lookups (one with ``reproducible``).
        reproducible: lookups in stream order, each seeing the same gradients every run.

    Raises:
        ValueError: a size below 1.

    Example:
        >>> engine = Lookahead(ctx.prepare, lambda b: True, staleness=2)  # doctest: +SKIP
        >>> [b.index for b in engine.iterate(batches)]  # doctest: +SKIP
        [0, 1, 2]
    """

    def __init__(
        self,
        lookup: Callable[[Any, bool, bool], Any],
        requires_grad: Callable[[Any], bool],
        staleness: int | None = None,
        buffer_size: int = 10,
        num_workers: int = 1,
        reproducible: bool = False,
    ):
        for name, value in (("buffer_size", buffer_size), ("num_workers", num_workers)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if staleness is not None and (not isinstance(staleness, int) or staleness < 1):
            raise ValueError(f"embedding_staleness must be None or an integer >= 1, got {staleness!r}")
        self._lookup = lookup
        self._requires_grad = requires_grad
        self.staleness = staleness
        #: training batches that may be looked up with their gradients not yet pushed
        self.permits = staleness if staleness is not None else buffer_size
        self.buffer_size = buffer_size
        self.num_workers = 1 if reproducible else num_workers
        self.reproducible = reproducible
        self._cond = threading.Condition()
        self._ready: queue.Queue[PrefetchedBatch | _End] = queue.Queue(buffer_size)
        self._stop = threading.Event()
        self._feeder: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._source_done = False
        self._feeder_blocked = False
        #: counters (read them with :meth:`stats`)
        self.started = 0
        self.completed = 0
        self.train_started = 0
        self.train_completed = 0
        self.released = 0
        self.outstanding = 0
        self.max_outstanding = 0

    def stats(self) -> dict[str, int]:
        """Counters: lookups ``started``/``completed`` (all batches), training lookups
        ``train_started``/``train_completed``, permits ``released``, ``outstanding`` (training
        batches looked up, or being looked up, whose gradients are not pushed) and its maximum."""
        with self._cond:
            return {
                "started": self.started,
                "completed": self.completed,
                "train_started": self.train_started,
                "train_completed": self.train_completed,
                "released": self.released,
                "outstanding": self.outstanding,
                "max_outstanding": self.max_outstanding,
            }

    # ------------------------------------------------------------------ the training loop's side

    def iterate(self, source: Iterable[Any]) -> Iterator[PrefetchedBatch]:
        """Yield ``source``'s batches in order, each with its lookup started ahead.

        Leaving the loop early (``break``) stops the background threads.

        Raises:
            RuntimeError: the lookahead is already iterating.
            Exception: whatever iterating ``source`` raised, once the batches before it are yielded.
        """
        if self._feeder is not None:
            raise RuntimeError("a Lookahead iterates one source once; make a new one")
        if self.num_workers > 1:
            self._pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="lookahead")
        self._feeder = threading.Thread(target=self._feed, args=(iter(source),), name="lookahead-feed", daemon=True)
        self._feeder.start()
        previous: PrefetchedBatch | None = None
        try:
            while True:
                if previous is not None and not previous._push_queued:
                    # The loop asks for the next batch: the last one's backward() has run if it
                    # ever will (evaluation steps have none), so its permit must not block.
                    self._release(previous)
                item = self._ready.get()
                if isinstance(item, _End):
                    if item.error is not None:
                        raise item.error
                    return
                previous = item
                yield item
        finally:
            self.close()

    def close(self) -> None:
        """Stop the background threads (lookups in flight finish; nothing new starts)."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        while True:  # unblock a feeder waiting to put
            try:
                self._ready.get_nowait()
            except queue.Empty:
                break
        feeder = self._feeder
        if feeder is not None and feeder is not threading.current_thread():
            feeder.join(timeout=5 * _POLL_S + 1.0)
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    # ------------------------------------------------------------------ background

    def _feed(self, batches: Iterator[Any]) -> None:
        index = 0
        try:
            for batch in batches:
                if self._stop.is_set():
                    return
                requires_grad = bool(self._requires_grad(batch))
                prefetched = PrefetchedBatch(batch, index, requires_grad, requires_grad, self)
                index += 1
                if requires_grad and not self._take_permit(prefetched):
                    return
                with self._cond:
                    self.started += 1
                if self._pool is None:
                    self._run(prefetched)
                else:
                    self._pool.submit(self._run, prefetched)
                if not self._put(prefetched):
                    return
            self._finish(_End())
        except BaseException as exc:  # the training loop raises it after the batches before it
            self._finish(_End(exc))

    def _finish(self, end: _End) -> None:
        with self._cond:
            self._source_done = True
            self._cond.notify_all()
        self._put(end)

    def _take_permit(self, prefetched: PrefetchedBatch) -> bool:
        with self._cond:
            while self.outstanding >= self.permits:
                if self._stop.is_set():
                    return False
                self._cond.wait(_POLL_S)
            self.outstanding += 1
            self.max_outstanding = max(self.max_outstanding, self.outstanding)
            prefetched.train_index = self.train_started
            prefetched._holds_permit = True
            self.train_started += 1
            return True

    def _put(self, item: PrefetchedBatch | _End) -> bool:
        while not self._stop.is_set():
            try:
                self._ready.put(item, timeout=_POLL_S)
            except queue.Full:
                with self._cond:
                    if not self._feeder_blocked:
                        self._feeder_blocked = True
                        self._cond.notify_all()
                continue
            with self._cond:
                self._feeder_blocked = False
            return True
        return False

    def _run(self, prefetched: PrefetchedBatch) -> None:
        try:
            prefetched._value = self._lookup(prefetched.batch, prefetched.requires_grad, prefetched.insert)
        except BaseException as exc:
            prefetched._error = exc
            self._release(prefetched)  # no gradients will come for it
        finally:
            with self._cond:
                self.completed += 1
                if prefetched.requires_grad:
                    self.train_completed += 1
                self._cond.notify_all()
            prefetched._done.set()

    def _release(self, prefetched: PrefetchedBatch) -> None:
        with self._cond:
            if not prefetched._holds_permit:
                return
            prefetched._holds_permit = False
            self.outstanding -= 1
            self.released += 1
            self._cond.notify_all()

    def _before_push(self, prefetched: PrefetchedBatch) -> None:
        if not self.reproducible or not prefetched._holds_permit:
            return
        # The lookups that may run before this push are exactly those of training batches up
        # to train_index + permits - 1: wait for all of them, unless the stream ends sooner or
        # the feeder waits for the training loop to take batches (then no lookup can start).
        target = prefetched.train_index + self.permits
        with self._cond:
            while not (
                self.train_completed >= target
                or self._source_done
                or self._stop.is_set()
                or (self._feeder_blocked and self.completed == self.started)
            ):
                self._cond.wait(_POLL_S)
