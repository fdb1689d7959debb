"""The dense model of the PERSIA example, with PERSIA's signature
``forward(non_id_type_tensors, id_type_tensors)`` (PERSIA's adult-income ``DNN`` in shape).

``non_id_type_tensors[0]`` is the batch's continuous features (``[batch, 5]``); the ID-type
tensors are one embedding per feature of ``config/embedding_config.yml``, in that file's order
(``[batch, 8]`` each). It must stay TorchScript-able: ``dump_checkpoint(..., with_jit_model=True)``
scripts it for serving.
"""

from __future__ import annotations

import torch
from torch import nn


class DNN(nn.Module):
    """Continuous features and concatenated embeddings, each through a linear layer and batch
    norm, then an MLP to one probability per sample.

    Args:
        non_id_width: continuous features per sample.
        embedding_width: the embeddings' dims summed over the ID-type features.
    """

    def __init__(self, non_id_width: int = 5, embedding_width: int = 5 * 8, hidden: int = 32):
        super().__init__()
        self.dense_mlp = nn.Linear(non_id_width, 16)
        self.dense_bn = nn.BatchNorm1d(16)
        self.sparse_mlp = nn.Linear(embedding_width, 32)
        self.sparse_bn = nn.BatchNorm1d(32)
        self.ln1 = nn.Linear(16 + 32, hidden)
        self.ln2 = nn.Linear(hidden, 1)

    def forward(self, non_id_tensors: list[torch.Tensor], embedding_tensors: list[torch.Tensor]) -> torch.Tensor:
        dense_x = self.dense_bn(self.dense_mlp(non_id_tensors[0].float()))
        sparse_x = self.sparse_bn(self.sparse_mlp(torch.cat(embedding_tensors, dim=1).float()))
        x = torch.relu(self.ln1(torch.cat([dense_x, sparse_x], dim=1)))
        return torch.sigmoid(self.ln2(x))


if __name__ == "__main__":
    model = DNN()
    print(model([torch.ones(4, 5)], [torch.ones(4, 8) for _ in range(5)]).shape)
