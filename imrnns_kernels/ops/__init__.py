"""Fused Triton kernels, one op per module: ``_<op>_kernel`` -> launcher -> autograd Function.

``IMPLEMENTATIONS`` maps op names (see :mod:`imrnns_kernels.dispatch`) to the Triton-backed
entry point with the reference's signature. An entry that supports autograd carries
``fn.supports_autograd = True``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from imrnns_kernels.ops import adapter_reduce as _adapter_reduce
from imrnns_kernels.ops import modulated_score as _modulated_score
from imrnns_kernels.ops import modulated_topk as _modulated_topk

IMPLEMENTATIONS: dict[str, Callable[..., Any]] = {
    "adapter_reduce": _adapter_reduce.adapter_reduce,
    "corpus_transform": _adapter_reduce.corpus_transform,
    "document_transforms": _adapter_reduce.document_transforms,
    "modulated_score": _modulated_score.modulated_score,
    "modulated_topk": _modulated_topk.modulated_topk,
}
