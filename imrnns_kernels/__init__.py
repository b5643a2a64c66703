"""Fused IMRNN ops, importable on their own (no transformers, no faiss).

Every op here validates its inputs and dispatches to a fused Triton kernel (CUDA, or the
interpreter under ``TRITON_INTERPRET=1``), a chunked CPU implementation, or the plain PyTorch
reference in :mod:`imrnns_kernels.reference`. See :mod:`imrnns_kernels.dispatch`.
"""

from imrnns_kernels._validation import transform_dim
from imrnns_kernels.dispatch import (
    adapter_reduce,
    corpus_transform,
    document_transforms,
    modulate_layernorm,
    modulated_score,
    modulated_topk,
    project,
    select_backend,
    use_backend,
)
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
