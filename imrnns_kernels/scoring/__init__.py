"""Modulated cosine scoring: a rerank of candidate ids, or an exhaustive top-k of the corpus.

For query b with transform ``T_b`` (``diagonal``: ``[s, b]``, ``T(d) = d * s + b``;
``affine``: ``[vec(W), b]``, ``T(d) = W d + b``), document LayerNorm ``(g, beta, eps)`` and
modulated query ``q~_b``, the score of document d is::

    d~ = LN(T_b(d)) = (y - mean(y)) / sqrt(var(y) + eps) * g + beta,   y = T_b(d)
    score = <q~_b / max(||q~_b||, 1e-12), d~ / max(||d~||, 1e-12)>

(biased variance, F.normalize's eps: the official implementation's cosine).

- :func:`modulated_score`: the (B, K) scores of each query's candidate ids (``mode="rerank"``).
- :func:`modulated_topk`: the k best of all N documents per query (``mode="exhaustive"``),
  streaming over the corpus, ties by lower id.

Implementations (chosen by :mod:`imrnns_kernels.dispatch`): :mod:`.triton` (fused kernels
and :class:`.triton.ModulatedScoreFunction`), :mod:`.cpu` (chunked BLAS), :mod:`.reference`
(the oracle); the one-pass algebra both fast paths use is :mod:`.moments`. Every entry here
validates its inputs first. Tested in tests/test_modulated_score.py,
tests/test_modulated_topk.py and tests/test_workspace.py.
"""

from __future__ import annotations

import torch

from imrnns_kernels import _validation as checks
from imrnns_kernels import dispatch
from imrnns_kernels._runtime import needs_grad

__all__ = ["modulated_score", "modulated_topk"]


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
    """(B, K) float32 modulated cosine of each query's candidates (module docstring).

    Args:
        corpus: (N, m) projected documents, fp32/fp16/bf16 (computed in fp32).
        ids: (B, K) int32/int64 candidate ids in [0, N); duplicates allowed.
        transform: (B, OUT) query-side transforms (OUT = 2m diagonal, m*m + m affine).
        ln_weight, ln_bias: (m,) document LayerNorm parameters.
        queries: (B, m) modulated queries.
        modulation: ``"diagonal"`` or ``"affine"``.
        eps: LayerNorm epsilon.

    Returns:
        (B, K) float32 scores, differentiable with respect to every float input.

    Raises:
        TypeError: non-tensor, non-float or non-integer arguments.
        ValueError: an unknown modulation, mismatched shapes, ids out of range, NaN/Inf in
            the queries, transform or LayerNorm parameters, or several devices.
    """
    _check_scoring(corpus, transform, ln_weight, ln_bias, queries, modulation)
    checks.check_ids("ids", ids, corpus.shape[0])
    if ids.shape[0] != queries.shape[0]:
        raise ValueError(
            f"ids has {ids.shape[0]} rows but there are {queries.shape[0]} queries "
            f"(ids {checks.describe(ids)}, queries {checks.describe(queries)})"
        )
    checks.check_same_device(corpus=corpus, ids=ids)
    grad = needs_grad(corpus, transform, ln_weight, ln_bias, queries)
    fn = dispatch.implementation("modulated_score", corpus.device, grad).function
    return fn(corpus, ids, transform, ln_weight, ln_bias, queries, modulation, eps)


def modulated_topk(
    corpus: torch.Tensor,
    transform: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    modulation: str = "diagonal",
    eps: float = 1e-5,
    *,
    workspace_bytes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exhaustive top-k: ((B, k) float32 scores, (B, k) int64 ids), best first, ties by lower
    id, padded with ``-inf`` / ``-1`` when k > N. Not differentiable (search is inference).

    Args:
        corpus: (N, m) projected documents, N > 0, fp32/fp16/bf16.
        transform, ln_weight, ln_bias, queries, modulation, eps: as :func:`modulated_score`.
        k: results per query, a positive int.
        workspace_bytes: upper bound, in bytes, on the extra memory the call allocates on top
            of its inputs (all worker threads together: chunk buffers, converted rows,
            query-side tensors, running top-k states, outputs). The CPU path derives its
            worker count and chunk size from it; the Triton path sizes its (B, chunk) score
            buffer from it (its other device memory is O(B x m) for diagonal, O(B x m^2)
            for affine, plus the (B, k) top-k); the reference materialises (B, N, m) and
            ignores it. None: each backend's default (CPU: about 15% of the corpus bytes).
            Results do not depend on it.

    Raises:
        TypeError: as :func:`modulated_score`, a non-int ``k`` or ``workspace_bytes``.
        ValueError: as :func:`modulated_score`, ``k <= 0``, an empty corpus, or a
            ``workspace_bytes`` that is not positive or too small for even one worker with a
            minimal chunk (the message names the minimum).
    """
    _check_scoring(corpus, transform, ln_weight, ln_bias, queries, modulation)
    checks.check_k(k)
    if corpus.shape[0] == 0:
        raise ValueError(f"corpus is empty ({checks.describe(corpus)})")
    checks.check_workspace_bytes(workspace_bytes)
    fn = dispatch.implementation("modulated_topk", corpus.device, needs_grad=False).function
    if workspace_bytes is None:  # implementations registered without the argument still work
        return fn(corpus, transform, ln_weight, ln_bias, queries, k, modulation, eps)
    return fn(
        corpus,
        transform,
        ln_weight,
        ln_bias,
        queries,
        k,
        modulation,
        eps,
        workspace_bytes=workspace_bytes,
    )


def _check_scoring(
    corpus: torch.Tensor,
    transform: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    queries: torch.Tensor,
    modulation: str,
) -> None:
    checks.check_modulation(modulation)
    checks.check_float("corpus", corpus, 2)
    checks.check_float("queries", queries, 2)
    m = corpus.shape[1]
    if queries.shape[1] != m:
        raise ValueError(
            f"queries dim {queries.shape[1]} does not match corpus dim {m} "
            f"(queries {checks.describe(queries)}, corpus {checks.describe(corpus)})"
        )
    checks.check_transform("transform", transform, queries.shape[0], m, modulation)
    checks.check_layernorm(ln_weight, ln_bias, m)
    checks.check_same_device(
        corpus=corpus, transform=transform, queries=queries, ln_weight=ln_weight, ln_bias=ln_bias
    )
    # The corpus is checked for NaN/Inf once when it enters an index, not on every search:
    # a scan of a multi-GB corpus per query would cost as much as the search itself.
    checks.check_all_finite(
        queries=queries, transform=transform, ln_weight=ln_weight, ln_bias=ln_bias
    )
