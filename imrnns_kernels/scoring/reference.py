"""Candidate scoring and exhaustive top-k in plain PyTorch: the oracle of the scoring family.

Written for clarity, not speed: :func:`modulated_score` materialises the modulated candidates
(B, K, m) and :func:`modulated_topk` the (B, N) score matrix and the (B, N, m) modulated
corpus. Same signatures as the fused implementations in :mod:`imrnns_kernels.scoring.cpu`
and :mod:`imrnns_kernels.scoring.triton`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from imrnns_kernels._runtime import NORMALIZE_EPS, compute_dtype
from imrnns_kernels.plain.reference import modulate_layernorm
from imrnns_kernels.topk import merge_topk


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
    dtype = compute_dtype(transform.dtype)
    docs = corpus[ids.long()].to(dtype)
    # LayerNorm parameters in the compute dtype too, as the fused paths (fp16/bf16 ones from a
    # half-precision model made F.layer_norm fail on float32 rows).
    d_tilde = modulate_layernorm(
        docs, transform.to(dtype), ln_weight.to(dtype), ln_bias.to(dtype), modulation, eps
    )
    d_hat = F.normalize(d_tilde, p=2, dim=-1, eps=NORMALIZE_EPS)
    q_hat = F.normalize(queries.to(dtype), p=2, dim=-1, eps=NORMALIZE_EPS)
    return torch.einsum("bm,bkm->bk", q_hat, d_hat).float()


def modulated_topk(
    corpus: torch.Tensor,
    transform: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    modulation: str = "diagonal",
    eps: float = 1e-5,
    workspace_bytes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k over every corpus row of the modulated cosine score.

    The score of document i for query b is the one :func:`modulated_score` gives. This
    reference materialises the (B, N) score matrix and the (B, N, m) modulated corpus.

    Args:
        corpus: (N, m) projected documents, fp32/fp16/bf16.
        transform: (B, OUT) query-side transforms.
        ln_weight, ln_bias: (m,) document LayerNorm parameters.
        queries: (B, m) modulated queries.
        k: results per query; k > N pads with ``-inf`` / ``-1``.
        workspace_bytes: accepted for the common signature and ignored: the oracle
            materialises (B, N, m) on purpose.

    Returns:
        (scores (B, k) float32, ids (B, k) int64), best first, ties by lower id.
    """
    b, n = queries.shape[0], corpus.shape[0]
    ids = torch.arange(n, device=corpus.device).expand(b, n)
    scores = modulated_score(corpus, ids, transform, ln_weight, ln_bias, queries, modulation, eps)
    return merge_topk(scores, ids, k)
