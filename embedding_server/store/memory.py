"""Large buffers on fresh anonymous memory with transparent huge pages asked for.

A fresh buffer on 2 MiB pages takes far fewer page faults than on 4 KiB pages, and random row
access across a big table misses the TLB far less often. Linux serves ``MADV_HUGEPAGE`` regions
with huge pages when its setting is ``madvise`` (the default of most distributions) or
``always``; elsewhere these are plain zeroed pages.

Committing memory with huge pages is not always the cheap way, though: memory the machine has
not touched lately can commit several times slower on huge pages than on 4 KiB pages (the
kernel must find and zero whole 2 MiB pages; ``benchmarks/README.md`` has the rates). A store
filled at start-up therefore commits on 4 KiB pages (:func:`use_huge_pages` off) and moves its
rows onto huge pages afterwards, in the background (:func:`collapse`).
"""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Callable
from errno import EINVAL, ENOSYS

import numpy as np

HUGE_PAGE = 2 << 20
# Linux 5.14+: fault a range in (writable) in one call; not in Python's mmap module before 3.13.
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
# Linux 6.1+: put the pages of a range on huge pages now (khugepaged's work, done synchronously).
_MADV_COLLAPSE = getattr(mmap, "MADV_COLLAPSE", 25)
_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", 14)
_MADV_NOHUGEPAGE = getattr(mmap, "MADV_NOHUGEPAGE", 15)


def fresh_buffer(nbytes: int) -> mmap.mmap:
    """A zeroed, page-aligned, writable buffer of at least ``nbytes`` (at least 1) that commits
    memory only as pages are touched, with huge pages asked for when it spans at least one.
    Such a buffer is a whole number of huge pages long: Linux 6.7+ then starts it on a huge-page
    boundary, so every part of it can be a huge page, the first and last included (the tail past
    ``nbytes`` costs nothing unless touched)."""
    if nbytes >= HUGE_PAGE:
        nbytes = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
    buffer = mmap.mmap(-1, max(1, nbytes), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if nbytes >= HUGE_PAGE and hasattr(mmap, "MADV_HUGEPAGE"):
        buffer.madvise(mmap.MADV_HUGEPAGE)
    return buffer


def populate(array: np.ndarray, start: int, end: int) -> None:
    """Commit the memory of ``array[start:end]`` (first-axis rows) now, in one call, without
    changing its contents: safe while other threads use the array, and the GIL is released
    meanwhile (the call goes through ctypes). On this development VM that is several times
    cheaper than taking the same page faults one by one while writing rows. Does nothing where
    unsupported (not Linux 5.14+).
    """
    if end <= start or _madvise is None:
        return
    row_bytes = array.strides[0]
    first = array.ctypes.data + start * row_bytes
    begin = first - first % mmap.PAGESIZE
    length = array.ctypes.data + min(end, array.shape[0]) * row_bytes - begin
    if length > 0:
        _madvise(begin, length, _MADV_POPULATE_WRITE)  # -1 (EINVAL) on older kernels: rows fault in as written


def use_huge_pages(array: np.ndarray, on: bool) -> None:
    """Ask for huge pages (``on``) or 4 KiB pages for the memory ``array`` commits from now on
    (pages already committed stay as they are). ``array`` must start its own buffer (see
    :func:`fresh_buffer`); arrays smaller than a huge page are left alone."""
    if array.nbytes < HUGE_PAGE or _madvise is None:
        return
    _madvise(array.ctypes.data, _buffer_bytes(array.nbytes), _MADV_HUGEPAGE if on else _MADV_NOHUGEPAGE)


def collapse(
    array: np.ndarray, start: int, end: int, chunk_bytes: int = 16 << 20, stopped: Callable[[], bool] = lambda: False
) -> bool:
    """Move the committed memory of ``array[start:end]`` (first-axis rows, widened to whole huge
    pages) onto huge pages now, ``chunk_bytes`` per call, checking ``stopped`` between calls.
    Safe while other threads use the array (the kernel copies each 2 MiB under its page-table
    lock; a thread touching that 2 MiB meanwhile waits for the copy); the GIL is released
    during each call. Turns huge pages on for the array first (:func:`use_huge_pages`), also
    when the range is empty.

    Returns:
        False when ``stopped`` ended it early; True otherwise, also where the kernel cannot
        collapse on request (before Linux 6.1): there khugepaged does it in its own time.
    """
    if array.nbytes < HUGE_PAGE or _madvise is None:
        return True
    use_huge_pages(array, True)
    if end <= start:
        return True
    base = array.ctypes.data
    row_bytes = array.strides[0]
    # The huge pages the rows touch, in chunks that start on huge-page boundaries (the kernel
    # collapses only the whole huge pages inside the range it is given), clipped to the buffer.
    first = (base + start * row_bytes) // HUGE_PAGE * HUGE_PAGE
    stop = min(
        base + _buffer_bytes(array.nbytes), -(-(base + min(end, array.shape[0]) * row_bytes) // HUGE_PAGE) * HUGE_PAGE
    )
    for address in range(first, stop, chunk_bytes):
        if stopped():
            return False
        low = max(address, base)
        if _madvise(low, min(address + chunk_bytes, stop) - low, _MADV_COLLAPSE) != 0:
            errno = ctypes.get_errno()
            if errno in (EINVAL, ENOSYS):  # no MADV_COLLAPSE here
                return True
            # EAGAIN/ENOMEM: no free huge page right now; that chunk stays on 4 KiB pages.
    return True


def _buffer_bytes(nbytes: int) -> int:
    """The length of the :func:`fresh_buffer` that holds an array of ``nbytes`` >= one huge page."""
    return -(-nbytes // HUGE_PAGE) * HUGE_PAGE


def _libc_madvise():
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):  # not a POSIX libc
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_madvise = _libc_madvise()
