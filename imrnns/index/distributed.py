"""Sharded IMRNN search over ``torch.distributed`` (NCCL on GPUs, gloo on CPU).

Every rank holds a contiguous block of the corpus (projected rows, first-stage vectors and the
per-document cache) in an ordinary :class:`~imrnns.index.IMRNNIndex`, and every search is a
collective call that returns, on every rank, the result a single-process index over the whole
corpus returns. For a block of B queries (docs/design.md section 1 for the maths):

1. First stage, local: each rank searches its shard for the ``feedback_k`` best documents
   (:mod:`imrnns.index.first_stage`), maps local rows to global positions (add order over
   the whole index), and an all-gather of (B, feedback_k) scores and positions gives every
   rank the global feedback set F(q): the top ``feedback_k`` of the union by (score
   descending, position ascending), the rule one index's first stage applies (ties to the
   earlier-added document), so the set and its order equal the single-process ones even
   when duplicates tie at the boundary.
2. Feedback aggregation over the *global* F(q), two exchanges (``exchange=``):

   - ``"rows"`` (default, bit-exact): the rows of F(q) (projected documents, and per-document
     cache rows when the index keeps them) are assembled on every rank by an all-reduce in
     which each slot has exactly one non-zero contributor, its owner. The reduction runs on
     the bytes (``uint8``), so it is exact for every dtype: ``x + 0 + ... + 0 = x``. Every
     rank then calls the same ``IMRNN.query_state`` on the same (B, feedback_k) inputs in
     the same order as one process does, so ``T_q``, ``T_bar`` and ``q~`` are identical to
     the last bit (uniform and ``score_weighted`` means, ``mean_of_transforms`` and v0.1
     ``transform_of_mean``). Traffic: B x feedback_k x (m x bytes(storage) [+ cache row]).
   - ``"partial"``: each rank reduces the feedback documents it owns (fused
     ``adapter_reduce`` with the weights of the documents it does not own set to zero, or the
     weighted sum of its modulated documents for v0.1), scales by its share of the global
     weight sum (``score_weighted``: the softmax is taken over the global feedback scores,
     which every rank has) and one sum all-reduce gives the global mean. Traffic: B x OUT
     (2m for diagonal, m*m + m for affine) or B x m for v0.1; equal to the single-process
     result up to float32 summation order (about 1e-7).
3. Scoring: ``mode="rerank"`` scores the global F(q) (rows: on every rank from the assembled
   rows; partial: each rank scores the documents it owns and an exact one-owner sum
   all-reduce collects the scores); ``mode="exhaustive"`` runs the streaming
   ``modulated_topk`` over each rank's shard and an all-gather of (B, k) candidates is merged
   by (score descending, lower position first), the single-process tie rule.
4. Ids: results are positions until the end; an index with custom int ids maps them with one
   exact one-owner sum all-reduce of (B, k) int64, a named index with one gather of the
   names each rank holds, so every rank returns what one process's index returns (default
   int ids are the positions: no exchange).

Exactness: with ``exchange="rows"``, a flat first stage and the default ``query_block``,
results equal the single-process index's: the same ids, and scores to the last bit, provided
every process runs the same kernels with the same number of intra-op threads (a GEMM split
over 2 threads can round differently than over 1) and every shard (and ``add`` batch) has at
least 12 rows (MKL computes a GEMM of fewer rows with another kernel, so such a shard's
projected rows may differ from one process's in the last bit). Outside those conditions,
and with ``exchange="partial"``, scores agree to float32 rounding (about 1e-7) and ids agree
except between documents whose scores are that close. IVF and HNSW first stages are built
per shard and are approximate in their own way, so they do not equal one approximate index.

Calls that touch several ranks (``add``, ``add_shard``, ``search``, ``doc_names``, ``save``,
``load``, the constructor) must be made by every rank with the same arguments (``add_shard``:
each rank its own rows). Failures take one path (:class:`_Collectives`): every rank-local step
between two collectives catches *any* exception, and the next collective carries one failure
flag per rank (inside the data message of a search's all-gathers and all-reduces, so the
happy path sends no extra message; a flag exchange of its own after a step that no collective
follows). When a flag is set the ranks exchange the failed ranks' exception types and
messages, then raise on every rank: the failed rank its own exception, the others the same
built-in type with ``"rank R: Type: message"`` (and ``failed_rank`` set); ranks stay in step,
so the index stays usable after a failed search. Every wait in a collective is bounded by the
index's ``timeout`` (default 300 s): a rank that hangs raises ``TimeoutError`` on the others,
a rank that dies raises ``RuntimeError`` at once (gloo) or at the timeout; after either the
process group is out of step and the index refuses further calls. Ranks that resolve
different versions of a saved index (one caught mid-swap) are refused at load by comparing
the manifests' SHA-256.

Launch with torchrun (see ``docs/distributed.md``)::

    torchrun --nproc-per-node 4 -m imrnns search --distributed --index DIR "query text"
"""

from __future__ import annotations

import atexit
import builtins
import hashlib
import json
import math
import os
import pickle
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

import imrnns_kernels
from imrnns._atomic import check_replaceable, resolve_directory
from imrnns._distributed_settings import DEFAULT_TIMEOUT_S, EXCHANGES, MAX_TIMEOUT_S
from imrnns.index.core import (
    SEARCH_CHUNK,
    STORAGE_DTYPES,
    IMRNNIndex,
    as_float_tensor,
    check_search_args,
    check_unique_doc_ids,
    feedback_set,
    parse_ids,
    topk_by_score_then_id,
)
from imrnns.index.first_stage import settings_for_rows
from imrnns.index.storage import IndexError_, read_ids, read_manifest
from imrnns.model import IMRNN
from imrnns_kernels import _validation as checks
from imrnns_kernels.dispatch import check_workspace_bytes

__all__ = [
    "DEFAULT_TIMEOUT",
    "EXCHANGES",
    "DistributedIMRNNIndex",
    "init_from_env",
    "memory_per_rank",
    "run_on_every_rank",
    "search_memory",
    "shard_bounds",
]

# Largest single all-reduce message in the rows exchange; bounds the extra buffers NCCL/gloo
# allocate for one call (a 4096-query block at feedback_k=100, m=256, fp32 is 420 MB).
MAX_MESSAGE_BYTES = 64 << 20
# Bound on every wait in a collective, and the process group's timeout from init_from_env
# (the seconds live in a torch-free module: the command line's help shows them).
DEFAULT_TIMEOUT = timedelta(seconds=DEFAULT_TIMEOUT_S)

_T = TypeVar("_T")


# --------------------------------------------------------------------------- process group
def init_from_env(
    backend: str = "auto", timeout: float | timedelta | None = DEFAULT_TIMEOUT
) -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...).

    Args:
        backend: ``"nccl"``, ``"gloo"`` or ``"auto"`` (NCCL when CUDA is available, else gloo).
        timeout: the process group's collective timeout, seconds or a timedelta (default 300
            s; None: torch's own, 10 min for NCCL and 30 min for gloo).

    Returns:
        (rank, world_size, device): the device is ``cuda:LOCAL_RANK`` for NCCL (and made
        current), ``cpu`` for gloo. Without torchrun's variables: (0, 1, cpu), no group.
    """
    if backend not in ("auto", "nccl", "gloo"):
        raise ValueError(f"backend must be 'auto', 'nccl' or 'gloo', got {backend!r}")
    if timeout is not None:
        timeout = as_timeout(timeout)
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("the NCCL backend needs CUDA GPUs; use --dist-backend gloo on CPUs")
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            return 0, 1, device
        kwargs: dict[str, Any] = {"backend": backend}
        if timeout is not None:
            kwargs["timeout"] = timeout
        if backend == "nccl":
            kwargs["device_id"] = device
        dist.init_process_group(**kwargs)
    return dist.get_rank(), dist.get_world_size(), device


def shard_bounds(n: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rows [lo, hi) of ``n`` that ``rank`` holds: contiguous blocks, sizes differ by <= 1."""
    if world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    base, extra = divmod(n, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


# --------------------------------------------------------------------------- failures and time
def as_timeout(timeout: float | timedelta) -> timedelta:
    """``timeout`` (seconds, or a timedelta) as a timedelta, checked: positive and finite."""
    if isinstance(timeout, timedelta):
        seconds = timeout.total_seconds()
    elif isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(
            f"timeout must be a number of seconds or a timedelta, got {type(timeout).__name__}"
        )
    else:
        seconds = float(timeout)
    if not 0 < seconds <= MAX_TIMEOUT_S:
        raise ValueError(
            f"timeout must be a positive number of seconds up to {MAX_TIMEOUT_S}, got {timeout!r}"
        )
    return timedelta(seconds=seconds)


def _describe(exc: BaseException) -> list[str]:
    """[built-in class the other ranks raise, the exception's full type name, its message].

    The built-in class is the first one in the exception's MRO that takes a message (so
    ``except ValueError`` / ``except OSError`` still catch a peer's domain error); exceptions
    with no such base (``SafetensorError``, ``KeyboardInterrupt``) arrive as RuntimeError.
    """
    kind = type(exc)
    base = "RuntimeError"
    for cls in kind.__mro__:
        if cls.__module__ != "builtins" or cls is Exception or not issubclass(cls, Exception):
            continue
        try:
            cls("probe")
        except Exception:  # e.g. UnicodeDecodeError needs five arguments
            continue
        base = cls.__name__
        break
    name = kind.__qualname__
    if kind.__module__ != "builtins":
        name = f"{kind.__module__}.{name}"
    return [base, name, str(exc) or name]


def _peer_error(rank: int, status: list[str], what: str, failed: list[int]) -> Exception:
    """The exception a healthy rank raises for rank ``rank``'s failure ``status``."""
    base, name, message = status
    cls = getattr(builtins, base, RuntimeError)
    if not (isinstance(cls, type) and issubclass(cls, Exception)):
        cls = RuntimeError
    also = f"; ranks {failed} failed" if len(failed) > 1 else ""
    exc = cls(f"rank {rank}: {name}: {message} (in {what}{also})")
    exc.failed_rank = rank  # type: ignore[attr-defined]
    return exc


def _note(exc: BaseException, text: str) -> None:
    if hasattr(exc, "add_note"):  # Python >= 3.11
        exc.add_note(text)


# Seconds the interpreter waits at exit, the GIL released, for the backend's threads (below).
EXIT_GRACE_S = 0.05
_EXIT_HOOK_REGISTERED = False


def _let_backend_threads_finish() -> None:
    """At interpreter exit: release the GIL for a moment before Python shuts down.

    gloo's worker threads drop their reference to a finished collective's tensors just after
    ``wait`` returns, and with PyTorch's preserved tensor PyObjects that drop takes the GIL.
    If the process reaches interpreter shutdown first, such a thread is stopped while taking
    the GIL inside a C++ destructor and the process aborts ("terminate called without an
    active exception", SIGABRT, after a successful run). Sleeping here lets them finish.
    """
    time.sleep(EXIT_GRACE_S)


def _register_exit_hook() -> None:
    global _EXIT_HOOK_REGISTERED
    if not _EXIT_HOOK_REGISTERED:
        atexit.register(_let_backend_threads_finish)
        _EXIT_HOOK_REGISTERED = True


class _Collectives:
    """The collectives of one distributed index (or load) over ``group``, and its error path.

    Every wait is bounded by ``timeout`` (async collectives waited on with that bound: gloo and
    NCCL both raise when it passes). Every rank-local step between two collectives is wrapped:
    a step followed by a data collective runs in :meth:`attempt`, which keeps an exception
    and lets the rank join that collective with stand-in inputs of the same shapes; every data
    collective (:meth:`gather`, :meth:`reduce_`) carries one failure flag per rank, so the
    happy path costs no extra message. Any other step runs in :meth:`run`, which exchanges
    the flags on their own. Only when a flag is set do the ranks exchange the failed ranks'
    [type, name, message], then raise on every rank. So a failure on one rank never leaves
    the others waiting in the next collective.

    After a collective times out or loses a peer, or after a step that changed a rank's shard
    (``breaks=True``) failed, the ranks' collectives or shards are out of step: ``broken``
    says why, and every later collective raises RuntimeError at once.
    """

    def __init__(self, group: Any, timeout: float | timedelta) -> None:
        self.group = group
        self.timeout = as_timeout(timeout)
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(group) if self.distributed else 0
        if self.distributed:
            _register_exit_hook()
        self.world_size = dist.get_world_size(group) if self.distributed else 1
        backend = dist.get_backend(group) if self.distributed else "gloo"
        # NCCL moves CUDA tensors only; gloo moves CPU tensors.
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if backend == "nccl"
            else torch.device("cpu")
        )
        self.broken: str | None = None
        # This rank's failed step (attempt), raised on every rank by the next collective.
        self.failure: BaseException | None = None

    # ------------------------------------------------------------------ bounded waits
    def _usable(self, what: str) -> None:
        if self.broken is not None:
            raise RuntimeError(
                f"rank {self.rank}: {what}: this distributed index can no longer be used "
                f"({self.broken})"
            )

    def _wait(self, work: Any, what: str) -> None:
        try:
            done = work.wait(timeout=self.timeout)
        except RuntimeError as exc:
            seconds = self.timeout.total_seconds()
            if "timed out" in str(exc).lower():
                self.broken = f"{what} timed out after {seconds:g} s"
                raise TimeoutError(
                    f"rank {self.rank}: {what}: not every rank of the group joined within "
                    f"{seconds:g} s (a rank died, hangs, or made another call); the process "
                    "group is now out of step: end the job"
                ) from exc
            self.broken = f"{what} failed: {exc}"
            raise RuntimeError(
                f"rank {self.rank}: {what}: the collective failed ({exc}); the process "
                "group is now out of step: end the job"
            ) from exc
        if done is False:  # a backend that reports the timeout instead of raising
            self.broken = f"{what} timed out"
            raise TimeoutError(f"rank {self.rank}: {what}: no answer within {self.timeout}")

    # ------------------------------------------------------------------ the collectives
    def all_gather(self, t: torch.Tensor, what: str) -> list[torch.Tensor]:
        """Plain all-gather (no failure flag): the exchanges of the error path itself."""
        if not self.distributed:
            return [t]
        self._usable(what)
        src = t.to(self.device).contiguous()
        out = [torch.empty_like(src) for _ in range(self.world_size)]
        self._wait(dist.all_gather(out, src, group=self.group, async_op=True), what)
        return [o.to(t.device) for o in out]

    def gather(self, tensors: Sequence[torch.Tensor], what: str) -> list[list[torch.Tensor]]:
        """Every rank's ``tensors`` (same shapes and dtypes on every rank), in rank order.

        One all-gather of their bytes plus this rank's failure flag (one byte); raises on
        every rank when a rank's step before it failed (:meth:`attempt`).
        """
        if not self.distributed:
            return [list(tensors)]
        self._usable(what)
        flag = torch.tensor([int(self.failure is not None)], dtype=torch.uint8)
        parts = [t.detach().contiguous().view(-1).view(torch.uint8) for t in tensors]
        src = torch.cat([p.to(self.device) for p in parts] + [flag.to(self.device)])
        out = [torch.empty_like(src) for _ in range(self.world_size)]
        self._wait(dist.all_gather(out, src, group=self.group, async_op=True), what)
        self.settle(what, torch.stack([o[-1] for o in out]).tolist())
        gathered = []
        for o in out:
            pieces, lo = [], 0
            for t in tensors:
                size = t.numel() * t.element_size()
                # clone: a view of another dtype needs an aligned start
                piece = o[lo : lo + size].clone().view(t.dtype).view(t.shape).to(t.device)
                pieces.append(piece)
                lo += size
            gathered.append(pieces)
        return gathered

    def reduce_(self, tensors: Sequence[torch.Tensor], what: str, exact: bool) -> None:
        """In-place sum over ranks of contiguous ``tensors``, with the ranks' failure flags.

        ``exact``: one-owner tables (each slot non-zero on one rank at most), summed on their
        bytes (``uint8``), so bit-exact for every dtype (x + 0 = x). Otherwise a float sum
        (the partial means). Messages are at most ``MAX_MESSAGE_BYTES``; the flags (one slot
        per rank, so their sum says which ranks failed) ride with the last one. Raises on
        every rank when a rank's step before it failed (:meth:`attempt`).
        """
        if not self.distributed:
            return
        self._usable(what)
        flat = [t.view(-1).view(torch.uint8) if exact else t.view(-1) for t in tensors]
        dtype = flat[0].dtype if flat else torch.uint8
        flags = torch.zeros(self.world_size, dtype=dtype)
        flags[self.rank] = int(self.failure is not None)
        per = max(1, MAX_MESSAGE_BYTES // flags.element_size())  # elements per message
        parts = [f[lo : lo + per] for f in flat for lo in range(0, f.numel(), per)]
        # Consecutive parts share a message up to `per` elements (small tables: one message);
        # the flags join the last message (alone when there is nothing else to sum).
        messages: list[list[torch.Tensor]] = [[]]
        size = 0
        for part in parts:
            if messages[-1] and size + part.numel() > per:
                messages.append([])
                size = 0
            messages[-1].append(part)
            size += part.numel()
        for i, message in enumerate(messages):
            last = i == len(messages) - 1
            pieces = [part.to(self.device) for part in message]
            if last:
                pieces.append(flags.to(self.device))
            src = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
            self._wait(dist.all_reduce(src, group=self.group, async_op=True), what)
            lo = 0
            for part in message:
                got = src[lo : lo + part.numel()]
                if got.data_ptr() != part.data_ptr():  # in place when the message was the part
                    part.copy_(got)
                lo += part.numel()
            if last:
                flags = src[lo:]
        self.settle(what, [int(f) for f in flags.tolist()])

    def _gather_bytes(self, data: bytes, what: str, root_only: bool) -> list[memoryview]:
        """Every rank's ``data`` (on every rank, or on group rank 0 only), bounded waits."""
        sizes = [
            int(s) for s in self.all_gather(torch.tensor([len(data)], dtype=torch.int64), what)
        ]
        buf = torch.zeros(max(1, *sizes), dtype=torch.uint8)
        buf.numpy()[: len(data)] = np.frombuffer(data, dtype=np.uint8)
        if root_only:
            src = buf.to(self.device)
            out = (
                [torch.empty_like(src) for _ in range(self.world_size)] if self.rank == 0 else None
            )
            root = dist.get_global_rank(self.group, 0) if self.group is not None else 0
            work = dist.gather(src, out, dst=root, group=self.group, async_op=True)
            self._wait(work, what)
            parts = [o.cpu() for o in out] if out is not None else []
        else:
            parts = self.all_gather(buf, what)
        return [memoryview(p.numpy())[:size] for p, size in zip(parts, sizes, strict=False)]

    def gather_json(self, obj: Any, what: str) -> list[Any]:
        """Every rank's JSON-able ``obj``, in rank order, on every rank."""
        if not self.distributed:
            return [json.loads(json.dumps(obj))]
        self._usable(what)
        parts = self._gather_bytes(json.dumps(obj).encode(), what, root_only=False)
        return [json.loads(bytes(p)) for p in parts]

    def gather_to_root(self, obj: Any, what: str) -> list[Any]:
        """Every rank's ``obj`` (pickled, as ``gather_object``) on group rank 0; [] elsewhere."""
        if not self.distributed:
            return [obj]
        self._usable(what)
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        parts = self._gather_bytes(data, what, root_only=True)
        del data
        # The ranks of one process group trust each other (as torch's gather_object does).
        return [pickle.loads(p) for p in parts]

    # ------------------------------------------------------------------ the error path
    def attempt(self, step: Callable[[], _T], fallback: Callable[[], _T]) -> _T:
        """``step()``, or, if it raises, ``fallback()`` (inputs of the same shapes for the next
        collective) with the exception kept: that collective carries this rank's failure flag
        and raises on every rank (:meth:`gather`, :meth:`reduce_`). So a step followed by a
        data collective costs no exchange of its own. Without a group, ``step()``."""
        if not self.distributed:
            return step()
        try:
            return step()
        except BaseException as exc:  # any failure: reported to every rank, re-raised here
            self.failure = exc
            return fallback()

    def settle(self, what: str, flags: list[int], breaks: bool = False) -> None:
        """After a collective that carried the ranks' failure flags: when any is set, exchange
        the failed ranks' [type, name, message] and raise on every rank (the failed rank its
        own exception, the others :func:`_peer_error`)."""
        if not any(flags):
            return
        err, self.failure = self.failure, None
        statuses = self.gather_json(None if err is None else _describe(err), what)
        self._raise(what, err, statuses, breaks)

    def _raise(
        self, what: str, err: BaseException | None, statuses: list[Any], breaks: bool
    ) -> None:
        failed = [r for r, st in enumerate(statuses) if st is not None]
        if not failed:
            return
        if breaks:
            self.broken = (
                f"{what} failed on ranks {failed} after some ranks had changed their shards; "
                "build or load the index again"
            )
        if err is not None:
            _note(err, f"(rank {self.rank} of {self.world_size}, in {what}; every rank raised)")
            err.failed_rank = self.rank  # type: ignore[union-attr]
            raise err
        raise _peer_error(failed[0], statuses[failed[0]], what, failed)

    def run(
        self,
        what: str,
        step: Callable[[], _T],
        *,
        signature: str | None = None,
        breaks: bool = False,
    ) -> _T:
        """Run the rank-local ``step`` on every rank; if it raised on any rank, raise on all.

        For a step that no data collective follows: the ranks exchange their failure flags
        (one all-gather of world_size x 8 bytes) and, only when one is set, the failed
        ranks' [type, name, message].

        Args:
            what: the call, for messages (``"search()"``).
            step: the work this rank does before the next collective.
            signature: when given, the call's arguments must match across ranks (compared
                in the same exchange, which then always carries the statuses).
            breaks: ``step`` changes this rank's shard, so a failure on any rank leaves the
                shards inconsistent: the index refuses further calls.
        """
        result: Any = self.attempt(step, lambda: None)
        if not self.distributed:
            return result
        if signature is None:
            flags = self.all_gather(torch.tensor([int(self.failure is not None)]), what)
            self.settle(what, [int(f) for f in flags], breaks)
            return result
        err, self.failure = self.failure, None
        pairs = self.gather_json([signature, None if err is None else _describe(err)], what)
        self._raise(what, err, [p[1] for p in pairs], breaks)
        signatures = [p[0] for p in pairs]
        if len(set(signatures)) > 1:
            ranks = [r for r, s in enumerate(signatures) if s != signatures[0]]
            raise ValueError(
                f"{what}: ranks {ranks} were called with arguments that differ from rank 0's: "
                "every rank must make the same call"
            )
        return result

    def agree(self, what: str, value: str) -> list[int]:
        """Ranks whose ``value`` differs from rank 0's (none: [])."""
        values = self.gather_json(value, what)
        return [r for r, v in enumerate(values) if v != values[0]]


def run_on_every_rank(
    what: str,
    step: Callable[[], _T],
    *,
    group: Any = None,
    timeout: float | timedelta = DEFAULT_TIMEOUT,
) -> _T:
    """Run ``step`` on every rank of ``group``; if it raises on any rank, raise on every rank.

    For rank-local work between collectives outside an index (the command line encodes its
    shard with this): the failed rank re-raises its own exception, the others the same
    built-in type with ``"rank R: Type: message"``; the exchange waits at most ``timeout``.
    Without a process group, ``step()``.
    """
    return _Collectives(group, timeout).run(what, step)


# --------------------------------------------------------------------------- memory model
def memory_per_rank(
    num_docs: int,
    world_size: int = 1,
    *,
    input_dim: int = 384,
    dim: int = 256,
    modulation: str = "diagonal",
    aggregation: str = "mean_of_transforms",
    storage_dtype: str = "float32",
    first_stage: str = "flat",
    first_stage_space: str = "base",
    cache_document_transforms: bool = True,
    hidden_dims: tuple[int, int] = (128, 64),
    hnsw_m: int = 32,
) -> dict[str, int]:
    """Bytes one rank holds for its shard of ``num_docs`` documents (the largest shard).

    Computed from the storage layout, per document row:

    - ``projected``: m x bytes(storage_dtype) (the corpus the IMRNN stage reads);
    - ``first_stage``: the faiss copy in float32: n x 4 (``first_stage_space="base"``) or
      m x 4 (``"projected"``); IVF adds an 8-byte id per row, HNSW about 2 x hnsw_m x 4
      bytes of level-0 links plus 8 bytes of level data (upper levels add ~1/hnsw_m of that);
    - ``document_cache`` (``mean_of_transforms`` with the cache on): 2m x 4 for diagonal
      (activated ``[s, b]``), h2 x 4 for affine (last hidden state);
    - ``global_ids``: 8 bytes (int64 map from local row to global id).

    The model itself (a few MB) and per-search working memory are not included; see
    :func:`search_memory`.
    """
    if modulation not in checks.MODULATIONS:
        raise ValueError(f"modulation must be one of {checks.MODULATIONS}, got {modulation!r}")
    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(
            f"storage_dtype must be one of {sorted(STORAGE_DTYPES)}, got {storage_dtype!r}"
        )
    rows = math.ceil(num_docs / world_size)
    fs_dim = input_dim if first_stage_space == "base" else dim
    fs = fs_dim * 4
    if first_stage == "ivf":
        fs += 8
    elif first_stage == "hnsw":
        fs += 2 * hnsw_m * 4 + 8
    cache = 0
    if cache_document_transforms and aggregation == "mean_of_transforms":
        cache = (2 * dim if modulation == "diagonal" else hidden_dims[1]) * 4
    parts = {
        "projected": rows * dim * STORAGE_DTYPES[storage_dtype].itemsize,
        "first_stage": rows * fs,
        "document_cache": rows * cache,
        "global_ids": rows * 8,
    }
    parts["total"] = sum(parts.values())
    return parts


def search_memory(
    batch: int,
    feedback_k: int = 100,
    *,
    dim: int = 256,
    modulation: str = "diagonal",
    storage_dtype: str = "float32",
    exchange: str = "rows",
    cache_row_floats: int = 0,
) -> int:
    """Bytes of the exchange buffers one search block of ``batch`` queries allocates per rank.

    ``rows``: the (B, feedback_k, m) assembled rows plus (B, feedback_k, cache_row_floats)
    cache rows; ``partial``: one (B, OUT) float32 partial sum (OUT = 2m or m*m + m). The
    scoring kernels' own working memory comes on top.
    """
    if exchange == "rows":
        row_bytes = dim * STORAGE_DTYPES[storage_dtype].itemsize + 4 * cache_row_floats
        return batch * feedback_k * row_bytes
    return batch * checks.transform_dim(dim, modulation) * 4


# --------------------------------------------------------------------------- the index
class DistributedIMRNNIndex:
    """An :class:`~imrnns.index.IMRNNIndex` sharded over the ranks of a process group.

    Every document has a global position, its place in add order over the whole index
    (:meth:`add` gives every rank the same batch and each keeps a contiguous block;
    :meth:`add_shard` gives each rank its own rows, placed in rank order), and an id as
    ``IMRNNIndex`` gives it: the position itself for default int ids, the user's int ids
    (``ids=``), or names (``ids=`` / ``doc_ids=`` strings). Exchanges and ties use the
    positions; ``search`` returns, ``remove`` and ``allow`` take the ids. Searches return
    the same (scores, ids) on every rank, equal to one process's (module docstring).

    Args:
        model: the adapter (identical on every rank: checked at construction).
        feedback_k, first_stage, storage_dtype: as :class:`~imrnns.index.IMRNNIndex`.
        group: the process group (default: the world; none initialised means one process).
        exchange: ``"rows"`` (bit-exact) or ``"partial"`` (less traffic); see the module doc.
        query_block: None (default): the query blocks one process uses (``SEARCH_CHUNK``
            = 4096), required for bit-exact results, at the price of (4096, feedback_k, m)
            exchange buffers (420 MB at feedback_k=100, m=256, fp32). An int caps a block at
            that many queries (512: 52 MB), cutting each of those blocks into equal parts;
            results then agree with one process to float32 rounding only (about 1e-7),
            because batched per-query kernels (MKL GEMV/GEMM) can round a row differently in
            another batch shape.
        device: where this rank's shard lives (default: the model's device).
        timeout: bound on every wait in this index's collectives, seconds or a timedelta
            (default 300 s): a rank that does not join in time raises ``TimeoutError`` on
            the others. A failure on any rank is raised on every rank (module docstring).
        **index_kwargs: the other keyword arguments of :class:`~imrnns.index.IMRNNIndex`.
    """

    def __init__(
        self,
        model: IMRNN,
        feedback_k: int = 100,
        first_stage: str = "flat",
        storage_dtype: torch.dtype | str = torch.float32,
        *,
        group: Any = None,
        exchange: str = "rows",
        query_block: int | None = None,
        device: str | torch.device | None = None,
        timeout: float | timedelta = DEFAULT_TIMEOUT,
        **index_kwargs: Any,
    ) -> None:
        self._comm = _Collectives(group, timeout)
        self.group = group
        self.rank = self._comm.rank
        self.world_size = self._comm.world_size
        self.exchange = exchange
        self.query_block = query_block

        def build() -> IMRNNIndex:
            if exchange not in EXCHANGES:
                raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")
            if query_block is not None and (
                isinstance(query_block, bool)
                or not isinstance(query_block, int)
                or query_block <= 0
            ):
                raise ValueError(f"query_block must be a positive int or None, got {query_block!r}")
            return IMRNNIndex(
                model, feedback_k, first_stage, storage_dtype, device=device, **index_kwargs
            )

        self.local = self._comm.run("DistributedIMRNNIndex()", build)
        # Two numberings. Positions (_gids): every document's place in add order over the
        # whole index (0, 1, 2, ...; never reused), the key of every exchange and the
        # tie-break (ties go to the earlier-added document, as in one index). User ids: what
        # search returns and remove/allow take: the positions themselves for default int ids
        # (_uids None), else _uids (custom int ids) or the local index's names (str ids).
        self._gids = torch.empty(0, dtype=torch.int64, device=self.local.device)
        self._ntotal = 0
        # The next position an add gives.
        self._next_gid = 0
        # The next default int id an add gives: above every int id ever held (as one index).
        self._next_id = 0
        # (local rows,) bool: rows removed here but still stored by the local index (its
        # tombstones); None while there are none. _gids drops them when the local compacts.
        self._removed: torch.Tensor | None = None
        self._named: bool | None = None
        # (local rows,) int64 user ids aligned with _gids when some int id differs from its
        # position (the same decision on every rank), else None.
        self._uids: torch.Tensor | None = None
        # (sorted live user ids, their local rows): the lookup of _uids, built on first use.
        self._uid_index: tuple[torch.Tensor, torch.Tensor] | None = None
        # Sorted positions that hold no live document (removed, or loaded as removed), the
        # same on every rank: a boolean allow mask's entry j is the j-th live position.
        self._gone = torch.empty(0, dtype=torch.int64)
        self._agree("the model and index settings", self._settings_signature())

    # ------------------------------------------------------------------ properties
    @property
    def model(self) -> IMRNN:
        """The adapter (the same on every rank)."""
        return self.local.model

    @property
    def device(self) -> torch.device:
        """Where this rank's shard lives."""
        return self.local.device

    @property
    def ntotal(self) -> int:
        """Documents in the whole (global) index."""
        return self._ntotal

    @property
    def local_ntotal(self) -> int:
        """Documents this rank holds."""
        return self.local.ntotal

    @property
    def global_ids(self) -> torch.Tensor:
        """(local rows,) int64 global position (add order over the whole index) of each
        row of this shard's local index, ascending; equal to the ids for default int ids."""
        return self._gids

    @property
    def id_kind(self) -> str | None:
        """``"int"`` or ``"str"``: the kind of id the index holds (None before any add)."""
        if self._named is None:
            return None
        return "str" if self._named else "int"

    @property
    def feedback_k(self) -> int:
        """The default feedback set size of a search."""
        return self.local.feedback_k

    @property
    def encoder(self) -> str | None:
        """The encoder fingerprint the index was built with, or None."""
        return self.local.encoder

    def __len__(self) -> int:
        return self._ntotal

    def __repr__(self) -> str:
        return (
            f"DistributedIMRNNIndex(rank={self.rank}/{self.world_size}, ntotal={self._ntotal}, "
            f"local_ntotal={self.local_ntotal}, exchange={self.exchange!r}, local={self.local!r})"
        )

    # ------------------------------------------------------------------ collectives
    # All through self._comm: every wait bounded by the timeout, one error path (_Collectives).
    def _gather_object(self, obj: Any, what: str = "exchange") -> list[Any]:
        return self._comm.gather_json(obj, what)

    def _step(self, what: str, fn: Callable[[], _T], breaks: bool = False) -> _T:
        """Rank-local work between two collectives: a failure on any rank raises on all."""
        return self._comm.run(what, fn, breaks=breaks)

    def _agree(self, what: str, signature: str) -> None:
        ranks = self._comm.agree(what, signature)
        if ranks:
            raise ValueError(
                f"{what} differ across ranks (ranks {ranks} disagree with rank 0): every rank "
                "must make the same call"
            )

    def _checked(self, what: str, signature: str, fn: Callable[[], _T]) -> _T:
        """Run ``fn`` everywhere; raise on every rank if it failed on any or arguments differ."""
        return self._comm.run(what, fn, signature=signature)

    def _settings_signature(self) -> str:
        h = hashlib.sha256()
        for name, t in sorted(self.model.state_dict().items()):
            h.update(f"{name}{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        h.update(json.dumps(self.model.config.to_dict(), sort_keys=True).encode())
        h.update(json.dumps(self.local.settings(), sort_keys=True, default=str).encode())
        h.update(f"{self.exchange}/{self.query_block}".encode())
        return h.hexdigest()

    # ------------------------------------------------------------------ building
    def add(
        self,
        embeddings: np.ndarray | torch.Tensor,
        doc_ids: list[str] | None = None,
        *,
        ids: Any = None,
    ) -> np.ndarray | torch.Tensor | list[str]:
        """Collective: every rank passes the same (N, n) batch (and ids) and keeps its block.

        Ids as ``IMRNNIndex.add``: none (int ids continuing after the largest int id the
        index ever held), ``ids=`` N unique ints or strings, or ``doc_ids=`` N strings; one
        kind per index. Returns the batch's ids as ``IMRNNIndex.add`` does (int64 array or
        tensor, as the embeddings; a list for strings). Given ids must be new to the whole
        index and unique within the batch: every rank checks the whole batch against its
        own shard's live ids, and a refusal on any rank is raised on all (ValueError naming
        a few), before anything changes.
        """

        def validate() -> tuple[Any, ...]:
            checked = self._validate_add(embeddings, doc_ids, ids)
            lo, hi = shard_bounds(checked[0].shape[0], self.world_size, self.rank)
            if hi > lo:  # e.g. an IVF nlist larger than this rank's block: fail everywhere
                self.local.check_first_add(hi - lo)
            return checked

        sig = _batch_signature(embeddings, doc_ids if ids is None else ids)
        x, was_numpy, kind, new_ids = self._checked("add()", sig, validate)
        n = x.shape[0]
        lo, hi = shard_bounds(n, self.world_size, self.rank)
        start = self._next_gid

        def add_block() -> None:
            if hi > lo:
                names = list(new_ids[lo:hi]) if kind == "str" else None
                self.local.add(x[lo:hi], names)

        self._step("add()", add_block, breaks=True)
        custom = kind == "int" and not np.array_equal(new_ids, np.arange(start, start + n))
        self._extend(start + lo, start + hi, n, kind, new_ids[lo:hi], custom)
        if kind == "int":
            self._next_id = max(self._next_id, int(new_ids.max()) + 1)
        return self._returned(kind, new_ids, was_numpy)

    def add_shard(
        self,
        embeddings: np.ndarray | torch.Tensor,
        doc_ids: list[str] | None = None,
        *,
        ids: Any = None,
    ) -> np.ndarray | torch.Tensor | list[str]:
        """Collective: each rank passes its own (N_r, n) rows (N_r may be 0), and their ids.

        Positions follow rank order: rank 0's rows first, then rank 1's, and so on; equal to
        one index that added the ranks' batches concatenated in rank order (default int ids
        too: numbered in that order after the largest int id ever held). Ids as :meth:`add`
        (the same kind on every rank). Returns this rank's ids. Given ids are checked on
        each rank against that rank's own ids and within its own rows (a refusal is raised
        on every rank); an id another rank holds or passes is not detected (that would need
        every id gathered), so ids must not repeat across ranks' calls.
        """
        sig = "add_shard"  # the rows differ by design; the call itself must match

        def validate() -> tuple[Any, ...]:
            checked = self._validate_add(embeddings, doc_ids, ids, allow_empty=True)
            if checked[0].shape[0] > 0:
                self.local.check_first_add(checked[0].shape[0])
            return checked

        x, was_numpy, kind, new_ids = self._checked("add_shard()", sig, validate)
        given = doc_ids is not None or ids is not None
        mine = int(x.shape[0])
        top = int(new_ids.max()) if kind == "int" and given and mine else -1
        shapes = self._gather_object([mine, given, kind, top], "add_shard()")
        counts = [int(c) for c, _, _, _ in shapes]
        # A rank without rows passes no id, so its kind says nothing: the others' decides.
        kinds = {k for c, g, k, _ in shapes if g and c > 0}
        if len({bool(g) for _, g, _, _ in shapes}) > 1 or len(kinds) > 1:
            raise ValueError(
                "add_shard(): ids must be given on every rank or on none, of one kind "
                f"(ranks gave {[k if g and c else None for c, g, k, _ in shapes]})"
            )
        if given and mine == 0:
            kind = kinds.pop() if kinds else ("str" if self._named else "int")
            new_ids = [] if kind == "str" else np.zeros(0, dtype=np.int64)
        before = sum(counts[: self.rank])
        start = self._next_gid + before
        if not given:  # default ids, numbered in rank order like the positions
            new_ids = np.arange(self._next_id + before, self._next_id + before + mine)
        # A custom id on any rank (or default ids that no longer equal the positions) makes
        # the whole index keep user ids: decided from the gathered shapes, so on every rank.
        custom = any(g and k == "int" for _, g, k, _ in shapes) or (
            kind == "int" and self._next_id != self._next_gid
        )

        def add_rows() -> None:
            if mine > 0:
                self.local.add(x, list(new_ids) if kind == "str" else None)

        self._step("add_shard()", add_rows, breaks=True)
        self._extend(start, start + mine, sum(counts), kind, new_ids, custom)
        if kind == "int":
            tops = [t for _, _, _, t in shapes] + [self._next_id - 1]
            if not given:
                tops.append(self._next_id + sum(counts) - 1)
            self._next_id = max(tops) + 1
        return self._returned(kind, new_ids, was_numpy)

    @staticmethod
    def _returned(kind: str, new_ids: Any, was_numpy: bool) -> np.ndarray | torch.Tensor | list:
        """An add's ids as ``IMRNNIndex.add`` returns them."""
        if kind == "str":
            return list(new_ids)
        out = torch.from_numpy(np.asarray(new_ids, dtype=np.int64).copy())
        return out.numpy() if was_numpy else out

    def _validate_add(
        self, embeddings: Any, doc_ids: Any, ids: Any, allow_empty: bool = False
    ) -> tuple[torch.Tensor, bool, str, Any]:
        """(rows, numpy?, "int" or "str", the batch's ids: int64 array or list of str).

        The whole batch is checked on every rank before anything changes, so a bad row in
        one rank's block cannot leave the ranks with different corpora."""
        x, was_numpy = as_float_tensor(embeddings, "embeddings")
        n = self.model.config.input_dim
        if x.dim() != 2 or x.shape[1] != n:
            raise ValueError(
                f"embeddings must have shape (N, {n}), got {tuple(x.shape)} ({x.dtype})"
            )
        if x.shape[0] == 0 and not allow_empty:
            raise ValueError("embeddings is empty: nothing to add")
        checks.check_finite("embeddings", x)
        rows = int(x.shape[0])
        if doc_ids is not None and ids is not None:
            raise ValueError("give ids= or doc_ids= (the string-id spelling), not both")
        if doc_ids is not None and (
            isinstance(doc_ids, str)  # a str would be one name per character
            or len(doc_ids) != rows
            or not all(isinstance(d, str) for d in doc_ids)
        ):
            raise ValueError(f"doc_ids must be {rows} strings, one per embedding row")
        if doc_ids is not None:
            kind, new_ids = "str", list(doc_ids)
        elif ids is not None and rows == 0:  # no id says which kind: the index's (add_shard)
            kind = "str" if self._named else "int"
            new_ids = [] if kind == "str" else np.zeros(0, dtype=np.int64)
        elif ids is not None:
            kind, new_ids = parse_ids(ids, rows)
        else:  # add(): every rank numbers the whole batch (add_shard renumbers its rows)
            kind, new_ids = "int", np.arange(self._next_id, self._next_id + rows, dtype=np.int64)
        if self._named is not None and self._ntotal > 0 and self._named != (kind == "str"):
            how = "string ids (ids= or doc_ids=)" if self._named else "int ids"
            raise ValueError(
                f"doc_ids must be given on every add() or on none: this index holds {how}, "
                f"this add() gives {kind} ids (one kind of id per index)"
            )
        if kind == "str":
            check_unique_doc_ids(new_ids, ())  # within the batch
            taken: list[Any] = []
            if self.local.ntotal and self._named:  # live names here (a removed one may return)
                rows_here = self.local.rows_of(new_ids, skip_unknown=True)
                taken = list(self.local.ids_at(rows_here))
        elif ids is not None:
            unique = np.unique(new_ids)
            if unique.size != new_ids.size:
                seen: set[int] = set()
                repeated = [d for d in new_ids.tolist() if d in seen or seen.add(d)]
                raise ValueError(
                    f"ids must be unique: {sorted(set(repeated))[:5]} appear more than once "
                    "in this add()"
                )
            held, _ = self._rows_of_ints(torch.from_numpy(unique).to(self._gids.device))
            taken = unique[held.cpu().numpy()].tolist() if self._named is False else []
        else:
            taken = []
        if taken:
            shown = ", ".join(repr(d) for d in taken[:5])
            more = f" and {len(taken) - 5} more" if len(taken) > 5 else ""
            name = "doc_ids" if doc_ids is not None else "ids"
            raise ValueError(f"{name} must be new: {shown}{more} already in the index")
        return x, was_numpy, kind, new_ids

    def _extend(
        self, lo: int, hi: int, added: int, kind: str, block_ids: Any, custom: bool
    ) -> None:
        """Append this rank's new positions ``lo .. hi - 1`` (``block_ids``: their user
        ids); ``custom``: the batch's int ids differ from its positions (same on every rank)."""
        dev = self._gids.device
        new = torch.arange(lo, hi, dtype=torch.int64, device=dev)
        if kind == "int" and (custom or self._uids is not None):
            if self._uids is None:  # so far the user ids were the positions
                self._uids = self._gids.clone()
            block = torch.as_tensor(np.asarray(block_ids, dtype=np.int64), device=dev)
            self._uids = torch.cat([self._uids, block.reshape(-1)])
        self._gids = torch.cat([self._gids, new])
        if self._removed is not None:
            self._removed = torch.cat([self._removed, torch.zeros_like(new, dtype=torch.bool)])
        self._uid_index = None
        self._ntotal += added
        self._next_gid += added
        self._named = kind == "str"

    # ------------------------------------------------------------------ removing
    def remove(self, ids: Any) -> int:
        """Collective: remove documents by id (the ids search returns: ints, or names for a
        named index).

        Every rank passes the same ids. Each rank finds the ones its shard holds and removes
        them from its local index (tombstones, compacted as ``IMRNNIndex.remove`` does); one
        sum all-reduce finds ids no rank holds (never added, or already removed), which
        raise ValueError naming them on every rank before anything changes. The other
        documents keep their ids and positions, and later default ids continue after the
        largest id ever given. Searches then equal those of one process's index without the
        removed documents (ties still by add order).

        Returns:
            The number of documents removed.
        """
        what = "remove()"

        def validate() -> tuple[torch.Tensor, list[Any], torch.Tensor]:
            if isinstance(ids, np.ndarray | torch.Tensor) and ids.dtype in (np.bool_, torch.bool):
                raise TypeError("remove() takes a collection of ids, not a boolean mask")
            return self._held_rows(ids, what)

        rows, keys, found = self._checked(what, _allow_signature(ids), validate)
        positions = self._check_all_held(keys, found, what)

        def drop() -> None:
            if rows.numel() == 0:
                return
            self.local.remove(self.local.ids_at(rows.cpu().numpy()))
            if self._removed is None:
                self._removed = torch.zeros_like(self._gids, dtype=torch.bool)
            self._removed[rows] = True
            self._uid_index = None
            if self.local.projected_corpus.shape[0] == self.local.ntotal:  # it compacted
                self._drop_removed_rows()

        self._step(what, drop, breaks=True)
        self._gone = torch.cat([self._gone, positions.cpu()]).sort().values
        self._ntotal -= len(keys)
        return len(keys)

    def _drop_removed_rows(self) -> None:
        """Forget the rows of removed documents after the local index compacted them."""
        if self._removed is None:
            return
        keep = ~self._removed
        self._gids = self._gids[keep]
        if self._uids is not None:
            self._uids = self._uids[keep]
        self._removed = None
        self._uid_index = None

    def _rows_of_ints(self, wanted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(held here and live, local row or 0) for a tensor of user int ids."""
        if self._uids is None:  # user ids are positions
            owned, pos = self._locate(wanted)
            if self._removed is not None and pos.numel():
                owned &= ~self._removed[pos]
            return owned, pos
        if self._uid_index is None:
            live = self._live_rows()
            rows = torch.arange(self._uids.numel(), device=self._uids.device)
            rows = rows if live is None else live
            values = self._uids[rows]
            order = torch.argsort(values)
            self._uid_index = (values[order], rows[order])
        values, rows = self._uid_index
        if values.numel() == 0:
            return torch.zeros_like(wanted, dtype=torch.bool), torch.zeros_like(wanted)
        at = torch.searchsorted(values, wanted).clamp_(max=values.numel() - 1)
        hit = values[at] == wanted
        return hit, torch.where(hit, rows[at], torch.zeros_like(at))

    def _held_rows(self, ids: Any, what: str) -> tuple[torch.Tensor, list[Any], torch.Tensor]:
        """(this shard's live local rows of ``ids``, sorted; the sorted unique ids; for each
        of them, its position + 1 where this shard holds it, else 0). Ids: the index's kind
        (ints, or names for a named index)."""
        dev = self._gids.device
        if isinstance(ids, str | bytes | int) or not isinstance(
            ids, Sequence | set | frozenset | np.ndarray | torch.Tensor | range
        ):
            raise TypeError(
                f"{what} must be a collection of ids (set, list, array), got {type(ids).__name__}"
            )
        values = ids.detach().cpu().numpy() if isinstance(ids, torch.Tensor) else ids
        if isinstance(values, np.ndarray):
            values = values.ravel().tolist()
        keys_in = [int(d) if isinstance(d, np.integer) else d for d in values]
        if self._named:
            if not all(isinstance(d, str) for d in keys_in):
                raise TypeError(f"{what}: this index holds named documents: give their names")
            keys = sorted(set(keys_in))
            rows = np.zeros(0, dtype=np.int64)
            if self.local_ntotal:
                rows = self.local.rows_of(keys, skip_unknown=True)
            names = self.local.ids_at(rows)
            slot = {name: i for i, name in enumerate(keys)}
            found = torch.zeros(len(keys), dtype=torch.int64)
            if rows.size:
                at = torch.as_tensor(rows, device=dev)
                found[[slot[name] for name in names]] = self._gids[at].cpu() + 1
            return torch.as_tensor(rows, device=dev), keys, found
        wrong = [d for d in keys_in if not isinstance(d, int) or isinstance(d, bool)]
        if wrong:
            raise TypeError(f"{what}: this index holds int ids, got {wrong[:5]}")
        keys = sorted(set(keys_in))
        wanted = torch.as_tensor(keys, dtype=torch.int64, device=dev).reshape(-1)
        held, pos = self._rows_of_ints(wanted)
        found = torch.zeros(len(keys), dtype=torch.int64)
        if bool(held.any()):
            found[held.cpu()] = self._gids[pos[held]].cpu() + 1
        return pos[held].sort().values, keys, found

    def _check_all_held(self, keys: list[Any], found: torch.Tensor, what: str) -> torch.Tensor:
        """The positions of ``keys`` (one sum over the ranks of ``found``: position + 1 where
        a shard holds the key, 0 elsewhere); ValueError on every rank naming keys no shard
        holds."""
        self._comm.reduce_([found], what, exact=False)  # int64: an exact sum
        unknown = [key for key, c in zip(keys, found.tolist(), strict=True) if c == 0]
        if unknown:  # every rank summed the same counts: every rank raises here
            shown = ", ".join(map(repr, unknown[:5]))
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            raise ValueError(f"{what}: ids not in the index: {shown}{more}")
        return found - 1

    def _live_rows(self) -> torch.Tensor | None:
        """This shard's local rows not removed, or None when none is removed."""
        if self._removed is None:
            return None
        return torch.nonzero(~self._removed).flatten()

    # ------------------------------------------------------------------ shard construction
    @classmethod
    def from_index(
        cls,
        index: IMRNNIndex,
        *,
        group: Any = None,
        exchange: str = "rows",
        query_block: int | None = None,
        device: str | torch.device | None = None,
        timeout: float | timedelta = DEFAULT_TIMEOUT,
    ) -> DistributedIMRNNIndex:
        """Collective: shard an in-memory single-process index that every rank holds.

        Each rank keeps a contiguous block of its live documents (projected rows, cache rows,
        first-stage vectors) with their ids (default, custom ints or names); removed
        documents are left out and the next default id is kept, so searches, ``remove``,
        ``allow`` and later adds behave as on ``index``.
        """
        cfg = index.settings()
        out = cls(
            index.model,
            group=group,
            exchange=exchange,
            query_block=query_block,
            device=device or index.device,
            timeout=timeout,
            **cfg,
        )
        live_n = index.ntotal
        lo, hi = shard_bounds(live_n, out.world_size, out.rank)
        cache = index.document_cache
        kind = index.id_kind
        # Every rank holds the same index: the same decision everywhere.
        custom = kind == "int" and not np.array_equal(index.ids, np.arange(live_n))

        def block() -> tuple[IMRNNIndex, Any]:
            rows = np.arange(lo, hi, dtype=np.int64)
            removed = index.removed_rows
            if removed.size:  # the live rows lo .. hi - 1, skipping tombstones
                stored = index.projected_corpus.shape[0]
                rows = np.setdiff1d(np.arange(stored), removed, assume_unique=True)[lo:hi]
            first, last = (int(rows[0]), int(rows[-1]) + 1) if rows.size else (0, 0)
            take = torch.from_numpy(rows).to(index.projected_corpus.device)
            ids = index.ids_at(rows)
            local = IMRNNIndex.from_parts(
                index.model,
                index.projected_corpus.index_select(0, take),
                index.first_stage_vectors(first, last)[rows - first],
                document_cache=None
                if cache is None
                else cache.index_select(0, take.to(cache.device)),
                doc_ids=list(ids) if kind == "str" else None,
                device=out.device,
                **settings_for_rows(cfg, hi - lo),
            )
            return local, ids

        local, ids = out._step("from_index()", block)
        uids = torch.as_tensor(np.asarray(ids, dtype=np.int64)) if custom else None
        next_id = index.next_id if kind == "int" else 0
        out._install(local, torch.arange(lo, hi), live_n, kind == "str", uids, live_n, next_id)
        return out

    @classmethod
    def load(
        cls,
        directory: str | Path,
        *,
        group: Any = None,
        exchange: str = "rows",
        query_block: int | None = None,
        device: str | torch.device | None = None,
        verify: bool = True,
        timeout: float | timedelta = DEFAULT_TIMEOUT,
    ) -> DistributedIMRNNIndex:
        """Collective: each rank loads only its block of an index saved by ``IMRNNIndex.save``.

        The projected corpus and the cache are read by slice (safetensors), a flat first stage
        through a memory map, so no rank holds the whole corpus. IVF/HNSW first stages are
        read whole once, then rebuilt per shard (approximate: not equal to the saved one).
        Saved ids (default, custom int ids, names), removed documents and the next default
        id (format 2) are kept: every rank reads ``ids.safetensors`` (8 bytes per stored row
        and per removed one), the ranks split the live documents evenly and drop the
        tombstones of their block, so searches equal ``IMRNNIndex.load``'s.
        Every rank hashes the manifest it read (SHA-256) before and after reading its block,
        and the ranks compare the hashes, so ranks that resolved different versions of
        ``directory`` (one of them caught while a save replaced it) never mix their shards.

        Raises:
            FileNotFoundError / ValueError: as ``IMRNNIndex.load`` (missing, truncated or
            tampered files, checked against the manifest's sizes and SHA-256), on every rank.
            IndexError_ (a ValueError): the ranks read different manifests, or the directory
            was replaced while a rank read it (load again), on every rank.
        """
        directory = Path(directory)
        comm = _Collectives(group, timeout)

        def read() -> tuple[Any, ...]:
            d = resolve_directory(directory)
            digest = _manifest_digest(d)
            manifest = _read_manifest(d, verify)
            int_ids, removed = read_ids(d, manifest)
            _check_unchanged(d, digest, comm.rank)
            return manifest, d, digest, int_ids, removed

        manifest, d, digest, int_ids, removed = comm.run("load()", read, signature=str(directory))
        differ = comm.agree("load()", str(digest))
        if differ:
            raise IndexError_(
                f"{directory}: ranks {differ} read another version of the index than rank 0 "
                f"(this rank, {comm.rank}, read the manifest with SHA-256 {digest}): the "
                "directory was replaced while the ranks opened it; load again"
            )
        cfg = dict(manifest["index"])
        n = int(manifest["ntotal"])
        removed = np.zeros(0, dtype=np.int64) if removed is None else removed.numpy()
        live_n = n - removed.size
        # This rank's share of the live documents, as the stored rows [lo, hi) that span
        # them (tombstones inside are read, then dropped): the ranks split the live rows,
        # not the stored ones, so a block of removed rows does not leave a rank idle.
        jlo, jhi = shard_bounds(live_n, comm.world_size, comm.rank)
        lo, hi = 0, 0
        if jhi > jlo:
            lo, hi = _live_row(jlo, removed), _live_row(jhi - 1, removed) + 1
        dead = torch.zeros(hi - lo, dtype=torch.bool)
        inside = removed[(removed >= lo) & (removed < hi)] - lo
        dead[torch.from_numpy(inside)] = True

        def read_block() -> IMRNNIndex:
            local = IMRNNIndex.load(d, device=device or "cpu", verify=False, rows=(lo, hi))
            _check_unchanged(d, digest, comm.rank)
            local.compact()  # drop the tombstones: the positions below skip them
            return local

        # A block that fails to read on one rank raises on every rank (no rank left waiting).
        local = comm.run("load()", read_block)
        out = cls(
            local.model,
            group=group,
            exchange=exchange,
            query_block=query_block,
            device=device or "cpu",
            timeout=timeout,
            **cfg,
        )
        named = "doc_ids.json" in manifest["files"]
        uids = None if int_ids is None else int_ids[lo:hi][~dead]
        next_id = manifest.get("next_id")
        if next_id is None:  # an older save: one above the largest stored id, as a load infers
            next_id = int(int_ids.max()) + 1 if int_ids is not None and n else n
        positions = torch.arange(lo, hi)[~dead]
        out._install(local, positions, live_n, named, uids, n, 0 if named else next_id, removed)
        return out

    # ------------------------------------------------------------------ saving
    def save(self, directory: str | Path) -> Path:
        """Collective: write the whole index to ``directory``, one ordinary index directory.

        The result is what ``IMRNNIndex.save`` writes for the same documents (manifest with
        SHA-256 checksums, adapter, corpus, first stage, names), readable by
        ``IMRNNIndex.load`` and by :meth:`load` at any world size. Every rank sends its shard
        to rank 0 (a gather: the barrier), which assembles the index in global-id order and
        writes it to a temporary sibling directory, renamed over ``directory`` only once
        complete; a rank that dies before that leaves ``directory`` as it was (a temporary
        of a killed save is removed by the next save to the same path). Errors are raised
        on every rank. Rank 0 holds the whole index while it writes; a flat first stage is
        rebuilt from the shards' vectors exactly, IVF/HNSW are retrained over all of them.

        Returns:
            ``directory`` as a Path, on every rank.
        """
        directory = Path(directory)

        def validate() -> None:
            if self._ntotal == 0:
                raise ValueError("the index is empty: nothing to save")
            check_replaceable(directory, "manifest.json")

        what = f"save() of {directory}"
        self._checked(what, str(directory), validate)

        def piece() -> tuple[Any, ...]:
            if self._removed is not None:  # rows of removed documents are not saved
                self.local.compact()
                self._drop_removed_rows()
            cache = self.local.document_cache
            return (
                self._gids.cpu(),
                self.local.projected_corpus.detach().cpu(),
                None if cache is None else cache.detach().cpu(),
                self.local.first_stage_vectors(),
                self.local.doc_ids if self._named else None,
                None if self._uids is None else self._uids.cpu(),
            )

        pieces = self._comm.gather_to_root(self._step(what, piece), what)

        def write() -> None:
            if self.rank == 0:
                self._assemble(pieces).save(directory)

        # Any failure of rank 0's write (a full disk in faiss's write_index is a
        # RuntimeError) is raised on every rank.
        self._step(what, write)
        return directory

    def _assemble(self, pieces: list[Any]) -> IMRNNIndex:
        """One single-process index from the ranks' (gids, corpus, cache, vectors, names)."""
        pieces = [p for p in pieces if p[0].numel() > 0]
        gids = torch.cat([p[0] for p in pieces])
        order = torch.argsort(gids)
        ordered = gids[order]
        if ordered.numel() != self._ntotal or bool((ordered[1:] <= ordered[:-1]).any()):
            raise ValueError("the shards' global ids do not hold each document exactly once")
        corpus = torch.cat([p[1] for p in pieces])[order]
        caches = [p[2] for p in pieces]
        cache = None if caches[0] is None else torch.cat(caches)[order]
        vectors = np.concatenate([p[3] for p in pieces])[order.numpy()]
        names = None
        if pieces[0][4] is not None:
            flat = [name for p in pieces for name in p[4]]
            names = [flat[i] for i in order.tolist()]
        cfg = self.local.settings()
        if cfg.get("first_stage") == "ivf":
            cfg["nlist"] = None  # sized for the whole corpus again
        # Custom int ids are saved as they are; default ids are the positions, saved as the
        # documents' int ids when removals left gaps.
        ids = None
        if pieces[0][5] is not None:
            ids = torch.cat([p[5] for p in pieces])[order].numpy()
        elif names is None and not torch.equal(ordered, torch.arange(self._ntotal)):
            ids = ordered.numpy()
        return IMRNNIndex.from_parts(
            self.model,
            corpus,
            vectors,
            document_cache=cache,
            doc_ids=names,
            ids=ids,
            next_id=None if names is not None else self._next_id,
            device="cpu",
            **cfg,
        )

    def _install(
        self,
        local: IMRNNIndex,
        positions: torch.Tensor,
        ntotal: int,
        named: bool,
        uids: torch.Tensor | None,
        next_gid: int,
        next_id: int,
        gone: np.ndarray | None = None,
    ) -> None:
        """Make ``local`` (no tombstones; its rows at global ``positions``, ascending) this
        rank's shard of ``ntotal`` live documents; ``uids``: their user int ids when they
        differ from the positions (None on every rank otherwise); ``gone``: the sorted
        positions below ``next_gid`` that hold no live document."""
        self.local = local
        self._gids = positions.to(torch.int64).to(local.device)
        self._uids = None if uids is None else uids.to(torch.int64).to(local.device)
        self._uid_index = None
        self._ntotal = ntotal
        self._next_gid = next_gid
        self._next_id = next_id
        self._removed = None
        self._named = named
        self._gone = torch.from_numpy(np.zeros(0, dtype=np.int64) if gone is None else gone)

    # ------------------------------------------------------------------ searching
    def _validate_search(
        self, queries: Any, k: Any, mode: Any, feedback_k: Any, encoder: Any
    ) -> tuple[torch.Tensor, bool, int]:
        return check_search_args(
            queries,
            k,
            mode,
            feedback_k,
            self.feedback_k,
            encoder,
            self.encoder,
            self._ntotal,
            self.model.config.input_dim,
        )

    @torch.no_grad()
    def search(
        self,
        queries: np.ndarray | torch.Tensor,
        k: int = 10,
        mode: str = "rerank",
        *,
        feedback_k: int | None = None,
        encoder: str | None = None,
        workspace_bytes: int | None = None,
        allow: Any = None,
    ) -> tuple[np.ndarray, np.ndarray] | tuple[torch.Tensor, torch.Tensor]:
        """Collective top-k over the whole sharded corpus; same contract as ``IMRNNIndex.search``.

        Every rank passes the same queries and gets the same (scores, ids), those one
        process's index of the same documents returns: int64 ids with -1 padding (default
        or custom int ids), or the names with None padding for a named index (a numpy
        object array for numpy queries, a list of lists for torch queries). Mapping results
        to custom ids or names costs one more exchange per call (an exact sum all-reduce of
        (B, k) int64, or a gather of the names each rank holds). ``workspace_bytes`` bounds this rank's exhaustive scan of its shard (as
        ``IMRNNIndex.search``); ranks may pass different values (the results do not depend
        on it), and a budget too small on one rank raises ``ValueError`` on every rank.

        ``allow`` (the same on every rank) restricts the search as ``IMRNNIndex.search``
        does, with the result of one process's index given the same ``allow``: a collection
        of ids (or of names, for a named index: each rank looks up the ids it holds, and
        one sum all-reduce finds ids no rank holds, which raise ValueError on every rank),
        or a boolean mask of shape (``ntotal``,) aligned as one index's ``ids``: entry j is
        the j-th live document in add order (removed ones skipped). Each shard's
        first stage and exhaustive scan search only its allowed rows; an empty selection
        gives padding only.
        """
        sig = _call_signature(queries, k, mode, feedback_k, encoder) + _allow_signature(allow)

        def validate() -> tuple[Any, ...]:
            check_workspace_bytes(workspace_bytes)
            q, was_numpy, kf = self._validate_search(queries, k, mode, feedback_k, encoder)
            return (q, was_numpy, kf, *self._allowed_rows(allow))

        q, was_numpy, kf, rows, allowed = self._checked("search()", sig, validate)
        if allowed is not None:
            allowed = self._count_allowed(rows, allowed)
            kf = min(kf, allowed)
        # The same query blocks as one process (per-row results of batched kernels then
        # match one process's), each cut into equal parts when query_block caps them.
        outs = []
        for lo in range(0, q.shape[0], SEARCH_CHUNK):
            block = q[lo : lo + SEARCH_CHUNK]
            if allowed == 0:  # the same on every rank: no collective
                outs.append(self._padding(block.shape[0], k))
                continue
            parts = 1 if self.query_block is None else -(-block.shape[0] // self.query_block)
            outs += [
                self._search_chunk(p, k, mode, kf, workspace_bytes, rows)
                for p in block.tensor_split(parts)
            ]
        scores = torch.cat([o[0] for o in outs]) if outs else torch.empty(0, k)
        ids = torch.cat([o[1] for o in outs]) if outs else torch.empty(0, k, dtype=torch.int64)
        if self._named:
            names = self._names_of(ids, "search()")
            if not was_numpy:
                return scores, names
            table = np.empty(tuple(ids.shape), dtype=object)
            for r, row in enumerate(names):
                table[r, :] = row
            return scores.cpu().numpy(), table
        ids = self._user_ids(ids, "search()")
        if was_numpy:
            return scores.cpu().numpy(), ids.cpu().numpy()
        return scores, ids

    def _user_ids(self, positions: torch.Tensor, what: str) -> torch.Tensor:
        """Collective when ids are custom: the user int ids of a table of positions (-1
        stays -1), by an exact one-owner sum all-reduce (each position has one owner)."""
        if self._uids is None:  # the same on every rank
            return positions

        def owned() -> torch.Tensor:
            if self._uids.numel() == 0:  # a rank without documents owns no slot
                return torch.zeros_like(positions)
            mine, lpos = self._locate(positions)
            return torch.where(mine, self._uids[lpos], torch.zeros_like(positions))

        table = self._comm.attempt(owned, lambda: torch.zeros_like(positions))
        self._comm.reduce_([table], what, exact=True)
        return torch.where(positions >= 0, table, torch.full_like(table, -1))

    def _names_of(self, positions: torch.Tensor, what: str) -> list[list[str | None]]:
        """Collective: the names of a (B, k) table of positions (None for -1): each rank
        names the positions it holds, one gather of them."""

        def mine() -> list[list[str | None]]:
            t = positions.to(torch.int64).to(self._gids.device)
            owned, lpos = self._locate(t)
            names = self.local.doc_ids or []
            return [
                [names[int(p)] if bool(o) else None for o, p in zip(orow, prow, strict=True)]
                for orow, prow in zip(owned.cpu(), lpos.cpu(), strict=True)
            ]

        gathered = self._gather_object(self._step(what, mine), what)

        def merge() -> list[list[str | None]]:
            merged = gathered[0]
            for other in gathered[1:]:
                merged = [
                    [a if a is not None else b for a, b in zip(ra, rb, strict=True)]
                    for ra, rb in zip(merged, other, strict=True)
                ]
            return merged

        return self._step(what, merge)

    def _padding(self, b: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            torch.full((b, k), float("-inf"), device=self.device),
            torch.full((b, k), -1, dtype=torch.int64, device=self.device),
        )

    def _allowed_rows(self, allow: Any) -> tuple[torch.Tensor | None, Any]:
        """(this shard's allowed live local rows, sorted int64, or None: every row; what the
        global count needs): the count itself for masks and ``allow=None`` (every rank knows
        it), or, for ids and names, the sorted unique ids with the ones this shard holds
        (summed by :meth:`_count_allowed`)."""
        if allow is None:
            live = self._live_rows()
            return live, None if live is None else self._ntotal
        dev = self._gids.device
        if isinstance(allow, np.ndarray | torch.Tensor) and allow.dtype in (np.bool_, torch.bool):
            mask = allow.detach().cpu().numpy() if isinstance(allow, torch.Tensor) else allow
            if mask.shape != (self._ntotal,):
                raise ValueError(
                    f"allow as a boolean mask must have shape ({self._ntotal},) (one entry per "
                    f"document, in the order of IMRNNIndex.ids: live documents in add "
                    f"order), got {mask.shape}"
                )
            live = self._live_rows()
            if live is None:
                live = torch.arange(self._gids.numel(), device=dev)
            rows = torch.zeros(0, dtype=torch.int64, device=dev)
            if live.numel():
                # Entry j is the j-th live position: a position p is entry p - (positions
                # below p that hold no live document), from the replicated _gone.
                pos = self._gids[live].cpu()
                entry = pos - torch.searchsorted(self._gone, pos)
                rows = live[torch.from_numpy(mask)[entry].to(dev)]
            return rows, int(mask.sum())
        rows, keys, found = self._held_rows(allow, "allow")
        return rows, (keys, found)

    def _count_allowed(self, rows: torch.Tensor | None, allowed: Any) -> int:
        """The global number of allowed documents (ids and names: one sum over ranks of
        which each shard holds; one no shard holds raises ValueError on every rank)."""
        if not isinstance(allowed, tuple):
            return int(allowed)
        keys, found = allowed
        self._check_all_held(keys, found, "allow")
        return len(keys)

    def _locate(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(owned by this rank, local row or 0) for a table of global ids."""
        n = self._gids.shape[0]
        if n == 0:
            return torch.zeros_like(ids, dtype=torch.bool), torch.zeros_like(ids)
        pos = torch.searchsorted(self._gids, ids).clamp_(max=n - 1)
        owned = self._gids[pos] == ids
        return owned, torch.where(owned, pos, torch.zeros_like(pos))

    # Each search block alternates rank-local steps (self._step: a failure on any rank raises
    # on every rank) and collectives; every collective is preceded by the step computing its
    # input, and the block ends with a step, so no rank is left waiting or returns alone.
    def _local_first_stage(
        self, q: torch.Tensor, pq: torch.Tensor, kf: int, rows: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This shard's top ``kf`` (of its allowed ``rows`` when given): (B, kf) float32
        scores and global ids, -inf / -1 padded."""
        b = q.shape[0]
        scores = torch.full((b, kf), float("-inf"), device=self.device)
        ids = torch.full((b, kf), -1, dtype=torch.int64, device=self.device)
        kl = min(kf, self.local_ntotal if rows is None else int(rows.numel()))
        if kl > 0:
            ls, li = self.local.first_stage_topk(q, pq, kl, None if rows is None else rows.cpu())
            ok = li >= 0
            scores[:, :kl] = torch.where(ok, ls.float(), torch.full_like(ls.float(), float("-inf")))
            ids[:, :kl] = torch.where(ok, self._gids[li.clamp(min=0)], torch.full_like(li, -1))
        return scores, ids

    @staticmethod
    def _merge_first_stage(
        all_s: torch.Tensor, all_i: torch.Tensor, kf: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The global top-kf of the ranks' (B, world x kf) lists."""
        # By (score descending, id ascending): the rule the single-process first stage applies
        # (imrnns.index.first_stage), and each shard's own list obeys it, so the
        # union holds every winner. Padding (-inf, -1) sorts last.
        key = torch.where(all_i < 0, torch.iinfo(torch.int64).max, all_i)
        by_id = torch.argsort(key, dim=1, stable=True)
        s, i = all_s.gather(1, by_id), all_i.gather(1, by_id)
        keep = torch.argsort(s, dim=1, descending=True, stable=True)[:, :kf]
        return s.gather(1, keep), i.gather(1, keep)

    def _owned_rows(self, table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """(B, K, D): the rows of the global ``ids`` this rank owns, zeros elsewhere (the
        input of the exact one-owner all-reduce that assembles them on every rank)."""
        owned, lpos = self._locate(ids)
        out = torch.zeros(*ids.shape, table.shape[1], dtype=table.dtype, device=table.device)
        if bool(owned.any()):
            out[owned] = table[lpos[owned]]
        return out

    def _search_chunk(
        self,
        q: torch.Tensor,
        k: int,
        mode: str,
        kf: int,
        workspace_bytes: int | None = None,
        allowed_rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One block of ``IMRNNIndex.search`` (first stage, query state, scoring), step for
        step, over the global corpus.

        Each rank-local step runs in ``attempt`` with a stand-in of the same shapes for the
        collective after it, which carries the ranks' failure flags (``_Collectives``)."""
        what, model, comm, dev = "search()", self.model, self._comm, self.device
        b = q.shape[0]

        def padded(width: int) -> tuple[torch.Tensor, torch.Tensor]:
            return (
                torch.full((b, width), float("-inf"), device=dev),
                torch.full((b, width), -1, dtype=torch.int64, device=dev),
            )

        def first_stage() -> tuple[torch.Tensor, ...]:
            qd = q.to(dev)
            pq = model.project(qd)
            return (pq, *self._local_first_stage(qd, pq, kf, allowed_rows))

        pq, scores, ids = comm.attempt(first_stage, lambda: (None, *padded(kf)))
        gathered = comm.gather([scores, ids], what)
        all_s = torch.cat([g[0] for g in gathered], dim=1)
        all_i = torch.cat([g[1] for g in gathered], dim=1)

        def feedback() -> tuple[Any, ...]:
            fs_scores, fs_ids = self._merge_first_stage(all_s, all_i, kf)
            return (fs_ids, *feedback_set(model, fs_scores, fs_ids))

        if self.exchange == "rows":
            tables = [self.local.projected_corpus]
            width = self.local.document_cache_width
            if width is not None:  # a rank without documents has no cache yet: an empty one
                cache = self.local.document_cache
                tables.append(torch.empty(0, width, device=dev) if cache is None else cache)

            def owned() -> tuple[Any, ...]:
                fs_ids, valid, safe_ids, weights = feedback()
                return fs_ids, valid, weights, [self._owned_rows(t, safe_ids) for t in tables]

            def stand_in() -> tuple[Any, ...]:
                zeros = [torch.zeros(b, kf, t.shape[1], dtype=t.dtype, device=dev) for t in tables]
                return None, None, None, zeros

            fs_ids, valid, weights, assembled = comm.attempt(owned, stand_in)
            comm.reduce_(assembled, what, exact=True)
            rows = assembled[0].view(b * kf, -1)
            cache = assembled[1].view(b * kf, -1) if width is not None else None

            def state() -> tuple[torch.Tensor, torch.Tensor]:
                flat = torch.arange(b * kf, device=dev).view(b, kf)
                tq, _, q_tilde = model.query_state(pq, rows, flat, weights, cache)
                if mode == "exhaustive":
                    return self._local_topk(tq, q_tilde, k, workspace_bytes, allowed_rows)
                scores = model.score_ids(rows, flat, tq, q_tilde)
                return self._best(scores, valid, fs_ids, k)

            if mode == "rerank":
                return self._step(what, state)  # no collective follows: its own exchange
            s, gi = comm.attempt(state, lambda: padded(k))
        else:
            cfg = model.config
            mean_width = cfg.transform_dim if cfg.aggregation == "mean_of_transforms" else None

            def partial() -> tuple[Any, ...]:
                fs_ids, valid, safe_ids, weights = feedback()
                return (fs_ids, valid, safe_ids, *self._partial_sum(pq, safe_ids, weights))

            def partial_stand_in() -> tuple[Any, ...]:
                if mean_width is not None:
                    return None, None, None, None, torch.zeros(b, mean_width, device=dev)
                mean = torch.zeros(b, cfg.working_dim, dtype=model.dtype, device=dev)
                return None, None, None, None, mean

            fs_ids, valid, safe_ids, tq, own = comm.attempt(partial, partial_stand_in)
            comm.reduce_([own], what, exact=False)

            def state() -> Any:
                q_tilde = self._partial_finish(pq, own)
                if mode == "exhaustive":
                    return self._local_topk(tq, q_tilde, k, workspace_bytes, allowed_rows)
                return self._partial_owned_scores(safe_ids, tq, q_tilde)

            if mode == "rerank":
                scores = comm.attempt(state, lambda: torch.zeros(b, kf, device=dev))
                comm.reduce_([scores], what, exact=True)  # one owner per slot: exact
                return self._step(what, lambda: self._best(scores, valid, fs_ids, k))
            s, gi = comm.attempt(state, lambda: padded(k))
        gathered = comm.gather([s, gi], what)
        all_s = torch.cat([g[0] for g in gathered], dim=1)
        all_i = torch.cat([g[1] for g in gathered], dim=1)
        # Each shard's ids ascend with its local rows, so the shard's own ties already came
        # lower id first; the merge applies the same rule across shards.
        return self._step(what, lambda: topk_by_score_then_id(all_s, all_i, k))

    @staticmethod
    def _best(
        scores: torch.Tensor, valid: torch.Tensor, fs_ids: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The top k of the scored global feedback set (invalid slots last)."""
        scores = torch.where(valid, scores, torch.full_like(scores, float("-inf")))
        return topk_by_score_then_id(scores, torch.where(valid, fs_ids, -1), k)

    def _partial_sum(
        self, pq: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(T_q, this rank's share of the global feedback mean): the (B, OUT) float32 mean
        transform, or the (B, m) mean modulated document for ``transform_of_mean``."""
        model, cfg = self.model, self.model.config
        b, kf = ids.shape
        tq = model.query_transform(pq)
        owned, lpos = self._locate(ids)
        w = torch.ones(b, kf, device=self.device) if weights is None else weights.float()
        total = w.sum(dim=1)
        w_own = w * owned
        own_sum = w_own.sum(dim=1)
        rows = torch.nonzero(own_sum > 0).flatten()
        share = (own_sum[rows] / total[rows]).unsqueeze(1)
        corpus = self.local.projected_corpus
        if cfg.aggregation == "mean_of_transforms":
            td = torch.zeros(b, cfg.transform_dim, device=self.device)
            if rows.numel():
                doc_cache = self.local.document_cache
                extra = {} if doc_cache is None else {"cache": doc_cache}
                mean_own = imrnns_kernels.adapter_reduce(
                    corpus,
                    lpos[rows],
                    model.doc_hypernet.weights(),
                    w_own[rows],
                    cfg.modulation,
                    **extra,
                )
                # sum_own w y / sum_all w = (sum_own w y / sum_own w) * (sum_own w / sum_all w)
                td[rows] = mean_own.float() * share
            return tq, td
        mean_dt = torch.zeros(b, cfg.working_dim, dtype=model.dtype, device=self.device)
        if rows.numel():
            docs = corpus[lpos[rows]].to(model.dtype)
            d_tilde = model.modulate_documents(docs, tq[rows])
            coef = (w_own[rows] / total[rows].unsqueeze(1)).to(model.dtype)
            mean_dt[rows] = torch.einsum("bk,bkm->bm", coef, d_tilde)
        return tq, mean_dt

    def _partial_finish(self, pq: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        """q~ from the summed global mean of :meth:`_partial_sum`."""
        model = self.model
        td = mean if model.config.aggregation == "mean_of_transforms" else model.doc_hypernet(mean)
        return model.modulate_queries(pq, td)

    def _partial_owned_scores(
        self, ids: torch.Tensor, tq: torch.Tensor, q_tilde: torch.Tensor
    ) -> torch.Tensor:
        """(B, K) scores of the global feedback documents this rank owns, zeros elsewhere."""
        owned, lpos = self._locate(ids)
        scores = torch.zeros(ids.shape, dtype=torch.float32, device=self.device)
        if self.local_ntotal > 0 and bool(owned.any()):
            local = self.model.score_ids(self.local.projected_corpus, lpos, tq, q_tilde)
            scores = torch.where(owned, local.float(), scores)
        return scores

    def _local_topk(
        self,
        tq: torch.Tensor,
        q_tilde: torch.Tensor,
        k: int,
        workspace_bytes: int | None = None,
        rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This shard's exhaustive top k (of its allowed ``rows`` when given): (B, k) float32
        scores and global ids."""
        model, cfg = self.model, self.model.config
        b = tq.shape[0]
        s = torch.full((b, k), float("-inf"), device=self.device)
        gi = torch.full((b, k), -1, dtype=torch.int64, device=self.device)
        corpus = self.local.projected_corpus
        gids = self._gids
        if rows is not None:  # the allowed rows alone, in order (as one index of them)
            corpus, gids = corpus.index_select(0, rows.to(corpus.device)), gids[rows]
        if corpus.shape[0] > 0:
            # workspace_bytes may differ by rank: a budget too small for this shard raises
            # here, and on every rank through the step.
            s, li = imrnns_kernels.modulated_topk(
                corpus,
                tq,
                model.doc_norm.weight,
                model.doc_norm.bias,
                q_tilde,
                k,
                cfg.modulation,
                cfg.layer_norm_eps,
                workspace_bytes=workspace_bytes,
            )
            gi = torch.where(li >= 0, gids[li.clamp(min=0)], torch.full_like(li, -1))
            s = s.float()
        return s, gi

    def positions_of(self, ids: Any) -> torch.Tensor:
        """Collective: the global positions (:attr:`global_ids`: add order over the whole
        index) of a (B, k) table of ids as ``search`` returns them (-1 / None: -1).

        For the command line, whose ``"id"`` is a document's row in one process's index.
        An id no rank holds raises ValueError on every rank.
        """
        what = "positions_of()"

        def flat() -> tuple[list[Any], list[list[bool]]]:
            rows = ids.tolist() if isinstance(ids, np.ndarray | torch.Tensor) else ids
            keep = [[d is not None and not (isinstance(d, int) and d < 0) for d in r] for r in rows]
            keys = [
                d for r, kr in zip(rows, keep, strict=True) for d, k in zip(r, kr, strict=True) if k
            ]
            return keys, keep

        keys, keep = self._step(what, flat)
        _, sorted_keys, found = self._checked(
            what, _allow_signature(keys), lambda: self._held_rows(keys, what)
        )
        positions = self._check_all_held(sorted_keys, found, what)
        at = dict(zip(sorted_keys, positions.tolist(), strict=True))
        out = iter(at[d] for d in keys)
        return torch.tensor(
            [[next(out) if k else -1 for k in kr] for kr in keep], dtype=torch.int64
        ).reshape(len(keep), -1)

    def doc_names(self, ids: Any) -> list[list[str | None]] | None:
        """Collective: the names of a (B, k) table of global positions (None for -1).

        Positions are :attr:`global_ids` (add order over the whole index). ``search`` now
        returns the names of a named index itself; given such a table (a list of lists or
        a numpy object array) this returns it as a list of lists, without an exchange.
        None when the index has no names.
        """
        if not self._named:
            return None
        if isinstance(ids, list) or (isinstance(ids, np.ndarray) and ids.dtype == object):
            return [list(row) for row in ids]
        what = "doc_names()"

        def positions() -> torch.Tensor:
            t = torch.as_tensor(np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids))
            return t.to(torch.int64)

        return self._names_of(self._step(what, positions), what)


# --------------------------------------------------------------------------- helpers
def _read_manifest(directory: Path, verify: bool) -> dict[str, Any]:
    """:func:`read_manifest`, and the storage dtype that ``IMRNNIndex.load`` checks later.

    Checked here, on every rank, so a bad setting fails everywhere before a rank reads its block.
    """
    manifest = read_manifest(directory, verify)
    cfg = manifest["index"]
    if cfg.get("storage_dtype") not in STORAGE_DTYPES:
        raise IndexError_(f"{directory / 'manifest.json'}: missing or invalid 'index' settings")
    return manifest


def _manifest_digest(directory: Path) -> str | None:
    """SHA-256 of ``directory``'s manifest.json (None when it is missing: the read reports it).

    The manifest lists every file's SHA-256, so equal manifests mean the same index version.
    """
    try:
        return hashlib.sha256((directory / "manifest.json").read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def _check_unchanged(directory: Path, digest: str | None, rank: int) -> None:
    """Raise when ``directory``'s manifest is no longer the one hashed as ``digest``."""
    if _manifest_digest(directory) != digest:
        raise IndexError_(
            f"{directory}: the index was replaced while rank {rank} read it (its manifest "
            "changed): load again"
        )


def _digest_array(x: Any, sample_rows: int | None = None) -> str:
    """sha256 of an array's dtype, shape and bytes (or of ``sample_rows`` spread rows)."""
    if isinstance(x, torch.Tensor):
        arr = x.detach().cpu()
        arr = (arr.float() if arr.dtype == torch.bfloat16 else arr).numpy()
    elif isinstance(x, np.ndarray):
        arr = x
    else:
        return f"<{type(x).__name__}>"
    h = hashlib.sha256(f"{arr.dtype}{arr.shape}".encode())
    if sample_rows is not None and arr.ndim >= 1 and arr.shape[0] > sample_rows:
        pick = np.linspace(0, arr.shape[0] - 1, sample_rows).astype(np.int64)
        arr = arr[pick]
    h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def _call_signature(queries: Any, k: Any, mode: Any, feedback_k: Any, encoder: Any) -> str:
    return json.dumps([_digest_array(queries), repr(k), repr(mode), repr(feedback_k), encoder])


def _allow_signature(allow: Any) -> str:
    """A digest of a search's ``allow`` that does not depend on a set's iteration order."""
    if allow is None:
        return ""
    if isinstance(allow, np.ndarray | torch.Tensor) and allow.dtype in (np.bool_, torch.bool):
        return _digest_array(allow)
    try:
        items = sorted({repr(d) for d in allow})
    except TypeError:  # not iterable: refused by the checks, the same on every rank
        return type(allow).__name__
    return hashlib.sha256("\x00".join(items).encode()).hexdigest()


def _batch_signature(embeddings: Any, ids: Any) -> str:
    # A sample of rows: hashing a multi-GB batch on every rank would cost seconds.
    names = None
    if ids is not None:
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().numpy()
        try:
            items = [repr(d.item() if isinstance(d, np.generic) else d) for d in ids]
        except TypeError:  # not iterable: refused by the checks, the same on every rank
            items = [type(ids).__name__]
        names = hashlib.sha256("\x00".join(items).encode()).hexdigest()
    return json.dumps([_digest_array(embeddings, sample_rows=64), names])


def _live_row(j: int, removed: np.ndarray) -> int:
    """The stored row of the ``j``-th live document, given the sorted ``removed`` rows.

    ``removed[i] - i`` live rows precede the i-th removed row, so the removed rows before
    the j-th live one are those with ``removed[i] - i <= j``."""
    before = removed - np.arange(removed.size)
    return j + int(np.searchsorted(before, j, side="right"))
