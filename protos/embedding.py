"""The embedding service's generated messages and stubs (built on first import if needed)."""

from protos.generate import generate

generate()

from protos._generated import embedding_service_pb2 as pb  # noqa: E402
from protos._generated import embedding_service_pb2_grpc as pb_grpc  # noqa: E402

__all__ = ["pb", "pb_grpc"]
