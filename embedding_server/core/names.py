"""Names read from storage listings: exact ASCII patterns, and one WARNING per odd name.

A model root's listings hold whatever anyone put there. ``str.isdigit()`` and ``int()`` accept
digits of every script (``"²"``, ``"٣"``, full-width ``"０"``), so a name parsed with them can
crash a reader (``int("²")`` raises) or read as another name (``int("０7") == 7``). Every reader of
a listing therefore accepts only the exact ASCII names the writers make (the patterns live with
their writers: :mod:`embedding_server.modelroot.packets` for packets, shard folders and
checkpoints, :mod:`embedding_server.core.model_spec` for dense versions) and ignores anything
else, saying so once per name and reader (:func:`warn_odd_name`), not on every pass.

Example:
    >>> SEQ = ascii_pattern(r"[0-9]{20}\\.arrow")
    >>> bool(SEQ.fullmatch("0000000000000000000².arrow"))
    False
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")

#: Odd names remembered (per reader) so that each is reported once; beyond this many, further
#: odd names are ignored without a line each (one line says so).
MAX_REMEMBERED = 10_000

_lock = threading.Lock()
_reported: set[tuple[str, str]] = set()
_overflowed: set[str] = set()


def ascii_pattern(regex: str) -> re.Pattern[str]:
    """``regex`` compiled for ASCII-only matching; use it with ``fullmatch``."""
    return re.compile(regex, re.ASCII)


def entry_url(root_url: str, folder: str, name: str) -> str:
    """The URL of listing entry ``name`` of ``folder`` under a storage root, for messages only:
    plain concatenation, which never fails whatever the name (``..``, ``/``, empty)."""
    return "/".join(part for part in (root_url.rstrip("/"), folder.strip("/")) if part) + "/" + name


def warn_odd_name(logger: logging.Logger, url: str, expected: str) -> None:
    """Log once per ``logger`` and ``url`` that the listing entry at ``url`` is ignored, not
    being ``expected`` (e.g. ``"packet file <20 digits>.arrow"``)."""
    key = (logger.name, url)
    with _lock:
        if key in _reported:
            return
        if len(_reported) >= MAX_REMEMBERED:
            if logger.name in _overflowed:
                return
            _overflowed.add(logger.name)
            overflow = True
        else:
            _reported.add(key)
            overflow = False
    if overflow:
        logger.warning("more than %d odd names in model root listings; ignoring further ones silently", MAX_REMEMBERED)
    else:
        logger.warning("ignoring %r: not a %s", url, expected)


def parse_listing(
    listing: Iterable[str],
    parse: Callable[[str], T | None],
    logger: logging.Logger,
    root_url: str,
    folder: str,
    expected: str,
    allowed: Iterable[str] = (),
) -> list[T]:
    """What ``parse`` makes of each name of a listing of ``folder`` under the storage root
    ``root_url``, in listing order; a name it refuses (None) is skipped with
    :func:`warn_odd_name`, unless it is ``allowed``."""
    allowed = set(allowed)
    values = []
    for name in listing:
        value = parse(name)
        if value is not None:
            values.append(value)
        elif name not in allowed:
            warn_odd_name(logger, entry_url(root_url, folder, name), expected)
    return values
