"""The plain ops: projection and modulate-then-LayerNorm, validated.

Neither has a fused kernel: ``project`` is one GEMM and a row normalisation, and
``modulate_layernorm`` runs on (B, m) or (B, K, m) tensors that the scoring kernels never
need materialised. Their PyTorch implementation (:mod:`imrnns_kernels.plain.reference`)
serves every backend (:mod:`imrnns_kernels.dispatch`).

Not custom operators, on purpose: ``torch.compile`` and ``torch.export`` trace their PyTorch
code directly (inductor fuses the normalisation and the LayerNorm into their neighbours) and
autograd differentiates it as it stands; an opaque operator would hide both and need a
hand-written backward. While traced they skip the dispatcher (there is nothing to choose) and
run :mod:`imrnns_kernels.plain.reference` itself (docs/compile.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from imrnns_kernels import _validation as checks
from imrnns_kernels import dispatch
from imrnns_kernels._runtime import needs_grad
from imrnns_kernels.plain import reference

__all__ = ["modulate_layernorm", "project"]


def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Projection into the adapter's working space: ``p(x) = normalize(P x + p0)``.

    ``p = (P x + p0) / max(||P x + p0||_2, 1e-12)`` over the last dim (F.normalize's eps, as
    the official implementation).

    Args:
        x: (..., n) base-encoder embeddings, any float dtype (computed in ``weight``'s dtype).
        weight: (m, n) projection P (``nn.Linear`` layout).
        bias: (m,) offset p0, or None (cast to ``weight``'s dtype).

    Returns:
        (..., m) unit vectors in ``weight``'s dtype.

    Raises:
        TypeError: a non-tensor or non-float argument.
        ValueError: ``x``'s last dim is not n, ``bias`` is not (m,), or the tensors are on
            several devices.
    """
    checks.check_float("x", x)
    checks.check_float("weight", weight, 2)
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"x has last dim {x.shape[-1]} but the projection expects {weight.shape[1]} "
            f"(x {checks.describe(x)}, weight {checks.describe(weight)})"
        )
    if bias is not None:
        checks.check_float("bias", bias, 1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(
                f"bias must have shape ({weight.shape[0]},) to match weight "
                f"{checks.describe(weight)}, got {checks.describe(bias)}"
            )
    checks.check_same_device(x=x, weight=weight, bias=bias)
    fn = _implementation("project", x.device, needs_grad(x, weight, bias))
    # x is computed in the projection's dtype; so is the bias (F.linear needs one dtype).
    return fn(x.to(weight.dtype), weight, None if bias is None else bias.to(weight.dtype))


def modulate_layernorm(
    x: torch.Tensor,
    transform: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    modulation: str,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``LN(T(x))``: one transform per batch row, then LayerNorm over the last dim.

    ``diagonal``: ``transform = [s, b]`` (OUT = 2m), ``T(x) = x * s + b``; ``affine``:
    ``transform = [vec(W), b]`` (OUT = m*m + m, W row-major (m, m)), ``T(x) = W x + b``.
    LayerNorm uses the biased variance, as torch: ``(y - mean) / sqrt(var + eps) * g + beta``.

    Args:
        x: (B, m) or (B, K, m).
        transform: (B, OUT).
        ln_weight, ln_bias: (m,) LayerNorm parameters g, beta.
        modulation: ``"diagonal"`` or ``"affine"``.
        eps: LayerNorm epsilon.

    Returns:
        Same shape as ``x``, in the promoted dtype of ``x`` and ``transform`` (a half-precision
        model's fp16 p(q) with adapter_reduce's float32 transform computes in float32).

    Raises:
        TypeError: a non-tensor or non-float argument.
        ValueError: an unknown modulation, mismatched shapes, or several devices.
    """
    checks.check_modulation(modulation)
    checks.check_float("x", x, (2, 3))
    m = x.shape[-1]
    checks.check_transform("transform", transform, x.shape[0], m, modulation)
    checks.check_layernorm(ln_weight, ln_bias, m)
    checks.check_same_device(x=x, transform=transform, ln_weight=ln_weight)
    # Mixed dtypes failed inside einsum / F.layer_norm: compute T(x) in the promoted dtype of
    # x and transform, with the LayerNorm parameters in it too unless they are the float32
    # parameters that F.layer_norm accepts for fp16/bf16 input.
    dtype = torch.promote_types(x.dtype, transform.dtype)
    x, transform = x.to(dtype), transform.to(dtype)
    mixed_ok = dtype in (torch.float16, torch.bfloat16) and ln_weight.dtype == torch.float32
    if ln_weight.dtype != ln_bias.dtype or (ln_weight.dtype != dtype and not mixed_ok):
        ln_weight, ln_bias = ln_weight.to(dtype), ln_bias.to(dtype)
    grad = needs_grad(x, transform, ln_weight, ln_bias)
    fn = _implementation("modulate_layernorm", x.device, grad)
    return fn(x, transform, ln_weight, ln_bias, modulation, eps)


def _implementation(op: str, device: torch.device, grad: bool) -> Callable[..., Any]:
    # The dispatcher reads the environment and imports modules: not traceable, and a plain
    # op has only its PyTorch code to run anyway.
    if checks.tracing():
        return getattr(reference, op)
    return dispatch.implementation(op, device, grad).function
