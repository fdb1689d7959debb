"""``ctrserve train --config job.yml``: whole jobs as real child processes, also under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from embedding_server.core.batch import SparseFeature
from embedding_server.core.config import EmbeddingConfig, GlobalConfig
from embedding_server.core.errors import ConfigError
from embedding_server.core.model_spec import DenseModelSpec
from embedding_server.modelroot.incremental import publish_checkpoint
from embedding_server.rpc.launcher import ServerGroup
from embedding_server.rpc.remote import RemoteEmbeddingClient
from embedding_server.rpc.security import ServerSecurity
from embedding_server.rpc.service import start_server
from trainer.job import JobConfig, run_job

FEATURES = [f"C{i}" for i in range(1, 27)]
EMB = {"slots_config": {n: {"dim": 8} for n in FEATURES}}


def write_job(tmp_path: Path, **overrides) -> Path:
    (tmp_path / "emb.yml").write_text(yaml.safe_dump(EMB, sort_keys=False))
    job = {
        "embedding_config": "emb.yml",
        "data": {"batch_size": 256, "synthetic": {"seed": 3}},
        "model": {"type": "dlrm", "bottom_mlp": [16], "top_mlp": [16]},
        "dense_optimizer": {"type": "adam", "lr": 0.01},
        "sparse_optimizer": {"type": "adagrad", "lr": 0.1},
        "train": {"steps": 40, "eval_every": 20, "eval_batches": 8, "log_every": 10},
        "output": {"dir": "run", "model_root": "root", "export_every": 20},
        **overrides,
    }
    (tmp_path / "job.yml").write_text(yaml.safe_dump(job, sort_keys=False))
    return tmp_path / "job.yml"


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ctrserve", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.process
def test_train_job_writes_metrics_curves_checkpoint_and_versions(tmp_path):
    job = write_job(tmp_path)
    proc = run_cli("train", "--config", str(job), "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["steps"] == 40 and result["samples"] == 40 * 256
    assert result["exported_versions"] == [1, 2]
    # The planted model is learnable: after 40 small steps the held-out AUC is clearly above chance.
    assert result["eval_auc"] > 0.55
    lines = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "step" in x] == [10, 20, 30, 40]
    assert all(x["samples_per_s"] > 0 for x in lines if "step" in x)
    assert lines[-1]["final"] is True
    assert (tmp_path / "run/curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "run/checkpoint/sparse/manifest.json").is_file()
    spec = DenseModelSpec.from_json((tmp_path / "root/dense/v00000002/model.json").read_text())
    assert spec.step == 40 and spec.dense_width == 13 and [f.name for f in spec.features] == FEATURES
    torch.jit.load(str(tmp_path / "root/dense/v00000002/model.pt"))

    # Resuming continues from the checkpoint's step and exports the next version.
    again = write_job(
        tmp_path, resume_from="run/checkpoint", train={"steps": 50, "eval_every": 0, "eval_batches": 4, "log_every": 10}
    )
    proc = run_cli("train", "--config", str(again), "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    resumed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert resumed["steps"] == 50 and resumed["samples"] == 10 * 256 and resumed["exported_versions"] == [3]


@pytest.mark.unit
@pytest.mark.parametrize(
    "override, message",
    [
        ({"trian": {}}, "unknown key 'trian' \\(did you mean 'train'\\?\\)"),
        ({"model": {"type": "transformer"}}, "'model': type must be 'dlrm' or 'deepctr'"),
        ({"data": {"batch_size": 0}}, "batch_size must be > 0"),
        ({"sparse_optimizer": {"type": "adagrad", "lrr": 1}}, "unknown key 'sparse_optimizer.lrr'"),
        ({"resume_from": "gs://bucket/ckpt"}, "resume_from: 'gs://bucket/ckpt' has a scheme no storage supports"),
        ({"output": {"checkpoint": "ftp://host/ckpt"}}, "checkpoint: 'ftp://host/ckpt' has a scheme no storage"),
        ({"output": {"model_root": "gs://bucket/root"}}, "model_root: 'gs://bucket/root' has a scheme no storage"),
        ({"output": {"dir": "s3://bucket/run"}}, "dir must be a local folder .* output.checkpoint"),
    ],
)
def test_bad_job_configs_name_the_key(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        JobConfig.load(write_job(tmp_path, **override))


@pytest.mark.unit
@pytest.mark.parametrize(
    "sparse, accumulator",
    [
        (None, 0.0),  # job.yml's default optimizer
        ({"type": "adagrad", "lr": 0.05}, 0.0),  # adagrad without the key: torch's default
        ({"type": "adagrad", "lr": 0.05, "initial_accumulator_value": 0.01}, 0.01),  # PERSIA's, when asked
    ],
)
def test_job_adagrad_starts_its_accumulator_at_torchs_default_unless_set(tmp_path, sparse, accumulator):
    override = {} if sparse is None else {"sparse_optimizer": sparse}
    optimizer = JobConfig.load(write_job(tmp_path, **override)).sparse()
    assert optimizer.initial_accumulator_value == accumulator
    # PERSIA's files keep PERSIA's default
    assert (
        GlobalConfig.from_dict({"sparse_optimizer": {"type": "adagrad"}}).sparse_optimizer.initial_accumulator_value
        == 0.01
    )


def modes_under(top: Path) -> dict[str, set[str]]:
    """``{"files": {...}, "dirs": {...}}``: the octal permission bits of everything under ``top``
    (``top`` included), from ``os.stat``."""
    found: dict[str, set[str]] = {"files": set(), "dirs": {oct(os.stat(top).st_mode & 0o7777)}}
    for folder, dirs, files in os.walk(top):
        found["dirs"] |= {oct(os.stat(Path(folder) / d).st_mode & 0o7777) for d in dirs}
        found["files"] |= {oct(os.stat(Path(folder) / f).st_mode & 0o7777) for f in files}
    return found


@pytest.mark.unit
@pytest.mark.parametrize("file_mode, dir_mode", [("0600", "0700"), ("0644", "0755")])
def test_every_model_root_writer_uses_the_configured_file_modes(tmp_path, file_mode, dir_mode):
    """A job whose global config sets storage.file_mode/dir_mode writes its dense exports,
    packets, sparse checkpoints and training checkpoint with exactly those modes (the defaults
    are 0640/0750; the process umask is set so it would give neither pair)."""
    root, checkpoint = tmp_path / "root", tmp_path / "ckpt"
    (tmp_path / "global.yml").write_text(
        yaml.safe_dump(
            {
                "common_config": {"job_type": "train"},
                "embedding_parameter_server_config": {
                    "enable_incremental_update": True,
                    "incremental_dir": str(root / "incremental"),
                    "incremental_flush_interval": 0.05,
                    "storage": {"file_mode": file_mode, "dir_mode": dir_mode},
                },
            }
        )
    )
    job = write_job(
        tmp_path,
        global_config="global.yml",
        data={"batch_size": 32, "synthetic": {"seed": 3}},
        train={"steps": 4, "eval_every": 0, "eval_batches": 1, "log_every": 2},
        output={"dir": "run", "model_root": str(root), "checkpoint": str(checkpoint), "export_every": 2},
    )
    old_umask = os.umask(0o077 if file_mode == "0644" else 0o002)
    try:
        result = run_job(JobConfig.load(job), progress=False)
    finally:
        os.umask(old_umask)
    assert result.exported_versions == [1, 2]
    assert sorted(p.name for p in root.iterdir()) == ["checkpoints", "dense", "incremental"]
    assert list(root.glob("incremental/shard-*/0*.arrow")), "no packet was published"
    assert list(root.glob("checkpoints/*/manifest.json")) and (checkpoint / "sparse" / "manifest.json").exists()
    expected = {"files": {oct(int(file_mode, 8))}, "dirs": {oct(int(dir_mode, 8))}}
    assert modes_under(root) == expected
    assert modes_under(checkpoint) == expected


@pytest.mark.unit
def test_an_embedding_servers_dump_writes_with_its_own_storage_options(tmp_path):
    """An embedding server's Dump writes its shard's files with its global config's file modes;
    the client writes the manifest with the options it is given."""
    storage = {"file_mode": "0600", "dir_mode": "0700"}
    config = GlobalConfig.from_dict(
        {"common_config": {"job_type": "train"}, "embedding_parameter_server_config": {"storage": storage}}
    )
    emb = EmbeddingConfig.from_dict({"slots_config": {"C1": {"dim": 4}}})
    security = ServerSecurity(allow_unauthenticated_admin=True, admin_roots=(str(tmp_path),))
    server = start_server(emb, config, port=0, workers=2, security=security)
    try:
        with RemoteEmbeddingClient(emb, [server.address]) as client:
            client.lookup([SparseFeature.from_lists("C1", [np.arange(5, dtype=np.uint64)])])  # train mode: inserts
            url = publish_checkpoint(client, str(tmp_path / "root"), storage_options=storage)
    finally:
        server.stop(0)
    assert Path(url, "manifest.json").exists() and list(Path(url).glob("shard-*/C1.arrow"))
    assert modes_under(tmp_path / "root") == {"files": {"0o600"}, "dirs": {"0o700"}}


@pytest.mark.process  # the real Ceph cluster (ceph_s3) runs as child processes
@pytest.mark.ceph
def test_job_checkpoints_resumes_and_exports_on_s3(ceph_s3, tmp_path, monkeypatch):
    """output.checkpoint, resume_from and output.model_root as s3:// URLs: the checkpoint and the
    versions land in the bucket (no local folder named after a URL), and a second job resumes
    from the bucket."""
    from embedding_server.storage.urls import open_storage
    from trainer.job import run_job

    for name, value in ceph_s3.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    prefix = f"s3://{ceph_s3.bucket}/test_job/{tmp_path.name}"
    train = {"steps": 4, "eval_every": 0, "eval_batches": 2, "log_every": 2}
    output = {"dir": "run", "model_root": f"{prefix}/root", "checkpoint": f"{prefix}/ckpt", "export_every": 0}
    first = run_job(JobConfig.load(write_job(tmp_path, train=train, output=output)), progress=False)
    assert (first.steps, first.checkpoint, first.exported_versions) == (4, f"{prefix}/ckpt", [1])
    ckpt = open_storage(f"{prefix}/ckpt")
    assert ckpt.exists("dense.pt") and ckpt.exists("sparse/manifest.json")
    assert open_storage(f"{prefix}/root").exists("dense/v00000001/model.json")
    job = write_job(tmp_path, resume_from=f"{prefix}/ckpt", train={**train, "steps": 6}, output=output)
    second = run_job(JobConfig.load(job), progress=False)
    assert (second.steps, second.samples, second.exported_versions) == (6, 2 * 256, [2])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb.yml", "job.yml", "run"]


@pytest.mark.process
def test_bad_job_config_exits_2_with_the_message(tmp_path):
    proc = run_cli("train", "--config", str(write_job(tmp_path, train={"stepz": 3})), cwd=tmp_path)
    assert proc.returncode == 2 and "unknown key 'train.stepz'" in proc.stderr


@pytest.mark.process
def test_torchrun_two_ranks_share_the_embedding_servers(tmp_path):
    (tmp_path / "emb.yml").write_text(yaml.safe_dump(EMB, sort_keys=False))
    (tmp_path / "global.yml").write_text(yaml.safe_dump({"embedding_parameter_server_config": {"capacity": 500_000}}))
    with ServerGroup.start(
        tmp_path / "emb.yml", tmp_path / "global.yml", num_shards=2, workdir=tmp_path / "srv", admin_roots=[tmp_path]
    ) as group:
        job = write_job(
            tmp_path,
            embedding_servers=group.addresses,
            train={"steps": 12, "eval_every": 0, "eval_batches": 2, "log_every": 4},
            output={"dir": "run", "model_root": "root"},
        )
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "ctrserve",
            "train",
            "--config",
            str(job),
            "--no-progress",
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=280, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        with RemoteEmbeddingClient(EmbeddingConfig.from_dict(EMB), group.addresses) as client:
            stats = client.stats()
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["steps"] == 12 and result["exported_versions"] == [1]
    # Both ranks pushed gradients for every step: 2 ranks x 12 steps per shard (plus rank 0's evaluation lookups).
    pushes = [{m["method"]: m["requests"] for m in s["methods"]}.get("PushGradients") for s in stats]
    assert pushes == [24, 24], stats


# --------------------------------------------------------------------------- RecIS-shaped ORC data

RECIS_EMB = {"slots_config": {"sparse1": {"dim": 8}, "sparse5": {"dim": 8}}}


def write_recis_orc(folder: Path, files: int, rows: int, seed: int) -> None:
    """ORC files in the shape of RecIS's CTR example: label and dense2 as list<double> of
    length 0 or 1, dense1 as list<double> of length 8, ids as list<int64> and list<string>.
    The label follows the ids (a learnable signal); an empty label list means 0."""
    import pyarrow as pa
    import pyarrow.orc as orc

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    words = [f"w{i}-é" for i in range(50)]
    for k in range(files):
        user = rng.integers(0, 200, rows)
        word = rng.integers(0, 50, rows)
        p = 1 / (1 + np.exp(-(np.where(user % 3 == 0, 2.0, -1.5) + np.where(word % 2 == 0, 1.0, -1.0))))
        clicked = rng.random(rows) < p
        table = pa.table(
            {
                "label": pa.array([[1.0] if c else ([0.0] if i % 4 else []) for i, c in enumerate(clicked)]),
                "dense1": pa.array(rng.random((rows, 8)).tolist(), pa.list_(pa.float64())),
                "dense2": pa.array([[float(v)] if v > 0.3 else [] for v in rng.random(rows)], pa.list_(pa.float64())),
                "sparse1": pa.array([[int(u)] for u in user], pa.list_(pa.int64())),
                "sparse5": pa.array([[words[w], words[(w + 1) % 50]] for w in word], pa.list_(pa.string())),
            }
        )
        orc.write_table(table, str(folder / f"data_{k}.orc"))


def recis_job(tmp_path: Path, **data) -> Path:
    (tmp_path / "emb.yml").write_text(yaml.safe_dump(RECIS_EMB, sort_keys=False))
    job = {
        "embedding_config": "emb.yml",
        "data": {
            "train_paths": ["fake_data"],
            "eval_paths": ["fake_data/data_0.orc"],
            "mapping": {
                "label": "label",
                "dense": [{"name": "dense1", "length": 8}, {"name": "dense2", "defaults": [0.0]}],
                "sparse": {"sparse1": "sparse1", "sparse5": "sparse5"},
                "string_ids": "farm",
            },
            "epochs": 3,
            "shuffle": {"seed": 1, "files": True, "buffer_rows": 1000},
            "batch_size": 128,
            **data,
        },
        "model": {"type": "deepctr", "hidden": [16]},
        "dense_optimizer": {"type": "adam", "lr": 0.01},
        "sparse_optimizer": {"type": "adagrad", "lr": 0.1},
        "train": {"steps": 200, "eval_every": 0, "eval_batches": 4, "log_every": 10},
        "output": {"dir": "run"},
    }
    (tmp_path / "job.yml").write_text(yaml.safe_dump(job, sort_keys=False))
    return tmp_path / "job.yml"


@pytest.mark.process
def test_train_on_recis_shaped_orc_files_with_list_columns(tmp_path):
    write_recis_orc(tmp_path / "fake_data", files=2, rows=2047, seed=5)
    job = recis_job(tmp_path)  # train.steps (200) is more than the three epochs hold
    proc = run_cli("train", "--config", str(job), "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # 2 files x 2047 rows in batches of 128 are 31 full batches and a short one, 3 epochs of them
    assert result["steps"] == 3 * 32 and result["samples"] == 3 * 2 * 2047
    lines = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if "step" in x and not x.get("final")]
    assert losses[-1] < losses[0] - 0.1, losses
    assert result["eval_auc"] > 0.7


@pytest.mark.process
def test_bad_rows_stop_training_with_one_line_naming_file_column_and_row(tmp_path):
    import pyarrow as pa
    import pyarrow.orc as orc

    write_recis_orc(tmp_path / "fake_data", files=1, rows=300, seed=6)
    path = tmp_path / "fake_data/data_0.orc"
    table = orc.read_table(str(path))
    dense1 = table.column("dense1").to_pylist()
    dense1[211] = [0.5] * 9
    table = table.set_column(table.schema.get_field_index("dense1"), "dense1", pa.array(dense1))
    orc.write_table(table, str(path))
    proc = run_cli("train", "--config", str(recis_job(tmp_path)), "--no-progress", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"ctrserve train: error: {path}, row 211: dense input 'dense1': column 'dense1' holds a list of 9 values; "
        "its length is 8"
    )


@pytest.mark.unit
def test_data_mapping_and_shuffle_keys_are_validated(tmp_path):
    job = JobConfig.load(recis_job(tmp_path))
    assert job.data.mapping.dense_width == 9 and job.data.mapping.string_ids == "farm"
    assert job.data.epochs == 3 and job.data.shuffle.buffer_rows == 1000
    bad = {
        "mapping": {"label": "label", "dense": [{"name": "dense1", "lenght": 8}]},
    }
    with pytest.raises(ConfigError, match=r"unknown key 'data.mapping.dense\[0\].lenght' \(did you mean 'length'\?\)"):
        JobConfig.load(recis_job(tmp_path, **bad))
    with pytest.raises(ConfigError, match="'data.mapping': string_ids must be hex, decimal or farm"):
        JobConfig.load(recis_job(tmp_path, mapping={"string_ids": "md5"}))
    with pytest.raises(ConfigError, match="dense column 'd': 1 defaults for length 2"):
        JobConfig.load(recis_job(tmp_path, mapping={"dense": [{"name": "d", "length": 2, "defaults": [1.0]}]}))
    with pytest.raises(ConfigError, match="unknown key 'data.shuffle.rows'"):
        JobConfig.load(recis_job(tmp_path, shuffle={"rows": 5}))
    with pytest.raises(ConfigError, match="epochs must be >= 1"):
        JobConfig.load(recis_job(tmp_path, epochs=0))


def _eval_batches(rng: np.random.Generator, n_batches: int, rows: int):
    from trainer.batch import PyPersiaBatchData

    batches = []
    for _ in range(n_batches):
        users = [[] if rng.random() < 0.1 else [int(rng.integers(0, 12)) * 2**40] for _ in range(rows)]
        b = PyPersiaBatchData()
        b.add_dense_f32(rng.random((rows, 2), dtype=np.float32))
        b.add_sparse_feature(SparseFeature.from_lists("user", users))
        b.add_sparse_feature(SparseFeature.from_lists("item", [[int(i)] for i in rng.integers(0, 50, rows)]))
        b.add_target((rng.random((rows, 1)) < 0.3).astype(np.float32))
        batches.append(b)
    return batches


@pytest.mark.unit
def test_evaluation_reports_exact_and_bucketed_auc_and_gauc_by_a_features_first_id(pairwise_gauc):
    from trainer.ctx import TrainCtx
    from trainer.job import TrainConfig, evaluate
    from trainer.metrics import roc_auc
    from trainer.models import DeepCTR

    emb = EmbeddingConfig.from_dict({"slots_config": {"user": {"dim": 4}, "item": {"dim": 4}}})
    torch.manual_seed(0)
    model = DeepCTR(2, [4, 4], [8])
    batches = _eval_batches(np.random.default_rng(2), 3, 200)
    with TrainCtx(
        model=model,
        dense_optimizer=torch.optim.Adam(model.parameters()),
        sparse_optimizer=None,
        embedding_config=emb,
        global_config=GlobalConfig.from_dict({"initialization": {"lower": -1.0, "upper": 1.0}}),
    ) as ctx:
        for b in batches:  # rows for the ids, so that scores differ by user
            ctx.forward(b)
        for weight in ("impressions", "clicks"):
            figures = evaluate(ctx, batches, TrainConfig(gauc_group="user", gauc_weight=weight))
            scores = np.concatenate([ctx.predict(b).numpy()[:, 0] for b in batches])
            labels = np.concatenate([b.targets[0][:, 0] for b in batches])
            users = [
                f.ids[f.offsets[i]] if f.offsets[i + 1] > f.offsets[i] else None
                for b in batches
                for f in b.sparse
                if f.name == "user"
                for i in range(b.batch_size)
            ]
            keep = [i for i, u in enumerate(users) if u is not None]
            want = pairwise_gauc(labels[keep], scores[keep], [users[i] for i in keep], weight)
            assert figures["gauc"] == pytest.approx(want, abs=1e-12)
            assert figures["auc"] == roc_auc(labels, scores) and figures["rows"] == 600
            assert abs(figures["auc_bucketed"] - figures["auc"]) < 1e-3
        bucketed_only = evaluate(ctx, batches, TrainConfig(exact_auc_max_rows=599))
        assert bucketed_only["auc"] == bucketed_only["auc_bucketed"] and bucketed_only["gauc"] is None
        with pytest.raises(ConfigError, match="train.gauc_group: the batches have no sparse feature 'city'"):
            evaluate(ctx, batches, TrainConfig(gauc_group="city"))


@pytest.mark.process
def test_job_writes_bucketed_auc_and_gauc_to_metrics_jsonl(tmp_path):
    train = {"steps": 20, "eval_every": 10, "eval_batches": 4, "log_every": 10, "gauc_group": "C1"}
    result = run_job(JobConfig.load(write_job(tmp_path, train=train, output={"dir": "run"})), progress=False)
    lines = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "step" in x]
    assert [x["step"] for x in steps] == [10, 20]
    for x in steps:
        assert 0 < x["eval_gauc"] < 1 and abs(x["eval_auc_bucketed"] - x["eval_auc"]) < 1e-3
    assert lines[-1]["final"] and lines[-1]["eval_gauc"] == result.eval_gauc == steps[-1]["eval_gauc"]
    with pytest.raises(ConfigError, match="train.gauc_group: 'C99' is not a feature of"):
        run_job(JobConfig.load(write_job(tmp_path, train={**train, "gauc_group": "C99"})), progress=False)
    with pytest.raises(ConfigError, match="gauc_weight must be impressions or clicks, got 'users'"):
        JobConfig.load(write_job(tmp_path, train={**train, "gauc_weight": "users"}))
