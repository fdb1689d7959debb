"""The data flow from data loaders to nn workers: a length-prefixed protocol over TCP.

PERSIA's data loaders (:class:`persia.data_ctx.DataCtx`) send batches to the nn workers, whose
:class:`persia.data.StreamingDataset` receives them. This module is both ends of that link:
:class:`BatchSender` (one per data loader, a connection to every nn worker) and
:class:`BatchReceiver` (one per nn worker: a listening socket and an :class:`Inbox`).

Every frame is ``kind u8, length u32`` (little-endian), then ``length`` bytes:

* ``HELLO`` (loader -> worker, first frame): UTF-8 JSON ``{"protocol": "persia-dataflow",
  "version": 1, "replica_index": i, "replica_size": n}``.
* ``BATCH``: ``seq u64`` (the loader's count of batches sent, over all workers), then the batch
  codec's bytes (``PersiaBatch.to_bytes()``; decoded with the codec's checks, never unpickled).
* ``DONE``: JSON ``{"batches": k}``, how many batches this loader sent to this worker.
* ``ACK`` (worker -> loader) answers each of the above: ``u8`` 1 when the batch had to wait for
  room in the worker's buffer, else 0.
* ``ERROR`` (worker -> loader): a UTF-8 message; the worker then closes the connection.

Back-pressure: a worker answers a ``BATCH`` only once the batch is in its buffer, and a loader
sends a worker its next batch only after the answer to the previous one, so a full buffer
blocks the loader and nothing is dropped. Sizes are checked before anything is read into
memory (control frames at most :data:`MAX_CONTROL_BYTES`, batches at most
``max_batch_bytes``); a malformed frame gets an ``ERROR`` naming the problem and closes that
connection only, the worker keeps receiving from the others.

Example:
    >>> receiver = BatchReceiver(buffer_size=4)
    >>> with BatchSender([receiver.address], replica_index=0, replica_size=1) as sender:
    ...     sender.send(batch.to_bytes())  # doctest: +SKIP
    >>> receiver.inbox.get(timeout=5.0)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from embedding_server.rpc.sockets import recv_exactly, shutdown_quietly

log = logging.getLogger(__name__)

PROTOCOL = "persia-dataflow"
VERSION = 1
HELLO, BATCH, DONE, ACK, ERROR = 1, 2, 3, 16, 17
_KIND_NAMES = {HELLO: "HELLO", BATCH: "BATCH", DONE: "DONE", ACK: "ACK", ERROR: "ERROR"}
_HEADER = struct.Struct("<BI")
_SEQ = struct.Struct("<Q")
MAX_CONTROL_BYTES = 64 * 1024
#: the default bound on one batch's bytes (``PERSIA_DATAFLOW_MAX_BATCH_BYTES`` overrides it)
DEFAULT_MAX_BATCH_BYTES = 256 * 1024 * 1024
_POLL_S = 0.2


class DataflowError(RuntimeError):
    """The data flow failed: a peer refused a frame, broke the protocol or went away."""


class ProtocolError(DataflowError):
    """A frame that breaks the protocol (its message names the frame and the problem)."""


# ---------------------------------------------------------------------------------------- frames


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    if recv_exactly(sock, memoryview(buf)) < n:
        raise ConnectionError("the peer closed the connection")
    return bytes(buf)


def read_frame(sock: socket.socket, max_batch_bytes: int) -> tuple[int, bytes]:
    """One frame from ``sock``: ``(kind, payload)``.

    Raises:
        ProtocolError: an unknown kind or a length over its bound (nothing of it is read).
        ConnectionError: the peer closed the connection.
    """
    kind, length = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
    if kind not in _KIND_NAMES:
        raise ProtocolError(f"unknown frame kind {kind}")
    limit = max_batch_bytes + _SEQ.size if kind == BATCH else MAX_CONTROL_BYTES
    if length > limit:
        raise ProtocolError(f"{_KIND_NAMES[kind]} frame of {length} bytes exceeds the limit of {limit} bytes")
    return kind, _recv_exact(sock, length)


def write_frame(sock: socket.socket, kind: int, *parts: bytes) -> None:
    """Send one frame made of ``parts`` (written without joining them)."""
    length = sum(len(p) for p in parts)
    sock.sendall(_HEADER.pack(kind, length))
    for part in parts:
        sock.sendall(part)


def _json_payload(kind: int, payload: bytes, keys: set[str]) -> dict[str, Any]:
    try:
        value = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"{_KIND_NAMES[kind]} frame is not UTF-8 JSON: {exc}") from None
    if not isinstance(value, dict) or set(value) != keys:
        raise ProtocolError(f"{_KIND_NAMES[kind]} frame must hold exactly the keys {sorted(keys)}")
    return value


def _count(value: Any, what: str, low: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ProtocolError(f"{what} must be an integer >= {low}, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------- inbox


@dataclass
class _Loader:
    """What one worker knows about one data loader."""

    batches: deque = field(default_factory=deque)
    connected: bool = False
    done: bool = False
    lost: str | None = None
    received: int = 0
    last_seq: int = -1


class Inbox:
    """The batches an nn worker received and has not trained on yet, in a bounded buffer.

    Args:
        buffer_size: batches the buffer holds; a data loader sending into a full buffer waits.
        ordered: hand batches out in an order fixed by the data alone (round-robin over the
            loaders by replica index, each loader's in sequence order) instead of as they
            arrive; each loader then has ``max(1, buffer_size // replica_size)`` places.

    Raises:
        ValueError: ``buffer_size`` below 1.
    """

    def __init__(self, buffer_size: int, ordered: bool = False):
        if not isinstance(buffer_size, int) or buffer_size < 1:
            raise ValueError(f"buffer_size must be an integer >= 1, got {buffer_size!r}")
        self.buffer_size = buffer_size
        self._ordered = ordered
        self._cond = threading.Condition()
        self._loaders: dict[int, _Loader] = {}
        self._arrivals: deque[int] = deque()  # loader index of each buffered batch, arrival order
        self._next = 0  # ordered: the loader whose batch comes next
        self._closed = False
        self.replica_size: int | None = None
        #: counters: batches received and handed out, puts that waited for room, deepest buffer
        self.received = 0
        self.consumed = 0
        self.waited_puts = 0
        self.max_depth = 0

    @property
    def depth(self) -> int:
        """Batches in the buffer now."""
        with self._cond:
            return self.received - self.consumed

    @property
    def ordered(self) -> bool:
        return self._ordered

    def set_ordered(self, ordered: bool) -> None:
        """Switch the hand-out order (before the first :meth:`get`).

        Raises:
            RuntimeError: batches were handed out already.
        """
        with self._cond:
            if self.consumed and ordered != self._ordered:
                raise RuntimeError("the order of a stream cannot change once batches were handed out")
            if self._ordered and not ordered:  # batches buffered in order become arrivals
                self._arrivals = deque(i for i, loader in sorted(self._loaders.items()) for _ in loader.batches)
            if ordered:
                self._arrivals.clear()
            self._ordered = ordered
            self._cond.notify_all()

    def stats(self) -> dict[str, int]:
        """The counters and the current ``depth``."""
        with self._cond:
            return {
                "received": self.received,
                "consumed": self.consumed,
                "depth": self.received - self.consumed,
                "waited_puts": self.waited_puts,
                "max_depth": self.max_depth,
            }

    # ------------------------------------------------------------------ the connections' side

    def hello(self, index: int, size: int) -> None:
        """A data loader connected.

        Raises:
            ProtocolError: a replica size other loaders disagree with, an index out of range,
                or a loader already connected (or finished) under this index.
        """
        with self._cond:
            if self.replica_size is not None and size != self.replica_size:
                raise ProtocolError(
                    f"data loader {index} says there are {size} data loaders, others said {self.replica_size}"
                )
            if index >= size:
                raise ProtocolError(f"replica_index {index} must be less than replica_size {size}")
            known = self._loaders.get(index)
            if known is not None:
                state = (
                    "is already connected"
                    if known.connected
                    else "has already finished"
                    if known.done
                    else "went away before it finished; its stream cannot resume"
                )
                raise ProtocolError(f"data loader {index} {state}")
            self.replica_size = size
            self._loaders[index] = _Loader(connected=True)
            self._cond.notify_all()

    def _full(self, index: int) -> bool:
        if self._ordered:
            size = self.replica_size or 1
            return len(self._loaders[index].batches) >= max(1, self.buffer_size // size)
        return self.received - self.consumed >= self.buffer_size

    def put(self, index: int, seq: int, batch: Any) -> bool:
        """Buffer ``batch`` (sequence ``seq`` of loader ``index``), waiting for room; returns
        whether it had to wait.

        Raises:
            ProtocolError: a sequence number not above the loader's previous one.
            DataflowError: the inbox was closed while waiting.
        """
        with self._cond:
            loader = self._loaders[index]
            if seq <= loader.last_seq:
                raise ProtocolError(f"data loader {index}: batch sequence {seq} does not follow {loader.last_seq}")
            waited = False
            while self._full(index):
                if not waited:
                    waited = True
                    self.waited_puts += 1
                if self._closed:
                    raise DataflowError("the nn worker stopped receiving")
                self._cond.wait(_POLL_S)
            loader.last_seq = seq
            loader.batches.append(batch)
            loader.received += 1
            if not self._ordered:
                self._arrivals.append(index)
            self.received += 1
            self.max_depth = max(self.max_depth, self.received - self.consumed)
            self._cond.notify_all()
            return waited

    def check_done(self, index: int, count: int) -> None:
        """Check loader ``index``'s claim to have sent ``count`` batches to this worker.

        Raises:
            ProtocolError: ``count`` differs from what arrived.
        """
        with self._cond:
            received = self._loaders[index].received
        if count != received:
            raise ProtocolError(f"data loader {index} says it sent {count} batches, {received} arrived")

    def done(self, index: int, count: int) -> None:
        """Loader ``index`` has sent everything: ``count`` batches to this worker.

        Raises:
            ProtocolError: ``count`` differs from what arrived.
        """
        self.check_done(index, count)
        with self._cond:
            loader = self._loaders[index]
            loader.done = True
            loader.connected = False
            self._cond.notify_all()

    def lost(self, index: int, reason: str) -> None:
        """Loader ``index``'s connection ended before it was done."""
        with self._cond:
            loader = self._loaders[index]
            if not loader.done:
                loader.connected = False
                loader.lost = reason
                self._cond.notify_all()

    def close(self) -> None:
        """Wake every waiting put and get (they raise or end)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # ------------------------------------------------------------------ the training side

    def _finished(self) -> bool:
        size = self.replica_size
        return size is not None and all(
            i in self._loaders and self._loaders[i].done and not self._loaders[i].batches for i in range(size)
        )

    def _lost_message(self) -> str | None:
        for index, loader in sorted(self._loaders.items()):
            if loader.lost is not None and not loader.batches:
                return (
                    f"data loader {index} of {self.replica_size} went away before it finished "
                    f"({loader.received} batches arrived): {loader.lost}"
                )
        return None

    def _take(self) -> tuple[bool, Any]:
        """``(True, batch)`` when a batch can be handed out now, else ``(False, None)``.

        Raises:
            DataflowError: the batch due next belongs to a loader that went away.
        """
        if not self._ordered:
            if self._arrivals:
                return True, self._loaders[self._arrivals.popleft()].batches.popleft()
            message = self._lost_message()
            if message is not None:
                raise DataflowError(message)
            return False, None
        size = self.replica_size
        if size is None:
            return False, None
        for _ in range(size):
            loader = self._loaders.get(self._next)
            if loader is not None and loader.batches:
                self._next = (self._next + 1) % size
                return True, loader.batches.popleft()
            if loader is not None and loader.done:
                self._next = (self._next + 1) % size  # nothing more from it: skip its turn
                continue
            if loader is not None and loader.lost is not None:
                raise DataflowError(
                    f"data loader {self._next} of {size} went away before it finished "
                    f"({loader.received} batches arrived): {loader.lost}"
                )
            return False, None  # its next batch decides the order: wait for it
        return False, None

    def get(self, timeout: float | None) -> Any | None:
        """The next batch, or None once every data loader has finished and all is handed out.

        Raises:
            TimeoutError: nothing came within ``timeout`` seconds.
            DataflowError: a data loader went away before it finished.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._finished():
                    return None
                ready, batch = self._take()
                if ready:
                    self.consumed += 1
                    self._cond.notify_all()
                    return batch
                if self._closed:
                    return None
                left = _POLL_S if deadline is None else deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"no batch from the data loaders in {timeout:g} s "
                        f"({self.received} received, {self.replica_size or 'no'} data loaders known)"
                    )
                self._cond.wait(min(left, _POLL_S))


# ---------------------------------------------------------------------------------------- receiver


class BatchReceiver:
    """An nn worker's end: listens on ``host:port`` and puts decoded batches into :attr:`inbox`.

    Args:
        buffer_size: the inbox's size (see :class:`Inbox`).
        host: the interface to bind (127.0.0.1 unless told otherwise).
        port: the port (0: any free one; :attr:`address` says which).
        decode: turns a batch's bytes into the object handed out (it must refuse malformed
            bytes with an exception; its message goes back to the loader).
        max_batch_bytes: the largest batch accepted.
        ordered: see :class:`Inbox`.

    Raises:
        OSError: the address cannot be bound.
    """

    def __init__(
        self,
        buffer_size: int,
        host: str = "127.0.0.1",
        port: int = 0,
        decode: Callable[[bytes], Any] = bytes,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        ordered: bool = False,
    ):
        self.inbox = Inbox(buffer_size, ordered)
        self._decode = decode
        self._max_batch_bytes = max_batch_bytes
        self._server = socket.create_server((host, port))
        self._server.settimeout(_POLL_S)
        bound_host, bound_port = self._server.getsockname()[:2]
        self.address = f"{bound_host}:{bound_port}"
        self._stop = threading.Event()
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, name="dataflow-accept", daemon=True)
        self._acceptor.start()

    def close(self) -> None:
        """Stop listening, close every connection, end the inbox."""
        self._stop.set()
        self.inbox.close()
        with self._lock:
            shutdown_quietly(list(self._connections))
        self._acceptor.join(timeout=2.0)
        self._server.close()
        for thread in self._threads:
            thread.join(timeout=2.0)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._connections.add(conn)
            thread = threading.Thread(target=self._serve, args=(conn, peer), name="dataflow-conn", daemon=True)
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
            thread.start()

    def _serve(self, conn: socket.socket, peer: Any) -> None:
        index: int | None = None
        finished = False
        try:
            kind, payload = read_frame(conn, self._max_batch_bytes)
            if kind != HELLO:
                raise ProtocolError(f"the first frame must be HELLO, got {_KIND_NAMES[kind]}")
            hello = _json_payload(kind, payload, {"protocol", "version", "replica_index", "replica_size"})
            if hello["protocol"] != PROTOCOL or hello["version"] != VERSION:
                raise ProtocolError(
                    f"HELLO: protocol {hello['protocol']!r} version {hello['version']!r}, "
                    f"expected {PROTOCOL!r} version {VERSION}"
                )
            size = _count(hello["replica_size"], "HELLO replica_size", 1)
            claimed = _count(hello["replica_index"], "HELLO replica_index")
            self.inbox.hello(claimed, size)
            index = claimed
            write_frame(conn, ACK, b"\0")
            while not finished:
                kind, payload = read_frame(conn, self._max_batch_bytes)
                if kind == BATCH:
                    if len(payload) < _SEQ.size:
                        raise ProtocolError("BATCH frame shorter than its sequence number")
                    (seq,) = _SEQ.unpack_from(payload)
                    try:
                        batch = self._decode(payload[_SEQ.size :])
                    except Exception as exc:
                        raise ProtocolError(f"batch {seq} from data loader {index}: {exc}") from None
                    waited = self.inbox.put(index, seq, batch)
                    write_frame(conn, ACK, b"\1" if waited else b"\0")
                elif kind == DONE:
                    count = _count(_json_payload(kind, payload, {"batches"})["batches"], "DONE batches")
                    self.inbox.check_done(index, count)
                    # answered before the stream may end (and this receiver close) on it
                    write_frame(conn, ACK, b"\0")
                    self.inbox.done(index, count)
                    finished = True
                else:
                    raise ProtocolError(f"unexpected {_KIND_NAMES[kind]} frame from a data loader")
        except ProtocolError as exc:
            log.warning("data loader connection %s refused: %s", peer, exc)
            try:
                write_frame(conn, ERROR, str(exc).encode("utf-8")[:MAX_CONTROL_BYTES])
            except OSError:
                pass
            if index is not None:
                self.inbox.lost(index, str(exc))
        except (ConnectionError, OSError, DataflowError) as exc:
            if index is not None and not finished:
                self.inbox.lost(index, f"connection ended: {exc}")
        finally:
            with self._lock:
                self._connections.discard(conn)
            conn.close()


# ---------------------------------------------------------------------------------------- sender


class _Peer:
    """One loader -> worker connection with at most one batch unanswered."""

    def __init__(self, address: str, timeout: float, max_batch_bytes: int):
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"nn worker address must be host:port, got {address!r}")
        self.address = address
        self.sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
        self.sock.settimeout(None)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.max_batch_bytes = max_batch_bytes
        self.awaiting = False
        self.sent = 0

    def answer(self) -> bool:
        """Wait for the answer to the last frame; returns whether the batch waited for room.

        Raises:
            DataflowError: the worker refused the frame or went away.
        """
        try:
            kind, payload = read_frame(self.sock, self.max_batch_bytes)
        except (ConnectionError, OSError, ProtocolError) as exc:
            raise DataflowError(f"nn worker {self.address}: {exc}") from None
        finally:
            self.awaiting = False
        if kind == ERROR:
            raise DataflowError(f"nn worker {self.address} refused: {payload.decode('utf-8', 'replace')}")
        if kind != ACK or len(payload) != 1:
            raise DataflowError(f"nn worker {self.address} answered with a malformed {_KIND_NAMES[kind]} frame")
        return payload == b"\1"

    def send(self, kind: int, *parts: bytes) -> None:
        try:
            write_frame(self.sock, kind, *parts)
        except OSError as exc:
            raise DataflowError(f"nn worker {self.address}: {exc}") from None
        self.awaiting = True

    def close(self) -> None:
        self.sock.close()


class BatchSender:
    """A data loader's end: a connection to each nn worker, batches dealt round-robin.

    Batch ``k`` goes to worker ``k % len(addresses)``; each worker has at most one batch
    unanswered, so a worker whose buffer is full blocks :meth:`send` (back-pressure).

    Args:
        addresses: the nn workers' ``host:port``, in rank order.
        replica_index: this loader's index among ``replica_size`` loaders.
        replica_size: how many data loaders feed the workers.
        connect_timeout: seconds to wait for each connection.
        max_batch_bytes: the largest batch sent (bigger ones raise before sending).

    Raises:
        ValueError: no address, or a malformed one, or a bad index.
        DataflowError: a worker refused this loader.
        OSError: a worker cannot be reached.
    """

    def __init__(
        self,
        addresses: Sequence[str],
        replica_index: int,
        replica_size: int,
        connect_timeout: float = 60.0,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    ):
        if not addresses:
            raise ValueError("no nn worker address to send batches to")
        if not 0 <= replica_index < replica_size:
            raise ValueError(f"replica_index {replica_index} must be in [0, replica_size={replica_size})")
        self.max_batch_bytes = max_batch_bytes
        self.replica_index = replica_index
        self.replica_size = replica_size
        #: batches sent, and sends whose batch had to wait for room at its worker
        self.sent = 0
        self.waited_sends = 0
        self._peers: list[_Peer] = []
        try:
            hello = json.dumps(
                {"protocol": PROTOCOL, "version": VERSION, "replica_index": replica_index, "replica_size": replica_size}
            ).encode()
            for address in addresses:
                peer = _Peer(address, connect_timeout, max_batch_bytes)
                self._peers.append(peer)
                peer.send(HELLO, hello)
            for peer in self._peers:
                peer.answer()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> BatchSender:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.finish()
        self.close()

    def _settle(self, peer: _Peer) -> None:
        if peer.awaiting and peer.answer():
            self.waited_sends += 1

    def send(self, data: bytes) -> None:
        """Send one batch's bytes to the next worker in turn (waiting while its buffer is full).

        Raises:
            ValueError: more than ``max_batch_bytes``.
            DataflowError: a worker refused a batch (its message says why) or went away.
        """
        if len(data) > self.max_batch_bytes:
            raise ValueError(f"a batch of {len(data)} bytes exceeds the limit of {self.max_batch_bytes} bytes")
        peer = self._peers[self.sent % len(self._peers)]
        self._settle(peer)
        peer.send(BATCH, _SEQ.pack(self.sent), data)
        peer.sent += 1
        self.sent += 1

    def finish(self) -> None:
        """Wait for every answer, then tell each worker this loader is done.

        Raises:
            DataflowError: a worker refused a batch or the end.
        """
        for peer in self._peers:
            self._settle(peer)
        for peer in self._peers:
            peer.send(DONE, json.dumps({"batches": peer.sent}).encode())
        for peer in self._peers:
            peer.answer()

    def close(self) -> None:
        """Close the connections (without :meth:`finish`, the workers count this loader as lost)."""
        for peer in self._peers:
            peer.close()
        self._peers = []


# ---------------------------------------------------------------------------------------- settings

#: comma-separated ``host:port`` of the nn workers' data receivers in rank order (ctrserve
#: extension): data loaders send there instead of asking the registry, and each nn worker binds
#: the entry of its rank and registers nothing.
NN_WORKER_ADDRS_ENV = "PERSIA_NN_WORKER_ADDRS"
#: the interface an nn worker's receiver binds (default 127.0.0.1)
DATA_HOST_ENV = "PERSIA_NN_WORKER_DATA_HOST"
#: the first port of the receivers on a machine (rank ``LOCAL_RANK`` binds this + LOCAL_RANK);
#: default 0, any free port
DATA_PORT_ENV = "PERSIA_NN_WORKER_DATA_PORT"
#: the largest batch in bytes either side accepts (default :data:`DEFAULT_MAX_BATCH_BYTES`)
MAX_BATCH_BYTES_ENV = "PERSIA_DATAFLOW_MAX_BATCH_BYTES"


def _split_address(address: str, where: str) -> tuple[str, int]:
    host, _, port = address.strip().rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{where}: expected host:port, got {address!r}")
    return host.strip("[]"), int(port)


def nn_worker_addresses_from_env() -> list[str] | None:
    """The addresses in ``PERSIA_NN_WORKER_ADDRS``, or None when it is unset or empty.

    Raises:
        ValueError: an entry that is not ``host:port`` (the message names the variable).
    """
    text = os.environ.get(NN_WORKER_ADDRS_ENV, "").strip()
    if not text:
        return None
    addresses = [part.strip() for part in text.split(",") if part.strip()]
    for address in addresses:
        _split_address(address, NN_WORKER_ADDRS_ENV)
    return addresses


def receiver_bind_from_env(rank: int, local_rank: int) -> tuple[str, int]:
    """Where the nn worker of ``rank`` binds its receiver: its entry of
    ``PERSIA_NN_WORKER_ADDRS`` when set, else ``PERSIA_NN_WORKER_DATA_HOST`` (127.0.0.1) and
    ``PERSIA_NN_WORKER_DATA_PORT`` + ``local_rank`` (any free port when unset or 0).

    Raises:
        ValueError: a malformed variable, or fewer addresses than ranks.
    """
    addresses = nn_worker_addresses_from_env()
    if addresses is not None:
        if rank >= len(addresses):
            raise ValueError(f"{NN_WORKER_ADDRS_ENV} lists {len(addresses)} nn workers, this is rank {rank}")
        return _split_address(addresses[rank], NN_WORKER_ADDRS_ENV)
    host = os.environ.get(DATA_HOST_ENV, "").strip() or "127.0.0.1"
    port_text = os.environ.get(DATA_PORT_ENV, "").strip() or "0"
    if not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"{DATA_PORT_ENV} must be a port number, got {port_text!r}")
    port = int(port_text)
    return host, port + local_rank if port else 0


def max_batch_bytes_from_env() -> int:
    """``PERSIA_DATAFLOW_MAX_BATCH_BYTES``, or :data:`DEFAULT_MAX_BATCH_BYTES`.

    Raises:
        ValueError: not a positive integer.
    """
    text = os.environ.get(MAX_BATCH_BYTES_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_BATCH_BYTES
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{MAX_BATCH_BYTES_ENV} must be a positive integer, got {text!r}")
    return int(text)
