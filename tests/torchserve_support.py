"""Shared pieces of the serving tests: a tiny real dense model, its export, request batches and
the independent computation of expected scores.

The dense model is a small MLP over ``concat(dense, pooled embeddings, flattened raw
embeddings)`` scripted with ``torch.jit.script``, written as ``model.pt`` beside a
``model.json`` made with :meth:`DenseModelSpec.for_config`, exactly what the trainer exports.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import yaml

from embedding_server.core.batch import SparseFeature
from embedding_server.core.config import EmbeddingConfig
from embedding_server.core.model_spec import MODEL_FILE, SPEC_FILE, DenseModelSpec, version_dir
from embedding_server.rpc.client import EmbeddingClient, RawEmbedding
from trainer.batch import PyPersiaBatchData

DENSE_WIDTH = 5
EMB = {
    "slots_config": {
        "C1": {"dim": 8},
        "C2": {"dim": 8, "sqrt_scaling": True},
        "C3": {"dim": 4, "mean_scaling": True},
        "H1": {"dim": 4, "embedding_summation": False, "sample_fixed_size": 3},
    },
}
CRITEO_EMB = {"slots_config": {f"C{i}": {"dim": 4} for i in range(1, 27)}}
GLOBAL = {
    "common_config": {"job_type": "train"},
    "embedding_parameter_server_config": {"capacity": 100_000},
}


class TinyCtr(torch.nn.Module):
    """``sigmoid(MLP(concat(dense, flattened embeddings)))``: one score per sample."""

    def __init__(self, in_width: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.hidden = torch.nn.Linear(in_width, 16)
        self.out = torch.nn.Linear(16, 1)

    def forward(self, dense: torch.Tensor, sparse: list[torch.Tensor]) -> torch.Tensor:
        parts = [dense]
        for s in sparse:
            parts.append(s.reshape(s.shape[0], -1))
        return torch.sigmoid(self.out(torch.relu(self.hidden(torch.cat(parts, 1)))))


def write_configs(directory: Path, emb_config: dict = EMB) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    emb, glob = directory / "embedding_config.yml", directory / "global_config.yml"
    emb.write_text(yaml.safe_dump(emb_config, sort_keys=False))
    glob.write_text(yaml.safe_dump(GLOBAL))
    return emb, glob


def export_version(
    model_root: Path, version: int, seed: int, emb_config: dict = EMB, dense_width: int = DENSE_WIDTH
) -> Path:
    """Write ``<model_root>/dense/vN/{model.pt, model.json}`` (model.json last, as the trainer)."""
    config = EmbeddingConfig.from_dict(emb_config)
    spec = DenseModelSpec.for_config(config, version=version, step=100 * version, dense_width=dense_width)
    in_width = dense_width + sum(f.dim * (f.sample_fixed_size if not f.pooled else 1) for f in spec.features)
    target = model_root / version_dir(version)
    target.mkdir(parents=True, exist_ok=True)
    torch.jit.script(TinyCtr(in_width, seed).eval()).save(str(target / MODEL_FILE))
    (target / SPEC_FILE).write_text(spec.to_json())
    return target


def random_batch(rng: np.random.Generator, batch_size: int) -> PyPersiaBatchData:
    """A request batch as clients build it (with a target, which serving ignores)."""
    batch = PyPersiaBatchData()
    batch.add_dense([rng.normal(size=(batch_size, DENSE_WIDTH)).astype(np.float32)])

    def lists(high: int, max_len: int) -> list[np.ndarray]:
        return [rng.integers(0, high, rng.integers(0, max_len + 1)).astype(np.uint64) for _ in range(batch_size)]

    batch.add_sparse([("C1", lists(1000, 3)), ("C2", lists(50, 4)), ("C3", lists(2**62, 2)), ("H1", lists(300, 5))])
    batch.add_target(rng.integers(0, 2, (batch_size, 1)).astype(np.float32))
    return batch


def as_json(batch: PyPersiaBatchData) -> dict:
    """The same batch as the handler's JSON request form."""
    return {
        "dense": batch.dense_matrix().tolist(),
        "sparse": {
            f.name: [f.ids[f.offsets[i] : f.offsets[i + 1]].tolist() for i in range(f.batch_size)] for f in batch.sparse
        },
    }


def expected_scores(model_dir: Path, embeddings: EmbeddingClient, batch: PyPersiaBatchData) -> np.ndarray:
    """The independent computation: the same TorchScript file run directly on embeddings looked
    up directly from the embedding servers."""
    spec = DenseModelSpec.from_json((model_dir / SPEC_FILE).read_text())
    model = torch.jit.load(str(model_dir / MODEL_FILE))
    by_name: dict[str, SparseFeature] = {f.name: f for f in batch.sparse}
    looked_up = embeddings.lookup([by_name[f.name] for f in spec.features])
    inputs = []
    for f in spec.features:
        value = looked_up.embeddings[f.name]
        inputs.append(value.values if isinstance(value, RawEmbedding) else value)
    with torch.no_grad():
        return model(torch.from_numpy(batch.dense_matrix()), inputs)[:, 0].numpy()
