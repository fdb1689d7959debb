"""The code snippets of PERSIA's documents run, with only their typos fixed.

Each block of the four documents (customize a job: 000, getting started: 001, build notes: 002,
inference guide: 003) is a file in tests/data/persia_docs/ named ``<doc>_<n>_<what>``; its first
comment line names the document and section and lists every typo fix (and the one size and
one setting change, said as such). Names a snippet takes from the text around it (``model``,
``loss_fn``, ``logger``, TorchServe's example client's ``infer``) come from a small prelude here;
placeholder paths (``/your/model/dir/``, ``/workspace/...``) are replaced by the test's folders.

Blocks that cannot run here (``SKIPPED``; :func:`test_the_skipped_blocks_are_exactly_the_listed_ones`
keeps this list honest):

* 001_1_download_dataset.sh: downloads the Kaggle dataset (network); the getting-started tests
  read real Criteo rows (deploy/examples/criteo_sample.tsv) as ``train.txt`` instead.
* 001_2_submodule.sh: PERSIA's persia-core git submodule (ctrserve has no submodule).
* 001_3_build_images.sh: PERSIA's docker images (docker, PERSIA's Makefile).
* 001_13_run.sh: PERSIA's DLRM example as a docker stack (docker, PERSIA's Makefile).
* 002_1_build.sh: installs into the running environment (package index; would replace the shared
  editable install) and runs PERSIA's Rust binary ``persia.gencrd``; the wheel build and its
  install into a fresh environment are tests/test_packaging.py's.
* 002_3_cargo_test.sh: ``cargo test`` of PERSIA's Rust crate.
* 002_4_feature_batch.rs: Rust code of PERSIA's crate, not a program.

The getting-started data (``train.txt``): the first five rows of criteo_sample.tsv with each empty
field written as ``0``: the document's parser (``float``, ``int(x, 16)``) has no missing-value
handling, and its own sample row has an empty field.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from embedding_server.core.batch import SparseFeature
from embedding_server.core.config import EmbeddingConfig
from embedding_server.core.model_spec import ModelSignature, model_signature
from embedding_server.rpc.launcher import ServerGroup
from embedding_server.rpc.remote import RemoteEmbeddingClient
from persia.embedding.optim import as_sparse_optimizer

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "tests" / "data" / "persia_docs"
CRITEO_TSV = REPO / "deploy" / "examples" / "criteo_sample.tsv"
GLOBAL = {"common_config": {"job_type": "train"}, "embedding_parameter_server_config": {"capacity": 100_000}}

SKIPPED = {
    "001_1_download_dataset.sh": "network",
    "001_2_submodule.sh": "PERSIA's repository",
    "001_3_build_images.sh": "docker",
    "001_13_run.sh": "docker",
    "002_1_build.sh": "installs into the environment; PERSIA's Rust binary",
    "002_3_cargo_test.sh": "PERSIA's Rust crate",
    "002_4_feature_batch.rs": "PERSIA's Rust crate",
}


def snippet(name: str, **placeholders: str) -> str:
    """The snippet's text, dedented, with placeholder paths replaced."""
    text = textwrap.dedent((DOCS / name).read_text().split("\n", 1)[1])
    for old, new in placeholders.items():
        text = text.replace(old, new)
    return text


def run(name: str, namespace: dict[str, Any], **placeholders: str) -> dict[str, Any]:
    """Run a Python snippet in ``namespace`` (its prelude) and return the namespace."""
    exec(compile(snippet(name, **placeholders), str(DOCS / name), "exec"), namespace)
    return namespace


class LossLog(logging.Handler):
    """The prelude's ``logger``: a real logger whose records are kept, to read the losses back."""

    def __init__(self, name: str):
        super().__init__()
        self.messages: list[str] = []
        self.logger = logging.getLogger(name)
        self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def losses(self) -> list[float]:
        return [float(re.search(r"loss: (?:tensor\()?([-0-9.e]+)", m).group(1)) for m in self.messages]  # type: ignore[union-attr]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------ the list itself


@pytest.mark.unit
def test_the_skipped_blocks_are_exactly_the_listed_ones():
    files = sorted(p.name for p in DOCS.iterdir())
    marked = sorted(name for name in files if "Skipped:" in (DOCS / name).read_text().splitlines()[0])
    assert marked == sorted(SKIPPED)
    for name in SKIPPED:
        assert f"* {name}:" in (__doc__ or "")
    run_here = set(files) - set(SKIPPED)
    tested = {m.group(0) for m in re.finditer(r"\b00\d_\d+_\w+\.(?:py|yml|sh)\b", Path(__file__).read_text())}
    assert run_here <= tested, sorted(run_here - tested)
    for name in files:  # every file names its document, section and fixes on its first line
        first = (DOCS / name).read_text().splitlines()[0]
        assert first.startswith(("# 00", "// 00")) and "Fixes:" in first, name


# ------------------------------------------------------------------------------ 000: customize a job


@pytest.mark.unit
def test_000_1_embedding_config_yml_loads():
    config = EmbeddingConfig.load(DOCS / "000_1_embedding_config.yml")
    assert list(config.slots_config) == ["id", "age", "gender"]
    assert [s.dim for s in config.slots_config.values()] == [8, 8, 8]
    assert config.slots_config["id"].embedding_summation is True


@pytest.mark.unit
def test_000_2_batch_data_holds_what_was_added():
    np.random.seed(0)
    ns = run("000_2_batch_data.py", {})
    batch = ns["batch_data"]
    assert batch.batch_size == 1024
    np.testing.assert_array_equal(batch.dense_matrix(), np.ones((1024, 256), np.float32))
    assert [f.name for f in batch.sparse] == ["id", "age", "gender"]
    for feature, (name, samples) in zip(batch.sparse, ns["batch_categorical_data"]):
        assert feature.name == name
        np.testing.assert_array_equal(np.diff(feature.offsets), [len(s) for s in samples])
        assert feature.ids.dtype == np.uint64 and (feature.ids == 1).all()
    np.testing.assert_array_equal(np.concatenate(batch.targets, axis=1), np.ones((1024, 2), np.float32))
    assert batch.validate(EmbeddingConfig.load(DOCS / "000_1_embedding_config.yml")) == 1024
    back = type(batch).from_bytes(batch.to_bytes())
    assert [len(f.ids) for f in back.sparse] == [len(f.ids) for f in batch.sparse]


@pytest.mark.unit
def test_000_3_dnn_signature_is_ctrserves():
    ns = run("000_3_dnn_signature.py", {"nn": nn})
    assert model_signature(ns["DNN"]()) is ModelSignature.CTRSERVE


class Dnn(nn.Module):
    """The prelude's ``model`` of 000: ctrserve's signature over 256 dense columns and 3 x 8."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.hidden = nn.Linear(256 + 24, 16)
        self.out = nn.Linear(16, 1)

    def forward(self, dense: torch.Tensor, sparse: list[torch.Tensor]) -> torch.Tensor:
        return torch.sigmoid(self.out(torch.relu(self.hidden(torch.cat([dense, *sparse], dim=1)))))


DATA_LOADER_000 = """
import numpy as np
from persia.ctx import DataCtx
from persia.prelude import PyPersiaBatchData
rng = np.random.default_rng(1)
with DataCtx() as ctx:
    for _ in range(30):
        dense = rng.normal(size=(64, 256)).astype(np.float32)
        dense[:, 0] *= 4  # the label's signal
        batch = PyPersiaBatchData()
        batch.add_dense(dense)
        batch.add_sparse([(n, [rng.integers(0, 20, 2).astype(np.uint64) for _ in range(64)]) for n in ("id", "age", "gender")])
        batch.add_target((dense[:, :1] > 0).astype(np.float32))
        ctx.send_data(batch)
"""


@pytest.fixture(scope="module")
def customize_servers(tmp_path_factory):
    root = tmp_path_factory.mktemp("customize")
    (root / "global.yml").write_text(yaml.safe_dump(GLOBAL))
    with ServerGroup.start(DOCS / "000_1_embedding_config.yml", root / "global.yml", 2, root / "servers") as group:
        yield root, group


@pytest.mark.process
def test_000_4_train_ctx_trains_on_a_data_loaders_batches(customize_servers, monkeypatch):
    root, group = customize_servers
    address = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("PERSIA_EMBEDDING_SERVERS", ",".join(group.addresses))
    monkeypatch.setenv("PERSIA_NN_WORKER_ADDRS", address)
    loader = subprocess.Popen([sys.executable, "-c", DATA_LOADER_000], env=dict(os.environ))
    log = LossLog("persia_docs_000_4")
    try:
        run("000_4_train_ctx.py", {"torch": torch, "model": Dnn(), "logger": log.logger})
        assert loader.wait(60) == 0
    finally:
        loader.kill()
    losses = log.losses()
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.05, losses
    with RemoteEmbeddingClient(EmbeddingConfig.load(DOCS / "000_1_embedding_config.yml"), group.addresses) as c:
        assert sum(int(s.get("rows", 0)) for s in c.stats()) > 0  # the lookups inserted rows


def _batch_000(rng: np.random.Generator) -> Any:
    from persia.prelude import PyPersiaBatchData

    batch = PyPersiaBatchData()
    dense = rng.normal(size=(32, 256)).astype(np.float32)
    batch.add_dense(dense)
    batch.add_sparse([(n, [np.array([i % 7], np.uint64) for i in range(32)]) for n in ("id", "age", "gender")])
    batch.add_target((dense[:, :1] > 0).astype(np.float32))
    return batch


@pytest.mark.process
def test_000_5_checkpoint_loads_back(customize_servers, monkeypatch):
    from persia.ctx import TrainCtx
    from persia.embedding import EmbeddingConfig as PersiaEmbeddingConfig
    from persia.sparse.optim import Adagrad

    root, group = customize_servers
    monkeypatch.setenv("PERSIA_EMBEDDING_SERVERS", ",".join(group.addresses))
    checkpoint_dir = str(root / "servers" / "checkpoint")
    model = Dnn()
    dense_optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rng = np.random.default_rng(4)
    slots = EmbeddingConfig.load(DOCS / "000_1_embedding_config.yml")
    probe = [SparseFeature.from_lists(n, [[i] for i in range(7)]) for n in ("id", "age", "gender")]

    def step(ctx) -> None:
        output, target = ctx.forward(_batch_000(rng))
        ctx.backward(nn.functional.binary_cross_entropy(output, target))

    with TrainCtx(model=model, sparse_optimizer=Adagrad(lr=0.1), dense_optimizer=dense_optimizer) as ctx:
        for _ in range(3):
            step(ctx)
        ctx.dump_checkpoint(checkpoint_dir)
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        with RemoteEmbeddingClient(slots, group.addresses) as c:
            saved_rows = c.lookup(probe, insert=False).embeddings
        for _ in range(3):  # weights and rows move on after the checkpoint
            step(ctx)
    assert not torch.equal(model.state_dict()["out.weight"], saved["out.weight"])
    dumped = (Path(checkpoint_dir) / "dense.pt").stat().st_mtime_ns
    prelude = {
        "TrainCtx": TrainCtx,
        "model": model,
        "sparse_optimizer": Adagrad(lr=0.1),
        "dense_optimizer": dense_optimizer,
        "device_id": None,
        "embedding_config": PersiaEmbeddingConfig(),
        "checkpoint_dir": checkpoint_dir,
        "batch_idx": 0,
    }
    run("000_5_checkpoint.py", prelude)
    for key, value in saved.items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)
    with RemoteEmbeddingClient(slots, group.addresses) as c:
        rows = c.lookup(probe, insert=False).embeddings
    for name in saved_rows:
        torch.testing.assert_close(rows[name], saved_rows[name], rtol=0, atol=0)
    assert (Path(checkpoint_dir) / "dense.pt").stat().st_mtime_ns > dumped  # dumped again at batch_idx 0


# ------------------------------------------------------------------------------ 001: getting started


def criteo_rows(n: int = 5) -> list[list[str]]:
    rows = [line.rstrip("\n").split("\t") for line in CRITEO_TSV.read_text().splitlines()[:n]]
    return [[field if field else "0" for field in row] for row in rows]


GETTING_STARTED = [
    "001_4_preprocess.py",
    "001_5_batch_data.py",
    "001_6_add_dense.py",
    "001_7_add_sparse.py",
    "001_8_add_target.py",
]


def getting_started(tmp_path: Path, upto: str) -> dict[str, Any]:
    """Run the getting-started data snippets up to and including ``upto`` on ``train.txt``."""
    (tmp_path / "train.txt").write_text("".join("\t".join(row) + "\n" for row in criteo_rows()))
    namespace: dict[str, Any] = {}
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for name in GETTING_STARTED[: GETTING_STARTED.index(upto) + 1]:
            run(name, namespace)
    finally:
        os.chdir(cwd)
    return namespace


@pytest.mark.unit
def test_001_4_preprocess_parses_the_criteo_rows(tmp_path):
    ns = getting_started(tmp_path, "001_4_preprocess.py")
    rows = criteo_rows()
    assert len(ns["batch_data"]) == 5
    for (dense, sparse, target), row in zip(ns["batch_data"], rows):
        assert target == int(row[0])
        np.testing.assert_array_equal(dense, [float(x) for x in row[1:14]])
        np.testing.assert_array_equal(sparse, np.array([int(x, 16) for x in row[14:]], np.uint64))


@pytest.mark.unit
def test_001_5_batch_data_unzips_the_samples(tmp_path):
    ns = getting_started(tmp_path, "001_5_batch_data.py")
    assert len(ns["batch_dense_data"]) == len(ns["batch_all_sparse_data"]) == len(ns["batch_target_data"]) == 5
    assert ns["persia_batch_data"].dense == []


@pytest.mark.unit
def test_001_6_add_dense_holds_the_dense_columns(tmp_path):
    ns = getting_started(tmp_path, "001_6_add_dense.py")
    expected = np.array([[float(x) for x in row[1:14]] for row in criteo_rows()], np.float32)
    (dense,) = ns["persia_batch_data"].dense
    assert dense.dtype == np.float32
    np.testing.assert_array_equal(dense, expected)


@pytest.mark.unit
def test_001_7_add_sparse_holds_one_feature_per_category(tmp_path):
    ns = getting_started(tmp_path, "001_7_add_sparse.py")
    features = ns["persia_batch_data"].sparse
    assert [f.name for f in features] == [f"sparse_feature{k}" for k in range(26)]
    for k, feature in enumerate(features):
        np.testing.assert_array_equal(feature.offsets, np.arange(6))  # one id per sample
        np.testing.assert_array_equal(feature.ids, [int(row[14 + k], 16) for row in criteo_rows()])


@pytest.mark.unit
def test_001_8_add_target_holds_the_labels(tmp_path):
    ns = getting_started(tmp_path, "001_8_add_target.py")
    batch = ns["persia_batch_data"]
    (target,) = batch.targets
    np.testing.assert_array_equal(target, [[float(row[0])] for row in criteo_rows()])
    assert batch.batch_size == 5


@pytest.mark.unit
def test_001_9_send_data_reaches_the_nn_worker(tmp_path, monkeypatch):
    from persia.data import StreamingDataset

    monkeypatch.setenv("PERSIA_NN_WORKER_ADDRS", f"127.0.0.1:{free_port()}")
    dataset = StreamingDataset(buffer_size=4)
    try:
        ns = getting_started(tmp_path, "001_8_add_target.py")
        run("001_9_send_data.py", ns)
        received = dataset.batches(timeout=30)
        assert next(received).to_bytes() == ns["persia_batch_data"].to_bytes()
        ns["backend"].__exit__(None, None, None)  # the loader is done: the stream ends
        assert list(received) == []
    finally:
        dataset.close()


@pytest.mark.unit
def test_001_10_dlrm_model_takes_lists_of_tensors():
    ns = run("001_10_dlrm_model.py", {"nn": nn, "ln": np.array([13, 16, 1]), "sigmoid_layer": 1})
    assert isinstance(ns["model"], ns["DLRM"]) and isinstance(ns["model"], nn.Module)
    assert model_signature(ns["model"]) is ModelSignature.PERSIA


@pytest.mark.unit
def test_001_11_optimizers_are_made():
    model = nn.Linear(3, 1)
    ns = run("001_11_optimizers.py", {"model": model})
    group = ns["dense_optimizer"].param_groups[0]
    assert group["lr"] == 0.1 and group["params"] == list(model.parameters())
    server_side = as_sparse_optimizer(ns["sparse_optimizer"])
    assert type(server_side).__name__ == "Adagrad" and server_side.lr == pytest.approx(1e-3)


class Dlrm(nn.Module):
    """The prelude's ``model`` of 001_12: called as the snippet calls it, ``model((dense, sparse))``,
    giving ``(probability, aux_loss)`` (examples/DLRM/model.py's shape)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.hidden = nn.Linear(13 + 26 * 4, 16)
        self.out = nn.Linear(16, 1)

    def forward(self, inputs: tuple[torch.Tensor, list[torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        dense, sparse = inputs
        x = torch.cat([torch.log1p(dense.clamp(min=0)), *sparse], dim=1)
        return torch.sigmoid(self.out(torch.relu(self.hidden(x)))), torch.zeros(())


DATA_LOADER_001 = """
# The data loader: the getting-started data snippets (001_4 to 001_9) on train.txt, then the
# same batch 39 times more, then done.
import os, textwrap
from pathlib import Path
os.chdir({tmp!r})
ns = {{}}
for name in {names!r}:
    text = textwrap.dedent((Path({docs!r}) / name).read_text().split("\\n", 1)[1])
    exec(compile(text, name, "exec"), ns)
for _ in range(39):
    ns["backend"].send_data(ns["persia_batch_data"])
ns["backend"].__exit__(None, None, None)
"""


@pytest.mark.process
def test_001_12_old_train_ctx_trains_with_on_after_backward(tmp_path, monkeypatch):
    emb = {"slots_config": {f"sparse_feature{k}": {"dim": 4} for k in range(26)}}
    (tmp_path / "emb.yml").write_text(yaml.safe_dump(emb, sort_keys=False))
    (tmp_path / "global.yml").write_text(yaml.safe_dump(GLOBAL))
    port = free_port()
    config = EmbeddingConfig.from_dict(emb)
    probe = [
        SparseFeature.from_lists(f"sparse_feature{k}", [[int(row[14 + k], 16)] for row in criteo_rows()])
        for k in range(26)
    ]
    with ServerGroup.start(tmp_path / "emb.yml", tmp_path / "global.yml", 2, tmp_path / "servers") as group:
        with RemoteEmbeddingClient(config, group.addresses) as direct:
            before = direct.lookup(probe, insert=True).embeddings  # the rows training starts from
        monkeypatch.setenv("PERSIA_EMBEDDING_SERVERS", ",".join(group.addresses))
        monkeypatch.setenv("PERSIA_NN_WORKER_ADDRS", f"127.0.0.1:{port}")
        monkeypatch.setenv("TRAINER_PORT", str(port))
        monkeypatch.setenv("FORWARD_QUEUE_SIZE", "4")
        (tmp_path / "train.txt").write_text("".join("\t".join(row) + "\n" for row in criteo_rows()))
        names = [*GETTING_STARTED, "001_9_send_data.py"]
        code = DATA_LOADER_001.format(tmp=str(tmp_path), names=names, docs=str(DOCS))
        loader = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ))
        log = LossLog("persia_docs_001_12")
        model = Dlrm()
        from persia.sparse.optim import Adagrad

        prelude = {
            "os": os,
            "torch": torch,
            "model": model,
            "loss_fn": nn.BCELoss(),
            "dense_optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
            "sparse_optimizer": Adagrad(lr=0.1),
            "logger": log.logger,
        }
        try:
            run("001_12_train_ctx.py", prelude)
            assert loader.wait(60) == 0
        finally:
            loader.kill()
        with RemoteEmbeddingClient(config, group.addresses) as direct:
            after = direct.lookup(probe, insert=False).embeddings
    losses = log.losses()
    assert len(losses) == 40
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.05, losses
    assert all(not torch.equal(before[name], after[name]) for name in before)  # on_after_backward pushed


# ------------------------------------------------------------------------------ 002: build notes


@pytest.mark.unit
def test_002_2_sys_path_workaround_is_harmless_and_persia_needs_no_persia_core(monkeypatch):
    import importlib
    import importlib.util

    monkeypatch.setattr(sys, "path", list(sys.path))
    run("002_2_sys_path.py", {"sys": sys})
    assert sys.path[-1] == "/opt/anaconda3/lib/python3.11/site-packages/persia"
    assert importlib.util.find_spec("persia_core") is None
    assert callable(importlib.import_module("persia.launcher").cli)  # the import that failed in the FAQ


# ------------------------------------------------------------------------------ 003: inference guide

HANDLER_PRELUDE = """\
# The handler file's imports (the guide shows the class only).
import os
from abc import ABC

import torch
from ts.torch_handler.base_handler import BaseHandler

from persia.ctx import TrainCtx
from persia.prelude import PersiaEmbeddingClientPyClass

"""
INFER_EMB = {"slots_config": {f"feature_{k}": {"dim": 8} for k in range(3)}}


class DeepCtr(nn.Module):
    """The prelude's ``model`` of 003: ctrserve's signature over 32 dense columns and 3 x 8."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.hidden = nn.Linear(32 + 24, 16)
        self.out = nn.Linear(16, 1)

    def forward(self, dense: torch.Tensor, sparse: list[torch.Tensor]) -> torch.Tensor:
        return torch.sigmoid(self.out(torch.relu(self.hidden(torch.cat([dense] + sparse, dim=1)))))


class InferenceGuide:
    """Everything the inference guide's snippets made, in the order the guide runs them."""

    def __init__(self, root: Path, group: ServerGroup, ports: dict[str, int], env: dict[str, str]):
        self.root, self.group, self.ports, self.env = root, group, ports, env
        self.model_dir, self.store, self.workspace = root / "model", root / "store", root / "workspace_model"
        self.client_ns: dict[str, Any] = {}
        self.responses: list[list[float]] = []
        self.register_output = ""

    def placeholders(self) -> dict[str, str]:
        return {
            "/your/model/dir/": f"{self.model_dir}/",
            "/workspace/serve/model/": f"{self.store}/",
            "/workspace/model/": f"{self.workspace}/",
            "/your/ceph_dir/or/hdfs_dir/": f"{self.root / 'sparse_dump'}/",
        }

    def bash(self, name: str, cwd: Path) -> tuple[int, str]:
        """Run a bash snippet; its exit code and output (through a file: TorchServe's daemon
        keeps the streams it inherited open)."""
        path = os.pathsep.join([str(Path(sys.executable).parent), self.env.get("PATH", "")])
        log = self.root / f"{name}.log"
        with open(log, "wb") as out:
            code = subprocess.run(
                ["bash", "-e", "-c", snippet(name, **self.placeholders())],
                cwd=cwd,
                env=dict(self.env, PATH=path),
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=180,
            ).returncode
        return code, log.read_text(errors="replace")

    def expected(self, data: bytes, model_file: Path) -> np.ndarray:
        """The independent computation: the TorchScript file on direct lookups."""
        from persia.prelude import PyPersiaBatchData

        batch = PyPersiaBatchData.from_bytes(data)
        with RemoteEmbeddingClient(EmbeddingConfig.from_dict(INFER_EMB), self.group.addresses) as c:
            looked_up = c.lookup(list(batch.sparse), insert=False).embeddings
        with torch.no_grad():
            scores = torch.jit.load(str(model_file))(
                torch.from_numpy(batch.dense_matrix()), [looked_up[f"feature_{k}"] for k in range(3)]
            )
        return scores.reshape(-1).numpy()


@pytest.fixture(scope="module")
def inference_guide(tmp_path_factory):
    import grpc

    from archiver.management import ManagementClient
    from archiver.torchserve import LOCAL_CONFIG, _free_ports, _render_config
    from protos.torchserve import inference_pb2, inference_pb2_grpc

    root = tmp_path_factory.mktemp("inference_guide")
    (root / "emb.yml").write_text(yaml.safe_dump(INFER_EMB))
    (root / "global.yml").write_text(yaml.safe_dump(GLOBAL))
    keys = ("inference", "management", "metrics", "grpc_inference", "grpc_management", "worker")
    ports = dict(zip(keys, _free_ports(len(keys))))
    (root / "ts").mkdir()
    (root / "ts" / "config.properties").write_text(_render_config(LOCAL_CONFIG, ports, {}))
    for sub in ("tmp", "logs"):
        (root / "ts" / sub).mkdir()
    with ServerGroup.start(root / "emb.yml", root / "global.yml", 1, root / "servers", admin_roots=[root]) as group:
        env = dict(
            os.environ,
            TS_CONFIG_FILE=str(root / "ts" / "config.properties"),
            TEMP=str(root / "ts" / "tmp"),
            TMPDIR=str(root / "ts" / "tmp"),
            LOG_LOCATION=str(root / "ts" / "logs"),
            METRICS_LOCATION=str(root / "ts" / "logs"),
            MIDDLEWARE_SERVICE=group.addresses[0],
        )
        guide = InferenceGuide(root, group, ports, env)
        for folder in (guide.model_dir, guide.store, guide.workspace):
            folder.mkdir()
        run("003_2_save_jit.py", {"torch": torch, "model": DeepCtr(1).eval()}, **guide.placeholders())
        (guide.model_dir / "persia_handler.py").write_text(HANDLER_PRELUDE + snippet("003_1_persia_handler.py"))
        code, output = guide.bash("003_3_archive.sh", guide.store)
        assert code == 0, output[-2000:]
        try:
            code, output = guide.bash("003_5_torchserve.sh", root / "ts")
            assert code == 0, output[-2000:]
            with ManagementClient(f"http://127.0.0.1:{ports['management']}") as management:
                management.wait_ready("deepctr", None, 120)

            def get_inference_stub():
                channel = grpc.insecure_channel(f"127.0.0.1:{ports['grpc_inference']}")
                return inference_pb2_grpc.InferenceAPIsServiceStub(channel)

            def infer(stub, model_name, model_input):
                response = stub.Predictions(
                    inference_pb2.PredictionsRequest(model_name=model_name, input={"batch": model_input})
                )
                guide.responses.append(yaml.safe_load(response.prediction.decode("utf-8")))

            from persia.prelude import PersiaEmbeddingClientPyClass, PyPersiaBatchData

            np.random.seed(3)
            guide.client_ns = {
                "np": np,
                "PyPersiaBatchData": PyPersiaBatchData,
                "PersiaEmbeddingClientPyClass": PersiaEmbeddingClientPyClass,
                "infer": infer,
                "get_inference_stub": get_inference_stub,
            }
            run("003_6_grpc_client.py", guide.client_ns)
            yield guide
        finally:
            subprocess.run(
                [str(Path(sys.executable).parent / "torchserve"), "--stop"], env=env, capture_output=True, timeout=60
            )


@pytest.mark.process
def test_003_1_persia_handler_serves_what_the_model_computes(inference_guide):
    guide = inference_guide
    data = guide.client_ns["model_input"]
    np.testing.assert_allclose(guide.responses[0], guide.expected(data, guide.model_dir / "deepctr_v0.pt"), atol=1e-6)
    batch = type(guide.client_ns["batch_data"]).from_bytes(data)
    with RemoteEmbeddingClient(EmbeddingConfig.from_dict(INFER_EMB), guide.group.addresses) as c:
        c.lookup(list(batch.sparse), insert=True)  # the ids now have rows: the handler's lookups read them
    guide.client_ns["infer"](guide.client_ns["get_inference_stub"](), "deepctr", data)
    expected = guide.expected(data, guide.model_dir / "deepctr_v0.pt")
    assert not np.allclose(expected, guide.responses[0], atol=1e-4)  # the rows changed the scores
    np.testing.assert_allclose(guide.responses[-1], expected, atol=1e-6)


@pytest.mark.process
def test_003_2_save_jit_writes_the_scripted_model(inference_guide):
    loaded = torch.jit.load(str(inference_guide.model_dir / "deepctr_v0.pt"))
    dense, sparse = torch.ones(2, 32), [torch.ones(2, 8)] * 3
    torch.testing.assert_close(loaded(dense, sparse), DeepCtr(1).eval()(dense, sparse))


@pytest.mark.process
def test_003_3_archive_holds_the_model_and_handler(inference_guide):
    import zipfile

    with zipfile.ZipFile(inference_guide.store / "deepctr.mar") as mar:
        names = set(mar.namelist())
        assert {"deepctr_v0.pt", "persia_handler.py"} <= names
        assert b"batch_to_device_dirct" in mar.read("persia_handler.py")


@pytest.mark.process
def test_003_4_dump_writes_the_embeddings_that_load_back(inference_guide):
    from persia.ctx import TrainCtx
    from persia.sparse.optim import Adagrad

    guide = inference_guide
    config = EmbeddingConfig.from_dict(INFER_EMB)
    probe = [SparseFeature.from_lists(f"feature_{k}", [[7], [8, 9]]) for k in range(3)]
    with RemoteEmbeddingClient(config, guide.group.addresses) as c:
        rows = c.lookup(probe, insert=True).embeddings
    with TrainCtx(sparse_optimizer=Adagrad(lr=0.1), embedding_servers=guide.group.addresses) as ctx:
        run("003_4_dump_sparse.py", {"ctx": ctx}, **guide.placeholders())
        with RemoteEmbeddingClient(config, guide.group.addresses) as c:
            c.lookup(probe, requires_grad=False, insert=True)
        ctx.load(guide.root / "sparse_dump")
    with RemoteEmbeddingClient(config, guide.group.addresses) as c:
        again = c.lookup(probe, insert=False).embeddings
    for name in rows:
        torch.testing.assert_close(again[name], rows[name], rtol=0, atol=0)


@pytest.mark.process
def test_003_5_torchserve_serves_the_archive(inference_guide):
    from archiver.management import ManagementClient

    with ManagementClient(f"http://127.0.0.1:{inference_guide.ports['management']}") as management:
        assert "deepctr" in {m["modelName"] for m in management.list_models()}


@pytest.mark.process
def test_003_6_grpc_client_gets_a_score_per_sample(inference_guide):
    assert len(inference_guide.responses[0]) == 128
    assert all(0.0 < s < 1.0 for s in inference_guide.responses[0])


@pytest.mark.process
def test_003_7_and_003_8_a_new_version_is_archived_registered_and_answers(inference_guide, capsys, monkeypatch):
    import grpc

    from protos.torchserve import inference_pb2, management_pb2, management_pb2_grpc

    guide = inference_guide
    monkeypatch.setenv("PATH", os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    handler_path = guide.model_dir / "persia_handler.py"
    prelude = {"model": DeepCtr(2).eval(), "torch": torch, "subprocess": subprocess, "batch_idx": 2}
    prelude.update(handler_path=handler_path, mar_path=guide.workspace)
    run("003_8_archive_step.py", prelude, **guide.placeholders())
    assert (guide.workspace / "deepctr.mar").exists()
    ns = run("003_7_register.py", {"grpc": grpc, "management_pb2": management_pb2}, **guide.placeholders())
    channel = grpc.insecure_channel(f"127.0.0.1:{guide.ports['grpc_management']}")
    # TorchServe 0.12 copies a URL's archive into the model store and refuses a name already
    # there; version 1.0 is loaded (unpacked in its temp folder), so its archive can go.
    (guide.store / "deepctr.mar").unlink()
    ns["register"](management_pb2_grpc.ManagementAPIsServiceStub(channel), "deepctr")
    assert "Model deepctr registered successfully" in capsys.readouterr().out
    data = guide.client_ns["model_input"]
    stub = guide.client_ns["get_inference_stub"]()
    response = stub.Predictions(
        inference_pb2.PredictionsRequest(model_name="deepctr", model_version="2", input={"batch": data})
    )
    scores = yaml.safe_load(response.prediction.decode("utf-8"))
    expected = guide.expected(data, guide.workspace / "deepctr_step_2.pt")
    np.testing.assert_allclose(scores, expected, atol=1e-6)
