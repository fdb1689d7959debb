"""The serving pieces that need no running TorchServe: request decoding and validation, the
serving config, batch merging, the client's response parsing, archive building, the publisher's
version scan, and the generated TorchServe stubs.

The handler's ``handle`` is called here with TorchServe's own ``Context`` class (not a running
TorchServe) and an in-process embedding client, only to check what a running TorchServe cannot
show directly: the per-request statuses of a mixed batch. Everything else about the handler is
tested through a real TorchServe in ``test_torchserve.py``.
"""

from __future__ import annotations

import json
import logging
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import ts
from torchserve_support import DENSE_WIDTH, EMB, GLOBAL, as_json, expected_scores, export_version, random_batch
from ts.context import Context, RequestProcessor
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
from ts.utils.util import PredictionException

from archiver.build import archive_model
from archiver.publish import Publisher, PublishSettings
from embedding_server.core.batch import SparseFeature
from embedding_server.core.config import EmbeddingConfig, GlobalConfig
from embedding_server.core.errors import ConfigError
from embedding_server.core.model_spec import MODEL_FILE, SPEC_FILE, DenseModelSpec
from embedding_server.rpc.client import InProcessEmbeddingClient
from handler.client import PredictionError, parse_response
from handler.persia_handler import PersiaHandler
from handler.request import RequestDecoder, RequestError, merge_requests
from handler.serving_config import ENV_SERVERS, ServingConfig
from handler.timing import TimingMetrics
from trainer.batch import PyPersiaBatchData

TOL = 1e-6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return export_version(tmp_path_factory.mktemp("root"), 4, seed=4)


@pytest.fixture(scope="module")
def spec(model_dir) -> DenseModelSpec:
    return DenseModelSpec.from_json((model_dir / SPEC_FILE).read_text())


@pytest.fixture()
def decoder(spec) -> RequestDecoder:
    return RequestDecoder(spec, max_batch_size=64, max_request_bytes=1 << 20)


# ------------------------------------------------------------------------------ decoding


def test_bytes_and_json_decode_to_the_same_request(decoder):
    batch = random_batch(np.random.default_rng(0), 6)
    from_bytes = decoder.decode({"body": batch.to_bytes()})
    for item in (
        {"body": as_json(batch)},
        {"data": json.dumps(as_json(batch))},
        {"batch": json.dumps(as_json(batch)).encode()},
    ):
        from_json = decoder.decode(item)
        np.testing.assert_array_equal(from_json.dense, from_bytes.dense)
        for a, b in zip(from_json.sparse, from_bytes.sparse):
            assert a.name == b.name
            np.testing.assert_array_equal(a.ids, b.ids)
            np.testing.assert_array_equal(a.offsets, b.offsets)
    assert [f.name for f in from_bytes.sparse] == ["C1", "C2", "C3", "H1"]
    assert from_bytes.dense.dtype == np.float32 and from_bytes.batch_size == 6


def test_features_are_put_in_model_order_and_dense_parts_concatenated(decoder):
    batch = PyPersiaBatchData()
    batch.add_dense([np.ones((2, 2), np.float64), np.zeros((2, DENSE_WIDTH - 2), np.int32)])
    batch.add_sparse([(name, [np.array([1], np.uint64), np.array([], np.uint64)]) for name in ("H1", "C3", "C1", "C2")])
    decoded = decoder.decode({"body": batch.to_bytes()})
    assert [f.name for f in decoded.sparse] == ["C1", "C2", "C3", "H1"]
    assert decoded.dense.tolist() == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0]]


def _corrupted() -> bytes:
    data = bytearray(random_batch(np.random.default_rng(9), 2).to_bytes())
    data[-10] ^= 0xFF
    return bytes(data)


def _json_request(**changes) -> dict:
    body = {
        "dense": [[0.5] * DENSE_WIDTH] * 2,
        "sparse": {"C1": [[1], []], "C2": [[2], [3]], "C3": [[], []], "H1": [[4, 5], [6]]},
    }
    body.update(changes)
    return body


@pytest.mark.parametrize(
    "item, message",
    [
        ({"body": b""}, "empty request body"),
        ({}, "empty request body"),
        (None, "empty request body"),
        ({"body": _corrupted()}, "undecodable batch bytes: batch checksum mismatch"),
        ({"body": b"CTRB\x01\x00\x00\x00garbage"}, "undecodable batch bytes: batch bytes too short"),
        ({"body": b"\x00\x01binary"}, "neither ctrserve batch bytes"),
        ({"body": b"{not json"}, "invalid JSON"),
        (
            {
                "body": _json_request(
                    sparse={"C1": [[1], []], "C2": [[2], [3]], "C3": [[], []], "H1": [[4], [6]], "X": [[1], [2]]}
                )
            },
            "unknown feature 'X'; the model takes: C1, C2, C3, H1",
        ),
        ({"body": _json_request(sparse={"C1": [[1], []], "C2": [[2], [3]], "H1": [[4], [6]]})}, "missing feature 'C3'"),
        (
            {"body": _json_request(dense=[[0.5] * (DENSE_WIDTH + 1)] * 2)},
            "dense width 6 does not match the model's dense_width 5",
        ),
        ({"body": _json_request(dense=[[0.5] * DENSE_WIDTH, [0.5]])}, "'dense' rows have different lengths"),
        ({"body": _json_request(dense=[["1"] * DENSE_WIDTH] * 2)}, "'dense' rows must hold only numbers"),
        ({"body": _json_request(dense=[[float("nan")] * DENSE_WIDTH] * 2)}, "dense values must be finite"),
        ({"body": _json_request(dense=[[0.5] * DENSE_WIDTH] * 3)}, "batch parts disagree on the batch size"),
        (
            {"body": _json_request(sparse={"C1": [[-1], []], "C2": [[2], [3]], "C3": [[], []], "H1": [[4], [6]]})},
            "ids must be in [0, 2**64)",
        ),
        ({"body": _json_request(extra=1)}, "unknown keys ['extra'] in the JSON request"),
        (
            {"body": _json_request(dense=[], sparse={"C1": [], "C2": [], "C3": [], "H1": []})},
            "empty batch: the request holds 0 samples",
        ),
    ],
)
def test_bad_requests_are_refused_with_a_precise_message(decoder, item, message):
    with pytest.raises(RequestError) as err:
        decoder.decode(item)
    assert message in err.value.message
    assert err.value.code == 400


def test_limits_on_samples_and_bytes(spec):
    batch = random_batch(np.random.default_rng(2), 9)
    with pytest.raises(RequestError, match="batch of 9 samples exceeds the limit of 8 samples per request"):
        RequestDecoder(spec, max_batch_size=8, max_request_bytes=1 << 20).decode({"body": batch.to_bytes()})
    with pytest.raises(RequestError, match="exceeds the limit of 100 bytes"):
        RequestDecoder(spec, max_batch_size=64, max_request_bytes=100).decode({"body": batch.to_bytes()})


def test_merge_concatenates_requests_like_one_batch(decoder):
    rng = np.random.default_rng(3)
    parts = [random_batch(rng, n) for n in (3, 1, 4)]
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
    with pytest.raises(ConfigError, match="no embedding servers: set embedding_servers in serving.yml"):
        PersiaHandler().initialize(Context("deepctr", str(model_dir), {}, 1, None, "0.12.0"))


def _metrics_cache() -> MetricsCacheYamlImpl:
    """TorchServe's own metrics cache (what a worker's context.metrics is), with its default config."""
    cache = MetricsCacheYamlImpl(str(Path(ts.__file__).parent / "configs" / "metrics.yaml"))
    cache.initialize_cache()
    return cache


def _recorded(caplog: pytest.LogCaptureFixture) -> list[tuple[str, float]]:
    """(name, value) of every metric line TorchServe's cache wrote (what the frontend parses)."""
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[METRICS]")]
    return [(line[9:].split(".", 1)[0], float(line.split(":", 1)[1].split("|", 1)[0])) for line in lines]


def test_handler_module_defines_the_one_class_torchserve_loads():
    from ts.utils.util import list_classes_from_module

    import handler.persia_handler as module

    assert list_classes_from_module(module) == [PersiaHandler]  # a second class: the worker dies at load


def test_timing_metrics_are_recorded_as_means_once_per_interval(caplog):
    cache = _metrics_cache()
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
    cache = _metrics_cache()
    caplog.set_level(logging.INFO, logger="ts.metrics")
    timings = TimingMetrics(interval_s=0.0)
    for ms in (1.0, 2.5):
        timings.record("EmbeddingLookupTime", ms, cache)
    assert _recorded(caplog) == [("EmbeddingLookupTime", 1.0), ("EmbeddingLookupTime", 2.5)]


# ------------------------------------------------------------------------------ handle() with TorchServe's Context


@pytest.fixture()
def handler(model_dir, spec) -> PersiaHandler:
    h = PersiaHandler()
    embeddings = InProcessEmbeddingClient(EmbeddingConfig.from_dict(EMB), GlobalConfig.from_dict(GLOBAL), num_shards=2)
    model = torch.jit.load(str(model_dir / MODEL_FILE))
    h.configure(spec, model, embeddings, ServingConfig(max_batch_size=64), torch.device("cpu"))
    return h


def _context(requests: int) -> Context:
    context = Context("deepctr", "/nonexistent", {}, requests, None, "0.12.0")
    context.request_processor = [RequestProcessor({}) for _ in range(requests)]
    return context


def test_mixed_batch_gives_each_request_its_scores_or_its_own_error(handler, model_dir):
    rng = np.random.default_rng(4)
    good = [random_batch(rng, 2), random_batch(rng, 5)]
    context = _context(3)
    results = handler.handle([{"body": good[0].to_bytes()}, {"body": b"junk"}, {"body": as_json(good[1])}], context)
    assert len(results) == 3
    for index, batch in ((0, good[0]), (2, good[1])):
        answer = parse_response(results[index])
        np.testing.assert_allclose(answer.scores, expected_scores(model_dir, handler.embeddings, batch), atol=TOL)
        assert answer.model_version == 4 and answer.raw["batch_requests"] == 3
        assert context.get_response_status(index) == (200, None)
    code, phrase = context.get_response_status(1)
    assert code == 400 and "neither ctrserve batch bytes" in phrase
    with pytest.raises(PredictionError, match="neither ctrserve batch bytes"):
        parse_response(results[1])
    assert context.get_response_content_type(0) == "application/json"


def test_a_lone_bad_request_raises_prediction_exception_with_4xx(handler):
    with pytest.raises(PredictionException) as err:
        handler.handle([{"body": b""}], _context(1))
    assert err.value.error_code == 400 and "empty request body" in err.value.message


# ------------------------------------------------------------------------------ client, archive, publish, protos


def test_parse_response_refuses_what_is_not_the_handlers_json():
    with pytest.raises(PredictionError, match="other than JSON"):
        parse_response(b"oops")
    with pytest.raises(PredictionError, match="no 'scores'"):
        parse_response(b'{"x": 1}')
    ok = parse_response(b'{"scores": [0.25, 0.5], "model_version": 7, "embedding_watermark": {"0": 3}}')
    assert ok.scores.tolist() == [0.25, 0.5] and ok.model_version == 7 and ok.embedding_watermark == {"0": 3}


def test_archive_holds_model_spec_serving_config_and_handler(model_dir, tmp_path):
    serving = tmp_path / "my-serving.yml"
    serving.write_text("embedding_servers: ['127.0.0.1:7001']\n")
    mar = archive_model(model_dir, tmp_path / "store", serving_config=serving)
    assert mar == tmp_path / "store" / "deepctr.mar"
    with zipfile.ZipFile(mar) as archive:
        names = set(archive.namelist())
        manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
    assert {"model.pt", "model.json", "serving.yml", "persia_handler.py"} <= names
    assert manifest["model"]["modelName"] == "deepctr" and manifest["model"]["modelVersion"] == "4"
    assert manifest["model"]["handler"] == "persia_handler.py"
    serving.write_text("embedding_server: ['127.0.0.1:7001']\n")
    with pytest.raises(ConfigError, match="unknown keys"):
        archive_model(model_dir, tmp_path / "store", serving_config=serving)
    with pytest.raises(ConfigError, match="has no model.pt"):
        archive_model(tmp_path, tmp_path / "store")


def test_publisher_sees_only_complete_versions(tmp_path):
    for version in (1, 3):
        export_version(tmp_path, version, seed=version)
    (tmp_path / "dense" / "v00000005").mkdir()  # being written: no model.json yet
    (tmp_path / "dense" / "notes").mkdir()
    publisher = Publisher(management=None, settings=PublishSettings(str(tmp_path), str(tmp_path / "store")))
    assert publisher.complete_versions() == [1, 3]
    assert publisher.mar_stem(3) == "deepctr-v00000003"
    with pytest.raises(ConfigError, match="--keep must be >= 1"):
        PublishSettings(str(tmp_path), str(tmp_path / "store"), keep=0)


def test_torchserve_stubs_are_generated_not_committed():
    from protos.torchserve import inference_pb2, management_pb2

    assert "Predictions" in inference_pb2.DESCRIPTOR.services_by_name["InferenceAPIsService"].methods_by_name
    assert "SetDefault" in management_pb2.DESCRIPTOR.services_by_name["ManagementAPIsService"].methods_by_name
    tracked = subprocess.run(["git", "ls-files", "protos"], capture_output=True, text=True, check=True).stdout.split()
    assert not any(name.endswith(("inference.proto", "management.proto")) or "_generated" in name for name in tracked)


def test_embedding_watermark_is_what_the_shards_report_under_watermark(handler):
    class Shards:
        def stats(self):
            return [{"rows": 3, "watermark": 17}, {"rows": 1}]

    assert handler.read_embedding_watermark() == {}  # the in-process stores report none yet
    handler.embeddings = Shards()
    assert handler.read_embedding_watermark() == {"0": 17}


def test_warm_up_runs_the_model_on_a_zero_sample_of_every_input_shape(handler, spec):
    calls = []

    def recording_model(dense, sparse):
        calls.append((tuple(dense.shape), [tuple(t.shape) for t in sparse]))
        return torch.zeros((dense.shape[0], 1))

    handler.model = recording_model
    handler.warm_up()
    expected = [(1, f.dim) if f.pooled else (1, f.sample_fixed_size, f.dim) for f in spec.features]
    assert calls == [((1, spec.dense_width), expected)] * 2
