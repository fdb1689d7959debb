"""The data-loader process of the PERSIA example (PERSIA's ``data_loader.py`` in shape).

Started by ``persia-launcher data-loader data_loader.py --replica-index 0 --replica-size 1``: it
reads ``data/train.npz`` and sends each batch, as a ``PersiaBatch`` with labels, to the nn
workers through ``DataCtx.send_data`` (the nn workers are found through the service registry at
``EMBEDDING_WORKER_SERVICE``). With several replicas, replica ``i`` sends every
``REPLICA_SIZE``-th batch starting at ``i``. Leaving the ``with`` block tells the nn workers
that this loader is done; training ends when every loader is.
"""

from __future__ import annotations

import os

from data_generator import make_dataloader
from tqdm import tqdm

from persia.ctx import DataCtx
from persia.embedding.data import PersiaBatch
from persia.env import get_replica_index, get_replica_size
from persia.logger import get_logger

logger = get_logger("data_loader")

train_filepath = os.path.join(os.path.dirname(os.path.realpath(__file__)), "data/train.npz")

if __name__ == "__main__":
    replica_index, replica_size = get_replica_index(), get_replica_size()
    with DataCtx() as ctx:
        loader = make_dataloader(train_filepath, batch_size=128)
        for batch_idx, (non_id_type_feature, id_type_features, label) in enumerate(
            tqdm(loader, desc="gen batch data...", disable=None)
        ):
            if batch_idx % replica_size != replica_index:
                continue
            persia_batch = PersiaBatch(
                id_type_features,
                non_id_type_features=[non_id_type_feature],
                labels=[label],
                requires_grad=True,
            )
            ctx.send_data(persia_batch)
    logger.info(f"data loader {replica_index} of {replica_size} sent {ctx.sent} batches")
