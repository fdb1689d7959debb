"""Stream-socket steps shared by the length-prefixed protocols: the local lookup socket
(:mod:`embedding_server.rpc.local_lookup`) and PERSIA's data flow (``persia.dataflow``). Each
protocol keeps its own framing and its own errors; these are the socket calls beneath them.

Example:
    >>> a, b = socket.socketpair()
    >>> a.sendall(b"abc")
    >>> a.close()
    >>> buffer = bytearray(5)
    >>> recv_exactly(b, memoryview(buffer))  # the peer closed after 3 of the 5 bytes
    3
"""

from __future__ import annotations

import socket
from collections.abc import Iterable


def recv_exactly(sock: socket.socket, view: memoryview) -> int:
    """Fill ``view`` from ``sock``.

    Args:
        sock: a connected stream socket (its timeout applies to each receive).
        view: where the bytes go, ``len(view)`` of them (a byte-format view).

    Returns:
        How many bytes came: ``len(view)``, or fewer when the peer closed the connection first
        (0 when it closed before the first byte).

    Raises:
        OSError: the socket failed or timed out.
    """
    size = len(view)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:], size - got)
        if n == 0:
            break
        got += n
    return got


def shutdown_quietly(sockets: Iterable[socket.socket]) -> None:
    """Shut down both directions of each socket, which wakes a thread blocked in its ``accept``
    or ``recv``; a socket already closed or never connected is passed over.

    Args:
        sockets: the sockets (each is shut down, not closed: its owner closes it).
    """
    for sock in sockets:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
