"""Input checks shared by every public op.

Every public entry point validates before it launches anything, so a bad call fails with a
message that names the argument, its shape and its dtype instead of a silent wrong score or
an out-of-bounds read inside a kernel.

Two kinds of check. *Static* checks read only types, ranks, shapes, dtypes and devices: they
run always, also while ``torch.compile`` / ``torch.export`` trace a caller (so a compiled
call fails at trace time with the eager message). *Value* checks read the data (NaN/Inf
scans, the id range, feedback-weight signs and sums) and need a host sync: they are skipped
while tracing (the tensors are fake and a sync would break the graph) and while a CUDA graph
captures the tensors' stream (a sync is illegal there); :func:`values_readable` says when
they run. The registered ops (``torch.ops.imrnns.*``) run every check again when they
execute, so a compiled call still gets them: see docs/compile.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

MODULATIONS = ("diagonal", "affine")


def tracing() -> bool:
    """True while ``torch.compile`` or ``torch.export`` traces the caller (fake tensors)."""
    return torch.compiler.is_compiling()


def values_readable(t: torch.Tensor) -> bool:
    """Whether a check may read ``t``'s values on the host now: not while tracing (fake
    tensors hold no data; a ``.item()`` would break the graph) and not while a CUDA graph is
    being captured on the current stream (a host sync raises there)."""
    if tracing():
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def describe(t: torch.Tensor) -> str:
    """Short human description: shape, dtype and device."""
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_float(name: str, t: object, ndim: int | Sequence[int] | None = None) -> torch.Tensor:
    """A floating-point tensor of the given rank(s)."""
    t = check_tensor(name, t)
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {describe(t)}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(str(a) for a in allowed)
            raise ValueError(f"{name} must have rank {want}, got {describe(t)}")
    return t


def check_ids(name: str, ids: object, num_rows: int) -> torch.Tensor:
    """A (B, K) integer id table with every entry in [0, num_rows)."""
    ids = check_tensor(name, ids)
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {describe(ids)}")
    if ids.dim() != 2:
        raise ValueError(f"{name} must have shape (B, K), got {describe(ids)}")
    if ids.shape[1] == 0:
        raise ValueError(f"{name} is an empty candidate set: {describe(ids)}")
    if ids.numel() > 0 and values_readable(ids):
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= num_rows:
            raise ValueError(
                f"{name} holds ids in [{lo}, {hi}], outside the corpus of {num_rows} rows"
            )
    return ids


def check_finite(name: str, t: torch.Tensor) -> None:
    """Reject NaN/Inf: they would propagate into every score that touches them (a value
    check: see :func:`values_readable`)."""
    if t.numel() and values_readable(t) and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name} contains {bad} NaN/Inf values ({describe(t)})")


def check_all_finite(**tensors: torch.Tensor) -> None:
    """:func:`check_finite` of each tensor (all on one device) with one host sync, not one
    per tensor: a GPU call's inputs are checked without stalling the stream four times."""
    if not all(values_readable(t) for t in tensors.values()):
        return
    flags = [torch.isfinite(t).all() for t in tensors.values() if t.numel()]
    if flags and not bool(torch.stack(flags).all()):
        for name, t in tensors.items():
            check_finite(name, t)  # the first offender, with its count


def check_modulation(modulation: str) -> str:
    if modulation not in MODULATIONS:
        raise ValueError(f"modulation must be one of {MODULATIONS}, got {modulation!r}")
    return modulation


def transform_dim(dim: int, modulation: str) -> int:
    """Width OUT of a transform vector: 2m (diagonal: scale, bias) or m*m + m (affine: W, b)."""
    check_modulation(modulation)
    return 2 * dim if modulation == "diagonal" else dim * dim + dim


def dim_from_transform(out: int, modulation: str) -> int:
    """Working dim m from a transform width OUT (2m or m*m + m): the inverse of
    :func:`transform_dim`.

    Raises:
        ValueError: ``out`` is not a width of ``modulation``.
    """
    if modulation == "diagonal":
        if out % 2:
            raise ValueError(f"diagonal transform width must be even (2m), got {out}")
        return out // 2
    m = int((math.isqrt(1 + 4 * out) - 1) // 2)
    if m * m + m != out:
        raise ValueError(f"affine transform width must be m*m + m, got {out}")
    return m


def check_transform(name: str, transform: object, batch: int, dim: int, modulation: str) -> None:
    t = check_float(name, transform, 2)
    out = transform_dim(dim, modulation)
    if t.shape != (batch, out):
        raise ValueError(
            f"{name} must have shape ({batch}, {out}) for {modulation} modulation at dim {dim}, "
            f"got {describe(t)}"
        )


def check_layernorm(ln_weight: object, ln_bias: object, dim: int) -> None:
    """LayerNorm parameters: two floating-point (dim,) tensors."""
    for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        t = check_float(name, t, 1)
        if t.shape[0] != dim:
            raise ValueError(f"{name} must have shape ({dim},), got {describe(t)}")


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"tensors must be on one device, got {listing}")
    return next(iter(devices))


def check_weights(name: str, weights: object, shape: tuple[int, int]) -> torch.Tensor:
    """Non-negative finite (B, K) weights with a positive sum per row (the values are
    checked when :func:`values_readable`)."""
    w = check_float(name, weights, 2)
    if tuple(w.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {describe(w)}")
    if not values_readable(w):
        return w
    check_finite(name, w)
    if bool((w < 0).any()):
        raise ValueError(f"{name} must be non-negative ({describe(w)})")
    if bool((w.sum(dim=1) <= 0).any()):
        rows = torch.nonzero(w.sum(dim=1) <= 0).flatten().tolist()[:8]
        raise ValueError(f"{name} rows {rows} sum to zero: a weighted mean is undefined")
    # The ops normalise by the row sum in (at least) float32: a sum that overflows there
    # gave zeros (reference) or garbage (fused paths) without an error.
    sums = w.to(torch.promote_types(w.dtype, torch.float32)).sum(dim=1)
    if not bool(torch.isfinite(sums).all()):
        rows = torch.nonzero(~torch.isfinite(sums)).flatten().tolist()[:8]
        raise ValueError(
            f"{name} rows {rows} sum to more than float32 can hold ({describe(w)}): rescale them"
        )
    return w


def check_k(k: object) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    return k


def check_workspace_bytes(workspace_bytes: object) -> int | None:
    """``workspace_bytes`` as given when it is None or a positive int; else raise.

    Raises:
        TypeError: not an int (bool, float and numpy scalars are refused: a float budget is
            usually a MiB figure passed by mistake).
        ValueError: zero or negative.
    """
    if workspace_bytes is None:
        return None
    if isinstance(workspace_bytes, bool) or not isinstance(workspace_bytes, int):
        raise TypeError(
            f"workspace_bytes must be a positive int (bytes) or None, got "
            f"{type(workspace_bytes).__name__} {workspace_bytes!r}"
        )
    if workspace_bytes <= 0:
        raise ValueError(f"workspace_bytes must be a positive int (bytes), got {workspace_bytes}")
    return workspace_bytes
