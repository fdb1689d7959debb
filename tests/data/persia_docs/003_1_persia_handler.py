# 003 "Inference", 1. Prepare your handler for torchserve. Fixes: none (`batch_to_device_dirct` is kept: the client has that name and `batch_to_device_direct`). `os`, `ABC`, `torch`, `BaseHandler`, `PersiaEmbeddingClientPyClass` and `TrainCtx` come from the test's prelude (the handler file's imports).
class PersiaHandler(BaseHandler, ABC):
    def initialize(self, context):
        super().initialize(context)
        middleware_services = [os.environ["MIDDLEWARE_SERVICE"]]
        self.persia_backend = PersiaEmbeddingClientPyClass(0, middleware_services)
        self.persia_context = TrainCtx()

    def preprocess(self, data):

        batch = data[0].get('batch')
        batch = bytes(batch)
        # this function copy tensor to device, and lookup from embedding server, return PythonTrainBatch class
        batch = self.persia_backend.batch_to_device_dirct(batch, 0)

        # this function construct torch tensor which is similar with training phase
        model_input, _ = self.persia_context.prepare_features(batch, is_training=False)

        return model_input

    def inference(self, data, *args, **kwargs):
        denses, sparses = data
        with torch.no_grad():
            results = self.model(denses, sparses, *args, **kwargs)
        return results

    def postprocess(self, data):
        data = torch.reshape(data, (-1,))
        data = data.tolist()
        return [data]
