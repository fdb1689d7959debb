"""persia.service: PERSIA's service-address helpers over the registry (served in this process on
loopback): where the registry address comes from (EMBEDDING_WORKER_SERVICE, PERSIA's default
name where it resolves, else 127.0.0.1:8887), register/wait through it, the embedding servers from
PERSIA_EMBEDDING_SERVERS or the registry, deregistration (a stale one keeping the replacement, an
unreachable registry logged, not raised), a registration with a ttl that wait_for_services no
longer returns once expired, and PERSIA_NATS_URL noted once as unused."""

from __future__ import annotations

import logging
import socket
import threading

import pytest

from persia import service
from persia.registry import RegistryServer

pytestmark = pytest.mark.unit


@pytest.fixture()
def registry(monkeypatch):
    server = RegistryServer(("127.0.0.1", 0))
    server.start()
    monkeypatch.setenv("EMBEDDING_WORKER_SERVICE", server.address)
    yield server
    server.stop()


def resolves(name: str) -> bool:
    try:
        socket.getaddrinfo(name, None)
    except OSError:
        return False
    return True


def test_embedding_worker_service_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("EMBEDDING_WORKER_SERVICE", "localhost:8887")
    assert service.get_embedding_worker_services() == ["localhost:8887"]


def test_default_is_persias_name_where_it_resolves_else_this_machine(monkeypatch):
    monkeypatch.delenv("EMBEDDING_WORKER_SERVICE", raising=False)
    expected = "embedding_worker:8887" if resolves("embedding_worker") else "127.0.0.1:8887"
    assert service.get_embedding_worker_services() == [expected]


def test_bad_embedding_worker_service_is_refused_naming_the_variable(monkeypatch):
    monkeypatch.setenv("EMBEDDING_WORKER_SERVICE", "no-port-here")
    with pytest.raises(ValueError, match="EMBEDDING_WORKER_SERVICE: address 'no-port-here'"):
        service.get_embedding_worker_services()


def test_register_and_wait_for_services_through_the_registry(registry):
    service.register_service("nn-worker", 1, "127.0.0.1:5001", size=2)
    waiter: list[list[str]] = []
    thread = threading.Thread(target=lambda: waiter.append(service.wait_for_services("nn-worker", timeout=10)))
    thread.start()
    service.register_service("nn-worker", 0, "127.0.0.1:5000", size=2)
    thread.join()
    assert waiter == [["127.0.0.1:5000", "127.0.0.1:5001"]]


def test_wait_for_services_times_out_with_a_clear_message(registry):
    with pytest.raises(TimeoutError, match="waited 0.2 s for 3 embedding-parameter-server service"):
        service.wait_for_services(service.EMBEDDING_PARAMETER_SERVER, 3, timeout=0.2)


def test_deregister_service_removes_the_entry(registry):
    service.register_service(service.NN_WORKER, 0, "127.0.0.1:5000", size=1)
    assert service.wait_for_services(service.NN_WORKER, timeout=5) == ["127.0.0.1:5000"]
    assert service.deregister_service(service.NN_WORKER, 0, "127.0.0.1:5000") is True
    with pytest.raises(TimeoutError, match="registered: none"):
        service.wait_for_services(service.NN_WORKER, timeout=0.3)


def test_a_stale_deregister_service_does_not_remove_a_newer_registration(registry):
    service.register_service(service.EMBEDDING_PARAMETER_SERVER, 0, "127.0.0.1:8888", size=1)
    # the server restarts on another port and registers before the old one's goodbye arrives
    service.register_service(service.EMBEDDING_PARAMETER_SERVER, 0, "127.0.0.1:9888", size=1)
    assert service.deregister_service(service.EMBEDDING_PARAMETER_SERVER, 0, "127.0.0.1:8888") is False
    assert service.wait_for_services(service.EMBEDDING_PARAMETER_SERVER, timeout=5) == ["127.0.0.1:9888"]


def test_an_expired_ttl_registration_is_not_returned_by_wait_for_services(registry, wait_until):
    service.register_service(service.EMBEDDING_PARAMETER_SERVER, 0, "127.0.0.1:8888", size=1, ttl=0.5)
    assert service.wait_for_services(service.EMBEDDING_PARAMETER_SERVER, timeout=5) == ["127.0.0.1:8888"]
    wait_until(
        lambda: not registry.entries.read(service.EMBEDDING_PARAMETER_SERVER, None, 0.0)["services"],
        timeout=30,
        what="the registration to expire",
    )
    with pytest.raises(TimeoutError, match="registered: none"):
        service.wait_for_services(service.EMBEDDING_PARAMETER_SERVER, timeout=0.3)


def test_deregister_service_logs_an_unreachable_registry_instead_of_raising(monkeypatch, caplog):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there
    monkeypatch.setenv("EMBEDDING_WORKER_SERVICE", f"127.0.0.1:{port}")
    with caplog.at_level(logging.WARNING, logger="persia.service"):
        assert service.deregister_service(service.NN_WORKER, 0, "127.0.0.1:5000", timeout=0.3) is False
    [warning] = [r.getMessage() for r in caplog.records]
    assert warning.startswith("could not deregister nn-worker 0 at 127.0.0.1:5000: ")
    assert f"127.0.0.1:{port} is not reachable" in warning
    with pytest.raises(ValueError, match="address 'nowhere'"):  # the caller's mistake is raised
        service.deregister_service(service.NN_WORKER, 0, "nowhere")


def test_embedding_server_addresses_from_the_registry_in_shard_order(registry, monkeypatch):
    monkeypatch.delenv("PERSIA_EMBEDDING_SERVERS", raising=False)
    service.register_service(service.EMBEDDING_PARAMETER_SERVER, 1, "127.0.0.1:8889", size=2)
    service.register_service(service.EMBEDDING_PARAMETER_SERVER, 0, "127.0.0.1:8888", size=2)
    assert service.embedding_server_addresses(timeout=5) == ["127.0.0.1:8888", "127.0.0.1:8889"]


def test_embedding_servers_from_the_environment_skip_the_registry(monkeypatch):
    monkeypatch.setenv("EMBEDDING_WORKER_SERVICE", "127.0.0.1:1")  # nothing there: must not be asked
    monkeypatch.setenv("PERSIA_EMBEDDING_SERVERS", " a:1, b:2 ,")
    assert service.embedding_server_addresses(timeout=0.1) == ["a:1", "b:2"]
    monkeypatch.setenv("PERSIA_EMBEDDING_SERVERS", "a:1,b")
    with pytest.raises(ValueError, match="PERSIA_EMBEDDING_SERVERS: address 'b'"):
        service.embedding_server_addresses()


def test_nats_url_is_noted_once_as_unused(monkeypatch, caplog):
    monkeypatch.setenv("PERSIA_NATS_URL", "nats://0.0.0.0:4222")
    monkeypatch.setenv("EMBEDDING_WORKER_SERVICE", "127.0.0.1:8887")
    monkeypatch.setattr(service, "_nats_noted", threading.Event())
    with caplog.at_level(logging.INFO, logger="persia.service"):
        service.get_embedding_worker_services()
        service.get_embedding_worker_services()
    notes = [r.getMessage() for r in caplog.records if "PERSIA_NATS_URL" in r.getMessage()]
    assert len(notes) == 1
    assert "nats://0.0.0.0:4222 is not used" in notes[0] and "registry" in notes[0]
