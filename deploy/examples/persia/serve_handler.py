"""A TorchServe handler in the shape of PERSIA's ``examples/src/adult-income/serve_handler.py``.

Archive a TorchScript dense model with it, as PERSIA's inference guide does::

    torch-model-archiver --model-name adult_income --version 1.0 \
        --serialized-file $PERSIA_CKPT_DIR/jit_dense.pt --handler deploy/examples/persia/serve_handler.py \
        --export-path $PERSIA_CKPT_DIR -f
    EMBEDDING_WORKER_SERVICE=127.0.0.1:8887 torchserve --start --ncs \
        --model-store $PERSIA_CKPT_DIR --models adult_income.mar

``EMBEDDING_WORKER_SERVICE`` names the service registry of ``persia-launcher embedding-worker``
(``persia.service.get_embedding_worker_services()``); ``InferCtx`` resolves it to the embedding
servers (or takes the embedding servers' own addresses). The model file must end in ``.pt``:
TorchServe's ``BaseHandler.initialize`` loads TorchScript only from such a name (ctrserve's own
handler, ``handler/persia_handler.py``, takes any name). The answer is PERSIA's: per request the
flat list of scores, written by TorchServe as indented JSON, which ``serve_client.py`` parses.
"""

from abc import ABC

import torch
from ts.torch_handler.base_handler import BaseHandler

from persia.ctx import InferCtx
from persia.service import get_embedding_worker_services

device_id = 0 if torch.cuda.is_available() else None


class PersiaHandler(BaseHandler, ABC):
    def initialize(self, context):
        super().initialize(context)
        embedding_worker_addrs = get_embedding_worker_services()
        self.persia_context = InferCtx(embedding_worker_addrs, device_id=device_id)
        self.persia_context.wait_for_serving()

    def preprocess(self, data):
        batch = data[0].get("batch")
        batch = bytes(batch)
        batch = self.persia_context.get_embedding_from_bytes(batch, device_id)

        model_input = self.persia_context.prepare_features(batch)
        return model_input

    def inference(self, data, *args, **kwargs):
        non_id_type_tensors, id_type_tensors, _ = data
        with torch.no_grad():
            results = self.model(non_id_type_tensors, id_type_tensors)
        return results

    def postprocess(self, data):
        data = torch.reshape(data, (-1,))
        data = data.tolist()
        return [data]
