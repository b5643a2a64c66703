"""The registry of op implementations, and the one place that picks one for a call.

Backends, per op family (``imrnns_kernels.<family>.<backend>``):

- ``"triton"``: fused kernels -> launchers -> autograd Functions in ``<family>/triton.py``, the
  only modules that import triton. Imported on first use, never by ``import imrnns_kernels``.
  They run on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (the interpreter:
  the test path).
- ``"cpu"``: chunked BLAS in ``<family>/cpu.py``; same results, no triton needed.
- ``"reference"``: plain PyTorch in ``<family>/reference.py`` (the test oracle; it
  materialises every intermediate). Always available and always differentiable.

Which backends each op has (:func:`backends`)::

    op                    triton  cpu  reference
    adapter_reduce        yes     yes  yes
    corpus_transform      yes     yes  yes
    document_transforms   yes     yes  yes
    modulated_score       yes     yes  yes
    modulated_topk        yes     yes  yes   (no op has a backward: search is inference)
    project               -       -    yes   plain op: no fused kernel (one GEMM and a row
    modulate_layernorm    -       -    yes   normalisation); its PyTorch code runs under
                                             every backend

Selection. :func:`implementation` returns the choice for a call and the reason for it;
:func:`select_backend` the backend before per-op availability.

- Explicit, by :func:`use_backend` (innermost ``with`` block wins) or ``IMRNNS_BACKEND``:
  that backend's implementation runs, or the plain op's one implementation. Anything it
  cannot serve raises :class:`BackendError` naming the op and the reason, never a silent
  fallback: triton not importable (the error says how to install it); the Triton backend on
  non-CUDA tensors without ``TRITON_INTERPRET=1``; no implementation of the op for that
  backend; gradients needed from an implementation without a backward.
- Automatic: ``"triton"`` for CUDA tensors, and for CPU tensors under ``TRITON_INTERPRET=1``,
  when triton imports; without triton, ``"cpu"`` for CPU tensors and ``"reference"`` for
  others (the CPU path's buffers and worker threads are host memory); ``"cpu"`` otherwise.
  If that backend has no implementation of the op, or the call needs gradients and the
  implementation has no backward, the reference runs.

Every public op validates its inputs (in its family's ``__init__``) before asking here, so
a bad call raises ``TypeError``/``ValueError`` naming shapes and dtypes instead of reading out
of bounds.

Where the choice is made. The fused ops are PyTorch custom operators (``torch.ops.imrnns.*``,
registered in each family's ``ops.py``); :func:`implementation` is called inside the
operator's implementation, when it runs on real tensors, never in traced code. That runs
below autograd, so the forward asks with ``needs_grad=False``; the autograd set-up asks
again with ``needs_grad=True`` for the implementation whose backward to run (an automatic
choice without a backward gives the reference there). An implementation that carries an
analytic backward as ``fn.backward`` (the builtin ``cpu`` and ``triton`` ones) is
differentiated by it, through a backward operator; any other (the reference, a function
given to :func:`register`) is recomputed under autograd in the backward pass
(docs/compile.md).
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch

from imrnns_kernels._runtime import interpreting
from imrnns_kernels._validation import check_workspace_bytes

__all__ = [
    "BACKENDS",
    "PLAIN_OPS",
    "BackendError",
    "Implementation",
    "backend_function",
    "backends",
    "check_workspace_bytes",
    "implementation",
    "interpreting",
    "register",
    "select_backend",
    "triton_available",
    "use_backend",
]

BACKENDS = ("triton", "cpu", "reference")

# Ops with no fused kernel: their PyTorch implementation serves every backend.
PLAIN_OPS = frozenset({"project", "modulate_layernorm"})


def _family(family: str, op: str) -> dict[str, str | Callable[..., Any]]:
    return {b: f"imrnns_kernels.{family}.{b}:{op}" for b in BACKENDS}


# op -> backend -> implementation: "module:function" (imported on first use, so that no
# backend loads before it is chosen) or a callable given to register(). An implementation
# that supports autograd carries ``fn.supports_autograd = True``; the reference always does.
_REGISTRY: dict[str, dict[str, str | Callable[..., Any]]] = {
    "project": {"reference": "imrnns_kernels.plain.reference:project"},
    "modulate_layernorm": {"reference": "imrnns_kernels.plain.reference:modulate_layernorm"},
    "adapter_reduce": _family("adapter", "adapter_reduce"),
    "corpus_transform": _family("adapter", "corpus_transform"),
    "document_transforms": _family("adapter", "document_transforms"),
    "modulated_score": _family("scoring", "modulated_score"),
    "modulated_topk": _family("scoring", "modulated_topk"),
}

_forced: list[str] = []

TRITON_INSTALL_HINT = (
    "install it with `pip install triton` (Linux with a CUDA GPU; on other machines use the "
    "'cpu' backend, the fast path without a GPU)"
)


class BackendError(RuntimeError):
    """A backend chosen explicitly (``use_backend`` / ``IMRNNS_BACKEND``) cannot serve a call."""


class Implementation(NamedTuple):
    """What a call runs: the op, the backend whose implementation it is, the function (the
    reference's signature) and why it was chosen."""

    op: str
    backend: str
    function: Callable[..., Any]
    reason: str


_triton_import_error: ImportError | None = None
_triton_checked = False


def triton_available() -> bool:
    """True when ``import triton`` works (attempted once, on the first call)."""
    global _triton_checked, _triton_import_error
    if not _triton_checked:
        try:
            importlib.import_module("triton")
        except ImportError as exc:
            _triton_import_error = exc
        _triton_checked = True
    return _triton_import_error is None


def _require_triton(what: str) -> None:
    if not triton_available():
        raise BackendError(
            f"{what} needs the triton package, which does not import "
            f"({_triton_import_error}): {TRITON_INSTALL_HINT}"
        )


def register(op: str, backend: str, fn: Callable[..., Any]) -> None:
    """Register ``fn`` as the ``backend`` implementation of ``op`` (replacing any other).

    Raises:
        ValueError: unknown op or backend.
    """
    _check_op(op)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known: {BACKENDS}")
    _REGISTRY[op][backend] = fn


def backends(op: str) -> tuple[str, ...]:
    """The backends with an implementation of ``op`` (in :data:`BACKENDS` order)."""
    _check_op(op)
    return tuple(b for b in BACKENDS if b in _REGISTRY[op])


def _check_op(op: str) -> None:
    if op not in _REGISTRY:
        raise ValueError(f"unknown op {op!r}; known: {sorted(_REGISTRY)}")


@contextlib.contextmanager
def use_backend(backend: str) -> Iterator[None]:
    """Force one backend inside a ``with`` block (benchmarks and tests compare them).

    Enter it outside ``torch.compile``'d code: the operators choose when they run, so a block
    inside a traced function would not reach them (it raises instead of being ignored).

    Raises:
        ValueError: unknown backend.
        BackendError: ``"triton"`` while triton does not import (says how to install it), or
            the block is entered in code being traced by ``torch.compile`` / ``torch.export``.
    """
    if torch.compiler.is_compiling():
        raise BackendError(
            f"use_backend({backend!r}) inside code traced by torch.compile or torch.export "
            "would not reach the operators, which choose their implementation when they run: "
            "enter it around the call of the compiled function instead"
        )
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known: {BACKENDS}")
    if backend == "triton":
        _require_triton("use_backend('triton')")
    _forced.append(backend)
    try:
        yield
    finally:
        _forced.pop()


def _explicit() -> tuple[str, str] | None:
    """(backend, what chose it) from use_backend or IMRNNS_BACKEND, or None."""
    if _forced:
        return _forced[-1], f"use_backend({_forced[-1]!r})"
    env = os.environ.get("IMRNNS_BACKEND")
    if env:
        if env not in BACKENDS:
            raise ValueError(f"IMRNNS_BACKEND must be one of {BACKENDS}, got {env!r}")
        if env == "triton":
            _require_triton("IMRNNS_BACKEND=triton")
        return env, f"IMRNNS_BACKEND={env}"
    return None


def _automatic(device: torch.device) -> tuple[str, str]:
    """(backend, why) of the automatic choice for tensors on ``device``."""
    if device.type == "cuda" or interpreting():
        why = "CUDA tensors" if device.type == "cuda" else "TRITON_INTERPRET=1"
        if triton_available():
            return "triton", why
        fallback = "cpu" if device.type == "cpu" else "reference"
        return fallback, f"{why}, but triton does not import"
    return "cpu", f"tensors on {device.type}"


def select_backend(device: torch.device) -> str:
    """The backend an op on ``device`` runs with, before per-op availability.

    Raises:
        ValueError: ``IMRNNS_BACKEND`` names no backend.
        BackendError: ``IMRNNS_BACKEND=triton`` while triton does not import.
    """
    explicit = _explicit()
    return explicit[0] if explicit is not None else _automatic(device)[0]


def _resolve(op: str, backend: str) -> Callable[..., Any] | None:
    entry = _REGISTRY[op].get(backend)
    if entry is None or callable(entry):
        return entry
    module_name, _, name = entry.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if backend == "triton" and exc.name is not None and exc.name.split(".")[0] == "triton":
            raise BackendError(
                f"{op}: the triton backend needs the triton package ({exc}): {TRITON_INSTALL_HINT}"
            ) from exc
        raise
    fn = getattr(module, name)
    _REGISTRY[op][backend] = fn
    return fn


def backend_function(op: str, backend: str) -> Callable[..., Any]:
    """The ``backend`` implementation of ``op`` itself, loaded on first use (the backward
    operators find the analytic backward of the implementation a forward ran this way).

    Raises:
        ValueError: unknown op or backend, or ``op`` has no ``backend`` implementation.
        BackendError: the triton backend while triton does not import.
    """
    _check_op(op)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known: {BACKENDS}")
    fn = _resolve(op, backend)
    if fn is None:
        raise ValueError(f"{op} has no {backend} implementation (it has: {backends(op)})")
    return fn


def _differentiable(backend: str, fn: Callable[..., Any]) -> bool:
    return backend == "reference" or bool(getattr(fn, "supports_autograd", False))


def implementation(op: str, device: torch.device, needs_grad: bool = False) -> Implementation:
    """The implementation a call of ``op`` on ``device`` runs, and why (see the module
    docstring for the rules). ``needs_grad``: the call must be differentiable.

    Raises:
        ValueError: unknown op, or ``IMRNNS_BACKEND`` names no backend.
        BackendError: an explicitly chosen backend cannot serve the call (the message names
            the op and the reason).
    """
    _check_op(op)
    explicit = _explicit()
    if explicit is not None:
        return _explicit_choice(op, *explicit, device, needs_grad)
    backend, why = _automatic(device)
    fn = _resolve(op, backend)
    if fn is not None and needs_grad and not _differentiable(backend, fn):
        why = f"{why}; the {backend} implementation has no backward and gradients are needed"
        fn = None
    elif fn is None:
        why = f"{why}; {op} has no {backend} implementation"
    if fn is None:
        backend, fn = "reference", _resolve(op, "reference")
        assert fn is not None  # internal: every op registers a reference
    return Implementation(op, backend, fn, f"automatic: {why}")


def _explicit_choice(
    op: str, backend: str, chosen_by: str, device: torch.device, needs_grad: bool
) -> Implementation:
    if backend not in _REGISTRY[op]:
        if op in PLAIN_OPS:
            fn = _resolve(op, "reference")
            assert fn is not None  # internal: every op registers a reference
            reason = f"{chosen_by}; {op} has no fused kernel, its PyTorch code serves every backend"
            return Implementation(op, "reference", fn, reason)
        raise BackendError(
            f"{op} has no {backend} implementation (it has: {', '.join(backends(op))}); "
            f"chosen by {chosen_by}"
        )
    if backend == "triton" and device.type != "cuda" and not interpreting():
        raise BackendError(
            f"{op}: the triton backend runs on CUDA tensors (or on CPU tensors with "
            f"TRITON_INTERPRET=1), got tensors on {device}; chosen by {chosen_by}"
        )
    fn = _resolve(op, backend)
    assert fn is not None  # checked above
    if needs_grad and not _differentiable(backend, fn):
        raise BackendError(
            f"{op}: the {backend} implementation has no backward and this call needs "
            f"gradients (chosen by {chosen_by}); use the reference backend, or call it under "
            "torch.no_grad()"
        )
    return Implementation(op, backend, fn, f"chosen by {chosen_by}")
