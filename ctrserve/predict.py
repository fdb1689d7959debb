"""``ctrserve predict``: score a Criteo file through a served model over gRPC or REST."""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from handler.torchserve_keys import add_key_arguments, key_from_arguments


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="score a Criteo TSV/CSV file through TorchServe (gRPC or REST)",
        description="Read a Criteo file (the trainer's reader: log1p dense, hex ids), send it in batches "
        "to TorchServe and print one score per line (or write them with --output).",
    )
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--grpc", metavar="HOST:PORT", help="TorchServe gRPC inference address (e.g. 127.0.0.1:7070)")
    target.add_argument("--rest", metavar="URL", help="TorchServe REST inference address (e.g. http://127.0.0.1:8080)")
    p.add_argument("--input", required=True, help="Criteo TSV, or CSV with a header (label, I1..I13, C1..C26)")
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


def _predict(args: argparse.Namespace) -> int:
    from handler.client import PredictionClient
    from trainer.criteo import read_criteo
    from trainer.data import to_batch

    address = f"grpc://{args.grpc}" if args.grpc else args.rest
    scores: list[np.ndarray] = []
    sent = 0
    started = time.perf_counter()
    token = key_from_arguments(args, "inference")
    with PredictionClient(address, args.model, args.version, args.timeout, token) as client:
        for chunk in read_criteo(args.input, chunk_rows=args.batch_size):
            if args.limit is not None and sent >= args.limit:
                break
            if args.limit is not None and sent + len(chunk) > args.limit:
                chunk = chunk.slice(0, args.limit - sent)
            scores.append(client.predict(to_batch(chunk)))
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
