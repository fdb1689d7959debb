"""Serving through a REAL TorchServe 0.12 with REAL embedding servers (2 shards, child processes).

One TorchServe instance for ctrserve's archives and one for PERSIA's serving flow (a bare
TorchScript archive, PERSIA's handler shape on ``InferCtx`` and PERSIA's gRPC client), each
isolated (own TEMP/TMPDIR, logs, metrics, free loopback ports, own process session; the whole
process group is stopped at the end). Scores are
compared with an independent computation: the same TorchScript file run directly on
embeddings looked up directly from the embedding servers.

The generated TorchServe API stubs (``protos/torchserve.py``) are checked here too.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import requests
import torch

from archiver.build import archive_model, archiver_command, handler_file
from archiver.management import ManagementClient, ManagementError
from archiver.publish import Publisher, PublisherMetrics, PublishSettings
from archiver.torchserve import TorchServeProcess
from ctrserve import monitoring
from ctrserve.cli import main
from embedding_server.core.batch import SparseFeature
from embedding_server.core.config import EmbeddingConfig
from embedding_server.rpc.launcher import ServerGroup
from embedding_server.rpc.remote import RemoteEmbeddingClient
from handler.client import PredictionClient, PredictionError
from handler.torchserve_keys import TorchServeKey
from persia.embedding.data import IDTypeFeatureWithSingleID, NonIDTypeFeature, PersiaBatch
from trainer.criteo import read_criteo
from trainer.data import concat_chunks, to_batch

CRITEO_SAMPLE = Path("/work/shared/data/criteo_sample.csv")

pytestmark = [pytest.mark.process, pytest.mark.timeout(240)]
TOL = 1e-6


class Serving:
    """Everything the tests share: embedding servers, model root, model store, TorchServe."""

    def __init__(self, root: Path, group: ServerGroup, emb_path: Path, ts: TorchServeProcess, kit):
        self.root, self.group, self.ts, self.kit = root, group, ts, kit
        self.emb = EmbeddingConfig.load(emb_path)
        self.model_root = root / "model_root"
        self.store = root / "store"
        self.serving_yml = root / "serving.yml"
        self.lookups = RemoteEmbeddingClient(self.emb, group.addresses)

    def version_dir(self, version: int) -> Path:
        """The exported version (exported now, with seed = version, when missing)."""
        target = self.model_root / "dense" / f"v{version:08d}"
        return (
            target
            if (target / "model.json").exists()
            else self.kit.export_version(self.model_root, version, seed=version)
        )

    def client(self, transport: str, **kwargs) -> PredictionClient:
        return PredictionClient(self.ts.grpc_inference_url if transport == "grpc" else self.ts.inference_url, **kwargs)


@pytest.fixture(scope="module")
def serving(tmp_path_factory, tiny_ctr) -> Serving:
    root = tmp_path_factory.mktemp("serving")
    emb_path, glob_path = tiny_ctr.write_configs(root / "cfg")
    v1 = tiny_ctr.export_version(root / "model_root", 1, seed=1)
    with ServerGroup.start(emb_path, glob_path, num_shards=2, workdir=root / "embedding") as group:
        (root / "serving.yml").write_text(json.dumps({"embedding_servers": group.addresses, "max_batch_size": 256}))
        archive_model(v1, root / "store", serving_config=root / "serving.yml")
        with TorchServeProcess.start(root / "store", root / "torchserve", models={"deepctr": "deepctr.mar"}) as ts:
            env = Serving(root, group, emb_path, ts, tiny_ctr)
            yield env
            env.lookups.close()
        pgid = ts.process.pid
    with pytest.raises(ProcessLookupError):  # nothing of TorchServe is left running
        os.killpg(pgid, 0)


@pytest.mark.parametrize("transport", ["grpc", "rest"])
@pytest.mark.parametrize("form", ["bytes", "json"])
def test_scores_equal_direct_computation(serving, transport, form, tiny_ctr):
    rng = np.random.default_rng(hash((transport, form)) % 2**32)
    with serving.client(transport) as client:
        for batch_size in (1, 37):
            batch = tiny_ctr.random_batch(rng, batch_size)
            result = client.predict_full(batch if form == "bytes" else tiny_ctr.as_json(batch))
            expected = tiny_ctr.expected_scores(serving.version_dir(1), serving.lookups, batch)
            assert result.scores.shape == (batch_size,)
            np.testing.assert_allclose(result.scores, expected, rtol=0, atol=TOL)
            assert result.model_version == 1
            assert result.raw["model_step"] == 100 and result.raw["embedding_watermark"] == {}


def _bad_requests(kit, rng) -> dict[str, tuple[object, int, str]]:
    good = kit.random_batch(rng, 4)
    unknown = kit.as_json(good)
    unknown["sparse"]["C9"] = [[1]] * 4
    narrow = kit.as_json(good)
    narrow["dense"] = [row[:-1] for row in narrow["dense"]]
    return {
        "undecodable": (b"CTRB" + b"\x00" * 20, 400, "undecodable batch bytes"),
        "not a batch": (b"\x89PNG....", 400, "neither ctrserve batch bytes"),
        "unknown feature": (unknown, 400, "unknown feature 'C9'; the model takes: C1, C2, C3, H1"),
        "wrong dense width": (
            narrow,
            400,
            f"dense width {kit.DENSE_WIDTH - 1} does not match the model's dense_width {kit.DENSE_WIDTH}",
        ),
        "too large": (kit.random_batch(rng, 257), 400, "batch of 257 samples exceeds the limit of 256"),
        "empty body": (b"", 400, "empty request body"),
    }


@pytest.mark.parametrize("transport", ["grpc", "rest"])
def test_bad_requests_get_4xx_with_message_and_worker_keeps_serving(serving, transport, tiny_ctr):
    rng = np.random.default_rng(7)
    good = tiny_ctr.random_batch(rng, 3)
    with serving.client(transport) as client:
        for kind, (body, code, message) in _bad_requests(tiny_ctr, rng).items():
            with pytest.raises(PredictionError) as err:
                client.predict(body)
            assert (err.value.code, kind) == (code, kind)
            assert message in err.value.message, (kind, err.value.message)
            np.testing.assert_allclose(
                client.predict(good), tiny_ctr.expected_scores(serving.version_dir(1), serving.lookups, good), atol=TOL
            )


def test_rest_error_is_json_with_status(serving):
    response = requests.post(
        f"{serving.ts.inference_url}/predictions/deepctr",
        data=b"nonsense",
        headers={"Content-Type": "application/octet-stream"},
    )
    assert response.status_code == 400
    assert "undecodable request" in response.json()["message"]


def test_torchserve_exports_the_series_the_dashboards_and_alerts_use(serving, tiny_ctr):
    """deploy/grafana and deploy/prometheus query TorchServe's own series by name
    (ctrserve.monitoring.TORCHSERVE_SERIES; tests/test_operations.py checks ctrserve's)."""
    requests.post(f"{serving.ts.inference_url}/predictions/deepctr", data=b"nonsense")  # a 4xx
    names: set[str] = set()
    deadline = time.monotonic() + 20
    with serving.client("rest") as client:
        # The handler hands its timings over once per metrics_interval_s (1 s): predict past it.
        while not monitoring.TORCHSERVE_SERIES <= names and time.monotonic() < deadline:
            client.predict(tiny_ctr.random_batch(np.random.default_rng(11), 2))
            time.sleep(0.3)
            text = requests.get(f"{serving.ts.metrics_url}/metrics", timeout=10).text
            names |= {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and line[0] != "#"}
            names |= {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    assert monitoring.TORCHSERVE_SERIES <= names, sorted(monitoring.TORCHSERVE_SERIES - names)


def _json_body_over_8_mib(samples: int, ids_per_list: int = 460) -> bytes:
    """A valid JSON request of about 9.4 MB (over max_json_request_bytes' default of 8 MiB, under
    max_request_bytes): ``samples`` samples, each feature of each sample ``ids_per_list`` 19-digit
    ids out of 500 distinct ones (what the embedding servers then hold is small)."""
    ids = "[" + ",".join(str(10**18 + 7919 * i) for i in range(ids_per_list)) + "]"
    feature = "[" + ",".join([ids] * samples) + "]"
    dense = "[" + ",".join(["[0.5,0.25,0.125,1.0,2.0]"] * samples) + "]"
    sparse = ",".join(f'"{name}":{feature}' for name in ("C1", "C2", "C3", "H1"))
    return f'{{"dense":{dense},"sparse":{{{sparse}}}}}'.encode()


@pytest.mark.parametrize("content_type", ["application/json", "text/plain", "application/octet-stream"])
def test_the_json_size_limit_holds_for_every_content_type(serving, tiny_ctr, content_type):
    # TorchServe's worker parses an application/json body before the handler sees it, so a parsed
    # body used to skip max_json_request_bytes and be scored; the handler now gets every body as bytes.
    body = _json_body_over_8_mib(256)  # the fixture's max_batch_size
    assert 8 << 20 < len(body) < 64 << 20
    response = requests.post(
        f"{serving.ts.inference_url}/predictions/deepctr",
        data=body,
        headers={"Content-Type": content_type},
        timeout=120,
    )
    assert response.status_code == 400, response.text[:300]
    assert (
        f"JSON request of {len(body)} bytes exceeds the limit of 8388608 bytes (max_json_request_bytes)"
        in (response.json()["message"])
    )
    with serving.client("rest") as client:  # PredictionClient sends JSON as application/json
        with pytest.raises(PredictionError, match="max_json_request_bytes") as err:
            client.predict(json.loads(body))
        assert err.value.code == 400
        good = tiny_ctr.random_batch(np.random.default_rng(5), 3)  # the worker keeps serving
        np.testing.assert_allclose(
            client.predict(tiny_ctr.as_json(good)),
            tiny_ctr.expected_scores(serving.version_dir(1), serving.lookups, good),
            atol=TOL,
        )


def test_torchserve_batching_returns_each_request_its_own_result(serving, tiny_ctr):
    """Registered with batch_size=8: concurrent clients are batched into one handler call; every
    request gets its own scores, and a bad request in the batch fails alone."""
    with serving.ts.management() as mgmt:
        mgmt.register("deepctr.mar", model_name="batched", batch_size=8, max_batch_delay_ms=200, initial_workers=1)
    rng = np.random.default_rng(11)
    batches = [tiny_ctr.random_batch(rng, n) for n in (1, 2, 3, 5, 8, 13, 4, 6)]
    expected = [tiny_ctr.expected_scores(serving.version_dir(1), serving.lookups, b) for b in batches]
    bad_index = 3
    clients = [serving.client("grpc" if i % 2 else "rest", model_name="batched") for i in range(len(batches))]

    def send(i: int):
        try:
            return clients[i].predict_full(b"garbage-body" if i == bad_index else batches[i])
        except PredictionError as exc:
            return exc

    with ThreadPoolExecutor(len(batches)) as pool:
        results = list(pool.map(send, range(len(batches))))
    for i, result in enumerate(results):
        if i == bad_index:
            assert (
                isinstance(result, PredictionError) and result.code == 400 and "undecodable request" in result.message
            )
            continue
        assert not isinstance(result, Exception), result
        np.testing.assert_allclose(result.scores, expected[i], atol=TOL)
    assert max(r.raw["batch_requests"] for r in results if not isinstance(r, Exception)) > 1, "TorchServe never batched"
    for c in clients:
        c.close()


def scrape(port: int) -> dict[str, float]:
    """``{series: value}`` of ``http://127.0.0.1:port/metrics`` (a Prometheus text page)."""
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {
        series: float(value)
        for series, _, value in (line.rpartition(" ") for line in text.splitlines() if line and line[0] != "#")
    }


def test_publish_rolls_new_version_without_failing_a_request(serving, tiny_ctr):
    """A client streams requests while the publisher archives, registers, waits for, switches to
    and retires versions: no request fails and answers move from version 2 to 3. The publisher's
    metrics (scraped over HTTP) count both publishes, and a poll against a TorchServe that cannot
    be reached (connection refused) as a failure."""
    settings = PublishSettings(
        str(serving.model_root),
        str(serving.store),
        name="rolling",
        keep=1,
        serving_config=str(serving.serving_yml),
        drain_s=0.5,
    )
    tiny_ctr.export_version(serving.model_root, 2, seed=2)
    metrics = PublisherMetrics()
    port = metrics.serve_http(0)
    with ManagementClient(serving.ts.management_url) as mgmt:
        publisher = Publisher(mgmt, settings, metrics)
        began = time.time()
        assert publisher.poll_once() == 2
        got = scrape(port)
        assert got["ctrserve_publisher_versions_published_total"] == 1
        assert got["ctrserve_publisher_published_version"] == got["ctrserve_publisher_newest_version"] == 2
        assert began <= got["ctrserve_publisher_last_publish_timestamp_seconds"] <= time.time()
        assert publisher.poll_once() is None  # nothing new
        assert scrape(port)["ctrserve_publisher_versions_published_total"] == 1
        batch = tiny_ctr.random_batch(np.random.default_rng(5), 16)
        seen, failures, stop = [], [], threading.Event()

        def stream():
            with serving.client("grpc", model_name="rolling") as client:
                while not stop.is_set():
                    try:
                        seen.append(client.predict_full(batch).model_version)
                    except PredictionError as exc:
                        failures.append(exc)

        streamer = threading.Thread(target=stream)
        streamer.start()
        try:
            time.sleep(0.3)
            tiny_ctr.export_version(serving.model_root, 3, seed=3)
            assert publisher.poll_once() == 3
            time.sleep(0.3)
        finally:
            stop.set()
            streamer.join()
        assert failures == []
        assert seen[0] == 2 and seen[-1] == 3 and sorted(seen) == seen
        assert mgmt.versions("rolling") == ["3"] and mgmt.default_version("rolling") == "3"
        assert not (serving.store / "rolling-v00000002.mar").exists()
    got = scrape(port)
    assert got["ctrserve_publisher_versions_published_total"] == 2 and got["ctrserve_publisher_failures_total"] == 0
    assert got["ctrserve_publisher_published_version"] == got["ctrserve_publisher_newest_version"] == 3
    published_at = got["ctrserve_publisher_last_publish_timestamp_seconds"]
    # A real failure: version 4 is exported, but the management address refuses connections (a
    # bound socket that never listens), as when TorchServe is down.
    v4 = tiny_ctr.export_version(serving.model_root, 4, seed=4)
    try:
        with socket.socket() as silent, ManagementClient(f"http://127.0.0.1:{_bound_port(silent)}", timeout=5) as away:
            with pytest.raises(ManagementError) as err:
                Publisher(away, settings, metrics).poll_once()
            assert err.value.code == 503
    finally:
        shutil.rmtree(v4)  # the module's other tests see versions 1 to 3 only
    got = scrape(port)
    assert got["ctrserve_publisher_failures_total"] == 1 and got["ctrserve_publisher_newest_version"] == 4
    assert got["ctrserve_publisher_published_version"] == 3 and got["ctrserve_publisher_versions_published_total"] == 2
    assert got["ctrserve_publisher_last_publish_timestamp_seconds"] == published_at
    with serving.client("rest", model_name="rolling") as client:
        np.testing.assert_allclose(
            client.predict(batch), tiny_ctr.expected_scores(serving.version_dir(3), serving.lookups, batch), atol=TOL
        )


def _bound_port(sock: socket.socket) -> int:
    """Bind ``sock`` to a free loopback port without listening: connections to it are refused."""
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def test_archive_register_set_default_unregister_over_rest_and_grpc(serving, tiny_ctr):
    """Every management call over both transports, on one model with two versions."""
    name = "managed"
    for version in (1, 2):
        archive_model(
            serving.version_dir(version),
            serving.store,
            name=name,
            serving_config=serving.serving_yml,
            file_name=f"{name}-{version}",
        )
    batch = tiny_ctr.random_batch(np.random.default_rng(3), 4)
    with (
        ManagementClient(serving.ts.management_url) as rest,
        ManagementClient(serving.ts.grpc_management_url) as grpc_mgmt,
        serving.client("grpc", model_name=name) as client,
    ):
        both = (rest, grpc_mgmt)
        rest.register(f"{name}-1.mar")
        grpc_mgmt.register(f"{name}-2.mar")
        for mgmt in both:
            assert sorted(mgmt.versions(name)) == ["1", "2"]
            assert name in [m["modelName"] for m in mgmt.list_models()]
            assert mgmt.default_version(name) == "1"
        # REST says 409; TorchServe 0.12's gRPC API answers UNKNOWN without details here.
        for mgmt, code in ((rest, 409), (grpc_mgmt, 500)):
            with pytest.raises(ManagementError) as err:
                mgmt.register(f"{name}-1.mar")
            assert err.value.code == code
        for mgmt, version in ((grpc_mgmt, "2"), (rest, "1"), (rest, "2")):
            mgmt.set_default(name, version)
            assert client.predict_full(batch).model_version == int(version)
            assert grpc_mgmt.default_version(name) == version
        rest.unregister(name, "1")
        assert grpc_mgmt.versions(name) == ["2"]
        grpc_mgmt.unregister(name, "2")
        assert rest.versions(name) == [] and grpc_mgmt.versions(name) == []
        for mgmt in both:
            with pytest.raises(ManagementError) as err:
                mgmt.describe("no-such-model")
            assert err.value.code == 404


def _expirations(key_file: Path) -> float:
    """The latest expiry (epoch seconds) of the management and inference keys in TorchServe's key file."""
    keys = json.loads(key_file.read_text())
    stamps = [keys[kind]["expiration time"] for kind in ("management", "inference")]
    return max(datetime.fromisoformat(s[:26].rstrip("Z") + "+00:00").timestamp() for s in stamps)


def _renew(ts: TorchServeProcess, kind: str) -> None:
    """What whoever runs TorchServe does before a key expires: TorchServe's token API, with the
    API key of its key file (TorchServe writes the new key there)."""
    api_key = json.loads((ts.workdir / "key_file.json").read_text())["API"]["key"]
    response = requests.get(
        f"{ts.management_url}/token", params={"type": kind}, headers={"Authorization": f"Bearer {api_key}"}, timeout=30
    )
    assert response.status_code == 200, response.text


def test_publish_and_predict_keep_working_past_torchserve_key_expiry(serving, tmp_path, capsys, tiny_ctr):
    """Token authorization on, as in production, with keys that expire after 6 s instead of 60 min:
    the publisher and the prediction clients read the key file again when TorchServe refuses an
    expired key; the management client renews it itself through the token API."""
    root, store = tmp_path / "model_root", tmp_path / "store"
    store.mkdir()
    tiny_ctr.export_version(root, 1, seed=1)
    (tmp_path / "serving.yml").write_text(json.dumps({"embedding_servers": serving.group.addresses}))
    # token_expiration_min is read as a number of minutes, fractions included: 0.1 is 6 s.
    properties = {"disable_token_authorization": "false", "token_expiration_min": "0.1"}
    settings = PublishSettings(str(root), str(store), serving_config=str(tmp_path / "serving.yml"), drain_s=0)
    batch = tiny_ctr.random_batch(np.random.default_rng(17), 6)
    with TorchServeProcess.start(store, tmp_path / "torchserve", properties=properties) as ts:
        key_file = ts.workdir / "key_file.json"
        inference = TorchServeKey("inference", key_file=key_file)
        with (
            ManagementClient(ts.management_url, token=TorchServeKey("management", key_file=key_file)) as mgmt,
            PredictionClient(ts.inference_url, token=inference) as rest,
            PredictionClient(ts.grpc_inference_url, token=inference) as grpc_client,
        ):
            publisher = Publisher(mgmt, settings)  # one long-lived client, as `ctrserve publish --watch`
            assert publisher.poll_once() == 1
            _renew(ts, "inference")
            for client in (rest, grpc_client):
                assert client.predict_full(batch).model_version == 1
            expired = json.loads(key_file.read_text())
            # The one bare wait of this test: until every key handed out so far has expired.
            time.sleep(max(0.0, _expirations(key_file) - time.time()) + 0.5)
            with PredictionClient(ts.inference_url, token=expired["inference"]["key"]) as stale:
                with pytest.raises(PredictionError, match="Token Authorization failed"):
                    stale.predict(batch)  # TorchServe refuses it now; a fixed key cannot be read again
            # The command line renews the expired management key (TorchServe rewrites the file) ...
            listed = json.loads(
                ctrserve(capsys, "list", "deepctr", "--management", ts.management_url, "--key-file", str(key_file))
            )
            assert [v["modelVersion"] for v in listed] == ["1"]
            assert json.loads(key_file.read_text())["management"]["key"] != expired["management"]["key"]
            # ... which the publisher, still holding the expired one, reads again.
            tiny_ctr.export_version(root, 2, seed=2)
            assert publisher.poll_once() == 2
            _renew(ts, "inference")  # the clients hold the expired inference key: refused, read again
            expected = tiny_ctr.expected_scores(root / "dense" / "v00000002", serving.lookups, batch)
            for client in (rest, grpc_client):
                result = client.predict_full(batch)
                assert result.model_version == 2
                np.testing.assert_allclose(result.scores, expected, atol=TOL)


def ctrserve(capsys, *args: str) -> str:
    """Run a ctrserve sub-command in this process (a fresh interpreter costs seconds here)."""
    capsys.readouterr()
    rc = main(["--log-level", "WARNING", *args])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return captured.out


@pytest.mark.skipif(not CRITEO_SAMPLE.exists(), reason="needs the shared Criteo sample")
def test_cli_archive_register_predict_a_criteo_file(serving, tmp_path, capsys, tiny_ctr):
    """The commands a user runs: archive, register (gRPC management), predict (gRPC), unregister."""
    emb_path, glob_path = tiny_ctr.write_configs(tmp_path / "cfg", tiny_ctr.CRITEO_EMB)
    model_dir = tiny_ctr.export_version(tmp_path / "root", 1, seed=9, emb_config=tiny_ctr.CRITEO_EMB, dense_width=13)
    with ServerGroup.start(emb_path, glob_path, num_shards=1, workdir=tmp_path / "embedding") as group:
        (tmp_path / "serving.yml").write_text(json.dumps({"embedding_servers": group.addresses}))
        ctrserve(
            capsys,
            "archive",
            "--model-dir",
            str(model_dir),
            "--out",
            str(serving.store),
            "--name",
            "criteo",
            "--serving-config",
            str(tmp_path / "serving.yml"),
        )
        ctrserve(capsys, "register", "criteo.mar", "--management", serving.ts.grpc_management_url)
        ctrserve(
            capsys,
            "predict",
            "--input",
            str(CRITEO_SAMPLE),
            "--grpc",
            serving.ts.grpc_inference_url[len("grpc://") :],
            "--model",
            "criteo",
            "--batch-size",
            "50",
            "--limit",
            "120",
            "--output",
            str(tmp_path / "scores.txt"),
        )
        scores = np.loadtxt(tmp_path / "scores.txt")
        batch = to_batch(concat_chunks(list(read_criteo(CRITEO_SAMPLE))).slice(0, 120))
        with RemoteEmbeddingClient(EmbeddingConfig.load(emb_path), group.addresses) as lookups:
            expected = tiny_ctr.expected_scores(model_dir, lookups, batch)
        np.testing.assert_allclose(scores, expected, atol=1e-6)
        assert "criteo" in ctrserve(capsys, "list", "--management", serving.ts.management_url)
        ctrserve(capsys, "unregister", "criteo", "1", "--management", serving.ts.management_url)


# ------------------------------------------------------------- the TorchServe API stubs (protos/torchserve.py)


def test_torchserve_stubs_are_generated_not_committed():
    from protos.torchserve import inference_pb2, management_pb2

    assert "Predictions" in inference_pb2.DESCRIPTOR.services_by_name["InferenceAPIsService"].methods_by_name
    assert "SetDefault" in management_pb2.DESCRIPTOR.services_by_name["ManagementAPIsService"].methods_by_name
    tracked = subprocess.run(["git", "ls-files", "protos"], capture_output=True, text=True, check=True).stdout.split()
    assert not any(name.endswith(("inference.proto", "management.proto")) or "_generated" in name for name in tracked)


# ------------------------------------------- PERSIA's serving flow: bare TorchScript, InferCtx handler, PERSIA client

PERSIA_EMB = {"slots_config": {"workclass": {"dim": 4}, "education": {"dim": 8}, "race": {"dim": 4}}}
PERSIA_HANDLER = Path(__file__).resolve().parents[1] / "deploy" / "examples" / "persia" / "serve_handler.py"
PERSIA_CLIENT = PERSIA_HANDLER.with_name("serve_client.py")


class PersiaDnn(torch.nn.Module):
    """A dense model with PERSIA's signature (as PERSIA's adult-income DNN)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.ln1 = torch.nn.Linear(5 + 16, 8)
        self.ln2 = torch.nn.Linear(8, 1)

    def forward(self, non_id_tensors: list[torch.Tensor], embedding_tensors: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat([non_id_tensors[0]] + embedding_tensors, dim=1)
        return torch.sigmoid(self.ln2(torch.relu(self.ln1(x))))


class PersiaFlow:
    """One TorchServe with the three ways PERSIA's guide serves: a bare TorchScript archive with
    ctrserve's handler (``deepctr``), the same with ``response_format: persia``
    (``deepctr_persia``), and PERSIA's handler shape on ``InferCtx`` (``adult_income``)."""

    def __init__(self, root: Path, group: ServerGroup, ts: TorchServeProcess, data: Path, expected: np.ndarray):
        self.root, self.group, self.ts, self.data, self.expected = root, group, ts, data, expected

    def run_client(self, model: str) -> subprocess.CompletedProcess:
        """PERSIA's client, as a user runs it."""
        address = self.ts.grpc_inference_url[len("grpc://") :]
        out = self.root / f"{model}.txt"
        cmd = [sys.executable, str(PERSIA_CLIENT), "--data", str(self.data), "--address", address]
        return subprocess.run(
            [*cmd, "--model", model, "--batch-size", "128", "--output", str(out)], capture_output=True, text=True
        )


def _torch_model_archiver(name: str, serialized: Path, handler: Path, out: Path, extra: Path | None = None) -> None:
    """PERSIA's guide's command: the serialized TorchScript and a handler file, nothing else."""
    cmd = [archiver_command(), "--model-name", name, "--version", "1.0", "--serialized-file", str(serialized)]
    cmd += ["--handler", str(handler), "--export-path", str(out), "-f"]
    subprocess.run(cmd + (["--extra-files", str(extra)] if extra else []), check=True, capture_output=True)


@pytest.fixture(scope="module")
def persia_flow(tmp_path_factory, tiny_ctr, registered_servers) -> PersiaFlow:
    root = tmp_path_factory.mktemp("persia_flow")
    emb_path, glob_path = tiny_ctr.write_configs(root / "cfg", PERSIA_EMB)
    rng = np.random.default_rng(21)
    n = 300
    dense = rng.normal(size=(n, 5)).astype(np.float32)
    ids = rng.integers(0, 60, (n, 3)).astype(np.uint64)
    data = root / "test.npz"
    np.savez(
        data,
        continuous_data=dense,
        categorical_data=ids,
        categorical_columns=np.array(list(PERSIA_EMB["slots_config"])),
        target=rng.integers(0, 2, n).astype(np.float32),
    )
    store = root / "store"
    store.mkdir()
    scripted = torch.jit.script(PersiaDnn().eval())
    scripted.save(str(root / "jit_dense.pt"))
    shutil.copyfile(root / "jit_dense.pt", root / "model.pth")  # the guide's name: TorchServe's BaseHandler refuses it
    (root / "serving.yml").write_text("response_format: persia\n")
    _torch_model_archiver("deepctr", root / "model.pth", handler_file(), store)
    _torch_model_archiver("deepctr_persia", root / "model.pth", handler_file(), store, root / "serving.yml")
    _torch_model_archiver("adult_income", root / "jit_dense.pt", PERSIA_HANDLER, store)
    with registered_servers(emb_path, glob_path, root / "embedding", num_shards=2) as (group, registry):
        names = list(PERSIA_EMB["slots_config"])
        features = [SparseFeature.from_lists(name, [[i] for i in ids[:, k].tolist()]) for k, name in enumerate(names)]
        with RemoteEmbeddingClient(EmbeddingConfig.load(emb_path), group.addresses) as direct:
            direct.lookup(features, insert=True)  # train-mode servers: rows for every id of the data
            looked_up = direct.lookup(features, insert=False)
        with torch.no_grad():  # the independent computation: the TorchScript file on direct lookups
            expected = torch.jit.load(str(root / "jit_dense.pt"))(
                [torch.from_numpy(dense)], [looked_up[name] for name in names]
            )[:, 0].numpy()
        environment = {"CTRSERVE_EMBEDDING_SERVERS": ",".join(group.addresses)}
        environment["EMBEDDING_WORKER_SERVICE"] = registry.address
        models = {name: f"{name}.mar" for name in ("deepctr", "deepctr_persia", "adult_income")}
        with TorchServeProcess.start(store, root / "torchserve", models=models, environment=environment) as ts:
            yield PersiaFlow(root, group, ts, data, expected)


def test_bare_torchscript_archive_learns_its_features_from_the_embedding_servers(persia_flow):
    """No model.json: the features come from the embedding servers' Info, the signature (PERSIA's)
    from the TorchScript; ctrserve's answer stays the default."""
    with np.load(persia_flow.data) as data:
        dense, ids = data["continuous_data"][:40], data["categorical_data"][:40]
    batch = PersiaBatch(
        [IDTypeFeatureWithSingleID(name, ids[:, k].copy()) for k, name in enumerate(PERSIA_EMB["slots_config"])],
        non_id_type_features=[NonIDTypeFeature(dense.copy())],
        requires_grad=False,
    )
    with PredictionClient(persia_flow.ts.grpc_inference_url, model_name="deepctr") as client:
        result = client.predict_full(batch)
    np.testing.assert_allclose(result.scores, persia_flow.expected[:40], rtol=0, atol=TOL)
    assert result.model_version == 1  # the archive's --version 1.0


def test_persia_client_reads_persia_format_from_both_handlers_not_ctrserve_format(persia_flow):
    for model in ("adult_income", "deepctr_persia"):
        run = persia_flow.run_client(model)
        assert run.returncode == 0, (model, run.stderr[-2000:])
        assert f"predictions = {len(persia_flow.expected)}" in run.stdout
        scores = np.loadtxt(persia_flow.root / f"{model}.txt")
        np.testing.assert_allclose(scores, persia_flow.expected, rtol=0, atol=TOL, err_msg=model)
    run = persia_flow.run_client("deepctr")  # ctrserve's JSON object: PERSIA's parser finds no scores in it
    assert run.returncode != 0 and "prediction length(0) does not match label length(128)" in run.stderr


def test_raw_inputs_through_torchserve_score_like_the_transformed_ids(serving, tiny_ctr):
    """A version whose features are made by feature ops, served by TorchServe: a request of raw
    inputs (JSON, strings included) scores as the same rows sent as transformed ids."""
    from embedding_server.core.farmhash import fingerprint64_bytes

    slots = json.loads(json.dumps(tiny_ctr.EMB["slots_config"]))
    slots["C1"]["ops"] = [{"select": "age"}, {"bucketize": [18, 30, 45]}]
    slots["C2"]["ops"] = [{"select": "tags"}, {"mod": 50}, {"truncate": {"seq_len": 2, "side": "right"}}]
    version = tiny_ctr.export_version(serving.model_root, 31, seed=31, emb_config={"slots_config": slots})
    archive_model(version, serving.store, name="rawops", serving_config=serving.serving_yml, file_name="rawops")
    dense = np.random.default_rng(31).normal(size=(3, tiny_ctr.DENSE_WIDTH)).round(3).tolist()
    tags = [["sports", "news", "music"], [], ["news"]]
    h1, c3 = [[5, 6], [], [7]], [[1], [2, 3], []]
    raw = {"dense": dense, "sparse": {"C3": c3, "H1": h1}, "inputs": {"age": [17.0, 30.0, 52.5], "tags": tags}}
    transformed = {
        "dense": dense,
        "sparse": {
            "C1": [[0], [2], [3]],
            "C2": [[fingerprint64_bytes(t) % 50 for t in row][:2] for row in tags],
            "C3": c3,
            "H1": h1,
        },
    }
    with ManagementClient(serving.ts.management_url) as mgmt, serving.client("grpc", model_name="rawops") as client:
        mgmt.register("rawops.mar", initial_workers=1, synchronous=True)
        try:
            got, want = client.predict_full(raw), client.predict_full(transformed)
            assert got.model_version == 31
            np.testing.assert_array_equal(got.scores, want.scores)
            with pytest.raises(PredictionError, match="slot 'C2' selects input 'tags', which is missing"):
                client.predict_full({"dense": dense, "sparse": {"C3": c3, "H1": h1}, "inputs": {"age": [1, 2, 3]}})
        finally:
            mgmt.unregister("rawops", "31")
