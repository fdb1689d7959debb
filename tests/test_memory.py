"""Large buffers: committing on 4 KiB pages, then moving onto huge pages while in use.

Whether memory sits on huge pages is read from the kernel itself (``/proc/self/smaps``), not
from anything this project records.
"""

from __future__ import annotations

import mmap
import threading

import numpy as np
import pytest

from embedding_server.store.memory import HUGE_PAGE, collapse, fresh_buffer, populate, use_huge_pages

pytestmark = pytest.mark.unit


def small_page_array(nbytes: int) -> np.ndarray:
    """A fresh float32 array of 16-float rows that commits on 4 KiB pages, in a memory area of
    its own. The kernel merges adjacent areas with equal settings, and smaps reports huge pages
    per area, so a neighbour on huge pages would count as this array's: the array is the middle
    of a mapping whose first and last huge page (never touched) carry ``MADV_DONTFORK``, a
    setting the middle lacks, which keeps the middle an area by itself."""
    buffer = fresh_buffer(nbytes + 2 * HUGE_PAGE)
    buffer.madvise(mmap.MADV_DONTFORK, 0, HUGE_PAGE)
    buffer.madvise(mmap.MADV_DONTFORK, HUGE_PAGE + nbytes, HUGE_PAGE)
    array = np.frombuffer(buffer, np.float32, count=nbytes // 4, offset=HUGE_PAGE).reshape(-1, 16)
    use_huge_pages(array, False)
    return array


def test_collapse_moves_rows_written_on_small_pages_onto_huge_pages_keeping_their_values(huge_page_bytes):
    array = small_page_array(8 * HUGE_PAGE)
    rows = array.shape[0] // 2  # half of it used: 4 huge pages' worth
    pattern = np.arange(rows * 16, dtype=np.float32).reshape(rows, 16)
    array[:rows] = pattern
    assert huge_page_bytes(array) == 0
    assert collapse(array, 0, rows)
    assert huge_page_bytes(array) >= 4 * HUGE_PAGE
    assert array[:rows].tobytes() == pattern.tobytes()
    assert not array[rows:].any()


def test_collapse_keeps_values_a_writer_changes_meanwhile(huge_page_bytes):
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


def test_collapse_told_to_stop_returns_false_and_moves_nothing(huge_page_bytes):
    array = small_page_array(4 * HUGE_PAGE)
    array[:] = 1.0
    assert not collapse(array, 0, array.shape[0], stopped=lambda: True)
    assert huge_page_bytes(array) == 0


def test_small_page_requests_leave_buffers_under_one_huge_page_alone():
    array = small_page_array(HUGE_PAGE // 2)  # no error, nothing to move
    array[:] = 2.0
    assert collapse(array, 0, array.shape[0])
    assert (array == 2.0).all()
