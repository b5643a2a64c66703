"""The first stage of an index: inner-product top-k over unit vectors, ties by the lower id.

It picks each query's feedback set F(q), the ``feedback_k`` documents with the highest cosine
in the base-encoder space (``"base"``) or the projected one (``"projected"``); see
:class:`imrnns.index.IMRNNIndex`. Three kinds:

- ``"flat"`` (exact): :class:`FlatStage`. The stored (N, d) float32 vectors are the truth; a
  search is a blocked GEMM plus a running top-k in PyTorch (:func:`exact_topk`), or faiss's
  brute force (``faiss.knn``) where that measures faster (:func:`flat_backend`). Needs no
  faiss; runs on the index's device (CPU or CUDA).
- ``"ivf"`` (``IndexIVFFlat``, ``nlist`` lists, ``nprobe`` probed) and ``"hnsw"``
  (``IndexHNSWFlat``, ``hnsw_m`` links, ``ef_search``): :class:`FaissStage`, approximate,
  need faiss (the ``faiss`` or ``gpu`` extra).

Every search returns (scores (B, k) float32, ids (B, k) int64) ordered by score descending,
exact ties broken by the lower id, padded with ``-inf`` / ``-1`` where fewer than k documents
exist or an approximate stage finds fewer. The tie rule costs a bounded amount of work:

- torch flat: none beyond the one pass (the running top-k keeps the lower id of equal scores).
- faiss (flat or approximate): faiss's heap orders equal scores arbitrarily and may keep any
  of them at the cut, so each query asks for one more hit than k; only the rows whose k-th and
  (k+1)-th scores tie are searched again. Flat: one exact PyTorch pass over the stored vectors
  for each such row (:func:`exact_topk`). IVF/HNSW (no exact tie set): the row alone, with the
  depth doubled until the tie ends or reaches N, in groups of rows bounded to
  ``TIE_ENTRIES`` results (:func:`_widen`).

A flat stage is saved in faiss's ``IndexFlatIP`` file format, written and read here without
faiss (:func:`write`, :func:`read`), so a flat index saved with either backend loads with the
other, or with faiss absent. IVF/HNSW files are faiss's own.

Tested through tests/retriever/test_first_stage.py, tests/retriever/test_index.py,
tests/retriever/test_distributed.py and tests/bad_input/.
"""

from __future__ import annotations

import os
import struct
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imrnns_kernels import _validation as checks
from imrnns_kernels.topk import StreamingTopK

FIRST_STAGES = ("flat", "ivf", "hnsw")
SPACES = ("base", "projected", "auto")
FLAT_BACKENDS = ("auto", "torch", "faiss")
# Forces the flat stage's search backend ("torch" or "faiss"); "auto" (default) applies the
# measured rule of flat_backend(). Read at every search, so tests and benchmarks can set it.
BACKEND_ENV = "IMRNNS_FIRST_STAGE_BACKEND"
# Largest k a search accepts: k > N is padded, and the (B, k) output is the only allocation
# that grows with k, so a k beyond any corpus (10**12) must fail before it.
MAX_K = 2**31 - 1
INSTALL_FAISS = (
    "pip install 'imrnns-kernels[faiss]' (faiss-cpu) or 'imrnns-kernels[gpu]' (faiss-gpu)"
)
# Bytes of one (B, rows) float32 score block of the torch scan. A step peaks at about 4x
# that (imrnns_kernels.topk counts survivors through an int64 copy of the block's mask), plus
# the (B, k) running top-k: about 256 MiB whatever N and B. Smaller blocks cost time (a third
# more at 16 MiB, 300 queries over 200,000 documents); blocks of at least MIN_BLOCK_ROWS
# documents keep the GEMMs efficient for large B.
SCORE_BLOCK_BYTES = 64 << 20
MIN_BLOCK_ROWS = 1024
# Results held at once while approximate stages re-search tied rows (rows x depth).
TIE_ENTRIES = 1 << 22
# Batches of at most this many queries search a CPU flat stage with faiss when it is
# installed, larger ones with torch. The rule follows the measurement in benchmarks/RESULTS.md
# ("First stage: torch vs faiss"; python -m benchmarks.first_stage_timing): faiss's brute
# force won only for a single query (no GEMM set-up, no torch.topk: 0.37-0.43 vs 0.49-0.62 ms
# on SciFact), and lost from two queries up; at 300 queries by 1.6-6x on SciFact (N = 5,183)
# and 4.5-9x at N = 200,000.
FAISS_MAX_BATCH = 1

# faiss.METRIC_INNER_PRODUCT, as faiss files store it (readable without faiss).
METRIC_INNER_PRODUCT = 0
_FLAT_MAGIC = b"IxFI"  # faiss's IndexFlatIP record
# faiss's index header after the magic: d (int32), ntotal (int64), two unused int64, is_trained
# (bool), metric (int32); then the vector's length in floats (uint64) and the floats.
_FLAT_HEADER = struct.Struct("<iqqq?i")
_FLAT_COUNT = struct.Struct("<Q")
_FLAT_DATA_OFFSET = len(_FLAT_MAGIC) + _FLAT_HEADER.size + _FLAT_COUNT.size
_WARNED: set[str] = set()
# faiss once imported, or None once its import failed (a failed import is not retried: each
# try would scan sys.path again on every small search).
_FAISS: list[Any] = []


def warn_once(key: str, message: str) -> None:
    """``warnings.warn(message, RuntimeWarning)`` the first time ``key`` comes, per process."""
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def faiss_module() -> Any:
    """The faiss module, imported on first use (the flat first stage never needs it).

    Raises:
        ImportError: faiss is not installed; the message says which extra installs it.
    """
    if not _FAISS:
        try:
            import faiss
        except ImportError:
            faiss = None
        _FAISS.append(faiss)
    if _FAISS[0] is None:
        raise ImportError(f"faiss is not installed: {INSTALL_FAISS}")
    return _FAISS[0]


def faiss_available() -> bool:
    """Whether faiss can be imported."""
    try:
        faiss_module()
    except ImportError:
        return False
    return True


def require(kind: str) -> None:
    """Raise ImportError naming the extra to install when ``kind`` needs faiss and it is absent.

    ``"flat"`` never needs faiss; ``"ivf"`` and ``"hnsw"`` are faiss structures.
    """
    if kind != "flat" and not faiss_available():
        raise ImportError(
            f"first_stage={kind!r} needs faiss, which is not installed: {INSTALL_FAISS}. "
            "The exact 'flat' first stage needs neither."
        )


def check_k(k: object) -> int:
    """``k`` as given when it is an int in ``[1, MAX_K]``; else TypeError / ValueError.

    k larger than the corpus is allowed (the result is padded) up to ``MAX_K``, so that no
    search allocates a (B, k) result for an absurd k before it fails.
    """
    checks.check_k(k)
    if k > MAX_K:  # type: ignore[operator]
        raise ValueError(
            f"k must be at most {MAX_K} (2**31 - 1), got {k}: results are (B, k) arrays, "
            "padded with -inf / -1 past the corpus size"
        )
    return k  # type: ignore[return-value]


def check_parameters(nlist: Any, nprobe: Any, hnsw_m: Any, ef_search: Any) -> None:
    """Raise ValueError unless the IVF/HNSW parameters are ints in range (``nlist`` may be None).

    faiss does not check them: hnsw_m < 2 crashes the process (abort, segfault) or hangs,
    nprobe or ef_search < 1 fail or silently return too few hits at search time.
    """
    for name, value, least in (
        ("nlist", nlist, 1),
        ("nprobe", nprobe, 1),
        ("hnsw_m", hnsw_m, 2),
        ("ef_search", ef_search, 1),
    ):
        if value is None and name == "nlist":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")


def auto_nlist(rows: int) -> int:
    """The default IVF nlist for a first add of ``rows`` documents: about 4 sqrt(N), <= N."""
    return max(1, min(rows, int(4 * np.sqrt(rows))))


def settings_for_rows(settings: dict[str, Any], rows: int) -> dict[str, Any]:
    """A copy of index ``settings`` for an index of ``rows`` documents (a shard, a slice).

    An IVF ``nlist`` larger than ``rows`` was sized for a whole corpus: it becomes None, so
    the first add picks the default for the rows it gets (:func:`auto_nlist`).
    """
    settings = dict(settings)
    if settings.get("first_stage") == "ivf" and (settings.get("nlist") or 0) > rows:
        settings["nlist"] = None
    return settings


# ----------------------------------------------------------------------------- exact search
def flat_backend(batch: int, device: torch.device) -> str:
    """``"torch"`` or ``"faiss"``: which backend searches ``batch`` queries on a flat stage.

    ``$IMRNNS_FIRST_STAGE_BACKEND`` (``torch``, ``faiss``, ``auto``) forces one for CPU
    stages; ``faiss`` without faiss raises ImportError. A CUDA stage always uses torch (its
    vectors live on the GPU; faiss's CPU brute force would be a host round trip). ``auto``:
    faiss for batches of at most ``FAISS_MAX_BATCH`` queries when it is installed, torch
    otherwise (the measurement behind the rule: benchmarks/RESULTS.md, "First stage").
    """
    choice = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if choice not in FLAT_BACKENDS:
        raise ValueError(f"${BACKEND_ENV} must be one of {FLAT_BACKENDS}, got {choice!r}")
    if device.type != "cpu":
        return "torch"
    if choice == "faiss":
        faiss_module()
        return "faiss"
    if choice == "torch":
        return "torch"
    return "faiss" if batch <= FAISS_MAX_BATCH and faiss_available() else "torch"


def block_rows(batch: int, ntotal: int) -> int:
    """Documents per step of the torch scan: a (batch, rows) float32 block of about
    ``SCORE_BLOCK_BYTES``, at least ``MIN_BLOCK_ROWS``, at most ``ntotal``."""
    rows = max(MIN_BLOCK_ROWS, SCORE_BLOCK_BYTES // (4 * max(batch, 1)))
    return max(1, min(ntotal, rows))


def score_block(queries: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """(B, d) x (R, d) -> (B, R) float32 inner products (one GEMM); every scan step calls it."""
    return queries @ block.t()


@torch.no_grad()
def exact_topk(
    vectors: torch.Tensor, queries: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact inner-product top-k of ``queries`` over ``vectors``, ties by the lower id.

    ``s_ij = q_i . v_j`` in float32, computed once per (query, document) in blocks of
    :func:`block_rows` documents (memory: one (B, rows) block plus the (B, k) running top-k,
    never (B, N)); :class:`imrnns_kernels.topk.StreamingTopK` keeps, of equal scores, the
    lower id, so exact ties (duplicate documents, an all-zero query) cost nothing extra.

    Args:
        vectors: (N, d) float32 documents, N >= 1.
        queries: (B, d) float32, any device (moved to ``vectors``').
        k: results per query, ``1 <= k <= N``.

    Returns:
        (scores (B, k) float32, ids (B, k) int64) on ``vectors``' device, best first.
    """
    n = vectors.shape[0]
    queries = queries.to(vectors.device, torch.float32)
    b = queries.shape[0]
    if b == 0:
        return (
            torch.empty(0, k, dtype=torch.float32, device=vectors.device),
            torch.empty(0, k, dtype=torch.int64, device=vectors.device),
        )
    step = block_rows(b, n)
    top = StreamingTopK(b, k, vectors.device)
    for lo in range(0, n, step):
        top.add(score_block(queries, vectors[lo : lo + step]), lo)
    return top.result()


def pad(scores: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, k') results padded to (B, k) with ``-inf`` / ``-1`` (k >= k'); as they are if equal."""
    b, have = scores.shape
    if have >= k:
        return scores, ids
    out_s = torch.full((b, k), float("-inf"), dtype=torch.float32, device=scores.device)
    out_i = torch.full((b, k), -1, dtype=torch.int64, device=ids.device)
    out_s[:, :have], out_i[:, :have] = scores, ids
    return out_s, out_i


# ----------------------------------------------------------------------------- faiss searches
def faiss_knn(queries: np.ndarray, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """faiss's brute-force inner-product top-k (``faiss.knn``; what ``IndexFlatIP`` runs)."""
    faiss = faiss_module()
    return faiss.knn(queries, vectors, k, metric=faiss.METRIC_INNER_PRODUCT)


def _order(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` of each row by (score desc, id asc); faiss's ``-1`` padding last, -inf."""
    key = np.where(ids < 0, np.iinfo(np.int64).max, ids)
    order = np.lexsort((key, -scores.astype(np.float64)), axis=-1)[:, :k]
    s = np.take_along_axis(scores, order, axis=1).astype(np.float32)
    i = np.take_along_axis(ids, order, axis=1).astype(np.int64)
    s[i < 0] = -np.inf
    return np.ascontiguousarray(s), np.ascontiguousarray(i)


def _tied_rows(scores: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """Rows of a depth-(>k) result whose k-th and last scores tie: more equal scores may
    lie beyond it, so the k best by (score desc, id asc) are not known yet."""
    last = scores.shape[1] - 1
    if last < k:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero((scores[:, k - 1] == scores[:, last]) & (ids[:, last] >= 0))


def faiss_topk(
    search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]],
    x: np.ndarray,
    k: int,
    ntotal: int,
    exact: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by (score desc, id asc) from a faiss search, re-searching only the tied rows.

    One ``search(x, k + 1)`` for the block; a row whose k-th and (k+1)-th scores tie is the
    only one searched again: with ``exact(rows, k)`` (one exact pass over the corpus for those
    rows, flat stages), else by :func:`_widen` (approximate stages).

    Args:
        search: ``(queries (b, d) float32, depth) -> (scores, ids)`` of faiss's kind.
        x: (B, d) float32 queries.
        k: results per query, ``1 <= k <= ntotal``.
        ntotal: documents searched.
        exact: exact top-k of some rows (the tie rule applied exactly), or None.

    Returns:
        (scores (B, k) float32, ids (B, k) int64), padding ``-inf`` / ``-1`` last.
    """
    depth = k + 1 if k < ntotal else k
    scores, ids = search(x, depth)
    tied = _tied_rows(scores, ids, k)
    scores, ids = _order(scores, ids, k)
    if tied.size:
        rows = np.ascontiguousarray(x[tied])
        redo = exact(rows, k) if exact is not None else _widen(search, rows, k, ntotal, depth)
        scores[tied], ids[tied] = redo
    return scores, ids


def _widen(
    search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]],
    x: np.ndarray,
    k: int,
    ntotal: int,
    depth: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Re-search tied rows of an approximate stage, doubling the depth until the tie ends.

    A row leaves as soon as its k-th score is above its deepest hit (or faiss runs out of
    hits, or the depth reaches ``ntotal``). Per row at most ``log2(ntotal / k)`` searches whose
    depths sum to under ``2 ntotal``; rows go in groups of at most ``TIE_ENTRIES`` results.
    """
    out_s = np.empty((x.shape[0], k), dtype=np.float32)
    out_i = np.empty((x.shape[0], k), dtype=np.int64)
    rows = np.arange(x.shape[0])
    while rows.size:
        depth = min(ntotal, 2 * depth)
        group = max(1, TIE_ENTRIES // depth)
        still = []
        for lo in range(0, rows.size, group):
            part = rows[lo : lo + group]
            scores, ids = search(np.ascontiguousarray(x[part]), depth)
            if depth < ntotal:
                still.append(part[_tied_rows(scores, ids, k)])
            out_s[part], out_i[part] = _order(scores, ids, k)
        rows = np.concatenate(still) if still else np.zeros(0, dtype=np.int64)
    return out_s, out_i


# ----------------------------------------------------------------------------- row storage
class RowBuffer:
    """Rows of one shape with spare capacity, so that appends cost O(rows appended) amortised.

    The storage holds ``capacity >= rows`` rows; an append that does not fit allocates
    ``max(2 capacity, rows + new, MIN_CAPACITY)`` rows and copies the held ones once, so n
    appends of any sizes reallocate O(log n) times and copy fewer than 2n rows in all.
    :attr:`data` is a view of the held rows (it stays valid, though stale, after a later
    append reallocates). :attr:`reallocations` and :attr:`rows_copied` count the growth work
    (tests check it stays O(log n) and O(n)).

    Args:
        tail: the shape of one row (``()`` for scalars).
        dtype, device: of the storage.
    """

    MIN_CAPACITY = 16

    def __init__(self, tail: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        self._data = torch.empty((0, *tail), dtype=dtype, device=device)
        self.rows = 0
        self.reallocations = 0
        self.rows_copied = 0

    @property
    def data(self) -> torch.Tensor:
        """(rows, *tail) view of the held rows."""
        return self._data[: self.rows]

    @property
    def capacity(self) -> int:
        """Rows the storage can hold before the next reallocation."""
        return int(self._data.shape[0])

    def append(self, x: torch.Tensor) -> None:
        """Append (M, *tail) rows (converted to the storage's dtype and device)."""
        need = self.rows + int(x.shape[0])
        if need > self.capacity:
            grown = torch.empty(
                (max(2 * self.capacity, need, self.MIN_CAPACITY), *self._data.shape[1:]),
                dtype=self._data.dtype,
                device=self._data.device,
            )
            grown[: self.rows] = self._data[: self.rows]
            self.rows_copied += self.rows
            self.reallocations += 1
            self._data = grown
        self._data[self.rows : need] = x
        self.rows = need

    def replace(self, x: torch.Tensor) -> None:
        """Hold exactly ``x`` (no spare capacity; the next append grows it)."""
        self._data = x
        self.rows = int(x.shape[0])

    def keep(self, slots: torch.Tensor) -> None:
        """Keep only rows ``slots`` (int64, sorted), in that order, in the same storage."""
        kept = self._data.index_select(0, slots.to(self._data.device))
        self._data[: kept.shape[0]] = kept
        self.rows = int(kept.shape[0])

    def to(self, device: torch.device) -> None:
        """Move the held rows to ``device`` (spare capacity is dropped)."""
        self.replace(self.data.to(device))


# ----------------------------------------------------------------------------- stages
def _checked_depth(queries: Any, k: int, d: int, ntotal: int) -> int:
    """``min(k, ntotal)``, the results a search computes, after checking its arguments."""
    check_k(k)
    if ntotal == 0:
        raise ValueError("the first stage is empty: add() documents before searching")
    if not isinstance(queries, torch.Tensor) or queries.dim() != 2 or queries.shape[1] != d:
        got = tuple(queries.shape) if hasattr(queries, "shape") else type(queries).__name__
        raise ValueError(f"queries must be a (B, {d}) tensor, got {got}")
    return min(k, ntotal)


class FlatStage:
    """Exact inner-product first stage over stored (N, d) float32 vectors (no faiss needed).

    Args:
        dim: vector width d.
        device: where the vectors live (the search runs there).
    """

    kind = "flat"

    def __init__(self, dim: int, device: torch.device | str = "cpu") -> None:
        self.d = int(dim)
        self.device = torch.device(device)
        # Spare capacity: many small adds copy O(total) bytes, not O(total) per add.
        self._rows = RowBuffer((self.d,), torch.float32, self.device)
        # A memory map of a saved file (``read(mmap=True)``): only slices are copied out.
        self._mapped: np.ndarray | None = None
        # faiss GPU shards of the same vectors (:func:`to_all_gpus`), searched instead.
        self.accelerator: Any = None

    @property
    def ntotal(self) -> int:
        """Number of stored vectors."""
        return int(self._mapped.shape[0] if self._mapped is not None else self._rows.rows)

    @property
    def _vectors(self) -> torch.Tensor:
        return self._rows.data

    @_vectors.setter
    def _vectors(self, value: torch.Tensor) -> None:
        self._rows.replace(value)

    @property
    def vectors(self) -> torch.Tensor:
        """(N, d) float32 stored vectors on :attr:`device` (a mapped file is read in full)."""
        self._read_mapped()
        return self._vectors

    def _read_mapped(self) -> None:
        """Read a memory-mapped file in full (before the vectors change or are searched)."""
        if self._mapped is not None:
            self._vectors = torch.from_numpy(np.array(self._mapped, dtype=np.float32))
            self._mapped = None

    def add(self, x: np.ndarray | torch.Tensor) -> None:
        """Append (M, d) float32 vectors (ids continue from :attr:`ntotal`); amortised
        O(M d): the storage grows by doubling (:class:`RowBuffer`)."""
        t = torch.as_tensor(x).to(self.device, torch.float32)
        if t.dim() != 2 or t.shape[1] != self.d:
            raise ValueError(f"vectors must be (M, {self.d}), got {tuple(t.shape)}")
        self._read_mapped()
        self._rows.append(t)
        if self.accelerator is not None:  # the GPU shards hold every vector too
            self.accelerator.add(np.ascontiguousarray(t.cpu().numpy()))

    def keep(self, slots: torch.Tensor) -> None:
        """Keep only the vectors at ``slots`` (sorted, unique int64), in that order."""
        self._read_mapped()
        self._rows.keep(slots)
        if self.accelerator is not None:
            self.accelerator.reset()
            self.accelerator.add(np.ascontiguousarray(self.vectors.cpu().numpy()))

    def reconstruct(self, lo: int, hi: int) -> np.ndarray:
        """Rows [lo, hi) as a (hi - lo, d) float32 numpy copy."""
        if self._mapped is not None:
            return np.array(self._mapped[lo:hi], dtype=np.float32)
        return self._vectors[lo:hi].detach().cpu().numpy().copy()

    def to(self, device: torch.device | str) -> FlatStage:
        """This stage with its vectors on ``device`` (itself, moved in place)."""
        self.device = torch.device(device)
        self._read_mapped()
        self._rows.to(self.device)
        return self

    def search(
        self, queries: torch.Tensor, k: int, candidates: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k of (B, d) float32 queries, ties by the lower id, padded past N.

        ``candidates`` (sorted, unique int64 ids, at least one) restricts the search to those
        vectors: they are gathered into an (A, d) block and searched exactly as a stage
        holding only them would be, then mapped back, so the result equals that of a stage
        built from those vectors in the same order (with their ids).

        Returns (scores (B, k) float32, ids (B, k) int64) on :attr:`device`. Work and
        memory follow ``min(k, N)`` (N: the candidates when given); only the returned (B, k)
        grows with k.
        """
        n = self.ntotal if candidates is None else int(candidates.numel())
        kk = _checked_depth(queries, k, self.d, n)
        if queries.shape[0] == 0:
            none = torch.empty(0, 1, device=self.device)
            return pad(none, none.long(), k)
        vectors = self.vectors
        queries = queries.to(self.device, torch.float32)
        if candidates is not None:
            candidates = candidates.to(self.device)
            vectors = vectors.index_select(0, candidates)
        if self.accelerator is not None and candidates is None:
            scores, ids = self._faiss_search(self.accelerator.search, queries, kk, vectors)
        elif flat_backend(queries.shape[0], self.device) == "faiss":
            data = vectors.cpu().numpy()
            scores, ids = self._faiss_search(
                lambda x, depth: faiss_knn(x, data, depth), queries, kk, vectors
            )
        else:
            scores, ids = exact_topk(vectors, queries, kk)
        if candidates is not None:
            ids = torch.where(ids >= 0, candidates[ids.clamp(min=0)], ids)
        return pad(scores, ids, k)

    def _faiss_search(
        self, search: Callable[..., Any], queries: torch.Tensor, k: int, vectors: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        def exact(rows: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
            s, i = exact_topk(vectors, torch.from_numpy(rows), kk)
            return s.cpu().numpy(), i.cpu().numpy()

        x = np.ascontiguousarray(queries.cpu().numpy(), dtype=np.float32)
        scores, ids = faiss_topk(search, x, k, int(vectors.shape[0]), exact)
        return (
            torch.from_numpy(scores).to(self.device),
            torch.from_numpy(ids).to(self.device),
        )


class FaissStage:
    """A faiss first stage (``"ivf"``, ``"hnsw"``, or a caller's own faiss index).

    Args:
        index: the faiss index (inner-product metric).
        kind: ``"ivf"``, ``"hnsw"`` or ``"flat"``.
    """

    def __init__(self, index: Any, kind: str) -> None:
        self.index = index
        self.kind = kind

    @property
    def ntotal(self) -> int:
        """Number of stored vectors."""
        return int(self.index.ntotal)

    @property
    def d(self) -> int:
        """Vector width."""
        return int(self.index.d)

    def add(self, x: np.ndarray | torch.Tensor) -> None:
        """Append (M, d) float32 vectors (ids continue from :attr:`ntotal`)."""
        arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x
        self.index.add(np.ascontiguousarray(arr, dtype=np.float32))

    def reconstruct(self, lo: int, hi: int) -> np.ndarray:
        """Rows [lo, hi) of the stored vectors as a (hi - lo, d) float32 array."""
        faiss = faiss_module()
        index = to_cpu(self).index
        try:
            ivf = faiss.extract_index_ivf(index)
        except (RuntimeError, TypeError, ValueError):
            ivf = None
        if ivf is not None:
            ivf.make_direct_map()  # IVF stores vectors by list: reconstruct needs id -> slot
        return np.ascontiguousarray(index.reconstruct_n(lo, hi - lo), dtype=np.float32)

    def search(
        self, queries: torch.Tensor, k: int, candidates: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k of (B, d) float32 queries, ties by the lower id, padded with ``-inf`` / ``-1``.

        ``candidates`` (sorted, unique int64 ids, at least one) restricts the search with
        faiss's ``IDSelectorBitmap`` (search parameters of IVF / HNSW): an approximate stage
        filters within the lists or graph nodes it visits, so the result holds only
        candidates but need not equal that of a stage built from the candidates alone (it
        can find fewer than k: padded).

        Returns CPU tensors (scores (B, k) float32, ids (B, k) int64).
        """
        n = self.ntotal if candidates is None else int(candidates.numel())
        kk = _checked_depth(queries, k, self.d, n)
        if queries.shape[0] == 0:
            return pad(torch.empty(0, 1), torch.empty(0, 1, dtype=torch.int64), k)
        x = np.ascontiguousarray(queries.detach().cpu().numpy(), dtype=np.float32)
        exact = None
        flat = _flat_view(self.index) if candidates is None else None
        if flat is not None:
            vectors = torch.from_numpy(flat)

            def exact(rows: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
                s, i = exact_topk(vectors, torch.from_numpy(rows), kk)
                return s.numpy(), i.numpy()

        search = self.index.search
        if candidates is not None:
            search = self._selected_search(candidates)
        scores, ids = faiss_topk(search, x, kk, n, exact)
        return pad(torch.from_numpy(scores), torch.from_numpy(ids), k)

    def _selected_search(
        self, candidates: torch.Tensor
    ) -> Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]:
        """``search(x, depth)`` of this index restricted to ``candidates`` (an ID selector)."""
        faiss = faiss_module()
        mask = np.zeros(self.ntotal, dtype=bool)
        mask[candidates.cpu().numpy()] = True
        bitmap = np.packbits(mask, bitorder="little")
        selector = faiss.IDSelectorBitmap(self.ntotal, faiss.swig_ptr(bitmap))
        index = self.index
        if self.kind == "hnsw":
            hnsw = faiss.downcast_index(index)
            params = faiss.SearchParametersHNSW(sel=selector, efSearch=hnsw.hnsw.efSearch)
        elif self.kind == "ivf":
            nprobe = faiss.extract_index_ivf(index).nprobe
            params = faiss.SearchParametersIVF(sel=selector, nprobe=nprobe)
        else:
            params = faiss.SearchParameters(sel=selector)

        def search(
            x: np.ndarray, depth: int, _alive: tuple[Any, ...] = (bitmap, selector)
        ) -> tuple[np.ndarray, np.ndarray]:
            # _alive: faiss holds raw pointers to the bitmap and the selector, so they must
            # live as long as this function.
            return index.search(x, depth, params=params)

        return search

    def keep(self, slots: torch.Tensor) -> None:
        """Keep only the vectors at ``slots`` (sorted, unique int64), in that order.

        faiss's HNSW cannot delete: the index is rebuilt from the kept vectors (an IVF one
        keeps its trained centroids). Costs a reconstruction and a re-add of the kept rows.
        """
        faiss = faiss_module()
        kept = self.reconstruct(0, self.ntotal)[slots.cpu().numpy()]
        fresh = faiss.clone_index(to_cpu(self).index)
        fresh.reset()
        if kept.shape[0]:
            fresh.add(np.ascontiguousarray(kept, dtype=np.float32))
        self.index = fresh


def _flat_view(index: Any) -> np.ndarray | None:
    """A zero-copy (N, d) view of a CPU ``IndexFlatIP``'s vectors, else None."""
    faiss = faiss_module()
    if not isinstance(index, faiss.IndexFlat) or index.metric_type != faiss.METRIC_INNER_PRODUCT:
        return None
    n, d = int(index.ntotal), int(index.d)
    if n == 0:
        return np.zeros((0, d), dtype=np.float32)
    return faiss.rev_swig_ptr(index.get_xb(), n * d).reshape(n, d)


Stage = FlatStage | FaissStage


def build(
    kind: str, train: np.ndarray, *, nlist: int | None, nprobe: int, hnsw_m: int, ef_search: int
) -> Stage:
    """An empty first stage of ``kind`` for vectors like ``train`` ((N, d) float32).

    IVF trains its ``nlist`` coarse centroids on ``train`` (it needs ``nlist <= N``); flat
    and HNSW use only its width. Vectors are added by the caller.

    Raises:
        ImportError: ``kind`` is IVF or HNSW and faiss is not installed (names the extra).
    """
    dim = train.shape[1]
    if kind == "flat":
        return FlatStage(dim)
    require(kind)
    faiss = faiss_module()
    metric = faiss.METRIC_INNER_PRODUCT
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m, metric)
        index.hnsw.efSearch = ef_search
        return FaissStage(index, kind)
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, metric)
    index.train(np.ascontiguousarray(train, dtype=np.float32))
    index.nprobe = nprobe
    return FaissStage(index, kind)


def set_nprobe(stage: Stage, nprobe: int) -> None:
    """Set the number of lists an IVF stage (possibly wrapped) probes per query."""
    if isinstance(stage, FaissStage):
        faiss_module().extract_index_ivf(stage.index).nprobe = nprobe


def search_ties_by_lower_id(
    index: Any, x: np.ndarray, k: int, ntotal: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of a first stage or a faiss index, exact ties broken by the lower id.

    faiss's heap keeps whichever of equal scores its scan order favours; this applies the
    package's rule with bounded extra work (module docstring): only tied rows are searched
    again, once exactly for flat indexes.

    Args:
        index: a :class:`FlatStage` / :class:`FaissStage`, or a faiss inner-product index.
        x: (B, d) float32 queries.
        k: results per query, ``1 <= k <= MAX_K`` (past ``ntotal``: padded).
        ntotal: the number of vectors ``index`` holds.

    Returns:
        (scores (B, k) float32, ids (B, k) int64) numpy arrays, padding ``-inf`` / ``-1`` last.
    """
    stage = index if isinstance(index, FlatStage | FaissStage) else FaissStage(index, "faiss")
    if stage.ntotal != ntotal:
        raise ValueError(f"the index holds {stage.ntotal} vectors, ntotal says {ntotal}")
    queries = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    scores, ids = stage.search(queries, k)
    return scores.cpu().numpy(), ids.cpu().numpy()


def reconstruct(stage: Stage | None, lo: int, hi: int) -> np.ndarray:
    """Rows [lo, hi) of a first stage's stored vectors as a (hi - lo, d) float32 array.

    ``stage`` may be None (nothing added yet): an empty (0, 0) array.
    """
    if hi <= lo or stage is None:
        d = 0 if stage is None else stage.d
        return np.zeros((0, d), dtype=np.float32)
    return stage.reconstruct(lo, hi)


# ----------------------------------------------------------------------------- devices
def to_gpu(stage: Stage, device: torch.device) -> Stage:
    """``stage`` on ``device`` when it is a GPU: flat moves its vectors (torch search there);
    a faiss stage moves with faiss-gpu, else stays on the CPU with a warning (once)."""
    if device.type != "cuda":
        return stage
    if isinstance(stage, FlatStage):
        return stage.to(device)
    faiss = faiss_module()
    if not hasattr(faiss, "StandardGpuResources"):
        warn_once(
            "first-stage-cpu",
            f"the {stage.kind} first stage runs on the CPU although the index is on {device}: "
            "faiss-gpu is not installed (pip install 'imrnns-kernels[gpu]')",
        )
        return stage
    try:
        res = faiss.StandardGpuResources()
        moved = faiss.index_cpu_to_gpu(res, device.index or 0, stage.index)
    except (RuntimeError, TypeError, ValueError) as exc:  # e.g. HNSW has no GPU version
        warn_once(
            "first-stage-cpu",
            f"the {stage.kind} first stage runs on the CPU although the index is on {device}: "
            f"faiss-gpu cannot move it ({exc})",
        )
        return stage
    return FaissStage(moved, stage.kind)


def to_cpu(stage: Stage) -> Stage:
    """A CPU copy of a GPU first stage (to save or reconstruct it); a CPU stage as it is."""
    if isinstance(stage, FlatStage):
        if stage.device.type == "cpu":
            return stage
        copy = FlatStage(stage.d)
        copy._vectors = stage.vectors.cpu()
        return copy
    faiss = faiss_module()
    if hasattr(faiss, "index_gpu_to_cpu") and "Gpu" in type(stage.index).__name__:
        return FaissStage(faiss.index_gpu_to_cpu(stage.index), stage.kind)
    return stage


def to_all_gpus(stage: Stage | None) -> Stage:
    """``stage`` sharded over all local GPUs (faiss-gpu ``index_cpu_to_all_gpus``, ``shard=True``).

    A flat stage keeps its vectors (ties are resolved on them) and searches the shards.

    Raises:
        RuntimeError: faiss-gpu is not installed or sees fewer than two GPUs.
        ValueError: ``stage`` is None (nothing added yet).
    """
    faiss = faiss_module() if faiss_available() else None
    gpus = faiss.get_num_gpus() if faiss is not None and hasattr(faiss, "get_num_gpus") else 0
    if faiss is None or not hasattr(faiss, "index_cpu_to_all_gpus") or gpus < 2:
        raise RuntimeError(
            f"sharding the first stage over GPUs needs faiss-gpu and at least 2 GPUs "
            f"(faiss sees {gpus}); install the 'gpu' extra"
        )
    if stage is None:
        raise ValueError("the index is empty: add() documents first")
    options = faiss.GpuMultipleClonerOptions()
    options.shard = True
    if isinstance(stage, FlatStage):
        stage = to_cpu(stage)
        cpu = faiss.IndexFlatIP(stage.d)
        cpu.add(stage.vectors.numpy())
        stage.accelerator = faiss.index_cpu_to_all_gpus(cpu, co=options)
        return stage
    return FaissStage(faiss.index_cpu_to_all_gpus(to_cpu(stage).index, co=options), stage.kind)


# ----------------------------------------------------------------------------- files
def write(stage: Stage, path: str | Path) -> None:
    """Write ``stage`` to ``path``: faiss's ``IndexFlatIP`` format for flat (no faiss needed),
    ``faiss.write_index`` for the others (from a CPU copy)."""
    if isinstance(stage, FaissStage):
        faiss_module().write_index(to_cpu(stage).index, str(path))
        return
    vectors = np.ascontiguousarray(to_cpu(stage).vectors.numpy(), dtype=np.float32)
    n, d = vectors.shape
    with open(path, "wb") as fh:
        fh.write(_FLAT_MAGIC)
        fh.write(_FLAT_HEADER.pack(d, n, 1 << 20, 1 << 20, True, METRIC_INNER_PRODUCT))
        fh.write(_FLAT_COUNT.pack(n * d))
        fh.write(memoryview(vectors).cast("B"))


def read(path: str | Path, *, mmap: bool = False) -> Stage:
    """A first stage written by :func:`write` (or by faiss), on the CPU.

    A flat (``IndexFlatIP``) file is read without faiss, through a memory map with ``mmap``
    (then only the slices asked for are copied). Other files need faiss.

    Raises:
        ValueError: the file is not an inner-product index, or a flat file's header and size
            disagree (truncated, or not a first stage). The message names the file.
        ImportError: an IVF/HNSW file and faiss is not installed.
    """
    path = Path(path)
    with open(path, "rb") as fh:
        magic = fh.read(len(_FLAT_MAGIC))
        head = fh.read(_FLAT_HEADER.size + _FLAT_COUNT.size)
    if magic != _FLAT_MAGIC:
        if magic in (b"IxF2", b"IxFl"):
            raise ValueError(f"{path}: a flat index of another metric than inner product")
        faiss = faiss_module()
        index = faiss.read_index(str(path))
        kinds = {"ivf": faiss.IndexIVFFlat, "hnsw": faiss.IndexHNSWFlat}
        kind = next((name for name, cls in kinds.items() if isinstance(index, cls)), None)
        if kind is None or index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError(
                f"{path}: a faiss {type(index).__name__} (metric {index.metric_type}), not an "
                "inner-product IndexFlatIP, IndexIVFFlat or IndexHNSWFlat first stage"
            )
        return FaissStage(index, kind)
    if len(head) != _FLAT_HEADER.size + _FLAT_COUNT.size:
        raise ValueError(f"{path}: truncated flat first stage header")
    d, n, _, _, _, metric = _FLAT_HEADER.unpack(head[: _FLAT_HEADER.size])
    (count,) = _FLAT_COUNT.unpack(head[_FLAT_HEADER.size :])
    size = path.stat().st_size
    if (
        d <= 0
        or n < 0
        or metric != METRIC_INNER_PRODUCT
        or count != n * d
        or size != _FLAT_DATA_OFFSET + 4 * count
    ):
        raise ValueError(
            f"{path}: not a consistent flat inner-product first stage (d={d}, ntotal={n}, "
            f"metric={metric}, {count} floats, {size} bytes)"
        )
    stage = FlatStage(d)
    if n == 0:
        return stage
    if mmap:
        stage._mapped = np.memmap(
            path, dtype=np.float32, mode="r", offset=_FLAT_DATA_OFFSET, shape=(n, d)
        )
        return stage
    with open(path, "rb") as fh:
        fh.seek(_FLAT_DATA_OFFSET)
        data = np.fromfile(fh, dtype=np.float32, count=count)
    if data.size != count:
        raise ValueError(f"{path}: truncated flat first stage ({data.size} of {count} floats)")
    stage._vectors = torch.from_numpy(data.reshape(n, d))
    return stage
