"""Ready-made dense models: DLRM and a DeepCTR-style MLP.

Every dense model takes ``forward(dense, sparse: List[Tensor])``: ``dense`` is float32
``[batch, dense_width]``; ``sparse`` holds one tensor per feature of ``embedding_config.yml``
in file order, ``[batch, dim]`` for pooled features and ``[batch, sample_fixed_size, dim]`` for
raw ones. Both models return click probabilities ``[batch, targets]`` and are TorchScript-able
(``torch.jit.script``), which is how they are exported for serving. Any other ``nn.Module``
with that signature works with the trainer too.

Example:
    >>> model = DLRM(dense_width=13, num_sparse=26, embedding_dim=16)
    >>> out = model(torch.zeros(4, 13), [torch.zeros(4, 16)] * 26)
    >>> out.shape
    torch.Size([4, 1])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def mlp(sizes: Sequence[int], final_activation: bool = True) -> nn.Sequential:
    """Linear layers ``sizes[0] → sizes[1] → ...`` with ReLU between them (and after the last
    one when ``final_activation``)."""
    if len(sizes) < 2:
        raise ValueError(f"an MLP needs at least an input and an output size, got {list(sizes)}")
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if final_activation or i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _pooled(x: Tensor) -> Tensor:
    """Raw ``[batch, fixed, dim]`` inputs are summed over their ids; pooled ones pass through."""
    return x.sum(dim=1) if x.dim() == 3 else x


class DLRM(nn.Module):
    """DLRM (Naumov et al., 2019): bottom MLP on dense features, pairwise dot products between
    it and every sparse embedding, top MLP on the dense vector plus the dot products.

    Args:
        dense_width: dense input columns.
        num_sparse: number of sparse features (all of width ``embedding_dim``).
        embedding_dim: width of every embedding; the bottom MLP ends at this width.
        bottom_mlp: hidden sizes of the bottom MLP.
        top_mlp: hidden sizes of the top MLP.
        targets: output columns (tasks).

    Raises:
        ValueError: non-positive sizes.
    """

    def __init__(
        self,
        dense_width: int,
        num_sparse: int,
        embedding_dim: int,
        bottom_mlp: Sequence[int] = (64, 32),
        top_mlp: Sequence[int] = (64, 32),
        targets: int = 1,
    ):
        super().__init__()
        if min(dense_width, num_sparse, embedding_dim, targets) <= 0:
            raise ValueError("DLRM sizes must be positive")
        self.bottom = mlp([dense_width, *bottom_mlp, embedding_dim])
        vectors = num_sparse + 1
        pairs = vectors * (vectors - 1) // 2
        self.top = mlp([embedding_dim + pairs, *top_mlp, targets], final_activation=False)
        rows, cols = torch.triu_indices(vectors, vectors, offset=1)
        # the vector pairs whose dots are taken; declared for type checkers, which see a buffer
        # as nn.Module.__getattr__'s Tensor | Module (TorchScript refuses class-level annotations)
        self.pair_rows: Tensor
        self.pair_cols: Tensor
        self.register_buffer("pair_rows", rows, persistent=False)
        self.register_buffer("pair_cols", cols, persistent=False)

    def forward(self, dense: Tensor, sparse: list[Tensor]) -> Tensor:
        x = self.bottom(dense)
        vectors = torch.stack([x] + [_pooled(s) for s in sparse], dim=1)  # [B, F+1, D]
        dots = torch.bmm(vectors, vectors.transpose(1, 2))  # [B, F+1, F+1]
        interactions = dots[:, self.pair_rows, self.pair_cols]
        return torch.sigmoid(self.top(torch.cat([x, interactions], dim=1)))


class DeepCTR(nn.Module):
    """A DeepCTR-style DNN: the dense features and every (pooled) embedding concatenated and fed
    through an MLP.

    Args:
        dense_width: dense input columns.
        embedding_dims: the width of each sparse feature's embedding, in input order.
        hidden: hidden layer sizes.
        targets: output columns (tasks).
    """

    def __init__(
        self, dense_width: int, embedding_dims: Sequence[int], hidden: Sequence[int] = (256, 128), targets: int = 1
    ):
        super().__init__()
        if dense_width < 0 or targets <= 0 or any(d <= 0 for d in embedding_dims):
            raise ValueError("DeepCTR sizes must be positive")
        self.net = mlp([dense_width + sum(embedding_dims), *hidden, targets], final_activation=False)

    def forward(self, dense: Tensor, sparse: list[Tensor]) -> Tensor:
        x = torch.cat([dense] + [_pooled(s) for s in sparse], dim=1)
        return torch.sigmoid(self.net(x))
