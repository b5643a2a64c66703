"""The one place that picks an implementation for every op.

Backends:
- ``"triton"``: the fused kernels in :mod:`imrnns_kernels.ops`. Chosen for CUDA tensors, and
  for CPU tensors when ``TRITON_INTERPRET=1`` is set (Triton's interpreter: the test path).
- ``"cpu"``: chunked BLAS implementations in :mod:`imrnns_kernels.cpu`, same results.
- ``"reference"``: plain PyTorch from :mod:`imrnns_kernels.reference` (the oracle).

``IMRNNS_BACKEND=reference|cpu|triton`` or :func:`use_backend` overrides the choice. Every
public op validates its inputs here, once, before any implementation runs, so a bad call
raises ``TypeError``/``ValueError`` naming shapes and dtypes instead of reading out of bounds.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

from imrnns_kernels import _validation as V
from imrnns_kernels import reference
from imrnns_kernels.types import HyperNetWeights

BACKENDS = ("triton", "cpu", "reference")
_forced: list[str] = []

# op name -> backend -> implementation. Backends missing here fall back to the reference.
_REGISTRY: dict[str, dict[str, Callable[..., Any]]] = {
    "project": {},
    "adapter_reduce": {},
    "corpus_transform": {},
    "document_transforms": {},
    "modulate_layernorm": {},
    "modulated_score": {},
    "modulated_topk": {},
}


def _load_implementations() -> None:
    # Imported here, not at module top: the implementation packages may import this module.
    from imrnns_kernels.cpu import IMPLEMENTATIONS as cpu_impls
    from imrnns_kernels.ops import IMPLEMENTATIONS as triton_impls

    for op, fn in cpu_impls.items():
        register(op, "cpu", fn)
    for op, fn in triton_impls.items():
        register(op, "triton", fn)


def register(op: str, backend: str, fn: Callable[..., Any]) -> None:
    """Register ``fn`` as the ``backend`` implementation of ``op``."""
    if op not in _REGISTRY:
        raise ValueError(f"unknown op {op!r}; known: {sorted(_REGISTRY)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known: {BACKENDS}")
    _REGISTRY[op][backend] = fn


def interpreting() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@contextlib.contextmanager
def use_backend(backend: str) -> Iterator[None]:
    """Force one backend inside a ``with`` block (benchmarks and tests compare them)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known: {BACKENDS}")
    _forced.append(backend)
    try:
        yield
    finally:
        _forced.pop()


def select_backend(device: torch.device) -> str:
    """The backend an op on ``device`` runs with, before per-op availability."""
    if _forced:
        return _forced[-1]
    env = os.environ.get("IMRNNS_BACKEND")
    if env:
        if env not in BACKENDS:
            raise ValueError(f"IMRNNS_BACKEND must be one of {BACKENDS}, got {env!r}")
        return env
    if device.type == "cuda" or interpreting():
        return "triton"
    return "cpu"


def _impl(op: str, device: torch.device, needs_grad: bool) -> Callable[..., Any]:
    backend = select_backend(device)
    impls = _REGISTRY[op]
    fn = impls.get(backend)
    # An implementation without a backward pass must not silently drop gradients: training
    # calls fall back to the differentiable reference unless the op declares autograd support.
    if fn is not None and needs_grad and not getattr(fn, "supports_autograd", False):
        fn = None
    if fn is None and backend == "triton" and device.type == "cpu" and not interpreting():
        fn = impls.get("cpu")
    return fn if fn is not None else getattr(reference, op)


def _grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _check_ln(ln_weight: torch.Tensor, ln_bias: torch.Tensor, dim: int) -> None:
    for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        V.check_float(name, t, 1)
        if t.shape[0] != dim:
            raise ValueError(f"{name} must have shape ({dim},), got {V.describe(t)}")


def _check_hypernet(weights: HyperNetWeights, dim: int, modulation: str) -> None:
    if not isinstance(weights, HyperNetWeights):
        raise TypeError(f"weights must be a HyperNetWeights, got {type(weights).__name__}")
    for name, t in zip(weights._fields, weights, strict=True):
        V.check_float(f"weights.{name}", t, 2 if name.startswith("w") else 1)
    dtypes = {t.dtype for t in weights}
    if len(dtypes) > 1:
        # The reference (and so every training call) would fail inside F.linear, while the
        # fused paths silently computed in float32: one dtype for all six, said plainly.
        listing = ", ".join(f"{n} {t.dtype}" for n, t in zip(weights._fields, weights, strict=True))
        raise TypeError(f"HyperNet weights must share one dtype, got {listing}")
    if weights.in_dim != dim:
        raise ValueError(
            f"HyperNet input width {weights.in_dim} does not match corpus dim {dim} "
            f"(weights.w1 {V.describe(weights.w1)})"
        )
    out = V.transform_dim(dim, modulation)
    if weights.out_dim != out:
        raise ValueError(
            f"HyperNet output width {weights.out_dim} does not match {modulation} modulation "
            f"at dim {dim} (expected {out}; weights.w3 {V.describe(weights.w3)})"
        )


def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``normalize(P x + p0)``: (..., n) -> (..., m). See :func:`reference.project`."""
    V.check_float("x", x)
    V.check_float("weight", weight, 2)
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"x has last dim {x.shape[-1]} but the projection expects {weight.shape[1]} "
            f"(x {V.describe(x)}, weight {V.describe(weight)})"
        )
    if bias is not None:
        V.check_float("bias", bias, 1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(
                f"bias must have shape ({weight.shape[0]},) to match weight "
                f"{V.describe(weight)}, got {V.describe(bias)}"
            )
    V.check_same_device(x=x, weight=weight, bias=bias)
    fn = _impl("project", x.device, _grad(x, weight, bias))
    # x is computed in the projection's dtype; so is the bias (F.linear needs one dtype).
    return fn(x.to(weight.dtype), weight, None if bias is None else bias.to(weight.dtype))


def adapter_reduce(
    corpus: torch.Tensor,
    ids: torch.Tensor,
    weights: HyperNetWeights,
    feedback_weights: torch.Tensor | None = None,
    modulation: str = "diagonal",
    cache: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, OUT) weighted mean of ``act(A_d(corpus[ids]))``. See :func:`reference.adapter_reduce`.

    ``cache``: optional per-document cache from :func:`document_transforms` ((N, OUT) for
    diagonal, (N, h2) for affine); the op is then a weighted gather-mean.
    """
    V.check_modulation(modulation)
    V.check_float("corpus", corpus, 2)
    n, m = corpus.shape
    V.check_ids("ids", ids, n)
    _check_hypernet(weights, m, modulation)
    if feedback_weights is not None:
        V.check_weights("feedback_weights", feedback_weights, tuple(ids.shape))
    if cache is not None:
        _check_adapter_cache(cache, n, weights, modulation)
    V.check_same_device(
        corpus=corpus, ids=ids, w1=weights.w1, feedback_weights=feedback_weights, cache=cache
    )
    needs_grad = _grad(corpus, feedback_weights, cache, *weights)
    fn = _impl("adapter_reduce", corpus.device, needs_grad)
    if cache is None:
        return fn(corpus, ids, weights, feedback_weights, modulation)
    return fn(corpus, ids, weights, feedback_weights, modulation, cache=cache)


def _check_adapter_cache(
    cache: torch.Tensor, n: int, weights: HyperNetWeights, modulation: str
) -> None:
    V.check_float("cache", cache, 2)
    if modulation == "diagonal":
        width, what = weights.out_dim, "activated per-document outputs (N, OUT)"
    else:
        width, what = int(weights.w3.shape[1]), "per-document hidden states (N, h2)"
    if tuple(cache.shape) != (n, width):
        raise ValueError(
            f"cache must hold the {what} of document_transforms for {modulation} modulation: "
            f"shape ({n}, {width}), got {V.describe(cache)}"
        )


def _check_corpus_op(
    corpus: torch.Tensor, weights: HyperNetWeights, modulation: str, chunk_rows: int | None
) -> None:
    V.check_modulation(modulation)
    V.check_float("corpus", corpus, 2)
    if corpus.shape[0] == 0:
        raise ValueError(f"corpus is empty ({V.describe(corpus)})")
    _check_hypernet(weights, corpus.shape[1], modulation)
    if chunk_rows is not None:
        if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows <= 0:
            raise ValueError(f"chunk_rows must be a positive int or None, got {chunk_rows!r}")
    V.check_same_device(corpus=corpus, w1=weights.w1)


def document_transforms(
    corpus: torch.Tensor,
    weights: HyperNetWeights,
    modulation: str = "diagonal",
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Per-document cache for :func:`adapter_reduce`: (N, OUT) ``act(A_d(d))`` for diagonal,
    (N, h2) last hidden states for affine (its mean is exact through the linear last layer).
    Compute once per index. See :func:`reference.document_transforms`."""
    _check_corpus_op(corpus, weights, modulation, chunk_rows)
    fn = _impl("document_transforms", corpus.device, _grad(corpus, *weights))
    return fn(corpus, weights, modulation, chunk_rows)


def corpus_transform(
    corpus: torch.Tensor,
    weights: HyperNetWeights,
    modulation: str = "diagonal",
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Whole-corpus feedback: (OUT,) float32 mean of ``act(A_d(d))`` over every row, chunked
    (compute once per index). See :func:`reference.corpus_transform`."""
    _check_corpus_op(corpus, weights, modulation, chunk_rows)
    fn = _impl("corpus_transform", corpus.device, _grad(corpus, *weights))
    return fn(corpus, weights, modulation, chunk_rows)


def modulate_layernorm(
    x: torch.Tensor,
    transform: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    modulation: str,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``LN(T(x))`` for (B, m) or (B, K, m) ``x``. See :func:`reference.modulate_layernorm`."""
    V.check_modulation(modulation)
    V.check_float("x", x, (2, 3))
    m = x.shape[-1]
    V.check_transform("transform", transform, x.shape[0], m, modulation)
    _check_ln(ln_weight, ln_bias, m)
    V.check_same_device(x=x, transform=transform, ln_weight=ln_weight)
    # Mixed dtypes (a half-precision model's fp16 p(q) with adapter_reduce's float32
    # transform) failed inside einsum / F.layer_norm: compute T(x) in the promoted dtype of
    # x and transform, with the LayerNorm parameters in it too unless they are the float32
    # parameters that F.layer_norm accepts for fp16/bf16 input.
    dtype = torch.promote_types(x.dtype, transform.dtype)
    x, transform = x.to(dtype), transform.to(dtype)
    mixed_ok = dtype in (torch.float16, torch.bfloat16) and ln_weight.dtype == torch.float32
    if ln_weight.dtype != ln_bias.dtype or (ln_weight.dtype != dtype and not mixed_ok):
        ln_weight, ln_bias = ln_weight.to(dtype), ln_bias.to(dtype)
    fn = _impl("modulate_layernorm", x.device, _grad(x, transform, ln_weight, ln_bias))
    return fn(x, transform, ln_weight, ln_bias, modulation, eps)


def _check_scoring(
    corpus: torch.Tensor,
    transform: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    queries: torch.Tensor,
    modulation: str,
) -> None:
    V.check_modulation(modulation)
    V.check_float("corpus", corpus, 2)
    V.check_float("queries", queries, 2)
    m = corpus.shape[1]
    if queries.shape[1] != m:
        raise ValueError(
            f"queries dim {queries.shape[1]} does not match corpus dim {m} "
            f"(queries {V.describe(queries)}, corpus {V.describe(corpus)})"
        )
    V.check_transform("transform", transform, queries.shape[0], m, modulation)
    _check_ln(ln_weight, ln_bias, m)
    V.check_same_device(
        corpus=corpus, transform=transform, queries=queries, ln_weight=ln_weight, ln_bias=ln_bias
    )
    # The corpus is checked for NaN/Inf once when it enters an index, not on every search:
    # a scan of a multi-GB corpus per query would cost as much as the search itself.
    V.check_all_finite(queries=queries, transform=transform, ln_weight=ln_weight, ln_bias=ln_bias)


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
    """(B, K) float32 modulated cosine of each candidate. See :func:`reference.modulated_score`."""
    _check_scoring(corpus, transform, ln_weight, ln_bias, queries, modulation)
    V.check_ids("ids", ids, corpus.shape[0])
    if ids.shape[0] != queries.shape[0]:
        raise ValueError(
            f"ids has {ids.shape[0]} rows but there are {queries.shape[0]} queries "
            f"(ids {V.describe(ids)}, queries {V.describe(queries)})"
        )
    V.check_same_device(corpus=corpus, ids=ids)
    needs_grad = _grad(corpus, transform, ln_weight, ln_bias, queries)
    fn = _impl("modulated_score", corpus.device, needs_grad)
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
    id, padded with ``-inf`` / ``-1`` when k > N. See :func:`reference.modulated_topk`.

    ``workspace_bytes``: upper bound, in bytes, on the extra memory the call allocates on top
    of its inputs (all worker threads together: chunk buffers, converted rows, query-side
    tensors, running top-k states, outputs). The CPU path derives its worker count and chunk
    size from it and raises ``ValueError`` naming the minimum when even one worker with a
    minimal chunk does not fit; the Triton path sizes its (B, chunk) score buffer from it
    (its other device memory is O(B x m) for diagonal, O(B x m^2) for affine, plus the
    (B, k) top-k); the reference materialises (B, N, m) and ignores it. None: each
    backend's default (CPU: about 15% of the corpus bytes). Results do not depend on it.
    """
    _check_scoring(corpus, transform, ln_weight, ln_bias, queries, modulation)
    V.check_k(k)
    if corpus.shape[0] == 0:
        raise ValueError(f"corpus is empty ({V.describe(corpus)})")
    check_workspace_bytes(workspace_bytes)
    fn = _impl("modulated_topk", corpus.device, needs_grad=False)
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


_load_implementations()
