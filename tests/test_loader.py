"""The loader's paths (files, directories, globs), seeded shuffles of files and rows through a
bounded buffer, epochs, and Parquet / ORC files read through a column mapping."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.orc as orc
import pyarrow.parquet as pq
import pytest

from trainer.data import Chunk, ColumnMapping, DenseColumn, concat_chunks
from trainer.loader import DataLoader, expand_paths, shuffle_rows

pytestmark = pytest.mark.unit

MAPPING = ColumnMapping(
    "label", dense=[DenseColumn("row", column="row_id")], sparse={"ids": "ids", "tags": "tags"}, string_ids="farm"
)


def write_rows(path: Path, start: int, n: int) -> None:
    """Rows ``start .. start + n - 1``: the row number as a dense value and as an id."""
    rows = np.arange(start, start + n)
    table = pa.table(
        {
            "label": pa.array([[float(r % 2)] for r in rows], pa.list_(pa.float64())),
            "row_id": pa.array(rows.astype(np.float64)),
            "ids": pa.array([[int(r)] for r in rows], pa.list_(pa.int64())),
            "tags": pa.array([[f"t{r % 7}"] for r in rows], pa.list_(pa.string())),
        }
    )
    (pq.write_table if path.suffix == ".parquet" else orc.write_table)(table, str(path))


def row_numbers(loader) -> list[int]:
    return [int(v) for batch in loader for v in batch.dense_matrix()[:, 0]]


def test_directories_and_globs_expand_to_sorted_table_files(tmp_path):
    (tmp_path / "data/b").mkdir(parents=True)
    (tmp_path / "data/.hidden").mkdir()
    write_rows(tmp_path / "data/b/part-1.orc", 100, 10)
    write_rows(tmp_path / "data/a-0.parquet", 0, 10)
    write_rows(tmp_path / "data/b/part-0.parquet", 50, 10)
    write_rows(tmp_path / "data/.hidden/skip.parquet", 900, 10)
    (tmp_path / "data/README.txt").write_text("not data")
    expected = [str(tmp_path / p) for p in ("data/a-0.parquet", "data/b/part-0.parquet", "data/b/part-1.orc")]
    assert expand_paths(tmp_path / "data") == expected
    assert expand_paths(str(tmp_path / "da*")) == expected  # a glob matching a directory
    assert expand_paths([tmp_path / "data/b", tmp_path / "data/a-0.parquet"]) == expected[1:] + expected[:1]
    with DataLoader(tmp_path / "data", 7, mapping=MAPPING) as loader:
        assert row_numbers(loader) == list(range(10)) + list(range(50, 60)) + list(range(100, 110))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="directory .*empty' holds no .parquet, .pq or .orc file"):
        expand_paths(tmp_path / "empty")


def test_row_shuffle_is_seeded_complete_and_bounded():
    n = 1000
    chunk = Chunk(
        np.arange(n, dtype=np.float32).reshape(n, 1),
        [],
        np.zeros((n, 1), np.float32),
        inputs={"row": np.arange(n, dtype=np.float64).reshape(n, 1)},
    )
    pieces = [chunk.slice(i, i + 64) for i in range(0, n, 64)]

    def order(seed: int, buffer_rows: int) -> list[int]:
        out = concat_chunks(list(shuffle_rows(iter(pieces), buffer_rows, np.random.default_rng(seed))))
        np.testing.assert_array_equal(out.inputs["row"][:, 0], out.dense[:, 0])  # inputs travel with their rows
        return [int(v) for v in out.dense[:, 0]]

    first = order(1, 200)
    assert sorted(first) == list(range(n)) and first != list(range(n))
    # mixed throughout, not only at the end: about half the neighbours are in rising order
    assert 0.35 < np.mean(np.diff(first[:700]) > 0) < 0.65
    assert order(1, 200) == first and order(2, 200) != first
    # Bounded: rows held back (read but not yet given out) never exceed buffer_rows plus one chunk,
    # so no row leaves more than that many positions before its place in the input.
    read = 0

    def counted():
        nonlocal read
        for piece in pieces:
            read += len(piece)
            yield piece

    given = 0
    for out in shuffle_rows(counted(), 200, np.random.default_rng(3)):
        given += len(out)
        assert read - (given - len(out)) <= 200 + 64
    assert given == n
    position = np.empty(n, np.int64)
    position[first] = np.arange(n)
    assert (np.arange(n) - position).max() <= 200 + 64


def test_epochs_and_seeded_shuffles_through_the_loader(tmp_path):
    for i in range(4):
        write_rows(tmp_path / f"part-{i}.parquet", 100 * i, 30)
    every = sorted(r for i in range(4) for r in range(100 * i, 100 * i + 30))

    def run(seed: int, **kw) -> list[int]:
        with DataLoader(tmp_path, 16, mapping=MAPPING, seed=seed, chunk_rows=8, **kw) as loader:
            return row_numbers(loader)

    in_order = run(0, epochs=2)
    assert in_order == every + every  # two passes, files in sorted order
    shuffled = run(5, epochs=2, shuffle_files=True, shuffle_buffer_rows=20)
    first, second = shuffled[:120], shuffled[120:]
    assert sorted(first) == every and sorted(second) == every and first != second
    assert run(5, epochs=2, shuffle_files=True, shuffle_buffer_rows=20) == shuffled
    assert run(6, epochs=2, shuffle_files=True, shuffle_buffer_rows=20) != shuffled
    files_only = run(5, shuffle_files=True)
    # whole files move, the rows inside each stay in order
    assert sorted(files_only) == every and files_only != every
    assert [files_only[i : i + 30] for i in range(0, 120, 30)] == sorted(
        [list(range(100 * i, 100 * i + 30)) for i in range(4)], key=lambda block: files_only.index(block[0])
    )
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        DataLoader(tmp_path, 16, epochs=0)
    with pytest.raises(ValueError, match="shuffle_buffer_rows must be >= 0"):
        DataLoader(tmp_path, 16, shuffle_buffer_rows=-1)
