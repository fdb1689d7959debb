"""Training data: Criteo readers against an independent csv-module parse, Parquet / ORC through a
column mapping, the planted synthetic generator, and the prefetching, sharding loader."""

from __future__ import annotations

import csv
import gc
import gzip
import logging
import math
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.orc as orc
import pyarrow.parquet as pq
import pytest

from embedding_server.core.batch import SparseFeature
from trainer.batch import PyPersiaBatchData
from trainer.criteo import read_criteo, write_criteo_tsv
from trainer.data import (
    Chunk,
    ColumnMapping,
    DataFormatError,
    DenseColumn,
    concat_chunks,
    read_table,
    rebatch,
    to_batch,
)
from trainer.loader import DataLoader
from trainer.synthetic import SyntheticCriteo

pytestmark = pytest.mark.unit

SAMPLE = Path("/work/shared/data/criteo_sample.csv")


def _expected_row(fields: list[str]) -> tuple[float, list[float], list[list[int]]]:
    """One Criteo row parsed with plain Python: label, transformed dense, id lists."""
    label = float(fields[0])
    dense = [math.log1p(max(float(v), 0.0)) if v else 0.0 for v in fields[1:14]]
    ids = [[int(v, 16)] if v else [] for v in fields[14:40]]
    return label, dense, ids


def _row_of(chunk: Chunk, i: int) -> tuple[float, list[float], list[list[int]]]:
    ids = [f.ids[f.offsets[i] : f.offsets[i + 1]].tolist() for f in chunk.sparse]
    return float(chunk.labels[i, 0]), chunk.dense[i].tolist(), ids


def _same_chunk(a: Chunk, b: Chunk) -> bool:
    return (
        np.array_equal(a.dense, b.dense)
        and np.array_equal(a.labels, b.labels)
        and a.feature_names == b.feature_names
        and all(
            np.array_equal(x.ids, y.ids) and np.array_equal(x.offsets, y.offsets) for x, y in zip(a.sparse, b.sparse)
        )
    )


@pytest.fixture(scope="module")
def gen() -> SyntheticCriteo:
    return SyntheticCriteo(seed=11)


# --------------------------------------------------------------------------------- Criteo files


def test_sample_csv_matches_an_independent_parse():
    chunks = list(read_criteo(SAMPLE, chunk_rows=64))
    assert [len(c) for c in chunks] == [64, 64, 64, 8]
    chunk = concat_chunks(chunks)
    with SAMPLE.open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0][:2] == ["label", "I1"] and len(rows) == 201
    assert chunk.dense.shape == (200, 13) and chunk.labels.shape == (200, 1)
    assert chunk.feature_names == [f"C{i}" for i in range(1, 27)]
    for i in [0, 1, 2, 57, 130, 199]:
        label, dense, ids = _expected_row(rows[i + 1])
        got_label, got_dense, got_ids = _row_of(chunk, i)
        assert got_label == label
        np.testing.assert_allclose(got_dense, dense, rtol=1e-6)
        assert got_ids == ids
    # Missing categorical values are empty lists, and there are some in the sample.
    assert (chunk.feature("C20").lengths == 0).any()


def test_tsv_written_from_synthetic_rows_round_trips(tmp_path, gen):
    chunk = gen.chunk(3000, start=100)
    path = tmp_path / "day.tsv"
    write_criteo_tsv(path, chunk.slice(0, 1000))
    write_criteo_tsv(path, chunk.slice(1000, 3000), append=True)
    back = concat_chunks(list(read_criteo(path, chunk_rows=700)))
    assert _same_chunk(back, chunk)
    np.testing.assert_array_equal(back.raw_dense, chunk.raw_dense)
    # The planted model reads the same probabilities from the file.
    np.testing.assert_allclose(gen.true_probability(back), gen.true_probability(chunk))
    # Lines look like Criteo's: 40 tab-separated fields, 8-digit lowercase hex ids.
    first = path.read_text().splitlines()[0].split("\t")
    assert len(first) == 40 and all(len(v) in (0, 8) for v in first[14:])


def test_gzip_and_headerless_csv_and_custom_names(tmp_path):
    lines = SAMPLE.read_text().splitlines()
    gz = tmp_path / "sample.csv.gz"
    with gzip.open(gz, "wt") as f:
        f.write("\n".join(lines[1:]) + "\n")  # no header this time
    names = [f"d{i}" for i in range(13)], [f"s{i}" for i in range(26)]
    chunk = next(read_criteo(gz, fmt="csv", dense_names=names[0], sparse_names=names[1]))
    assert len(chunk) == 200 and chunk.feature_names == names[1]
    assert _same_chunk(chunk.slice(0, 200), _renamed(next(read_criteo(SAMPLE)), names[1]))


def _renamed(chunk: Chunk, names: list[str]) -> Chunk:
    sparse = [SparseFeature(n, f.ids, f.offsets) for n, f in zip(names, chunk.sparse)]
    return Chunk(chunk.dense, sparse, chunk.labels, chunk.raw_dense)


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("1\t2\t3", "expected 40 columns, found 3"),
        ("2" + "\t" * 39, "label must be 0 or 1"),
        ("0\tabc" + "\t" * 38, "dense feature I1 is not a finite number"),
        ("0" + "\t" * 13 + "\tzz12" + "\t" * 25, "categorical feature C1 is not a hexadecimal"),
        ("0" + "\t" * 13 + "\t" + "1" * 17 + "\t" * 25, "categorical feature C1"),
    ],
)
def test_malformed_line_error_names_file_and_line(tmp_path, gen, bad_line, message):
    good = tmp_path / "good.tsv"
    write_criteo_tsv(good, gen.chunk(30))
    lines = good.read_text().splitlines()
    path = tmp_path / "bad.tsv"
    path.write_text("\n".join(lines[:12] + [bad_line] + lines[12:]) + "\n")
    with pytest.raises(DataFormatError, match=message) as info:
        list(read_criteo(path, chunk_rows=8))
    assert info.value.line == 13 and f"{path}, line 13" in str(info.value)


def test_skip_mode_counts_and_logs_and_keeps_line_numbers(tmp_path, gen, caplog):
    chunk = gen.chunk(40)
    good = tmp_path / "good.tsv"
    write_criteo_tsv(good, chunk)
    lines = good.read_text().splitlines()
    # A short line at 3, a bad label at 10 (the parser's row 8 after the refused line).
    lines.insert(2, "0\t1")
    lines.insert(9, "7" + "\t" * 39)
    path = tmp_path / "mixed.tsv"
    path.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="trainer.criteo"):
        reader = read_criteo(path, on_error="skip")
        back = concat_chunks(list(reader))
    assert reader.skipped == 2 and sorted(reader.skipped_lines) == [3, 10]
    assert _same_chunk(back, chunk)
    assert "line 3" in caplog.text and "line 10" in caplog.text
    with pytest.raises(DataFormatError) as info:
        list(read_criteo(path))
    assert info.value.line == 3


# --------------------------------------------------------------------------------- Parquet / ORC


def _table(n: int) -> pa.Table:
    rng = np.random.default_rng(0)
    lists = [list(map(int, rng.integers(0, 1000, rng.integers(0, 4)))) for _ in range(n)]
    return pa.table(
        {
            "y": pa.array(rng.integers(0, 2, n).astype(np.int8)),
            "age": pa.array(rng.normal(size=n)),
            "visits": pa.array([None if i % 7 == 0 else i for i in range(n)], pa.int64()),
            "user": pa.array([None if i % 5 == 0 else i * 3 for i in range(n)], pa.int64()),
            "hexid": pa.array([None if i % 4 == 0 else format(i * 97, "x") for i in range(n)]),
            "decid": pa.array([str(i * 11) if i % 3 else "" for i in range(n)]),
            "tags": pa.array(lists, pa.list_(pa.int64())),
        }
    )


@pytest.mark.parametrize("fmt", ["parquet", "orc"])
def test_parquet_and_orc_through_a_mapping(tmp_path, fmt):
    table = _table(250)
    path = tmp_path / f"part.{fmt}"
    (pq.write_table if fmt == "parquet" else orc.write_table)(table, str(path))
    mapping = ColumnMapping(
        label="y",
        dense=[DenseColumn("age"), DenseColumn("visits")],
        sparse={"user": "user", "hex": "hexid", "dec": "decid", "tags": "tags"},
        string_ids="hex",
    )
    chunks = list(read_table(path, mapping=mapping, chunk_rows=100))
    assert max(len(c) for c in chunks) <= 100
    chunk = concat_chunks(chunks)
    rows = table.to_pylist()
    assert chunk.labels[:, 0].tolist() == [r["y"] for r in rows]
    np.testing.assert_allclose(chunk.dense[:, 0], [r["age"] for r in rows], rtol=1e-6)
    assert chunk.dense[:, 1].tolist() == [r["visits"] or 0 for r in rows]
    ids = {f.name: [f.ids[f.offsets[i] : f.offsets[i + 1]].tolist() for i in range(len(chunk))] for f in chunk.sparse}
    assert ids["user"] == [[r["user"]] if r["user"] is not None else [] for r in rows]
    assert ids["hex"] == [[int(r["hexid"], 16)] if r["hexid"] else [] for r in rows]
    assert ids["tags"] == [r["tags"] for r in rows]
    # The same column read as hexadecimal (a decimal string is valid hex too) ...
    assert ids["dec"] == [[int(r["decid"], 16)] if r["decid"] else [] for r in rows]
    # ... and as decimal.
    dec = concat_chunks(
        list(read_table(path, mapping=ColumnMapping("y", sparse={"dec": "decid"}, string_ids="decimal")))
    )
    assert dec.sparse[0].ids.tolist() == [int(r["decid"]) for r in rows if r["decid"]]


def test_mapping_is_validated_against_the_schema(tmp_path):
    path = tmp_path / "part.parquet"
    pq.write_table(_table(10), str(path))
    with pytest.raises(DataFormatError, match="no column 'nope'"):
        list(read_table(path, mapping=ColumnMapping("y", sparse={"f": "nope"})))
    with pytest.raises(DataFormatError, match="column 'hexid' has type string; expected a numeric"):
        list(read_table(path, mapping=ColumnMapping("y", dense=[DenseColumn("hexid")])))
    with pytest.raises(
        DataFormatError,
        match="column 'age' has type double; expected an integer, string, list<integer> or list<string>",
    ):
        list(read_table(path, mapping=ColumnMapping("y", sparse={"f": "age"})))
    bad_hex = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"y": [0, 1, 0], "h": ["ab", "xyz", "01"]}), str(bad_hex))
    with pytest.raises(DataFormatError, match=r"row 1: sparse feature 'f': column 'h': 'xyz' is not a hex id"):
        list(read_table(bad_hex, mapping=ColumnMapping("y", sparse={"f": "h"})))


# --------------------------------------------------------------------------------- chunks


def test_slice_take_concat_and_rebatch_keep_the_csr_right():
    samples = [[1, 2], [], [3], [4, 5, 6], [], [7]]
    chunk = Chunk(
        np.arange(12, dtype=np.float32).reshape(6, 2),
        [SparseFeature.from_lists("a", samples)],
        np.arange(6, dtype=np.float32).reshape(6, 1),
    )

    def lists(c: Chunk) -> list[list[int]]:
        f = c.sparse[0]
        return [f.ids[f.offsets[i] : f.offsets[i + 1]].tolist() for i in range(len(c))]

    assert lists(chunk.slice(1, 4)) == samples[1:4]
    assert lists(chunk.slice(4, 100)) == samples[4:]
    assert lists(chunk.take(np.array([5, 3, 3, 1]))) == [samples[5], samples[3], samples[3], samples[1]]
    assert lists(concat_chunks([chunk.slice(0, 2), chunk.slice(2, 2), chunk.slice(2, 6)])) == samples
    parts = list(rebatch([chunk.slice(0, 1), chunk.slice(1, 5), chunk.slice(5, 6)], 4))
    assert [len(p) for p in parts] == [4, 2] and sum(map(lists, parts), []) == samples
    assert [len(p) for p in rebatch([chunk], 4, drop_last=True)] == [4]


def test_to_batch_survives_bytes(gen):
    chunk = gen.chunk(50)
    batch = PyPersiaBatchData.from_bytes(to_batch(chunk).to_bytes())
    assert batch.batch_size == 50
    np.testing.assert_array_equal(batch.dense_matrix(), chunk.dense)
    np.testing.assert_array_equal(batch.targets[0], chunk.labels)
    assert [f.name for f in batch.sparse] == chunk.feature_names


# --------------------------------------------------------------------------------- synthetic data


def test_synthetic_rows_are_deterministic_and_independent_of_chunking(gen):
    whole = gen.chunk(1000, start=500)
    pieces = concat_chunks([gen.chunk(300, start=500), gen.chunk(1, start=800), gen.chunk(699, start=801)])
    assert _same_chunk(whole, pieces)
    assert _same_chunk(whole, SyntheticCriteo(seed=11).chunk(1000, start=500))
    picked = np.array([1499, 500, 900])
    assert _same_chunk(gen.rows(picked), whole.take(picked - 500))
    assert not np.array_equal(SyntheticCriteo(seed=12).chunk(1000, start=500).dense, whole.dense)


def test_synthetic_data_looks_like_criteo_and_carries_signal(gen):
    chunk = gen.chunk(60000)
    assert 0.2 <= chunk.labels.mean() <= 0.4
    assert gen.bayes_auc(chunk) > 0.7
    lengths = np.stack([f.lengths for f in chunk.sparse])
    assert lengths.max() == 1 and 0.02 < (lengths == 0).mean() < 0.3  # single ids, some missing
    # Zipf-like: the most frequent id of a large-vocabulary feature is far above the median one.
    big = int(np.argmax(gen.vocab_sizes))
    _, counts = np.unique(chunk.sparse[big].ids, return_counts=True)
    assert counts.max() > 50 * np.median(counts) and gen.vocab_sizes[big] >= 1e5
    assert np.isnan(chunk.raw_dense).any() and (chunk.dense >= 0).all()


def test_synthetic_multi_id_features_and_speed():
    gen = SyntheticCriteo(seed=3, multi_id_features=2, max_ids=4)
    chunk = gen.chunk(2000)
    assert chunk.sparse[-1].lengths.max() == 4 and chunk.sparse[-3].lengths.max() == 1
    with pytest.raises(ValueError, match="several ids"):
        write_criteo_tsv("/dev/null", chunk)
    start = time.perf_counter()
    gen.chunk(100_000, start=10_000)
    rate = 100_000 / (time.perf_counter() - start)
    assert rate > 50_000, f"{rate:.0f} rows/s"  # ~300k on an idle core; loose for shared CI


# --------------------------------------------------------------------------------- loader


def _row_keys(batches) -> list[tuple]:
    keys = []
    for b in batches:
        dense = b.dense_matrix()
        first = b.sparse[0]
        for i in range(b.batch_size):
            keys.append((dense[i].tobytes(), first.ids[first.offsets[i] : first.offsets[i + 1]].tobytes()))
    return keys


def test_two_ranks_see_every_synthetic_row_once(gen):
    everything = _row_keys([to_batch(gen.chunk(1003))])
    seen = []
    for rank in (0, 1):
        with DataLoader(gen, 64, rank=rank, world_size=2, num_rows=1003, chunk_rows=100) as loader:
            seen += _row_keys(loader)
    assert sorted(seen) == sorted(everything) and len(set(everything)) == 1003


def test_file_and_row_sharding(tmp_path, gen, monkeypatch):
    files = []
    for i in range(3):
        files.append(tmp_path / f"part-{i}.tsv")
        write_criteo_tsv(files[-1], gen.chunk(150, start=1000 * i))
    everything = sorted(_row_keys([to_batch(gen.chunk(150, start=1000 * i)) for i in range(3)]))
    # Three files, three ranks: one file each (ranks from the environment, as torchrun sets them).
    per_rank = []
    for rank in range(3):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "3")
        with DataLoader(str(tmp_path / "part-*.tsv"), 100, shuffle_files=True, seed=5) as loader:
            per_rank.append(_row_keys(loader))
    assert [len(k) for k in per_rank] == [150, 150, 150]
    assert sorted(sum(per_rank, [])) == everything
    # Three files, four ranks: rows are dealt round-robin instead.
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    rows = [_row_keys(DataLoader(files, 32, rank=r, world_size=4, chunk_rows=40)) for r in range(4)]
    assert [len(k) for k in rows] == [113, 113, 112, 112]
    assert sorted(sum(rows, [])) == everything


def test_loader_reads_parquet_with_the_default_criteo_mapping(tmp_path, gen):
    chunk = gen.chunk(300)
    columns = {"label": chunk.labels[:, 0].astype(np.int64)}
    columns.update({f"I{j + 1}": chunk.raw_dense[:, j] for j in range(13)})
    for f in chunk.sparse:
        columns[f.name] = _hex_strings(f)
    path = tmp_path / "criteo.parquet"
    pq.write_table(pa.table(columns), str(path))
    batches = list(DataLoader(path, 128))
    assert [b.batch_size for b in batches] == [128, 128, 44]
    assert sorted(_row_keys(batches)) == sorted(_row_keys([to_batch(chunk)]))


def _hex_strings(f: SparseFeature) -> pa.Array:
    return pa.array(
        [
            format(int(f.ids[f.offsets[i]]), "08x") if f.offsets[i + 1] > f.offsets[i] else None
            for i in range(f.batch_size)
        ]
    )


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "ctrserve-data-prefetch"]


def test_prefetch_propagates_worker_errors(tmp_path, gen):
    path = tmp_path / "broken.tsv"
    write_criteo_tsv(path, gen.chunk(100))
    with path.open("a") as f:
        f.write("1\tnot-enough-columns\n")
    loader = DataLoader(path, 30, chunk_rows=1000)
    with pytest.raises(DataFormatError, match="line 101"):
        list(loader)
    assert not _prefetch_threads()


def test_no_thread_left_after_close_exit_or_garbage(gen):
    loader = DataLoader(gen, 100, prefetch=2, chunk_rows=1000)  # endless source: the thread would run forever
    it = iter(loader)
    next(it)
    assert len(_prefetch_threads()) == 1
    loader.close()
    assert not _prefetch_threads()
    with pytest.raises(StopIteration):
        next(it)

    with DataLoader(gen, 100, chunk_rows=1000) as loader:
        for _ in zip(range(3), loader):
            pass
    assert not _prefetch_threads()

    next(iter(DataLoader(gen, 100, chunk_rows=1000)))  # iterator and loader dropped at once
    gc.collect()
    deadline = time.monotonic() + 5
    while _prefetch_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _prefetch_threads()


def test_bad_arguments():
    with pytest.raises(FileNotFoundError, match="no training data file matches"):
        DataLoader("/nonexistent/*.tsv", 10)
    with pytest.raises(ValueError, match="rank"):
        DataLoader(SyntheticCriteo(seed=0), 10, rank=2, world_size=2)
    with pytest.raises(ValueError, match="on_error"):
        read_criteo(SAMPLE, on_error="ignore")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------- list columns (RecIS's shape)


def _recis_table(n: int, seed: int) -> tuple[pa.Table, dict]:
    """Columns in the shape of RecIS's CTR example: label and dense as list<double> (label of
    length 0 or 1; dense1 up to 8 values, some short, empty or null), ids as list<int64> and
    list<string> (non-ASCII included), plus a scalar string column."""
    rng = np.random.default_rng(seed)
    label = [[float(rng.integers(0, 2))] if rng.random() < 0.8 else [] for _ in range(n)]
    dense1: list = []
    for _ in range(n):
        r = rng.random()
        dense1.append(None if r < 0.1 else [] if r < 0.2 else rng.random(int(rng.integers(1, 9))).tolist())
    dense2 = [[float(rng.random())] if rng.random() < 0.7 else [] for _ in range(n)]
    sparse1 = [rng.integers(0, 10**6, int(rng.integers(0, 4))).tolist() for _ in range(n)]
    words = ["alpha", "bêta", "γάμμα", "😀x", "z" * 70, "user_42"]
    sparse5 = [[words[int(i)] for i in rng.integers(0, len(words), int(rng.integers(0, 5)))] for _ in range(n)]
    user = [words[int(i)] if i < len(words) else None for i in rng.integers(0, len(words) + 1, n)]
    columns = {
        "label": pa.array(label, pa.list_(pa.float64())),
        "dense1": pa.array(dense1, pa.list_(pa.float64())),
        "dense2": pa.array(dense2, pa.large_list(pa.float32())),
        "sparse1": pa.array(sparse1, pa.list_(pa.int64())),
        "sparse5": pa.array(sparse5, pa.list_(pa.string())),
        "user": pa.array(user, pa.string()),
    }
    return pa.table(columns), {
        "label": label,
        "dense1": dense1,
        "dense2": dense2,
        "sparse1": sparse1,
        "sparse5": sparse5,
        "user": user,
    }


RECIS_MAPPING = ColumnMapping(
    label="label",
    dense=[
        DenseColumn("dense1", length=8, defaults=[float(-i) for i in range(8)]),
        DenseColumn("d2", column="dense2", defaults=[0.5], in_dense=False),
    ],
    sparse={"sparse1": "sparse1", "sparse5": "sparse5", "user": "user"},
    string_ids="farm",
)


def _fixed(row: list | None, defaults: list[float]) -> list[float]:
    """A fixed-length row by hand: the list's values, then the defaults of the missing positions."""
    values = list(row or [])
    return [float(values[i]) if i < len(values) else defaults[i] for i in range(len(defaults))]


@pytest.mark.parametrize("fmt", ["parquet", "orc"])
def test_list_columns_give_fixed_length_dense_values_and_farm_ids(tmp_path, fmt):
    import farmhash

    table, py = _recis_table(300, seed=1)
    path = tmp_path / f"recis.{fmt}"
    (pq.write_table if fmt == "parquet" else orc.write_table)(table, str(path))
    chunks = list(read_table(path, mapping=RECIS_MAPPING, chunk_rows=70))
    assert [len(c) for c in chunks] == [70, 70, 70, 70, 20]
    chunk = concat_chunks(chunks)
    assert chunk.labels[:, 0].tolist() == [r[0] if r else 0.0 for r in py["label"]]
    expected_dense1 = [_fixed(r, [float(-i) for i in range(8)]) for r in py["dense1"]]
    assert chunk.dense.shape == (300, 8)  # d2 is a raw input only
    np.testing.assert_array_equal(chunk.dense, np.array(expected_dense1, np.float32))
    np.testing.assert_array_equal(chunk.inputs["dense1"], np.array(expected_dense1))
    d2 = [_fixed(r, [0.5]) for r in py["dense2"]]
    np.testing.assert_allclose(chunk.inputs["d2"], np.array(d2, np.float32).astype(np.float64))
    assert chunk.inputs["d2"].shape == (300, 1) and chunk.inputs["d2"].dtype == np.float64

    def lists(f: SparseFeature) -> list[list[int]]:
        return [f.ids[f.offsets[i] : f.offsets[i + 1]].tolist() for i in range(f.batch_size)]

    assert lists(chunk.feature("sparse1")) == py["sparse1"]
    assert lists(chunk.feature("sparse5")) == [[farmhash.fingerprint64(w) for w in r] for r in py["sparse5"]]
    assert lists(chunk.feature("user")) == [[farmhash.fingerprint64(u)] if u else [] for u in py["user"]]
    assert set(chunk.inputs) == {"dense1", "d2", "sparse1", "sparse5", "user"}
    assert lists(chunk.inputs["sparse5"]) == lists(chunk.feature("sparse5"))  # type: ignore[arg-type]


def test_inputs_follow_slice_take_concat_and_rebatch(tmp_path):
    table, _ = _recis_table(120, seed=2)
    path = tmp_path / "recis.parquet"
    pq.write_table(table, str(path))
    whole = concat_chunks(list(read_table(path, mapping=RECIS_MAPPING, chunk_rows=1000)))
    rows = np.array([5, 99, 5, 0, 119, 42])
    taken = whole.take(rows)
    for name, value in whole.inputs.items():
        got = taken.inputs[name]
        if isinstance(value, SparseFeature):
            assert isinstance(got, SparseFeature)
            expected = [value.ids[value.offsets[r] : value.offsets[r + 1]].tolist() for r in rows]
            assert [got.ids[got.offsets[i] : got.offsets[i + 1]].tolist() for i in range(len(rows))] == expected
        else:
            np.testing.assert_array_equal(got, value[rows])
    parts = list(rebatch([whole.slice(0, 33), whole.slice(33, 34), whole.slice(34, 120)], 50))
    again = concat_chunks(parts)
    for name, value in whole.inputs.items():
        got = again.inputs[name]
        if isinstance(value, SparseFeature):
            assert isinstance(got, SparseFeature)
            assert np.array_equal(got.ids, value.ids) and np.array_equal(got.offsets, value.offsets)
        else:
            np.testing.assert_array_equal(got, value)
    # a sparse feature that is also an input stays one object after each operation
    for c in (whole.slice(3, 9), taken, again):
        assert c.inputs["sparse1"] is c.feature("sparse1")


@pytest.mark.parametrize("fmt", ["parquet", "orc"])
@pytest.mark.parametrize(
    "column, value, message",
    [
        ("dense1", list(range(9)), "dense input 'dense1': column 'dense1' holds a list of 9 values; its length is 8"),
        ("sparse1", [3, None], "sparse feature 'sparse1': column 'sparse1' holds a null id"),
        ("sparse1", [3, -4], "sparse feature 'sparse1': column 'sparse1': negative id -4"),
        ("label", [1.0, 0.0], "label: column 'label' holds a list of 2 values; its length is 1"),
    ],
)
def test_bad_list_values_name_file_column_and_row(tmp_path, fmt, column, value, message):
    table, _ = _recis_table(200, seed=3)
    values = table.column(column).to_pylist()
    values[157] = value
    table = table.set_column(
        table.schema.get_field_index(column), column, pa.array(values, table.schema.field(column).type)
    )
    path = tmp_path / f"bad.{fmt}"
    (pq.write_table if fmt == "parquet" else orc.write_table)(table, str(path))
    with pytest.raises(DataFormatError) as err:
        list(read_table(path, mapping=RECIS_MAPPING, chunk_rows=50))
    assert str(err.value) == f"{path}, row 157: {message}"


def test_list_of_hex_and_decimal_strings_and_wrong_types(tmp_path):
    path = tmp_path / "ids.parquet"
    pq.write_table(
        pa.table(
            {
                "y": pa.array([0, 1, 0]),
                "hexes": pa.array([["ff", "0a"], [], ["", "10"]]),
                "decs": pa.array([["12"], None, ["7", "x7"]]),
                "scalar": pa.array([1.5, 2.5, 3.5]),
            }
        ),
        str(path),
    )
    chunk = concat_chunks(list(read_table(path, mapping=ColumnMapping("y", sparse={"h": "hexes"}))))
    f = chunk.sparse[0]
    assert f.ids.tolist() == [255, 10, 16] and f.offsets.tolist() == [0, 2, 2, 3]  # "" is no id
    with pytest.raises(DataFormatError, match=r"row 2: sparse feature 'd': column 'decs': 'x7' is not a decimal id"):
        list(read_table(path, mapping=ColumnMapping("y", sparse={"d": "decs"}, string_ids="decimal")))
    with pytest.raises(DataFormatError, match="column 'scalar' has type double, one value per row, but length is 3"):
        list(read_table(path, mapping=ColumnMapping("y", dense=[DenseColumn("scalar", length=3)])))
    with pytest.raises(
        DataFormatError, match="label: column 'hexes' has type list<element: string>; expected a numeric"
    ):
        list(read_table(path, mapping=ColumnMapping("hexes")))
    with pytest.raises(ValueError, match="string_ids must be hex, decimal or farm"):
        ColumnMapping("y", string_ids="md5")
    with pytest.raises(ValueError, match="input 'y2' is mapped twice"):
        ColumnMapping("y", dense=[DenseColumn("y2")], sparse={"y2": "hexes"})


def test_unreadable_file_is_a_data_format_error(tmp_path):
    path = tmp_path / "broken.orc"
    path.write_bytes(b"ORC but not really" * 10)
    with pytest.raises(DataFormatError, match=f"{path}: not a readable orc file"):
        list(read_table(path, mapping=RECIS_MAPPING))


# --------------------------------------------------------------------------------- bounded memory


def _peak_while_reading(path: Path, mapping: ColumnMapping) -> tuple[int, int, int]:
    """(rows read, Arrow memory pool peak, tracemalloc peak) while streaming ``path``, each
    chunk dropped once read."""
    import tracemalloc

    pool = pa.proxy_memory_pool(pa.default_memory_pool())
    previous = pa.default_memory_pool()
    pa.set_memory_pool(pool)
    tracemalloc.start()
    try:
        rows = 0
        for chunk in read_table(path, mapping=mapping, chunk_rows=4096):
            rows += len(chunk)
            del chunk
        _, traced_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        pa.set_memory_pool(previous)
    return rows, pool.max_memory(), traced_peak


@pytest.mark.parametrize("fmt", ["parquet", "orc"])
def test_reading_streams_row_groups_and_stripes_with_bounded_memory(tmp_path, fmt):
    n = 400_000
    rng = np.random.default_rng(4)
    dense = pa.FixedSizeListArray.from_arrays(pa.array(rng.random(n * 8)), 8).cast(pa.list_(pa.float64()))
    ids = pa.ListArray.from_arrays(
        pa.array(np.arange(0, 2 * n + 1, 2, dtype=np.int32)), pa.array(rng.integers(0, 2**40, 2 * n))
    )
    table = pa.table({"label": pa.array(rng.integers(0, 2, n).astype(np.float64)), "dense1": dense, "ids": ids})
    decoded = table.nbytes
    path = tmp_path / f"big.{fmt}"
    if fmt == "parquet":
        pq.write_table(table, str(path), row_group_size=20_000)
        assert pq.ParquetFile(str(path)).num_row_groups == 20
    else:
        orc.write_table(table, str(path), stripe_size=2 * 1024 * 1024)
        assert orc.ORCFile(str(path)).nstripes >= 8
    del table, dense, ids
    mapping = ColumnMapping("label", dense=[DenseColumn("dense1", length=8)], sparse={"ids": "ids"})
    rows, arrow_peak, traced_peak = _peak_while_reading(path, mapping)
    assert rows == n
    # one row group / stripe plus the chunk being built, far below the whole file decoded
    assert decoded > 35_000_000
    assert arrow_peak < decoded / 5, (arrow_peak, decoded)
    assert traced_peak < decoded / 5, (traced_peak, decoded)


# ------------------------------------------------------------------ feature ops in the data path


def _ops_chunk(rows: int, seed: int) -> Chunk:
    """A chunk as a reader makes it: the sparse columns both as features and as named raw inputs,
    plus a dense raw input ``age`` that only the ops read."""
    rng = np.random.default_rng(seed)
    c1 = SparseFeature.from_lists(
        "C1", [rng.integers(0, 50, rng.integers(0, 3)).astype(np.uint64) for _ in range(rows)]
    )
    tags = SparseFeature.from_lists(
        "tags", [rng.integers(0, 1 << 63, rng.integers(0, 6), dtype=np.uint64) for _ in range(rows)]
    )
    age = rng.uniform(10, 70, (rows, 1))
    return Chunk(
        rng.random((rows, 2)).astype(np.float32),
        [c1, tags],
        rng.integers(0, 2, (rows, 1)).astype(np.float32),
        inputs={"C1": c1, "tags": tags, "age": age},
    )


_OPS_SLOTS = {
    "age_b": {"dim": 4, "table": "C1", "ops": [{"select": "age"}, {"bucketize": [18, 30, 45]}]},
    "C1": {"dim": 4},
    "tags": {"dim": 4, "ops": [{"select": "tags"}, "hash", {"mod": 1000}, {"truncate": {"seq_len": 3}}]},
    "C1_x_tags": {"dim": 4, "ops": [{"select": ["C1", "tags"]}, "cross", {"mod": 50}]},
}


def test_batches_carry_the_slots_the_feature_ops_make_from_the_chunks_inputs():
    import bisect

    from embedding_server.core.config import EmbeddingConfig
    from embedding_server.core.farmhash import fingerprint64_u64, fingerprint_pairs
    from embedding_server.core.feature_ops import FeaturePipeline

    pipeline = FeaturePipeline.from_config(EmbeddingConfig.from_dict({"slots_config": _OPS_SLOTS}))
    chunk = _ops_chunk(40, seed=11)
    with DataLoader(chunk, 16, features=pipeline) as loader:
        batches = list(loader)
    assert [b.batch_size for b in batches] == [16, 16, 8]
    start = 0
    for batch in batches:
        part = chunk.slice(start, start + batch.batch_size)
        start += batch.batch_size
        got = {
            f.name: [f.ids[f.offsets[i] : f.offsets[i + 1]].tolist() for i in range(f.batch_size)] for f in batch.sparse
        }
        assert sorted(got) == sorted(_OPS_SLOTS)
        c1 = [
            part.inputs["C1"].ids[a:b].tolist()
            for a, b in zip(part.inputs["C1"].offsets, part.inputs["C1"].offsets[1:])
        ]
        tags = [
            part.inputs["tags"].ids[a:b] for a, b in zip(part.inputs["tags"].offsets, part.inputs["tags"].offsets[1:])
        ]
        assert got["C1"] == c1
        assert got["age_b"] == [[bisect.bisect_right([18, 30, 45], v)] for v in part.inputs["age"][:, 0]]
        assert got["tags"] == [(fingerprint64_u64(t) % np.uint64(1000)).tolist()[-3:] for t in tags]
        crossed = []
        for xs, ys in zip(c1, tags):
            pairs = [(x, int(y)) for x in dict.fromkeys(xs) for y in dict.fromkeys(ys.tolist())]
            low, high = np.array([p[0] for p in pairs], np.uint64), np.array([p[1] for p in pairs], np.uint64)
            crossed.append((fingerprint_pairs(low, high) % np.uint64(50)).tolist())
        assert got["C1_x_tags"] == crossed
    # without the ops the batches carry the chunk's features as read
    assert [f.name for f in to_batch(chunk).sparse] == ["C1", "tags"]


def test_the_trainer_and_the_handler_make_the_same_features_from_the_same_raw_rows():
    from embedding_server.core.batch_codec import BatchData, encode_batch
    from embedding_server.core.config import EmbeddingConfig
    from embedding_server.core.feature_ops import FeaturePipeline
    from embedding_server.core.model_spec import DenseModelSpec
    from handler.raw_inputs import add_raw_inputs
    from handler.request import RequestDecoder

    config = EmbeddingConfig.from_dict({"slots_config": _OPS_SLOTS})
    chunk = _ops_chunk(30, seed=12)
    trained = {f.name: f for f in to_batch(chunk, FeaturePipeline.from_config(config)).sparse}
    decoder = RequestDecoder(DenseModelSpec.for_config(config, version=1, step=0, dense_width=2), 100, 1 << 20)
    request = encode_batch(add_raw_inputs(BatchData(dense=[chunk.dense]), chunk.inputs))
    served = decoder.decode({"body": request}).sparse
    for f in served:
        np.testing.assert_array_equal(f.ids, trained[f.name].ids)
        np.testing.assert_array_equal(f.offsets, trained[f.name].offsets)
    assert sorted(f.name for f in served) == sorted(trained)


def test_criteo_and_generated_chunks_name_their_columns_as_inputs_of_feature_ops():
    from embedding_server.core.config import EmbeddingConfig
    from embedding_server.core.feature_ops import FeaturePipeline

    slots = {
        "I1_b": {"dim": 4, "ops": [{"select": "I1"}, {"bucketize": [1.0, 10.0]}]},
        "C1_m": {"dim": 4, "ops": [{"select": "C1"}, {"mod": 7}]},
        "C2": {"dim": 4},
    }
    pipeline = FeaturePipeline.from_config(EmbeddingConfig.from_dict({"slots_config": slots}))
    for chunk in (next(read_criteo(SAMPLE)), SyntheticCriteo(seed=3).chunk(50)):
        raw_i1 = np.nan_to_num(chunk.raw_dense[:, 0], nan=0.0)  # missing is the default 0
        got = {f.name: f for f in to_batch(chunk, pipeline).sparse}
        np.testing.assert_array_equal(got["I1_b"].ids, np.searchsorted([1.0, 10.0], raw_i1, side="right"))
        c1 = chunk.feature("C1")
        np.testing.assert_array_equal(got["C1_m"].ids, c1.ids % np.uint64(7))
        np.testing.assert_array_equal(got["C1_m"].offsets, c1.offsets)
        np.testing.assert_array_equal(got["C2"].ids, chunk.feature("C2").ids)
