"""Feature ops (embedding_server/core/feature_ops.py): each op against a plain-Python reference,
chaining, validation, the config's ``ops`` key and shared tables, and vectorised speed."""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable

import numpy as np
import pytest

from embedding_server.core.batch import KeyedIds, SparseFeature
from embedding_server.core.config import EmbeddingConfig, GlobalConfig
from embedding_server.core.errors import ConfigError
from embedding_server.core.feature_ops import (
    FeatureInputError,
    FeaturePipeline,
    RawInputs,
    parse_ops,
    truncate,
    truncate_rows,
)
from embedding_server.core.model_spec import DenseModelSpec
from embedding_server.rpc.client import InProcessEmbeddingClient

pytestmark = pytest.mark.unit

MASK = (1 << 64) - 1


# ----------------------------------------------------------------- plain-Python references


def ref_distinct(row: list[int]) -> list[int]:
    seen: list[int] = []
    for v in row:
        if v not in seen:
            seen.append(v)
    return seen


@pytest.fixture(scope="module")
def ref_run(farmhash_reference) -> Callable[[list, list], list[list[int]]]:
    """``ref_run(ops, rows)``: :func:`run_reference` with conftest's ``farmhash_reference``."""
    return lambda ops, rows_in: run_reference(ops, rows_in, farmhash_reference)


def run_reference(ops: list, rows_in: list, farm) -> list[list[int]]:
    """The chain on Python lists, one row at a time; ``farm`` gives FarmHash's fingerprints."""
    (first, *rest) = ops
    names = [first["select"]] if isinstance(first["select"], str) else first["select"]
    rows = rows_in
    for op in rest:
        name, param = (op, None) if isinstance(op, str) else next(iter(op.items()))
        if name == "bucketize":
            rows = [[bisect.bisect_right(param, v) for v in (r if isinstance(r, list) else [r])] for r in rows]
        elif name == "cross":
            rows = [
                [farm.fingerprint_pair(x, y) for x in ref_distinct(rx) for y in ref_distinct(ry)] for rx, ry in rows
            ]
        elif name == "mod":
            rows = [[v % param for v in r] for r in rows]
        elif name == "hash":
            rows = [[farm.fingerprint_u64(v) for v in r] for r in rows]
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
def test_bucketize_counts_the_boundaries_at_or_below_each_value(seed, ref_run):
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
def test_mod_is_unsigned_64_bit_modulo(n, ref_run):
    rows = random_rows(np.random.default_rng(n % 1000), 100, 5)
    ops = [{"select": "s"}, {"mod": n}]
    assert rows_of(run(ops, {"s": as_feature("s", rows)})) == ref_run(ops, rows)


def test_hash_is_farmhash_fingerprint_of_each_id(ref_run):
    rows = random_rows(np.random.default_rng(3), 100, 6)
    rows[0] = [0, 1, MASK]
    ops = [{"select": "s"}, "hash"]
    assert rows_of(run(ops, {"s": as_feature("s", rows)})) == ref_run(ops, rows)
    assert rows_of(run([{"select": "s"}, {"hash": "farm"}], {"s": as_feature("s", rows)})) == ref_run(ops, rows)


@pytest.mark.parametrize("side", ["left", "right"])
def test_truncate_cuts_off_the_given_side(side, ref_run):
    rows = random_rows(np.random.default_rng(4), 300, 12)
    ops = [{"select": "s"}, {"truncate": {"seq_len": 5, "side": side}}]
    got = rows_of(run(ops, {"s": as_feature("s", rows)}))
    assert got == ref_run(ops, rows)
    long = next(r for r in rows if len(r) > 5)
    assert (long[:5] if side == "right" else long[-5:]) in got


def test_cross_pairs_every_distinct_id_of_two_inputs_per_row(ref_run):
    rng = np.random.default_rng(5)
    xs = random_rows(rng, 200, 5, high=6)  # few values: repeats within a row
    ys = random_rows(rng, 200, 4, high=1 << 64)
    ops = [{"select": ["x", "y"]}, "cross"]
    got = run(ops, {"x": as_feature("x", xs), "y": as_feature("y", ys)})
    assert rows_of(got) == ref_run(ops, list(zip(xs, ys)))
    assert any(len(set(r)) < len(r) for r in xs)  # the distinct ids mattered


def test_chained_ops_apply_in_order(ref_run):
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


# ----------------------------------------------------------------- slots run together

MOD_CUT = [{"mod": 97}, {"truncate": {"seq_len": 3, "side": "right"}}]
#: slots in an order that interleaves the groups (equal steps) with bucketize and cross slots;
#: ``a2`` selects the input ``a`` reads too, ``plain`` only selects
FUSED_SLOTS = {
    "a": [{"select": "a"}, *MOD_CUT],
    "b": [{"select": "b"}, *MOD_CUT],
    "h": [{"select": "h"}, "hash", {"truncate": {"seq_len": 2}}],
    "d": [{"select": "d"}, {"bucketize": [0.25, 0.5]}, {"mod": 2}],
    "c": [{"select": "c"}, *MOD_CUT],
    "a2": [{"select": "a"}, *MOD_CUT],
    "x": [{"select": ["a", "h"]}, "cross", {"mod": 1000}, {"truncate": {"seq_len": 4, "side": "left"}}],
    "g": [{"select": "g"}, "hash", {"truncate": {"seq_len": 2}}],
    "plain": [{"select": "p"}],
    "l": [{"select": "l"}, {"mod": 97}, {"truncate": {"seq_len": 3, "side": "left"}}],
}


def _fused_inputs(rows: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    raw: dict = {n: as_feature(n, random_rows(rng, rows, 7, high=1 << 64)) for n in ("a", "b", "c", "g", "p", "l")}
    raw["h"] = as_feature("h", random_rows(rng, rows, 5, high=9))  # repeats: the cross's distinct ids
    raw["d"] = rng.random((rows, 2))
    return raw


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_slots_with_equal_steps_run_together_and_give_each_slots_own_result(seed, ref_run):
    pipeline = FeaturePipeline({slot: parse_ops(ops, slot) for slot, ops in FUSED_SLOTS.items()})
    raw = _fused_inputs(40, seed)
    ids_names = [n for n in raw if n != "d"]
    expected = {}
    for slot, ops in FUSED_SLOTS.items():
        names = [ops[0]["select"]] if isinstance(ops[0]["select"], str) else ops[0]["select"]
        rows = [rows_of(raw[n]) if n != "d" else raw[n].tolist() for n in names]
        expected[slot] = ref_run(ops, rows[0] if len(rows) == 1 else list(zip(*rows)))
        alone = FeaturePipeline({slot: parse_ops(ops, slot)}).apply(raw)[0]
        assert rows_of(alone) == expected[slot], slot
    assert any(len(r) > 3 for r in rows_of(raw["a"]))  # the truncation cut rows of grouped slots
    shuffled = [ids_names[k] for k in np.random.default_rng(seed).permutation(len(ids_names))]
    for order in (ids_names, shuffled):  # the group's inputs together in the layout, or scattered
        keyed = KeyedIds.from_features([raw[n] for n in order])
        for inputs in (raw, RawInputs(keyed, {"d": raw["d"]})):
            got = pipeline.apply_keyed(inputs)
            assert got.names == tuple(FUSED_SLOTS)
            assert {f.name: rows_of(f) for f in got} == expected
            assert [rows_of(f) for f in pipeline.apply(inputs)] == list(expected.values())


def test_truncate_rows_cuts_each_feature_as_truncate_does(ref_run):
    rng = np.random.default_rng(11)
    features = [as_feature(str(k), random_rows(rng, 30, 9)) for k in range(4)]
    keyed = KeyedIds.from_features(features)
    for side in ("left", "right"):
        ids, offsets = truncate_rows(keyed.ids, keyed.offsets, 4, side)
        out = KeyedIds(keyed.names, ids, offsets)
        for f, got in zip(features, out):
            want_ids, want_offsets = truncate(f.ids, f.offsets, 4, side)
            assert got.ids.tolist() == want_ids.tolist() and got.offsets.tolist() == want_offsets.tolist()
            assert rows_of(got) == ref_run([{"select": "s"}, {"truncate": {"seq_len": 4, "side": side}}], rows_of(f))
    same_ids, same_offsets = truncate_rows(keyed.ids, keyed.offsets, 9, "left")  # nothing to cut
    assert same_ids is keyed.ids and same_offsets is keyed.offsets


def test_raw_inputs_held_as_keyed_ids_give_the_precise_errors():
    pipeline = FeaturePipeline({slot: parse_ops(ops, slot) for slot, ops in FUSED_SLOTS.items()})
    raw = _fused_inputs(5, 3)

    def keyed(*leave_out: str) -> KeyedIds:
        return KeyedIds.from_features([f for n, f in raw.items() if n != "d" and n not in leave_out])

    with pytest.raises(
        FeatureInputError, match="slot 'c' selects input 'c', which is missing; the inputs are: a, b, d"
    ):
        pipeline.apply_keyed(RawInputs(keyed("c"), {"d": raw["d"]}))
    with pytest.raises(FeatureInputError, match="input 'd' has 4 rows but input 'a' has 5 \\(slot 'd'\\)"):
        pipeline.apply_keyed(RawInputs(keyed(), {"d": raw["d"][:4]}))
    as_ids = KeyedIds.from_features([*keyed(), as_feature("d", [[1]] * 5)])
    with pytest.raises(FeatureInputError, match="slot 'd' bucketizes input 'd': it must be dense values .* got ids"):
        pipeline.apply_keyed(RawInputs(as_ids, {}))
    with pytest.raises(FeatureInputError, match="slot 'x': the cross makes .* ids, over the limit of 3"):
        pipeline.apply_keyed(RawInputs(keyed(), {"d": raw["d"]}), max_ids=3)
    with pytest.raises(ValueError, match="inputs given both as ids and as dense values: \\['a'\\]"):
        RawInputs(keyed(), {"d": raw["d"], "a": np.zeros(5)})


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
