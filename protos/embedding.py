"""The embedding service's generated messages and stubs (shipped in the wheel; regenerated on
import when stale in a source checkout, see :mod:`protos.generate`)."""

from protos.generate import ensure

ensure()

from protos._generated import embedding_service_pb2 as pb  # noqa: E402
from protos._generated import embedding_service_pb2_grpc as pb_grpc  # noqa: E402

__all__ = ["pb", "pb_grpc"]
