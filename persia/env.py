"""Where this process stands in a PERSIA job: PERSIA's ``persia.env``.

An nn worker (started by ``persia-launcher nn-worker``, i.e. torchrun) has ``RANK``,
``LOCAL_RANK`` and ``WORLD_SIZE``; a data loader or a server (``persia-launcher data-loader``,
Kubernetes, docker) has ``REPLICA_INDEX`` and ``REPLICA_SIZE``. As in PERSIA, the environment is
read once, on the first ``get_*`` call (``reload_env`` reads it again), and a process has one
kind or the other: with ``RANK`` set, ``get_replica_index()``/``get_replica_size()`` are None;
without it, ``get_rank()``/``get_local_rank()``/``get_world_size()`` are None, and without
``REPLICA_INDEX`` too the process counts as replica 0 of 1 (with one warning, PERSIA's).

Bad values raise :class:`ValueError` naming the variable and its value (PERSIA asserted; an
assert vanishes under ``python -O``, a ValueError does not).

Two switches are read at import, as PERSIA does:

* ``PERSIA_LAUNCHER_VERBOSE`` (integer, default 0): ``persia-launcher`` logs each command it runs.
* ``PERSIA_SKIP_CHECK_DATA`` (integer, default 0): skip the data checks of ``PersiaBatch``
  except the batch size.

Example:
    >>> import os
    >>> os.environ.update(RANK="1", LOCAL_RANK="1", WORLD_SIZE="2")
    >>> reload_env()
    >>> get_rank(), get_world_size(), get_replica_index()
    (1, 2, None)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

_logger = logging.getLogger("persia.env")


def _int_env(name: str, environ: Mapping[str, str], default: str | None = None) -> int:
    """``environ[name]`` as an integer.

    Raises:
        ValueError: unset (and no default) or not an integer, naming the variable.
    """
    text = environ.get(name, default)
    if text is None:
        raise ValueError(f"{name} not found, set the environment variable {name}")
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {text!r}") from None


_TOO_SMALL = {0: "cannot be negative", 1: "should be at least one"}


def _check_at_least(name: str, value: int, minimum: Literal[0, 1]) -> None:
    """Raise ValueError naming the variable when ``value`` is below ``minimum`` (0: an index, 1: a count)."""
    if value < minimum:
        raise ValueError(f"{name} {_TOO_SMALL[minimum]}, got {value}")


def _flag_env(name: str) -> bool:
    """A PERSIA switch: an integer, nonzero meaning on (``bool(int(value))``, as PERSIA reads it)."""
    return bool(_int_env(name, os.environ, "0"))


PERSIA_LAUNCHER_VERBOSE: bool = _flag_env("PERSIA_LAUNCHER_VERBOSE")

#: Skip all PERSIA data checks except the batch size (type, dtype and shape mismatches then go
#: unnoticed instead of raising RuntimeError).
PERSIA_SKIP_CHECK_DATA: bool = _flag_env("PERSIA_SKIP_CHECK_DATA")


@dataclass
class _Env:
    """What the environment said (or :func:`set_env` set); None where it does not apply."""

    replica_size: int | None = None
    replica_index: int | None = None
    world_size: int | None = None
    rank: int | None = None
    local_rank: int | None = None
    is_init: bool = False

    def init(self, force: bool = False, environ: Mapping[str, str] = os.environ) -> None:
        """Read the environment (unless read before and not ``force``).

        Raises:
            ValueError: a variable is missing, not an integer or out of range (the message names it).
        """
        if self.is_init and not force:
            return
        values = _Env()
        if environ.get("RANK"):
            values.rank = _int_env("RANK", environ)
            values.local_rank = _int_env("LOCAL_RANK", environ)
            values.world_size = _int_env("WORLD_SIZE", environ)
            _check_at_least("RANK", values.rank, 0)
            _check_at_least("LOCAL_RANK", values.local_rank, 0)
            _check_at_least("WORLD_SIZE", values.world_size, 1)
            if values.rank >= values.world_size:
                raise ValueError(f"RANK {values.rank} must be less than WORLD_SIZE {values.world_size}")
        elif "REPLICA_INDEX" in environ:
            values.replica_index = _int_env("REPLICA_INDEX", environ)
            _check_at_least("REPLICA_INDEX", values.replica_index, 0)
            if "REPLICA_SIZE" not in environ:
                raise ValueError(
                    "REPLICA_SIZE not found, set the environment variable REPLICA_SIZE (with REPLICA_INDEX) before "
                    "starting the PERSIA task"
                )
            values.replica_size = _int_env("REPLICA_SIZE", environ)
            _check_at_least("REPLICA_SIZE", values.replica_size, 1)
            if values.replica_index >= values.replica_size:
                raise ValueError(
                    f"REPLICA_INDEX {values.replica_index} must be less than REPLICA_SIZE {values.replica_size}"
                )
        else:
            _logger.warning("REPLICA_INDEX not found, use default replica_index=0 and default replica_size=1")
            values.replica_index, values.replica_size = 0, 1
        self.set(values.replica_size, values.replica_index, values.world_size, values.rank, values.local_rank)

    def set(
        self,
        replica_size: int | None = None,
        replica_index: int | None = None,
        world_size: int | None = None,
        rank: int | None = None,
        local_rank: int | None = None,
    ) -> None:
        self.replica_size, self.replica_index = replica_size, replica_index
        self.world_size, self.rank, self.local_rank = world_size, rank, local_rank
        self.is_init = True


_env = _Env()


def reload_env() -> None:
    """Read the environment again (after changing ``RANK``, ``REPLICA_INDEX``, ...).

    Raises:
        ValueError: a variable is missing, not an integer or out of range.
    """
    _env.init(force=True)


def set_env(
    *,
    replica_size: int | None = None,
    replica_index: int | None = None,
    world_size: int | None = None,
    rank: int | None = None,
    local_rank: int | None = None,
) -> None:
    """Set what the ``get_*`` functions return, without any check and without reading the
    environment (PERSIA's ``set_env``); the values not given become None."""
    _env.set(replica_size, replica_index, world_size, rank, local_rank)


def get_world_size() -> int | None:
    """The total number of nn-worker processes (``WORLD_SIZE``); None outside an nn worker.

    Raises:
        ValueError: the environment holds a bad value (on the first call, or after ``reload_env``).
    """
    _env.init()
    return _env.world_size


def get_rank() -> int | None:
    """The rank of this nn-worker process (``RANK``); None outside an nn worker.

    Raises:
        ValueError: the environment holds a bad value.
    """
    _env.init()
    return _env.rank


def get_local_rank() -> int | None:
    """The rank of this process on its machine (``LOCAL_RANK``); None outside an nn worker.

    Raises:
        ValueError: the environment holds a bad value.
    """
    _env.init()
    return _env.local_rank


def get_replica_size() -> int | None:
    """The number of replicas of this service (``REPLICA_SIZE``; 1 when ``REPLICA_INDEX`` is
    unset); None in an nn worker.

    Raises:
        ValueError: the environment holds a bad value.
    """
    _env.init()
    return _env.replica_size


def get_replica_index() -> int | None:
    """This replica's index among them (``REPLICA_INDEX``; 0 when unset), assigned in launch
    order; None in an nn worker.

    Raises:
        ValueError: the environment holds a bad value.
    """
    _env.init()
    return _env.replica_index
