"""A gRPC client in the shape of PERSIA's ``examples/src/adult-income/serve_client.py``.

It sends ``{"batch": PersiaBatch.to_bytes()}`` through TorchServe's gRPC inference API and parses
PERSIA's answer, a flat list of scores (one per line between the brackets of TorchServe's
indented JSON), exactly as PERSIA's client does. It works against
``deploy/examples/persia/serve_handler.py`` and against ctrserve's own handler archived with
``response_format: persia`` in its ``serving.yml``. The gRPC stubs are the ones ctrserve
generates from the installed TorchServe (``protos.torchserve``), where PERSIA's script compiles
them into ``/cache/proto``.

The data file is PERSIA's adult-income ``.npz`` layout: ``continuous_data`` (float32
``[n, w]``), ``categorical_data`` (uint64 ``[n, k]``, one id per feature and sample),
``categorical_columns`` (the ``k`` feature names) and ``target`` (``[n]``)::

    python deploy/examples/persia/serve_client.py --data test.npz --address localhost:7070 \
        --model adult_income --output scores.txt
"""

import argparse
import sys

import grpc
import numpy as np

from persia.embedding.data import IDTypeFeature, NonIDTypeFeature, PersiaBatch
from protos.torchserve import inference_pb2, inference_pb2_grpc
from trainer.metrics import roc_auc


def get_inference_stub(address="localhost:7070"):
    channel = grpc.insecure_channel(address)
    stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
    return stub


def infer(stub, model_name, model_input):
    input_data = {"batch": model_input}
    response = stub.Predictions(inference_pb2.PredictionsRequest(model_name=model_name, input=input_data))
    prediction = response.prediction.decode("utf-8")
    prediction = prediction.splitlines()
    prediction = [x.strip() for x in prediction]
    prediction = [x.replace(",", "") for x in prediction]
    prediction = prediction[1:-1]
    try:
        return [float(x) for x in prediction]
    except ValueError:
        raise SystemExit(
            f"the server's answer is not PERSIA's flat list of scores: {response.prediction[:200]!r}"
        ) from None


def make_batches(data_filepath, batch_size):
    """``(PersiaBatch, labels)`` per ``batch_size`` samples of an adult-income style ``.npz``."""
    with np.load(data_filepath) as data:
        target = data["target"]
        continuous_data = data["continuous_data"]
        categorical_data = data["categorical_data"]
        categorical_columns = [str(c) for c in data["categorical_columns"]]
    for start in range(0, len(target), batch_size):
        end = min(start + batch_size, len(target))
        id_type_features = [
            IDTypeFeature(name, [categorical_data[row, idx : idx + 1].astype(np.uint64) for row in range(start, end)])
            for idx, name in enumerate(categorical_columns)
        ]
        batch = PersiaBatch(
            id_type_features,
            non_id_type_features=[NonIDTypeFeature(continuous_data[start:end].astype(np.float32))],
            requires_grad=False,
        )
        yield batch, target[start:end]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="adult-income style .npz file")
    parser.add_argument("--address", default="localhost:7070", help="TorchServe's gRPC inference address")
    parser.add_argument("--model", default="adult_income", help="the registered model name")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--output", help="write the scores here, one per line")
    args = parser.parse_args(argv)

    stub = get_inference_stub(args.address)
    all_pred, all_label = [], []
    for batch_data, label in make_batches(args.data, args.batch_size):
        prediction = infer(stub, args.model, batch_data.to_bytes())
        assert len(prediction) == len(label), (
            f"Missing results: prediction length({len(prediction)}) does not match label length({len(label)})"
        )
        all_label.append(label)
        all_pred.append(prediction)

    all_pred, all_label = np.concatenate(all_pred), np.concatenate(all_label)
    if args.output:
        np.savetxt(args.output, all_pred)
    print(f"predictions = {len(all_pred)}")
    if 0 < all_label.sum() < len(all_label):
        print(f"infer_auc = {roc_auc(all_label, all_pred)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
