"""Plain PyTorch statements of every op: the test oracle and the always-correct fallback.

Each function here has the same signature as its fused counterpart in ``imrnns_kernels.ops``
and is written for clarity, not speed: it materialises every intermediate.
"""

from imrnns_kernels.reference.adapter_reduce import (
    adapter_reduce,
    corpus_transform,
    document_transforms,
)
from imrnns_kernels.reference.hypernet import activate, hypernet
from imrnns_kernels.reference.modulate import apply_transform, modulate_layernorm
from imrnns_kernels.reference.modulated_score import modulated_score
from imrnns_kernels.reference.modulated_topk import modulated_topk
from imrnns_kernels.reference.projection import project

__all__ = [
    "activate",
    "adapter_reduce",
    "apply_transform",
    "corpus_transform",
    "document_transforms",
    "hypernet",
    "modulate_layernorm",
    "modulated_score",
    "modulated_topk",
    "project",
]
