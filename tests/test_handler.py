"""The serving pieces of the ``handler`` package that need no running TorchServe: request
decoding and validation, the request limits of ``serving.yml`` (max_request_bytes,
max_json_request_bytes, max_batch_size, max_ids_per_request, max_ids_per_sample: each refused
with a message naming its key, the handler answering the next good request as before), the
serving config, batch merging, the timing metrics and the client's response parsing.

The handler's ``handle`` (TorchServe's ``BaseHandler.handle``, running the handler's
preprocess, inference and postprocess) is called here with TorchServe's own ``Context`` class and
metrics cache (not a running TorchServe) and an in-process embedding client, to check what a
running TorchServe cannot show directly: the per-request statuses of a mixed batch, the metrics
recorded, the 503 of an unavailable shard. Everything else about the handler is tested through a
real TorchServe in ``test_torchserve.py``; archive building and the publisher's version scan are
in ``test_archiver.py``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import ts
from ts.context import Context, RequestProcessor
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
from ts.utils.util import PredictionException

from embedding_server.core.batch import SparseFeature
from embedding_server.core.config import EmbeddingConfig, GlobalConfig
from embedding_server.core.errors import ConfigError, ShardUnavailableError
from embedding_server.core.model_spec import MODEL_FILE, SPEC_FILE, DenseModelSpec
from embedding_server.rpc.client import InProcessEmbeddingClient
from handler.client import PredictionError, parse_response
from handler.persia_handler import PersiaHandler
from handler.request import DECODE_ENV, Limits, RequestDecoder, RequestError, merge_requests
from handler.serving_config import ENV_PERSIA_SERVERS, ENV_SERVERS, ServingConfig
from handler.timing import TimingMetrics
from trainer.batch import PyPersiaBatchData

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parent.parent

TOL = 1e-6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_ctr):
    return tiny_ctr.export_version(tmp_path_factory.mktemp("root"), 4, seed=4)


@pytest.fixture(scope="module")
def spec(model_dir) -> DenseModelSpec:
    return DenseModelSpec.from_json((model_dir / SPEC_FILE).read_text())


@pytest.fixture()
def decoder(spec) -> RequestDecoder:
    return RequestDecoder(spec, max_batch_size=64, max_request_bytes=1 << 20)


# ------------------------------------------------------------------------------ decoding


def test_bytes_and_json_decode_to_the_same_request(decoder, tiny_ctr):
    batch = tiny_ctr.random_batch(np.random.default_rng(0), 6)
    from_bytes = decoder.decode({"body": batch.to_bytes()})
    for item in (
        {"body": tiny_ctr.as_json(batch)},
        {"data": json.dumps(tiny_ctr.as_json(batch))},
        {"batch": json.dumps(tiny_ctr.as_json(batch)).encode()},
    ):
        from_json = decoder.decode(item)
        np.testing.assert_array_equal(from_json.dense, from_bytes.dense)
        for a, b in zip(from_json.sparse, from_bytes.sparse):
            assert a.name == b.name
            np.testing.assert_array_equal(a.ids, b.ids)
            np.testing.assert_array_equal(a.offsets, b.offsets)
    assert [f.name for f in from_bytes.sparse] == ["C1", "C2", "C3", "H1"]
    assert from_bytes.dense.dtype == np.float32 and from_bytes.batch_size == 6


def test_features_are_put_in_model_order_and_dense_parts_concatenated(decoder, tiny_ctr):
    batch = PyPersiaBatchData()
    batch.add_dense([np.ones((2, 2), np.float64), np.zeros((2, tiny_ctr.DENSE_WIDTH - 2), np.int32)])
    batch.add_sparse([(name, [np.array([1], np.uint64), np.array([], np.uint64)]) for name in ("H1", "C3", "C1", "C2")])
    decoded = decoder.decode({"body": batch.to_bytes()})
    assert [f.name for f in decoded.sparse] == ["C1", "C2", "C3", "H1"]
    assert decoded.dense.tolist() == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0]]


def _corrupted(kit) -> bytes:
    data = bytearray(kit.random_batch(np.random.default_rng(9), 2).to_bytes())
    data[-10] ^= 0xFF
    return bytes(data)


def _json_request(kit, **changes) -> dict:
    body = {
        "dense": [[0.5] * kit.DENSE_WIDTH] * 2,
        "sparse": {"C1": [[1], []], "C2": [[2], [3]], "C3": [[], []], "H1": [[4, 5], [6]]},
    }
    body.update(changes)
    return body


# (the request item, made from the tiny_ctr kit; what the refusal must say)
BAD_REQUESTS = [
    (lambda kit: {"body": b""}, "empty request body"),
    (lambda kit: {}, "empty request body"),
    (lambda kit: None, "empty request body"),
    (lambda kit: {"body": _corrupted(kit)}, "undecodable batch bytes: batch checksum mismatch"),
    (lambda kit: {"body": b"CTRB\x01\x00\x00\x00garbage"}, "undecodable batch bytes: batch bytes too short"),
    (lambda kit: {"body": b"\x00\x01binary"}, "neither ctrserve batch bytes"),
    (lambda kit: {"body": b"{not json"}, "invalid JSON"),
    (
        lambda kit: {
            "body": _json_request(
                kit, sparse={"C1": [[1], []], "C2": [[2], [3]], "C3": [[], []], "H1": [[4], [6]], "X": [[1], [2]]}
            )
        },
        "unknown feature 'X'; the model takes: C1, C2, C3, H1",
    ),
    (
        lambda kit: {"body": _json_request(kit, sparse={"C1": [[1], []], "C2": [[2], [3]], "H1": [[4], [6]]})},
        "missing feature 'C3'",
    ),
    (
        lambda kit: {"body": _json_request(kit, dense=[[0.5] * (kit.DENSE_WIDTH + 1)] * 2)},
        "dense width 6 does not match the model's dense_width 5",
    ),
    (
        lambda kit: {"body": _json_request(kit, dense=[[0.5] * kit.DENSE_WIDTH, [0.5]])},
        "'dense' rows have different lengths",
    ),
    (
        lambda kit: {"body": _json_request(kit, dense=[["1"] * kit.DENSE_WIDTH] * 2)},
        "'dense' rows must hold only numbers",
    ),
    (
        lambda kit: {"body": _json_request(kit, dense=[[float("nan")] * kit.DENSE_WIDTH] * 2)},
        "dense values must be finite",
    ),
    (
        lambda kit: {"body": _json_request(kit, dense=[[0.5] * kit.DENSE_WIDTH] * 3)},
        "batch parts disagree on the batch size",
    ),
    (
        lambda kit: {
            "body": _json_request(kit, sparse={"C1": [[-1], []], "C2": [[2], [3]], "C3": [[], []], "H1": [[4], [6]]})
        },
        "ids must be in [0, 2**64)",
    ),
    (lambda kit: {"body": _json_request(kit, extra=1)}, "unknown keys ['extra'] in the JSON request"),
    (
        lambda kit: {"body": _json_request(kit, dense=[], sparse={"C1": [], "C2": [], "C3": [], "H1": []})},
        "empty batch: the request holds 0 samples",
    ),
]


@pytest.mark.parametrize(
    "make_item, message", BAD_REQUESTS, ids=[f"item{i}-{m}" for i, (_, m) in enumerate(BAD_REQUESTS)]
)
def test_bad_requests_are_refused_with_a_precise_message(decoder, make_item, message, tiny_ctr):
    with pytest.raises(RequestError) as err:
        decoder.decode(make_item(tiny_ctr))
    assert message in err.value.message
    assert err.value.code == 400


def test_limits_on_samples_and_bytes(spec, tiny_ctr):
    batch = tiny_ctr.random_batch(np.random.default_rng(2), 9)
    with pytest.raises(RequestError, match="batch of 9 samples exceeds the limit of 8 samples per request"):
        RequestDecoder(spec, max_batch_size=8, max_request_bytes=1 << 20).decode({"body": batch.to_bytes()})
    with pytest.raises(RequestError, match="exceeds the limit of 100 bytes"):
        RequestDecoder(spec, max_batch_size=64, max_request_bytes=100).decode({"body": batch.to_bytes()})


def test_merge_concatenates_requests_like_one_batch(decoder, tiny_ctr):
    rng = np.random.default_rng(3)
    parts = [tiny_ctr.random_batch(rng, n) for n in (3, 1, 4)]
    merged_dense, merged, sizes = merge_requests(
        [decoder.decode({"body": p.to_bytes()}) for p in parts], decoder.feature_names
    )
    assert sizes == [3, 1, 4]
    np.testing.assert_array_equal(merged_dense, np.concatenate([p.dense_matrix() for p in parts]))
    for i, feature in enumerate(merged):
        samples = [
            p.sparse[i].ids[p.sparse[i].offsets[j] : p.sparse[i].offsets[j + 1]]
            for p in parts
            for j in range(p.batch_size)
        ]
        expected = SparseFeature.from_lists(feature.name, samples)
        np.testing.assert_array_equal(feature.ids, expected.ids)
        np.testing.assert_array_equal(feature.offsets, expected.offsets)


# ------------------------------------------------------------------------------ request limits (serving.yml)
# Each limit is configurable and refused with a message naming its key and the request's value
# (HTTP 400 / PredictionException); the handler answers the next good request as before.


def _limited_handler(kit, model_dir, spec, **limits) -> PersiaHandler:
    handler = PersiaHandler()
    embeddings = InProcessEmbeddingClient(
        EmbeddingConfig.from_dict(kit.EMB), GlobalConfig.from_dict(kit.GLOBAL), num_shards=1
    )
    handler.configure(
        spec, torch.jit.load(str(model_dir / MODEL_FILE)), embeddings, ServingConfig(**limits), torch.device("cpu")
    )
    return handler


def _batch(samples: int, ids_per_sample: int = 1, features=("C1", "C2", "C3", "H1")) -> PyPersiaBatchData:
    batch = PyPersiaBatchData()
    batch.add_dense([np.zeros((samples, 5), np.float32)])
    batch.add_sparse([(f, [np.arange(ids_per_sample, dtype=np.uint64)] * samples) for f in features])
    return batch


def _refused(handler: PersiaHandler, body) -> str:
    with pytest.raises(PredictionException) as err:
        handler.handle([{"body": body}], worker_context(1))
    assert err.value.error_code == 400
    return err.value.message


def _served(handler: PersiaHandler, body, samples: int) -> None:
    answer = parse_response(handler.handle([{"body": body}], worker_context(1))[0])
    assert len(answer.scores) == samples


# (serving.yml limits, a request over them made from the tiny_ctr kit, what the message must
# say); each case is followed by a request within the limits, answered by the same handler.
CASES = {
    "max_request_bytes": (
        dict(max_request_bytes=2000),
        lambda kit: _batch(40).to_bytes(),
        ["exceeds the limit of 2000 bytes (max_request_bytes)", "request of "],
    ),
    "max_json_request_bytes": (
        dict(max_json_request_bytes=500),
        lambda kit: json.dumps(kit.as_json(_batch(20))).encode(),
        ["exceeds the limit of 500 bytes (max_json_request_bytes)"],
    ),
    "max_json_request_bytes_parsed": (  # a body TorchServe's worker parsed already: measured re-encoded
        dict(max_json_request_bytes=500),
        lambda kit: kit.as_json(_batch(20)),
        ["bytes (re-encoded) exceeds the limit of 500 bytes (max_json_request_bytes)"],
    ),
    "max_json_request_bytes_text": (
        dict(max_json_request_bytes=500),
        lambda kit: json.dumps(kit.as_json(_batch(20))),
        ["characters exceeds the limit of 500 bytes (max_json_request_bytes)"],
    ),
    "max_batch_size": (
        dict(max_batch_size=8),
        lambda kit: _batch(9).to_bytes(),
        ["batch of 9 samples exceeds the limit of 8 samples per request (max_batch_size)"],
    ),
    "max_ids_per_request": (
        dict(max_ids_per_request=30),
        lambda kit: _batch(4, 2).to_bytes(),
        ["request carries 32 ids; the limit is 30 ids per request (max_ids_per_request)"],
    ),
    "max_ids_per_sample": (
        dict(max_ids_per_sample=3),
        lambda kit: _batch(2, 4).to_bytes(),
        ["feature 'C1' has 4 ids in sample 0; the limit is 3 ids per sample (max_ids_per_sample)"],
    ),
    "max_ids_per_sample_json": (
        dict(max_ids_per_sample=3),
        lambda kit: kit.as_json(_batch(2, 4)),
        ["has 4 ids in sample 0", "(max_ids_per_sample)"],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_handler_limit_is_enforced_and_the_handler_keeps_serving(model_dir, spec, case, tiny_ctr):
    limits, make, messages = CASES[case]
    handler = _limited_handler(tiny_ctr, model_dir, spec, **limits)
    message = _refused(handler, make(tiny_ctr))
    for expected in messages:
        assert expected in message
    _served(handler, _batch(2).to_bytes(), 2)
    _served(handler, tiny_ctr.as_json(_batch(3)), 3)


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


@pytest.mark.parametrize("name", ["local", "production"])
def test_torchserve_body_size_settings_agree_with_serving_yml_defaults(name):
    # TorchServe refuses a body over max_request_size itself (REST 413, gRPC RESOURCE_EXHAUSTED) before
    # any worker holds it; equal to the handler's max_request_bytes, every body the handler would take
    # gets through and nothing larger is queued. Answers (scores of at most max_batch_size samples)
    # are far smaller than max_response_size.
    text = (REPO / "deploy" / "torchserve" / f"config.{name}.properties").read_text()
    settings = dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))
    defaults = ServingConfig()
    assert int(settings["max_request_size"]) == defaults.max_request_bytes
    assert int(settings["max_response_size"]) == defaults.max_request_bytes
    assert defaults.max_json_request_bytes <= defaults.max_request_bytes


def test_deeply_nested_json_is_a_clear_400(spec):
    decoder = RequestDecoder(spec, max_batch_size=64, max_request_bytes=1 << 20)
    with pytest.raises(RequestError, match="invalid JSON") as err:
        decoder.decode({"body": b'{"sparse": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"})
    assert err.value.code == 400


# ------------------------------------------------------------------------------ serving config


def test_serving_config_is_strict_and_the_environment_overrides_addresses(tmp_path):
    assert ServingConfig.from_dict(None) == ServingConfig()
    with pytest.raises(ConfigError, match=r"unknown keys \['max_batch'\]"):
        ServingConfig.from_dict({"max_batch": 3})
    with pytest.raises(ConfigError, match="'max_batch_size' must be a positive integer"):
        ServingConfig.from_dict({"max_batch_size": True})
    with pytest.raises(ConfigError, match="'embedding_servers' must be a list of 'host:port'"):
        ServingConfig.from_dict({"embedding_servers": ["localhost"]})
    with pytest.raises(ConfigError, match="positive number of seconds"):
        ServingConfig.from_dict({"embedding_timeout_s": 0})
    with pytest.raises(ConfigError, match="'torch_threads' must be an integer >= 0"):
        ServingConfig.from_dict({"torch_threads": -1})
    assert ServingConfig().torch_threads == 1
    with pytest.raises(ConfigError, match="'metrics_interval_s' must be a number of seconds >= 0"):
        ServingConfig.from_dict({"metrics_interval_s": -1})
    assert ServingConfig().metrics_interval_s == 1.0 and ServingConfig(metrics_interval_s=0).metrics_interval_s == 0
    path = tmp_path / "serving.yml"
    path.write_text("embedding_servers: ['127.0.0.1:7001']\nmax_batch_size: 16\n")
    config = ServingConfig.load(path)
    assert config.embedding_servers == ("127.0.0.1:7001",) and config.max_batch_size == 16
    overridden = config.with_environment({ENV_SERVERS: "10.0.0.1:1, 10.0.0.2:2"})
    assert overridden.embedding_servers == ("10.0.0.1:1", "10.0.0.2:2") and overridden.max_batch_size == 16
    with pytest.raises(ConfigError, match=ENV_SERVERS):
        config.with_environment({ENV_SERVERS: "nohost"})
    path.write_text("max_batch_size: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        ServingConfig.load(path)


def test_initialize_without_embedding_servers_says_how_to_configure_them(model_dir, monkeypatch):
    monkeypatch.delenv(ENV_SERVERS, raising=False)
    monkeypatch.delenv(ENV_PERSIA_SERVERS, raising=False)
    monkeypatch.setenv(DECODE_ENV, "true")  # restored after the test: TorchServe started later inherits nothing
    with pytest.raises(ConfigError, match="no embedding servers: set embedding_servers in serving.yml") as err:
        PersiaHandler().initialize(Context("deepctr", str(model_dir), {}, 1, None, "0.12.0"))
    assert f"{ENV_SERVERS} (or {ENV_PERSIA_SERVERS})" in str(err.value)
    assert os.environ[DECODE_ENV] == "false"  # the worker hands bodies over undecoded from now on


def metrics_cache() -> MetricsCacheYamlImpl:
    """TorchServe's own metrics cache (what a worker's context.metrics is), with its default config."""
    cache = MetricsCacheYamlImpl(str(Path(ts.__file__).parent / "configs" / "metrics.yaml"))
    cache.initialize_cache()
    return cache


def worker_context(requests: int) -> Context:
    """A ``Context`` as a TorchServe worker hands it to ``handle`` for a batch of ``requests``:
    its metrics cache, an (empty) model config, a request processor and an id per request."""
    metrics = metrics_cache()
    metrics.model_name = "deepctr"  # as the worker sets it when it loads the model
    context = Context("deepctr", "/nonexistent", {}, requests, None, "0.12.0", metrics=metrics, model_yaml_config={})
    context.request_processor = [RequestProcessor({}) for _ in range(requests)]
    context.request_ids = metrics.request_ids = {i: f"request-{i}" for i in range(requests)}  # as Service.predict
    return context


def _recorded(caplog: pytest.LogCaptureFixture) -> list[tuple[str, float]]:
    """(name, value) of every metric line TorchServe's cache wrote (what the frontend parses)."""
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[METRICS]")]
    return [(line[9:].split(".", 1)[0], float(line.split(":", 1)[1].split("|", 1)[0])) for line in lines]


def test_handler_module_defines_the_one_class_torchserve_loads():
    from ts.utils.util import list_classes_from_module

    import handler.persia_handler as module

    assert list_classes_from_module(module) == [PersiaHandler]  # a second class: the worker dies at load


def test_timing_metrics_are_recorded_as_means_once_per_interval(caplog):
    cache = metrics_cache()
    caplog.set_level(logging.INFO, logger="ts.metrics")
    now = [100.0]
    timings = TimingMetrics(interval_s=1.0, clock=lambda: now[0])
    timings.record("EmbeddingLookupTime", 2.0, cache)  # the first value is recorded at once
    now[0] = 100.5
    for ms in (1.0, 3.0):
        timings.record("EmbeddingLookupTime", ms, cache)
    timings.record("DenseInferenceTime", 4.0, cache)
    assert _recorded(caplog) == [("EmbeddingLookupTime", 2.0)]
    now[0] = 101.0  # the interval is over
    timings.record("EmbeddingLookupTime", 5.0, cache)
    assert _recorded(caplog)[1:] == [("EmbeddingLookupTime", 3.0), ("DenseInferenceTime", 4.0)]


def test_timing_metrics_with_interval_zero_record_every_value(caplog):
    cache = metrics_cache()
    caplog.set_level(logging.INFO, logger="ts.metrics")
    timings = TimingMetrics(interval_s=0.0)
    for ms in (1.0, 2.5):
        timings.record("EmbeddingLookupTime", ms, cache)
    assert _recorded(caplog) == [("EmbeddingLookupTime", 1.0), ("EmbeddingLookupTime", 2.5)]


# ------------------------------------------------------------------------------ handle() with TorchServe's Context


@pytest.fixture()
def handler(model_dir, spec, tiny_ctr) -> PersiaHandler:
    h = PersiaHandler()
    embeddings = InProcessEmbeddingClient(
        EmbeddingConfig.from_dict(tiny_ctr.EMB), GlobalConfig.from_dict(tiny_ctr.GLOBAL), num_shards=2
    )
    model = torch.jit.load(str(model_dir / MODEL_FILE))
    h.configure(spec, model, embeddings, ServingConfig(max_batch_size=64), torch.device("cpu"))
    return h


def test_handle_is_torchserves_template_method():
    from ts.torch_handler.base_handler import BaseHandler

    assert PersiaHandler.handle is BaseHandler.handle  # preprocess -> inference -> postprocess, HandlerTime


def test_mixed_batch_gives_each_request_its_scores_or_its_own_error(handler, model_dir, tiny_ctr):
    rng = np.random.default_rng(4)
    good = [tiny_ctr.random_batch(rng, 2), tiny_ctr.random_batch(rng, 5)]
    context = worker_context(3)
    results = handler.handle(
        [{"body": good[0].to_bytes()}, {"body": b"junk"}, {"body": tiny_ctr.as_json(good[1])}], context
    )
    assert len(results) == 3
    for index, batch in ((0, good[0]), (2, good[1])):
        answer = parse_response(results[index])
        np.testing.assert_allclose(
            answer.scores, tiny_ctr.expected_scores(model_dir, handler.embeddings, batch), atol=TOL
        )
        assert answer.model_version == 4 and answer.raw["batch_requests"] == 3
        assert context.get_response_status(index) == (200, None)
    code, phrase = context.get_response_status(1)
    assert code == 400 and "neither ctrserve batch bytes" in phrase
    with pytest.raises(PredictionError, match="neither ctrserve batch bytes"):
        parse_response(results[1])
    assert context.get_response_content_type(0) == "application/json"


def test_a_lone_bad_request_raises_prediction_exception_with_4xx(handler):
    with pytest.raises(PredictionException) as err:
        handler.handle([{"body": b""}], worker_context(1))
    assert err.value.error_code == 400 and "empty request body" in err.value.message


def test_a_batch_of_only_bad_requests_answers_each_with_its_error(handler):
    context = worker_context(2)
    results = handler.handle([{"body": b""}, {"body": b"junk"}], context)
    assert [json.loads(r)["code"] for r in results] == [400, 400]
    assert [context.get_response_status(i)[0] for i in range(2)] == [400, 400]


def test_an_unavailable_shard_raises_503(handler, monkeypatch, tiny_ctr):
    def down(features):
        raise ShardUnavailableError("shard 1: every replica down")

    monkeypatch.setattr(handler.embeddings, "lookup", down)
    batch = tiny_ctr.random_batch(np.random.default_rng(5), 2)
    with pytest.raises(PredictionException) as err:
        handler.handle([{"body": batch.to_bytes()}], worker_context(1))
    assert err.value.error_code == 503 and "every replica down" in err.value.message


def test_handle_records_the_stage_timings_and_handler_time(handler, spec, caplog, tiny_ctr):
    handler.configure(spec, handler.model, handler.embeddings, ServingConfig(metrics_interval_s=0), handler.device)
    caplog.set_level(logging.INFO, logger="ts.metrics")
    batch = tiny_ctr.random_batch(np.random.default_rng(6), 3)
    handler.handle([{"body": batch.to_bytes()}], worker_context(1))
    assert [name for name, _ in _recorded(caplog)] == ["EmbeddingLookupTime", "DenseInferenceTime", "HandlerTime"]


# ------------------------------------------------------------------------------ client, archive, publish, protos


def test_parse_response_refuses_what_is_not_the_handlers_json():
    with pytest.raises(PredictionError, match="other than JSON"):
        parse_response(b"oops")
    with pytest.raises(PredictionError, match="no 'scores'"):
        parse_response(b'{"x": 1}')
    ok = parse_response(b'{"scores": [0.25, 0.5], "model_version": 7, "embedding_watermark": {"0": 3}}')
    assert ok.scores.tolist() == [0.25, 0.5] and ok.model_version == 7 and ok.embedding_watermark == {"0": 3}


def test_embedding_watermark_is_what_the_shards_report_under_watermark(handler):
    class Shards:
        def stats(self):
            return [{"rows": 3, "watermark": 17}, {"rows": 1}]

    assert handler.read_embedding_watermark() == {}  # the in-process stores report none yet
    handler.embeddings = Shards()
    assert handler.read_embedding_watermark() == {"0": 17}


def test_responses_name_the_packets_the_embedding_shards_skipped(handler):
    """Replicas at one watermark serve the same values unless one skipped a packet (SkipPacket):
    every response says which, per embedding shard and training shard."""

    class Shards:
        def stats(self):
            return [{"watermark": {"0": 9, "1": 7}, "skipped": {"1": [4]}}, {"watermark": {"0": 9, "1": 7}}]

    handler.embeddings = Shards()
    handler._embedding_state = handler.read_embedding_state()
    tail = json.loads("{" + handler._result_tail(1)[2:])
    assert tail["embedding_watermark"] == {"0": {"0": 9, "1": 7}, "1": {"0": 9, "1": 7}}
    assert tail["embedding_skipped"] == {"0": {"1": [4]}} and tail["batch_requests"] == 1


def test_warm_up_runs_the_model_on_a_zero_sample_of_every_input_shape(handler, spec):
    calls = []

    def recording_model(dense, sparse):
        calls.append((tuple(dense.shape), [tuple(t.shape) for t in sparse]))
        return torch.zeros((dense.shape[0], 1))

    handler.model = recording_model
    handler.warm_up()
    expected = [(1, f.dim) if f.pooled else (1, f.sample_fixed_size, f.dim) for f in spec.features]
    assert calls == [((1, spec.dense_width), expected)] * 2


# ------------------------------------------------------------------ raw inputs and feature ops

OPS_EMB = {
    "slots_config": {
        "age_b": {"dim": 4, "table": "C1", "ops": [{"select": "age"}, {"bucketize": [18, 30, 45]}]},
        "C1": {"dim": 4},
        "tags": {"dim": 4, "ops": [{"select": "tags"}, {"mod": 10}, {"truncate": {"seq_len": 2, "side": "right"}}]},
        "C1_x_tags": {"dim": 4, "mean_scaling": True, "ops": [{"select": ["C1", "tags"]}, "cross", {"mod": 50}]},
    }
}


def _ops_emb(modulus: int) -> dict:
    emb = json.loads(json.dumps(OPS_EMB))
    emb["slots_config"]["tags"]["ops"][1] = {"mod": modulus}
    return emb


def _ops_handler(root: Path, version: int, modulus: int, tiny_ctr, embeddings) -> PersiaHandler:
    """A handler of an exported version whose ``tags`` slot takes ``id % modulus``."""
    model_dir = tiny_ctr.export_version(root, version, seed=version, emb_config=_ops_emb(modulus), dense_width=2)
    h = PersiaHandler()
    spec = DenseModelSpec.from_json((model_dir / SPEC_FILE).read_text())
    h.configure(spec, torch.jit.load(str(model_dir / MODEL_FILE)), embeddings, ServingConfig(), torch.device("cpu"))
    return h


RAW_ROWS = {
    "age": [17.0, 30.0, 52.5],
    "C1": [[3], [4, 4], []],
    "tags": [["sports", "news", "music"], [], ["news"]],
}


def _pre_transformed(modulus: int) -> dict:
    """The rows of RAW_ROWS with the ops applied by hand (farm fingerprints of the strings,
    pairs through FarmHash's Fingerprint(uint128)), as the JSON 'sparse' form (only the
    tags slot depends on ``modulus``)."""
    from embedding_server.core.farmhash import fingerprint64_bytes, fingerprint_pairs

    raw_tags = [[fingerprint64_bytes(t) for t in row] for row in RAW_ROWS["tags"]]
    tags = [[t % modulus for t in row][:2] for row in raw_tags]
    c1 = RAW_ROWS["C1"]
    crossed = []
    for xs, ys in zip(c1, raw_tags):  # the cross reads the raw inputs, not the other slots
        xs, ys = list(dict.fromkeys(xs)), list(dict.fromkeys(ys))
        pairs = [(x, y) for x in xs for y in ys]
        low = np.array([p[0] for p in pairs], np.uint64)
        high = np.array([p[1] for p in pairs], np.uint64)
        crossed.append([int(v) % 50 for v in fingerprint_pairs(low, high)])
    return {
        "dense": [[0.5, -1.0], [0.0, 2.0], [1.5, 0.25]],
        "sparse": {"age_b": [[0], [2], [3]], "C1": c1, "tags": tags, "C1_x_tags": crossed},
    }


def test_raw_inputs_in_json_and_bytes_score_like_the_pre_transformed_ids(tmp_path, tiny_ctr):
    from embedding_server.core.batch_codec import BatchData, encode_batch
    from handler.raw_inputs import add_raw_inputs

    config = EmbeddingConfig.from_dict(OPS_EMB)
    embeddings = InProcessEmbeddingClient(config, GlobalConfig.from_dict(tiny_ctr.GLOBAL), num_shards=2)
    h = _ops_handler(tmp_path, 1, 10, tiny_ctr, embeddings)
    expected = parse_response(h.handle([{"body": json.dumps(_pre_transformed(10)).encode()}], worker_context(1))[0])
    dense = _pre_transformed(10)["dense"]
    raw_json = {"dense": dense, "inputs": RAW_ROWS}
    raw_bytes = encode_batch(
        add_raw_inputs(BatchData(dense=[np.array(dense, np.float32)]), {**RAW_ROWS, "age": np.array(RAW_ROWS["age"])})
    )
    mixed = {
        "dense": dense,
        "sparse": {"C1": RAW_ROWS["C1"]},
        "inputs": {k: RAW_ROWS[k] for k in ("age", "tags", "C1")},
    }
    for body in (json.dumps(raw_json).encode(), raw_bytes):
        answer = parse_response(h.handle([{"body": body}], worker_context(1))[0])
        np.testing.assert_array_equal(answer.scores, expected.scores)
    # C1 given as ids and as a raw input: refused, naming it
    with pytest.raises(PredictionException, match="feature 'C1' given as ids and made from raw inputs"):
        h.handle([{"body": json.dumps(mixed).encode()}], worker_context(1))
    # the bucketized age shares C1's table: bucket 2 reads C1's row of id 2
    looked = embeddings.lookup(
        [SparseFeature.from_lists("age_b", [[2]]), SparseFeature.from_lists("C1", [[2]])]
    ).embeddings
    np.testing.assert_array_equal(looked["age_b"].numpy(), looked["C1"].numpy())


def test_each_served_version_applies_the_ops_it_was_trained_with(tmp_path, tiny_ctr):
    config = EmbeddingConfig.from_dict(OPS_EMB)
    embeddings = InProcessEmbeddingClient(config, GlobalConfig.from_dict(tiny_ctr.GLOBAL), num_shards=1)
    v1 = _ops_handler(tmp_path, 1, 10, tiny_ctr, embeddings)
    v2 = _ops_handler(tmp_path, 2, 7, tiny_ctr, embeddings)
    raw = json.dumps({"dense": _pre_transformed(10)["dense"], "inputs": RAW_ROWS}).encode()

    def scores(h: PersiaHandler, body: bytes) -> np.ndarray:
        return parse_response(h.handle([{"body": body}], worker_context(1))[0]).scores

    for h, modulus, other in ((v1, 10, 7), (v2, 7, 10)):
        own = json.dumps(_pre_transformed(modulus)).encode()
        np.testing.assert_array_equal(scores(h, raw), scores(h, own))
        assert not np.array_equal(scores(h, raw), scores(h, json.dumps(_pre_transformed(other)).encode()))


def test_bad_raw_inputs_are_400s_naming_the_input(tmp_path, tiny_ctr):
    config = EmbeddingConfig.from_dict(OPS_EMB)
    embeddings = InProcessEmbeddingClient(config, GlobalConfig.from_dict(tiny_ctr.GLOBAL))
    h = _ops_handler(tmp_path, 1, 10, tiny_ctr, embeddings)
    dense = [[0.0, 0.0]] * 3
    cases = {
        "unknown input 'agee'; the model reads the inputs": {"agee": [1, 2, 3]},
        "slot 'tags' selects input 'tags', which is missing": {"age": [1, 2, 3], "C1": [[1], [2], [3]]},
        "input 'age' must hold a number or a list of numbers per sample": {**RAW_ROWS, "age": [["a"], [], []]},
        "input 'age': values must be finite": {**RAW_ROWS, "age": [1.0, float("inf"), 2.0]},
        "input 'tags': ids must be integers in [0, 2**64) or strings, got -1": {**RAW_ROWS, "tags": [[-1], [], []]},
        "input 'C1' must be a list with one list of ids per sample": {**RAW_ROWS, "C1": [1, 2, 3]},
    }
    for message, inputs in cases.items():
        with pytest.raises(
            PredictionException,
            match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("*", r"\*"),
        ) as info:
            h.handle(
                [{"body": json.dumps({"dense": dense, "inputs": inputs}, allow_nan=True).encode()}], worker_context(1)
            )
        assert info.value.error_code == 400
    ok = parse_response(
        h.handle([{"body": json.dumps({"dense": dense, "inputs": RAW_ROWS}).encode()}], worker_context(1))[0]
    )
    assert len(ok.scores) == 3  # the handler keeps serving


# ------------------------------------------------------------------------------ PERSIA's forms


def test_raw_inputs_in_batch_bytes_stay_one_keyed_layout_and_make_the_transformed_features():
    from embedding_server.core.batch import KeyedIds
    from embedding_server.core.batch_codec import BatchData, decode_batch, encode_batch
    from embedding_server.core.errors import InvalidRequestError
    from embedding_server.core.feature_ops import RawInputs
    from handler.raw_inputs import RAW_INPUTS_KEY, add_raw_inputs, split_raw_inputs

    emb = {"slots_config": {**OPS_EMB["slots_config"], "C3": {"dim": 4}}}  # C3: a slot without ops
    spec = DenseModelSpec.for_config(EmbeddingConfig.from_dict(emb), version=1, step=0, dense_width=2)
    decoder = RequestDecoder(spec, max_batch_size=16, max_request_bytes=1 << 20)
    dense = [np.array(_pre_transformed(10)["dense"], np.float32)]
    c3 = [[7], [], [8, 9]]
    age = np.array(RAW_ROWS["age"])
    raw = {"age": age, "tags": RAW_ROWS["tags"], "C1": RAW_ROWS["C1"], "C3": c3}
    body = encode_batch(add_raw_inputs(BatchData(dense=list(dense)), raw))
    data = decode_batch(body)
    inputs = split_raw_inputs(data)
    assert isinstance(inputs, RawInputs) and isinstance(inputs.ids, KeyedIds)  # no object per input
    assert inputs.ids.names == ("tags", "C1", "C3") and list(inputs.dense) == ["age"]
    assert sorted(inputs) == ["C1", "C3", "age", "tags"] and "C1" in inputs and "C2" not in inputs
    assert RAW_INPUTS_KEY not in data.meta and list(data.sparse) == [] and len(data.dense) == 1
    np.testing.assert_array_equal(inputs["age"], age[:, None])  # a dense input travels as a [n, 1] part
    assert inputs["C1"].offsets.tolist() == [0, 1, 3, 3] and inputs["C1"].ids.tolist() == [3, 4, 4]

    transformed = _pre_transformed(10)
    want = decoder.decode({"body": json.dumps({**transformed, "sparse": {**transformed["sparse"], "C3": c3}})}).sparse
    given = [SparseFeature.from_lists("C3", c3)]  # C3 given as ids, the rest as raw inputs
    rest = {n: raw[n] for n in raw if n != "C3"}
    mixed = encode_batch(add_raw_inputs(BatchData(dense=list(dense), sparse=given), rest))
    for request in (body, mixed):
        got = decoder.decode({"body": request}).sparse
        assert got.names == want.names == tuple(emb["slots_config"])
        np.testing.assert_array_equal(got.ids, want.ids)
        np.testing.assert_array_equal(got.offsets, want.offsets)

    for names, message in (
        ('{"ids": ["tags", "zz"], "dense": ["age"]}', "names id inputs the batch lacks: ['zz']"),
        ('{"ids": ["tags", "tags"], "dense": []}', "names an input twice"),
        ('{"ids": ["tags", 3], "dense": []}', 'must be JSON {"ids": [names], "dense": [names]}'),
    ):
        bad = decode_batch(body)
        bad.meta[RAW_INPUTS_KEY] = names
        with pytest.raises(InvalidRequestError) as info:
            split_raw_inputs(bad)
        assert message in str(info.value)


def test_response_format_is_ctrserve_or_persia_and_persia_servers_env_is_the_fallback():
    assert ServingConfig().response_format == "ctrserve"
    assert ServingConfig.from_dict({"response_format": "persia"}).response_format == "persia"
    with pytest.raises(ConfigError, match="'response_format' must be one of ctrserve, persia, got 'PERSIA'"):
        ServingConfig.from_dict({"response_format": "PERSIA"})
    both = {ENV_SERVERS: "10.0.0.1:1", ENV_PERSIA_SERVERS: "10.0.0.9:9,10.0.0.8:8"}
    assert ServingConfig().with_environment(both).embedding_servers == ("10.0.0.1:1",)
    del both[ENV_SERVERS]
    assert ServingConfig().with_environment(both).embedding_servers == ("10.0.0.9:9", "10.0.0.8:8")
    with pytest.raises(ConfigError, match=ENV_PERSIA_SERVERS):
        ServingConfig().with_environment({ENV_PERSIA_SERVERS: "nohost"})


def test_persia_response_format_is_the_flat_list_persias_client_parses(handler, model_dir, tiny_ctr):
    import dataclasses

    batch = tiny_ctr.random_batch(np.random.default_rng(8), 3)
    expected = tiny_ctr.expected_scores(model_dir, handler.embeddings, batch)
    handler.serving = dataclasses.replace(handler.serving, response_format="persia")
    [text] = handler.handle([{"batch": batch.to_bytes()}], worker_context(1))
    lines = [line.strip().replace(",", "") for line in text.splitlines()][1:-1]  # PERSIA's client's parsing
    np.testing.assert_allclose([float(x) for x in lines], expected, rtol=0, atol=TOL)
    assert json.loads(text) == [float(x) for x in lines]
