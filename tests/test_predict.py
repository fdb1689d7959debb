"""``ctrserve predict --input`` on Parquet and ORC files: the trainer's reader and column mapping
(from --mapping or a job.yml), scores from real TorchServe equal to the direct computation, and
bad data reported as one line with exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.orc as orc
import pyarrow.parquet as pq
import pytest
import yaml

from archiver.build import archive_model
from archiver.torchserve import TorchServeProcess
from ctrserve.cli import main
from ctrserve.predict import input_chunks
from embedding_server.core.config import EmbeddingConfig
from embedding_server.rpc.launcher import ServerGroup
from embedding_server.rpc.remote import RemoteEmbeddingClient
from trainer.data import ColumnMapping, concat_chunks, read_table, to_batch

FEATURES = [f"C{i}" for i in range(1, 27)]
MAPPING = {
    "label": "clicked",
    "dense": [{"name": "dense", "column": "numbers", "length": 13}],
    "sparse": {name: f"col_{name}" for name in FEATURES},
    "string_ids": "farm",
}


def write_rows(path: Path, n: int, seed: int) -> None:
    """Criteo-like rows in list columns: a list<double> label of length 0 or 1, 13 dense values
    in one list column (some lists short), ids as list<string> (hashed with farm) and one
    list<int64> column."""
    rng = np.random.default_rng(seed)
    columns = {
        "clicked": pa.array([[float(v)] if v < 2 else [] for v in rng.integers(0, 3, n)], pa.list_(pa.float64())),
        "numbers": pa.array([rng.random(int(rng.integers(0, 14))).tolist() for _ in range(n)], pa.list_(pa.float64())),
    }
    for name in FEATURES[:-1]:
        columns[f"col_{name}"] = pa.array(
            [[f"{name}-{v}" for v in rng.integers(0, 30, int(rng.integers(0, 3)))] for _ in range(n)],
            pa.list_(pa.string()),
        )
    columns["col_C26"] = pa.array([rng.integers(0, 50, 2).tolist() for _ in range(n)], pa.list_(pa.int64()))
    table = pa.table(columns)
    (pq.write_table if path.suffix == ".parquet" else orc.write_table)(table, str(path))


def run(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["--log-level", "WARNING", *args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.mark.unit
def test_input_is_read_through_the_mapping_of_a_job_or_a_mapping_file(tmp_path):
    (tmp_path / "data").mkdir()
    write_rows(tmp_path / "data/a.parquet", 90, seed=1)
    write_rows(tmp_path / "data/b.orc", 40, seed=2)
    (tmp_path / "mapping.yml").write_text(yaml.safe_dump(MAPPING))
    mapping = ColumnMapping.load(tmp_path / "mapping.yml")
    chunks = list(input_chunks(str(tmp_path / "data"), mapping, chunk_rows=32))
    assert [len(c) for c in chunks] == [32, 32, 26, 32, 8]
    expected = concat_chunks(
        [concat_chunks(list(read_table(tmp_path / "data" / f, mapping=mapping))) for f in ("a.parquet", "b.orc")]
    )
    got = concat_chunks(chunks)
    np.testing.assert_array_equal(got.dense, expected.dense)
    assert got.dense.shape == (130, 13)
    for a, b in zip(got.sparse, expected.sparse):
        assert a.name == b.name and np.array_equal(a.ids, b.ids) and np.array_equal(a.offsets, b.offsets)


@pytest.mark.unit
@pytest.mark.parametrize("suffix", [".parquet", ".orc"])
def test_bad_data_is_one_line_with_exit_2(tmp_path, capsys, suffix):
    path = tmp_path / f"rows{suffix}"
    write_rows(path, 50, seed=3)
    table = (pq.read_table if suffix == ".parquet" else orc.read_table)(str(path))
    numbers = table.column("numbers").to_pylist()
    numbers[37] = [1.0] * 14
    table = table.set_column(1, "numbers", pa.array(numbers, pa.list_(pa.float64())))
    (pq.write_table if suffix == ".parquet" else orc.write_table)(table, str(path))
    (tmp_path / "mapping.yml").write_text(yaml.safe_dump(MAPPING))
    # the file is read before TorchServe is contacted: the address need not answer
    base = ["predict", "--rest", "http://127.0.0.1:1", "--input", str(path)]
    rc, out, err = run(capsys, *base, "--mapping", str(tmp_path / "mapping.yml"))
    assert rc == 2 and out == ""
    assert err.strip().splitlines() == [
        f"ctrserve predict: error: {path}, row 37: dense input 'dense': column 'numbers' holds a list of 14 values; "
        "its length is 13"
    ]
    rc, _, err = run(capsys, *base)  # Criteo's column names by default
    assert rc == 2 and err.strip().splitlines() == [
        f"ctrserve predict: error: {path}: label: no column 'label'; the file has {', '.join(table.schema.names)}"
    ]
    (tmp_path / "mapping.yml").write_text(yaml.safe_dump({**MAPPING, "sparse_ids": "farm"}))
    rc, _, err = run(capsys, *base, "--mapping", str(tmp_path / "mapping.yml"))
    assert rc == 2 and "unknown key 'sparse_ids' (did you mean 'sparse'?)" in err and "Traceback" not in err


@pytest.mark.process  # TorchServe and the embedding servers run as child processes
@pytest.mark.timeout(300)
def test_predict_orc_input_scores_equal_the_direct_computation(tmp_path, capsys, tiny_ctr):
    emb_path, glob_path = tiny_ctr.write_configs(tmp_path / "cfg", tiny_ctr.CRITEO_EMB)
    model_dir = tiny_ctr.export_version(tmp_path / "root", 1, seed=4, emb_config=tiny_ctr.CRITEO_EMB, dense_width=13)
    data = tmp_path / "rows.orc"
    write_rows(data, 150, seed=5)
    job = {"embedding_config": str(emb_path), "data": {"mapping": MAPPING}}
    (tmp_path / "job.yml").write_text(yaml.safe_dump(job))
    with ServerGroup.start(emb_path, glob_path, num_shards=1, workdir=tmp_path / "embedding") as group:
        (tmp_path / "serving.yml").write_text(json.dumps({"embedding_servers": group.addresses}))
        archive_model(model_dir, tmp_path / "store", serving_config=tmp_path / "serving.yml", name="rows")
        with TorchServeProcess.start(tmp_path / "store", tmp_path / "ts", models={"rows": "rows.mar"}) as ts:
            rc, _, err = run(
                capsys,
                "predict",
                "--input",
                str(data),
                "--job",
                str(tmp_path / "job.yml"),
                "--grpc",
                ts.grpc_inference_url[len("grpc://") :],
                "--model",
                "rows",
                "--batch-size",
                "40",
                "--limit",
                "130",
                "--output",
                str(tmp_path / "scores.txt"),
            )
            assert rc == 0, err
        scores = np.loadtxt(tmp_path / "scores.txt")
        chunk = concat_chunks(list(read_table(data, mapping=_mapping()))).slice(0, 130)
        with RemoteEmbeddingClient(EmbeddingConfig.load(emb_path), group.addresses) as lookups:
            expected = tiny_ctr.expected_scores(model_dir, lookups, to_batch(chunk))
    assert scores.shape == (130,)
    np.testing.assert_allclose(scores, expected, atol=1e-6)


def _mapping() -> ColumnMapping:
    from embedding_server.core.config_schema import build

    return build(ColumnMapping, MAPPING, "test")
