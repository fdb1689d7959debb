"""``ctrserve demo``: what the stack does so far, end to end on this machine.

Starts sharded embedding servers (train mode) as child processes, trains a logistic model whose
26 categorical features are embedded by those servers (lookups, gradient pushes, Adagrad on the
servers), checkpoints all shards, loads the checkpoint into an infer-mode store with another
shard count and checks that it serves the trained values bit for bit. Stops every process it
started, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm import tqdm

from embedding_server.batch import SparseFeature
from embedding_server.client import InProcessEmbeddingClient
from embedding_server.config import EmbeddingConfig, GlobalConfig
from embedding_server.launcher import ServerGroup
from embedding_server.remote import RemoteEmbeddingClient

FEATURES = [f"C{i}" for i in range(1, 27)]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the end-to-end demo", description=__doc__)
    p.add_argument("--shards", type=int, default=2, help="embedding server shards (default 2)")
    p.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    p.add_argument("--batch-size", type=int, default=256, help="samples per step (default 256)")
    p.add_argument("--workdir", help="keep configs, logs and the checkpoint here (default: a temp dir)")
    p.set_defaults(func=run)


def synthetic_batch(rng: np.random.Generator, batch_size: int, truth: np.ndarray) -> tuple[list[SparseFeature], torch.Tensor]:
    """Zipf-distributed ids per feature; the label follows a planted per-id score."""
    ids = (rng.zipf(1.3, size=(len(FEATURES), batch_size)) % truth.shape[1]).astype(np.uint64)
    logits = truth[np.arange(len(FEATURES))[:, None], ids.astype(np.int64)].sum(axis=0)
    labels = (rng.random(batch_size) < 1 / (1 + np.exp(-logits))).astype(np.float32)
    feats = [SparseFeature(n, ids[i], np.arange(batch_size + 1, dtype=np.int64)) for i, n in enumerate(FEATURES)]
    return feats, torch.from_numpy(labels)


def run(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ctrserve-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    emb_path, glob_path = workdir / "embedding_config.yml", workdir / "global_config.yml"
    emb_path.write_text(yaml.safe_dump({"slots_config": {n: {"dim": 8} for n in FEATURES}}))
    glob_path.write_text(yaml.safe_dump({
        "common_config": {"job_type": "train"},
        "embedding_parameter_server_config": {"capacity": 200_000},
        "sparse_optimizer": {"type": "adagrad", "lr": 0.1},
    }))
    emb = EmbeddingConfig.load(emb_path)
    print(f"demo workdir: {workdir}")
    print(f"starting {args.shards} embedding server shard(s) in train mode ...")
    t0 = time.perf_counter()
    with ServerGroup.start(emb_path, glob_path, args.shards, workdir / "servers", metrics=True) as group:
        print(f"  serving at {', '.join(group.addresses)} ({time.perf_counter() - t0:.1f} s)")
        for s in group.servers:
            print(f"  metrics: http://127.0.0.1:{s.metrics_port}/metrics")
        client = RemoteEmbeddingClient(emb, group.addresses)
        rng = np.random.default_rng(0)
        truth = rng.normal(0, 0.5, size=(len(FEATURES), 1000))
        readout = torch.zeros(8, requires_grad=True)
        dense_opt = torch.optim.Adam([readout], lr=0.05)
        losses = []
        bar = tqdm(range(args.steps), desc="training", unit="step", mininterval=0.5)
        for _ in bar:
            feats, labels = synthetic_batch(rng, args.batch_size, truth)
            result = client.lookup(feats, requires_grad=True)
            pooled = torch.stack([result[n] for n in FEATURES]).sum(0)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(pooled @ readout, labels)
            dense_opt.zero_grad()
            loss.backward()
            dense_opt.step()
            client.push_gradients(result)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        # Look the probe up before dumping: in train mode a lookup inserts unseen ids.
        probe, _ = synthetic_batch(np.random.default_rng(1), 64, truth)
        trained = client.lookup(probe)
        ckpt = workdir / "checkpoint"
        client.dump(str(ckpt))
        stats = client.stats()
        client.close()
    infer = InProcessEmbeddingClient(emb, GlobalConfig.from_dict({"common_config": {"job_type": "infer"}}), num_shards=1)
    infer.load(str(ckpt))
    served = infer.lookup(probe)
    identical = all(torch.equal(trained[n], served[n]) for n in FEATURES)
    summary = {
        "shards": args.shards,
        "steps": args.steps,
        "first_loss": round(float(np.mean(losses[:20])), 4),
        "last_loss": round(float(np.mean(losses[-20:])), 4),
        "rows_per_shard": [s["rows"] for s in stats],
        "checkpoint": str(ckpt),
        "reloaded_into_1_shard_identical": identical,
    }
    print(json.dumps(summary, indent=2))
    return 0 if identical else 1
