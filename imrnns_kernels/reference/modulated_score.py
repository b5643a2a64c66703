"""Candidate scoring: ``cos(q~_b, LN(T_b(corpus[ids[b,k]])))``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from imrnns_kernels.reference.modulate import modulate_layernorm
from imrnns_kernels.reference.projection import NORMALIZE_EPS


def modulated_score(
    corpus: torch.Tensor,
    ids: torch.Tensor,
    transform: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    queries: torch.Tensor,
    modulation: str = "diagonal",
    eps: float = 1e-5,
) -> torch.Tensor:
    """Score each query's candidates after query-conditioned document modulation.

    ``score[b, k] = <normalize(q~_b), normalize(LN(T_b(d_{ids[b,k]})))>``, normalize with
    eps 1e-12 as ``F.normalize`` (the official implementation's cosine).

    Args:
        corpus: (N, m) projected documents, fp32/fp16/bf16 (computed in fp32).
        ids: (B, K) candidate ids into ``corpus``.
        transform: (B, OUT) query-side transform ``act(A_q(p(q)))``.
        ln_weight, ln_bias: (m,) document LayerNorm parameters.
        queries: (B, m) modulated queries ``q~``.
        modulation: ``"diagonal"`` or ``"affine"``.
        eps: LayerNorm epsilon.

    Returns:
        (B, K) float32 cosine scores.
    """
    dtype = torch.promote_types(transform.dtype, torch.float32)
    docs = corpus[ids.long()].to(dtype)
    # LayerNorm parameters in the compute dtype too, as the fused paths (fp16/bf16 ones from a
    # half-precision model made F.layer_norm fail on float32 rows).
    d_tilde = modulate_layernorm(
        docs, transform.to(dtype), ln_weight.to(dtype), ln_bias.to(dtype), modulation, eps
    )
    d_hat = F.normalize(d_tilde, p=2, dim=-1, eps=NORMALIZE_EPS)
    q_hat = F.normalize(queries.to(dtype), p=2, dim=-1, eps=NORMALIZE_EPS)
    return torch.einsum("bm,bkm->bk", q_hat, d_hat).float()
