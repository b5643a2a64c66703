"""The HyperNet MLP and the output activation of each modulation form."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from imrnns_kernels.types import HyperNetWeights


def hypernet(
    x: torch.Tensor,
    weights: HyperNetWeights,
    dropout: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """Raw HyperNet output ``W3 relu(W2 relu(W1 x + b1) + b2) + b3``.

    Args:
        x: (..., m) projected embeddings.
        weights: the six tensors of the MLP (see :class:`HyperNetWeights`).
        dropout: dropout probability after each ReLU (official v0.1 trains with 0.1).
        training: apply dropout only when True.

    Returns:
        (..., OUT) pre-activation output.
    """
    h = F.relu(F.linear(x, weights.w1, weights.b1))
    h = F.dropout(h, dropout, training)
    h = F.relu(F.linear(h, weights.w2, weights.b2))
    h = F.dropout(h, dropout, training)
    return F.linear(h, weights.w3, weights.b3)


def dim_from_transform(out: int, modulation: str) -> int:
    """Working dim m from a transform width OUT (2m or m*m + m)."""
    if modulation == "diagonal":
        if out % 2:
            raise ValueError(f"diagonal transform width must be even (2m), got {out}")
        return out // 2
    m = int((math.isqrt(1 + 4 * out) - 1) // 2)
    if m * m + m != out:
        raise ValueError(f"affine transform width must be m*m + m, got {out}")
    return m


def activate(raw: torch.Tensor, modulation: str) -> torch.Tensor:
    """Output activation of the HyperNet, giving the transform vector.

    - ``diagonal``: OUT = 2m, returns ``[sigmoid(o[:m]), tanh(o[m:])]`` (scale s, bias b).
    - ``affine``: OUT = m*m + m, returns ``o`` unchanged (``W = o[:m*m].view(m, m)``, ``b``).
    """
    if modulation == "affine":
        return raw
    m = dim_from_transform(raw.shape[-1], modulation)
    return torch.cat([torch.sigmoid(raw[..., :m]), torch.tanh(raw[..., m:])], dim=-1)
