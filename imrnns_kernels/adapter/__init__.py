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
and :func:`.reference.activate`). Every entry here validates its inputs first. Tested in
tests/test_adapter_reduce.py and tests/test_properties.py.
"""

from __future__ import annotations

import torch

from imrnns_kernels import _validation as checks
from imrnns_kernels import dispatch
from imrnns_kernels._runtime import needs_grad
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
    checks.check_modulation(modulation)
    checks.check_float("corpus", corpus, 2)
    n, m = corpus.shape
    checks.check_ids("ids", ids, n)
    _check_hypernet(weights, m, modulation)
    if feedback_weights is not None:
        checks.check_weights("feedback_weights", feedback_weights, tuple(ids.shape))
    if cache is not None:
        _check_adapter_cache(cache, n, weights, modulation)
    checks.check_same_device(
        corpus=corpus, ids=ids, w1=weights.w1, feedback_weights=feedback_weights, cache=cache
    )
    grad = needs_grad(corpus, feedback_weights, cache, *weights)
    fn = dispatch.implementation("adapter_reduce", corpus.device, grad).function
    if cache is None:
        return fn(corpus, ids, weights, feedback_weights, modulation)
    return fn(corpus, ids, weights, feedback_weights, modulation, cache=cache)


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
    _check_corpus_op(corpus, weights, modulation, chunk_rows)
    grad = needs_grad(corpus, *weights)
    fn = dispatch.implementation("document_transforms", corpus.device, grad).function
    return fn(corpus, weights, modulation, chunk_rows)


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
    _check_corpus_op(corpus, weights, modulation, chunk_rows)
    grad = needs_grad(corpus, *weights)
    fn = dispatch.implementation("corpus_transform", corpus.device, grad).function
    return fn(corpus, weights, modulation, chunk_rows)


def _check_hypernet(weights: HyperNetWeights, dim: int, modulation: str) -> None:
    if not isinstance(weights, HyperNetWeights):
        raise TypeError(f"weights must be a HyperNetWeights, got {type(weights).__name__}")
    for name, t in zip(weights._fields, weights, strict=True):
        checks.check_float(f"weights.{name}", t, 2 if name.startswith("w") else 1)
    dtypes = {t.dtype for t in weights}
    if len(dtypes) > 1:
        # The reference (and so every training call) would fail inside F.linear, while the
        # fused paths silently computed in float32: one dtype for all six, said plainly.
        listing = ", ".join(f"{n} {t.dtype}" for n, t in zip(weights._fields, weights, strict=True))
        raise TypeError(f"HyperNet weights must share one dtype, got {listing}")
    if weights.in_dim != dim:
        raise ValueError(
            f"HyperNet input width {weights.in_dim} does not match corpus dim {dim} "
            f"(weights.w1 {checks.describe(weights.w1)})"
        )
    out = checks.transform_dim(dim, modulation)
    if weights.out_dim != out:
        raise ValueError(
            f"HyperNet output width {weights.out_dim} does not match {modulation} modulation "
            f"at dim {dim} (expected {out}; weights.w3 {checks.describe(weights.w3)})"
        )


def _check_adapter_cache(
    cache: torch.Tensor, n: int, weights: HyperNetWeights, modulation: str
) -> None:
    checks.check_float("cache", cache, 2)
    if modulation == "diagonal":
        width, what = weights.out_dim, "activated per-document outputs (N, OUT)"
    else:
        width, what = int(weights.w3.shape[1]), "per-document hidden states (N, h2)"
    if tuple(cache.shape) != (n, width):
        raise ValueError(
            f"cache must hold the {what} of document_transforms for {modulation} modulation: "
            f"shape ({n}, {width}), got {checks.describe(cache)}"
        )


def _check_corpus_op(
    corpus: torch.Tensor, weights: HyperNetWeights, modulation: str, chunk_rows: int | None
) -> None:
    checks.check_modulation(modulation)
    checks.check_float("corpus", corpus, 2)
    if corpus.shape[0] == 0:
        raise ValueError(f"corpus is empty ({checks.describe(corpus)})")
    _check_hypernet(weights, corpus.shape[1], modulation)
    if chunk_rows is not None:
        if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows <= 0:
            raise ValueError(f"chunk_rows must be a positive int or None, got {chunk_rows!r}")
    checks.check_same_device(corpus=corpus, w1=weights.w1)
