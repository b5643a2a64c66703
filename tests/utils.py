"""Shared test helpers: the per-dtype tolerance table and small builders."""

from __future__ import annotations

import torch

# Tolerance by the dtype in which the compared values were *computed or stored* (FlagGems
# style). Scores are cosines in [-1, 1]; fp32 allows accumulation-order differences over a
# few hundred terms; fp16/bf16 cover tensor-core dots on rounded operands.
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {"atol": 1e-10, "rtol": 1e-10},
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
    torch.bfloat16: {"atol": 1.6e-2, "rtol": 1.6e-2},
}

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Compare against the reference with the table's tolerance for ``dtype``."""
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(
        actual.to(torch.float64), expected.to(torch.float64), atol=tol["atol"], rtol=tol["rtol"]
    )


def unit_rows(n: int, m: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """n random unit vectors of dim m (like projected embeddings), stored in ``dtype``."""
    x = torch.randn(n, m, dtype=torch.float64)
    return (x / x.norm(dim=1, keepdim=True)).to(dtype)
