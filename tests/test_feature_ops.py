"""Feature ops (embedding_server/core/feature_ops.py): each op against a plain-Python reference,
chaining, validation, the config's ``ops`` key and shared tables, and vectorised speed."""

from __future__ import annotations

import bisect
import time

import numpy as np
import pytest

from embedding_server.core.batch import SparseFeature
from embedding_server.core.config import EmbeddingConfig, GlobalConfig
from embedding_server.core.errors import ConfigError
from embedding_server.core.feature_ops import (
    FeatureInputError,
    FeaturePipeline,
    parse_ops,
)
from embedding_server.core.model_spec import DenseModelSpec
from embedding_server.rpc.client import InProcessEmbeddingClient

pytestmark = pytest.mark.unit

MASK = (1 << 64) - 1
KMUL = 0x9DDFEA08EB382D69


# ----------------------------------------------------------------- plain-Python references


def ref_fingerprint(x: int) -> int:
    """FarmHash Fingerprint(uint64), written from farmhash.h with Python integers."""
    b = (x * KMUL) & MASK
    b ^= b >> 44
    b = (b * KMUL) & MASK
    b ^= b >> 41
    return (b * KMUL) & MASK


def ref_fingerprint128(low: int, high: int) -> int:
    """FarmHash Fingerprint(uint128) of (low, high), written from farmhash.h."""
    a = ((low ^ high) * KMUL) & MASK
    a ^= a >> 47
    b = ((high ^ a) * KMUL) & MASK
    b ^= b >> 44
    b = (b * KMUL) & MASK
    b ^= b >> 41
    return (b * KMUL) & MASK


def ref_distinct(row: list[int]) -> list[int]:
    seen: list[int] = []
    for v in row:
        if v not in seen:
            seen.append(v)
    return seen


def ref_run(ops: list, rows_in: list) -> list[list[int]]:
    """The chain on Python lists, one row at a time."""
    (first, *rest) = ops
    names = [first["select"]] if isinstance(first["select"], str) else first["select"]
    rows = rows_in
    for op in rest:
        name, param = (op, None) if isinstance(op, str) else next(iter(op.items()))
        if name == "bucketize":
            rows = [[bisect.bisect_right(param, v) for v in (r if isinstance(r, list) else [r])] for r in rows]
        elif name == "cross":
            rows = [[ref_fingerprint128(x, y) for x in ref_distinct(rx) for y in ref_distinct(ry)] for rx, ry in rows]
        elif name == "mod":
            rows = [[v % param for v in r] for r in rows]
        elif name == "hash":
            rows = [[ref_fingerprint(v) for v in r] for r in rows]
        elif name == "truncate":
            n, side = param["seq_len"], param.get("side", "left")
            rows = [r[:n] if side == "right" else r[max(0, len(r) - n) :] for r in rows]
    assert names
    return rows


def random_rows(rng: np.random.Generator, n: int, max_len: int, high: int = 1 << 64) -> list[list[int]]:
    rows = []
    for _ in range(n):
        k = int(rng.integers(0, max_len + 1))
        # small values repeat (exercising the cross's distinct ids), large ones cover 64 bits
        rows.append([int(v) for v in rng.integers(0, high, k, dtype=np.uint64, endpoint=False)])
    return rows


def as_feature(name: str, rows: list[list[int]]) -> SparseFeature:
    return SparseFeature.from_lists(name, [np.array(r, np.uint64) for r in rows])


def rows_of(f: SparseFeature) -> list[list[int]]:
    return [f.ids[f.offsets[i] : f.offsets[i + 1]].tolist() for i in range(f.batch_size)]


def run(ops: list, inputs: dict) -> SparseFeature:
    (out,) = FeaturePipeline({"out": parse_ops(ops, "out")}).apply(inputs)
    assert out.name == "out"
    return out


# ----------------------------------------------------------------- each op against the reference


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bucketize_counts_the_boundaries_at_or_below_each_value(seed):
    rng = np.random.default_rng(seed)
    boundaries = sorted(set(np.round(rng.normal(size=6), 2).tolist()))
    values = rng.normal(size=(200, 3))
    values[: len(boundaries), 0] = boundaries  # a value equal to a boundary goes to the bucket above it
    got = run([{"select": "d"}, {"bucketize": boundaries}], {"d": values})
    assert rows_of(got) == ref_run([{"select": "d"}, {"bucketize": boundaries}], values.tolist())
    assert [rows_of(got)[i][0] for i in range(len(boundaries))] == list(range(1, len(boundaries) + 1))
    one_column = run([{"select": "d"}, {"bucketize": boundaries}], {"d": values[:, 0]})
    assert rows_of(one_column) == [[r[0]] for r in rows_of(got)]


@pytest.mark.parametrize("n", [1, 7, 10_000, (1 << 64) - 59])
def test_mod_is_unsigned_64_bit_modulo(n):
    rows = random_rows(np.random.default_rng(n % 1000), 100, 5)
    ops = [{"select": "s"}, {"mod": n}]
    assert rows_of(run(ops, {"s": as_feature("s", rows)})) == ref_run(ops, rows)


def test_hash_is_farmhash_fingerprint_of_each_id():
    rows = random_rows(np.random.default_rng(3), 100, 6)
    rows[0] = [0, 1, MASK]
    ops = [{"select": "s"}, "hash"]
    assert rows_of(run(ops, {"s": as_feature("s", rows)})) == ref_run(ops, rows)
    assert rows_of(run([{"select": "s"}, {"hash": "farm"}], {"s": as_feature("s", rows)})) == ref_run(ops, rows)


@pytest.mark.parametrize("side", ["left", "right"])
def test_truncate_cuts_off_the_given_side(side):
    rows = random_rows(np.random.default_rng(4), 300, 12)
    ops = [{"select": "s"}, {"truncate": {"seq_len": 5, "side": side}}]
    got = rows_of(run(ops, {"s": as_feature("s", rows)}))
    assert got == ref_run(ops, rows)
    long = next(r for r in rows if len(r) > 5)
    assert (long[:5] if side == "right" else long[-5:]) in got


def test_cross_pairs_every_distinct_id_of_two_inputs_per_row():
    rng = np.random.default_rng(5)
    xs = random_rows(rng, 200, 5, high=6)  # few values: repeats within a row
    ys = random_rows(rng, 200, 4, high=1 << 64)
    ops = [{"select": ["x", "y"]}, "cross"]
    got = run(ops, {"x": as_feature("x", xs), "y": as_feature("y", ys)})
    assert rows_of(got) == ref_run(ops, list(zip(xs, ys)))
    assert any(len(set(r)) < len(r) for r in xs)  # the distinct ids mattered


def test_chained_ops_apply_in_order():
    rng = np.random.default_rng(6)
    rows = random_rows(rng, 300, 30)
    ops = [{"select": "s"}, "hash", {"mod": 10_000}, {"truncate": {"seq_len": 8, "side": "right"}}, {"mod": 97}]
    assert rows_of(run(ops, {"s": as_feature("s", rows)})) == ref_run(ops, rows)
    xs, ys = random_rows(rng, 300, 4, high=20), random_rows(rng, 300, 4, high=20)
    cross_ops = [{"select": ["x", "y"]}, "cross", {"mod": 1000}, {"truncate": {"seq_len": 3}}]
    got = run(cross_ops, {"x": as_feature("x", xs), "y": as_feature("y", ys)})
    assert rows_of(got) == ref_run(cross_ops, list(zip(xs, ys)))
    # mod before hash is not hash before mod
    swapped = [{"select": "s"}, {"mod": 10_000}, "hash"]
    assert rows_of(run(swapped, {"s": as_feature("s", rows)})) != rows_of(run(ops[:3], {"s": as_feature("s", rows)}))


# ----------------------------------------------------------------- the config and the pipeline

RECIS_SLOTS = {
    "dense2": {"dim": 8, "table": "sparse1", "ops": [{"select": "dense2"}, {"bucketize": [0, 0.5, 1]}]},
    "sparse1": {"dim": 8},
    "sparse3": {"dim": 8, "ops": [{"select": "sparse3"}, {"mod": 10000}]},
    "sparse4": {
        "dim": 16,
        "ops": [{"select": "sparse4"}, {"mod": 10000}, {"truncate": {"seq_len": 1000, "side": "right"}}],
    },
    "sparse5": {"dim": 16, "ops": [{"select": "sparse5"}, "hash", {"mod": 10000}]},
    "sparse1_x_sparse2": {"dim": 16, "ops": [{"select": ["sparse1", "sparse2"]}, "cross", {"mod": 1000}]},
}


def test_config_ops_round_trip_and_give_the_pipeline_with_its_input_kinds():
    config = EmbeddingConfig.from_dict({"slots_config": RECIS_SLOTS})
    assert EmbeddingConfig.from_dict(config.to_dict()) == config
    pipeline = FeaturePipeline.from_config(config)
    assert pipeline.slot_names == ["dense2", "sparse3", "sparse4", "sparse5", "sparse1_x_sparse2"]
    assert pipeline.input_names == {
        "dense2": "dense",
        "sparse3": "ids",
        "sparse4": "ids",
        "sparse5": "ids",
        "sparse1": "ids",
        "sparse2": "ids",
    }
    assert FeaturePipeline.from_dict(pipeline.to_config()).to_config() == pipeline.to_config()
    assert not FeaturePipeline.from_config(EmbeddingConfig.from_dict({"slots_config": {"a": {"dim": 2}}}))


def test_the_dense_model_spec_carries_the_ops_it_was_trained_with():
    config = EmbeddingConfig.from_dict({"slots_config": RECIS_SLOTS})
    spec = DenseModelSpec.for_config(config, version=1, step=0, dense_width=8)
    restored = DenseModelSpec.from_json(spec.to_json())
    assert restored.feature_pipeline().to_config() == FeaturePipeline.from_config(config).to_config()
    assert restored.feature_pipeline().slot_names == ["dense2", "sparse3", "sparse4", "sparse5", "sparse1_x_sparse2"]


@pytest.mark.parametrize(
    ("ops", "message"),
    [
        ([{"select": "a"}, {"modulo": 3}], "ops[1]: unknown op 'modulo'; the ops are: select, bucketize"),
        ([{"select": "a"}, {"mod": 0}], "ops[1] (mod): the modulus must be an integer in [1, 2**64); got 0"),
        ([{"select": "a"}, {"mod": "7"}], "ops[1] (mod): the modulus must be an integer"),
        ([{"select": "a"}, {"bucketize": [1, 1]}], "ops[1] (bucketize): boundaries must rise strictly"),
        ([{"select": "a"}, {"bucketize": []}], "boundaries must be a non-empty list of finite numbers"),
        ([{"select": "a"}, {"hash": "murmur"}], "ops[1] (hash): the only hash is 'farm'"),
        ([{"select": "a"}, {"truncate": {"seq_len": 0}}], "ops[1] (truncate): seq_len must be an integer >= 1"),
        ([{"select": "a"}, {"truncate": {"seq_len": 3, "side": "up"}}], "side must be 'left'"),
        ([{"select": "a"}, {"truncate": {"seq_len": 3, "keep": 1}}], "unknown keys ['keep']"),
        ([{"mod": 3}], "ops[0]: the first op must be a select of the input(s), got mod"),
        ([{"select": "a"}, {"select": "b"}], "ops[1] (select): select may only be the first op"),
        ([{"select": ["a", "b"]}, {"mod": 3}], "two selected inputs must be crossed next (cross)"),
        ([{"select": ["a", "b", "c"]}, "cross"], "select takes one input, or two for a cross; got 3"),
        ([{"select": "a"}, "cross"], "ops[1] (cross): cross needs a select of two inputs right before it"),
        ([{"select": "a"}, {"mod": 3}, {"bucketize": [1.0]}], "ops[2] (bucketize): bucketize turns a dense input"),
        (["select"], "give the input's name"),
    ],
)
def test_bad_ops_are_config_errors_naming_the_slot_and_the_op(ops, message):
    with pytest.raises(ConfigError) as info:
        EmbeddingConfig.from_dict({"slots_config": {"age_b": {"dim": 4, "ops": ops}}})
    assert "'slots_config.age_b'" in str(info.value)
    assert message in str(info.value)


def test_bucketize_on_an_id_input_is_a_config_error():
    with pytest.raises(ConfigError, match="input 'sparse1' is bucketized .* by slot 'b' but read as ids by slot "):
        EmbeddingConfig.from_dict(
            {
                "slots_config": {
                    "sparse1": {"dim": 4},
                    "b": {"dim": 4, "ops": [{"select": "sparse1"}, {"bucketize": [1]}]},
                }
            }
        )
    with pytest.raises(ConfigError, match="input 'x' is bucketized .* by slot 'a' but read as ids by slot 'c'"):
        EmbeddingConfig.from_dict(
            {
                "slots_config": {
                    "a": {"dim": 4, "ops": [{"select": "x"}, {"bucketize": [1]}]},
                    "c": {"dim": 4, "ops": [{"select": "x"}, {"mod": 5}]},
                }
            }
        )


def test_select_of_an_unknown_or_mismatched_input_names_the_slot_and_the_input():
    pipeline = FeaturePipeline.from_config(EmbeddingConfig.from_dict({"slots_config": RECIS_SLOTS}))
    available = {name: kind for name, kind in pipeline.input_names.items() if name != "sparse2"}
    with pytest.raises(ValueError, match="slot 'sparse1_x_sparse2' selects unknown input 'sparse2'; job.yml provides"):
        pipeline.check_inputs(available, "job.yml")
    with pytest.raises(ValueError, match="slot 'dense2' bucketizes input 'dense2', but the data provides it as ids"):
        pipeline.check_inputs({**pipeline.input_names, "dense2": "ids"}, "the data")
    pipeline.check_inputs(pipeline.input_names, "the data")
    inputs = {"dense2": np.zeros(2), "sparse1": as_feature("a", [[1], [2]]), "sparse2": as_feature("b", [[1], []])}
    with pytest.raises(FeatureInputError, match="slot 'sparse3' selects input 'sparse3', which is missing"):
        pipeline.apply(inputs)
    bad = {**inputs, "dense2": as_feature("d", [[1], [2]])}
    with pytest.raises(FeatureInputError, match="slot 'dense2' bucketizes input 'dense2': it must be dense values"):
        pipeline.apply(bad)
    single = FeaturePipeline({"s": parse_ops([{"select": "s"}, {"mod": 3}])})
    with pytest.raises(FeatureInputError, match="slot 's' reads ids of input 's': it must be one id list per row"):
        single.apply({"s": np.zeros(3)})
    cross = FeaturePipeline({"x": parse_ops([{"select": ["a", "b"]}, "cross"])})
    with pytest.raises(FeatureInputError, match="input 'b' has 1 rows but input 'a' has 2"):
        cross.apply({"a": as_feature("a", [[1], [2]]), "b": as_feature("b", [[1]])})
    with pytest.raises(FeatureInputError, match="slot 'x': the cross makes 9 ids, over the limit of 8"):
        cross.apply({"a": as_feature("a", [[1, 2, 3]]), "b": as_feature("b", [[4, 5, 6]])}, max_ids=8)


def test_features_replace_slots_with_ops_and_drop_inputs_that_are_not_slots():
    config = EmbeddingConfig.from_dict({"slots_config": RECIS_SLOTS})
    pipeline = FeaturePipeline.from_config(config)
    rng = np.random.default_rng(8)
    raw = {n: as_feature(n, random_rows(rng, 4, 3)) for n in ("sparse1", "sparse2", "sparse3", "sparse4", "sparse5")}
    raw["dense2"] = rng.random(4)
    features = pipeline.features(raw, [raw[n] for n in ("sparse1", "sparse2", "sparse3", "sparse4", "sparse5")])
    assert sorted(f.name for f in features) == sorted(config.slots_config)
    assert rows_of(next(f for f in features if f.name == "sparse1")) == rows_of(raw["sparse1"])
    assert rows_of(next(f for f in features if f.name == "sparse3")) == [
        [v % 10000 for v in r] for r in rows_of(raw["sparse3"])
    ]


def test_a_bucketized_feature_looks_up_the_table_it_shares_with_a_sparse_feature():
    for shared in (
        {"slots_config": RECIS_SLOTS},  # RecIS's shared_name: dense2 names table sparse1
        {
            "slots_config": {**RECIS_SLOTS, "dense2": {**RECIS_SLOTS["dense2"], "table": ""}},
            "feature_groups": {"small": ["dense2", "sparse1"]},
        },
    ):
        config = EmbeddingConfig.from_dict(shared)
        assert config.table_of("dense2").name == config.table_of("sparse1").name
        pipeline = FeaturePipeline.from_config(config)
        (dense2,) = [f for f in pipeline.apply(_recis_inputs(3)) if f.name == "dense2"]
        assert dense2.ids.tolist() == [1, 2, 3]  # 0.2, 0.7, 1.0 with boundaries 0, 0.5, 1
        sparse1 = as_feature("sparse1", [[1], [2], [3]])
        client = InProcessEmbeddingClient(config, GlobalConfig())
        rows = client.lookup([dense2, sparse1]).embeddings
        np.testing.assert_array_equal(rows["dense2"].numpy(), rows["sparse1"].numpy())
        assert np.abs(rows["dense2"].numpy()).sum() > 0


def _recis_inputs(n: int) -> dict:
    rng = np.random.default_rng(9)
    raw: dict = {name: as_feature(name, random_rows(rng, n, 3)) for name in ("sparse1", "sparse2", "sparse3")}
    raw["sparse4"] = as_feature("sparse4", random_rows(rng, n, 20))
    raw["sparse5"] = as_feature("sparse5", random_rows(rng, n, 20))
    raw["dense2"] = np.array([0.2, 0.7, 1.0][:n])
    return raw


# ----------------------------------------------------------------- vectorised


def test_a_million_ids_go_through_a_chain_in_well_under_a_second():
    rng = np.random.default_rng(10)
    lengths = rng.integers(0, 40, 50_000)
    offsets = np.zeros(lengths.size + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = rng.integers(0, 1 << 63, int(offsets[-1]), dtype=np.uint64)
    assert ids.size > 900_000
    seq = SparseFeature("s", ids, offsets)
    dense = rng.random((lengths.size, 20))  # another million values
    pipeline = FeaturePipeline(
        {
            "s": parse_ops([{"select": "s"}, "hash", {"mod": 10_000}, {"truncate": {"seq_len": 30, "side": "left"}}]),
            "d": parse_ops([{"select": "d"}, {"bucketize": np.linspace(0, 1, 50).tolist()}]),
        }
    )
    pipeline.apply({"s": seq, "d": dense})  # compiles the numba kernels once
    started = time.perf_counter()
    out = pipeline.apply({"s": seq, "d": dense})
    elapsed = time.perf_counter() - started
    assert out[1].ids.size == dense.size
    assert elapsed < 0.5, f"{ids.size} ids took {elapsed:.3f} s"
