"""Every import of ``imrnns_kernels`` below its public API in benchmarks/ (the rest uses
``imrnns_kernels.<op>``, ``use_backend`` and ``reference``).

- :class:`StreamingTopK`, :func:`topk_by_id` (:mod:`imrnns_kernels.topk`): the kernels'
  running top-k merge and top-k by candidate id. The sweep's ``torch_ip`` floor streams its
  top-k with the first and its rerank pipelines end with the second, so every provider breaks
  ties the same way (higher score, then lower id) and the floors pay for the merge the fused
  path pays.
- :func:`adapter_impl`: the per-backend module behind ``adapter_reduce`` (called without the
  dispatcher, and with its ``cache=`` of precomputed document transforms).
- :func:`plan_workspace`: the CPU streaming top-k's chunk plan for a workspace budget.
- :func:`has_backend`: whether the dispatcher has a given backend of an op.
"""

from __future__ import annotations

from types import ModuleType

from imrnns_kernels import dispatch
from imrnns_kernels.scoring.cpu import plan_workspace
from imrnns_kernels.topk import StreamingTopK, topk_by_id


def adapter_impl(device: str) -> ModuleType:
    """The module with ``adapter_reduce`` and ``document_transforms`` of the fused path on
    ``device``: the Triton kernels on ``"cuda"`` (imported only then), the chunked CPU path
    otherwise."""
    if device == "cuda":
        from imrnns_kernels.adapter import triton as triton_adapter

        return triton_adapter
    from imrnns_kernels.adapter import cpu as cpu_adapter

    return cpu_adapter


def has_backend(op: str, backend: str) -> bool:
    """True when the dispatcher has an implementation of ``op`` for ``backend``."""
    return backend in dispatch.backends(op)


__all__ = ["StreamingTopK", "adapter_impl", "has_backend", "plan_workspace", "topk_by_id"]
