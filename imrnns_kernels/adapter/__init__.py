"""Document adapters: the HyperNet A_d over feedback documents, reduced without materialising.

For B queries with K feedback ids each into the projected corpus (N, m), normalised feedback
weights ``w^[b,k] = w[b,k] / sum_k w[b,k]`` (``1/K`` when none are given) and the document
HyperNet ``m -> h1 -> h2 -> OUT`` (official h1 = 128, h2 = 64)::

    h2[b,k] = relu(W2 relu(W1 corpus[ids[b,k]] + b1) + b2)          (h2,)
    T[b]    = sum_k w^[b,k] act(W3 h2[b,k] + b3)                     (OUT,)

with ``act = [sigmoid, tanh]`` on the two halves for ``diagonal`` (OUT = 2m) and the identity
for ``affine`` (OUT = m*m + m). The per-document outputs depend only on the document, so they
can be cached once per index (:func:`document_transforms`); for ``affine`` the output layer is
linear and the mean of outputs is exactly ``W3 mean(h2) + b3``, so the cache holds h2.

Implementations (chosen by :mod:`imrnns_kernels.dispatch`): :mod:`.triton` (fused kernels),
:mod:`.cpu` (chunked BLAS), :mod:`.reference` (the oracle, with :func:`.reference.hypernet`
and :func:`.reference.activate`). Every entry here validates its inputs first, then calls its
PyTorch custom operator (:mod:`.ops`, ``torch.ops.imrnns.*``), inside which the
implementation is chosen: ``torch.compile`` and ``torch.export`` trace these functions
without a graph break (docs/compile.md). Tested in tests/kernels/test_adapter_reduce.py,
test_properties.py and test_custom_ops.py.
"""

from __future__ import annotations

import torch

from imrnns_kernels import _validation as checks
from imrnns_kernels._runtime import import_dynamo_off_stack
from imrnns_kernels.adapter import ops
from imrnns_kernels.types import HyperNetWeights

__all__ = ["adapter_reduce", "corpus_transform", "document_transforms"]


def adapter_reduce(
    corpus: torch.Tensor,
    ids: torch.Tensor,
    weights: HyperNetWeights,
    feedback_weights: torch.Tensor | None = None,
    modulation: str = "diagonal",
    cache: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, OUT) weighted mean of ``act(A_d(corpus[ids]))`` over each query's feedback set.

    ``T[b] = sum_k w[b,k] act(A_d(corpus[ids[b,k]])) / sum_k w[b,k]`` (see the module
    docstring), never materialising (B, K, OUT) on the fused paths.

    Args:
        corpus: (N, m) projected documents, fp32/fp16/bf16 (computed in fp32).
        ids: (B, K) int32/int64 feedback ids in [0, N).
        weights: document HyperNet, input width m, output width OUT, one float dtype.
        feedback_weights: (B, K) non-negative finite weights with a positive row sum, or None
            for the uniform mean.
        modulation: ``"diagonal"`` (OUT = 2m) or ``"affine"`` (OUT = m*m + m).
        cache: optional per-document cache from :func:`document_transforms` ((N, OUT) for
            diagonal, (N, h2) for affine); the op is then a weighted gather-mean.

    Returns:
        (B, OUT) float32 (float64 for a float64 HyperNet). Differentiable with respect to the
        corpus, the feedback weights, the cache and the HyperNet weights.

    Raises:
        TypeError: non-tensor, non-float or non-integer arguments, mixed HyperNet dtypes.
        ValueError: an unknown modulation, mismatched widths or shapes, ids out of range,
            bad feedback weights, or several devices.
    """
    ops.check_reduce_args(corpus, ids, weights, feedback_weights, modulation, cache)
    # Traced, the value checks above were skipped: the operator runs them when it executes.
    import_dynamo_off_stack()
    return ops.adapter_reduce_op(
        corpus, ids, *weights, feedback_weights, modulation, cache, checks.tracing()
    )


def document_transforms(
    corpus: torch.Tensor,
    weights: HyperNetWeights,
    modulation: str = "diagonal",
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Per-document cache for :func:`adapter_reduce`: (N, OUT) ``act(A_d(d))`` for diagonal,
    (N, h2) last hidden states for affine (its mean is exact through the linear last layer).
    Compute once per index.

    Args:
        corpus: (N, m) projected documents, N > 0.
        weights: document HyperNet (input width m).
        modulation: ``"diagonal"`` or ``"affine"``.
        chunk_rows: rows per chunk of the CPU path (bounds its memory), or None.

    Returns:
        (N, OUT) or (N, h2), float32 (float64 for a float64 HyperNet); differentiable.

    Raises:
        TypeError / ValueError: as :func:`adapter_reduce`, an empty corpus, or a
            ``chunk_rows`` that is not a positive int.
    """
    ops.check_corpus_op_args(corpus, weights, modulation, chunk_rows)
    import_dynamo_off_stack()
    return ops.document_transforms_op(corpus, *weights, modulation, chunk_rows, checks.tracing())


def corpus_transform(
    corpus: torch.Tensor,
    weights: HyperNetWeights,
    modulation: str = "diagonal",
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Whole-corpus feedback: (OUT,) mean of ``act(A_d(d))`` over every row, chunked
    (compute once per index; never holds (N, OUT) on the fused paths).

    Args and errors as :func:`document_transforms`.

    Returns:
        (OUT,) float32 (float64 for a float64 HyperNet); differentiable.
    """
    ops.check_corpus_op_args(corpus, weights, modulation, chunk_rows)
    import_dynamo_off_stack()
    return ops.corpus_transform_op(corpus, *weights, modulation, chunk_rows, checks.tracing())
