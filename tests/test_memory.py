"""Large buffers: committing on 4 KiB pages, then moving onto huge pages while in use.

Whether memory sits on huge pages is read from the kernel itself (``/proc/self/smaps``), not
from anything this project records.
"""

from __future__ import annotations

import platform
import threading
from pathlib import Path

import numpy as np
import pytest

from embedding_server.store.memory import HUGE_PAGE, collapse, fresh_buffer, populate, use_huge_pages

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def collapse_supported() -> bool:
    """Linux 6.1+ (MADV_COLLAPSE) with transparent huge pages not turned off."""
    if platform.system() != "Linux" or not THP.exists() or "[never]" in THP.read_text():
        return False
    major, minor = (int(part) for part in platform.release().split(".")[:2])
    return (major, minor) >= (6, 1)


requires_collapse = pytest.mark.skipif(not collapse_supported(), reason="needs Linux 6.1+ with transparent huge pages")


def huge_page_bytes(array: np.ndarray) -> int:
    """Bytes on huge pages of the kernel's memory area that holds ``array``'s first byte (areas
    with the same settings may be merged, so this can include a neighbour's: never less)."""
    address = array.ctypes.data
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no memory area holds address {address:#x}")


def small_page_array(nbytes: int) -> np.ndarray:
    """A fresh float32 array of 16-float rows that commits on 4 KiB pages."""
    array = np.frombuffer(fresh_buffer(nbytes), np.float32).reshape(-1, 16)
    use_huge_pages(array, False)
    return array


@requires_collapse
def test_collapse_moves_rows_written_on_small_pages_onto_huge_pages_keeping_their_values():
    array = small_page_array(8 * HUGE_PAGE)
    rows = array.shape[0] // 2  # half of it used: 4 huge pages' worth
    pattern = np.arange(rows * 16, dtype=np.float32).reshape(rows, 16)
    array[:rows] = pattern
    assert huge_page_bytes(array) == 0
    assert collapse(array, 0, rows)
    assert huge_page_bytes(array) >= 4 * HUGE_PAGE
    assert array[:rows].tobytes() == pattern.tobytes()
    assert not array[rows:].any()


@requires_collapse
def test_collapse_keeps_values_a_writer_changes_meanwhile():
    array = small_page_array(16 * HUGE_PAGE)
    rows = array.shape[0]
    populate(array, 0, rows)
    done = threading.Event()
    passes = 0

    def writer() -> None:  # rewrites every row, pass after pass, until the pages have moved
        nonlocal passes
        while True:
            passes += 1
            array[:, 0] = passes  # the last pass straddles the end of the move, or follows it
            if done.is_set():
                return

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert collapse(array, 0, rows, chunk_bytes=HUGE_PAGE)
    finally:
        done.set()
        thread.join()
    assert (array[:, 0] == passes).all()  # no write was lost in the copy
    assert huge_page_bytes(array) >= 16 * HUGE_PAGE


@requires_collapse
def test_collapse_told_to_stop_returns_false_and_moves_nothing():
    array = small_page_array(4 * HUGE_PAGE)
    array[:] = 1.0
    assert not collapse(array, 0, array.shape[0], stopped=lambda: True)
    assert huge_page_bytes(array) == 0


def test_small_page_requests_leave_buffers_under_one_huge_page_alone():
    array = small_page_array(HUGE_PAGE // 2)  # no error, nothing to move
    array[:] = 2.0
    assert collapse(array, 0, array.shape[0])
    assert (array == 2.0).all()
