"""Plain PyTorch statements of every op: the test oracle and the always-correct fallback.

A namespace over the per-family references (:mod:`imrnns_kernels.plain.reference`,
:mod:`imrnns_kernels.adapter.reference`, :mod:`imrnns_kernels.scoring.reference`). Each
function has the same signature as its fused counterparts and is written for clarity, not
speed: it materialises every intermediate. No input validation: call the public ops in
:mod:`imrnns_kernels` for that.
"""

from imrnns_kernels.adapter.reference import (
    activate,
    adapter_reduce,
    corpus_transform,
    document_transforms,
    hypernet,
)
from imrnns_kernels.plain.reference import apply_transform, modulate_layernorm, project
from imrnns_kernels.scoring.reference import modulated_score, modulated_topk

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
