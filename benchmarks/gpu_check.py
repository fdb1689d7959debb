#!/usr/bin/env python
"""Check ctrserve's GPU path in one run: serving scores on the GPU equal the CPU's, one AMP
training step works, and the handler's per-stage timings on the GPU and the CPU.

Needs PyTorch with CUDA, numba, grpcio, pyarrow, prometheus-client and ctrserve installed; no
Java (TorchServe's frontend is not started) and nothing downloaded. Everything runs on one machine:

1. Serving: one real embedding server (``ServerGroup``, a CPU child process, train mode, rows
   initialised in [-0.5, 0.5)) holds the tables of a small model (13 dense inputs, features
   C1..C8 of dim 8, C8 a raw feature of 3 ids); a DeepCTR dense model made here is exported
   with ``trainer.export.export_dense``. Two ``PersiaHandler`` are initialised in this process
   as a TorchServe worker does (a ``Context`` with ``gpu_id``): one on ``cuda:<--gpu-id>``, one
   on the CPU (``gpu_id`` None). Both answer the same requests (``SyntheticCriteo`` batches of 64
   and 512 samples, batch bytes) through ``handle``; their scores must agree within 1e-5.
2. Training: one ``TrainCtx`` step with ``mixed_precision=True`` (in-process embedding store)
   on the GPU: the loss must be finite and the dense parameters must change.
3. Timings: per batch size and device, the medians over ``--repeats`` requests of the handler's
   stages: ``decode`` (preprocess minus the lookup: decoding, merging, tensors to the device),
   ``lookup`` (its ``EmbeddingLookupTime`` metric), ``dense`` (``inference``, which copies the
   scores back to the CPU, so the GPU's work is inside) and ``post`` (``postprocess``, JSON).

``--device cpu`` (or no CUDA: automatic, exit status 3) lets the CPU stand in for the GPU
(``CUDA_VISIBLE_DEVICES`` is emptied) so the script runs anywhere (tests/test_gpu_check.py). There
``TrainCtx`` ignores ``mixed_precision`` (its AMP is CUDA-only), so the step runs in float32 and the
JSON says ``"amp": false`` with the reason; the loss and parameter checks still run.

Prints readable lines, then one JSON object as the last line: ``gpu_checked``, ``device``,
``scores_max_abs_diff`` per batch size, ``train`` (loss, amp, reason), ``timings_ms``
(``<device>_b<batch>_<stage>``), ``ok``. Exit status: 0 all checked on the GPU (or on the CPU when
``--device cpu`` was asked for), 3 no CUDA (checked on the CPU only: the GPU path was NOT checked),
1 a check failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TOLERANCE = 1e-5
BATCH_SIZES = (64, 512)
STAGES = ("decode", "lookup", "dense", "post")
DENSE_WIDTH = 13
FEATURES = 8
EMB = {
    "slots_config": {
        **{f"C{i}": {"dim": 8} for i in range(1, FEATURES)},
        f"C{FEATURES}": {"dim": 8, "embedding_summation": False, "sample_fixed_size": 3},
    }
}
GLOBAL = {
    "common_config": {"job_type": "train"},
    "embedding_parameter_server_config": {"capacity": 200_000},
    "initialization": {"lower": -0.5, "upper": 0.5, "seed": 7},
}


class CheckFailed(Exception):
    """A check of the GPU path did not hold."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


class Recorded:
    """Stands in for TorchServe's metrics cache: keeps the values the handler records."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = {}

    def add_time(self, name: str, value: float, idx: Any = None, unit: str = "ms") -> None:
        self.values.setdefault(name, []).append(float(value))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    description, epilog = (__doc__ or "").split("\n\n", 1)
    parser = argparse.ArgumentParser(
        description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: the CPU stands in for the GPU")
    parser.add_argument("--gpu-id", type=int, default=0, help="the GPU TorchServe would assign (gpu_id)")
    parser.add_argument("--repeats", type=int, default=30, help="timed requests per batch size and device")
    parser.add_argument("--seed", type=int, default=1)
    return parser.parse_args(argv)


def make_model(seed: int) -> Any:
    import torch

    from trainer.models import DeepCTR

    torch.manual_seed(seed)
    return DeepCTR(DENSE_WIDTH, [8] * FEATURES, hidden=(64, 32))


def start_handler(model_dir: Path, gpu_id: int | None) -> Any:
    """A PersiaHandler initialised as a TorchServe worker does, on ``cuda:<gpu_id>`` or the CPU."""
    from ts.context import Context

    from handler.persia_handler import PersiaHandler

    handler = PersiaHandler()
    handler.initialize(Context("deepctr", str(model_dir), {}, 1, gpu_id, "0.12.0", model_yaml_config={}))
    return handler


def worker_context(metrics: Recorded) -> Any:
    """The ``Context`` a TorchServe worker hands ``handle`` for one request."""
    from ts.context import Context, RequestProcessor

    context = Context("deepctr", "", {}, 1, None, "0.12.0", metrics=metrics, model_yaml_config={})
    context.request_processor = [RequestProcessor({})]
    return context


def scores(handler: Any, body: bytes) -> Any:
    import numpy as np

    from handler.client import parse_response

    return np.asarray(parse_response(handler.handle([{"body": body}], worker_context(Recorded()))[0]).scores)


def stage_timings(handler: Any, body: bytes, repeats: int) -> dict[str, float]:
    """Median ms of each stage over ``repeats`` requests (after 3 untimed ones)."""
    metrics = Recorded()
    handler.context = worker_context(metrics)
    times: dict[str, list[float]] = {stage: [] for stage in STAGES}
    for k in range(repeats + 3):
        t0 = time.perf_counter()
        prepared = handler.preprocess([{"body": body}])
        t1 = time.perf_counter()
        scored = handler.inference(prepared)
        t2 = time.perf_counter()
        handler.postprocess(scored)
        t3 = time.perf_counter()
        if k >= 3:
            lookup = metrics.values["EmbeddingLookupTime"][-1]
            for stage, ms in zip(STAGES, ((t1 - t0) * 1e3 - lookup, lookup, (t2 - t1) * 1e3, (t3 - t2) * 1e3)):
                times[stage].append(ms)
    return {stage: round(statistics.median(values), 3) for stage, values in times.items()}


def amp_step(batch: Any, gpu_id: int | None, seed: int) -> dict[str, Any]:
    """One TrainCtx step with mixed_precision=True; the loss must be finite, the parameters change."""
    import torch

    from embedding_server.core.config import EmbeddingConfig, GlobalConfig
    from embedding_server.core.optimizers import Adagrad
    from trainer.ctx import TrainCtx

    model = make_model(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    with TrainCtx(
        model=model,
        dense_optimizer=optimizer,
        sparse_optimizer=Adagrad(lr=0.05),
        embedding_config=EmbeddingConfig.from_dict(EMB),
        global_config=GlobalConfig.from_dict(GLOBAL),
        device_id=gpu_id,
        mixed_precision=True,
    ) as ctx:
        before = [p.detach().clone() for p in ctx.model.parameters()]
        output, target = ctx.forward(batch)
        loss = torch.nn.functional.binary_cross_entropy(output, target)
        ctx.backward(loss)
        changed = sum(not torch.equal(a, b) for a, b in zip(before, ctx.model.parameters()))
        result: dict[str, Any] = {
            "device": str(ctx.device),
            "loss": round(float(loss.detach()), 6),
            "amp": ctx.mixed_precision,
        }
        if ctx.mixed_precision:
            result["loss_scale"] = ctx.scaler.get_scale()
        else:
            result["reason"] = f"TrainCtx uses AMP only on CUDA: the step ran in float32 on {ctx.device}"
    check(math.isfinite(result["loss"]), f"the AMP step's loss is not finite: {result['loss']}")
    check(changed == len(before), f"the AMP step changed {changed} of {len(before)} dense parameters")
    check(gpu_id is None or result["amp"], "TrainCtx did not use mixed precision on the GPU")
    return result


def run(args: argparse.Namespace, on_gpu: bool, summary: dict[str, Any]) -> None:
    import numpy as np
    import torch
    import yaml

    from embedding_server.core.config import EmbeddingConfig
    from embedding_server.rpc.launcher import ServerGroup
    from handler.serving_config import ENV_SERVERS
    from trainer.data import to_batch
    from trainer.export import export_dense
    from trainer.synthetic import SyntheticCriteo

    gpu_id = args.gpu_id if on_gpu else None
    data = SyntheticCriteo(seed=args.seed, num_dense=DENSE_WIDTH, num_sparse=FEATURES, multi_id_features=2)
    bodies = {bs: to_batch(data.chunk(bs, start=10_000 * i)).to_bytes() for i, bs in enumerate(BATCH_SIZES)}
    os.environ.pop(ENV_SERVERS, None)  # the handlers use this run's server, named in serving.yml
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp_name:
        tmp = Path(tmp_name)
        emb_path, glob_path = tmp / "embedding_config.yml", tmp / "global_config.yml"
        emb_path.write_text(yaml.safe_dump(EMB, sort_keys=False))
        glob_path.write_text(yaml.safe_dump(GLOBAL))
        version = export_dense(
            make_model(args.seed), EmbeddingConfig.from_dict(EMB), str(tmp / "root"), step=0, dense_width=DENSE_WIDTH
        )
        model_dir = tmp / "root" / "dense" / f"v{version:08d}"
        with ServerGroup.start(emb_path, glob_path, num_shards=1, workdir=tmp / "embedding") as group:
            serving = {"embedding_servers": group.addresses, "metrics_interval_s": 0, "max_batch_size": 1024}
            (model_dir / "serving.yml").write_text(yaml.safe_dump(serving))
            handlers = {"cpu": start_handler(model_dir, None), "gpu": start_handler(model_dir, gpu_id)}
            try:
                summary["handler_devices"] = {name: str(h.device) for name, h in handlers.items()}
                if on_gpu:
                    check(handlers["gpu"].device == torch.device("cuda", args.gpu_id), "the handler is not on the GPU")
                print(f"serving: embedding server {group.addresses[0]}; handlers on {summary['handler_devices']}")
                summary["scores_max_abs_diff"] = {}
                for bs, body in bodies.items():
                    on_cpu = scores(handlers["cpu"], body)  # the first lookup inserts the rows (train mode)
                    on_device = scores(handlers["gpu"], body)
                    check(on_cpu.shape == on_device.shape == (bs,), f"batch {bs}: {on_device.shape} scores")
                    diff = float(np.max(np.abs(on_cpu - on_device)))
                    summary["scores_max_abs_diff"][f"b{bs}"] = diff
                    print(f"  batch {bs:>3}: scores max |gpu - cpu| = {diff:.2e} (tolerance {TOLERANCE:.0e})")
                    check(diff <= TOLERANCE, f"batch {bs}: the GPU's scores differ from the CPU's by {diff:.2e}")
                timings: dict[str, float] = {}
                for bs, body in bodies.items():
                    for name, handler in handlers.items():
                        medians = stage_timings(handler, body, args.repeats)
                        timings.update({f"{name}_b{bs}_{stage}": ms for stage, ms in medians.items()})
                        stages = ", ".join(f"{stage} {ms:.3f}" for stage, ms in medians.items())
                        print(f"  timings ms, {name} ({handler.device}), batch {bs:>3}: {stages}")
                summary["timings_ms"] = timings
            finally:
                for handler in handlers.values():
                    handler._stop.set()
                    handler.embeddings.close()
    summary["train"] = train = amp_step(to_batch(data.chunk(256)), gpu_id, args.seed)
    print(f"training: one TrainCtx step, mixed_precision=True: {train}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch looks: the CPU stands in everywhere
    import torch

    on_gpu = args.device == "cuda" and torch.cuda.is_available()
    summary: dict[str, Any] = {"gpu_checked": on_gpu, "device": f"cuda:{args.gpu_id}" if on_gpu else "cpu"}
    if on_gpu:
        print(f"GPU path checked on cuda:{args.gpu_id} ({torch.cuda.get_device_name(args.gpu_id)}) against the CPU")
        status = 0
    else:
        why = "--device cpu" if args.device == "cpu" else "CUDA is not available"
        summary["not_checked_reason"] = why
        print(f"GPU path NOT checked ({why}): the CPU stands in for the GPU")
        status = 0 if args.device == "cpu" else 3
    try:
        run(args, on_gpu, summary)
    except CheckFailed as exc:
        print(f"CHECK FAILED: {exc}")
        summary.update(ok=False, error=str(exc))
        status = 1
    else:
        summary["ok"] = True
        where = summary["device"] if on_gpu else f"the CPU only: the GPU path was NOT checked ({why})"
        print(f"all checks passed on {where}")
    print(json.dumps(summary))
    return status


if __name__ == "__main__":
    sys.exit(main())
