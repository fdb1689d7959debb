"""Security of the embedding service and the code base.

* TLS, mutual TLS and the shared token on real gRPC servers, with throwaway certificates made by
  ``deploy/production/make_certs.sh`` (the openssl commands the production example documents).
* Static audit: no pickle, no ``torch.load`` without ``weights_only=True``, no ``np.load`` with
  pickles, no unsafe YAML anywhere in the source tree.
* File names from storage listings: traversal and absolute names never reach a path.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from embedding_server.core.config import EmbeddingConfig, GlobalConfig
from embedding_server.core.errors import ConfigError
from embedding_server.rpc.launcher import ctrserve_command, server_command
from embedding_server.rpc.security import ClientSecurity, ServerSecurity, make_channel, resolve_token
from embedding_server.rpc.service import CHANNEL_OPTIONS, start_server
from protos.embedding import pb, pb_grpc

REPO = Path(__file__).resolve().parents[1]
MAKE_CERTS = REPO / "deploy" / "production" / "make_certs.sh"
EMB = EmbeddingConfig.from_dict({"slots_config": {"user": {"dim": 4}}})
GLOBAL = GlobalConfig.from_dict({"common_config": {"job_type": "infer"}})
TOKEN = "test-token-0123456789abcdef"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """CA, server (localhost, 127.0.0.1) and client certificates plus a token, in one folder."""
    out = tmp_path_factory.mktemp("pki")
    subprocess.run(["bash", str(MAKE_CERTS), str(out)], check=True, capture_output=True, timeout=60)
    return out


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory) -> Path:
    """A second, unrelated CA with its own certificates (what an attacker could make)."""
    out = tmp_path_factory.mktemp("other_pki")
    subprocess.run(["bash", str(MAKE_CERTS), str(out)], check=True, capture_output=True, timeout=60)
    return out


def _serve(security: ServerSecurity):
    return start_server(EMB, GLOBAL, port=0, workers=2, security=security)


def _info(address: str, security: ClientSecurity | None, timeout: float = 5.0):
    channel = make_channel(address, CHANNEL_OPTIONS, security)
    try:
        return pb_grpc.EmbeddingServiceStub(channel).Info(pb.InfoRequest(), timeout=timeout)
    finally:
        channel.close()


def _error(address: str, security: ClientSecurity | None) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        _info(address, security, timeout=3.0)
    return info.value


def _tls_server(pki: Path, mutual: bool = False, token: str | None = None) -> ServerSecurity:
    return ServerSecurity(
        str(pki / "server.pem"), str(pki / "server.key"), str(pki / "ca.pem") if mutual else None, token
    )


# --------------------------------------------------------------------------- TLS


@pytest.mark.process
def test_tls_serves_clients_that_trust_the_ca_and_refuses_others(pki, other_pki):
    server = _serve(_tls_server(pki))
    try:
        assert _info(server.address, ClientSecurity(tls_ca_file=str(pki / "ca.pem"))).mode == "infer"
        # By name too: the certificate carries DNS:localhost.
        assert _info(f"localhost:{server.port}", ClientSecurity(tls_ca_file=str(pki / "ca.pem"))).num_shards == 1
        # A client trusting another CA cannot verify the server; a plain-text client gets no answer.
        assert (
            _error(server.address, ClientSecurity(tls_ca_file=str(other_pki / "ca.pem"))).code()
            == grpc.StatusCode.UNAVAILABLE
        )
        assert _error(server.address, None).code() == grpc.StatusCode.UNAVAILABLE
        # A name the certificate does not carry is refused.
        wrong_name = ClientSecurity(tls_ca_file=str(pki / "ca.pem"), tls_server_name="evil.example.com")
        assert _error(server.address, wrong_name).code() == grpc.StatusCode.UNAVAILABLE
        # Still serving after the refusals.
        assert _info(server.address, ClientSecurity(tls_ca_file=str(pki / "ca.pem"))).mode == "infer"
    finally:
        server.stop(0)


@pytest.mark.process
def test_mutual_tls_needs_a_client_certificate_from_the_ca(pki, other_pki):
    server = _serve(_tls_server(pki, mutual=True))
    ca = str(pki / "ca.pem")
    try:
        good = ClientSecurity(
            tls_ca_file=ca, tls_cert_file=str(pki / "client.pem"), tls_key_file=str(pki / "client.key")
        )
        assert _info(server.address, good).mode == "infer"
        assert _error(server.address, ClientSecurity(tls_ca_file=ca)).code() == grpc.StatusCode.UNAVAILABLE
        foreign = ClientSecurity(
            tls_ca_file=ca, tls_cert_file=str(other_pki / "client.pem"), tls_key_file=str(other_pki / "client.key")
        )
        assert _error(server.address, foreign).code() == grpc.StatusCode.UNAVAILABLE
        assert _info(server.address, good).mode == "infer"
    finally:
        server.stop(0)


# --------------------------------------------------------------------------- token


@pytest.mark.process
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_token_is_required_and_checked(pki, tls):
    server = _serve(_tls_server(pki, token=TOKEN) if tls else ServerSecurity(token=TOKEN))
    ca = str(pki / "ca.pem") if tls else None
    try:
        missing = _error(server.address, ClientSecurity(tls_ca_file=ca))
        assert missing.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "missing 'authorization' metadata" in missing.details() and "Bearer" in missing.details()
        wrong = _error(server.address, ClientSecurity(tls_ca_file=ca, token="x" * 32))
        assert wrong.code() == grpc.StatusCode.UNAUTHENTICATED and "wrong token" in wrong.details()
        assert TOKEN not in wrong.details()
        good = ClientSecurity(tls_ca_file=ca, token=TOKEN)
        assert _info(server.address, good).mode == "infer"
        # The raw Lookup path (hand-encoded messages, generic handler) is guarded too.
        channel = make_channel(server.address, CHANNEL_OPTIONS, ClientSecurity(tls_ca_file=ca))
        with pytest.raises(grpc.RpcError) as refused:
            channel.unary_unary("/ctrserve.embedding.v1.EmbeddingService/Lookup")(b"", timeout=3)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        channel.close()
        # Health checks need no token (load balancers, Kubernetes probes).
        channel = make_channel(server.address, CHANNEL_OPTIONS, ClientSecurity(tls_ca_file=ca))
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        channel.close()
        assert server.metrics.method_stats() == [] or all(m["errors"] == 0 for m in server.metrics.method_stats())
    finally:
        server.stop(0)


@pytest.mark.unit
def test_malformed_authorization_is_refused():
    server = _serve(ServerSecurity(token=TOKEN))
    channel = grpc.insecure_channel(server.address)
    try:
        info = pb_grpc.EmbeddingServiceStub(channel).Info
        with pytest.raises(grpc.RpcError) as refused:
            info(pb.InfoRequest(), metadata=[("authorization", TOKEN)], timeout=3)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in refused.value.details()
        assert info(pb.InfoRequest(), metadata=[("authorization", f"Bearer {TOKEN}")], timeout=3).mode == "infer"
    finally:
        channel.close()
        server.stop(0)


@pytest.mark.unit
def test_token_sources_and_validation(tmp_path, monkeypatch):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    assert resolve_token(str(token_file), environ={}) == TOKEN
    assert resolve_token(None, "MY_TOKEN", environ={"MY_TOKEN": TOKEN}) == TOKEN
    assert resolve_token(None, "MY_TOKEN", environ={"CTRSERVE_EMBEDDING_TOKEN_FILE": str(token_file)}) == TOKEN
    assert resolve_token(None, "MY_TOKEN", environ={}) is None
    with pytest.raises(ConfigError, match="at least 16 characters"):
        resolve_token(None, "MY_TOKEN", environ={"MY_TOKEN": "short"})
    with pytest.raises(ConfigError, match="cannot read"):
        resolve_token(str(tmp_path / "missing"), environ={})
    with pytest.raises(ConfigError, match="go together"):
        ServerSecurity(tls_cert_file="a.pem")
    with pytest.raises(ConfigError, match="needs tls_cert_file"):
        ServerSecurity(tls_client_ca_file="ca.pem")
    with pytest.raises(ConfigError, match="needs tls_ca_file"):
        ClientSecurity(tls_cert_file="c.pem", tls_key_file="c.key")
    with pytest.raises(ConfigError, match="not a PEM file"):
        _serve(ServerSecurity(str(token_file), str(token_file)))
    assert TOKEN not in repr(ServerSecurity(token=TOKEN)) and TOKEN not in repr(ClientSecurity(token=TOKEN))
    with pytest.raises(ConfigError, match="security.tls_key_file|go together"):
        GlobalConfig.from_dict({"security": {"tls_cert_file": "server.pem"}})


@pytest.mark.process
def test_cli_server_with_tls_and_token_from_the_production_example(pki, tmp_path):
    """``ctrserve embedding-server`` reads the security section; the token file is not a flag value."""
    example = yaml.safe_load((REPO / "deploy/production/global_config.yml").read_text())
    example["security"].update(
        tls_cert_file=str(pki / "server.pem"),
        tls_key_file=str(pki / "server.key"),
        tls_client_ca_file=str(pki / "ca.pem"),
        token_file=str(pki / "token"),
    )
    example["embedding_parameter_server_config"].pop("incremental_dir", None)
    (tmp_path / "global.yml").write_text(yaml.safe_dump(example))
    (tmp_path / "emb.yml").write_text(yaml.safe_dump(EMB.to_dict()))
    ready = tmp_path / "ready.json"
    cmd = server_command(tmp_path / "emb.yml", tmp_path / "global.yml", "--mode", "infer", "--ready-file", ready)
    process = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "server not ready in 30 s"
            time.sleep(0.05)
        address = json.loads(ready.read_text())["address"]
        token = (pki / "token").read_text().strip()
        base = dict(
            tls_ca_file=str(pki / "ca.pem"), tls_cert_file=str(pki / "client.pem"), tls_key_file=str(pki / "client.key")
        )
        assert _info(address, ClientSecurity(**base, token=token)).mode == "infer"
        assert _error(address, ClientSecurity(**base)).code() == grpc.StatusCode.UNAUTHENTICATED
        assert (
            _error(address, ClientSecurity(tls_ca_file=str(pki / "ca.pem"), token=token)).code()
            == grpc.StatusCode.UNAVAILABLE
        )
    finally:
        process.terminate()
        process.wait(timeout=30)


# --------------------------------------------------------------------------- audit: no unsafe deserialisation

SOURCE_DIRS = (
    "embedding_server",
    "trainer",
    "handler",
    "archiver",
    "protos",
    "ctrserve",
    "benchmarks",
    "deploy",
    "tests",
)
#: (file, call) pairs allowed to use a forbidden call, with the reason.
ALLOWED: dict[tuple[str, str], str] = {}


def _forbidden_calls(tree: ast.AST) -> list[tuple[int, str]]:
    """Calls that deserialise code-bearing data: pickle/marshal/dill/shelve, torch.load without
    weights_only=True, numpy loads with allow_pickle=True, yaml.load/unsafe_load, eval/exec."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in names:
                if name.split(".")[0] in ("pickle", "cPickle", "dill", "marshal", "shelve", "cloudpickle", "joblib"):
                    found.append((node.lineno, f"import {name}"))
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        keywords = {k.arg: k.value for k in node.keywords}
        if name.endswith("torch.load") or name == "torch.load":
            value = keywords.get("weights_only")
            if not (isinstance(value, ast.Constant) and value.value is True):
                found.append((node.lineno, "torch.load without weights_only=True"))
        elif name in ("np.load", "numpy.load"):
            value = keywords.get("allow_pickle")
            if value is not None and not (isinstance(value, ast.Constant) and value.value is False):
                found.append((node.lineno, "np.load with allow_pickle"))
        elif name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all", "yaml.unsafe_load_all"):
            found.append((node.lineno, name))
        elif name in ("eval", "exec", "pd.read_pickle", "pandas.read_pickle"):
            found.append((node.lineno, name))
    return found


@pytest.mark.unit
def test_no_unsafe_deserialisation_in_the_source_tree():
    problems = []
    files = [p for d in SOURCE_DIRS for p in (REPO / d).rglob("*.py") if "_generated" not in p.parts]
    assert len(files) > 40
    for path in files:
        rel = str(path.relative_to(REPO))
        for line, call in _forbidden_calls(ast.parse(path.read_text(), rel)):
            if (rel, call) not in ALLOWED:
                problems.append(f"{rel}:{line}: {call}")
    assert problems == [], "unsafe deserialisation (add to ALLOWED only with a reason):\n" + "\n".join(problems)


@pytest.mark.unit
def test_the_audit_catches_what_it_should():
    code = (
        "import pickle\ntorch.load(f)\ntorch.load(f, weights_only=False)\nnp.load(f, allow_pickle=True)\nyaml.load(s)\n"
    )
    assert [c for _, c in _forbidden_calls(ast.parse(code))] == [
        "import pickle",
        "torch.load without weights_only=True",
        "torch.load without weights_only=True",
        "np.load with allow_pickle",
        "yaml.load",
    ]
    assert _forbidden_calls(ast.parse("torch.load(f, weights_only=True)\nnp.load(f)\nyaml.safe_load(s)\n")) == []


# --------------------------------------------------------------------------- listings: no traversal


def _hostile_storage(root: Path, extra: list[str]):
    """A local storage whose listings also return whatever a hostile or broken backend might."""
    from embedding_server.storage.base import LocalStorage

    class Hostile(LocalStorage):
        def list_dir(self, path: str = "") -> list[str]:
            return sorted(set(super().list_dir(path)) | set(extra))

    return Hostile(str(root))


HOSTILE_NAMES = [
    "../x",
    "../../etc/passwd",
    "/etc/passwd",
    "/abs",
    "..",
    ".",
    "",
    "00000000000000000001.arrow/../../x",
    "shard-00000-of-00001/../..",
    "v00000001/../../x",
    "0000000001/../../x",
    "C:\\x",
    "\\\\server\\share",
]


@pytest.mark.unit
def test_listing_names_are_plain_on_every_backend(tmp_path):
    from embedding_server.storage.base import StorageError, plain_names
    from embedding_server.storage.urls import open_storage

    assert plain_names("x", HOSTILE_NAMES + ["ok"]) == ["C:\\x", "\\\\server\\share", "ok"]
    storage = open_storage(str(tmp_path))
    for name in HOSTILE_NAMES:
        if name and "/" in name or name.startswith("/"):
            with pytest.raises(StorageError, match="must be relative and stay inside the storage root"):
                storage.read_bytes(name)


@pytest.mark.unit
def test_readers_of_listings_accept_only_their_patterns(tmp_path):
    """Hot-loading, retention and publishing pick names by pattern, so a listing entry like
    ``../x`` or ``/abs`` never becomes a path they read or delete."""
    from embedding_server.core import model_spec
    from embedding_server.modelroot import incremental, packets

    hostile = HOSTILE_NAMES + ["C:\\x"]
    assert all(packets.parse_packet_name(n) is None for n in hostile)
    assert all(packets.parse_shard_dir(n) is None for n in hostile)
    assert all(model_spec.parse_version_dir(n) is None for n in hostile)
    assert packets.parse_packet_name("00000000000000000001.arrow") == 1
    # Retention on a root whose listings carry hostile names deletes only pattern names inside it.
    from embedding_server.modelroot import checkpoint
    from embedding_server.store.store import EmbeddingStore

    root = tmp_path / "root"
    outside = tmp_path / "x"
    outside.write_text("precious")
    store = EmbeddingStore(EMB, GlobalConfig.from_dict({}), 0, 1)
    store.lookup(np.arange(4, dtype=np.uint64), np.zeros(4, np.uint16))
    for number in (1, 2):
        checkpoint.dump_stores(
            [store], str(root / "checkpoints" / incremental.checkpoint_name(number)), watermark={"0": number}
        )
    storage = _hostile_storage(root, hostile)
    names = [incremental.checkpoint_name(n) for n in (1, 2)]
    assert incremental.complete_checkpoints(storage) == names
    incremental.retain(storage, keep=1)
    assert outside.read_text() == "precious"
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == names[1:]


@pytest.mark.unit
def test_torchserve_production_config_keeps_token_authorization_on():
    text = (REPO / "deploy/torchserve/config.production.properties").read_text()
    settings = dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))
    assert settings["disable_token_authorization"].strip() == "false"
    assert settings["management_address"].startswith("http://127.0.0.1")


# --------------------------------------------------------------------------- the client and the handler's settings


@pytest.mark.process
def test_remote_client_with_handler_settings_reaches_a_secured_server(pki):
    from embedding_server.core.errors import ShardUnavailableError
    from embedding_server.rpc.remote import RemoteEmbeddingClient
    from handler.serving_config import ServingConfig

    token = (pki / "token").read_text().strip()
    server = _serve(ServerSecurity(str(pki / "server.pem"), str(pki / "server.key"), str(pki / "ca.pem"), token))
    serving = ServingConfig(
        embedding_tls_ca_file=str(pki / "ca.pem"),
        embedding_tls_cert_file=str(pki / "client.pem"),
        embedding_tls_key_file=str(pki / "client.key"),
        embedding_token_file=str(pki / "token"),
    )
    try:
        security = serving.client_security(environ={})
        assert security is not None and security.token == token and security.tls
        with RemoteEmbeddingClient(EMB, [server.address], timeout=5, connect_timeout=5, security=security) as client:
            assert client.stats()[0]["capacity"] == server.store.capacity
        no_token = ServingConfig(
            embedding_tls_ca_file=str(pki / "ca.pem"),
            embedding_tls_cert_file=str(pki / "client.pem"),
            embedding_tls_key_file=str(pki / "client.key"),
        ).client_security(environ={})
        started = time.monotonic()
        with pytest.raises(ShardUnavailableError, match="UNAUTHENTICATED"):
            RemoteEmbeddingClient(EMB, [server.address], timeout=5, connect_timeout=5, security=no_token)
        assert time.monotonic() - started < 5  # refused, not waited out
    finally:
        server.stop(0)
    # The token may come from the worker's environment instead of a file; nothing set: no security.
    assert ServingConfig().client_security(environ={"CTRSERVE_EMBEDDING_TOKEN": TOKEN}).token == TOKEN
    assert ServingConfig().client_security(environ={}) is None
    with pytest.raises(ConfigError, match="must be a string"):
        ServingConfig.from_dict({"embedding_token_file": 5})


@pytest.mark.process
def test_embedding_admin_reaches_a_secured_server(pki):
    token = (pki / "token").read_text().strip()
    server = _serve(_tls_server(pki, token=token))
    emb_file = pki / "emb.yml"
    emb_file.write_text(yaml.safe_dump(EMB.to_dict()))
    ca = pki / "ca.pem"
    base = ctrserve_command(
        "embedding-admin", "stats", "--servers", server.address, "--embedding-config", emb_file, "--tls-ca", ca
    )
    try:
        ok = subprocess.run(
            base + ["--token-file", str(pki / "token")], cwd=REPO, capture_output=True, text=True, timeout=60
        )
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout)[0]["capacity"] == server.store.capacity
        refused = subprocess.run(
            base,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            env={k: v for k, v in os.environ.items() if not k.startswith("CTRSERVE_EMBEDDING_TOKEN")},
        )
        assert refused.returncode != 0 and "UNAUTHENTICATED" in refused.stderr
    finally:
        server.stop(0)
