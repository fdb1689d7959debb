"""PERSIA's ``InferCtx`` (persia/infer_ctx.py) against REAL embedding servers (2 shards, child
processes) and a real service registry (``persia.registry``'s HTTP server).

The embeddings InferCtx gives are compared with an independent lookup: a
``RemoteEmbeddingClient`` built from the embedding_config.yml file the servers were started with.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embedding_server.core.config import EmbeddingConfig
from embedding_server.core.errors import InvalidRequestError
from embedding_server.rpc.client import RawEmbedding
from embedding_server.rpc.launcher import ServerGroup
from embedding_server.rpc.remote import RemoteEmbeddingClient
from persia.ctx import InferCtx
from persia.embedding.data import IDTypeFeature, Label, NonIDTypeFeature, PersiaBatch
from persia.registry import RegistryServer

pytestmark = [pytest.mark.process, pytest.mark.timeout(180)]


class Cluster:
    def __init__(self, group: ServerGroup, emb: EmbeddingConfig, registry: RegistryServer):
        self.group, self.emb, self.registry = group, emb, registry
        self.direct = RemoteEmbeddingClient(emb, group.addresses)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_ctr, registered_servers):
    root = tmp_path_factory.mktemp("infer_ctx")
    emb_path, glob_path = tiny_ctr.write_configs(root / "cfg")
    with registered_servers(emb_path, glob_path, root / "embedding", num_shards=2) as (group, registry):
        env = Cluster(group, EmbeddingConfig.load(emb_path), registry)
        yield env
        env.direct.close()


def persia_batch(
    rng: np.random.Generator, batch_size: int, features=("C1", "C2", "C3", "H1")
) -> tuple[PersiaBatch, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """A PERSIA client's batch (two non-ID features of two dtypes and shapes, a label) and copies
    of those three arrays."""
    id_type = [
        IDTypeFeature(name, [rng.integers(0, 40, rng.integers(0, 4)).astype(np.uint64) for _ in range(batch_size)])
        for name in features
    ]
    dense = rng.normal(size=(batch_size, 5)).astype(np.float32)
    counts = rng.integers(0, 9, (batch_size, 2, 3)).astype(np.int8)
    label = rng.integers(0, 2, (batch_size, 1)).astype(np.float32)
    return PersiaBatch(
        id_type,
        non_id_type_features=[NonIDTypeFeature(dense.copy()), NonIDTypeFeature(counts.copy())],
        labels=[Label(label.copy())],
        requires_grad=False,
    ), (dense, counts, label)


def direct_embeddings(cluster: Cluster, batch: PersiaBatch) -> list[torch.Tensor]:
    """The independent computation: each feature looked up with a client of the servers' own file."""
    by_name = {f.name: f for f in batch.sparse}
    result = cluster.direct.lookup([by_name[n] for n in cluster.emb.slots_config], insert=False)
    return [v.values if isinstance(v, RawEmbedding) else v for v in (result[n] for n in cluster.emb.slots_config)]


def test_registry_and_server_addresses_resolve_to_the_same_servers_and_lookups(cluster):
    rng = np.random.default_rng(3)
    warm, (dense, counts, label) = persia_batch(rng, 16)
    cluster.direct.lookup(list(warm.sparse), insert=True)  # rows exist for these ids (train-mode servers)
    contexts = {
        "registry": InferCtx([cluster.registry.address]),
        "servers, reversed": InferCtx(list(reversed(cluster.group.addresses))),
    }
    for how, ctx in contexts.items():
        with ctx:
            ctx.wait_for_serving(timeout=30)
            assert ctx.servers == cluster.group.addresses, how  # shard order, whatever order they came in
            assert ctx.feature_names == ["C1", "C2", "C3", "H1"], how
            non_id, id_type, labels = ctx.prepare_features(ctx.get_embedding_from_bytes(warm.to_bytes()))
            expected = direct_embeddings(cluster, warm)
            assert len(id_type) == 4 and any(t.abs().sum() > 0 for t in id_type)
            for got, want in zip(id_type, expected):
                assert got.shape == want.shape and torch.equal(got, want), how
            assert id_type[3].shape == (16, 3, 4)  # H1: raw, sample_fixed_size 3, dim 4
            assert [t.dtype for t in non_id] == [torch.float32, torch.int8]
            assert non_id[1].shape == (16, 2, 3)
            np.testing.assert_array_equal(non_id[0].numpy(), dense)
            np.testing.assert_array_equal(non_id[1].numpy(), counts)
            assert labels is not None
            np.testing.assert_array_equal(labels[0].numpy(), label)


def test_lookups_are_read_only(cluster):
    rows_before = sum(s["rows"] for s in cluster.direct.stats())
    fresh, _ = persia_batch(np.random.default_rng(4), 8)
    for feature in fresh.sparse:  # ids no row holds
        feature.ids[:] += np.uint64(10**12)
    with InferCtx(cluster.group.addresses) as ctx:
        _, id_type, _ = ctx.prepare_features(ctx.get_embedding_from_data(fresh))
    assert all(float(t.abs().sum()) == 0.0 for t in id_type)  # unseen ids read as zeros
    assert sum(s["rows"] for s in cluster.direct.stats()) == rows_before


def test_a_batch_with_other_features_is_refused_by_name(cluster):
    with InferCtx(cluster.group.addresses) as ctx:
        with pytest.raises(InvalidRequestError, match=r"missing \['H1'\]"):
            ctx.get_embedding_from_bytes(persia_batch(np.random.default_rng(5), 2, ("C1", "C2", "C3"))[0].to_bytes())


def test_an_address_that_is_neither_server_nor_registry_times_out_naming_it(cluster):
    with pytest.raises(TimeoutError, match="127.0.0.1:9 answered neither"):
        InferCtx(["127.0.0.1:9"]).wait_for_serving(timeout=2)
