"""``ctrserve predict``: score a Criteo, Parquet or ORC file through a served model over gRPC or REST."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from handler.torchserve_keys import add_key_arguments, key_from_arguments

if TYPE_CHECKING:
    from embedding_server.core.feature_ops import FeaturePipeline
    from trainer.data import Chunk, ColumnMapping


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="score a Criteo TSV/CSV, Parquet or ORC file through TorchServe (gRPC or REST)",
        description="Read a file as the trainer reads it (Criteo text: log1p dense, hex ids; Parquet and ORC: "
        "through a job's column mapping), send it in batches to TorchServe and print one score per line "
        "(or write them with --output). Bad data is reported as one line naming the file, column and row "
        "(exit 2).",
    )
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--grpc", metavar="HOST:PORT", help="TorchServe gRPC inference address (e.g. 127.0.0.1:7070)")
    target.add_argument("--rest", metavar="URL", help="TorchServe REST inference address (e.g. http://127.0.0.1:8080)")
    p.add_argument(
        "--input",
        required=True,
        help="Criteo TSV, or CSV with a header (label, I1..I13, C1..C26); or Parquet / ORC files (a file, a "
        "directory of them or a glob) read through the column mapping of --job or --mapping",
    )
    mapping = p.add_mutually_exclusive_group()
    mapping.add_argument(
        "--job",
        metavar="JOB_YML",
        help="take data.mapping from this job.yml, and apply the feature ops of its embedding config",
    )
    mapping.add_argument(
        "--mapping",
        metavar="MAPPING_YML",
        help="a YAML file with the keys of job.yml's data.mapping (default: Criteo's column names)",
    )
    p.add_argument("--model", default="deepctr", help="model name (default deepctr)")
    p.add_argument("--version", help="model version (default: the default version)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per request (default 64)")
    p.add_argument("--limit", type=int, help="score at most this many samples")
    p.add_argument("--output", help="write scores here (one per line) instead of standard output")
    add_key_arguments(p, "inference")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default 30)")
    p.set_defaults(func=run_predict)


def run_predict(args: argparse.Namespace) -> int:
    from handler.client import PredictionError

    try:
        return _predict(args)
    except PredictionError as exc:
        print(f"ctrserve predict: error: {exc}", file=sys.stderr)
        return 1


def input_chunks(
    source: str, mapping: ColumnMapping | None = None, chunk_rows: int = 64, fmt: str | None = None
) -> Iterator[Chunk]:
    """The rows of ``--input`` as the trainer reads them, in chunks of at most ``chunk_rows``.

    Args:
        source: a file, a directory (its Parquet and ORC files) or a glob.
        mapping: the column mapping of Parquet and ORC files (default: Criteo's column names).
        chunk_rows: the most rows per chunk.
        fmt: ``"parquet"``, ``"orc"`` or ``"criteo"`` for every file; by default by extension.

    Raises:
        ConfigError: no file matches ``source``.
        DataFormatError: bad data, naming the file, column and row.
    """
    from embedding_server.core.errors import ConfigError
    from trainer.criteo import read_criteo
    from trainer.data import ColumnMapping, read_table
    from trainer.loader import expand_paths, file_format

    try:
        files = expand_paths(source)
    except FileNotFoundError as exc:
        raise ConfigError(f"--input: {exc}") from None
    for path in files:
        kind = fmt or file_format(path)
        if kind in ("parquet", "orc"):
            yield from read_table(path, kind, mapping=mapping or ColumnMapping.criteo(), chunk_rows=chunk_rows)  # type: ignore[arg-type]
        else:
            yield from read_criteo(path, chunk_rows=chunk_rows)


def _mapping_and_features(args: argparse.Namespace) -> tuple[ColumnMapping | None, FeaturePipeline | None]:
    from trainer.data import ColumnMapping

    if args.mapping:
        return ColumnMapping.load(args.mapping), None
    if not args.job:
        return None, None
    from embedding_server.core.config import EmbeddingConfig
    from embedding_server.core.feature_ops import FeaturePipeline
    from trainer.job import JobConfig

    job = JobConfig.load(args.job)
    features = FeaturePipeline.from_config(EmbeddingConfig.load(job.embedding_config))
    return job.data.mapping, features or None


def _predict(args: argparse.Namespace) -> int:
    from handler.client import PredictionClient
    from trainer.data import to_batch

    if args.batch_size < 1:
        from embedding_server.core.errors import ConfigError

        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    mapping, features = _mapping_and_features(args)
    chunks = input_chunks(args.input, mapping, args.batch_size)
    # Read the first rows before connecting, so a wrong file or mapping is reported at once.
    first = next(chunks, None)
    address = f"grpc://{args.grpc}" if args.grpc else args.rest
    scores: list[np.ndarray] = []
    sent = 0
    started = time.perf_counter()
    token = key_from_arguments(args, "inference")
    with PredictionClient(address, args.model, args.version, args.timeout, token) as client:
        for chunk in _chain(first, chunks):
            if args.limit is not None and sent >= args.limit:
                break
            if args.limit is not None and sent + len(chunk) > args.limit:
                chunk = chunk.slice(0, args.limit - sent)
            scores.append(client.predict(to_batch(chunk, features)))
            sent += len(chunk)
    elapsed = time.perf_counter() - started
    result = np.concatenate(scores) if scores else np.zeros(0, np.float32)
    out = open(args.output, "w") if args.output else sys.stdout
    try:
        np.savetxt(out, result.reshape(result.shape[0], -1), fmt="%.7g")
    finally:
        if args.output:
            out.close()
    print(f"scored {sent} samples in {len(scores)} requests over {client.protocol} in {elapsed:.2f} s", file=sys.stderr)
    return 0


def _chain(first: Chunk | None, rest: Iterator[Chunk]) -> Iterator[Chunk]:
    if first is not None:
        yield first
        yield from rest
