"""Request limits: each configurable, each refused with a message naming the limit's key and the
request's value, and the handler or server answering the next good request as before.

Handler (``serving.yml``): max_request_bytes, max_json_request_bytes, max_batch_size,
max_ids_per_request, max_ids_per_sample (HTTP 400 / ``PredictionException``).
Embedding server (``global_config.yml`` embedding_parameter_server_config): max_ids_per_request
(``INVALID_ARGUMENT``) and max_request_bytes (gRPC's receive cap: ``RESOURCE_EXHAUSTED``).
"""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest
import torch
from torchserve_support import EMB, GLOBAL, as_json, export_version
from ts.context import Context, RequestProcessor
from ts.utils.util import PredictionException

from embedding_server.core.config import EmbeddingConfig, GlobalConfig
from embedding_server.core.errors import ConfigError
from embedding_server.core.model_spec import MODEL_FILE, SPEC_FILE, DenseModelSpec
from embedding_server.rpc import wire
from embedding_server.rpc.client import InProcessEmbeddingClient
from embedding_server.rpc.security import make_channel
from embedding_server.rpc.service import CHANNEL_OPTIONS, SERVICE_NAME, start_server
from handler.client import parse_response
from handler.persia_handler import PersiaHandler
from handler.request import Limits, RequestDecoder, RequestError
from handler.serving_config import ServingConfig
from trainer.batch import PyPersiaBatchData


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return export_version(tmp_path_factory.mktemp("root"), 1, seed=1)


@pytest.fixture(scope="module")
def spec(model_dir) -> DenseModelSpec:
    return DenseModelSpec.from_json((model_dir / SPEC_FILE).read_text())


def _handler(model_dir, spec, **limits) -> PersiaHandler:
    handler = PersiaHandler()
    embeddings = InProcessEmbeddingClient(EmbeddingConfig.from_dict(EMB), GlobalConfig.from_dict(GLOBAL), num_shards=1)
    handler.configure(
        spec, torch.jit.load(str(model_dir / MODEL_FILE)), embeddings, ServingConfig(**limits), torch.device("cpu")
    )
    return handler


def _context() -> Context:
    context = Context("deepctr", "/nonexistent", {}, 1, None, "0.12.0")
    context.request_processor = [RequestProcessor({})]
    return context


def _batch(samples: int, ids_per_sample: int = 1, features=("C1", "C2", "C3", "H1")) -> PyPersiaBatchData:
    batch = PyPersiaBatchData()
    batch.add_dense([np.zeros((samples, 5), np.float32)])
    batch.add_sparse([(f, [np.arange(ids_per_sample, dtype=np.uint64)] * samples) for f in features])
    return batch


def _refused(handler: PersiaHandler, body) -> str:
    with pytest.raises(PredictionException) as err:
        handler.handle([{"body": body}], _context())
    assert err.value.error_code == 400
    return err.value.message


def _served(handler: PersiaHandler, body, samples: int) -> None:
    answer = parse_response(handler.handle([{"body": body}], _context())[0])
    assert len(answer.scores) == samples


# (serving.yml limits, a request over them, what the message must say); each case is followed
# by a request within the limits, answered by the same handler.
CASES = {
    "max_request_bytes": (
        dict(max_request_bytes=2000),
        lambda: _batch(40).to_bytes(),
        ["exceeds the limit of 2000 bytes (max_request_bytes)", "request of "],
    ),
    "max_json_request_bytes": (
        dict(max_json_request_bytes=500),
        lambda: json.dumps(as_json(_batch(20))).encode(),
        ["exceeds the limit of 500 bytes (max_json_request_bytes)"],
    ),
    "max_json_request_bytes_text": (
        dict(max_json_request_bytes=500),
        lambda: json.dumps(as_json(_batch(20))),
        ["characters exceeds the limit of 500 bytes (max_json_request_bytes)"],
    ),
    "max_batch_size": (
        dict(max_batch_size=8),
        lambda: _batch(9).to_bytes(),
        ["batch of 9 samples exceeds the limit of 8 samples per request (max_batch_size)"],
    ),
    "max_ids_per_request": (
        dict(max_ids_per_request=30),
        lambda: _batch(4, 2).to_bytes(),
        ["request carries 32 ids; the limit is 30 ids per request (max_ids_per_request)"],
    ),
    "max_ids_per_sample": (
        dict(max_ids_per_sample=3),
        lambda: _batch(2, 4).to_bytes(),
        ["feature 'C1' has 4 ids in sample 0; the limit is 3 ids per sample (max_ids_per_sample)"],
    ),
    "max_ids_per_sample_json": (
        dict(max_ids_per_sample=3),
        lambda: as_json(_batch(2, 4)),
        ["has 4 ids in sample 0", "(max_ids_per_sample)"],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_handler_limit_is_enforced_and_the_handler_keeps_serving(model_dir, spec, case):
    limits, make, messages = CASES[case]
    handler = _handler(model_dir, spec, **limits)
    message = _refused(handler, make())
    for expected in messages:
        assert expected in message
    _served(handler, _batch(2).to_bytes(), 2)
    _served(handler, as_json(_batch(3)), 3)


def test_limits_at_their_exact_value_are_accepted(spec):
    batch = _batch(4, 3)
    size = len(batch.to_bytes())
    decoder = RequestDecoder.from_serving(
        spec, ServingConfig(max_request_bytes=size, max_batch_size=4, max_ids_per_request=48, max_ids_per_sample=3)
    )
    assert decoder.decode({"body": batch.to_bytes()}).batch_size == 4
    assert decoder.limits == Limits(4, size, 48, 3)


def test_limits_come_from_serving_yml_and_are_validated(tmp_path):
    path = tmp_path / "serving.yml"
    path.write_text("max_ids_per_request: 100\nmax_ids_per_sample: 5\nmax_json_request_bytes: 1000\n")
    config = ServingConfig.load(path)
    assert Limits.from_config(config) == Limits(4096, 64 << 20, 100, 5, 1000)
    for key in (
        "max_ids_per_request",
        "max_ids_per_sample",
        "max_json_request_bytes",
        "max_batch_size",
        "max_request_bytes",
    ):
        for bad in (0, -1, 1.5, True, "10"):
            with pytest.raises(ConfigError, match=f"'{key}' must be a positive integer"):
                ServingConfig.from_dict({key: bad})


def test_deeply_nested_json_is_a_clear_400(spec):
    decoder = RequestDecoder(spec, max_batch_size=64, max_request_bytes=1 << 20)
    with pytest.raises(RequestError, match="invalid JSON") as err:
        decoder.decode({"body": b'{"sparse": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"})
    assert err.value.code == 400


# --------------------------------------------------------------------------- embedding server


EMB_SERVER = EmbeddingConfig.from_dict({"slots_config": {"user": {"dim": 4}}})


@pytest.fixture(scope="module")
def limited_server():
    glob = GlobalConfig.from_dict(
        {
            "common_config": {"job_type": "train"},
            "embedding_parameter_server_config": {
                "capacity": 10_000,
                "max_ids_per_request": 100,
                "max_request_bytes": 64 << 10,
            },
        }
    )
    server = start_server(EMB_SERVER, glob, port=0, workers=2)
    channel = make_channel(server.address, CHANNEL_OPTIONS)
    yield channel.unary_unary(f"/{SERVICE_NAME}/Lookup")
    channel.close()
    server.stop(0)


def _lookup(call, n: int):
    return call(wire.encode_lookup_request(np.arange(n, dtype=np.uint64), np.zeros(n, np.uint16)), timeout=10)


def test_server_max_ids_per_request_is_invalid_argument_and_the_server_keeps_serving(limited_server):
    with pytest.raises(grpc.RpcError) as err:
        _lookup(limited_server, 101)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request carries 101 ids; the limit is 100 (max_ids_per_request)" in err.value.details()
    dim, values = wire.decode_lookup_response(_lookup(limited_server, 100))
    assert dim == 4 and values.shape == (400,)


def test_server_max_request_bytes_is_resource_exhausted_and_the_server_keeps_serving(limited_server):
    # 10,000 ids are 100 KB: over the 64 KiB receive cap, refused by gRPC before it is read.
    with pytest.raises(grpc.RpcError) as err:
        _lookup(limited_server, 10_000)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "65536" in err.value.details() and "larger than max" in err.value.details()
    assert wire.decode_lookup_response(_lookup(limited_server, 10))[0] == 4


def test_server_limits_are_validated():
    for key in ("max_ids_per_request", "max_request_bytes"):
        with pytest.raises(ConfigError, match=key):
            GlobalConfig.from_dict({"embedding_parameter_server_config": {key: 0}})
