"""TorchServe's inference and management gRPC messages and stubs.

The stubs are compiled from the protos inside the installed TorchServe jar by
:mod:`protos.generate` (when the wheel is built; on import when stale in a source checkout);
nothing of TorchServe's is kept in the repository.

Example:
    >>> from protos.torchserve import inference_pb2, inference_pb2_grpc
    >>> request = inference_pb2.PredictionsRequest(model_name="deepctr", input={"batch": b"..."})
"""

import importlib.util

from protos.generate import ensure, source_checkout, torchserve_jar

if source_checkout() and torchserve_jar() is None:
    raise ImportError(
        "TorchServe is not installed, so its gRPC stubs cannot be generated: "
        "pip install 'torchserve==0.12.*' googleapis-common-protos"
    )
ensure()
if importlib.util.find_spec("protos._generated.inference_pb2") is None:
    raise ImportError(
        "this ctrserve wheel was built without TorchServe installed, so it has no TorchServe gRPC stubs: "
        "rebuild it with torchserve and googleapis-common-protos in the build environment"
    )

from protos._generated import inference_pb2, inference_pb2_grpc, management_pb2, management_pb2_grpc  # noqa: E402

__all__ = ["inference_pb2", "inference_pb2_grpc", "management_pb2", "management_pb2_grpc"]
