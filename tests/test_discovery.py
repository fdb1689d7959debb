"""Discovery of embedding replicas through DNS (``embedding_server.rpc.replicas.resolve_address``
and :class:`RemoteEmbeddingClient`'s re-resolution), with real servers on loopback.

Three infer-mode servers of shard 0 listen on the same port of 127.0.0.1, 127.0.0.2 and
127.0.0.3 (all loopback on Linux). The test's resolver stands in for a headless Service name:
what it returns changes during the test, and the client must follow without a failed lookup:
new addresses join once healthy, vanished ones stop getting requests and their channels close
once their calls in flight are done. One test uses the default resolver on ``localhost``.
"""

from __future__ import annotations

import socket
import threading

import numpy as np
import pytest

from embedding_server.core.config import EmbeddingConfig, GlobalConfig
from embedding_server.core.errors import ShardUnavailableError
from embedding_server.rpc.remote import RemoteEmbeddingClient
from embedding_server.rpc.replicas import resolve_address
from embedding_server.rpc.service import start_server

pytestmark = [pytest.mark.unit, pytest.mark.timeout(120)]

EMB = EmbeddingConfig.from_dict({"slots_config": {"user": {"dim": 4}}})
INFER = GlobalConfig.from_dict({"common_config": {"job_type": "infer"}})
NAME = "emb-0.emb.test.svc"


class FakeDns:
    """A resolver with ``socket.getaddrinfo``'s signature whose answer the test changes."""

    def __init__(self, port: int, ips: list[str]):
        self.port, self.ips, self.calls, self.fail = port, list(ips), 0, False

    def __call__(self, host, port, family=0, type=0, proto=0, flags=0):
        assert (host, port) == (NAME, self.port)
        self.calls += 1
        if self.fail:
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in self.ips]


@pytest.fixture()
def three_servers():
    first = start_server(EMB, INFER, host="127.0.0.1", port=0, workers=2, local_socket=None)
    servers = [first]
    try:
        for ip in ("127.0.0.2", "127.0.0.3"):
            servers.append(start_server(EMB, INFER, host=ip, port=first.port, workers=2, local_socket=None))
        yield servers
    finally:
        for server in servers:
            server.stop(grace=0)


def addresses(client: RemoteEmbeddingClient, up_only: bool = True) -> set[str]:
    return {r["address"] for r in client.replica_states()[0] if r["up"] or not up_only}


def test_resolve_address_forms():
    dns = FakeDns(7000, ["10.0.0.2", "10.0.0.1", "10.0.0.2"])
    assert resolve_address(f"{NAME}:7000", dns) == ["10.0.0.2:7000", "10.0.0.1:7000"]  # resolver order, no repeats
    assert resolve_address("10.1.2.3:7000", dns) == ["10.1.2.3:7000"] and dns.calls == 1  # IP literals: not asked
    assert resolve_address("[::1]:7000", dns) == ["[::1]:7000"]

    def dual_stack(host, port, *args):
        return [
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("fd00::5", port, 0, 0)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.5", port)),
        ]

    assert resolve_address("pod:7000", dual_stack) == ["10.0.0.5:7000"]  # one pod, not two replicas
    v6 = [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("fd00::5", 7000, 0, 0))]
    assert resolve_address("pod:7000", lambda *a: v6) == ["[fd00::5]:7000"]


def test_default_resolver_on_localhost(three_servers):
    port = three_servers[0].port
    assert resolve_address(f"localhost:{port}") == [f"127.0.0.1:{port}"]
    with RemoteEmbeddingClient(EMB, [f"localhost:{port}"], timeout=5, local_lookups=False) as client:
        [[state]] = client.replica_states()
        assert (state["address"], state["name"], state["up"]) == (f"127.0.0.1:{port}", f"localhost:{port}", True)
        rows = client.lookup_rows(np.arange(3, dtype=np.uint64), np.zeros(3, np.uint16), 4, insert=False)
        assert rows.shape == (3, 4)


def test_replicas_follow_the_names_addresses_without_a_failed_lookup(three_servers, wait_until):
    port = three_servers[0].port
    dns = FakeDns(port, ["127.0.0.1", "127.0.0.2"])
    failures: list[BaseException] = []
    stop = threading.Event()
    with RemoteEmbeddingClient(
        EMB,
        [f"{NAME}:{port}"],
        timeout=5,
        probe_interval=0.05,
        resolve_interval=0.2,
        getaddrinfo=dns,
        local_lookups=False,
    ) as client:
        assert addresses(client) == {f"127.0.0.1:{port}", f"127.0.0.2:{port}"}

        def look_up() -> None:
            ids, tables = np.arange(64, dtype=np.uint64), np.zeros(64, np.uint16)
            while not stop.is_set():
                try:
                    client.lookup_rows(ids, tables, 4, insert=False)
                except BaseException as exc:  # noqa: BLE001 - any failure fails the test
                    failures.append(exc)

        threads = [threading.Thread(target=look_up) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            # A pod appears and another goes: the set follows, in-flight calls drain.
            dns.ips = ["127.0.0.2", "127.0.0.3"]
            want = {f"127.0.0.2:{port}", f"127.0.0.3:{port}"}
            wait_until(
                lambda: addresses(client, up_only=False) == want and addresses(client) == want, 10, "the new set"
            )
            wait_until(lambda: not client._draining, 10, "the retired replica's channel to close")
            served = [s.metrics.method_stats() for s in three_servers]
            lookups = [sum(m["requests"] for m in stats if m["method"] == "Lookup") for stats in served]
            wait_until(
                lambda: (
                    sum(m["requests"] for m in three_servers[2].metrics.method_stats() if m["method"] == "Lookup") > 0
                ),
                10,
                "lookups on the new replica",
            )
            # The retired replica gets no more lookups.
            before = lookups[0]
            threading.Event().wait(0.3)
            after = sum(m["requests"] for m in three_servers[0].metrics.method_stats() if m["method"] == "Lookup")
            assert after == before

            # A DNS failure keeps the replicas (no empty shard because the resolver is down).
            dns.fail = True
            calls = dns.calls
            wait_until(lambda: dns.calls > calls + 1, 10, "re-resolution attempts")
            assert addresses(client) == want
            dns.fail = False

            # Scale to three: all three serve.
            dns.ips = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
            wait_until(lambda: len(addresses(client)) == 3, 10, "three replicas")
        finally:
            stop.set()
            for t in threads:
                t.join()
    assert not failures, failures[:3]


def test_retired_replica_is_closed_only_after_its_calls_in_flight(three_servers, wait_until):
    port = three_servers[0].port
    dns = FakeDns(port, ["127.0.0.1", "127.0.0.2"])
    with RemoteEmbeddingClient(
        EMB,
        [f"{NAME}:{port}"],
        timeout=30,
        probe_interval=0.05,
        resolve_interval=0,  # resolve only when the test says
        getaddrinfo=dns,
        local_lookups=False,
    ) as client:
        replica_set = client.replica_sets[0]
        leaving = next(r for r in replica_set.snapshot() if r.address.startswith("127.0.0.1:"))
        replica_set.started(leaving)  # a call in flight on it
        dns.ips = ["127.0.0.2"]
        client.rediscover()
        assert [r.address for r in replica_set.snapshot()] == [f"127.0.0.2:{port}"]
        assert leaving.retired_at is not None and leaving in client._draining
        threading.Event().wait(0.3)  # several probe rounds
        assert leaving in client._draining  # still open for its call
        replica_set.finished(leaving)
        wait_until(lambda: leaving not in client._draining, 10, "the drained channel to close")
        assert client.lookup_rows(np.arange(2, dtype=np.uint64), np.zeros(2, np.uint16), 4, insert=False).shape == (
            2,
            4,
        )


def test_a_name_that_never_resolves_is_reported_within_the_connect_timeout():
    def nxdomain(*args):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    with pytest.raises(ShardUnavailableError, match=f"shard 0: no address within 0.3 s: {NAME}:7000 did not resolve"):
        RemoteEmbeddingClient(EMB, [f"{NAME}:7000"], connect_timeout=0.3, getaddrinfo=nxdomain)
