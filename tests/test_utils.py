"""PERSIA's helpers in persia/utils.py: ``find_free_port`` against ports really held by sockets."""

from __future__ import annotations

import socket

import pytest

from persia import helper
from persia.utils import MAXIMUM_LOCAL_PORT_NUM, find_free_port

pytestmark = pytest.mark.unit


def held_port() -> socket.socket:
    """A socket holding a port on 127.0.0.1 (picked by the system)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    return sock


def test_a_held_port_is_skipped_and_the_next_free_one_returned():
    with held_port() as sock:
        taken = sock.getsockname()[1]
        got = find_free_port(taken)
        assert got > taken
        # the port it names can be bound right now
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", got))


def test_interval_steps_over_ports():
    with held_port() as sock:
        taken = sock.getsockname()[1]
        got = find_free_port(taken, interval=7)
        assert got > taken and (got - taken) % 7 == 0


def test_no_free_port_up_to_the_last_one_is_a_value_error():
    with held_port() as sock:
        taken = sock.getsockname()[1]
        # a step that leaves the range right after the held port
        with pytest.raises(ValueError, match="free port not found"):
            find_free_port(taken, interval=MAXIMUM_LOCAL_PORT_NUM)
    with pytest.raises(ValueError, match="free port not found"):
        find_free_port(MAXIMUM_LOCAL_PORT_NUM + 1)


def test_helper_uses_the_same_function():
    assert helper.find_free_port is find_free_port
