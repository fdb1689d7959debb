"""Small, seeded adult-income-like data for the PERSIA example, and the batches made from it.

PERSIA's adult-income example downloads the UCI census data and encodes it into
``data/train.npz`` and ``data/test.npz``. This example generates data of the same layout
instead, so it runs offline and in seconds: ``categorical_data`` (uint64 ``[n, k]``, one ordinal
id per feature and sample), ``categorical_columns`` (the ``k`` feature names, as in
``config/embedding_config.yml``), ``continuous_data`` (float32 ``[n, 5]``, already standardised)
and ``target`` (float32 ``[n]``, 1 for income above 50K). The label follows a planted logistic
model: a weight per category of every feature plus a linear term of the continuous features, so
a trained model's test AUC tells whether embeddings and dense weights were learnt.

Run it once before training::

    python data_generator.py            # writes data/train.npz and data/test.npz

:func:`make_dataloader` yields ``(NonIDTypeFeature, [IDTypeFeatureWithSingleID, ...], Label)``
per batch, as PERSIA's ``data_generator.make_dataloader`` does; ``data_loader.py`` (training
data) and ``train.py`` (held-out data) build their ``PersiaBatch`` objects from it.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator

import numpy as np

from persia.embedding.data import IDTypeFeatureWithSingleID, Label, NonIDTypeFeature

#: the ID-type features and how many categories each has (adult income's columns)
CATEGORICAL_COLUMNS = {
    "workclass": 9,
    "education": 16,
    "marital_status": 7,
    "occupation": 15,
    "relationship": 6,
}
#: the non-ID features (standardised)
CONTINUOUS_COLUMNS = ["age", "education_num", "capital_gain", "capital_loss", "hours_per_week"]

HERE = os.path.dirname(os.path.realpath(__file__))


def planted_model(seed: int) -> tuple[dict[str, np.ndarray], np.ndarray, float]:
    """The label's true logistic model: per feature one weight per category, the continuous
    features' coefficients and the bias."""
    rng = np.random.default_rng([seed, 0])
    category_weights = {name: rng.normal(0.0, 1.0, size) for name, size in CATEGORICAL_COLUMNS.items()}
    coefficients = np.array([0.8, 0.6, 0.9, 0.4, 0.5])
    return category_weights, coefficients, -1.0


def generate(rows: int, seed: int, model_seed: int = 0) -> dict[str, np.ndarray]:
    """``rows`` samples in the layout of PERSIA's adult-income ``.npz`` files.

    Args:
        rows: the number of samples.
        seed: the samples' seed (train and test data use different ones).
        model_seed: the planted model's seed (the same for train and test data).

    Returns:
        ``{"categorical_data", "categorical_columns", "continuous_data", "target"}``.
    """
    rng = np.random.default_rng([model_seed, seed, 1])
    category_weights, coefficients, bias = planted_model(model_seed)
    names = list(CATEGORICAL_COLUMNS)
    categorical = np.stack([rng.integers(0, CATEGORICAL_COLUMNS[name], rows) for name in names], axis=1).astype(
        np.uint64
    )
    continuous = rng.standard_normal((rows, len(CONTINUOUS_COLUMNS))).astype(np.float32)
    logit = bias + continuous.astype(np.float64) @ coefficients
    for column, name in enumerate(names):
        logit += category_weights[name][categorical[:, column].astype(np.int64)]
    target = (rng.random(rows) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
    return {
        "categorical_data": categorical,
        "categorical_columns": np.array(names),
        "continuous_data": continuous,
        "target": target,
    }


def write_datasets(output_dir: str, train_rows: int = 8192, test_rows: int = 2048, seed: int = 0) -> None:
    """Write ``train.npz`` and ``test.npz`` (held-out samples of the same planted model) to
    ``output_dir``."""
    os.makedirs(output_dir, exist_ok=True)
    np.savez_compressed(os.path.join(output_dir, "train.npz"), **generate(train_rows, seed=1, model_seed=seed))
    np.savez_compressed(os.path.join(output_dir, "test.npz"), **generate(test_rows, seed=2, model_seed=seed))


class DataLoader:
    """The batches of one ``.npz`` file, in order.

    Args:
        data_filepath: an adult-income style ``.npz`` file.
        batch_size: samples per batch (the last batch may be smaller).
        skip_last_batch: leave out a last batch smaller than ``batch_size``.
    """

    def __init__(self, data_filepath: str, batch_size: int = 128, skip_last_batch: bool = False):
        with np.load(data_filepath) as data:
            self.target = data["target"]
            self.continuous_data = data["continuous_data"]
            self.categorical_data = data["categorical_data"]
            self.categorical_columns = [str(name) for name in data["categorical_columns"]]
        self.batch_size = batch_size
        self.skip_last_batch = skip_last_batch

    def __len__(self) -> int:
        full, rest = divmod(len(self.target), self.batch_size)
        return full + (1 if rest and not self.skip_last_batch else 0)

    def __iter__(self) -> Iterator[tuple[NonIDTypeFeature, list[IDTypeFeatureWithSingleID], Label]]:
        for index in range(len(self)):
            start = index * self.batch_size
            end = min(start + self.batch_size, len(self.target))
            non_id_type_feature = NonIDTypeFeature(self.continuous_data[start:end])
            id_type_features = [
                IDTypeFeatureWithSingleID(name, np.ascontiguousarray(self.categorical_data[start:end, column]))
                for column, name in enumerate(self.categorical_columns)
            ]
            label = Label(self.target[start:end].reshape(-1, 1))
            yield non_id_type_feature, id_type_features, label


def make_dataloader(data_filepath: str, batch_size: int = 128, skip_last_batch: bool = False) -> DataLoader:
    """PERSIA's name: the batches of ``data_filepath``."""
    return DataLoader(data_filepath, batch_size, skip_last_batch)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Write data/train.npz and data/test.npz (seeded, synthetic).")
    parser.add_argument("--output-dir", default=os.path.join(HERE, "data"))
    parser.add_argument("--train-rows", type=int, default=8192)
    parser.add_argument("--test-rows", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_datasets(args.output_dir, args.train_rows, args.test_rows, args.seed)
    print(f"wrote {args.train_rows} training and {args.test_rows} test samples to {args.output_dir}")
