"""The nn worker of the PERSIA example (PERSIA's adult-income ``train.py`` in shape).

Started by ``persia-launcher nn-worker train.py --nproc-per-node 1`` (torchrun: ``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``). It trains ``model.DNN`` on the batches the data loaders send
(``StreamingDataset``), its embeddings in the embedding parameter servers the service registry
names, until every data loader is done; then it evaluates on the held-out ``data/test.npz`` in an
``eval_ctx`` (no gradients, no new embedding rows), logs the test AUC and, on rank 0, saves the
checkpoint with the TorchScript model (``dump_checkpoint(..., with_jit_model=True)``) to
``$PERSIA_CKPT_DIR`` (default: ``checkpoint/`` beside this file) for serving.

Environment knobs (PERSIA's): ``REPRODUCIBLE`` (0/1), ``EMBEDDING_STALENESS`` (default 10);
``PERSIA_CKPT_DIR``.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from data_generator import make_dataloader
from model import DNN
from tqdm import tqdm

from persia.ctx import TrainCtx, eval_ctx
from persia.data import DataLoader, IterableDataset, StreamingDataset
from persia.embedding.data import PersiaBatch
from persia.embedding.optim import Adagrad
from persia.env import get_local_rank, get_rank, get_world_size
from persia.logger import get_default_logger
from persia.utils import setup_seed
from trainer.metrics import roc_auc

logger = get_default_logger("nn_worker")

HERE = os.path.dirname(os.path.realpath(__file__))


class TestDataset(IterableDataset):
    """The held-out batches, made in this process (without gradients)."""

    def __init__(self, test_dir: str, batch_size: int = 128):
        super().__init__(buffer_size=10)
        self.loader = make_dataloader(test_dir, batch_size)

    def __iter__(self):
        logger.info("test loader start to generating data...")
        for non_id_type_feature, id_type_features, label in self.loader:
            yield PersiaBatch(
                id_type_features,
                non_id_type_features=[non_id_type_feature],
                labels=[label],
                requires_grad=False,
            )


def test(model: torch.nn.Module, data_loader: DataLoader, cuda: bool) -> float:
    """The model's AUC, accuracy and loss on the held-out data (logged); returns the AUC."""
    logger.info("start to test...")
    model.eval()

    with eval_ctx(model=model) as ctx:
        accuracies, losses = [], []
        all_pred, all_labels = [], []
        for batch_data in tqdm(data_loader, desc="test...", disable=None):
            pred, labels = ctx.forward(batch_data)
            label = labels[0]
            loss = loss_fn(pred, label)
            if cuda:
                pred, label = pred.cpu(), label.cpu()
            all_pred.append(pred.detach().numpy())
            all_labels.append(label.detach().numpy())
            accuracies.append(float((torch.round(pred) == label).sum()) / label.shape[0])
            losses.append(float(loss))

        all_pred, all_labels = np.concatenate(all_pred), np.concatenate(all_labels)
        test_auc = roc_auc(all_labels, all_pred)
        logger.info(
            f"test auc is {test_auc} accuracy is {np.mean(accuracies)}, loss is {np.mean(losses)} "
            f"on {len(all_pred)} samples"
        )

    model.train()
    return test_auc


if __name__ == "__main__":
    reproducible = bool(int(os.environ.get("REPRODUCIBLE", 0)))
    embedding_staleness = int(os.environ.get("EMBEDDING_STALENESS", 10))

    if reproducible:
        setup_seed(3)

    model = DNN()
    logger.info("init Simple DNN model...")
    rank, device_id, world_size = get_rank(), get_local_rank(), get_world_size()

    mixed_precision = True
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(device_id)
        model.cuda(device_id)
    else:
        mixed_precision = False
        device_id = None
    logger.info(f"device_id is {device_id}")

    dense_optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    embedding_optimizer = Adagrad(lr=0.1)
    loss_fn = torch.nn.BCELoss(reduction="mean")

    buffer_size = 10
    test_dir = os.path.join(HERE, "data/test.npz")
    test_dataset = TestDataset(test_dir, batch_size=128)

    with TrainCtx(
        model=model,
        embedding_optimizer=embedding_optimizer,
        dense_optimizer=dense_optimizer,
        mixed_precision=mixed_precision,
        device_id=device_id,
    ) as ctx:
        train_dataloader = DataLoader(
            StreamingDataset(buffer_size),
            reproducible=reproducible,
            embedding_staleness=embedding_staleness,
        )
        test_loader = DataLoader(test_dataset)

        logger.info("start to training...")
        batch_idx = -1
        for batch_idx, data in enumerate(train_dataloader):
            output, labels = ctx.forward(data)
            label = labels[0]
            loss = loss_fn(output, label)
            scaled_loss = ctx.backward(loss)
            accuracy = (torch.round(output) == label).sum() / label.shape[0]
            if batch_idx % 16 == 0:
                logger.info(
                    f"current batch idx: {batch_idx} loss: {loss.item():.6f} scaled_loss: {scaled_loss.item():.6f} "
                    f"accuracy: {accuracy.item():.4f}"
                )
        logger.info(f"trained on {batch_idx + 1} batches")

        test_auc = test(model, test_loader, use_cuda)

        checkpoint_dir = os.environ.get("PERSIA_CKPT_DIR") or os.path.join(HERE, "checkpoint")
        if rank == 0:
            logger.info(f"dump checkpoint to {checkpoint_dir}")
            ctx.dump_checkpoint(checkpoint_dir, with_jit_model=True)
            logger.info(f"checkpoint saved to {checkpoint_dir}")
    logger.info("training done")
