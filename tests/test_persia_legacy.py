"""persia.legacy: the older documents' TrainCtx registers its data address as an nn worker when
its data loader starts, and closing it deregisters that address (the documents' own snippets run
in tests/test_persia_documents.py)."""

from __future__ import annotations

import pytest

from persia.legacy import LegacyTrainCtx

pytestmark = pytest.mark.unit


def test_closing_the_old_train_ctx_deregisters_its_data_address(rank0_registry, nn_worker_entries):
    ctx = LegacyTrainCtx(port=0, timeout=0.2)
    with pytest.raises(TimeoutError, match="no batch from the data loaders"):
        next(ctx.data_loader())  # starts receiving (and registers), then no loader sends
    assert nn_worker_entries(rank0_registry) == [ctx.data_address]
    ctx.close()
    assert nn_worker_entries(rank0_registry) == []
