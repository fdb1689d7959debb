"""``ctrserve embedding-server`` (embedding_server/cli.py) run as PERSIA's configs ask: an infer
job serving ``infer_config.embedding_checkpoint``, and metrics pushed as ``metrics_config`` says."""

from __future__ import annotations

import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from embedding_server.core.config import EmbeddingConfig
from embedding_server.rpc.launcher import ServerGroup, server_command
from embedding_server.rpc.remote import RemoteEmbeddingClient
from trainer.batch import PyPersiaBatchData
from trainer.ctx import TrainCtx
from trainer.models import DeepCTR

pytestmark = pytest.mark.process

PERSIA = Path(__file__).parent / "data" / "persia"
DENSE_WIDTH = 3


def persia_batch(rng: np.random.Generator, features: list[str], size: int = 32) -> PyPersiaBatchData:
    batch = PyPersiaBatchData()
    batch.add_dense([rng.standard_normal((size, DENSE_WIDTH)).astype(np.float32)])
    batch.add_sparse(
        [(name, [rng.integers(0, 50, rng.integers(1, 3)).astype(np.uint64) for _ in range(size)]) for name in features]
    )
    batch.add_target(rng.integers(0, 2, (size, 1)).astype(np.float32))
    return batch


def infer_global_config(tmp_path: Path, checkpoint: Path) -> Path:
    """PERSIA's published infer config with its checkpoint pointing at ``checkpoint``."""
    data = yaml.safe_load((PERSIA / "global_config_infer.yml").read_text())
    data["common_config"]["infer_config"]["embedding_checkpoint"] = str(checkpoint)
    path = tmp_path / "global_config_infer.yml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_infer_job_serves_the_trainers_checkpoint_from_infer_config(tmp_path):
    """job_type: Infer with infer_config.embedding_checkpoint = a trainer's checkpoint directory:
    the server loads it before it is ready, and every lookup equals the trainer's own values
    (unseen ids read as zeros, and stay unseen)."""
    emb = EmbeddingConfig.load(PERSIA / "embedding_config.yml")
    features = list(emb.slots_config)
    rng = np.random.default_rng(3)
    torch.manual_seed(0)
    model = DeepCTR(DENSE_WIDTH, [8] * len(features), hidden=(8,))
    with TrainCtx(
        model=model,
        dense_optimizer=torch.optim.Adam(model.parameters(), lr=0.01),
        sparse_optimizer=None,
        embedding_config=emb,
        global_config=PERSIA / "global_config.yml",
        num_shards=2,
    ) as ctx:
        for _ in range(3):
            out, target = ctx.forward(persia_batch(rng, features))
            ctx.backward(F.binary_cross_entropy(out, target))
        ctx.dump_checkpoint(tmp_path / "ckpt")
        ids = np.arange(0, 60, dtype=np.uint64)  # 0..49 may be trained; 50..59 never are
        expected = {}
        for name in features:
            tables = np.full(ids.shape[0], emb.table_of(name).index, np.uint16)
            expected[name] = ctx.client.lookup_rows(ids, tables, 8, insert=False)
    trained = sum(int(np.any(rows[:50] != 0, axis=1).sum()) for rows in expected.values())
    assert trained > 100  # the comparison below covers many trained rows
    glob = infer_global_config(tmp_path, tmp_path / "ckpt")
    with ServerGroup.start(PERSIA / "embedding_config.yml", glob, 1, tmp_path / "servers") as group:
        log = group.server(0).log_path.read_text()
        assert f"serving the checkpoint {tmp_path / 'ckpt'}" in log
        with RemoteEmbeddingClient(emb, group.addresses) as client:
            for name in features:
                tables = np.full(ids.shape[0], emb.table_of(name).index, np.uint16)
                served = client.lookup_rows(ids, tables, 8)
                np.testing.assert_array_equal(served, expected[name], err_msg=name)
                assert not served[50:].any()
            stats = client.stats()
        assert stats[0]["rows"] == trained  # the checkpoint's rows, and no row for the unseen ids looked up


def test_infer_checkpoint_conflicts_and_missing_checkpoints_are_clear_errors(tmp_path):
    """--load beside infer_config.embedding_checkpoint is refused; a folder holding no checkpoint
    is named in the error; both exit 2 without a traceback."""
    glob = infer_global_config(tmp_path, tmp_path / "nothing-here")
    (tmp_path / "nothing-here").mkdir()
    emb = PERSIA / "embedding_config.yml"
    both = subprocess.run(server_command(emb, glob, "--load", tmp_path), capture_output=True, text=True, timeout=120)
    assert both.returncode == 2, both.stderr
    assert "--load and common_config.infer_config.embedding_checkpoint both say what to serve" in both.stderr
    missing = subprocess.run(server_command(emb, glob), capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2, missing.stderr
    assert f"cannot load {tmp_path / 'nothing-here'}" in missing.stderr and "no embedding checkpoint" in missing.stderr
    assert "Traceback" not in both.stderr + missing.stderr


class _Gateway(BaseHTTPRequestHandler):
    """A Pushgateway's push endpoint: records (method, path, body) of every push."""

    pushes: list[tuple[str, str, str]] = []

    def do_PUT(self):
        body = self.rfile.read(int(self.headers["Content-Length"])).decode()
        type(self).pushes.append(("PUT", self.path, body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_metrics_config_pushes_to_the_gateway_persia_names(tmp_path, wait_until, monkeypatch):
    """enable_metrics with PERSIA_METRICS_GATEWAY_ADDR set: the server pushes its metrics every
    push_interval_seconds under job_name, grouped by instance rep_<shard>, and once more as it
    stops; enable_metrics: false pushes nothing, not even then."""
    gateway = ThreadingHTTPServer(("127.0.0.1", 0), _Gateway)
    threading.Thread(target=gateway.serve_forever, daemon=True).start()
    monkeypatch.setenv("PERSIA_METRICS_GATEWAY_ADDR", f"127.0.0.1:{gateway.server_port}")
    _Gateway.pushes = []
    try:
        for enabled in (True, False):
            metrics = {"enable_metrics": enabled, "job_name": "adult_income", "push_interval_seconds": 1}
            path = tmp_path / f"global_{enabled}.yml"
            path.write_text(yaml.safe_dump({"common_config": {"job_type": "Train", "metrics_config": metrics}}))
            before = len(_Gateway.pushes)
            with ServerGroup.start(PERSIA / "embedding_config.yml", path, 1, tmp_path / f"s{enabled}") as group:
                log = group.server(0).log_path
                if enabled:
                    wait_until(lambda: len(_Gateway.pushes) >= 2, timeout=30, what="two pushes")
            pushed = _Gateway.pushes[before:]
            if enabled:
                assert {(method, where) for method, where, _ in pushed} == {
                    ("PUT", "/metrics/job/adult_income/instance/rep_0")
                }
                assert all("ctrserve_embedding_store_capacity" in body for *_, body in pushed)
                assert "pushing metrics to the Pushgateway" in log.read_text()
            else:
                assert pushed == [] and "pushing metrics" not in log.read_text()
    finally:
        gateway.shutdown()
