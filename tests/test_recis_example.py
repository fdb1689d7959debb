"""deploy/examples/recis end to end: its generator writes ORC files in the shape of RecIS's CTR
example, ``ctrserve train --config job.yml`` (a real process) learns the planted signal through
list columns, feature ops, a shared table and tile pooling, and the exported version served by a
real TorchServe (infer-mode embedding server following the job's model root) scores the held-out
raw rows exactly as the trainer does: as raw inputs (batch bytes, and JSON with the file's own
strings), as the pre-transformed ids, and as computed here independently from the exported
TorchScript, the spec's feature ops and rows read straight from the embedding server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.orc as orc
import pytest
import torch

from archiver.build import archive_model
from archiver.torchserve import TorchServeProcess
from embedding_server.core.batch_codec import BatchData, encode_batch
from embedding_server.core.config import EmbeddingConfig, Pooling
from embedding_server.core.model_spec import DenseModelSpec, parse_version_dir, version_dir
from embedding_server.rpc.launcher import ServerGroup
from embedding_server.rpc.remote import RemoteEmbeddingClient
from handler.client import PredictionClient
from handler.raw_inputs import add_raw_inputs
from trainer.data import Chunk, concat_chunks, read_table, to_batch
from trainer.job import JobConfig
from trainer.metrics import roc_auc

pytestmark = [pytest.mark.process, pytest.mark.timeout(420)]

EXAMPLE = Path(__file__).resolve().parent.parent / "deploy" / "examples" / "recis"
REQUEST_ROWS = 256
TOL = 1e-5


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """The example copied to a fresh folder, its data generated and its job trained, each with
    the commands of its README."""
    root = tmp_path_factory.mktemp("recis")
    for name in ("job.yml", "embedding_config.yml", "global_config.yml"):
        shutil.copy(EXAMPLE / name, root / name)
    subprocess.run(
        [sys.executable, str(EXAMPLE / "make_data.py"), "--out", str(root / "data")], check=True, timeout=120
    )
    done = subprocess.run(
        [sys.executable, "-m", "ctrserve", "train", "--config", str(root / "job.yml"), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return root


def _metrics(root: Path) -> tuple[list[dict], dict]:
    rows = [json.loads(line) for line in (root / "runs/recis/metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if not r.get("final")], rows[-1]


def test_the_example_learns_the_planted_signal(trained):
    steps, final = _metrics(trained)
    assert final["final"] and final["steps"] == 32  # 2 epochs of 2 x 2,048 rows in batches of 256
    assert final["eval_auc"] > 0.72, final
    assert abs(final["eval_auc_bucketed"] - final["eval_auc"]) < 0.01, final
    assert final["eval_gauc"] > 0.65, final  # per user (train.gauc_group: sparse1)
    losses = [r["loss"] for r in steps]
    assert losses[-1] < losses[0] - 0.05, losses
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses


def _direct_scores(
    spec: DenseModelSpec, model: torch.jit.ScriptModule, emb: EmbeddingConfig, lookups, chunk: Chunk
) -> np.ndarray:
    """The trainer's computation redone here: the spec's feature ops on the reader's raw inputs,
    each id's row read from the embedding server, pooled per the slot's combiner, the model run."""
    made = {f.name: f for f in spec.feature_pipeline().features(chunk.inputs, chunk.sparse)}
    parts = []
    for feature in spec.features:
        f, slot, table = made[feature.name], emb.slot(feature.name), emb.table_of(feature.name)
        rows = lookups.lookup_rows(f.ids, np.full(f.ids.shape[0], table.index, np.uint16), table.dim, insert=False)
        pooled = np.zeros((f.batch_size, slot.output_dim), np.float32)
        for i in range(f.batch_size):
            mine = rows[f.offsets[i] : f.offsets[i + 1]]
            if slot.pooling is Pooling.TILE:
                kept = mine[: slot.tile_len].reshape(-1)
                pooled[i, : kept.shape[0]] = kept
            elif mine.shape[0]:
                pooled[i] = mine.sum(0) / (mine.shape[0] if slot.pooling is Pooling.MEAN else 1.0)
        parts.append(torch.from_numpy(pooled))
    with torch.no_grad():
        return model(torch.from_numpy(chunk.dense), parts)[:, 0].numpy()


def test_served_scores_of_raw_rows_equal_the_trainers(trained):
    job = JobConfig.load(trained / "job.yml")
    emb = EmbeddingConfig.load(trained / "embedding_config.yml")
    model_root = trained / "runs/recis/model_root"
    version = max(v for v in map(parse_version_dir, os.listdir(model_root / "dense")) if v is not None)
    version_path = model_root / version_dir(version)
    spec = DenseModelSpec.from_json((version_path / "model.json").read_text())
    model = torch.jit.load(str(version_path / "model.pt")).eval()
    assert spec.feature_pipeline().to_config() == {
        name: list(slot["ops"]) for name, slot in spec.embedding_config["slots_config"].items() if slot.get("ops")
    }
    eval_file = trained / "data/eval/part-0.orc"
    chunk = concat_chunks(list(read_table(eval_file, mapping=job.data.mapping)))
    original = orc.read_table(str(eval_file))  # the file's own values: strings, unpadded lists
    raw_names = sorted(spec.feature_pipeline().input_names)
    assert raw_names == ["dense2", "sparse1", "sparse2", "sparse3", "sparse4", "sparse5"]

    with ServerGroup.start(
        trained / "embedding_config.yml",
        trained / "global_config.yml",
        num_shards=1,
        workdir=trained / "embedding",
        mode="infer",
        extra_args=["--model-root", str(model_root)],
        admin_roots=[trained],
    ) as group:
        (trained / "serving.yml").write_text(json.dumps({"embedding_servers": group.addresses}))
        archive_model(version_path, trained / "store", name="recis", serving_config=trained / "serving.yml")
        with (
            TorchServeProcess.start(trained / "store", trained / "torchserve", models={"recis": "recis.mar"}) as ts,
            RemoteEmbeddingClient(emb, group.addresses) as lookups,
            PredictionClient(ts.inference_url, model_name="recis", timeout=120) as client,
        ):
            served = []
            for start in range(0, len(chunk), REQUEST_ROWS):
                part = chunk.slice(start, start + REQUEST_ROWS)
                rows = original.slice(start, REQUEST_ROWS)
                dense2 = part.inputs["dense2"]
                assert isinstance(dense2, np.ndarray) and dense2.shape == (len(part), 1)
                raw_bytes = encode_batch(
                    add_raw_inputs(BatchData(dense=[part.dense]), {n: part.inputs[n] for n in raw_names})
                )
                raw_json = {
                    "dense": part.dense.tolist(),
                    "inputs": {
                        "dense2": dense2.tolist(),
                        **{n: rows.column(n).to_pylist() for n in raw_names if n != "dense2"},
                    },
                }
                assert any(isinstance(v, str) for r in raw_json["inputs"]["sparse5"] for v in r)
                from_raw = client.predict_full(raw_bytes)
                from_json = client.predict(raw_json)
                from_ids = client.predict(to_batch(part, spec.feature_pipeline()))
                assert from_raw.model_version == version
                np.testing.assert_array_equal(from_raw.scores, from_ids)
                np.testing.assert_array_equal(from_json, from_ids)
                direct = _direct_scores(spec, model, emb, lookups, part)
                np.testing.assert_allclose(from_raw.scores, direct, rtol=0, atol=TOL)
                served.append(from_raw.scores)
        pgid = ts.process.pid
        servers = [s.process for s in group.servers]
    with pytest.raises(ProcessLookupError):  # nothing of TorchServe is left running
        os.killpg(pgid, 0)
    assert all(p.poll() is not None for p in servers)
    # The trainer's final evaluation scored these same 1,024 rows (4 batches of 256): the served
    # scores give its AUC.
    _, final = _metrics(trained)
    assert len(chunk) == job.train.eval_batches * job.data.batch_size
    labels = chunk.labels[:, 0]
    assert abs(roc_auc(labels, np.concatenate(served)) - final["eval_auc"]) < 1e-4, final
