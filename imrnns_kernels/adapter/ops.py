"""The adapter family as PyTorch custom operators: ``torch.ops.imrnns.adapter_reduce``,
``document_transforms``, ``corpus_transform`` and their backward ``adapter_backward``.

As in :mod:`imrnns_kernels.scoring.ops`: each operator is one node of known output shape to
``torch.compile`` / ``torch.export``; the implementation is chosen by
:mod:`imrnns_kernels.dispatch` when it executes on real tensors; ``validate=True`` (what a
traced call records) runs every input check of the public function then, value checks
included. The HyperNet goes in as its six tensors (operators take tensors, not tuples).

Gradients: the builtin CPU and Triton implementations carry the family's analytic backward
(:func:`imrnns_kernels.adapter.cpu.adapter_backward`, plain PyTorch on any device), run by
``torch.ops.imrnns.adapter_backward``; ``document_transforms`` and ``corpus_transform`` are
differentiated as ``adapter_reduce`` over ids ``arange(N)`` shaped (N, 1) and (1, N). Any
other implementation (the reference, a registered function) is recomputed under autograd in
the backward pass.
"""

from __future__ import annotations

from typing import Any

import torch

from imrnns_kernels import _validation as checks
from imrnns_kernels import dispatch
from imrnns_kernels._runtime import compute_dtype
from imrnns_kernels.scoring.ops import needs_input_grad, recompute_grads
from imrnns_kernels.types import HyperNetWeights

__all__ = [
    "adapter_backward_op",
    "adapter_reduce_op",
    "check_corpus_op_args",
    "check_reduce_args",
    "corpus_transform_op",
    "document_transforms_op",
]

_Tensor = torch.Tensor


# ----------------------------------------------------------------------------- validation
def check_reduce_args(
    corpus: torch.Tensor,
    ids: torch.Tensor,
    weights: HyperNetWeights,
    feedback_weights: torch.Tensor | None,
    modulation: str,
    cache: torch.Tensor | None,
) -> None:
    """Every check of :func:`imrnns_kernels.adapter_reduce` (value checks only when
    :func:`imrnns_kernels._validation.values_readable`)."""
    checks.check_modulation(modulation)
    checks.check_float("corpus", corpus, 2)
    n, m = corpus.shape
    checks.check_ids("ids", ids, n)
    check_hypernet(weights, m, modulation)
    if feedback_weights is not None:
        checks.check_weights("feedback_weights", feedback_weights, tuple(ids.shape))
    if cache is not None:
        _check_adapter_cache(cache, n, weights, modulation)
    checks.check_same_device(
        corpus=corpus, ids=ids, w1=weights.w1, feedback_weights=feedback_weights, cache=cache
    )


def check_corpus_op_args(
    corpus: torch.Tensor, weights: HyperNetWeights, modulation: str, chunk_rows: int | None
) -> None:
    """Every check of :func:`imrnns_kernels.document_transforms` and ``corpus_transform``."""
    checks.check_modulation(modulation)
    checks.check_float("corpus", corpus, 2)
    if corpus.shape[0] == 0:
        raise ValueError(f"corpus is empty ({checks.describe(corpus)})")
    check_hypernet(weights, corpus.shape[1], modulation)
    if chunk_rows is not None:
        if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows <= 0:
            raise ValueError(f"chunk_rows must be a positive int or None, got {chunk_rows!r}")
    checks.check_same_device(corpus=corpus, w1=weights.w1)


def check_hypernet(weights: HyperNetWeights, dim: int, modulation: str) -> None:
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


# ----------------------------------------------------------------------------- operators
@torch.library.custom_op("imrnns::adapter_reduce", mutates_args=())
def adapter_reduce_op(
    corpus: _Tensor,
    ids: _Tensor,
    w1: _Tensor,
    b1: _Tensor,
    w2: _Tensor,
    b2: _Tensor,
    w3: _Tensor,
    b3: _Tensor,
    feedback_weights: _Tensor | None,
    modulation: str,
    cache: _Tensor | None = None,
    validate: bool = True,
) -> _Tensor:
    """(B, OUT): :func:`imrnns_kernels.adapter_reduce` as an operator."""
    weights = HyperNetWeights(w1, b1, w2, b2, w3, b3)
    if validate:
        check_reduce_args(corpus, ids, weights, feedback_weights, modulation, cache)
    fn = dispatch.implementation("adapter_reduce", corpus.device).function
    with torch.no_grad():
        if cache is None:
            out = fn(corpus, ids, weights, feedback_weights, modulation)
        else:
            out = fn(corpus, ids, weights, feedback_weights, modulation, cache=cache)
    return out.contiguous()  # the layout the fake promises


@adapter_reduce_op.register_fake
def _adapter_reduce_fake(
    corpus: _Tensor,
    ids: _Tensor,
    w1: _Tensor,
    b1: _Tensor,
    w2: _Tensor,
    b2: _Tensor,
    w3: _Tensor,
    b3: _Tensor,
    feedback_weights: _Tensor | None,
    modulation: str,
    cache: _Tensor | None = None,
    validate: bool = True,
) -> _Tensor:
    return corpus.new_empty((ids.shape[0], w3.shape[0]), dtype=compute_dtype(w1.dtype))


@torch.library.custom_op("imrnns::document_transforms", mutates_args=())
def document_transforms_op(
    corpus: _Tensor,
    w1: _Tensor,
    b1: _Tensor,
    w2: _Tensor,
    b2: _Tensor,
    w3: _Tensor,
    b3: _Tensor,
    modulation: str,
    chunk_rows: int | None = None,
    validate: bool = True,
) -> _Tensor:
    """(N, OUT) or (N, h2): :func:`imrnns_kernels.document_transforms` as an operator."""
    weights = HyperNetWeights(w1, b1, w2, b2, w3, b3)
    if validate:
        check_corpus_op_args(corpus, weights, modulation, chunk_rows)
    fn = dispatch.implementation("document_transforms", corpus.device).function
    with torch.no_grad():
        return fn(corpus, weights, modulation, chunk_rows).contiguous()


@document_transforms_op.register_fake
def _document_transforms_fake(
    corpus: _Tensor,
    w1: _Tensor,
    b1: _Tensor,
    w2: _Tensor,
    b2: _Tensor,
    w3: _Tensor,
    b3: _Tensor,
    modulation: str,
    chunk_rows: int | None = None,
    validate: bool = True,
) -> _Tensor:
    width = w3.shape[1] if modulation == "affine" else w3.shape[0]
    return corpus.new_empty((corpus.shape[0], width), dtype=compute_dtype(w1.dtype))


@torch.library.custom_op("imrnns::corpus_transform", mutates_args=())
def corpus_transform_op(
    corpus: _Tensor,
    w1: _Tensor,
    b1: _Tensor,
    w2: _Tensor,
    b2: _Tensor,
    w3: _Tensor,
    b3: _Tensor,
    modulation: str,
    chunk_rows: int | None = None,
    validate: bool = True,
) -> _Tensor:
    """(OUT,): :func:`imrnns_kernels.corpus_transform` as an operator."""
    weights = HyperNetWeights(w1, b1, w2, b2, w3, b3)
    if validate:
        check_corpus_op_args(corpus, weights, modulation, chunk_rows)
    fn = dispatch.implementation("corpus_transform", corpus.device).function
    with torch.no_grad():
        return fn(corpus, weights, modulation, chunk_rows).contiguous()


@corpus_transform_op.register_fake
def _corpus_transform_fake(
    corpus: _Tensor,
    w1: _Tensor,
    b1: _Tensor,
    w2: _Tensor,
    b2: _Tensor,
    w3: _Tensor,
    b3: _Tensor,
    modulation: str,
    chunk_rows: int | None = None,
    validate: bool = True,
) -> _Tensor:
    return corpus.new_empty((w3.shape[0],), dtype=compute_dtype(w1.dtype))


# ----------------------------------------------------------------------------- backward
@torch.library.custom_op("imrnns::adapter_backward", mutates_args=())
def adapter_backward_op(
    grad: _Tensor,
    corpus: _Tensor,
    ids: _Tensor,
    w1: _Tensor,
    b1: _Tensor,
    w2: _Tensor,
    b2: _Tensor,
    w3: _Tensor,
    b3: _Tensor,
    feedback_weights: _Tensor | None,
    cache: _Tensor | None,
    modulation: str,
    op: str,
    backend: str,
    hidden_output: bool,
    needs: list[bool],
) -> list[_Tensor]:
    """The analytic backward of ``op``'s ``backend`` implementation: the gradients for
    (corpus, feedback_weights, cache, w1, b1, w2, b2, w3, b3), each in its input's dtype;
    an empty (0,) tensor where ``needs`` is False (or the output does not depend on it)."""
    weights = HyperNetWeights(w1, b1, w2, b2, w3, b3)
    backward = dispatch.backend_function(op, backend).backward
    grads = backward(
        grad, corpus, ids, weights, feedback_weights, cache, modulation, tuple(needs),
        hidden_output,
    )  # fmt: skip
    return [corpus.new_empty(0) if g is None else g.contiguous() for g in grads]


@adapter_backward_op.register_fake
def _adapter_backward_fake(
    grad: _Tensor,
    corpus: _Tensor,
    ids: _Tensor,
    w1: _Tensor,
    b1: _Tensor,
    w2: _Tensor,
    b2: _Tensor,
    w3: _Tensor,
    b3: _Tensor,
    feedback_weights: _Tensor | None,
    cache: _Tensor | None,
    modulation: str,
    op: str,
    backend: str,
    hidden_output: bool,
    needs: list[bool],
) -> list[_Tensor]:
    inputs = (corpus, feedback_weights, cache, w1, b1, w2, b2, w3, b3)
    return [
        t.new_empty(t.shape) if need and t is not None else corpus.new_empty(0)
        for t, need in zip(inputs, _returned(needs, cache is not None, modulation), strict=True)
    ]


def _returned(needs: list[bool], cached: bool, modulation: str) -> list[bool]:
    """Which of the nine gradients :func:`adapter_backward_op` returns: those asked for,
    less those the output does not depend on (with a cache: the corpus and the first two
    layers, and the output layer for diagonal)."""
    if not cached:
        return list(needs)
    depends = [False, True, True, False, False, False, False]
    depends += [modulation == "affine"] * 2
    return [need and dep for need, dep in zip(needs, depends, strict=True)]


def _setup(
    op: str,
    ctx: Any,
    corpus: _Tensor,
    ids: _Tensor | None,
    fw: _Tensor | None,
    cache: _Tensor | None,
    params: list[_Tensor],
    **extra: Any,
) -> None:
    """Save what the backward needs, and the implementation the forward ran (chosen again
    here, in the same context; under tracing, when the graph is traced)."""
    ctx.save_for_backward(corpus, ids, fw, cache, *params)
    ctx.extra = extra
    choice = dispatch.implementation(op, corpus.device, needs_grad=True)
    ctx.op, ctx.backend = op, choice.backend
    ctx.recompute = None if hasattr(choice.function, "backward") else choice.function


def _backward(
    ctx: Any,
    grad: _Tensor,
    wants: tuple[bool, ...],
    run: Any,
    rows: str | None = None,
) -> list[_Tensor | None]:
    """The nine gradients (corpus, feedback_weights, cache, w1..b3), None where not wanted.

    ``rows``: None for ``adapter_reduce``; ``"each"`` (``document_transforms``: ids
    ``arange(N)`` as (N, 1)) or ``"mean"`` (``corpus_transform``: as (1, N)).
    """
    corpus, ids, fw, cache, *params = ctx.saved_tensors
    modulation = ctx.extra["modulation"]
    if ctx.recompute is not None:
        return recompute_grads(run, (corpus, fw, cache, *params), wants, grad)
    hidden_output = False
    if rows is not None:
        n = corpus.shape[0]
        ids = torch.arange(n, device=corpus.device)
        if rows == "each":
            ids, hidden_output = ids.view(n, 1), modulation == "affine"
        else:
            ids, grad = ids.view(1, n), grad.view(1, -1)
    grads = adapter_backward_op(
        grad, corpus, ids, *params, fw, cache, modulation, ctx.op, ctx.backend, hidden_output,
        list(wants),
    )  # fmt: skip
    returned = _returned(list(wants), cache is not None, modulation)
    return [g if r else None for g, r in zip(grads, returned, strict=True)]


def _setup_reduce(ctx: Any, inputs: tuple[Any, ...], output: _Tensor) -> None:
    corpus, ids, *params, fw, modulation, cache, _ = inputs
    _setup("adapter_reduce", ctx, corpus, ids, fw, cache, params, modulation=modulation)


def _reduce_backward(ctx: Any, grad: _Tensor) -> tuple[_Tensor | None, ...]:
    needs = needs_input_grad(ctx, 12)  # corpus, ids, w1..b3, fw, modulation, cache, validate
    wants = (needs[0], needs[8], needs[10], *needs[2:8])
    modulation = ctx.extra["modulation"]
    ids = ctx.saved_tensors[1]

    def run(corpus: _Tensor, fw: _Tensor | None, cache: _Tensor | None, *params: _Tensor):
        extra = {} if cache is None else {"cache": cache}
        return ctx.recompute(corpus, ids, HyperNetWeights(*params), fw, modulation, **extra)

    d_corpus, d_fw, d_cache, *d_params = _backward(ctx, grad, wants, run)
    return (d_corpus, None, *d_params, d_fw, None, d_cache, None)


def _setup_rows(op: str) -> Any:
    def setup(ctx: Any, inputs: tuple[Any, ...], output: _Tensor) -> None:
        corpus, *params, modulation, chunk_rows, _ = inputs
        _setup(
            op, ctx, corpus, None, None, None, params, modulation=modulation, chunk_rows=chunk_rows
        )

    return setup


def _rows_backward(rows: str) -> Any:
    def backward(ctx: Any, grad: _Tensor) -> tuple[_Tensor | None, ...]:
        needs = needs_input_grad(ctx, 10)  # corpus, w1..b3, modulation, chunk_rows, validate
        wants = (needs[0], False, False, *needs[1:7])
        modulation, chunk_rows = ctx.extra["modulation"], ctx.extra["chunk_rows"]

        def run(corpus: _Tensor, fw: None, cache: None, *params: _Tensor) -> _Tensor:
            return ctx.recompute(corpus, HyperNetWeights(*params), modulation, chunk_rows)

        d_corpus, _, _, *d_params = _backward(ctx, grad, wants, run, rows)
        return (d_corpus, *d_params, None, None, None)

    return backward


adapter_reduce_op.register_autograd(_reduce_backward, setup_context=_setup_reduce)
document_transforms_op.register_autograd(
    _rows_backward("each"), setup_context=_setup_rows("document_transforms")
)
corpus_transform_op.register_autograd(
    _rows_backward("mean"), setup_context=_setup_rows("corpus_transform")
)
