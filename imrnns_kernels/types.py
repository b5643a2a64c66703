"""Small value types shared by the ops."""

from __future__ import annotations

from typing import NamedTuple

import torch


class HyperNetWeights(NamedTuple):
    """Weights of one HyperNet ``Linear(m,h1) -> ReLU -> Linear(h1,h2) -> ReLU -> Linear(h2,OUT)``.

    Stored in ``torch.nn.Linear`` layout: ``w1`` (h1, m), ``b1`` (h1,), ``w2`` (h2, h1),
    ``b2`` (h2,), ``w3`` (OUT, h2), ``b3`` (OUT,). The official model uses h1=128, h2=64.
    """

    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor
    w3: torch.Tensor
    b3: torch.Tensor

    @property
    def in_dim(self) -> int:
        return int(self.w1.shape[1])

    @property
    def out_dim(self) -> int:
        return int(self.w3.shape[0])
