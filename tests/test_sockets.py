"""The socket steps the local lookup socket and PERSIA's data flow share
(embedding_server/rpc/sockets.py), on real socket pairs."""

from __future__ import annotations

import socket
import threading

import pytest

from embedding_server.rpc.sockets import recv_exactly, shutdown_quietly

pytestmark = pytest.mark.unit


def test_recv_exactly_gathers_a_message_sent_in_pieces():
    a, b = socket.socketpair()
    with a, b:
        payload = bytes(range(256)) * 300  # more than one receive's worth
        sender = threading.Thread(
            target=lambda: [a.sendall(payload[i : i + 1000]) for i in range(0, len(payload), 1000)]
        )
        sender.start()
        buffer = bytearray(len(payload))
        assert recv_exactly(b, memoryview(buffer)) == len(payload)
        sender.join()
        assert bytes(buffer) == payload


def test_recv_exactly_counts_what_came_before_the_peer_closed():
    a, b = socket.socketpair()
    with b:
        a.sendall(b"abc")
        a.close()
        buffer = bytearray(8)
        assert recv_exactly(b, memoryview(buffer)) == 3
        assert buffer[:3] == b"abc"
        assert recv_exactly(b, memoryview(bytearray(4))) == 0  # closed before the first byte
        assert recv_exactly(b, memoryview(bytearray(0))) == 0


def test_shutdown_quietly_ends_a_reader_and_passes_over_closed_sockets():
    a, b = socket.socketpair()
    closed, other = socket.socketpair()
    closed.close()
    other.close()
    unconnected = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    got: list[int] = []
    reader = threading.Thread(target=lambda: got.append(recv_exactly(b, memoryview(bytearray(10)))))
    with a, b, unconnected:
        reader.start()
        shutdown_quietly([closed, unconnected, b])
        reader.join(timeout=10)
        assert not reader.is_alive()
    assert got == [0]
