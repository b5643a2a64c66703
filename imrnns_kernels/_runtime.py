"""Runtime helpers shared by every op family: numerics conventions, interpreter detection,
tile-size rounding, the CPU worker pool and its scratch buffers.

Plain Python and PyTorch only: the CPU paths import this module, so it must never import
triton (the Triton paths use :func:`dot_precision` and :func:`pow2` from here too).
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import os
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TypeVar

import torch

# F.normalize's default eps: the official implementation's cosine uses it, so every path does.
NORMALIZE_EPS = 1e-12

_DOT_PRECISION_ENV = "IMRNNS_DOT_PRECISION"


def interpreting() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter
    (``TRITON_INTERPRET=1``, read at every call: tests toggle it)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every path computes in for inputs stored in ``dtype``: float32, or float64
    for float64 inputs (as the reference, so that gradcheck in float64 runs the real code)."""
    return torch.promote_types(dtype, torch.float32)


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """True when autograd is on and any of ``tensors`` requires a gradient."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def pow2(n: int, lo: int = 16, hi: int | None = None) -> int:
    """The next power of two >= ``max(n, lo)`` (``tl.dot`` needs every dim >= 16), capped at
    ``hi``: the tile sizes of the Triton launchers."""
    p = max(lo, 1 << (max(1, int(n)) - 1).bit_length())
    return min(p, hi) if hi is not None else p


def dot_precision(device: torch.device) -> str:
    """The ``input_precision`` of the scoring kernels' ``tl.dot`` on ``device``.

    Plain TF32 (10-bit mantissa) would miss the fp32 tolerance by two orders of magnitude;
    "tf32x3" splits each fp32 operand into a TF32 head and tail and keeps three products:
    fp32-level accuracy on tensor cores. GPUs before sm_80 (no TF32) and the interpreter use
    "ieee" FMA dots; ``IMRNNS_DOT_PRECISION=ieee|tf32x3`` overrides.

    Raises:
        ValueError: ``IMRNNS_DOT_PRECISION`` is set to anything else.
    """
    forced = os.environ.get(_DOT_PRECISION_ENV)
    if forced:
        if forced not in ("ieee", "tf32x3"):
            raise ValueError(f"{_DOT_PRECISION_ENV} must be 'ieee' or 'tf32x3', got {forced!r}")
        return forced
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 0):
        return "ieee"
    return "tf32x3"


# --------------------------------------------------------------------------- CPU workers

_State = TypeVar("_State")
_WORKERS_LOCK = threading.Lock()
_LOCAL = threading.local()  # .in_worker: nested calls run inline instead of deadlocking
# Persistent helper threads, created on first use and kept (daemon, idle on a queue). A new
# Python thread that touches torch sets up thread-local allocator arenas and torch state
# afresh and faults the new arena's pages in: on short calls that start-up costs as much as
# the work (benchmarks/RESULTS.md, "Fused ops"); a reused thread pays none of it.
_POOL: ThreadPoolExecutor | None = None
_POOL_THREADS = 64


# torch's thread count while a run_workers call has it at 1; None when no call is running.
_SAVED_THREADS: int | None = None
# One helper thread that never computes: it writes torch's process default (below).
_DEFAULT_WRITER: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=_POOL_THREADS, thread_name_prefix="imrnns-worker")
    return _POOL


def _restore_default_threads(threads: int) -> None:
    """Make ``threads`` torch's thread count for threads that have not used torch yet,
    leaving the calling thread's own count as it is.

    ``torch.set_num_threads`` sets the calling thread's OpenMP/MKL count and also the
    process-wide default that every thread takes on its first parallel op. A worker or a
    one-worker plan sets its own thread to 1, so without this a server thread that happened
    to start during a search would stay at one intra-op thread for its whole life. Setting
    the default from a thread that never computes leaves every computing thread's count
    alone. Called with the workers' lock held; waits for the write.
    """
    global _DEFAULT_WRITER
    if _DEFAULT_WRITER is None:
        _DEFAULT_WRITER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imrnns-threads")
    _DEFAULT_WRITER.submit(torch.set_num_threads, threads).result()


def _reset_after_fork() -> None:
    """In a forked child: forget the parent's pool, lock and worker marks.

    ``fork()`` copies only the calling thread. The parent's pool object survives with its
    idle-thread count but none of its threads, so work submitted to it would wait forever;
    the lock may have been held by a thread that no longer exists. The child starts a new
    pool on first use, and torch's thread count, set to 1 by a call in flight in another
    parent thread, is put back.
    """
    global _POOL, _WORKERS_LOCK, _SAVED_THREADS, _DEFAULT_WRITER
    _POOL = None  # the old executor is never shut down: joining threads that do not exist hangs
    _DEFAULT_WRITER = None
    _WORKERS_LOCK = threading.Lock()
    _LOCAL.in_worker = False
    if _SAVED_THREADS is not None:
        torch.set_num_threads(_SAVED_THREADS)
        _SAVED_THREADS = None


if hasattr(os, "register_at_fork"):  # POSIX only; Windows has no fork
    os.register_at_fork(after_in_child=_reset_after_fork)


def run_workers(
    num_items: int,
    make_state: Callable[[], _State],
    body: Callable[[_State, int], None],
    workers: int | None = None,
) -> list[_State]:
    """Run ``body(state, i)`` for every ``i < num_items`` on worker threads, one ``state``
    (buffers, a running top-k) per worker, items handed out dynamically; returns the states.

    Why not torch's own intra-op threads: a chunk of scoring is ~30 medium-sized ops, and each
    multi-threaded op ends in a barrier. On small machines shared with other jobs a barrier
    often waits a whole scheduler slice for a descheduled sibling, which made exhaustive
    search several times slower with 2 intra-op threads than with 1 (benchmarks/RESULTS.md).
    One thread per worker and one join per call is the shape faiss uses (one OpenMP region
    per search).

    ``workers`` defaults to ``torch.get_num_threads()``. The calling thread is worker 0; the
    others come from a persistent pool (see ``_POOL``). Every worker runs at one intra-op
    thread: the caller's own count is 1 while the workers run and restored afterwards; other
    threads' counts, and the count a thread started meanwhile gets, are not changed
    (:func:`_restore_default_threads`). Calls from several threads are serialised (one lock:
    each call already uses the cores it was given), and a call from inside a worker (``body``
    calling another op that uses workers) runs inline.
    """
    workers = torch.get_num_threads() if workers is None else workers
    workers = max(1, min(workers, num_items, _POOL_THREADS + 1))
    if workers == 1 or getattr(_LOCAL, "in_worker", False):
        state = make_state()
        for i in range(num_items):
            body(state, i)
        return [state]
    global _SAVED_THREADS
    with _WORKERS_LOCK:
        saved = _SAVED_THREADS = torch.get_num_threads()
        torch.set_num_threads(1)
        counter = itertools.count()
        # Grad mode is per thread: a worker would start with grad on even when the caller
        # (e.g. an autograd Function's forward) runs under no_grad, and in-place out= ops
        # then fail. Carry the caller's mode into every worker.
        grad_enabled = torch.is_grad_enabled()
        states: list[_State | None] = [None] * workers
        errors: list[BaseException] = []

        def run(slot: int) -> None:
            _LOCAL.in_worker = True
            if slot and torch.get_num_threads() != 1:
                # OpenMP's thread count is per thread: a pool thread left at the default
                # would start its own team of OpenMP threads inside BLAS calls, which then
                # compete with the caller's team. Set once per pool thread (it stays at 1);
                # the write also changed the process default, which is put back.
                torch.set_num_threads(1)
                _restore_default_threads(saved)
            previous_grad = torch.is_grad_enabled()
            torch.set_grad_enabled(grad_enabled)
            try:
                state = make_state()
                states[slot] = state
                for i in counter:  # next() on a shared count is atomic under the GIL
                    if i >= num_items or errors:
                        break
                    body(state, i)
            except BaseException as exc:  # re-raised in the caller's thread
                errors.append(exc)
            finally:
                _LOCAL.in_worker = False
                torch.set_grad_enabled(previous_grad)

        try:
            _restore_default_threads(saved)
            futures = [_pool().submit(run, w) for w in range(1, workers)]
            run(0)
            wait(futures)
        finally:
            torch.set_num_threads(saved)
            _SAVED_THREADS = None
    if errors:
        raise errors[0]
    return [st for st in states if st is not None]


@contextlib.contextmanager
def one_intra_op_thread(workers: int) -> Iterator[None]:
    """Run a one-worker plan (``workers == 1``) on one intra-op thread, as every worker runs.

    :func:`run_workers` runs a single worker inline, on torch's intra-op threads; many small
    per-query ops then wait on a barrier each, which made a budget that left one worker
    several times slower than two workers (benchmarks/RESULTS.md). Serialised with the
    workers' lock, as :func:`run_workers`; only the calling thread's count changes (the
    process default is put back at once, :func:`_restore_default_threads`). A no-op for
    several workers, on one thread already, or inside a worker.
    """
    if workers > 1 or torch.get_num_threads() == 1 or getattr(_LOCAL, "in_worker", False):
        yield
        return
    global _SAVED_THREADS
    with _WORKERS_LOCK:
        saved = _SAVED_THREADS = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            _restore_default_threads(saved)
            yield
        finally:
            torch.set_num_threads(saved)
            _SAVED_THREADS = None


# Thread-local scratch buffers, reused across calls. A freshly allocated multi-MB tensor is
# a fresh mmap whose pages fault in on first touch (glibc returns large freed blocks to the
# OS), and on short calls those faults cost more than the work that fills the buffer.
# Worker threads are persistent (_POOL), so their buffers are too. At most
# SCRATCH_KEEP_BYTES per (thread, key) are kept.
_SCRATCH = threading.local()
SCRATCH_KEEP_BYTES = 16 << 20


def scratch(key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor of ``shape`` backed by this thread's buffer for ``key``.

    The buffer is reused by the next call with the same key on the same thread: never return
    it (or a view of it) to a caller, and use one key per simultaneously live buffer.
    """
    numel = 1
    for size in shape:
        numel *= int(size)
    buffers = getattr(_SCRATCH, "buffers", None)
    if buffers is None:
        buffers = _SCRATCH.buffers = {}
    buf = buffers.get((key, dtype))
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype)
        if numel * buf.element_size() <= SCRATCH_KEEP_BYTES:
            buffers[key, dtype] = buf
    return buf[:numel].view(shape)


_DYNAMO_IMPORTED = False


def import_dynamo_off_stack() -> None:
    """Import ``torch._dynamo`` once, in a short-lived thread, before the first custom-op call.

    PyTorch's custom-op wrapper imports ``torch._dynamo`` on the first call of any custom
    operator, and some of the modules it imports keep the frames that imported them (cyclic
    garbage). Imported inside a user's call, those frames reach every caller's frame through
    ``f_back`` and keep the caller's objects alive until a cyclic collection, which may only
    run at interpreter exit: a distributed index freed there releases gloo tensors while the
    process shuts down, and the process aborts ("terminate called without an active
    exception"). A fresh thread's stack holds none of the caller's frames.
    """
    global _DYNAMO_IMPORTED
    if _DYNAMO_IMPORTED:
        return
    if "torch._dynamo" not in sys.modules:
        thread = threading.Thread(
            target=importlib.import_module, args=("torch._dynamo",), name="imrnns-import"
        )
        thread.start()
        thread.join()
    _DYNAMO_IMPORTED = True
