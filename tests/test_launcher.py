"""persia-launcher as real processes: the registry (embedding-worker) and two embedding parameter
servers that register themselves, found in shard order and answering lookups equal to an
in-process store's; SIGTERM stopping a launcher and its server with none left behind; a parameter
server launcher deregistering its server when it stops (SIGTERM, SIGINT, the server exiting) and
a SIGKILLed one's entry dropped once its registration ttl passes; the data-loader's and
nn-worker's environment and exit codes; --help of every sub-command; a bad config or entry file
as one line and exit code 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest

from embedding_server.core.config import EmbeddingConfig, GlobalConfig
from embedding_server.rpc.client import InProcessEmbeddingClient
from embedding_server.rpc.remote import RemoteEmbeddingClient
from persia.registry import RegistryClient

pytestmark = pytest.mark.process

LAUNCHER = [sys.executable, "-m", "persia.launcher"]
SCRIPT = Path(sys.executable).parent / "persia-launcher"
PS = "embedding-parameter-server"


def launch(*args: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([*LAUNCHER, *args], env={**os.environ, **(env or {})}, **kwargs)


@pytest.fixture()
def registry(tmp_path, wait_until):
    """A running ``persia-launcher embedding-worker`` on a free port; yields its address."""
    ready = tmp_path / "registry.json"
    proc = launch("embedding-worker", "--port", "0", "--ready-file", str(ready))
    try:
        wait_until(lambda: ready.exists() or proc.poll() is not None, timeout=30, what="the registry")
        assert proc.poll() is None
        yield json.loads(ready.read_text())["address"]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0


def test_parameter_servers_register_and_serve_lookups_in_shard_order(
    registry, server_configs, lookup_checks, wait_until, tmp_path, process_tree
):
    emb_path, global_path = server_configs
    env = {"EMBEDDING_WORKER_SERVICE": registry, "PERSIA_EMBEDDING_CONFIG": str(emb_path)}
    launchers = []
    try:
        for index in (1, 0):  # shard 1 starts (and may register) first
            launchers.append(
                launch(
                    PS,
                    "--port",
                    "0",
                    "--global-config",
                    str(global_path),
                    "--replica-index",
                    str(index),
                    "--replica-size",
                    "2",
                    env=env,
                    cwd=tmp_path,
                )
            )
        addresses = RegistryClient(registry).wait_for(PS, timeout=60)
        assert len(addresses) == 2 and len(set(addresses)) == 2
        emb = EmbeddingConfig.load(emb_path)
        local = InProcessEmbeddingClient(emb, GlobalConfig.load(global_path))
        rng = np.random.default_rng(7)
        # the client checks that the server at position i is shard i of 2 (Info), so a wrong order fails
        with RemoteEmbeddingClient(emb, addresses) as remote:
            batch = lookup_checks.random_batch(rng)
            lookup_checks.assert_same(local.lookup(batch), remote.lookup(batch))
            assert all(s["rows"] > 0 for s in remote.stats())
        servers = {launcher.pid: process_tree.descendants(launcher.pid) for launcher in launchers}
        assert all(len(children) == 1 for children in servers.values())
        for launcher in launchers:
            launcher.send_signal(signal.SIGTERM)
        assert [launcher.wait(30) for launcher in launchers] == [0, 0]
        wait_until(
            lambda: process_tree.gone([p for children in servers.values() for p in children]), what="servers to exit"
        )
    finally:
        for launcher in launchers:
            if launcher.poll() is None:
                launcher.kill()
                launcher.wait()


def test_a_restarted_parameter_server_registers_its_new_address(registry, server_configs, wait_until, tmp_path):
    emb_path, global_path = server_configs
    env = {"EMBEDDING_WORKER_SERVICE": registry}
    args = [PS, "--port", "0", "--embedding-config", str(emb_path), "--global-config", str(global_path)]
    first = launch(*args, env=env, cwd=tmp_path)
    try:
        [old] = RegistryClient(registry).wait_for(PS, timeout=60)
        first.send_signal(signal.SIGTERM)
        assert first.wait(30) == 0
        assert RegistryClient(registry).services(PS)["services"] == []  # deregistered on the way out
        second = launch(*args, env=env, cwd=tmp_path)
        try:
            wait_until(lambda: RegistryClient(registry).wait_for(PS, timeout=60) != [old], what="re-registration")
            [new] = RegistryClient(registry).wait_for(PS, timeout=5)
            with RemoteEmbeddingClient(EmbeddingConfig.load(emb_path), [new]) as remote:
                assert remote.stats()[0]["rows"] == 0
        finally:
            second.send_signal(signal.SIGTERM)
            assert second.wait(30) == 0
    finally:
        if first.poll() is None:
            first.kill()


@pytest.mark.parametrize(
    ("stop", "code"),
    [("SIGTERM", 0), ("SIGINT", 0), ("the server dies", 128 + signal.SIGKILL)],
)
def test_a_stopped_parameter_server_launcher_deregisters_its_server(
    registry, server_configs, tmp_path, process_tree, stop, code
):
    emb_path, global_path = server_configs
    client = RegistryClient(registry)
    client.register(PS, 1, "127.0.0.1:7999", size=2)  # shard 1, registered by someone else
    env = {"EMBEDDING_WORKER_SERVICE": registry}
    args = [PS, "--port", "0", "--embedding-config", str(emb_path), "--global-config", str(global_path)]
    launcher = launch(*args, "--replica-index", "0", "--replica-size", "2", env=env, cwd=tmp_path)
    try:
        [address, _] = client.wait_for(PS, timeout=60)
        [server] = process_tree.descendants(launcher.pid)
        if stop == "the server dies":
            server.kill()
        else:
            launcher.send_signal(getattr(signal, stop))
        assert launcher.wait(30) == code
        # gone as soon as the launcher has exited (its ttl of 30 s is far off); shard 1 is kept
        answer = client.services(PS)["services"]
        assert [(s["index"], s["address"]) for s in answer] == [(1, "127.0.0.1:7999")], address
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()


def test_a_killed_parameter_server_launchers_entry_is_dropped_after_its_ttl(
    registry, server_configs, tmp_path, wait_until, process_tree
):
    emb_path, global_path = server_configs
    client = RegistryClient(registry)
    env = {"EMBEDDING_WORKER_SERVICE": registry}
    ttl = 1.0
    args = [PS, "--port", "0", "--embedding-config", str(emb_path), "--global-config", str(global_path)]
    launcher = launch(*args, "--registration-ttl", str(ttl), env=env, cwd=tmp_path)
    try:
        [address] = client.wait_for(PS, timeout=60)
        [first] = client.services(PS)["services"]
        assert first["ttl"] == ttl
        # alive, it registers again within the ttl: the entry outlives its first registration's ttl
        wait_until(
            lambda: client.services(PS)["services"][0]["registered_at"] > first["registered_at"] + ttl,
            timeout=30,
            what="registrations renewed past the first one's ttl",
        )
        assert client.wait_for(PS, timeout=5) == [address]
        server = process_tree.descendants(launcher.pid)
        launcher.kill()  # no chance to deregister
        assert launcher.wait(30) == -signal.SIGKILL
        wait_until(lambda: client.services(PS)["services"] == [], timeout=30, what="the entry to expire")
        with pytest.raises(TimeoutError, match="registered: none"):
            client.wait_for(PS, timeout=0.3)
        wait_until(lambda: process_tree.gone(server), timeout=30, what="the orphaned server to exit")
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()


LOADER = """
import json, os, sys
from persia.env import get_replica_index, get_replica_size
with open(sys.argv[0] + ".out", "w") as f:
    json.dump({"env": [os.environ["REPLICA_INDEX"], os.environ["REPLICA_SIZE"]],
               "persia": [get_replica_index(), get_replica_size()]}, f)
sys.exit(3)
"""


def test_data_loader_runs_file_with_replica_env_and_passes_its_exit_code(tmp_path):
    script = tmp_path / "data_loader.py"
    script.write_text(LOADER)
    env = {**os.environ, "PERSIA_DATALOADER_ENTRY": str(script)}
    result = subprocess.run(
        [str(SCRIPT), "data-loader", "--replica-index", "1", "--replica-size", "2"], env=env, timeout=60
    )
    assert result.returncode == 3
    assert json.loads((tmp_path / "data_loader.py.out").read_text()) == {"env": ["1", "2"], "persia": [1, 2]}


SLEEPER = """
import os, sys, time
open(sys.argv[0] + ".pid", "w").write(str(os.getpid()))
time.sleep(600)
"""


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL])
def test_stopping_the_launcher_stops_its_child(tmp_path, wait_until, stop, process_tree):
    script = tmp_path / "loader.py"
    script.write_text(SLEEPER)
    launcher = launch("data-loader", str(script))
    pid_file = tmp_path / "loader.py.pid"
    wait_until(pid_file.exists, timeout=30, what="the data loader to start")
    child = psutil.Process(int(pid_file.read_text()))
    assert child.ppid() == launcher.pid
    launcher.send_signal(stop)
    # SIGTERM: forwarded, and the launcher exits as its child did (killed by SIGTERM: 128 + 15);
    # SIGKILL: the child gets its parent-death signal
    assert launcher.wait(30) == (143 if stop == signal.SIGTERM else -signal.SIGKILL)
    wait_until(lambda: process_tree.gone([child]), timeout=30, what="the data loader to exit")


WORKER = """
import json, os, sys
from persia.env import get_rank, get_world_size, get_local_rank
out = os.path.join(os.path.dirname(sys.argv[0]), f"rank{get_rank()}.json")
json.dump([get_rank(), get_local_rank(), get_world_size()], open(out, "w"))
"""


def test_nn_worker_runs_file_under_torchrun_with_rank_env(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(WORKER)
    result = subprocess.run(
        [str(SCRIPT), "nn-worker", str(script), "--nproc-per-node", "2", "--nnodes", "1", "--node-rank", "0"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)] == [[0, 0, 2], [1, 1, 2]]


@pytest.mark.parametrize(
    ("command", "flags"),
    [
        ("nn-worker", ["--nproc-per-node", "--nnodes", "--node-rank", "PERSIA_NN_WORKER_ENTRY"]),
        ("data-loader", ["--replica-index", "--replica-size", "PERSIA_DATALOADER_ENTRY"]),
        ("embedding-worker", ["--port", "--embedding-config", "--global-config", "registry", "EMBEDDING_WORKER"]),
        (
            "embedding-parameter-server",
            ["--port", "--embedding-config", "--global-config", "--replica-size", "--registration-ttl"],
        ),
    ],
)
def test_every_sub_command_has_help(command, flags):
    result = subprocess.run([str(SCRIPT), command, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for flag in flags:
        assert flag in text, flag


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (
            [PS, "--embedding-config", "missing.yml", "--global-config", "g.yml"],
            {},
            "--embedding-config: no such file: missing.yml",
        ),
        ([PS, "--global-config", "g.yml"], {"PERSIA_EMBEDDING_CONFIG": "nowhere.yml "}, "nowhere.yml: no such file"),
        ([PS, "--embedding-config", "e.yml"], {}, "--global-config not given and PERSIA_GLOBAL_CONFIG not set"),
        ([PS, "--embedding-config", "bad.yml", "--global-config", "g.yml"], {}, "bad.yml: unknown key"),
        (["embedding-worker", "--embedding-config", "missing.yml"], {}, "no such file: missing.yml"),
        (["data-loader", "absent.py"], {}, "FILE: no such file: absent.py"),
        (["nn-worker"], {}, "FILE not given and PERSIA_NN_WORKER_ENTRY not set"),
        (["data-loader", "e.yml", "--replica-index", "2", "--replica-size", "2"], {}, "--replica-index 2 must be"),
    ],
)
def test_bad_files_and_values_give_one_line_and_exit_code_2(tmp_path, server_configs, args, env, message):
    (tmp_path / "e.yml").write_text(server_configs[0].read_text())
    (tmp_path / "g.yml").write_text(server_configs[1].read_text())
    (tmp_path / "bad.yml").write_text("slots_config: {}\nnot_a_key: 1\n")
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PERSIA_")}
    result = subprocess.run(
        [str(SCRIPT), *args], cwd=tmp_path, env={**full_env, **env}, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert lines[0].startswith(f"persia-launcher {args[0]}: error: ")
