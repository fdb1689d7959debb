"""PERSIA's helpers: ``setup_seed``, ``load_yaml``, ``dump_yaml``, ``find_free_port``, ``run_command``.

Example:
    >>> from persia.utils import setup_seed
    >>> setup_seed(3)  # doctest: +SKIP
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import yaml

from persia.logger import get_default_logger

_logger = get_default_logger()

#: the largest port number :func:`find_free_port` tries
MAXIMUM_LOCAL_PORT_NUM = 65535


def setup_seed(seed: int) -> None:
    """Seed ``random``, NumPy and PyTorch, and ask PyTorch for deterministic algorithms, so a run
    repeats exactly.

    Args:
        seed: the seed of every random number generator.
    """
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # Deterministic CUDA matmuls need this workspace setting; set before the first cuBLAS call.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)


def load_yaml(filepath: str | os.PathLike[str]) -> Any:
    """The parsed YAML file (safe loader: plain data only).

    Raises:
        FileNotFoundError: no file at ``filepath``.
        yaml.YAMLError: the file is not valid YAML (the message names the line).
    """
    if not os.path.exists(filepath):
        raise FileNotFoundError(f"filepath {filepath} not found!")
    with open(filepath) as file:
        return yaml.safe_load(file)


def dump_yaml(content: Mapping[str, Any] | Sequence[Any], filepath: str | os.PathLike[str]) -> None:
    """Write ``content`` to ``filepath`` as YAML (overwriting it)."""
    with open(filepath, "w") as file:
        file.write(yaml.safe_dump(content))


def run_command(cmd: Sequence[object], env: Mapping[str, str] | None = None) -> None:
    """Run ``cmd`` (its items turned to strings), logging it when ``PERSIA_LAUNCHER_VERBOSE`` is set.

    Raises:
        subprocess.CalledProcessError: the command exited non-zero.
    """
    args = [str(c) for c in cmd]
    if os.environ.get("PERSIA_LAUNCHER_VERBOSE", "0") not in ("", "0"):
        _logger.info(f"execute command: {' '.join(args)}")
    subprocess.check_call(args, env=dict(env) if env is not None else None)


def _is_port_available(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def find_free_port(port: int = 10000, interval: int = 1) -> int:
    """The first port from ``port`` on (in steps of ``interval``) that can be bound on 127.0.0.1,
    where ctrserve's services bind.

    Raises:
        ValueError: no free port up to 65535.
    """
    while port <= MAXIMUM_LOCAL_PORT_NUM:
        if _is_port_available(port):
            return port
        port += interval
    raise ValueError("free port not found.")


__all__ = ["dump_yaml", "find_free_port", "load_yaml", "run_command", "setup_seed"]
