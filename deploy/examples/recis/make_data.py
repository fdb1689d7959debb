#!/usr/bin/env python
"""Generate ORC files in the shape of RecIS's CTR example, with a planted, learnable signal.

Columns (as RecIS's ``fake_data`` writes them, see its "CTR Example Model" chapter):

==========  ==================  ====================================================================
``label``   ``list<double>``    0 or 1 value (an empty list reads as 0, RecIS's ``fixedlen_feature("label", [0.0])``)
``dense1``  ``list<double>``    8 values; some lists empty or short (the reader fills in the defaults)
``dense2``  ``list<double>``    0 or 1 value in [0, 1) (bucketized by the job's feature ops)
``sparse1`` ``list<int64>``     one user id (0 .. users-1)
``sparse2`` ``list<int64>``     one item id (0 .. items-1)
``sparse3`` ``list<int64>``     one large id whose value modulo 10,000 is one of 50 categories
``sparse4`` ``list<int64>``     a sequence of 1 .. 40 ids below 1,000,000
``sparse5`` ``list<string>``    a sequence of 0 .. 12 tokens out of 40 random strings
==========  ==================  ====================================================================

The click probability is ``sigmoid(bias + user + item + dense1 . w + dense2 bucket + category of
sparse3 % 10000 + the weights of sparse5's first 5 tokens)``, each part drawn once from the seed, so
the job's feature ops (bucketize, mod, truncate, string hashing) and the model have something to
find. The same ``--seed`` writes the same files.

Example:
    python deploy/examples/recis/make_data.py --out recis/data
    # recis/data/train/part-0.orc, data/train/part-1.orc (2,048 rows each), data/eval/part-0.orc (1,024 rows)
"""

from __future__ import annotations

import argparse
import string
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.orc as orc

USERS, ITEMS, CATEGORIES, TOKENS, TOKEN_WINDOW = 200, 300, 50, 40, 5


class Planted:
    """The planted model's parameters, drawn once from the seed (shared by every file)."""

    def __init__(self, seed: int):
        rng = np.random.default_rng([seed, 0])
        self.user = rng.normal(0.0, 0.8, USERS)
        self.item = rng.normal(0.0, 0.8, ITEMS)
        self.dense1 = rng.normal(0.0, 1.5, 8)
        self.category = rng.normal(0.0, 0.8, CATEGORIES)
        letters = np.array(list(string.ascii_letters + string.digits))
        self.tokens = ["".join(rng.choice(letters, 10)) for _ in range(TOKENS)]
        self.token = rng.normal(0.0, 0.6, TOKENS)


def make_table(planted: Planted, rows: int, rng: np.random.Generator) -> pa.Table:
    """``rows`` rows of RecIS's columns with labels drawn from the planted model."""
    user = rng.integers(0, USERS, rows)
    item = rng.integers(0, ITEMS, rows)
    dense1 = rng.random((rows, 8))
    lengths1 = np.where(rng.random(rows) < 0.05, 0, np.where(rng.random(rows) < 0.05, 6, 8))
    seen1 = np.where(np.arange(8) < lengths1[:, None], dense1, 0.0)  # the reader's defaults are zeros
    dense2 = rng.random(rows)
    has2 = rng.random(rows) >= 0.1
    seen2 = np.where(has2, dense2, 0.0)
    category = rng.integers(0, CATEGORIES, rows)
    sparse3 = rng.integers(1, 1 << 30, rows) * 10_000 + category
    seq4_len = rng.integers(1, 41, rows)
    seq4 = rng.integers(0, 1_000_000, int(seq4_len.sum()))
    seq5_len = rng.integers(0, 13, rows)
    seq5 = rng.integers(0, TOKENS, int(seq5_len.sum()))
    starts5 = np.concatenate([[0], np.cumsum(seq5_len)[:-1]])
    window = np.arange(TOKEN_WINDOW)
    in_window = window[None, :] < seq5_len[:, None]
    positions = np.where(in_window, starts5[:, None] + window[None, :], 0)
    token_part = np.where(in_window, planted.token[seq5[positions]] if seq5.size else 0.0, 0.0).sum(axis=1)
    logit = (
        -0.8
        + planted.user[user]
        + planted.item[item]
        + (seen1 - 0.5) @ planted.dense1
        + np.where(seen2 >= 0.5, 1.0, -0.5)
        + planted.category[category]
        + token_part
    )
    label = (rng.random(rows) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float64)
    label_empty = (label == 0) & (rng.random(rows) < 0.05)  # an empty label list reads as 0

    def lists(values: np.ndarray, lengths: np.ndarray, kind: pa.DataType) -> pa.Array:
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, kind))

    def singles(values: np.ndarray, present: np.ndarray, kind: pa.DataType) -> pa.Array:
        return lists(values[present], present.astype(np.int64), kind)

    dense1_flat = dense1[np.arange(8)[None, :] < lengths1[:, None]]
    return pa.table(
        {
            "label": singles(label, ~label_empty, pa.float64()),
            "dense1": lists(dense1_flat, lengths1, pa.float64()),
            "dense2": singles(dense2, has2, pa.float64()),
            "sparse1": singles(user, np.ones(rows, bool), pa.int64()),
            "sparse2": singles(item, np.ones(rows, bool), pa.int64()),
            "sparse3": singles(sparse3, np.ones(rows, bool), pa.int64()),
            "sparse4": lists(seq4, seq4_len, pa.int64()),
            "sparse5": lists(np.array(planted.tokens, dtype=object)[seq5], seq5_len, pa.string()),
        }
    )


def write(out: Path, seed: int, train_files: int, train_rows: int, eval_rows: int) -> list[Path]:
    """Write ``out/train/part-K.orc`` and ``out/eval/part-0.orc``; returns the paths."""
    planted = Planted(seed)
    paths = []
    for split, files, rows in (("train", train_files, train_rows), ("eval", 1, eval_rows)):
        (out / split).mkdir(parents=True, exist_ok=True)
        for k in range(files):
            rng = np.random.default_rng([seed, 1 if split == "train" else 2, k])
            path = out / split / f"part-{k}.orc"
            orc.write_table(make_table(planted, rows, rng), str(path))
            paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for train/ and eval/")
    p.add_argument("--seed", type=int, default=0, help="seed of the planted model and the rows (default 0)")
    p.add_argument("--train-files", type=int, default=2, help="training files (default 2)")
    p.add_argument("--train-rows", type=int, default=2048, help="rows per training file (default 2048)")
    p.add_argument("--eval-rows", type=int, default=1024, help="rows of the evaluation file (default 1024)")
    args = p.parse_args(argv)
    for path in write(args.out, args.seed, args.train_files, args.train_rows, args.eval_rows):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
