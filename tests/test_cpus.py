"""CPU lists and thread placement (embedding_server.store.cpus), on this machine's real CPUs."""

from __future__ import annotations

import os
import threading

import pytest

from embedding_server.store.cpus import format_cpu_list, parse_cpu_list, pin_process, pin_this_thread, usable_cpus

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "text, cpus", [("0", {0}), ("0-3,8", {0, 1, 2, 3, 8}), (" 2 , 0-1 ", {0, 1, 2}), ("5,5-6", {5, 6})]
)
def test_cpu_lists_parse_like_taskset(text, cpus):
    assert parse_cpu_list(text) == frozenset(cpus)


@pytest.mark.parametrize("text", ["", "a", "1-", "3-1", "-1", "0,,1", "1.5"])
def test_a_malformed_cpu_list_is_refused_with_the_part_that_is_wrong(text):
    with pytest.raises(ValueError, match=f"CPU list {text!r}"):
        parse_cpu_list(text)


@pytest.mark.parametrize("cpus, text", [({0, 1, 2, 5}, "0-2,5"), ({7}, "7"), ({1, 3, 4}, "1,3-4"), (set(), "")])
def test_cpu_lists_format_with_ranges_and_read_back(cpus, text):
    assert format_cpu_list(cpus) == text
    if cpus:
        assert parse_cpu_list(text) == frozenset(cpus)


def run_in_thread(fn) -> tuple[int, set[int]]:
    """Run ``fn`` in a new thread; returns its native id and its CPUs while it is still alive."""
    ready, leave = threading.Event(), threading.Event()
    tid = []

    def body() -> None:
        fn()
        tid.append(threading.get_native_id())
        ready.set()
        leave.wait()

    thread = threading.Thread(target=body)
    thread.start()
    ready.wait(10)
    try:
        return tid[0], os.sched_getaffinity(tid[0])
    finally:
        leave.set()
        thread.join()


def test_pinning_a_thread_moves_only_that_thread():
    before = usable_cpus()
    one = {max(before)}
    _, placed = run_in_thread(lambda: pin_this_thread(one))
    assert placed == one
    assert usable_cpus() == before  # the caller keeps its CPUs


def test_pinning_the_process_moves_its_running_threads_and_those_started_later():
    before = usable_cpus()
    one = {min(before)}
    started = threading.Event()
    leave = threading.Event()
    running = threading.Thread(target=lambda: (started.set(), leave.wait()))
    running.start()
    started.wait(10)
    try:
        pin_process(one)
        assert os.sched_getaffinity(running.native_id) == one
        assert run_in_thread(lambda: None)[1] == one
    finally:
        pin_process(before)
        leave.set()
        running.join()
    assert usable_cpus() == before


def test_pinning_to_no_usable_cpu_is_an_os_error():
    with pytest.raises(OSError):
        pin_this_thread({os.cpu_count() + 64})
