"""Lookups over a Unix socket, for clients on the embedding server's own machine.

Most of a small lookup's Python gRPC round trip is gRPC's own machinery on both sides, not the
bytes it moves; the same bytes over a Unix socket skip it (``benchmarks/README.md`` has the
figures). A TorchServe worker beside its embedding server (one machine, or a pod sharing a
volume) therefore looks up through the server's local socket, found without configuration:

1. the server listens on a Unix socket (``--local-socket``; by default a fresh path in a private
   per-user directory) besides its gRPC port and reports the path, and a random id of this server
   instance, in ``Info``;
2. a client that can open that path sends HELLO (with its token when the server demands one) and
   gets the instance id back. Only when it equals the id gRPC reported (the same server, not a
   stale or foreign socket at that path) does the client send that replica's lookups there.
   Anything else (another machine, another container, an old server) keeps using gRPC, and a
   local connection that breaks falls back to gRPC on the spot.

Only Lookup travels this way; Info, Stats, health, gradients and admin calls stay on gRPC. The
frames carry the very serialized LookupRequest and LookupResponse bytes of the gRPC method
(:mod:`embedding_server.rpc.wire`), so both transports share one encoder and one decoder.

Frame, both directions: the magic ``b"CTRL"``, one byte ``kind``, a little-endian uint32 body
length, the body. Requests: kind 1 HELLO (body: the token as UTF-8, empty without one), kind 2
LOOKUP (body: a LookupRequest). Replies: kind = the gRPC status code number (0 OK); the body is
the instance id (HELLO), the LookupResponse (LOOKUP), or a UTF-8 message when not OK.

Access: the socket file is mode 0600 (the default path's directory 0700), so only the server's
user can connect; a server with a token also demands it in HELLO.

Bounds: at most ``max_connections`` connections are served at once (global config
``local_socket_max_connections``); one more is answered RESOURCE_EXHAUSTED and closed, and its
client uses gRPC. A connection that sends nothing for ``idle_timeout_s`` seconds
(``local_socket_idle_timeout_s``) is closed; a client whose idle connection was closed so sends
its lookup again on a fresh one.

Example:
    >>> server = LocalLookupServer("/run/ctrserve/shard0.sock", servicer.answer_local, token=None,
    ...                            max_request_bytes=64 << 20, max_connections=64).start()
    >>> channel, why_not = LocalLookupChannel.attach(server.path, server.instance_id, token=None)
    >>> response = channel(wire.encode_lookup_request(ids, tables), timeout=1.0)
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import socket
import stat
import struct
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc
import numpy as np

from embedding_server.core.errors import ConfigError
from embedding_server.rpc import wire
from embedding_server.rpc.sockets import recv_exactly, shutdown_quietly

log = logging.getLogger("ctrserve.local_lookup")

MAGIC = b"CTRL"
HEADER = struct.Struct("<4sBI")
HELLO, LOOKUP = 1, 2
#: Longest path a Unix socket address holds on Linux (sun_path is 108 bytes with its NUL).
MAX_PATH_BYTES = 107
#: Seconds a client waits for a server's HELLO answer when it attaches.
ATTACH_TIMEOUT_S = 2.0

_CODES = {code.value[0]: code for code in grpc.StatusCode}

#: What the server answers a request with: (status, LookupResponse bytes or error message).
Answer = Callable[[memoryview], tuple[grpc.StatusCode, bytes | str]]


class FrameError(Exception):
    """The peer sent something that is not a frame of this protocol, or closed mid-frame."""


class FrameTooLarge(FrameError):
    """A frame header announced a body over the reader's limit (the body is left unread)."""


def _recv_exact(sock: socket.socket, size: int) -> memoryview | None:
    """``size`` bytes (a writable view of fresh memory), or None when the peer closed before
    the first byte. The memory is not zeroed first: a 100k-key answer is 6 MB."""
    view = np.empty(size, np.uint8).data
    got = recv_exactly(sock, view)
    if got == size:
        return view
    if got == 0:
        return None
    raise FrameError(f"connection closed after {got} of {size} bytes")


def read_frame(sock: socket.socket, max_body: int) -> tuple[int, memoryview] | None:
    """(kind, body) of the next frame, or None at a clean end of the connection.

    Raises:
        FrameTooLarge: a body over ``max_body`` bytes.
        FrameError: bad magic, or a connection cut mid-frame.
        OSError: the socket failed (or timed out).
    """
    header = _recv_exact(sock, HEADER.size)
    if header is None:
        return None
    magic, kind, length = HEADER.unpack(header)
    if magic != MAGIC:
        raise FrameError(f"not a ctrserve local-lookup frame (magic {bytes(magic)!r})")
    if length > max_body:
        raise FrameTooLarge(f"a {length}-byte frame is over the limit of {max_body} bytes")
    body = _recv_exact(sock, length) if length else memoryview(b"")
    if body is None:
        raise FrameError("connection closed after a frame header")
    return kind, body


def send_frame(sock: socket.socket, kind: int, body: bytes | bytearray | memoryview) -> None:
    """One frame: header and body in one ``sendmsg`` (the body is not copied), the rest of a
    partial send after it."""
    header = HEADER.pack(MAGIC, kind, len(body))
    sent = sock.sendmsg([header, body])
    if sent < HEADER.size:
        sock.sendall(header[sent:])
        sent = HEADER.size
    if sent - HEADER.size < len(body):
        sock.sendall(memoryview(body)[sent - HEADER.size :])


# ---------------------------------------------------------------------------- server


def default_socket_path(shard_index: int) -> str:
    """A fresh socket path in this user's private directory: ``$XDG_RUNTIME_DIR/ctrserve`` when
    set, else ``<tmp>/ctrserve-<uid>``; the directory is made 0700.

    Raises:
        ConfigError: the directory exists but belongs to another user or others can enter it.
    """
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    directory = Path(runtime) / "ctrserve" if runtime else Path(tempfile.gettempdir()) / f"ctrserve-{os.getuid()}"
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = directory.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise ConfigError(
            f"local lookup socket directory {directory} must be a directory of user {os.getuid()} with mode 0700; "
            "remove it, or give --local-socket PATH (or --local-socket off)"
        )
    _remove_orphans(directory)
    return str(directory / f"embedding-shard{shard_index}-{os.getpid()}-{secrets.token_hex(3)}.sock")


def _remove_orphans(directory: Path) -> None:
    """Remove the default sockets of servers that are gone (killed ones cannot remove their own)."""
    for path in directory.glob("embedding-shard*-*-*.sock"):
        try:
            pid = int(path.name.split("-")[2])
        except (IndexError, ValueError):
            continue
        if pid == os.getpid() or Path(f"/proc/{pid}").exists():
            continue
        try:
            _remove_stale(str(path))
        except (ConfigError, OSError):
            pass  # still in use after all (pid namespaces), or already gone


class LocalLookupServer:
    """Answers lookups on a Unix socket, one thread per connected client (at most ``max_connections``).

    Args:
        path: where the socket is made (its directory must exist). A socket file left there by
            a server that is gone is replaced; a live one, or any other file, is an error.
        answer: ``answer(LookupRequest bytes) -> (status, LookupResponse bytes or message)``;
            the server's :meth:`EmbeddingServicer.answer_local`.
        token: the token clients must send in HELLO, or several tokens any of which will do (the
            read and the admin token); None: none.
        max_request_bytes: largest LOOKUP body accepted (a larger one closes the connection
            after a RESOURCE_EXHAUSTED reply).
        max_connections: connections served at once; one more gets a RESOURCE_EXHAUSTED frame
            and is closed (each connection is a thread holding up to one request and its answer).
        idle_timeout_s: seconds a connection may wait for its next frame (or a send may stall)
            before the server closes it.

    Raises:
        ConfigError: from :meth:`start`: the path is too long, in use, or cannot be bound.
    """

    def __init__(
        self,
        path: str,
        answer: Answer,
        token: str | Sequence[str] | None,
        max_request_bytes: int,
        max_connections: int = 64,
        idle_timeout_s: float = 300.0,
    ):
        self.path = path
        self.answer = answer
        self.instance_id = secrets.token_hex(16)
        tokens = [token] if isinstance(token, str) else list(token or ())
        self._tokens = [t.encode() for t in tokens if t] or None
        self._max_request = max_request_bytes
        self._max_connections = max_connections
        self._idle_timeout = idle_timeout_s
        self._listener: socket.socket | None = None
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    def start(self) -> LocalLookupServer:
        if len(os.fsencode(self.path)) > MAX_PATH_BYTES:
            raise ConfigError(f"local lookup socket path {self.path!r} is longer than {MAX_PATH_BYTES} bytes")
        _remove_stale(self.path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(self.path)
            os.chmod(self.path, 0o600)
            listener.listen(128)
        except OSError as exc:
            listener.close()
            raise ConfigError(f"cannot listen on local lookup socket {self.path}: {exc}") from None
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), name="local-lookup-accept", daemon=True).start()
        return self

    @property
    def connections(self) -> int:
        """Connections being served now."""
        with self._lock:
            return len(self._connections)

    def stop(self) -> None:
        """Stop accepting, end every connection (a client then falls back to gRPC), remove the file."""
        self._stopping.set()
        if self._listener is not None:
            shutdown_quietly([self._listener])  # wakes accept()
            self._listener.close()
        with self._lock:
            shutdown_quietly(list(self._connections))
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _accept(self, listener: socket.socket) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed by stop()
            with self._lock:
                full = len(self._connections) >= self._max_connections
                if not full:
                    self._connections.add(conn)
            if full:
                self._refuse(conn)
                continue
            conn.settimeout(self._idle_timeout)  # every read and send of this connection
            threading.Thread(target=self._serve, args=(conn,), name="local-lookup", daemon=True).start()

    def _refuse(self, conn: socket.socket) -> None:
        """Answer a connection over the cap RESOURCE_EXHAUSTED and close it (its client then
        uses gRPC), without a thread: the short frame fits the socket's buffer."""
        message = (
            f"the local lookup socket serves {self._max_connections} connections at once "
            "(local_socket_max_connections); use gRPC"
        )
        log.warning("local lookup connection refused: %s", message)
        try:
            conn.settimeout(1.0)
            send_frame(conn, grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], message.encode())
            conn.setblocking(False)
            conn.recv(4096)  # a HELLO already here: read, so closing is an end of stream, not a reset
        except OSError:
            pass
        finally:
            conn.close()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                if self._greet(conn):
                    while not self._stopping.is_set() and self._serve_one(conn):
                        pass
        except (OSError, FrameError) as exc:
            if not self._stopping.is_set():
                log.debug("local lookup connection ended: %s", exc)
        finally:
            with self._lock:
                self._connections.discard(conn)

    def _greet(self, conn: socket.socket) -> bool:
        """Answer the HELLO that opens every connection; False when the connection must end."""
        frame = read_frame(conn, 4096)
        if frame is None:
            return False
        kind, body = frame
        if kind != HELLO:
            send_frame(conn, grpc.StatusCode.INVALID_ARGUMENT.value[0], b"the first frame must be HELLO")
            return False
        if self._tokens is not None and not any([hmac.compare_digest(bytes(body), t) for t in self._tokens]):
            send_frame(conn, grpc.StatusCode.UNAUTHENTICATED.value[0], b"missing or wrong token")
            return False
        send_frame(conn, grpc.StatusCode.OK.value[0], self.instance_id.encode())
        return True

    def _serve_one(self, conn: socket.socket) -> bool:
        """Answer one LOOKUP; False at the end of the connection."""
        try:
            frame = read_frame(conn, self._max_request)
        except FrameTooLarge as exc:  # the body cannot be skipped: answer, then end the connection
            send_frame(conn, grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], str(exc).encode())
            raise
        if frame is None:
            return False
        kind, body = frame
        if kind != LOOKUP:
            send_frame(conn, grpc.StatusCode.INVALID_ARGUMENT.value[0], f"unknown frame kind {kind}".encode())
            return False
        status, result = self.answer(body)  # the response bytes when OK, else the error message
        send_frame(conn, status.value[0], result.encode() if isinstance(result, str) else result)
        return True


def _remove_stale(path: str) -> None:
    """Remove a socket file nobody listens on; refuse a live socket or another kind of file."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"local lookup socket path {path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # left behind by a server that is gone
        return
    except OSError as exc:
        raise ConfigError(f"local lookup socket {path} cannot be checked: {exc}") from None
    finally:
        probe.close()
    raise ConfigError(f"local lookup socket {path} is in use by another server")


# ---------------------------------------------------------------------------- client


class LocalRpcError(grpc.RpcError):
    """A failed local call, with the ``code()`` and ``details()`` of a gRPC error, so the client's
    failover handles both transports alike."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class LocalLookupChannel:
    """One replica's lookups over its server's local socket; called like the gRPC Lookup stub
    (serialized LookupRequest in, serialized LookupResponse out). Thread-safe: each call takes
    an idle connection or opens one.

    Raises:
        LocalRpcError: from a call: UNAVAILABLE when the connection failed (the client then
            falls back to gRPC), DEADLINE_EXCEEDED on a timeout, or the server's refusal.
    """

    def __init__(self, path: str, instance_id: str, token: str | None):
        self.path = path
        self.instance_id = instance_id
        self._hello = token.encode() if token else b""
        self._idle: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def attach(cls, path: str, instance_id: str, token: str | None) -> tuple[LocalLookupChannel | None, str]:
        """(channel, "") when ``path`` answers HELLO with ``instance_id``, else (None, why not)."""
        channel = cls(path, instance_id, token)
        try:
            channel._give_back(channel._connect(ATTACH_TIMEOUT_S))
        except LocalRpcError as exc:
            return None, exc.details()
        return channel, ""

    def __call__(self, request: bytes, timeout: float | None = None) -> memoryview:
        conn, reused = self._take(timeout)
        try:
            frame = self._exchange(conn, request, timeout)
            if frame is None and reused:
                # The server closed this idle connection (local_socket_idle_timeout_s) before it
                # read the request: a lookup only reads, so it is sent again on a fresh connection.
                conn.close()
                conn = self._connect(self._connect_timeout(timeout))
                frame = self._exchange(conn, request, timeout)
            if frame is None:
                raise FrameError("the server closed the connection")
        except TimeoutError:
            conn.close()
            raise LocalRpcError(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"local socket {self.path}: no answer within {timeout} s"
            ) from None
        except (OSError, FrameError) as exc:
            conn.close()
            raise LocalRpcError(grpc.StatusCode.UNAVAILABLE, f"local socket {self.path}: {exc}") from None
        status, body = frame
        self._give_back(conn)
        if status != grpc.StatusCode.OK.value[0]:
            code = _CODES.get(status, grpc.StatusCode.UNKNOWN)
            raise LocalRpcError(code, bytes(body).decode("utf-8", "replace"))
        return body

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    @staticmethod
    def _exchange(conn: socket.socket, request: bytes, timeout: float | None) -> tuple[int, memoryview] | None:
        """Send one LOOKUP and read its answer; None when the server had closed the connection
        (nothing of an answer came back).

        Raises:
            TimeoutError, OSError, FrameError: the connection failed otherwise.
        """
        conn.settimeout(timeout)
        try:
            send_frame(conn, LOOKUP, request)
            return read_frame(conn, wire.MAX_MESSAGE_BYTES)
        except (BrokenPipeError, ConnectionResetError):
            return None

    @staticmethod
    def _connect_timeout(timeout: float | None) -> float:
        return ATTACH_TIMEOUT_S if timeout is None else min(timeout, ATTACH_TIMEOUT_S)

    def _take(self, timeout: float | None) -> tuple[socket.socket, bool]:
        """An idle connection (and True), or a new one (and False)."""
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
        return self._connect(self._connect_timeout(timeout)), False

    def _give_back(self, conn: socket.socket) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(conn)
                return
        conn.close()

    def _connect(self, timeout: float) -> socket.socket:
        """A new connection that passed HELLO with this channel's instance id."""
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.settimeout(timeout)
            conn.connect(self.path)
            try:
                send_frame(conn, HELLO, self._hello)
            except (BrokenPipeError, ConnectionResetError):
                pass  # a server over its connection cap answers and closes at once: read why
            frame = read_frame(conn, 4096)
            if frame is None:
                raise FrameError("the server closed the connection")
        except (OSError, FrameError) as exc:
            conn.close()
            raise LocalRpcError(grpc.StatusCode.UNAVAILABLE, f"local socket {self.path}: {exc}") from None
        status, body = frame
        if status != grpc.StatusCode.OK.value[0] or bytes(body).decode("ascii", "replace") != self.instance_id:
            conn.close()
            problem = bytes(body).decode("utf-8", "replace") if status else "it belongs to another server instance"
            raise LocalRpcError(grpc.StatusCode.UNAVAILABLE, f"local socket {self.path}: {problem}")
        return conn
