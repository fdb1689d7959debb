"""persia.helper.ensure_persia_service with real child processes: the registry and two embedding
parameter servers found through persia.service while the block runs, a data-loader closure run
per replica with its REPLICA_INDEX, everything stopped and the environment restored afterwards,
and a failed data loader reported when the block ends."""

from __future__ import annotations

import json
import os

import psutil
import pytest

from embedding_server.core.config import EmbeddingConfig
from embedding_server.rpc.remote import RemoteEmbeddingClient
from persia.helper import ensure_persia_service
from persia.service import embedding_server_addresses

pytestmark = pytest.mark.process

EMBEDDING_CONFIG = {"slots_config": {"age": {"dim": 8}, "city": {"dim": 4}}}


def test_services_run_for_the_block_and_stop_after_it(tmp_path, monkeypatch, wait_until, process_tree):
    monkeypatch.delenv("EMBEDDING_WORKER_SERVICE", raising=False)
    monkeypatch.delenv("PERSIA_EMBEDDING_SERVERS", raising=False)
    out = tmp_path / "loader"

    def data_loader():  # a closure, as in PERSIA's tests
        from persia.env import get_replica_index, get_replica_size

        (out.parent / f"{out.name}{get_replica_index()}.json").write_text(
            json.dumps([get_replica_index(), get_replica_size()])
        )

    with ensure_persia_service(
        data_loader_func=data_loader,
        embedding_config=EMBEDDING_CONFIG,
        embedding_parameter_replica_num=2,
        data_loader_replica_num=2,
    ) as ctx:
        addresses = embedding_server_addresses(timeout=30)
        assert len(addresses) == 2
        assert os.environ["EMBEDDING_WORKER_SERVICE"] == ctx.registry_address
        emb = EmbeddingConfig.from_dict(EMBEDDING_CONFIG)
        with RemoteEmbeddingClient(emb, addresses) as remote:  # checks each is the shard its index says
            assert [s["rows"] for s in remote.stats()] == [0, 0]
        wait_until(lambda: all(c.exit_code() is not None for c in ctx.workers), what="the data loaders")
        children = [psutil.Process(c.pid) for c in ctx.registries + ctx.servers]
        children += [p for c in ctx.registries + ctx.servers for p in process_tree.descendants(c.pid)]
        assert len(children) == 5  # registry, two launchers, their two servers
    assert [json.loads((tmp_path / f"loader{i}.json").read_text()) for i in (0, 1)] == [[0, 2], [1, 2]]
    assert "EMBEDDING_WORKER_SERVICE" not in os.environ
    assert process_tree.gone(children)


def test_a_failed_data_loader_is_reported_when_the_block_ends(wait_until):
    def data_loader():
        raise SystemExit(4)

    ctx = ensure_persia_service(data_loader_func=data_loader, embedding_config=EMBEDDING_CONFIG)
    with pytest.raises(RuntimeError, match="data loader 0 exited with code 4"):
        with ctx:
            wait_until(lambda: ctx.workers[0].exit_code() is not None, what="the data loader")


def test_an_embedding_config_is_required():
    with pytest.raises(ValueError, match="needs embedding_config"):
        ensure_persia_service()
