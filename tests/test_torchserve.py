"""Serving through a REAL TorchServe 0.12 with REAL embedding servers (2 shards, child processes).

One TorchServe instance per module, isolated (own TEMP/TMPDIR, logs, metrics, free loopback
ports, own process session; the whole process group is stopped at the end). Scores are
compared with an independent computation: the same TorchScript file run directly on
embeddings looked up directly from the embedding servers.

The generated TorchServe API stubs (``protos/torchserve.py``) are checked here too.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests

from archiver.build import archive_model
from archiver.management import ManagementClient, ManagementError
from archiver.publish import Publisher, PublishSettings
from archiver.torchserve import TorchServeProcess
from ctrserve.cli import main
from embedding_server.core.config import EmbeddingConfig
from embedding_server.rpc.launcher import ServerGroup
from embedding_server.rpc.remote import RemoteEmbeddingClient
from handler.client import PredictionClient, PredictionError
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


def test_publish_rolls_new_version_without_failing_a_request(serving, tiny_ctr):
    """A client streams requests while the publisher archives, registers, waits for, switches to
    and retires versions: no request fails and answers move from version 2 to 3."""
    settings = PublishSettings(
        str(serving.model_root),
        str(serving.store),
        name="rolling",
        keep=1,
        serving_config=str(serving.serving_yml),
        drain_s=0.5,
    )
    tiny_ctr.export_version(serving.model_root, 2, seed=2)
    with ManagementClient(serving.ts.management_url) as mgmt:
        publisher = Publisher(mgmt, settings)
        assert publisher.poll_once() == 2
        assert publisher.poll_once() is None  # nothing new
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
    with serving.client("rest", model_name="rolling") as client:
        np.testing.assert_allclose(
            client.predict(batch), tiny_ctr.expected_scores(serving.version_dir(3), serving.lookups, batch), atol=TOL
        )


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
