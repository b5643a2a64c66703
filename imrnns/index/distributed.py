"""Sharded IMRNN search over ``torch.distributed`` (NCCL on GPUs, gloo on CPU).

Every rank holds a contiguous block of the corpus (projected rows, first-stage vectors and the
per-document cache) in an ordinary :class:`~imrnns.index.IMRNNIndex`, and every search is a
collective call that returns, on every rank, the result a single-process index over the whole
corpus returns. For a block of B queries (DESIGN.md section 1 for the maths):

1. First stage, local: each rank searches its shard for the ``feedback_k`` best documents
   (faiss), maps local positions to global ids, and an all-gather of (B, feedback_k) scores
   and ids gives every rank the global feedback set F(q): the top ``feedback_k`` of the union
   by (score descending, id ascending), the rule one index's first stage applies, so the set
   and its order equal the single-process ones even when duplicates tie at the boundary.
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
   by (score descending, lower id first), the single-process tie rule.

Exactness: with ``exchange="rows"``, a flat first stage and the default ``query_block``,
results equal the single-process index's: the same ids, and scores to the last bit, provided
every process runs the same kernels with the same number of intra-op threads (a GEMM split
over 2 threads can round differently than over 1) and every shard (and ``add`` batch) has at
least 12 rows (MKL computes a GEMM of fewer rows with another kernel, so such a shard's
projected rows may differ from one process's in the last bit). Outside those conditions,
and with ``exchange="partial"``, scores agree to float32 rounding (about 1e-7) and ids agree
except between documents whose scores are that close. IVF and HNSW first stages are built
per shard and are approximate in their own way, so they do not equal one approximate index.

Calls that touch several ranks (``add``, ``add_shard``, ``search``, ``doc_names``) must be
made by every rank with the same arguments (``add_shard``: each rank its own rows). The
arguments are checked first by a small all-gather, and a validation error on any rank is
raised on every rank, so a bad call fails everywhere instead of leaving ranks waiting in a
collective. A rank that dies mid-collective still blocks the others until the process group's
timeout (``init_from_env(timeout=...)``); torchrun then ends the job.

Launch with torchrun (see ``docs/distributed.md``)::

    torchrun --nproc-per-node 4 -m imrnns search --distributed --index DIR "query text"
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

import imrnns_kernels
from imrnns._atomic import check_replaceable, resolve_directory
from imrnns.index.core import (
    SEARCH_CHUNK,
    STORAGE_DTYPES,
    IMRNNIndex,
    as_float_tensor,
    check_search_args,
    feedback_set,
    topk_by_score_then_id,
)
from imrnns.index.first_stage import settings_for_rows
from imrnns.index.storage import IndexError_, read_manifest
from imrnns.model import IMRNN
from imrnns_kernels import _validation as checks
from imrnns_kernels.dispatch import check_workspace_bytes

__all__ = [
    "EXCHANGES",
    "DistributedIMRNNIndex",
    "init_from_env",
    "memory_per_rank",
    "search_memory",
    "shard_bounds",
]

EXCHANGES = ("rows", "partial")
# Largest single all-reduce message in the rows exchange; bounds the extra buffers NCCL/gloo
# allocate for one call (a 4096-query block at feedback_k=100, m=256, fp32 is 420 MB).
MAX_MESSAGE_BYTES = 64 << 20


# --------------------------------------------------------------------------- process group
def init_from_env(
    backend: str = "auto", timeout: timedelta | None = None
) -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...).

    Args:
        backend: ``"nccl"``, ``"gloo"`` or ``"auto"`` (NCCL when CUDA is available, else gloo).
        timeout: collective timeout (torch's default: 10 min for NCCL, 30 min for gloo).

    Returns:
        (rank, world_size, device): the device is ``cuda:LOCAL_RANK`` for NCCL (and made
        current), ``cpu`` for gloo. Without torchrun's variables: (0, 1, cpu), no group.
    """
    if backend not in ("auto", "nccl", "gloo"):
        raise ValueError(f"backend must be 'auto', 'nccl' or 'gloo', got {backend!r}")
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

    Global ids are positions in the order documents were added (as one index numbers them):
    :meth:`add` gives every rank the same batch and each keeps a contiguous block;
    :meth:`add_shard` gives each rank its own rows, numbered in rank order. Searches return
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
        **index_kwargs: Any,
    ) -> None:
        if exchange not in EXCHANGES:
            raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")
        if query_block is not None and (
            isinstance(query_block, bool) or not isinstance(query_block, int) or query_block <= 0
        ):
            raise ValueError(f"query_block must be a positive int or None, got {query_block!r}")
        self.query_block = query_block
        self.local = IMRNNIndex(
            model, feedback_k, first_stage, storage_dtype, device=device, **index_kwargs
        )
        self.exchange = exchange
        self.group = group
        self._distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(group) if self._distributed else 0
        self.world_size = dist.get_world_size(group) if self._distributed else 1
        backend = dist.get_backend(group) if self._distributed else "gloo"
        # NCCL moves CUDA tensors only; gloo moves CPU tensors.
        self._comm_device = (
            torch.device("cuda", torch.cuda.current_device())
            if backend == "nccl"
            else torch.device("cpu")
        )
        self._gids = torch.empty(0, dtype=torch.int64, device=self.local.device)
        self._ntotal = 0
        self._named: bool | None = None
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
        """(local_ntotal,) int64 global id of each local row, ascending."""
        return self._gids

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
    def _gather_object(self, obj: Any) -> list[Any]:
        if not self._distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def _all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        if not self._distributed:
            return [t]
        src = t.to(self._comm_device).contiguous()
        out = [torch.empty_like(src) for _ in range(self.world_size)]
        dist.all_gather(out, src, group=self.group)
        return [o.to(t.device) for o in out]

    def _all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks (float32 partial sums and one-owner tables)."""
        if not self._distributed:
            return t
        src = t.to(self._comm_device)
        dist.all_reduce(src, group=self.group)
        if src is not t:
            t.copy_(src)
        return t

    def _all_reduce_exact_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of one-owner tables on their bytes: exact for any dtype (x + 0 = x bitwise)."""
        if not self._distributed:
            return t
        flat = t.contiguous().view(-1).view(torch.uint8)
        for lo in range(0, flat.numel(), MAX_MESSAGE_BYTES):
            part = flat[lo : lo + MAX_MESSAGE_BYTES]
            src = part.to(self._comm_device)
            dist.all_reduce(src, group=self.group)
            if src is not part:
                part.copy_(src)
        return t

    def _agree(self, what: str, signature: str) -> None:
        sigs = self._gather_object(signature)
        if len(set(sigs)) > 1:
            ranks = [r for r, s in enumerate(sigs) if s != sigs[0]]
            raise ValueError(
                f"{what} differ across ranks (ranks {ranks} disagree with rank 0): every rank "
                "must make the same call"
            )

    def _checked(self, what: str, signature: str, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` everywhere; raise on every rank if it failed on any or arguments differ.

        Without this, a rank whose validation failed would leave the others waiting in the
        next collective until the group's timeout.
        """
        result, err = None, None
        try:
            result = fn()
        except (ValueError, TypeError, FileNotFoundError) as exc:
            err = exc
        status = None if err is None else (type(err).__name__, str(err))
        gathered = self._gather_object((signature, status))
        if err is not None:
            raise err
        _raise_other_ranks_error([st for _, st in gathered])
        sigs = [s for s, _ in gathered]
        if len(set(sigs)) > 1:
            ranks = [r for r, s in enumerate(sigs) if s != sigs[0]]
            raise ValueError(
                f"{what}: ranks {ranks} were called with arguments that differ from rank 0's: "
                "every rank must make the same call"
            )
        return result

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
        self, embeddings: np.ndarray | torch.Tensor, doc_ids: list[str] | None = None
    ) -> np.ndarray | torch.Tensor:
        """Collective: every rank passes the same (N, n) batch and keeps its block of it.

        Returns the global ids of the batch (same type as given), as ``IMRNNIndex.add``.
        """

        def validate() -> tuple[torch.Tensor, bool]:
            x, was_numpy = self._validate_add(embeddings, doc_ids)
            lo, hi = shard_bounds(x.shape[0], self.world_size, self.rank)
            if hi > lo:  # e.g. an IVF nlist larger than this rank's block: fail everywhere
                self.local.check_first_add(hi - lo)
            return x, was_numpy

        x, was_numpy = self._checked("add()", _batch_signature(embeddings, doc_ids), validate)
        n = x.shape[0]
        lo, hi = shard_bounds(n, self.world_size, self.rank)
        start = self._ntotal
        if hi > lo:
            self.local.add(x[lo:hi], None if doc_ids is None else list(doc_ids[lo:hi]))
        self._extend(start + lo, start + hi, n, doc_ids is not None)
        ids = torch.arange(start, start + n, dtype=torch.int64)
        return ids.numpy() if was_numpy else ids

    def add_shard(
        self, embeddings: np.ndarray | torch.Tensor, doc_ids: list[str] | None = None
    ) -> np.ndarray | torch.Tensor:
        """Collective: each rank passes its own (N_r, n) rows (N_r may be 0).

        Global ids follow rank order: rank 0's rows first, then rank 1's, and so on; equal to
        one index that added the ranks' batches concatenated in rank order. Returns this
        rank's global ids (same type as given).
        """
        sig = "add_shard"  # the rows differ by design; the call itself must match

        def validate() -> tuple[torch.Tensor, bool]:
            x, was_numpy = self._validate_add(embeddings, doc_ids, allow_empty=True)
            if x.shape[0] > 0:
                self.local.check_first_add(x.shape[0])
            return x, was_numpy

        x, was_numpy = self._checked("add_shard()", sig, validate)
        counts = [int(c) for c in self._gather_object(int(x.shape[0]))]
        named = self._gather_object(doc_ids is not None)
        if len(set(named)) > 1:
            raise ValueError("doc_ids must be given on every rank or on none")
        start = self._ntotal + sum(counts[: self.rank])
        if x.shape[0] > 0:
            self.local.add(x, None if doc_ids is None else list(doc_ids))
        self._extend(start, start + x.shape[0], sum(counts), doc_ids is not None)
        ids = torch.arange(start, start + x.shape[0], dtype=torch.int64)
        return ids.numpy() if was_numpy else ids

    def _validate_add(
        self, embeddings: Any, doc_ids: Sequence[str] | None, allow_empty: bool = False
    ) -> tuple[torch.Tensor, bool]:
        # The whole batch is checked on every rank before anything changes, so a bad row in
        # one rank's block cannot leave the ranks with different corpora.
        x, was_numpy = as_float_tensor(embeddings, "embeddings")
        n = self.model.config.input_dim
        if x.dim() != 2 or x.shape[1] != n:
            raise ValueError(
                f"embeddings must have shape (N, {n}), got {tuple(x.shape)} ({x.dtype})"
            )
        if x.shape[0] == 0 and not allow_empty:
            raise ValueError("embeddings is empty: nothing to add")
        checks.check_finite("embeddings", x)
        if doc_ids is not None and (
            isinstance(doc_ids, str)  # a str would be one name per character
            or len(doc_ids) != x.shape[0]
            or not all(isinstance(d, str) for d in doc_ids)
        ):
            raise ValueError(f"doc_ids must be {x.shape[0]} strings, one per embedding row")
        if self._named is not None and self._named != (doc_ids is not None):
            raise ValueError("doc_ids must be given on every add() or on none")
        return x, was_numpy

    def _extend(self, lo: int, hi: int, added: int, named: bool) -> None:
        new = torch.arange(lo, hi, dtype=torch.int64, device=self._gids.device)
        self._gids = torch.cat([self._gids, new])
        self._ntotal += added
        self._named = named

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
    ) -> DistributedIMRNNIndex:
        """Collective: shard an in-memory single-process index that every rank holds.

        Each rank keeps its contiguous block (projected rows, cache rows, first-stage vectors).
        """
        cfg = index.settings()
        out = cls(
            index.model,
            group=group,
            exchange=exchange,
            query_block=query_block,
            device=device or index.device,
            **cfg,
        )
        lo, hi = shard_bounds(index.ntotal, out.world_size, out.rank)
        cache = index.document_cache
        names = index.doc_ids
        local = IMRNNIndex.from_parts(
            index.model,
            index.projected_corpus[lo:hi],
            index.first_stage_vectors(lo, hi),
            document_cache=None if cache is None else cache[lo:hi],
            doc_ids=None if names is None else names[lo:hi],
            device=out.device,
            **settings_for_rows(cfg, hi - lo),
        )
        out._install(local, lo, index.ntotal, names is not None)
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
    ) -> DistributedIMRNNIndex:
        """Collective: each rank loads only its block of an index saved by ``IMRNNIndex.save``.

        The projected corpus and the cache are read by slice (safetensors), a flat first stage
        through a memory map, so no rank holds the whole corpus. IVF/HNSW first stages are
        read whole once, then rebuilt per shard (approximate: not equal to the saved one).

        Raises:
            FileNotFoundError / ValueError: as ``IMRNNIndex.load`` (missing, truncated or
            tampered files, checked against the manifest's sizes and SHA-256), on every rank.
        """
        directory = Path(directory)

        def read() -> tuple[dict[str, Any], Path]:
            d = resolve_directory(directory)
            return _read_manifest(d, verify), d

        sig = str(directory)
        joined = dist.is_available() and dist.is_initialized()
        manifest, d = _run_everywhere("load()", sig, read, group) if joined else read()
        cfg = dict(manifest["index"])
        n = int(manifest["ntotal"])
        # Every rank's block, read by slice; the files were checked on every rank above.
        world = dist.get_world_size(group) if joined else 1
        rank = dist.get_rank(group) if joined else 0
        lo, hi = shard_bounds(n, world, rank)

        def read_block() -> IMRNNIndex:
            return IMRNNIndex.load(d, device=device or "cpu", verify=False, rows=(lo, hi))

        # A block that fails to read on one rank raises on every rank (no rank left waiting).
        local = _run_everywhere("load()", sig, read_block, group) if world > 1 else read_block()
        out = cls(
            local.model,
            group=group,
            exchange=exchange,
            query_block=query_block,
            device=device or "cpu",
            **cfg,
        )
        out._install(local, lo, n, "doc_ids.json" in manifest["files"])
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

        self._checked("save()", str(directory), validate)
        cache = self.local.document_cache
        piece = (
            self._gids.cpu(),
            self.local.projected_corpus.detach().cpu(),
            None if cache is None else cache.detach().cpu(),
            self.local.first_stage_vectors(),
            self.local.doc_ids if self._named else None,
        )
        pieces = self._gather_to_root(piece)
        err: BaseException | None = None
        if self.rank == 0:
            try:
                self._assemble(pieces).save(directory)
            except (ValueError, TypeError, OSError) as exc:
                err = exc
        status = self._gather_object(None if err is None else (type(err).__name__, str(err)))
        if err is not None:
            raise err
        if status[0] is not None:
            exc_type = {
                "TypeError": TypeError,
                "FileNotFoundError": FileNotFoundError,
                "PermissionError": PermissionError,
                "OSError": OSError,
            }.get(status[0][0], ValueError)
            raise exc_type(f"rank 0: saving {directory} failed: {status[0][1]}")
        return directory

    def _gather_to_root(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` on rank 0 (group rank 0), in rank order; [] elsewhere."""
        if not self._distributed:
            return [obj]
        out: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        root = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        dist.gather_object(obj, out, dst=root, group=self.group)
        return out or []

    def _assemble(self, pieces: list[Any]) -> IMRNNIndex:
        """One single-process index from the ranks' (gids, corpus, cache, vectors, names)."""
        pieces = [p for p in pieces if p[0].numel() > 0]
        gids = torch.cat([p[0] for p in pieces])
        order = torch.argsort(gids)
        if not torch.equal(gids[order], torch.arange(self._ntotal)):
            raise ValueError("the shards' global ids do not cover 0 .. ntotal - 1 exactly once")
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
        return IMRNNIndex.from_parts(
            self.model, corpus, vectors, document_cache=cache, doc_ids=names, device="cpu", **cfg
        )

    def _install(self, local: IMRNNIndex, lo: int, ntotal: int, named: bool) -> None:
        """Make ``local`` (global rows ``lo .. lo + local.ntotal - 1``) this rank's shard."""
        self.local = local
        self._gids = torch.arange(lo, lo + local.ntotal, dtype=torch.int64, device=local.device)
        self._ntotal = ntotal
        self._named = named

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
    ) -> tuple[np.ndarray, np.ndarray] | tuple[torch.Tensor, torch.Tensor]:
        """Collective top-k over the whole sharded corpus; same contract as ``IMRNNIndex.search``.

        Every rank passes the same queries and gets the same global (scores, ids).
        ``workspace_bytes`` bounds this rank's exhaustive scan of its shard (as
        ``IMRNNIndex.search``); ranks may pass different values (the results do not depend
        on it), and a budget too small on one rank raises ``ValueError`` on every rank.
        """
        sig = _call_signature(queries, k, mode, feedback_k, encoder)

        def validate() -> tuple[torch.Tensor, bool, int]:
            check_workspace_bytes(workspace_bytes)
            return self._validate_search(queries, k, mode, feedback_k, encoder)

        q, was_numpy, kf = self._checked("search()", sig, validate)
        # The same query blocks as one process (per-row results of batched kernels then
        # match one process's), each cut into equal parts when query_block caps them.
        outs = []
        for lo in range(0, q.shape[0], SEARCH_CHUNK):
            block = q[lo : lo + SEARCH_CHUNK]
            parts = 1 if self.query_block is None else -(-block.shape[0] // self.query_block)
            outs += [
                self._search_chunk(p, k, mode, kf, workspace_bytes)
                for p in block.tensor_split(parts)
            ]
        scores = torch.cat([o[0] for o in outs]) if outs else torch.empty(0, k)
        ids = torch.cat([o[1] for o in outs]) if outs else torch.empty(0, k, dtype=torch.int64)
        if was_numpy:
            return scores.cpu().numpy(), ids.cpu().numpy()
        return scores, ids

    def _locate(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(owned by this rank, local row or 0) for a table of global ids."""
        n = self._gids.shape[0]
        if n == 0:
            return torch.zeros_like(ids, dtype=torch.bool), torch.zeros_like(ids)
        pos = torch.searchsorted(self._gids, ids).clamp_(max=n - 1)
        owned = self._gids[pos] == ids
        return owned, torch.where(owned, pos, torch.zeros_like(pos))

    def _global_first_stage(
        self, q: torch.Tensor, pq: torch.Tensor, kf: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b = q.shape[0]
        scores = torch.full((b, kf), float("-inf"), device=self.device)
        ids = torch.full((b, kf), -1, dtype=torch.int64, device=self.device)
        kl = min(kf, self.local_ntotal)
        if kl > 0:
            ls, li = self.local.first_stage_topk(q, pq, kl)
            ok = li >= 0
            scores[:, :kl] = torch.where(ok, ls.float(), torch.full_like(ls.float(), float("-inf")))
            ids[:, :kl] = torch.where(ok, self._gids[li.clamp(min=0)], torch.full_like(li, -1))
        all_s = torch.cat(self._all_gather(scores), dim=1)
        all_i = torch.cat(self._all_gather(ids), dim=1)
        # The global top-kf by (score descending, id ascending): the rule the single-process
        # first stage applies (first_stage.search_ties_by_lower_id), and each shard's own list
        # obeys it, so the union holds every winner. Padding (-inf, -1) sorts last.
        key = torch.where(all_i < 0, torch.iinfo(torch.int64).max, all_i)
        by_id = torch.argsort(key, dim=1, stable=True)
        s, i = all_s.gather(1, by_id), all_i.gather(1, by_id)
        keep = torch.argsort(s, dim=1, descending=True, stable=True)[:, :kf]
        return s.gather(1, keep), i.gather(1, keep)

    def _gather_rows(self, table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """(B, K, D) rows of the global ``ids``, assembled on every rank, bit-exact."""
        owned, lpos = self._locate(ids)
        out = torch.zeros(*ids.shape, table.shape[1], dtype=table.dtype, device=table.device)
        if bool(owned.any()):
            out[owned] = table[lpos[owned]]
        return self._all_reduce_exact_(out)

    def _search_chunk(
        self, q: torch.Tensor, k: int, mode: str, kf: int, workspace_bytes: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One block of ``IMRNNIndex.search`` (first stage, query state, scoring), step for
        step, over the global corpus."""
        q = q.to(self.device)
        model = self.model
        pq = model.project(q)
        fs_scores, fs_ids = self._global_first_stage(q, pq, kf)
        valid, safe_ids, weights = feedback_set(model, fs_scores, fs_ids)
        if self.exchange == "rows":
            b = q.shape[0]
            rows = self._gather_rows(self.local.projected_corpus, safe_ids).view(b * kf, -1)
            cache = None
            if self.local.document_cache is not None:
                doc_cache = self.local.document_cache
                cache = self._gather_rows(doc_cache, safe_ids).view(b * kf, -1)
            flat = torch.arange(b * kf, device=self.device).view(b, kf)
            tq, _, q_tilde = model.query_state(pq, rows, flat, weights, cache)
            if mode == "rerank":
                scores = model.score_ids(rows, flat, tq, q_tilde)
        else:
            tq, q_tilde = self._partial_state(pq, safe_ids, weights)
            if mode == "rerank":
                scores = self._partial_scores(safe_ids, tq, q_tilde)
        if mode == "exhaustive":
            return self._exhaustive(tq, q_tilde, k, workspace_bytes)
        scores = torch.where(valid, scores, torch.full_like(scores, float("-inf")))
        return topk_by_score_then_id(scores, torch.where(valid, fs_ids, -1), k)

    def _partial_state(
        self, pq: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(T_q, q~) from per-rank partial sums of the global feedback mean."""
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
            self._all_reduce_(td)
        else:
            mean_dt = torch.zeros(b, cfg.working_dim, dtype=model.dtype, device=self.device)
            if rows.numel():
                docs = corpus[lpos[rows]].to(model.dtype)
                d_tilde = model.modulate_documents(docs, tq[rows])
                coef = (w_own[rows] / total[rows].unsqueeze(1)).to(model.dtype)
                mean_dt[rows] = torch.einsum("bk,bkm->bm", coef, d_tilde)
            self._all_reduce_(mean_dt)
            td = model.doc_hypernet(mean_dt)
        return tq, model.modulate_queries(pq, td)

    def _partial_scores(
        self, ids: torch.Tensor, tq: torch.Tensor, q_tilde: torch.Tensor
    ) -> torch.Tensor:
        """(B, K) scores of the global feedback set: each rank scores what it owns."""
        owned, lpos = self._locate(ids)
        scores = torch.zeros(ids.shape, dtype=torch.float32, device=self.device)
        if self.local_ntotal > 0 and bool(owned.any()):
            local = self.model.score_ids(self.local.projected_corpus, lpos, tq, q_tilde)
            scores = torch.where(owned, local.float(), scores)
        return self._all_reduce_exact_(scores)  # one owner per slot: exact

    def _exhaustive(
        self, tq: torch.Tensor, q_tilde: torch.Tensor, k: int, workspace_bytes: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        model, cfg = self.model, self.model.config
        b = tq.shape[0]
        s = torch.full((b, k), float("-inf"), device=self.device)
        gi = torch.full((b, k), -1, dtype=torch.int64, device=self.device)
        err = None
        if self.local_ntotal > 0:
            try:
                s, li = imrnns_kernels.modulated_topk(
                    self.local.projected_corpus,
                    tq,
                    model.doc_norm.weight,
                    model.doc_norm.bias,
                    q_tilde,
                    k,
                    cfg.modulation,
                    cfg.layer_norm_eps,
                    workspace_bytes=workspace_bytes,
                )
            except ValueError as exc:  # a budget too small for this shard: fail everywhere
                err = exc
            else:
                gi = torch.where(li >= 0, self._gids[li.clamp(min=0)], torch.full_like(li, -1))
                s = s.float()
        # Budgets may differ by rank, so only the ranks know: one int each, every call (the
        # collectives must be the same on every rank).
        failed = [int(f) for f in self._all_gather(torch.tensor([int(err is not None)]))]
        if err is not None:
            raise err
        if any(failed):
            raise ValueError(
                f"rank {failed.index(1)}: the exhaustive scan of its shard failed (see that "
                "rank's error; e.g. workspace_bytes too small)"
            )
        all_s = torch.cat(self._all_gather(s), dim=1)
        all_i = torch.cat(self._all_gather(gi), dim=1)
        # Each shard's ids ascend with its local rows, so the shard's own ties already came
        # lower id first; the merge applies the same rule across shards.
        return topk_by_score_then_id(all_s, all_i, k)

    def doc_names(self, ids: np.ndarray | torch.Tensor) -> list[list[str | None]] | None:
        """Collective: the ``doc_ids`` names of a (B, k) table of global ids (None for -1).

        None when the index has no names.
        """
        if not self._named:
            return None
        t = torch.as_tensor(np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids))
        t = t.to(torch.int64).to(self._gids.device)
        owned, lpos = self._locate(t)
        names = self.local.doc_ids or []
        mine = [
            [names[int(p)] if bool(o) else None for o, p in zip(orow, prow, strict=True)]
            for orow, prow in zip(owned.cpu(), lpos.cpu(), strict=True)
        ]
        merged = mine
        for other in self._gather_object(mine):
            merged = [
                [a if a is not None else b for a, b in zip(ra, rb, strict=True)]
                for ra, rb in zip(merged, other, strict=True)
            ]
        return merged


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


def _run_everywhere(what: str, signature: str, fn: Callable[[], Any], group: Any) -> Any:
    """``DistributedIMRNNIndex._checked`` for calls made before an index exists."""
    result, err = None, None
    try:
        result = fn()
    except (ValueError, TypeError, FileNotFoundError) as exc:
        err = exc
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(
        out, (signature, None if err is None else (type(err).__name__, str(err))), group=group
    )
    if err is not None:
        raise err
    _raise_other_ranks_error([st for _, st in out])
    if len({s for s, _ in out}) > 1:
        raise ValueError(f"{what}: ranks were called with different arguments")
    return result


def _raise_other_ranks_error(statuses: list[tuple[str, str] | None]) -> None:
    """Raise the first failed rank's validation error (its type, its message, its rank).

    ``statuses``: one per rank, in rank order, None where the check passed, else (exception
    type name, message) as :meth:`DistributedIMRNNIndex._checked` gathers them.
    """
    for r, st in enumerate(statuses):
        if st is not None:
            exc_type = {"TypeError": TypeError, "FileNotFoundError": FileNotFoundError}.get(
                st[0], ValueError
            )
            raise exc_type(f"rank {r}: {st[1]}")


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


def _batch_signature(embeddings: Any, doc_ids: Sequence[str] | None) -> str:
    # A sample of rows: hashing a multi-GB batch on every rank would cost seconds.
    names = None
    if doc_ids is not None:
        names = hashlib.sha256("\x00".join(map(str, doc_ids)).encode()).hexdigest()
    return json.dumps([_digest_array(embeddings, sample_rows=64), names])
