"""Whole-model handler of ``benchmarks/bench_serving.py``: embedding tables inside the TorchScript model.

The ``.mar`` holds ``model.pt``, a TorchScript module ``forward(dense, ids: List[Tensor],
offsets: List[Tensor])`` that maps each feature's raw ids to rows of its own table (a sorted
vocabulary searched with ``torch.searchsorted``, unknown ids to a zero row), pools them with
``nn.EmbeddingBag`` (sum) and runs the dense model; and the dense version's ``model.json``.
Requests are the same batch bytes (or JSON) ctrserve's PersiaHandler takes, decoded with the
same :class:`handler.request.RequestDecoder`, so this contender differs from ctrserve only in
where the embeddings come from. The answer is ``{"scores": [...]}``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from ts.torch_handler.base_handler import BaseHandler
from ts.utils.util import PredictionException

from embedding_server.core.batch import KeyedIds
from embedding_server.core.model_spec import DenseModelSpec
from handler.request import DecodedRequest, RequestDecoder, RequestError, merge_requests


class WholeModelHandler(BaseHandler):
    def initialize(self, context) -> None:
        model_dir = Path(context.system_properties["model_dir"])
        spec = DenseModelSpec.from_json((model_dir / "model.json").read_text())
        self.decoder = RequestDecoder(spec, max_batch_size=4096, max_request_bytes=64 << 20)
        self.model = torch.jit.load(str(model_dir / "model.pt"), map_location="cpu").eval()
        self.context = context
        self.manifest = context.manifest
        self.initialized = True

    # BaseHandler.handle runs these, as it does PersiaHandler's: both pay TorchServe's same per-batch work.

    def preprocess(self, data: list[dict]) -> tuple[np.ndarray, KeyedIds, list[int]]:
        requests: list[DecodedRequest] = []
        for item in data:
            try:
                requests.append(self.decoder.decode(item))
            except RequestError as error:
                raise PredictionException(error.message, error.code) from None
        return merge_requests(requests, self.decoder.feature_names)

    def inference(self, data, *args, **kwargs):
        dense, features, sizes = data
        # Copies (the decoded arrays may be read-only views of the body); ids < 2**63 here (32-bit hashes).
        ids = [torch.from_numpy(f.ids.astype("int64")) for f in features]
        offsets = [torch.from_numpy(f.offsets.astype("int64")) for f in features]
        with torch.inference_mode():
            scores = self.model(torch.from_numpy(dense), ids, offsets).to(torch.float32).reshape(dense.shape[0], -1)
        return scores, sizes

    def postprocess(self, data):
        scores, sizes = data
        return [
            json.dumps({"scores": (c[:, 0] if c.shape[1] == 1 else c).tolist()}) for c in torch.split(scores, sizes)
        ]
