"""persia.registry: the service registry served in this process on loopback (registrations in
index order, waiting that blocks until entries arrive, re-registration replacing an entry, a
client that keeps trying until the registry is up), deregistration (only of the address given, so
a stale one keeps a replacement), entries with a ttl dropped once not registered again in time,
and its bounds: every bad request refused with a message naming what is wrong, the server
serving the next request as before."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest

from persia.registry import (
    MAX_BODY_BYTES,
    MAX_INDEX,
    MAX_TTL_S,
    MAX_URL_BYTES,
    RegistryClient,
    RegistryError,
    RegistryServer,
)

pytestmark = pytest.mark.unit

PS = "embedding-parameter-server"


@pytest.fixture()
def registry():
    server = RegistryServer(("127.0.0.1", 0))
    server.start()
    yield server
    server.stop()


def raw(server: RegistryServer, method: str, path: str, body: bytes | None = None, headers=None):
    """One HTTP request as any client could send it; (status, decoded JSON answer)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        if body is not None and headers is None:
            connection.request(method, path, body=body)
        else:
            connection.putrequest(method, path)
            for name, value in (headers or {}).items():
                connection.putheader(name, value)
            connection.endheaders(body)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_wait_for_returns_addresses_in_index_order_once_all_registered(registry):
    client = RegistryClient(registry.address)
    client.register(PS, 2, "10.0.0.3:8888", size=3)
    client.register(PS, 0, "10.0.0.1:8888", size=3)
    late = threading.Timer(0.2, client.register, args=(PS, 1, "10.0.0.2:8888"), kwargs={"size": 3})
    late.start()
    started = time.monotonic()
    assert client.wait_for(PS, timeout=10) == ["10.0.0.1:8888", "10.0.0.2:8888", "10.0.0.3:8888"]
    assert time.monotonic() - started >= 0.15  # it blocked until the late entry came
    late.join()


def test_a_waiting_read_is_answered_when_the_entries_arrive_not_before(registry):
    client = RegistryClient(registry.address)
    client.register(PS, 1, "h1:1")
    late = threading.Timer(0.2, client.register, args=(PS, 0, "h0:1"))
    late.start()
    status, answer = raw(registry, "GET", f"/v1/services/{PS}?count=2&wait=20")
    late.join()
    assert status == 200
    assert [(s["index"], s["address"]) for s in answer["services"]] == [(0, "h0:1"), (1, "h1:1")]


def test_wait_for_with_count_waits_for_the_indexes_below_it(registry):
    client = RegistryClient(registry.address)
    client.register("nn-worker", 1, "h1:1")
    with pytest.raises(TimeoutError) as excinfo:
        client.wait_for("nn-worker", count=2, timeout=0.3)
    assert "2 nn-worker service(s)" in str(excinfo.value) and "registered: 1: h1:1" in str(excinfo.value)
    client.register("nn-worker", 0, "h0:1")
    assert client.wait_for("nn-worker", count=2, timeout=5) == ["h0:1", "h1:1"]
    assert client.wait_for("nn-worker", count=1, timeout=5) == ["h0:1"]


def test_reregistering_after_a_client_restart_replaces_the_entry(registry):
    RegistryClient(registry.address).register(PS, 0, "127.0.0.1:7001", size=2)
    RegistryClient(registry.address).register(PS, 1, "127.0.0.1:7002", size=2)
    # the server of shard 0 restarts on another port: a new client registers index 0 again
    RegistryClient(registry.address).register(PS, 0, "127.0.0.1:7101", size=2)
    answer = RegistryClient(registry.address).services(PS)
    assert [(s["index"], s["address"]) for s in answer["services"]] == [(0, "127.0.0.1:7101"), (1, "127.0.0.1:7002")]
    assert answer["size"] == 2


def test_deregistering_removes_the_entry_and_a_waiting_read_no_longer_finds_it(registry):
    client = RegistryClient(registry.address)
    client.register(PS, 0, "10.0.0.1:8888", size=2)
    client.register(PS, 1, "10.0.0.2:8888", size=2)
    assert client.deregister(PS, 1, "10.0.0.2:8888") is True
    assert [s["address"] for s in client.services(PS)["services"]] == ["10.0.0.1:8888"]
    with pytest.raises(TimeoutError, match="registered: 0: 10.0.0.1:8888$"):
        client.wait_for(PS, timeout=0.3)
    assert client.deregister(PS, 1, "10.0.0.2:8888") is False  # gone already: nothing to do


def test_a_stale_deregistration_keeps_the_replacement_registered_at_the_same_index(registry):
    client = RegistryClient(registry.address)
    client.register(PS, 0, "127.0.0.1:7001", size=1)
    client.register(PS, 0, "127.0.0.1:7101", size=1)  # the restarted server, before the old one says goodbye
    assert client.deregister(PS, 0, "127.0.0.1:7001") is False
    assert client.wait_for(PS, timeout=5) == ["127.0.0.1:7101"]
    assert client.deregister(PS, 0, "127.0.0.1:7101") is True
    assert client.services(PS)["services"] == []


def test_entries_carry_their_last_registration_time_and_ttl(registry):
    client = RegistryClient(registry.address)
    before = time.time()
    client.register(PS, 0, "h:1", size=2, ttl=30)
    client.register(PS, 1, "h:2", size=2)
    after = time.time()
    first, second = client.services(PS)["services"]
    assert before <= first["registered_at"] <= after and before <= second["registered_at"] <= after
    assert (first["ttl"], second["ttl"]) == (30.0, None)
    client.register(PS, 0, "h:1", size=2, ttl=30)
    assert client.services(PS)["services"][0]["registered_at"] >= after  # renewed


def test_an_entry_not_registered_again_within_its_ttl_is_dropped(registry, wait_until):
    client = RegistryClient(registry.address)
    client.register(PS, 0, "127.0.0.1:7001", size=2, ttl=0.5)
    client.register(PS, 1, "127.0.0.1:7002", size=2)  # one-shot: no ttl, stays
    assert client.wait_for(PS, timeout=5) == ["127.0.0.1:7001", "127.0.0.1:7002"]
    wait_until(lambda: len(client.services(PS)["services"]) == 1, timeout=30, what="the ttl entry to expire")
    assert client.services(PS)["services"][0]["address"] == "127.0.0.1:7002"
    with pytest.raises(TimeoutError, match="registered: 1: 127.0.0.1:7002$"):
        client.wait_for(PS, timeout=0.3)
    client.register(PS, 0, "127.0.0.1:7003", size=2, ttl=30)  # its replacement
    assert client.wait_for(PS, timeout=5) == ["127.0.0.1:7003", "127.0.0.1:7002"]


def test_registering_again_within_the_ttl_keeps_the_entry(registry):
    client = RegistryClient(registry.address)
    ttl = 0.5
    started = time.monotonic()
    client.register(PS, 0, "127.0.0.1:7001", ttl=ttl)
    # re-registering as a launcher does (much more often than the ttl), for four ttls: the entry
    # is there at every read, though the first registration is long expired
    while time.monotonic() - started < 4 * ttl:
        client.register(PS, 0, "127.0.0.1:7001", ttl=ttl)
        assert [s["address"] for s in client.services(PS)["services"]] == ["127.0.0.1:7001"]


def test_without_declared_size_one_entry_is_enough(registry):
    client = RegistryClient(registry.address)
    client.register("nn-worker", 0, "[::1]:4000")
    assert client.wait_for("nn-worker", timeout=5) == ["[::1]:4000"]


def test_client_keeps_trying_until_the_registry_serves(wait_until):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = RegistryClient(f"127.0.0.1:{port}")
    done = threading.Event()
    errors: list[BaseException] = []

    def register():
        try:
            client.register(PS, 0, "127.0.0.1:9000", size=1, timeout=30)
        except BaseException as exc:  # reported below
            errors.append(exc)
        done.set()

    thread = threading.Thread(target=register)
    thread.start()
    time.sleep(0.2)  # the registry comes up after the client started trying (the scenario, not a wait)
    assert not done.is_set()
    server = RegistryServer(("127.0.0.1", port))
    server.start()
    try:
        wait_until(done.is_set, timeout=30, what="the registration")
        thread.join()
        assert not errors
        assert client.wait_for(PS, timeout=5) == ["127.0.0.1:9000"]
    finally:
        server.stop()


def test_unreachable_registry_times_out_naming_it():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TimeoutError, match=f"registry at 127.0.0.1:{port} is not reachable"):
        RegistryClient(f"127.0.0.1:{port}").wait_for(PS, timeout=0.3)


@pytest.mark.parametrize(
    ("role", "index", "address", "size", "message"),
    [
        ("Bad Role", 0, "h:1", None, "role 'Bad Role'"),
        (PS, -1, "h:1", None, "index -1"),
        (PS, 2, "h:1", 2, "index 2: must be an integer from 0, less than the size 2"),
        (PS, 0, "h", None, "address 'h': expected host:port"),
        (PS, 0, "h:70000", None, "address 'h:70000'"),
        (PS, 0, "h:1", 0, "size 0"),
    ],
)
def test_client_checks_inputs_before_sending(registry, role, index, address, size, message):
    with pytest.raises(ValueError, match=message):
        RegistryClient(registry.address).register(role, index, address, size=size)


@pytest.mark.parametrize(
    ("ttl", "message"),
    [(0, "ttl 0: must be null or a number of seconds above 0"), (True, "ttl True"), (MAX_TTL_S * 2, "ttl 172800")],
)
def test_client_checks_the_ttl_before_sending(registry, ttl, message):
    with pytest.raises(ValueError, match=message):
        RegistryClient(registry.address).register(PS, 0, "h:1", ttl=ttl)


@pytest.mark.parametrize(
    ("role", "index", "address", "message"),
    [
        ("Bad Role", 0, "h:1", "role 'Bad Role'"),
        (PS, -1, "h:1", "index -1"),
        (PS, MAX_INDEX, "h:1", f"index {MAX_INDEX}: must be an integer from 0, less than {MAX_INDEX}"),
        (PS, 0, "h", "address 'h': expected host:port"),
    ],
)
def test_client_checks_deregistrations_before_sending(registry, role, index, address, message):
    with pytest.raises(ValueError, match=message):
        RegistryClient(registry.address).deregister(role, index, address)


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status", "error"),
    [
        ("PUT", f"/v1/services/{PS}/0", b"{not json", None, 400, "body is not JSON"),
        ("PUT", f"/v1/services/{PS}/0", b'{"address": "h:1", "extra": 1}', None, 400, 'body must be {"address"'),
        ("PUT", f"/v1/services/{PS}/0", b'{"address": "h:99999"}', None, 400, "address 'h:99999'"),
        ("PUT", f"/v1/services/{PS}/x", b'{"address": "h:1"}', None, 400, "index 'x'"),
        ("PUT", f"/v1/services/{PS}/5", b'{"address": "h:1", "size": 2}', None, 400, "index 5"),
        ("PUT", "/v1/services/UPPER/0", b'{"address": "h:1"}', None, 400, "role 'UPPER'"),
        ("PUT", f"/v1/services/{PS}/0", b"x" * (MAX_BODY_BYTES + 1), None, 413, f"at most {MAX_BODY_BYTES}"),
        ("PUT", f"/v1/services/{PS}/0", b"", {}, 411, "Content-Length"),
        ("GET", "/v1/services/" + "a" * MAX_URL_BYTES, None, None, 414, f"longer than {MAX_URL_BYTES}"),
        ("GET", f"/v1/services/{PS}?wait=-1", None, None, 400, "wait -1.0"),
        ("GET", f"/v1/services/{PS}?count=zero", None, None, 400, "count 'zero'"),
        ("GET", "/v1/other", None, None, 404, "no such path"),
        ("PUT", f"/v1/services/{PS}/0", b'{"address": "h:1", "ttl": 0}', None, 400, "ttl 0: must be null or"),
        ("PUT", f"/v1/services/{PS}/0", b'{"address": "h:1", "ttl": "5"}', None, 400, "ttl '5'"),
        ("PUT", f"/v1/services/{PS}/0", b'{"address": "h:1", "ttl": 1e9}', None, 400, "ttl 1000000000.0"),
        ("DELETE", f"/v1/services/{PS}/0", b"{not json", None, 400, "body is not JSON"),
        ("DELETE", f"/v1/services/{PS}/0", b"{}", None, 400, 'body must be {"address": "host:port"} (the address'),
        ("DELETE", f"/v1/services/{PS}/0", b'{"address": "h:1", "size": 1}', None, 400, 'body must be {"address"'),
        ("DELETE", f"/v1/services/{PS}/0", b'{"address": "h"}', None, 400, "address 'h': expected host:port"),
        ("DELETE", f"/v1/services/{PS}/x", b'{"address": "h:1"}', None, 400, "index 'x': must be an integer"),
        ("DELETE", f"/v1/services/{PS}/{MAX_INDEX}", b'{"address": "h:1"}', None, 400, f"index {MAX_INDEX}"),
        ("DELETE", "/v1/services/UPPER/0", b'{"address": "h:1"}', None, 400, "role 'UPPER'"),
        ("DELETE", f"/v1/services/{PS}", b'{"address": "h:1"}', None, 404, "use /v1/services/<role>/<index>"),
        ("DELETE", f"/v1/services/{PS}/0", b"", {}, 411, "a DELETE needs a Content-Length header"),
        ("DELETE", f"/v1/services/{PS}/0", b"x" * (MAX_BODY_BYTES + 1), None, 413, f"at most {MAX_BODY_BYTES}"),
        ("POST", f"/v1/services/{PS}/0", b"{}", None, 405, "method POST not allowed: use GET, PUT or DELETE"),
    ],
)
def test_bad_requests_are_refused_with_a_precise_error_and_the_server_keeps_serving(
    registry, method, path, body, headers, status, error
):
    got_status, answer = raw(registry, method, path, body, headers)
    assert got_status == status
    assert error in answer["error"]
    # nothing was registered, and the next good request is served as before
    client = RegistryClient(registry.address)
    assert client.services(PS)["services"] == []
    client.register(PS, 0, "h:1", size=1)
    assert client.wait_for(PS, timeout=5) == ["h:1"]


def test_bad_deregistrations_leave_the_entry_registered(registry):
    client = RegistryClient(registry.address)
    client.register(PS, 0, "h:1", size=1)
    for body in (b'{"address": "h"}', b'{"address": "h:1", "extra": 1}', b"[]"):
        status, answer = raw(registry, "DELETE", f"/v1/services/{PS}/0", body)
        assert status == 400, answer
    assert client.wait_for(PS, timeout=5) == ["h:1"]


def test_refusal_reaches_the_client_as_registry_error(registry):
    client = RegistryClient(registry.address)
    with pytest.raises(RegistryError, match="refused GET"):
        client._request("GET", "/v1/services/NOPE", None, 5.0)


def test_health_answers_serving(registry):
    assert raw(registry, "GET", "/v1/health") == (200, {"status": "SERVING"})
