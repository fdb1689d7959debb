"""Helpers shared by the timing benchmarks: the argument parser made from a benchmark's
docstring, the other-load meter, interleaved timing against a same-run baseline, and reporting
(see README.md for the conventions they implement)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def doc_parser(doc: str) -> argparse.ArgumentParser:
    """A benchmark's argument parser: the first paragraph of its docstring ``doc`` describes it,
    the rest follows the options as written."""
    description, epilog = doc.split("\n\n", 1)
    return argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog
    )


class OtherLoad:
    """CPU time that other processes used while this benchmark ran, as a share of the machine
    (0 = a quiet machine; timings taken beside other work are noisier and slower)."""

    def __init__(self) -> None:
        self.start = (self._machine_busy(), self._own(), time.monotonic())

    @staticmethod
    def _machine_busy() -> float:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal
        return busy / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system  # children: reaped servers

    def share(self) -> float:
        busy0, own0, t0 = self.start
        other = (self._machine_busy() - busy0) - (self._own() - own0)
        return max(0.0, other) / ((time.monotonic() - t0) * (os.cpu_count() or 1))


def measure(
    fn: Callable[[T], object],
    items: Sequence[T],
    warmup: int,
    baseline: Callable[[int], object],
    samples: list[float],
) -> tuple[float, float]:
    """Median seconds of fn(item) over ``items`` and of baseline(k) runs interleaved with them
    (alternating which goes first), after ``warmup`` untimed rounds of both. Every baseline time
    is also appended to ``samples`` (the run's overall baseline figure)."""
    for i in range(warmup):
        fn(items[i % len(items)])
        baseline(i)
    path_t: list[float] = []
    base_t: list[float] = []
    for k, item in enumerate(items):
        for first in (True, False) if k % 2 else (False, True):
            t0 = time.perf_counter()
            baseline(k) if first else fn(item)
            (base_t if first else path_t).append(time.perf_counter() - t0)
    samples += base_t
    return statistics.median(path_t), statistics.median(base_t)


def report(
    results: dict, key: str, name: str, times: tuple[float, float], count: int, unit: str, per: str, baseline_name: str
) -> None:
    """Store ``<key>_<unit>_per_s`` and ``<key>_ratio`` in ``results`` and print them."""
    path_s, base_s = times
    rate, base_rate = count / path_s, count / base_s
    results[f"{key}_{unit}_per_s"] = rate
    results[f"{key}_ratio"] = rate / base_rate
    print(
        f"  {name:<50} {path_s * 1e3:8.2f} ms/{per} {rate / 1e6:7.2f} M {unit}/s = {rate / base_rate:.3f}x {baseline_name} "
        f"(beside it: {base_s * 1e3:.2f} ms, {base_rate / 1e6:.2f} M {unit}/s)",
        flush=True,
    )


def rounded(results: dict) -> dict:
    """Figures for the JSON line: ratios to 4 decimals, rates to whole numbers."""
    return {
        k: (round(v, 4) if isinstance(v, float) and v < 1e3 else (round(v) if isinstance(v, float) else v))
        for k, v in results.items()
    }


def print_summary(summary: dict, caught: Sequence[warnings.WarningMessage]) -> None:
    """Print the library warnings caught while measuring, then the JSON line (always last, so
    ``| tail -n 1`` finds it even with stderr and stdout merged)."""
    for w in caught:
        print(
            f"library warning: {w.category.__name__} at {Path(w.filename).name}:{w.lineno}: {str(w.message).splitlines()[0]}"
        )
    summary["library_warnings"] = len(caught)
    print(json.dumps(summary))
