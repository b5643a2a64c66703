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
validates its inputs first, then calls its PyTorch custom operator (:mod:`.ops`,
``torch.ops.imrnns.*``), inside which the implementation is chosen: ``torch.compile`` and
``torch.export`` trace these functions without a graph break (docs/compile.md). Tested in
tests/kernels/test_modulated_score.py, test_modulated_topk.py, test_workspace.py and
test_custom_ops.py.
"""

from __future__ import annotations

import torch

from imrnns_kernels import _validation as checks
from imrnns_kernels._runtime import import_dynamo_off_stack
from imrnns_kernels.scoring import ops

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
    ops.check_score_args(corpus, ids, transform, ln_weight, ln_bias, queries, modulation)
    # Traced, the value checks above were skipped: the operator runs them when it executes.
    validate = checks.tracing()
    import_dynamo_off_stack()
    return ops.modulated_score_op(
        corpus, ids, transform, ln_weight, ln_bias, queries, modulation, eps, validate
    )


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
    ops.check_topk_args(
        corpus, transform, ln_weight, ln_bias, queries, k, modulation, workspace_bytes
    )
    import_dynamo_off_stack()
    return ops.modulated_topk_op(
        corpus,
        transform,
        ln_weight,
        ln_bias,
        queries,
        k,
        modulation,
        eps,
        workspace_bytes,
        checks.tracing(),
    )
