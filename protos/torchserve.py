"""TorchServe's inference and management gRPC messages and stubs (generated on first import).

The stubs are compiled from the protos inside the installed TorchServe jar by
:mod:`protos.generate`; nothing of TorchServe's is kept in the repository.

Example:
    >>> from protos.torchserve import inference_pb2, inference_pb2_grpc
    >>> request = inference_pb2.PredictionsRequest(model_name="deepctr", input={"batch": b"..."})
"""

from protos.generate import generate, torchserve_jar

if torchserve_jar() is None:
    raise ImportError(
        "TorchServe is not installed, so its gRPC stubs cannot be generated: "
        "pip install 'torchserve==0.12.*' googleapis-common-protos"
    )
generate()

from protos._generated import inference_pb2, inference_pb2_grpc, management_pb2, management_pb2_grpc  # noqa: E402  # noqa: E402

__all__ = ["inference_pb2", "inference_pb2_grpc", "management_pb2", "management_pb2_grpc"]
