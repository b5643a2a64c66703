"""Projection into the adapter's working space: ``p(x) = normalize(P x + p0)``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The official implementation normalises with F.normalize's default eps; keep it identical.
NORMALIZE_EPS = 1e-12


def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Project and L2-normalise base-encoder embeddings.

    Args:
        x: (..., n) base embeddings.
        weight: (m, n) projection matrix P (``nn.Linear`` layout).
        bias: (m,) offset p0, or None.

    Returns:
        (..., m) unit vectors ``(P x + p0) / max(||P x + p0||, 1e-12)``.
    """
    return F.normalize(F.linear(x, weight, bias), p=2, dim=-1, eps=NORMALIZE_EPS)
