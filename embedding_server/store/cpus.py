"""CPU placement of a server's threads: which CPUs serve lookups and which apply packets.

An inference server that applies big packets while it serves shares its CPUs between the two.
Giving the applies CPUs of their own (``--apply-cpus``) keeps lookups off them, the way Redis
keeps its background saves off the CPUs of its event loop (``bgsave_cpulist``). Linux schedules
every thread on its own, so a thread can be placed without touching the rest of the process.

CPU lists use the ``taskset``/cpuset syntax: ``"0-3,8"`` is CPUs 0, 1, 2, 3 and 8.

Example:
    >>> parse_cpu_list("0-2,5")
    frozenset({0, 1, 2, 5})
    >>> format_cpu_list({0, 1, 2, 5})
    '0-2,5'
"""

from __future__ import annotations

import os
from collections.abc import Iterable


def placement_supported() -> bool:
    """Whether this platform can pin threads to CPUs (Linux can; macOS cannot)."""
    return hasattr(os, "sched_setaffinity")


def parse_cpu_list(text: str) -> frozenset[int]:
    """The CPUs of a ``taskset``-style list such as ``"0-3,8"``.

    Raises:
        ValueError: an empty list, a part that is not a CPU number or ``low-high`` range, or
            a range whose end is below its start.
    """
    cpus: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        low, dash, high = part.partition("-")
        try:
            first, last = int(low), int(high if dash else low)
        except ValueError:
            raise ValueError(f"CPU list {text!r}: {part!r} is not a CPU number or a range like 0-3") from None
        if first < 0 or last < first:
            raise ValueError(f"CPU list {text!r}: {part!r} is not a range of CPU numbers from low to high")
        cpus.update(range(first, last + 1))
    return frozenset(cpus)


def format_cpu_list(cpus: Iterable[int]) -> str:
    """``cpus`` in ``taskset`` syntax, consecutive CPUs as ranges (``{0, 1, 2, 5}`` -> ``"0-2,5"``)."""
    parts: list[str] = []
    run: list[int] = []
    for cpu in sorted(cpus):
        if run and cpu != run[-1] + 1:
            parts.append(_span(run))
            run = []
        run.append(cpu)
    if run:
        parts.append(_span(run))
    return ",".join(parts)


def _span(run: list[int]) -> str:
    return str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}"


def usable_cpus() -> frozenset[int]:
    """The CPUs the calling thread may run on: the process's affinity (which a container or
    ``taskset`` may narrow) unless the thread was placed on its own."""
    return frozenset(os.sched_getaffinity(0)) if placement_supported() else frozenset(range(os.cpu_count() or 1))


def pin_this_thread(cpus: Iterable[int]) -> None:
    """Run the calling thread, and the threads it starts from now on, only on ``cpus``.

    Raises:
        OSError: the platform cannot place threads, or ``cpus`` holds none this process may use.
    """
    if not placement_supported():
        raise OSError("this platform cannot pin threads to CPUs")
    os.sched_setaffinity(0, set(cpus))  # on Linux, 0 is the calling thread, not the whole process


def pin_process(cpus: Iterable[int]) -> None:
    """Run every thread this process has, and every thread started from now on, only on ``cpus``.

    Raises:
        OSError: as :func:`pin_this_thread`.
    """
    pin_this_thread(cpus)
    wanted = set(cpus)
    for name in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(name), wanted)
        except ProcessLookupError:  # the thread ended meanwhile
            pass
