"""Baseline handler of ``benchmarks/bench_serving.py``: the dense TorchScript model alone, with the
embeddings already in the request.

The ``.mar`` holds ``model.pt`` (the same TorchScript dense model ctrserve serves) and its
``model.json``. A request body is raw little-endian float32 bytes, one row per sample of
``dense_width + sum(feature dims)`` values: the dense features, then every feature's (already
looked-up, pooled) embedding in ``model.json`` order. Decoding is ``numpy.frombuffer`` with a
length check: nothing is unpickled or evaluated. The answer is ``{"scores": [...]}`` (what
:func:`handler.client.parse_response` reads).

Bad bodies (missing, empty, a length that is not whole rows, non-finite dense values) get HTTP
400 / gRPC INVALID_ARGUMENT through TorchServe's ``PredictionException``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from ts.torch_handler.base_handler import BaseHandler
from ts.utils.util import PredictionException

BODY_KEYS = ("batch", "body", "data")


class DenseHandler(BaseHandler):
    def initialize(self, context) -> None:
        model_dir = Path(context.system_properties["model_dir"])
        spec = json.loads((model_dir / "model.json").read_text())
        features = spec["features"]
        if not all(f.get("pooled", True) for f in features):
            raise ValueError("the dense baseline handler takes pooled features only")
        self.dense_width = int(spec["dense_width"])
        self.widths = [int(f["dim"]) for f in features]
        self.row_floats = self.dense_width + sum(self.widths)
        self.model = torch.jit.load(str(model_dir / "model.pt"), map_location="cpu").eval()
        self.context = context
        self.manifest = context.manifest
        self.initialized = True

    def _decode(self, item) -> np.ndarray:
        body = next((item[k] for k in BODY_KEYS if isinstance(item, dict) and item.get(k) is not None), None)
        if not isinstance(body, (bytes, bytearray)) or len(body) == 0:
            raise PredictionException("send raw float32 rows (dense + embeddings) as the request body", 400)
        row_bytes = self.row_floats * 4
        if len(body) % row_bytes:
            raise PredictionException(f"body of {len(body)} bytes is not whole rows of {row_bytes} bytes", 400)
        rows = np.frombuffer(body, dtype="<f4").reshape(-1, self.row_floats)
        if not np.isfinite(rows[:, : self.dense_width]).all():
            raise PredictionException("dense values must be finite", 400)
        return rows

    # BaseHandler.handle runs these, as it does PersiaHandler's: both pay TorchServe's same per-batch work.

    def preprocess(self, data):
        parts = [self._decode(item) for item in data]
        sizes = [p.shape[0] for p in parts]
        return torch.from_numpy(np.concatenate(parts) if len(parts) > 1 else parts[0].copy()), sizes

    def inference(self, data, *args, **kwargs):
        rows, sizes = data
        dense = rows[:, : self.dense_width]
        sparse, at = [], self.dense_width
        for width in self.widths:
            sparse.append(rows[:, at : at + width])
            at += width
        with torch.inference_mode():
            return self.model(dense, sparse).to(torch.float32).reshape(rows.shape[0], -1), sizes

    def postprocess(self, data):
        scores, sizes = data
        out = []
        for chunk in torch.split(scores, sizes):
            out.append(json.dumps({"scores": (chunk[:, 0] if chunk.shape[1] == 1 else chunk).tolist()}))
        return out
