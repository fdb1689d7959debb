"""persia.legacy: the older documents' TrainCtx registers its data address as an nn worker when
its data loader starts, and closing it deregisters that address (the documents' own snippets run
in tests/test_persia_documents.py)."""

from __future__ import annotations

import pytest

from persia import env
from persia.legacy import LegacyTrainCtx
from persia.registry import RegistryServer
from persia.service import NN_WORKER

pytestmark = pytest.mark.unit


@pytest.fixture()
def registry(monkeypatch):
    server = RegistryServer(("127.0.0.1", 0))
    server.start()
    monkeypatch.setenv("EMBEDDING_WORKER_SERVICE", server.address)
    monkeypatch.delenv("PERSIA_NN_WORKER_ADDRS", raising=False)
    env.set_env(rank=0, world_size=1, local_rank=0)
    yield server
    server.stop()
    env.reload_env()


def registered(server: RegistryServer) -> list[str]:
    return [s["address"] for s in server.entries.read(NN_WORKER, None, 0.0)["services"]]


def test_closing_the_old_train_ctx_deregisters_its_data_address(registry):
    ctx = LegacyTrainCtx(port=0, timeout=0.2)
    with pytest.raises(TimeoutError, match="no batch from the data loaders"):
        next(ctx.data_loader())  # starts receiving (and registers), then no loader sends
    assert registered(registry) == [ctx.data_address]
    ctx.close()
    assert registered(registry) == []
