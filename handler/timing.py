"""The handler's own timing metrics, handed to TorchServe's metrics cache.

(A module of its own: TorchServe refuses a handler module that defines more than one class.)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


class TimingMetrics:
    """The handler's own timings (EmbeddingLookupTime, DenseInferenceTime, ms), handed to
    TorchServe's metrics as their mean over each ``interval_s`` seconds (0: every value).

    Each metric TorchServe records is a line the worker writes to the frontend, which parses
    it into a Prometheus gauge: a cost paid inside every request (the write wakes the
    frontend, which then competes for a core with the lookup). A gauge scraped every few
    seconds shows the last value it was given, so one mean per second tells more than the last
    request's time, at a fraction of the cost.

    Args:
        interval_s: seconds over which values are averaged before they are recorded.
        clock: seconds, monotonic (tests pass their own).
    """

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic):
        self.interval_s = interval_s
        self.clock = clock
        self._sums: dict[str, list[float]] = {}  # name -> [sum of ms, count]
        self._due = 0.0  # clock() at which the next means are recorded

    def record(self, name: str, ms: float, metrics: Any) -> None:
        """Add one value; when the interval is over, record every metric's mean in ``metrics``
        (TorchServe's metrics cache: ``add_time(name, value, idx, unit)``)."""
        acc = self._sums.setdefault(name, [0.0, 0])
        acc[0] += ms
        acc[1] += 1
        now = self.clock()
        if now < self._due:
            return
        self._due = now + self.interval_s
        for key, (total, count) in self._sums.items():
            metrics.add_time(key, round(total / count, 3), None, "ms")
        self._sums.clear()
