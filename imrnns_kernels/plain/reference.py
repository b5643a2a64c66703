"""The plain ops in PyTorch: projection, and a transform followed by a LayerNorm.

These are the only implementations of :func:`imrnns_kernels.project` and
:func:`imrnns_kernels.modulate_layernorm` (every backend runs them: one GEMM and a row
normalisation leave nothing to fuse), and building blocks of the scoring reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from imrnns_kernels._runtime import NORMALIZE_EPS
from imrnns_kernels._validation import dim_from_transform


def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Project and L2-normalise base-encoder embeddings: ``p(x) = normalize(P x + p0)``.

    Args:
        x: (..., n) base embeddings.
        weight: (m, n) projection matrix P (``nn.Linear`` layout).
        bias: (m,) offset p0, or None.

    Returns:
        (..., m) unit vectors ``(P x + p0) / max(||P x + p0||, 1e-12)``.
    """
    return F.normalize(F.linear(x, weight, bias), p=2, dim=-1, eps=NORMALIZE_EPS)


def apply_transform(x: torch.Tensor, transform: torch.Tensor, modulation: str) -> torch.Tensor:
    """``T(x)`` for one transform per batch row.

    Args:
        x: (B, m) or (B, K, m) vectors.
        transform: (B, OUT). ``diagonal``: ``[s, b]``, ``T(x) = x * s + b``;
            ``affine``: ``[vec(W), b]`` with W row-major (m, m), ``T(x) = W x + b``.
        modulation: ``"diagonal"`` or ``"affine"``.

    Returns:
        Same shape as ``x``.
    """
    m = dim_from_transform(transform.shape[-1], modulation)
    squeeze = x.dim() == 2
    xs = x.unsqueeze(1) if squeeze else x
    if modulation == "diagonal":
        scale, bias = transform[:, None, :m], transform[:, None, m:]
        out = xs * scale + bias
    else:
        w = transform[:, : m * m].reshape(-1, m, m)
        bias = transform[:, None, m * m :]
        out = torch.einsum("bij,bkj->bki", w, xs) + bias
    return out.squeeze(1) if squeeze else out


def modulate_layernorm(
    x: torch.Tensor,
    transform: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    modulation: str,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``LN(T(x))`` with LayerNorm over the last dim (biased variance, as torch).

    Args:
        x: (B, m) or (B, K, m).
        transform: (B, OUT).
        ln_weight, ln_bias: (m,) LayerNorm affine parameters.

    Returns:
        Same shape as ``x``.
    """
    y = apply_transform(x, transform, modulation)
    return F.layer_norm(y, (y.shape[-1],), ln_weight, ln_bias, eps)
