"""deploy/examples/persia: PERSIA's adult-income example program, run unchanged as a PERSIA user
runs it (issue 17's "Done when").

In a copy of the example folder (nothing is written into the repository), on its generated data:
``persia-launcher embedding-worker`` (the registry), two ``embedding-parameter-server`` shards,
``data-loader data_loader.py`` and ``nn-worker train.py`` as real processes with PERSIA's
environment variables; the nn worker trains, logs its ``eval_ctx`` test AUC and dumps the
checkpoint with the TorchScript model; once stopped, the parameter servers and the nn worker
have left the registry (deregistered). Then an infer-mode embedding server (``job_type: Infer``
with ``infer_config``) serves that checkpoint, the TorchScript model is archived with PERSIA's
handler, real TorchServe serves it and PERSIA's gRPC client scores the test data. The scores
must equal the TorchScript file run on embeddings looked up directly from the infer server, and
their AUC (counted pair by pair) must be the AUC the nn worker logged.

The commands are the ones of the example's README.md and Procfile (checked here), with free
ports in place of 8887 and 7070.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from archiver.torchserve import TorchServeProcess
from embedding_server.core.batch import SparseFeature
from embedding_server.core.config import EmbeddingConfig
from embedding_server.rpc.remote import RemoteEmbeddingClient
from persia.registry import RegistryClient
from persia.service import EMBEDDING_PARAMETER_SERVER, NN_WORKER

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "deploy" / "examples" / "persia"
BIN = Path(sys.executable).parent

EMB = "--embedding-config config/embedding_config.yml"
TRAIN_CONFIGS = f"{EMB} --global-config config/global_config.yml"
INFER_CONFIGS = f"{EMB} --global-config config/global_config_infer.yml"
#: the training job, as the Procfile names its processes
TRAIN = {
    "embedding_worker": f"persia-launcher embedding-worker --port 8887 {TRAIN_CONFIGS}",
    "embedding_server0": f"persia-launcher embedding-parameter-server {TRAIN_CONFIGS} --replica-index 0 --replica-size 2 --port 0",
    "embedding_server1": f"persia-launcher embedding-parameter-server {TRAIN_CONFIGS} --replica-index 1 --replica-size 2 --port 0",
    "data_loader": "persia-launcher data-loader data_loader.py --replica-index 0 --replica-size 1",
    "nn_worker": "persia-launcher nn-worker train.py --nproc-per-node 1",
}
#: the serving job
SERVE = {
    "embedding_worker": f"persia-launcher embedding-worker --port 8887 {INFER_CONFIGS}",
    "embedding_server": f"persia-launcher embedding-parameter-server {INFER_CONFIGS} --port 0",
    "archive": "torch-model-archiver --model-name adult_income --version 1.0 --serialized-file checkpoint/jit_dense.pt "
    "--handler serve_handler.py --export-path checkpoint -f",
    "client": "python serve_client.py --data data/test.npz --address localhost:7070 --model adult_income "
    "--output scores.txt",
}
GENERATE = "python data_generator.py"
ENVIRONMENT = {
    "EMBEDDING_WORKER_SERVICE": "127.0.0.1:8887",
    "PERSIA_EMBEDDING_CONFIG": "config/embedding_config.yml",
    "PERSIA_GLOBAL_CONFIG": "config/global_config.yml",
}
#: scores: the handler and the direct computation run the same TorchScript file on the same rows
TOL = 1e-6


@pytest.mark.unit
def test_readme_and_procfile_give_the_commands_the_test_runs():
    readme = (EXAMPLE / "README.md").read_text()
    for command in [GENERATE, *TRAIN.values(), *SERVE.values()]:
        assert f"\n{command}\n" in readme, command
    for name, value in ENVIRONMENT.items():
        assert f"{name}={value}" in readme, name
    procfile = {}
    for line in (EXAMPLE / "Procfile").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, command = line.partition(":")
            procfile[name] = command.strip()
    assert "nats_server" not in procfile  # ctrserve needs no NATS server (the Procfile says why)
    assert procfile == {**TRAIN, "data_loader": TRAIN["data_loader"] + " && cat"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _argv(command: str, **replace: str) -> list[str]:
    for old, new in replace.items():
        command = command.replace(old, new)
    return shlex.split(command)


class Processes:
    """The job's processes, each in its own session with its output in ``logs/<name>.log``."""

    def __init__(self, cwd: Path, env: dict[str, str], wait_until, process_tree):
        self.cwd, self.env, self.wait_until, self.tree = cwd, env, wait_until, process_tree
        self.running: dict[str, subprocess.Popen] = {}
        (cwd / "logs").mkdir(exist_ok=True)

    def start(self, name: str, argv: list[str], **env: str) -> subprocess.Popen:
        with open(self.cwd / "logs" / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(
                argv,
                cwd=self.cwd,
                env={**self.env, **env},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.running[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.cwd / "logs" / f"{name}.log").read_text(errors="replace")

    def wait(self, name: str, timeout: float) -> None:
        """Wait for ``name`` to exit; it must exit with 0."""
        code = self.running[name].wait(timeout)
        assert code == 0, f"{name} exited with {code}:\n{self.log(name)[-4000:]}"

    def stop(self, *names: str) -> None:
        """SIGTERM to each launcher (it stops its child); each exits with 0 and leaves no process."""
        children = {name: self.tree.descendants(self.running[name].pid) for name in names}
        for name in names:
            self.running[name].send_signal(signal.SIGTERM)
        for name in names:
            self.wait(name, timeout=60)
            self.wait_until(partial(self.tree.gone, children[name]), timeout=30, what=f"{name}'s children to exit")

    def kill_all(self) -> None:
        """SIGKILL to whatever is still running (after a failure), children included."""
        for proc in self.running.values():
            if proc.poll() is None:
                children = self.tree.descendants(proc.pid)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                for child in children:  # servers run in sessions of their own
                    try:
                        child.kill()
                    except psutil.NoSuchProcess:
                        pass


def _test_auc(log: str) -> float:
    found = re.findall(r"test auc is ([0-9.]+)", log)
    assert len(found) == 1, log[-4000:]
    return float(found[0])


@pytest.mark.process
@pytest.mark.timeout(600)
def test_persia_example_trains_evaluates_dumps_and_serves_through_torchserve(
    tmp_path, wait_until, pairwise_auc, process_tree
):
    work = tmp_path / "adult-income"
    shutil.copytree(EXAMPLE, work, ignore=shutil.ignore_patterns("__pycache__", "data", "checkpoint", "*.txt"))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "LOG_LEVEL": "INFO"}
    env.pop("PERSIA_EMBEDDING_SERVERS", None)  # the servers come from the registry, as in PERSIA
    env.pop("PERSIA_NN_WORKER_ADDRS", None)
    subprocess.run(_argv(GENERATE), cwd=work, env=env, check=True, capture_output=True)

    # ------------------------------------------------------------------------------ training job
    port = str(_free_port())
    registry = f"127.0.0.1:{port}"
    env.update({**ENVIRONMENT, "EMBEDDING_WORKER_SERVICE": registry})
    jobs = Processes(work, env, wait_until, process_tree)
    try:
        for name in ("embedding_worker", "embedding_server0", "embedding_server1"):
            jobs.start(name, _argv(TRAIN[name], **{"--port 8887": f"--port {port}"}))
        training_servers = RegistryClient(registry).wait_for(EMBEDDING_PARAMETER_SERVER, count=2, timeout=120)
        jobs.start("data_loader", _argv(TRAIN["data_loader"]))
        jobs.start("nn_worker", _argv(TRAIN["nn_worker"]))
        jobs.wait("nn_worker", timeout=300)
        jobs.wait("data_loader", timeout=30)
        train_log = jobs.log("nn_worker")
        assert "trained on 64 batches" in train_log  # 8192 samples in batches of 128, all of them
        test_auc = _test_auc(train_log)
        assert test_auc > 0.8, train_log[-4000:]  # the continuous features alone give about 0.74
        checkpoint = work / "checkpoint"
        assert {"dense.pt", "opt.pt", "jit_dense.pt"} <= {p.name for p in checkpoint.iterdir()}
        jobs.stop("embedding_server0", "embedding_server1")
        # the launchers deregistered their servers on the way out, the nn worker its data address
        # when its data ended: the registry hands nobody a stopped process's address
        for role in (EMBEDDING_PARAMETER_SERVER, NN_WORKER):
            assert RegistryClient(registry).services(role)["services"] == [], role
        jobs.stop("embedding_worker")

        # ----------------------------------------------------------------------------- serving job
        port = str(_free_port())
        registry = f"127.0.0.1:{port}"
        env["EMBEDDING_WORKER_SERVICE"] = registry
        for name in ("embedding_worker", "embedding_server"):
            jobs.start(f"infer_{name}", _argv(SERVE[name], **{"--port 8887": f"--port {port}"}))
        [infer_server] = RegistryClient(registry).wait_for(EMBEDDING_PARAMETER_SERVER, count=1, timeout=120)
        assert infer_server not in training_servers
        subprocess.run(_argv(SERVE["archive"]), cwd=work, env=env, check=True, capture_output=True)
        models = {"adult_income": "adult_income.mar"}
        environment = {"EMBEDDING_WORKER_SERVICE": registry}
        with TorchServeProcess.start(checkpoint, tmp_path / "torchserve", models=models, environment=environment) as ts:
            address = ts.grpc_inference_url[len("grpc://") :]
            client = subprocess.run(
                _argv(SERVE["client"], **{"localhost:7070": address}), cwd=work, env=env, capture_output=True, text=True
            )
            torchserve_group = ts.process.pid
        with pytest.raises(ProcessLookupError):  # nothing of TorchServe is left running
            os.killpg(torchserve_group, 0)
        assert client.returncode == 0, client.stderr[-4000:]
        assert "predictions = 2048" in client.stdout
        scores = np.loadtxt(work / "scores.txt")

        # ---------------------------------------------- the independent computation of the scores
        with np.load(work / "data" / "test.npz") as data:
            dense, ids, target = data["continuous_data"], data["categorical_data"], data["target"]
            names = [str(n) for n in data["categorical_columns"]]
        offsets = np.arange(len(ids) + 1, dtype=np.int64)  # one id per sample and feature
        features = [SparseFeature(name, ids[:, k].copy(), offsets) for k, name in enumerate(names)]
        emb = EmbeddingConfig.load(work / "config" / "embedding_config.yml")
        with RemoteEmbeddingClient(emb, [infer_server]) as direct:
            looked_up = direct.lookup(features, insert=False)
            with np.load(work / "data" / "train.npz") as train:  # the checkpoint holds every trained id
                trained_rows = sum(len(np.unique(column)) for column in train["categorical_data"].T)
            assert direct.stats()[0]["rows"] == trained_rows
        model = torch.jit.load(str(checkpoint / "jit_dense.pt"))
        with torch.no_grad():
            expected = model([torch.from_numpy(dense)], [looked_up[name] for name in names])[:, 0].numpy()
        np.testing.assert_allclose(scores, expected, rtol=0, atol=TOL)
        served_auc = pairwise_auc(target.tolist(), scores.tolist())
        assert served_auc == pytest.approx(test_auc, abs=1e-6)  # eval_ctx scored the same rows alike
        [client_auc] = re.findall(r"infer_auc = ([0-9.]+)", client.stdout)
        assert float(client_auc) == pytest.approx(served_auc, abs=1e-9)
        jobs.stop("infer_embedding_server", "infer_embedding_worker")
    finally:
        jobs.kill_all()
