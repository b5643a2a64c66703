"""Fused IMRNN ops, importable on their own (no transformers, no faiss; triton only when its
backend is chosen: ``import imrnns_kernels`` never imports it).

Every op validates its inputs (``TypeError`` / ``ValueError`` naming shapes and dtypes), then
runs the implementation :mod:`imrnns_kernels.dispatch` picks::

    op                   fused kernels  maths                                shapes
    project              none           normalize(P x + p0)                  (..., n) -> (..., m)
    modulate_layernorm   none           LN(T(x))                             (B[, K], m) -> same
    adapter_reduce       triton, cpu    w-mean of act(A_d(corpus[ids]))      (B, K) ids -> (B, OUT)
    document_transforms  triton, cpu    act(A_d(d)) per row (affine: h2)     (N, m) -> (N, OUT|h2)
    corpus_transform     triton, cpu    mean of act(A_d(d)) over the corpus  (N, m) -> (OUT,)
    modulated_score      triton, cpu    cos(q~, LN(T(corpus[ids])))          (B, K) ids -> (B, K)
    modulated_topk       triton, cpu    top-k of that cosine over all N rows -> (B, k), (B, k)

"none": a plain op (one GEMM and a normalisation, or a transform and a LayerNorm), whose
PyTorch implementation runs under every backend. OUT = 2m (``diagonal``) or m*m + m
(``affine``, see :func:`transform_dim`). Each op's full docstring is in its family:
:mod:`imrnns_kernels.plain`, :mod:`imrnns_kernels.adapter`, :mod:`imrnns_kernels.scoring`;
the plain PyTorch oracle of every op is :mod:`imrnns_kernels.reference`.

Backends: Triton on CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1``), chunked BLAS
on CPU tensors, the reference on request. ``IMRNNS_BACKEND=reference|cpu|triton`` or
``with use_backend(...)`` forces one (an explicit choice that cannot serve a call raises
:class:`imrnns_kernels.dispatch.BackendError`); :func:`imrnns_kernels.dispatch.implementation`
says which implementation a call runs and why.

The five fused ops are also PyTorch custom operators, ``torch.ops.imrnns.<op>`` (registered
by this import, with fake implementations and autograd), which the functions above call
after checking their inputs: ``torch.compile(fullgraph=True)`` and ``torch.export`` trace a
model that uses them without a graph break. docs/compile.md says which checks run in
compiled code and how each op behaves under CUDA graphs.
"""

from imrnns_kernels._validation import transform_dim
from imrnns_kernels.adapter import adapter_reduce, corpus_transform, document_transforms
from imrnns_kernels.dispatch import select_backend, use_backend
from imrnns_kernels.plain import modulate_layernorm, project
from imrnns_kernels.scoring import modulated_score, modulated_topk
from imrnns_kernels.types import HyperNetWeights

__version__ = "0.1.0"

__all__ = [
    "HyperNetWeights",
    "adapter_reduce",
    "corpus_transform",
    "document_transforms",
    "modulate_layernorm",
    "modulated_score",
    "modulated_topk",
    "project",
    "select_backend",
    "transform_dim",
    "use_backend",
]
