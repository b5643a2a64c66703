"""Random inputs for the scoring ops (modulated_score, modulated_topk) and their tests."""

from __future__ import annotations

from typing import NamedTuple

import torch

from tests.utils import unit_rows


class ScoringInputs(NamedTuple):
    corpus: torch.Tensor  # (N, m) in the storage dtype
    transform: torch.Tensor  # (B, OUT) float32
    ln_weight: torch.Tensor  # (m,)
    ln_bias: torch.Tensor  # (m,)
    queries: torch.Tensor  # (B, m)

    def double(self) -> ScoringInputs:
        """The same values in float64: the reference computed on exactly the stored inputs."""
        return ScoringInputs(*(t.double() for t in self))


def scoring_inputs(
    b: int, n: int, m: int, modulation: str, dtype: torch.dtype = torch.float32
) -> ScoringInputs:
    """Trained-looking parameters: diagonal (sigmoid, tanh) transforms; affine W = I + noise;
    LayerNorm weight around 1 and bias around 0 (not the identity, which would hide terms)."""
    corpus = unit_rows(n, m, dtype)
    if modulation == "diagonal":
        transform = torch.cat([torch.sigmoid(torch.randn(b, m)), torch.tanh(torch.randn(b, m))], 1)
    else:
        w = torch.eye(m) + torch.randn(b, m, m) / m**0.5
        transform = torch.cat([w.reshape(b, m * m), 0.3 * torch.randn(b, m)], 1)
    return ScoringInputs(
        corpus,
        transform,
        1.0 + 0.3 * torch.randn(m),
        0.1 * torch.randn(m),
        torch.randn(b, m),
    )
