"""Shared by the tests, the benchmarks and ``benchmarks/gpu_check.py``: the one per-dtype
tolerance table, the comparison that uses it, and the input builders.

Not imported by the ops themselves (only torch is needed here).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

# Tolerance by the dtype in which the compared values were *computed or stored* (FlagGems
# style). Scores are cosines in [-1, 1]; fp32 allows accumulation-order differences over a
# few hundred terms; fp16/bf16 cover tensor-core dots on rounded operands.
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {"atol": 1e-10, "rtol": 1e-10},
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
    torch.bfloat16: {"atol": 1.6e-2, "rtol": 1.6e-2},
}

# Storage dtypes every op accepts for the corpus (each computed in fp32).
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Compare against the reference with the table's tolerance for ``dtype`` (in float64).

    Raises:
        AssertionError: the values differ by more than the tolerance (torch's message).
    """
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(
        actual.to(torch.float64), expected.to(torch.float64), atol=tol["atol"], rtol=tol["rtol"]
    )


def unit_rows(
    n: int,
    m: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """(n, m) random unit vectors (like projected embeddings), stored in ``dtype``.

    ``seed=None`` draws from torch's global generator, in float64 and in one piece (tests:
    ``torch.manual_seed`` replays them). A ``seed`` draws from a generator of its own on
    ``device``, in float32 slabs of at most 2^20 (CUDA) or 2^16 rows, so a multi-GB corpus
    needs no float32 copy of itself (benchmarks, GPU checks: the same rows on every run).
    ``out``: an (n, m) tensor to fill instead of allocating one.
    """
    device = torch.device(device)
    if seed is None:
        x = torch.randn(n, m, dtype=torch.float64)
        rows = (x / x.norm(dim=1, keepdim=True)).to(device=device, dtype=dtype)
        return rows if out is None else out.copy_(rows)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = torch.empty(n, m, dtype=dtype, device=device) if out is None else out
    slab = 1 << (20 if device.type == "cuda" else 16)
    for r0 in range(0, n, slab):
        rows = min(slab, n - r0)
        x = torch.randn(rows, m, generator=gen, device=device)
        out[r0 : r0 + rows] = F.normalize(x, dim=1)
    return out


class ScoringInputs(NamedTuple):
    """Inputs of :func:`imrnns_kernels.modulated_score` / ``modulated_topk`` (ids aside)."""

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
    """Random scoring inputs from torch's global generator, with trained-looking parameters:
    diagonal (sigmoid, tanh) transforms; affine W = I + noise; LayerNorm weight around 1 and
    bias around 0 (not the identity, which would hide terms). Corpus (n, m) unit rows in
    ``dtype``, b queries."""
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
