"""``ctrserve train --config job.yml``: a whole training job from one validated YAML file.

Trains a DLRM or DeepCTR model on Criteo-format files, Parquet/ORC files or generated
Criteo-like data, with the sparse tables in this process or on remote embedding servers. Shows
a progress bar (loss, AUC, samples/s), writes metrics as JSON lines, evaluates on held-out
batches, checkpoints and exports TorchScript versions to a model root, and draws the loss and
AUC curves as a PNG at the end. Runs data-parallel under ``torchrun`` (every rank shares the
embedding servers; rank 0 writes).

Every key of ``job.yml`` is listed by ``ctrserve config-reference``; an unknown key is an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from embedding_server.core.config import EmbeddingConfig
from embedding_server.core.config_schema import build, option, read_yaml
from embedding_server.core.errors import ConfigError
from embedding_server.core.feature_ops import FeaturePipeline
from embedding_server.core.optimizers import SparseOptimizer, optimizer_from_dict
from embedding_server.modelroot.incremental import publish_checkpoint, watermark_of
from embedding_server.storage.kinds import StorageKind
from trainer.batch import PyPersiaBatchData
from trainer.ctx import TrainCtx
from trainer.data import ColumnMapping
from trainer.export import export_dense
from trainer.loader import DataLoader, FileFormat
from trainer.metrics import GAUC_WEIGHTS, BucketedAUC, gauc, log_loss, roc_auc
from trainer.models import DLRM, DeepCTR
from trainer.synthetic import SyntheticCriteo
from trainer.telemetry import TrainerMetrics

log = logging.getLogger(__name__)

#: ``torch.optim.Adagrad``'s initial accumulator: job.yml's default (PERSIA's is 0.01).
TORCH_ADAGRAD_INITIAL_ACCUMULATOR = 0.0


# --------------------------------------------------------------------------- job.yml


@dataclass(frozen=True)
class SyntheticDataConfig:
    seed: int = option(0, doc="seed of the generated data and of its planted model")
    rows: int = option(0, doc="rows to generate (0 = endless)")

    def __post_init__(self) -> None:
        if self.rows < 0:
            raise ValueError(f"rows must be >= 0, got {self.rows}")


#: DataConfig.format -> the loader's ``fmt`` (None: by extension and first line)
_LOADER_FORMATS: dict[str, FileFormat | None] = {
    "auto": None,
    "tsv": "tsv",
    "csv": "csv",
    "parquet": "parquet",
    "orc": "orc",
}


@dataclass(frozen=True)
class ShuffleConfig:
    seed: int = option(0, doc="seed of both shuffles (an epoch's order is the same on every run with this seed)")
    files: bool = option(False, doc="shuffle the order of the training files each epoch (the same way on every rank)")
    buffer_rows: int = option(
        0, doc="shuffle training rows through a buffer of this many rows (memory: one row each; 0 = rows in file order)"
    )

    def __post_init__(self) -> None:
        if self.buffer_rows < 0:
            raise ValueError(f"buffer_rows must be >= 0, got {self.buffer_rows}")


@dataclass(frozen=True)
class DataConfig:
    train_paths: list[str] = option(
        default_factory=list,
        doc="training files, directories (their .parquet/.pq/.orc files, recursively, sorted) or globs "
        "(Criteo TSV/CSV, .parquet, .orc); empty = synthetic data",
    )
    eval_paths: list[str] = option(
        default_factory=list,
        doc="held-out files; empty = synthetic rows kept out of training, or (with train_paths) the first training batches",
    )
    format: str = option("auto", doc="auto (by extension and first line), tsv, csv, parquet or orc")
    synthetic: SyntheticDataConfig = option(
        default_factory=SyntheticDataConfig, doc="generated Criteo-like data with a planted model"
    )
    mapping: ColumnMapping = option(
        default_factory=ColumnMapping.criteo,
        doc="which columns of Parquet/ORC files are labels, dense inputs and sparse features; "
        "without this section Criteo's: label, I1..I13 (log1p), C1..C26 (hex)",
    )
    epochs: int = option(1, doc="passes over train_paths (training stops earlier at train.steps)")
    shuffle: ShuffleConfig = option(default_factory=ShuffleConfig, doc="seeded shuffles of the training data")
    batch_size: int = option(1024, doc="samples per step (per rank)")
    prefetch: int = option(4, doc="batches prepared ahead in a background thread")

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {self.batch_size}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.format not in _LOADER_FORMATS:
            raise ValueError(f"format must be auto, tsv, csv, parquet or orc, got {self.format!r}")


@dataclass(frozen=True)
class ModelConfig:
    type: str = option("dlrm", doc="dlrm or deepctr")
    bottom_mlp: list[int] = option(default_factory=lambda: [64, 32], doc="dlrm: hidden sizes of the bottom MLP")
    top_mlp: list[int] = option(default_factory=lambda: [64, 32], doc="dlrm: hidden sizes of the top MLP")
    hidden: list[int] = option(default_factory=lambda: [256, 128], doc="deepctr: hidden sizes")

    def __post_init__(self) -> None:
        if self.type not in ("dlrm", "deepctr"):
            raise ValueError(f"type must be 'dlrm' or 'deepctr', got {self.type!r}")
        if any(s <= 0 for s in [*self.bottom_mlp, *self.top_mlp, *self.hidden]):
            raise ValueError("layer sizes must be > 0")


@dataclass(frozen=True)
class DenseOptimizerConfig:
    type: str = option("adam", doc="adam, adagrad or sgd (torch.optim)")
    lr: float = option(1e-3, doc="learning rate")
    weight_decay: float = option(0.0, doc="L2 penalty")

    def __post_init__(self) -> None:
        if self.type not in ("adam", "adagrad", "sgd"):
            raise ValueError(f"type must be adam, adagrad or sgd, got {self.type!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = option(1000, doc="training steps (stops earlier when finite data runs out)")
    eval_every: int = option(200, doc="evaluate every N steps (0 = only at the end)")
    eval_batches: int = option(20, doc="held-out batches per evaluation")
    log_every: int = option(20, doc="write a metrics line every N steps")
    seed: int = option(0, doc="seed of the dense model's initialisation")
    mixed_precision: bool = option(False, doc="torch.amp on CUDA (ignored on the CPU)")
    max_seconds: float = option(0.0, doc="stop after this many seconds of training (0 = no limit)")
    auc_buckets: int = option(
        10_000, doc="score buckets of the streaming AUC (eval_auc_bucketed; merged over data-parallel ranks)"
    )
    exact_auc_max_rows: int = option(
        1_000_000,
        doc="evaluations of at most this many rows (all ranks together) report the exact AUC as eval_auc; "
        "larger ones report the bucketed AUC there",
    )
    gauc_group: str = option(
        "",
        doc="a sparse feature whose first id per sample is the sample's group for GAUC (e.g. a user id); "
        "samples without an id are left out; empty = no GAUC",
    )
    gauc_weight: str = option("impressions", doc="GAUC weight of a group: impressions (its samples) or clicks")

    def __post_init__(self) -> None:
        if self.max_seconds < 0:
            raise ValueError(f"max_seconds must be >= 0, got {self.max_seconds}")
        if self.auc_buckets < 2:
            raise ValueError(f"auc_buckets must be >= 2, got {self.auc_buckets}")
        if self.exact_auc_max_rows < 0:
            raise ValueError(f"exact_auc_max_rows must be >= 0, got {self.exact_auc_max_rows}")
        if self.gauc_weight not in GAUC_WEIGHTS:
            raise ValueError(f"gauc_weight must be impressions or clicks, got {self.gauc_weight!r}")
        for name in ("steps", "eval_batches", "log_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0, got {self.eval_every}")


@dataclass(frozen=True)
class OutputConfig:
    dir: str = option(
        "runs/job",
        doc="a local folder for metrics.jsonl, curves.png and (by default) the checkpoint (relative to job.yml)",
    )
    model_root: str = option(
        "", doc="export TorchScript versions here (a path, file://, s3:// or hdfs:// URL; empty = no export)"
    )
    checkpoint: str = option(
        "", doc="the training checkpoint (a path, file://, s3:// or hdfs:// URL; empty = output.dir/checkpoint)"
    )
    export_every: int = option(0, doc="export every N steps (0 = only at the end)")
    checkpoint_every: int = option(0, doc="checkpoint every N steps (0 = only at the end)")
    sparse_checkpoint_every: int = option(
        0,
        doc="publish a full sparse checkpoint to model_root/checkpoints every N steps (0 = with the first export and at the end)",
    )
    keep_checkpoints: int = option(
        3, doc="full sparse checkpoints kept in model_root (older ones and the packets they include are deleted)"
    )

    def __post_init__(self) -> None:
        if self.export_every < 0 or self.checkpoint_every < 0 or self.sparse_checkpoint_every < 0:
            raise ValueError("export_every, checkpoint_every and sparse_checkpoint_every must be >= 0")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if "://" in self.dir:
            raise ValueError(
                f"dir must be a local folder (metrics.jsonl and curves.png are local files), got {self.dir!r}; "
                "put the checkpoint on storage with output.checkpoint"
            )
        for key in ("model_root", "checkpoint"):
            _check_location(key, getattr(self, key))


@dataclass(frozen=True)
class JobConfig:
    """The contents of ``job.yml``. Paths are relative to the file."""

    embedding_config: str = option(doc="path of embedding_config.yml")
    global_config: str = option(
        "",
        doc="path of global_config.yml for the in-process store (capacity, initialisation); its storage section "
        "(file modes, connection options) opens what the trainer writes, with embedding_servers too",
    )
    embedding_servers: list[str] = option(
        default_factory=list, doc="host:port of remote shards in order; empty = in-process tables"
    )
    num_shards: int = option(1, doc="in-process shards")
    resume_from: str = option(
        "", doc="a checkpoint to start from (a path, file://, s3:// or hdfs:// URL, as output.checkpoint)"
    )
    data: DataConfig = option(default_factory=DataConfig, doc="training and evaluation data")
    model: ModelConfig = option(default_factory=ModelConfig, doc="the dense model")
    dense_optimizer: DenseOptimizerConfig = option(
        default_factory=DenseOptimizerConfig, doc="optimizer of the dense model"
    )
    sparse_optimizer: dict[str, Any] = option(
        default_factory=lambda: {"type": "adagrad", "lr": 0.05},
        doc="sparse optimizer: type (sgd, adagrad or adam) plus its parameters, as in global_config.yml; adagrad's "
        "initial_accumulator_value defaults to torch.optim.Adagrad's 0 here (PERSIA's files and the persia package "
        "keep PERSIA's 0.01)",
    )
    train: TrainConfig = option(default_factory=TrainConfig, doc="the training loop")
    output: OutputConfig = option(default_factory=OutputConfig, doc="where results go")

    def __post_init__(self) -> None:
        _check_location("resume_from", self.resume_from)

    @classmethod
    def load(cls, path: str | Path) -> JobConfig:
        """Read and validate ``job.yml``, resolving its paths against the file's folder.

        Raises:
            ConfigError: a missing file, an unknown key or a bad value (naming the key).
        """
        path = Path(path)
        job = build(cls, read_yaml(path), str(path))
        job.sparse()  # validate now, not at the first step
        base = path.parent
        return _with_paths(job, base)

    def sparse(self) -> SparseOptimizer:
        """The sparse optimizer; Adagrad's accumulator starts at torch's 0 unless the job sets it.

        PERSIA starts it at 0.01, which damps the first steps of every new id; on the generated
        data of deploy/examples/job.yml that trained to a lower AUC than torch's 0
        (benchmarks/bench_defaults.py), and users coming from PyTorch expect torch's behaviour.
        """
        params = dict(self.sparse_optimizer)
        if str(params.get("type", "adagrad")).lower() == "adagrad":
            params.setdefault("initial_accumulator_value", TORCH_ADAGRAD_INITIAL_ACCUMULATOR)
        return optimizer_from_dict(params, "job.yml", "sparse_optimizer")


def _check_location(key: str, location: str) -> None:
    """Refuse a checkpoint or model-root location whose URL scheme no storage reads.

    Raises:
        ValueError: ``location`` is a URL of another scheme than file://, s3:// or hdfs://.
    """
    if location and StorageKind.of_url(location) is None:
        raise ValueError(
            f"{key}: {location!r} has a scheme no storage supports; use a local path, file://, s3:// or hdfs://"
        )


def _with_paths(job: JobConfig, base: Path) -> JobConfig:
    def resolve(p: str) -> str:
        return p if not p or "://" in p or os.path.isabs(p) else str(base / p)

    data = dataclasses.replace(
        job.data,
        train_paths=[resolve(p) for p in job.data.train_paths],
        eval_paths=[resolve(p) for p in job.data.eval_paths],
    )
    output = dataclasses.replace(
        job.output,
        dir=resolve(job.output.dir),
        model_root=resolve(job.output.model_root),
        checkpoint=resolve(job.output.checkpoint),
    )
    return dataclasses.replace(
        job,
        embedding_config=resolve(job.embedding_config),
        global_config=resolve(job.global_config),
        resume_from=resolve(job.resume_from),
        data=data,
        output=output,
    )


# --------------------------------------------------------------------------- the job


HELD_OUT_START = 1 << 40  # synthetic rows from here on are never trained on


def job_sources(
    data: DataConfig, eval_batches: int, features: FeaturePipeline | None = None
) -> tuple[DataLoader, list[PyPersiaBatchData]]:
    """The training loader (this rank's share) and the held-out batches every evaluation uses;
    ``features`` (the embedding config's feature ops) make the slots with ops from raw inputs.

    Raises:
        FileNotFoundError: a path or glob matches no file.
        ConfigError: the held-out data is empty.
    """
    fmt = _LOADER_FORMATS[data.format]
    if data.train_paths:
        train = DataLoader(
            data.train_paths,
            data.batch_size,
            prefetch=data.prefetch,
            fmt=fmt,
            mapping=data.mapping,
            shuffle_files=data.shuffle.files,
            shuffle_buffer_rows=data.shuffle.buffer_rows,
            seed=data.shuffle.seed,
            epochs=data.epochs,
            features=features,
        )
        held_out = DataLoader(
            data.eval_paths or data.train_paths,
            data.batch_size,
            rank=0,
            world_size=1,
            fmt=fmt,
            mapping=data.mapping,
            features=features,
        )
    else:
        generator = SyntheticCriteo(seed=data.synthetic.seed)
        train = DataLoader(
            generator, data.batch_size, prefetch=data.prefetch, num_rows=data.synthetic.rows or None, features=features
        )
        held_out = DataLoader(
            generator,
            data.batch_size,
            rank=0,
            world_size=1,
            start_row=HELD_OUT_START,
            num_rows=eval_batches * data.batch_size,
            features=features,
        )
    with held_out:
        evals = list(itertools.islice(held_out, eval_batches))
    if not evals:
        raise ConfigError("data: the evaluation data holds no rows")
    return train, evals


def build_model(cfg: ModelConfig, config: EmbeddingConfig, dense_width: int) -> torch.nn.Module:
    """The configured dense model for ``config``'s features.

    Raises:
        ConfigError: DLRM with features of different dims.
    """
    dims = [slot.output_dim for slot in config.slots_config.values()]  # tile: tile_len * dim
    if cfg.type == "deepctr":
        return DeepCTR(dense_width, dims, cfg.hidden)
    if len(set(dims)) != 1:
        raise ConfigError(f"model.type dlrm needs every feature to have the same dim, got {sorted(set(dims))}")
    return DLRM(dense_width, len(dims), dims[0], cfg.bottom_mlp, cfg.top_mlp)


def dense_optimizer(cfg: DenseOptimizerConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    kind = {"adam": torch.optim.Adam, "adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD}[cfg.type]
    return kind(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


@dataclass
class JobResult:
    """What a finished job reports (also the last line of ``metrics.jsonl``)."""

    steps: int
    samples: int
    seconds: float
    train_loss: float
    eval_auc: float
    eval_loss: float
    exported_versions: list[int] = field(default_factory=list)
    checkpoint: str = ""
    eval_auc_bucketed: float = float("nan")
    eval_gauc: float | None = None  # None without train.gauc_group


def run_job(job: JobConfig, progress: bool = True, telemetry: TrainerMetrics | None = None) -> JobResult:
    """Train as ``job`` says; returns the final figures (and keeps ``telemetry``'s metrics up to date).

    Raises:
        ConfigError: inconsistent settings (for example data-parallel without servers).
    """
    config = EmbeddingConfig.load(job.embedding_config)
    if job.train.gauc_group and job.train.gauc_group not in config.slots_config:
        raise ConfigError(
            f"train.gauc_group: '{job.train.gauc_group}' is not a feature of {job.embedding_config} "
            f"(it defines: {', '.join(config.slots_config)})"
        )
    rank = int(os.environ.get("RANK", "0"))
    out_dir = Path(job.output.dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    train_data, eval_data = job_sources(job.data, job.train.eval_batches, FeaturePipeline.from_config(config))
    dense_width = eval_data[0].dense_matrix().shape[1]
    torch.manual_seed(job.train.seed)
    model = build_model(job.model, config, dense_width)
    with TrainCtx(
        model=model,
        dense_optimizer=dense_optimizer(job.dense_optimizer, model),
        sparse_optimizer=job.sparse(),
        embedding_config=config,
        global_config=job.global_config or None,
        embedding_servers=job.embedding_servers or None,
        num_shards=job.num_shards,
        mixed_precision=job.train.mixed_precision,
    ) as ctx:
        if job.resume_from:
            ctx.load_checkpoint(job.resume_from)
        if telemetry is not None:
            telemetry.publishers = lambda: getattr(ctx.client, "publishers", [])
        return _loop(ctx, job, train_data, eval_data, dense_width, out_dir, rank, progress, telemetry)


def checkpoint_location(job: JobConfig) -> str:
    """Where the job's training checkpoint goes: ``output.checkpoint``, else ``<dir>/checkpoint``."""
    return job.output.checkpoint or str(Path(job.output.dir) / "checkpoint")


def _loop(
    ctx: TrainCtx,
    job: JobConfig,
    train_data: DataLoader,
    eval_data: list[PyPersiaBatchData],
    dense_width: int,
    out_dir: Path,
    rank: int,
    progress: bool,
    telemetry: TrainerMetrics | None = None,
) -> JobResult:
    metrics = _MetricsWriter(out_dir / "metrics.jsonl" if rank == 0 else None)
    checkpoint = checkpoint_location(job)
    versions: list[int] = []
    start, samples, losses = time.perf_counter(), 0, []
    last_eval: dict[str, Any] = {"auc": float("nan"), "auc_bucketed": float("nan"), "loss": float("nan"), "gauc": None}
    bar = tqdm(total=job.train.steps, desc="train", unit="step", disable=not progress or rank != 0, dynamic_ncols=True)
    window_start, window_samples = start, 0
    evaluated_at = 0
    batches: Iterator[PyPersiaBatchData] = iter(train_data)
    try:
        for step in range(ctx.step + 1, job.train.steps + 1):
            batch = next(batches, None)
            if batch is None:
                log.info("training data ran out after %d steps", step - 1)
                break
            output, target = ctx.forward(batch)
            loss = F.binary_cross_entropy(output, target)
            ctx.backward(loss)
            losses.append(loss.item())
            samples += batch.batch_size
            window_samples += batch.batch_size
            if telemetry is not None:
                telemetry.stepped(step, batch.batch_size)
            is_last = step == job.train.steps
            if (job.train.eval_every and step % job.train.eval_every == 0) or is_last:
                last_eval = evaluate(ctx, eval_data, job.train)
                evaluated_at = step
                if telemetry is not None:
                    telemetry.evaluated(last_eval["auc"], last_eval["loss"])
            if step % job.train.log_every == 0 or is_last:
                now = time.perf_counter()
                rate = window_samples / max(now - window_start, 1e-9)
                window_start, window_samples = now, 0
                recent_loss = float(np.mean(losses[-job.train.log_every :]))
                if telemetry is not None:
                    telemetry.logged(recent_loss, rate)
                metrics.write(
                    step=step,
                    loss=recent_loss,
                    eval_auc=last_eval["auc"],
                    eval_auc_bucketed=last_eval["auc_bucketed"],
                    eval_gauc=last_eval["gauc"],
                    eval_loss=last_eval["loss"],
                    samples_per_s=rate,
                    elapsed_s=now - start,
                )
                bar.set_postfix(loss=f"{recent_loss:.4f}", auc=f"{last_eval['auc']:.4f}", samples_s=f"{rate:,.0f}")
            if job.output.model_root and job.output.export_every and step % job.output.export_every == 0 and rank == 0:
                versions.append(_publish(ctx, job, dense_width, first=not versions))
                if telemetry is not None:
                    telemetry.exported()
            if job.output.checkpoint_every and step % job.output.checkpoint_every == 0:
                ctx.dump_checkpoint(checkpoint)
            bar.update(1)
            if STOP.is_set() or (job.train.max_seconds and time.perf_counter() - start >= job.train.max_seconds):
                log.info("stopping after step %d (%s)", step, "signal" if STOP.is_set() else "max_seconds")
                break
    finally:
        bar.close()
        _close(batches)
    if ctx.step and evaluated_at != ctx.step and not STOP.is_set():
        # the data ran out (or max_seconds passed) before train.steps: the result reports the
        # model as it ends, not as it was at the last scheduled evaluation
        last_eval = evaluate(ctx, eval_data, job.train)
        if telemetry is not None:
            telemetry.evaluated(last_eval["auc"], last_eval["loss"])
    ctx.dump_checkpoint(checkpoint)
    if (
        job.output.model_root
        and rank == 0
        and (not versions or job.output.export_every == 0 or ctx.step % job.output.export_every)
    ):
        versions.append(_publish(ctx, job, dense_width, first=not versions, last=True))
        if telemetry is not None:
            telemetry.exported()
    result = JobResult(
        ctx.step,
        samples,
        time.perf_counter() - start,
        float(np.mean(losses[-job.train.log_every :])) if losses else float("nan"),
        last_eval["auc"],
        last_eval["loss"],
        versions,
        checkpoint,
        last_eval["auc_bucketed"],
        last_eval["gauc"],
    )
    metrics.write(final=True, **result.__dict__)
    metrics.close()
    if rank == 0:
        plot_curves(out_dir / "metrics.jsonl", out_dir / "curves.png")
    return result


def _publish(ctx: TrainCtx, job: JobConfig, dense_width: int, first: bool, last: bool = False) -> int:
    """Export the dense model to the model root, after a full sparse checkpoint when one is due.

    The dense version records the sparse watermark it was trained against (the last packet each
    in-process shard published); with remote servers the watermark is left empty.
    """
    every = job.output.sparse_checkpoint_every
    if first or last or (every and ctx.step % every == 0):
        url = publish_checkpoint(
            ctx.client, job.output.model_root, keep=job.output.keep_checkpoints, storage_options=ctx.storage_options
        )
        log.info("published sparse checkpoint %s", url)
    publishers = getattr(ctx.client, "publishers", [])
    return export_dense(
        ctx.model,
        ctx.config,
        job.output.model_root,
        step=ctx.step,
        dense_width=dense_width,
        sparse_watermark=watermark_of(publishers) if publishers else None,
        storage_options=ctx.storage_options,
    )


def evaluate(ctx: TrainCtx, batches: list[PyPersiaBatchData], train: TrainConfig | None = None) -> dict[str, Any]:
    """AUC, bucketed AUC, GAUC and log loss over held-out batches, scored as serving scores
    them: the lookups insert nothing (:meth:`TrainCtx.predict`), so ids never trained read as
    zeros and never become rows that are checkpointed, exported and served.

    Under ``torch.distributed`` each rank scores its share of ``batches`` (every ``world``-th);
    the bucketed AUC's counts and the loss are summed over the ranks with ``all_reduce``, and
    the scores are gathered only where the exact AUC or GAUC needs them. Every rank returns the
    same figures.

    Args:
        train: the job's ``train`` section (``auc_buckets``, ``exact_auc_max_rows``,
            ``gauc_group``, ``gauc_weight``); its defaults when not given.

    Returns:
        ``auc`` (exact up to ``exact_auc_max_rows`` rows, else the bucketed one),
        ``auc_bucketed``, ``loss``, ``gauc`` (None without ``gauc_group``) and ``rows``.

    Raises:
        ConfigError: ``gauc_group`` is not a sparse feature of the batches.
    """
    import torch.distributed as dist

    cfg = train or TrainConfig()
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    mine = batches[rank::world]
    bucketed = BucketedAUC(cfg.auc_buckets)
    labels, scores, groups, grouped = [], [], [], []
    # Every rank runs as many forwards (a short share scores one batch again, uncounted): a
    # wrapped model may synchronise buffers in each forward.
    for i in range(-(-len(batches) // world)):
        batch = mine[i] if i < len(mine) else batches[0]
        p = ctx.predict(batch).numpy()[:, 0]
        if i >= len(mine):
            continue
        y = batch.targets[0][:, 0]
        bucketed.update(y, p)
        labels.append(y)
        scores.append(p)
        if cfg.gauc_group:
            ids, has = _first_ids(batch, cfg.gauc_group)
            groups.append(ids)
            grouped.append(has)
    y = np.concatenate(labels) if labels else np.zeros(0, np.float32)
    p = np.concatenate(scores) if scores else np.zeros(0, np.float32)
    g = np.concatenate(groups) if groups else np.zeros(0, np.uint64)
    present = np.concatenate(grouped) if grouped else np.zeros(0, np.bool_)
    loss_sum = torch.tensor([log_loss(y, p) * y.shape[0] if y.shape[0] else 0.0, y.shape[0]], dtype=torch.float64)
    if distributed:
        bucketed.all_reduce()
        dist.all_reduce(loss_sum)
    rows = int(loss_sum[1])
    if distributed and (rows <= cfg.exact_auc_max_rows or cfg.gauc_group):
        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, (y, p, g, present))
        y, p, g, present = (np.concatenate([part[k] for part in parts]) for k in range(4))
    if rows == 0:
        return {"auc": float("nan"), "auc_bucketed": float("nan"), "loss": float("nan"), "gauc": None, "rows": 0}
    return {
        "auc": roc_auc(y, p) if rows <= cfg.exact_auc_max_rows else bucketed.value(),
        "auc_bucketed": bucketed.value(),
        "loss": float(loss_sum[0]) / rows if distributed else log_loss(y, p),
        "gauc": gauc(y[present], p[present], g[present], cfg.gauc_weight) if cfg.gauc_group else None,
        "rows": rows,
    }


def _first_ids(batch: PyPersiaBatchData, feature: str) -> tuple[np.ndarray, np.ndarray]:
    """Each sample's first id of ``feature`` (uint64; 0 where it has none) and whether it has
    one (samples without are left out of GAUC)."""
    found = [f for f in batch.sparse if f.name == feature]
    if not found:
        names = ", ".join(f.name for f in batch.sparse)
        raise ConfigError(f"train.gauc_group: the batches have no sparse feature '{feature}' (they have {names})")
    f = found[0]
    has = np.diff(f.offsets) > 0
    out = np.zeros(has.shape[0], np.uint64)
    out[has] = f.ids[f.offsets[:-1][has]]
    return out, has


class _MetricsWriter:
    """JSON lines, one object per log step; NaN is written as null (valid JSON)."""

    def __init__(self, path: Path | None):
        self._file = open(path, "w") if path else None

    def write(self, **values: Any) -> None:
        if self._file is None:
            return
        clean = {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in values.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def plot_curves(metrics_path: Path, png_path: Path) -> None:
    """Training loss and held-out AUC over steps, from ``metrics.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    rows = [r for r in rows if "step" in r and not r.get("final")]
    fig, (ax_loss, ax_auc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot([r["step"] for r in rows], [r["loss"] for r in rows], color="tab:blue")
    ax_loss.set(title="training loss", xlabel="step", ylabel="binary cross-entropy")
    auc = [(r["step"], r["eval_auc"]) for r in rows if r.get("eval_auc") is not None]
    if auc:
        ax_auc.plot(*zip(*auc), marker="o", color="tab:green")
    ax_auc.set(title="held-out AUC", xlabel="step", ylabel="AUC")
    for ax in (ax_loss, ax_auc):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def _close(iterator: Any) -> None:
    close = getattr(iterator, "close", None)
    if close is not None:
        close()


# --------------------------------------------------------------------------- CLI


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model from a job.yml",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="path of job.yml")
    p.add_argument("--steps", type=int, help="override train.steps")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus metrics (steps, samples/s, loss, eval AUC, packets) on this port (rank 0; default off)",
    )
    p.add_argument("--metrics-address", default="127.0.0.1", help="address the metrics port binds (default 127.0.0.1)")
    p.set_defaults(func=_cli)


STOP = threading.Event()  # set by SIGTERM / SIGINT: finish the step, checkpoint, export, exit


def _cli(args: argparse.Namespace) -> int:
    job = JobConfig.load(args.config)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: STOP.set())
    if args.steps is not None:
        if args.steps <= 0:
            raise ConfigError(f"--steps must be > 0, got {args.steps}")
        job = dataclasses.replace(job, train=dataclasses.replace(job.train, steps=args.steps))
    telemetry = None
    if args.metrics_port is not None and int(os.environ.get("RANK", "0")) == 0:
        telemetry = TrainerMetrics()
        port = telemetry.serve_http(args.metrics_port, args.metrics_address)
        log.info("metrics on http://%s:%d/metrics", args.metrics_address, port)
    result = run_job(job, progress=not args.no_progress, telemetry=telemetry)
    # The job is done: a late signal must not turn the clean exit into a kill (Python restores
    # the default handlers of Python-level handlers while it shuts down; it keeps SIG_IGN).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result.__dict__))
    return 0
