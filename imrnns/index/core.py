"""IMRNNIndex: an exact or faiss first stage plus the fused IMRNN stage, faiss-style API.

Search for B queries, all batched (no per-query Python loop):

1. First stage (:mod:`imrnns.index.first_stage`): the ``feedback_k`` nearest documents by
   cosine of the base-encoder embeddings (``first_stage_space="base"``, the official v0.2
   evaluation) or of the projected ones (``"projected"``, the official v0.1 protocol); by
   default the one that matches the model's semantics. Flat (exact; PyTorch, or faiss where
   it measures faster; needs no faiss), IVF or HNSW (faiss).
2. Query state: ``T_q = act(A_q(p(q)))``; the feedback set's document transforms are
   averaged (fused ``adapter_reduce``, from per-document results cached at ``add`` time when
   possible) and refine the query into ``q~``.
3. ``mode="rerank"`` (official behaviour): the feedback set is scored with the fused
   ``modulated_score`` and sorted. ``mode="exhaustive"``: every document is scored with the
   streaming ``modulated_topk``, so documents outside the feedback set can enter the top-k.

Every document has an id (:meth:`IMRNNIndex.add`): int64 (default 0, 1, 2, ... in add
order) or str, one kind per index. Results are ``(scores (B, k) float32, ids (B, k))``, best
first, ties broken by the earlier-added document (the lower id for default ids), padded with
``-inf`` and ``-1`` (int ids) or ``None`` (str ids) when fewer than k documents qualify;
numpy in gives numpy out, torch in gives torch out (str ids: a numpy object array or a list
of lists). :meth:`IMRNNIndex.remove` deletes by id (tombstones, compacted once they reach
``COMPACT_FRACTION`` of the rows); ``search(..., allow=...)`` restricts a search to some
documents, equal to an index of those documents alone with a flat first stage. Rows are
stored with spare capacity (:class:`imrnns.index.first_stage.RowBuffer`), so many small
adds cost O(total). ``save``/``load`` write a directory atomically with a
manifest of SHA-256 checksums (:mod:`imrnns.index.storage`), so a truncated or tampered index
fails to load loudly.

The sharded index (:mod:`imrnns.index.distributed`) holds one :class:`IMRNNIndex` per rank and
uses its public methods plus the shared checks here (:func:`check_search_args`,
:func:`as_float_tensor`, :func:`feedback_set`, :func:`topk_by_score_then_id`).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

import imrnns_kernels
from imrnns._atomic import read_directory
from imrnns.checkpoints import load_pretrained
from imrnns.index import first_stage as faiss_stage
from imrnns.index import storage
from imrnns.index.first_stage import RowBuffer
from imrnns.index.storage import IndexError_
from imrnns.model import IMRNN
from imrnns_kernels import _validation as checks
from imrnns_kernels.dispatch import check_workspace_bytes

MODES = ("rerank", "exhaustive")
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Rows projected per step in add(): bounds the temporary (rows x n) float32 copies.
ADD_CHUNK = 65536
# Queries per step in search(): bounds (B x feedback_k x m) gathers.
SEARCH_CHUNK = 4096
# The encoder similarities a base-space first stage can serve as an inner product
# (``IMRNNIndex(similarity=...)``; imrnns.evaluate.index_similarity maps an encoder's).
INDEX_SIMILARITIES = ("cosine", "dot")


# Largest int id: ids are int64 and -1 pads results, so ids are 0 .. 2**63 - 1.
MAX_ID = 2**63 - 1
# remove() compacts the stored rows once removed rows reach this fraction of them: amortised
# O(1) row moves per removal, and searches skip at most this share of dead rows.
COMPACT_FRACTION = 0.25
# With at most this many removed rows (and no allow=), the exhaustive scan (and a flat first
# stage) search k + (removed) deep over every row and drop the removed ones: exact (a removed
# row takes at most one place), and cheaper than gathering the live rows per search.
DEAD_SKIP_MAX = 1024


def _few(values: Sequence[Any], shown: int = 5) -> str:
    """Up to ``shown`` values by repr, and how many more."""
    values = list(values)
    more = f" and {len(values) - shown} more" if len(values) > shown else ""
    return ", ".join(repr(v) for v in values[:shown]) + more


def parse_ids(ids: Any, rows: int, name: str = "ids") -> tuple[str, np.ndarray | list[str]]:
    """(``"int"`` and an int64 array, or ``"str"`` and a list) for ``rows`` given ids, or raise.

    Accepted: a sequence of ``rows`` Python/numpy ints in ``[0, 2**63 - 1]`` (not bools), a
    1-D integer numpy array or torch tensor, or a sequence of ``rows`` strings. Uniqueness is
    checked by the caller (:meth:`DocumentIds.check_new`).

    Raises:
        TypeError: not a sequence / array, or a mix of ints and strings, or other types.
        ValueError: wrong count, or an int outside ``[0, 2**63 - 1]``.
    """
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    if isinstance(ids, np.ndarray):
        if ids.ndim != 1 or not (np.issubdtype(ids.dtype, np.integer) or ids.dtype.kind == "U"):
            raise TypeError(f"{name} must be a 1-D array of ints, got {ids.dtype} {ids.shape}")
        ids = ids.tolist()
    if isinstance(ids, str | bytes) or not isinstance(ids, Sequence | range):
        raise TypeError(
            f"{name} must be a sequence of {rows} ints or {rows} strings, got {type(ids).__name__}"
        )
    if len(ids) != rows:
        raise ValueError(f"{name} must be {rows} ids, one per embedding row, got {len(ids)}")
    if all(isinstance(d, str) for d in ids):
        return "str", list(ids)
    if all(isinstance(d, int | np.integer) and not isinstance(d, bool | np.bool_) for d in ids):
        bad = [int(d) for d in ids if not 0 <= int(d) <= MAX_ID]
        if bad:
            raise ValueError(
                f"{name} must be ints in [0, 2**63 - 1] (-1 pads results), got {_few(bad)}"
            )
        return "int", np.fromiter((int(d) for d in ids), dtype=np.int64, count=rows)
    kinds = sorted({type(d).__name__ for d in ids})
    raise TypeError(f"{name} must be all ints or all strings (one kind per index), got {kinds}")


class DocumentIds:
    """The id of every stored row (slot) of an index, and the id -> slot lookup.

    One kind per index: ``"int"`` (int64 ids in ``[0, 2**63 - 1]``; by default 0, 1, 2, ...
    in add order) or ``"str"``. Rows are slots of the index's buffers (removed rows keep
    theirs until compaction); the lookup holds live ids only, so a removed id is unknown and
    may be added again. Appends cost O(rows added) (the int table is a :class:`RowBuffer`;
    the lookup dict is built on first use, then kept up to date).
    """

    def __init__(self) -> None:
        self.kind: str | None = None
        self._ints = RowBuffer((), torch.int64, torch.device("cpu"))
        self._names: list[str] = []
        # id -> slot of the live ids; None until a lookup needs it.
        self._slot_of: dict[Any, int] | None = None
        # True while ids equal slots (0 .. S - 1): lookups and mapping are arithmetic.
        self.default = True
        # The id a default add gives next: above every int id ever held, so none is reused.
        self.next_default = 0

    def __len__(self) -> int:
        return self._ints.rows if self.kind != "str" else len(self._names)

    @property
    def table(self) -> np.ndarray | list[str]:
        """Ids of every slot (removed ones included): int64 array or list of str."""
        if self.kind == "str":
            return self._names
        return self._ints.data.numpy()

    def _lookup(self, dead: torch.Tensor | None) -> dict[Any, int]:
        if self._slot_of is None:
            table = self.table
            alive = range(len(self)) if dead is None else np.flatnonzero(~dead.numpy()).tolist()
            keys = table if self.kind == "str" else table.tolist()
            self._slot_of = {keys[s]: s for s in alive}
        return self._slot_of

    def check_new(self, kind: str, ids: np.ndarray | list[str], name: str, dead: Any) -> None:
        """Raise ValueError unless ``ids`` repeat nothing, within themselves or live ids."""
        keys = ids if kind == "str" else ids.tolist()
        if len(set(keys)) != len(keys):
            seen: set[Any] = set()
            repeated = [d for d in keys if d in seen or seen.add(d)]
            raise ValueError(
                f"{name} must be unique: {_few(list(dict.fromkeys(repeated)))} appear more "
                "than once in this add()"
            )
        if len(self) == 0 or kind != self.kind:
            return
        if self.default and kind == "int" and dead is None:
            taken = [d for d in keys if d < len(self)]
        else:
            lookup = self._lookup(dead)
            taken = [d for d in keys if d in lookup]
        if taken:
            raise ValueError(f"{name} must be new: {_few(taken)} already in the index")

    def append(self, kind: str, ids: np.ndarray | list[str]) -> None:
        """Append the ids of new slots (checked by :meth:`check_new`)."""
        start = len(self)
        if len(self) == 0:
            self.kind, self.default = kind, True
            self._names, self._slot_of = [], None
            self._ints.replace(torch.empty(0, dtype=torch.int64))
        if kind == "str":
            self._names.extend(ids)
            self.default = False
            new_keys: list[Any] = list(ids)
        else:
            array = np.asarray(ids, dtype=np.int64)
            if self.default and not np.array_equal(array, np.arange(start, start + len(array))):
                self.default = False
            self._ints.append(torch.from_numpy(array))
            if len(array):
                self.next_default = max(self.next_default, int(array.max()) + 1)
            new_keys = array.tolist()
        if self._slot_of is not None:
            self._slot_of.update(zip(new_keys, range(start, start + len(new_keys)), strict=True))

    def slots(
        self, ids: Any, dead: torch.Tensor | None, what: str, skip_unknown: bool = False
    ) -> np.ndarray:
        """Sorted unique int64 slots of live ``ids`` (a collection); ValueError naming
        unknown ones (left out instead with ``skip_unknown``)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().numpy()
        if isinstance(ids, np.ndarray):
            if ids.ndim != 1:
                raise ValueError(f"{what} must be a 1-D collection of ids, got shape {ids.shape}")
            ids = ids.tolist()
        if isinstance(ids, str | bytes | int) or not isinstance(ids, Collection):
            raise TypeError(
                f"{what} must be a collection of ids (set, list, array), got {type(ids).__name__}"
            )
        keys = [int(d) if isinstance(d, np.integer) else d for d in ids]
        if self.kind == "int":
            wrong = [d for d in keys if not isinstance(d, int) or isinstance(d, bool)]
        else:
            wrong = [d for d in keys if not isinstance(d, str)]
        if wrong:
            raise TypeError(f"{what}: this index holds {self.kind} ids, got {_few(wrong)}")
        if self.default and dead is None:
            n = len(self)
            unknown = [d for d in keys if not 0 <= d < n]
            found = np.asarray([d if 0 <= d < n else -1 for d in keys], dtype=np.int64)
        else:
            lookup = self._lookup(dead)
            unknown = [d for d in keys if d not in lookup]
            found = np.fromiter((lookup.get(d, -1) for d in keys), np.int64, len(keys))
        if unknown and not skip_unknown:
            raise ValueError(f"{what}: ids not in the index: {_few(unknown)}")
        return np.unique(found[found >= 0])

    def forget(self, slots: np.ndarray) -> None:
        """Drop removed ``slots``' ids from the lookup (their slots stay until :meth:`keep`)."""
        if self._slot_of is not None:
            table = self.table
            for s in slots.tolist():
                del self._slot_of[table[s] if self.kind == "str" else int(table[s])]

    def keep(self, slots: np.ndarray) -> None:
        """Keep only ``slots`` (sorted), in that order (compaction)."""
        if self.kind == "str":
            self._names = [self._names[s] for s in slots.tolist()]
        else:
            self._ints.keep(torch.from_numpy(slots))
            if self.default and not np.array_equal(slots, np.arange(len(slots))):
                self.default = False
        self._slot_of = None

    def of_slots(self, slots: torch.Tensor) -> torch.Tensor | list[list[str | None]]:
        """The ids of (B, k) ``slots`` (``-1``: padding): int64 tensor with -1 on the same
        device, or a list of B lists of str with None."""
        if self.kind == "str":
            names = self._names
            return [[names[s] if s >= 0 else None for s in row] for row in slots.tolist()]
        if self.default:
            return slots
        table = self._ints.data
        cpu = slots.cpu()
        out = torch.where(cpu >= 0, table[cpu.clamp(min=0)], cpu)
        return out.to(slots.device)


class QueryState(NamedTuple):
    """The query side of a search: what :meth:`IMRNNIndex.search` scores documents with.

    All torch tensors on the index's device; B queries, K = feedback_k (at most ntotal).

    Attributes:
        projected_queries: (B, m) ``p(q)``.
        feedback_scores: (B, K) float32 first-stage scores, best first (meaningless where
            the id is ``-1``).
        feedback_ids: (B, K) int64 feedback set F(q), ties by lower id (``-1`` padding: IVF
            and HNSW can return fewer than K hits).
        feedback_weights: (B, K) weights of the feedback mean (zero on padding), or None for
            the uniform mean over a full feedback set.
        query_transform: (B, OUT) ``T_q``, which modulates every document.
        document_transform: (B, OUT) ``T_bar``, the feedback set's aggregated transform.
        modulated_queries: (B, m) ``q~``.
    """

    projected_queries: torch.Tensor
    feedback_scores: torch.Tensor
    feedback_ids: torch.Tensor
    feedback_weights: torch.Tensor | None
    query_transform: torch.Tensor
    document_transform: torch.Tensor
    modulated_queries: torch.Tensor


def _dtype_name(dtype: torch.dtype | str) -> str:
    if isinstance(dtype, str):
        if dtype not in STORAGE_DTYPES:
            raise ValueError(
                f"storage_dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}"
            )
        return dtype
    for name, value in STORAGE_DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"storage_dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype}")


def as_float_tensor(x: Any, name: str) -> tuple[torch.Tensor, bool]:
    """(``x`` as a float32 tensor on its own device, whether it was a numpy array).

    Raises:
        TypeError: ``x`` is neither a numpy array nor a torch tensor, or holds no floats.
    """
    if isinstance(x, np.ndarray):
        if not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"{name} must hold floats, got numpy dtype {x.dtype} {x.shape}")
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), True
    if isinstance(x, torch.Tensor):
        checks.check_float(name, x)
        return x.detach().float(), False
    raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")


def check_queries(queries: Any, ntotal: int, input_dim: int) -> tuple[torch.Tensor, bool]:
    """(float32 (B, n) tensor, was_numpy) for a search over ``ntotal`` documents, or raise."""
    if ntotal == 0:
        raise ValueError("the index is empty: add() documents before searching")
    q, was_numpy = as_float_tensor(queries, "queries")
    if q.dim() != 2 or q.shape[1] != input_dim:
        raise ValueError(
            f"queries must have shape (B, {input_dim}), got {tuple(q.shape)} ({q.dtype})"
        )
    checks.check_finite("queries", q)
    return q, was_numpy


def check_search_args(
    queries: Any,
    k: Any,
    mode: Any,
    feedback_k: Any,
    default_feedback_k: int,
    encoder: str | None,
    index_encoder: str | None,
    ntotal: int,
    input_dim: int,
) -> tuple[torch.Tensor, bool, int]:
    """Every check of a ``search`` call, in order; shared by the single and sharded index.

    Returns (queries as a float32 tensor, was_numpy, effective feedback_k <= ntotal).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    faiss_stage.check_k(k)
    kf_req = default_feedback_k if feedback_k is None else feedback_k
    if isinstance(kf_req, bool) or not isinstance(kf_req, int) or kf_req <= 0:
        raise ValueError(f"feedback_k must be a positive int, got {kf_req!r}")
    if encoder is not None and index_encoder is not None and encoder != index_encoder:
        raise ValueError(
            f"queries come from encoder {encoder!r} but this index was built with "
            f"{index_encoder!r}: scores across encoders are meaningless"
        )
    q, was_numpy = check_queries(queries, ntotal, input_dim)
    return q, was_numpy, min(kf_req, ntotal)


class IMRNNIndex:
    """A searchable corpus for one IMRNN adapter.

    Args:
        model: the adapter (its config decides modulation and aggregation).
        feedback_k: size of each query's feedback set F(q) (official default 100).
        first_stage: ``"flat"`` (exact inner product; needs no faiss), ``"ivf"`` or
            ``"hnsw"`` (faiss: the ``faiss`` or ``gpu`` extra; ImportError without it).
        storage_dtype: dtype of the projected corpus kept for the IMRNN stage (fp32/fp16/bf16).
        first_stage_space: ``"base"`` (cosine of base embeddings, the official v0.2
            evaluation), ``"projected"`` (``p(q) . p(d)``, the official v0.1 protocol: with it
            the official SciFact v0.1 checkpoint reproduces its published nDCG@10 0.250), or
            ``"auto"``: projected for ``transform_of_mean`` (v0.1) models, base otherwise.
        cache_document_transforms: precompute each document's HyperNet result at ``add`` time
            (it depends only on the document): ``(N, 2m)`` for diagonal, the ``(N, 64)``
            hidden states for affine. Costs that memory, saves the MLP per query.
        nlist, nprobe: IVF parameters (nlist default: about 4 sqrt(N), at most N, at first add).
        hnsw_m, ef_search: HNSW parameters.
        device: where the projected corpus and the model live (default: the model's device).
        encoder: a fingerprint naming the encoder the embeddings come from; ``search`` and
            ``load`` can check it so an index is never queried with another encoder.
        similarity: how the base-space first stage compares embeddings, as the encoder was
            trained: ``"cosine"`` (default; rows L2-normalised, ``q.d / (|q| |d|)``) or
            ``"dot"`` (raw inner product ``q.d``: TAS-B, Contriever, ...; nothing is
            normalised, so a long document vector can win). Only ``first_stage_space="base"``
            reads it: the projected space ``p(.)`` is unit-norm by construction. The IMRNN
            stage is always the paper's cosine of modulated embeddings, whatever this says.
            ``"euclidean"`` / ``"manhattan"`` raise ValueError (no inner-product form here;
            :func:`imrnns.evaluate.index_similarity` maps unit-norm euclidean to cosine).
    """

    def __init__(
        self,
        model: IMRNN,
        feedback_k: int = 100,
        first_stage: str = "flat",
        storage_dtype: torch.dtype | str = torch.float32,
        *,
        first_stage_space: str = "auto",
        cache_document_transforms: bool = True,
        nlist: int | None = None,
        nprobe: int = 16,
        hnsw_m: int = 32,
        ef_search: int = 128,
        device: str | torch.device | None = None,
        encoder: str | None = None,
        similarity: str = "cosine",
    ) -> None:
        if not isinstance(model, IMRNN):
            raise TypeError(f"model must be an IMRNN, got {type(model).__name__}")
        if isinstance(feedback_k, bool) or not isinstance(feedback_k, int) or feedback_k <= 0:
            raise ValueError(f"feedback_k must be a positive int, got {feedback_k!r}")
        if first_stage not in faiss_stage.FIRST_STAGES:
            raise ValueError(
                f"first_stage must be one of {faiss_stage.FIRST_STAGES}, got {first_stage!r}"
            )
        faiss_stage.require(first_stage)  # IVF/HNSW without faiss: ImportError naming the extra
        if first_stage_space not in faiss_stage.SPACES:
            raise ValueError(
                f"first_stage_space must be one of {faiss_stage.SPACES}, got {first_stage_space!r}"
            )
        faiss_stage.check_parameters(nlist, nprobe, hnsw_m, ef_search)
        if similarity not in INDEX_SIMILARITIES:
            raise ValueError(
                f"similarity must be one of {INDEX_SIMILARITIES}, got {similarity!r}: a "
                "first stage ranks by inner product, which euclidean or manhattan distance "
                "is not (for unit-norm vectors euclidean ranks as cosine: pass 'cosine')"
            )
        self.similarity = similarity
        self.model = model.eval()
        self.device = torch.device(device) if device is not None else model.device
        self.model.to(self.device)
        self.feedback_k = feedback_k
        self.first_stage = first_stage
        self.storage_dtype = STORAGE_DTYPES[_dtype_name(storage_dtype)]
        if first_stage_space == "auto":
            v01 = model.config.aggregation == "transform_of_mean"
            first_stage_space = "projected" if v01 else "base"
        self.first_stage_space = first_stage_space
        self.cache_document_transforms = cache_document_transforms
        self.nlist, self.nprobe = nlist, nprobe
        self.hnsw_m, self.ef_search = hnsw_m, ef_search
        self.encoder = encoder
        cfg = model.config
        # Rows ("slots") in add order with spare capacity (amortised adds); removed rows stay
        # (marked in _dead) until compaction.
        self._corpus_rows = RowBuffer((cfg.working_dim,), self.storage_dtype, self.device)
        self._cache_rows: RowBuffer | None = None
        # The first stage (first_stage.FlatStage or FaissStage), None until the first add.
        self._faiss: Any = None
        self._ids = DocumentIds()
        # (S,) bool CPU mask of removed slots (grown like the rows), None while none is.
        self._dead_rows: RowBuffer | None = None
        self._n_dead = 0

    # ------------------------------------------------------------------ properties
    @property
    def ntotal(self) -> int:
        """Number of documents in the index (removed ones not counted)."""
        return self._corpus_rows.rows - self._n_dead

    @property
    def _dead(self) -> torch.Tensor | None:
        """(S,) bool CPU view: True at removed slots; None while nothing is removed."""
        return None if self._dead_rows is None else self._dead_rows.data

    @property
    def _slots(self) -> int:
        """Stored rows, removed ones awaiting compaction included."""
        return self._corpus_rows.rows

    @property
    def _corpus(self) -> torch.Tensor:
        return self._corpus_rows.data

    @_corpus.setter
    def _corpus(self, value: torch.Tensor) -> None:
        self._corpus_rows.replace(value)

    @property
    def _doc_cache(self) -> torch.Tensor | None:
        return None if self._cache_rows is None else self._cache_rows.data

    @_doc_cache.setter
    def _doc_cache(self, value: torch.Tensor | None) -> None:
        if value is None:
            self._cache_rows = None
            return
        self._cache_rows = RowBuffer(tuple(value.shape[1:]), value.dtype, value.device)
        self._cache_rows.replace(value)

    @property
    def id_kind(self) -> str | None:
        """``"int"`` or ``"str"``: the kind of id this index holds (None before any add)."""
        return self._ids.kind

    @property
    def ids(self) -> np.ndarray | list[str]:
        """The ids of the documents in the index, in add order (removed ones left out):
        an int64 array, or a list of str. A boolean ``allow`` mask is aligned with it."""
        table = self._ids.table
        if self._dead is None:
            return table.copy() if isinstance(table, np.ndarray) else list(table)
        alive = np.flatnonzero(~self._dead.numpy())
        if isinstance(table, np.ndarray):
            return table[alive]
        return [table[s] for s in alive.tolist()]

    @property
    def removed_rows(self) -> np.ndarray:
        """Sorted int64 rows of :attr:`projected_corpus` that hold removed documents (their
        tombstones, until compaction); empty when none."""
        if self._dead is None:
            return np.zeros(0, dtype=np.int64)
        return np.flatnonzero(self._dead.numpy()).astype(np.int64)

    @property
    def next_id(self) -> int | None:
        """The id the next ``add`` without ids gives (None for an index of string ids).

        One above the largest int id the index ever held, removed ones included, so an id
        is never handed out twice; :meth:`save` keeps it (the manifest's ``"next_id"``).
        """
        return None if self._ids.kind == "str" else self._ids.next_default

    def _set_next_id(self, next_id: int, error: type[ValueError], where: str) -> None:
        """Raise the next default id to ``next_id`` (saved or given), checked: an int no
        lower than one above the largest id held (so no id can come back)."""
        if self._ids.kind == "str":
            raise error(f"{where}: next_id applies to int ids; this index holds string ids")
        low = self._ids.next_default
        if (
            isinstance(next_id, bool)
            or not isinstance(next_id, int | np.integer)
            or not low <= int(next_id) <= MAX_ID + 1
        ):
            raise error(
                f"{where}: next_id must be an int in [{low}, 2**63] (one above the largest "
                f"id held, at least), got {next_id!r}"
            )
        self._ids.next_default = int(next_id)

    @property
    def doc_ids(self) -> list[str] | None:
        """The string id of each row of :attr:`projected_corpus` (None for int ids).

        Kept for callers of the ``doc_ids=`` spelling; rows of removed documents stay until
        compaction, so prefer :attr:`ids`.
        """
        return self._ids.table if self._ids.kind == "str" else None

    def __len__(self) -> int:
        return self.ntotal

    def __repr__(self) -> str:
        return (
            f"IMRNNIndex(ntotal={self.ntotal}, feedback_k={self.feedback_k}, "
            f"first_stage={self.first_stage!r}, space={self.first_stage_space!r}, "
            f"storage={_dtype_name(self.storage_dtype)}, modulation={self.model.config.modulation!r})"
        )

    @property
    def projected_corpus(self) -> torch.Tensor:
        """(S, m) projected documents in the storage dtype, one row per stored slot (add
        order; rows of removed documents stay until compaction). :attr:`QueryState`'s
        ``feedback_ids`` are rows of it."""
        return self._corpus

    @property
    def document_cache(self) -> torch.Tensor | None:
        """(S, width) per-document HyperNet results kept at ``add`` time, or None; rows as
        :attr:`projected_corpus`."""
        return self._doc_cache

    @property
    def _uses_cache(self) -> bool:
        return (
            self.cache_document_transforms and self.model.config.aggregation == "mean_of_transforms"
        )

    @property
    def first_stage_dim(self) -> int:
        """d: the width of the first stage's vectors (n in the base space, m when projected)."""
        cfg = self.model.config
        return cfg.input_dim if self.first_stage_space == "base" else cfg.working_dim

    @property
    def document_cache_width(self) -> int | None:
        """The per-document cache's width (OUT diagonal, h2 affine), or None: none is kept."""
        if not self._uses_cache:
            return None
        cfg = self.model.config
        return cfg.transform_dim if cfg.modulation == "diagonal" else cfg.hidden_dims[1]

    def settings(self) -> dict[str, Any]:
        """The constructor's keyword arguments that rebuild this index (as saved)."""
        return {
            "feedback_k": self.feedback_k,
            "first_stage": self.first_stage,
            "storage_dtype": _dtype_name(self.storage_dtype),
            "first_stage_space": self.first_stage_space,
            "cache_document_transforms": self.cache_document_transforms,
            "nlist": self.nlist,
            "nprobe": self.nprobe,
            "hnsw_m": self.hnsw_m,
            "ef_search": self.ef_search,
            "encoder": self.encoder,
            "similarity": self.similarity,
        }

    # ------------------------------------------------------------------ building
    def _new_first_stage(self, train: np.ndarray) -> Any:
        """An empty first stage of this index's kind (IVF trained on ``train``), on its device."""
        if self.first_stage == "ivf":
            self.check_first_add(len(train))
            self.nlist = self.nlist or faiss_stage.auto_nlist(len(train))
        index = faiss_stage.build(
            self.first_stage,
            train,
            nlist=self.nlist,
            nprobe=self.nprobe,
            hnsw_m=self.hnsw_m,
            ef_search=self.ef_search,
        )
        return faiss_stage.to_gpu(index, self.device)

    def check_first_add(self, rows: int) -> None:
        """Raise ValueError if a first ``add`` of ``rows`` documents cannot build the first stage.

        An explicit IVF ``nlist`` needs at least that many documents to train on; the default
        (about 4 sqrt(N), at most N) always fits. Changes nothing, so a caller that adds in
        several places (each rank of a sharded index) can check them all first.
        """
        if self._faiss is None and self.first_stage == "ivf" and self.nlist and rows < self.nlist:
            raise ValueError(
                f"an IVF first stage with nlist={self.nlist} needs at least {self.nlist} "
                f"documents in the first add(), got {rows}"
            )

    @torch.no_grad()
    def add(
        self,
        embeddings: np.ndarray | torch.Tensor,
        doc_ids: Sequence[str] | None = None,
        *,
        ids: Any = None,
    ) -> np.ndarray | torch.Tensor | list[str]:
        """Add (N, n) base-encoder document embeddings; return their ids.

        Every document has an id, which :meth:`search` returns and :meth:`remove` and
        ``allow=`` take. One index holds one kind:

        - int ids (default): without ``ids``, 0, 1, 2, ... in add order (one above the
          largest int id the index ever held), so while nothing is removed they equal row
          positions; or ``ids=``: N unique ints in ``[0, 2**63 - 1]`` (-1 pads results) as
          a sequence, numpy array or tensor. Returned as an int64 array (numpy embeddings)
          or tensor (torch embeddings).
        - str ids: ``ids=`` N unique strings, or the older spelling ``doc_ids=`` (the same;
          kept in :attr:`doc_ids` too). Returned as a list of str. Every later add must
          give string ids.

        Cost: O(N) amortised (the stored rows grow by doubling, no copy of the corpus per
        add). Ids must be new (not held by a live document; a removed id may come back) and
        unique within the call. Any error (ValueError/TypeError naming the ids, shapes or
        kinds) is raised before anything changes.
        """
        x, was_numpy = as_float_tensor(embeddings, "embeddings")
        cfg = self.model.config
        rows = int(x.shape[0]) if x.dim() > 0 else 0
        if doc_ids is not None and ids is not None:
            raise ValueError("give ids= or doc_ids= (the string-id spelling), not both")
        name = "doc_ids" if doc_ids is not None else "ids"
        if doc_ids is not None:
            if (
                isinstance(doc_ids, str)
                or len(doc_ids) != rows
                or not all(isinstance(d, str) for d in doc_ids)
            ):
                raise ValueError(f"doc_ids must be {rows} strings, one per embedding row")
            kind, new_ids = "str", list(doc_ids)
        elif ids is not None:
            kind, new_ids = parse_ids(ids, rows)
        else:
            kind = "int"
            new_ids = np.arange(
                self._ids.next_default, self._ids.next_default + rows, dtype=np.int64
            )
        held = self._ids.kind if self._slots > 0 else None
        if held is not None and held != kind:
            how = "string ids (ids= or doc_ids=)" if held == "str" else "int ids"
            raise ValueError(
                f"doc_ids must be given on every add() or on none: this index holds {how}, "
                f"this add() gives {kind} ids (one kind of id per index)"
            )
        if held is not None and kind == "int" and ids is None and doc_ids is None:
            if self._ids.next_default + rows - 1 > MAX_ID:
                raise ValueError("no default int ids left: pass ids= explicitly")
        self._ids.check_new(kind, new_ids, name, self._dead)
        if x.dim() != 2 or x.shape[1] != cfg.input_dim:
            raise ValueError(
                f"embeddings must have shape (N, {cfg.input_dim}), got {tuple(x.shape)} ({x.dtype})"
            )
        if x.shape[0] == 0:
            raise ValueError("embeddings is empty: nothing to add")
        checks.check_finite("embeddings", x)
        self.check_first_add(x.shape[0])
        projected, space = [], []
        for lo in range(0, x.shape[0], ADD_CHUNK):
            chunk = x[lo : lo + ADD_CHUNK].to(self.device)
            p = self.model.project(chunk)
            projected.append(p.to(self.storage_dtype))
            if self.first_stage_space == "base":
                space.append(self._base_space(chunk).cpu())
            else:
                space.append(p.float().cpu())
        new_rows = torch.cat(projected)
        fs = np.ascontiguousarray(torch.cat(space).numpy(), dtype=np.float32)
        if self._faiss is None:
            self._faiss = self._new_first_stage(fs)
        self._faiss.add(fs)
        if self._uses_cache:
            cache = imrnns_kernels.document_transforms(
                new_rows, self.model.doc_hypernet.weights(), cfg.modulation
            )
            if self._cache_rows is None:
                self._cache_rows = RowBuffer(tuple(cache.shape[1:]), cache.dtype, cache.device)
            self._cache_rows.append(cache)
        self._corpus_rows.append(new_rows)
        self._ids.append(kind, new_ids)
        if self._dead_rows is not None:
            self._dead_rows.append(torch.zeros(rows, dtype=torch.bool))
        if kind == "str":
            return list(new_ids)
        out = torch.from_numpy(np.asarray(new_ids, dtype=np.int64).copy())
        return out.numpy() if was_numpy else out

    # ------------------------------------------------------------------ removing
    @torch.no_grad()
    def remove(self, ids: Any) -> int:
        """Remove the documents with these ids (a collection of the index's kind of id).

        Searches, :attr:`ntotal` and :attr:`ids` stop seeing them at once. Their rows are
        marked removed (tombstones) and skipped by every search (a flat first stage and the
        exhaustive scan gather the live rows; IVF/HNSW filter with an ID selector); once
        removed rows reach ``COMPACT_FRACTION`` of the stored rows the index compacts
        (:meth:`compact`), so a removal costs O(1) row moves amortised. A removed id may be
        added again. Repeated ids in one call count once.

        Returns:
            The number of documents removed.

        Raises:
            ValueError: an id is not in the index (never added, or already removed); the
                message names up to five, and nothing is removed.
            TypeError: ``ids`` is not a collection, or holds another kind of id.
        """
        if self._slots == 0:
            raise ValueError("remove(): the index is empty")
        slots = self._ids.slots(ids, self._dead, "remove()")
        if slots.size == 0:
            return 0
        self._ids.forget(slots)
        if self._dead_rows is None:
            self._dead_rows = RowBuffer((), torch.bool, torch.device("cpu"))
            self._dead_rows.append(torch.zeros(self._slots, dtype=torch.bool))
        self._dead_rows.data[torch.from_numpy(slots)] = True
        self._n_dead += int(slots.size)
        if self._n_dead >= COMPACT_FRACTION * self._slots:
            self.compact()
        return int(slots.size)

    @torch.no_grad()
    def compact(self) -> None:
        """Drop the rows of removed documents now (ids and search results do not change).

        Moves every live row once (corpus, document cache, first-stage vectors; an IVF/HNSW
        first stage is rebuilt from its live vectors: faiss's HNSW cannot delete).
        """
        if self._dead is None:
            return
        keep = np.flatnonzero(~self._dead.numpy())
        slots = torch.from_numpy(keep)
        self._corpus_rows.keep(slots)
        if self._cache_rows is not None:
            self._cache_rows.keep(slots)
        if self._faiss is not None:
            self._faiss.keep(slots)
        self._ids.keep(keep)
        self._dead_rows, self._n_dead = None, 0

    def rows_of(self, ids: Any, *, skip_unknown: bool = False) -> np.ndarray:
        """Sorted unique rows (of :attr:`projected_corpus`) of the live documents ``ids``.

        ``ids``: a collection of this index's kind of id. An id not in the index (never
        added, or removed) raises ValueError naming it, or is left out with
        ``skip_unknown`` (a shard asking which of a global set it holds).
        """
        if self._ids.kind is None:
            if skip_unknown:
                return np.zeros(0, dtype=np.int64)
            raise ValueError("the index is empty: it holds no ids")
        return self._ids.slots(ids, self._dead, "ids", skip_unknown)

    def ids_at(self, rows: Any) -> np.ndarray | list[str]:
        """The ids of ``rows`` of :attr:`projected_corpus` (removed ones included): an int64
        array, or a list of str."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self._slots):
            raise ValueError(f"rows must be in [0, {self._slots}), got {rows.min()}..{rows.max()}")
        table = self._ids.table
        if isinstance(table, np.ndarray):
            return table[rows]
        return [table[r] for r in rows.tolist()]

    @property
    def _skips_dead(self) -> bool:
        """Whether searches without ``allow`` drop removed rows from deeper results (few
        removed rows, flat first stage) instead of restricting to the live rows."""
        return 0 < self._n_dead <= DEAD_SKIP_MAX and self.first_stage == "flat"

    def _live_first_stage(
        self, q: torch.Tensor, pq: torch.Tensor, k: int, candidates: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`first_stage_topk` over live rows (``candidates`` from :meth:`_candidates`)."""
        if candidates is None and self._skips_dead:
            deep = min(k + self._n_dead, self._slots)
            return self._drop_dead(*self.first_stage_topk(q, pq, deep), k)
        return self.first_stage_topk(q, pq, k, candidates)

    def _drop_dead(
        self, scores: torch.Tensor, rows: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The best k of (B, k + removed) results ordered by (score desc, row asc), with
        removed rows taken out (the order of the others kept), padded with -inf / -1."""
        dead = self._dead.to(rows.device)[rows.clamp(min=0)] & (rows >= 0)
        scores = torch.where(dead, torch.full_like(scores, float("-inf")), scores)
        return topk_by_score_then_id(scores, torch.where(dead, -1, rows), k)

    def _candidates(self, allow: Any) -> torch.Tensor | None:
        """Sorted int64 slots a search may return (CPU), or None: every stored row.

        ``allow`` is None, a collection of ids, or a boolean mask over :attr:`ids`.
        """
        if allow is None:
            if self._dead is None or self._skips_dead:
                return None
            return torch.from_numpy(np.flatnonzero(~self._dead.numpy()))
        if isinstance(allow, np.ndarray | torch.Tensor) and allow.dtype in (np.bool_, torch.bool):
            mask = allow.detach().cpu().numpy() if isinstance(allow, torch.Tensor) else allow
            if mask.shape != (self.ntotal,):
                raise ValueError(
                    f"allow as a boolean mask must have shape ({self.ntotal},) (one entry per "
                    f"document, in the order of .ids), got {mask.shape}"
                )
            live = (
                np.arange(self._slots)
                if self._dead is None
                else np.flatnonzero(~self._dead.numpy())
            )
            return torch.from_numpy(live[mask])
        return torch.from_numpy(self._ids.slots(allow, self._dead, "allow"))

    @classmethod
    def from_parts(
        cls,
        model: IMRNN,
        projected: torch.Tensor,
        first_stage_vectors: np.ndarray,
        *,
        document_cache: torch.Tensor | None = None,
        doc_ids: list[str] | None = None,
        ids: Any = None,
        next_id: int | None = None,
        **settings: Any,
    ) -> IMRNNIndex:
        """An index from stored pieces instead of base embeddings (shards, loads, merges).

        Args:
            model: the adapter the pieces were computed with.
            projected: (N, m) projected documents (converted to the storage dtype).
            first_stage_vectors: (N, d) float32 vectors of the first stage, as
                :meth:`first_stage_vectors` returns them (a new faiss index is built).
            document_cache: (N, width) per-document cache, as :attr:`document_cache`.
            doc_ids: N names, or None (the string-id spelling of ``ids``).
            ids: N ids as :meth:`add` takes them (default: 0 .. N - 1).
            next_id: the id the next default ``add`` gives (:attr:`next_id`; default one
                above the largest int id). Int ids only; at least that default.
            **settings: the constructor's arguments (as :meth:`settings` returns them).

        N may be 0: an empty index (a shard that holds nothing).

        Raises:
            TypeError: a piece is not a float tensor / array.
            ValueError: shapes disagree (N, m, d = the first stage's space, the cache's
                width), or a row of any piece holds NaN/Inf (named by row).
        """
        index = cls(model, **settings)
        cfg = model.config
        if not isinstance(projected, torch.Tensor) or not projected.is_floating_point():
            raise TypeError(f"projected must be a float tensor, got {_describe(projected)}")
        n = int(projected.shape[0]) if projected.dim() > 0 else -1
        if projected.dim() != 2 or projected.shape[1] != cfg.working_dim:
            raise ValueError(
                f"projected must be (N, {cfg.working_dim}), got {tuple(projected.shape)}"
            )
        vectors, _ = as_float_tensor(first_stage_vectors, "first_stage_vectors")
        vectors = np.ascontiguousarray(vectors.cpu().numpy(), dtype=np.float32)
        d = index.first_stage_dim
        if vectors.ndim != 2 or vectors.shape[0] != n or (n > 0 and vectors.shape[1] != d):
            raise ValueError(
                f"first_stage_vectors must be ({n}, {d}) (first_stage_space="
                f"{index.first_stage_space!r}), got {vectors.shape}"
            )
        if document_cache is not None:
            if not isinstance(document_cache, torch.Tensor) or not (
                document_cache.is_floating_point()
            ):
                raise TypeError(
                    f"document_cache must be a float tensor, got {_describe(document_cache)}"
                )
            width = index.document_cache_width
            if (
                document_cache.dim() != 2
                or document_cache.shape[0] != n
                or (width is not None and document_cache.shape[1] != width)
            ):
                raise ValueError(
                    f"document_cache must be ({n}, {width}), got {tuple(document_cache.shape)}"
                )
        if doc_ids is not None and len(doc_ids) != n:
            raise ValueError(f"doc_ids has {len(doc_ids)} names for {n} documents")
        if doc_ids is not None and ids is not None:
            raise ValueError("give ids= or doc_ids= (the string-id spelling), not both")
        kind, new_ids = "int", np.arange(n, dtype=np.int64)
        if doc_ids is not None:
            kind, new_ids = parse_ids(doc_ids, n, "doc_ids")
        elif ids is not None:
            kind, new_ids = parse_ids(ids, n)
        index._ids.check_new(kind, new_ids, "ids" if doc_ids is None else "doc_ids", None)
        storage.check_rows_finite("projected", projected)
        storage.check_rows_finite("first_stage_vectors", torch.from_numpy(vectors))
        if document_cache is not None:
            storage.check_rows_finite("document_cache", document_cache)
        index._corpus = projected.to(index.device, index.storage_dtype).contiguous()
        index._doc_cache = (
            None if document_cache is None else document_cache.to(index.device).contiguous()
        )
        if n > 0:
            index._faiss = index._new_first_stage(vectors)
            index._faiss.add(vectors)
            index._ids.append(kind, new_ids)
        if next_id is not None:
            if kind == "str":
                raise ValueError("next_id applies to int ids; these documents have names")
            index._ids.kind = "int"
            index._set_next_id(next_id, ValueError, "from_parts()")
        return index

    def first_stage_vectors(self, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """(hi - lo, d) float32 vectors the first stage holds for documents ``lo .. hi - 1``."""
        hi = self._slots if hi is None else hi
        if not 0 <= lo <= hi <= self._slots:
            raise ValueError(f"rows must satisfy 0 <= lo <= hi <= {self._slots}, got {lo}, {hi}")
        return faiss_stage.reconstruct(self._faiss, lo, hi)

    # ------------------------------------------------------------------ searching
    def _base_space(self, x: torch.Tensor) -> torch.Tensor:
        """(R, n) base embeddings as the first stage compares them: unit rows for
        ``similarity="cosine"``, unchanged for ``"dot"``."""
        return torch.nn.functional.normalize(x, dim=1) if self.similarity == "cosine" else x

    def first_stage_topk(
        self,
        queries: torch.Tensor,
        projected: torch.Tensor,
        k: int,
        candidates: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first stage's top-k rows for queries already checked (no validation here).

        Args:
            queries: (B, n) float32 base-encoder queries (as :func:`check_queries` returns).
            projected: (B, m) their projections ``p(q)`` (read only when
                ``first_stage_space="projected"``).
            k: results per query, ``1 <= k <= first_stage.MAX_K`` (past ``ntotal``: padded;
                the work follows ``min(k, ntotal)``).
            candidates: sorted int64 rows the search may return (at least one), or None:
                every stored row (the caller excludes removed rows: :meth:`_candidates`).

        Returns:
            (scores (B, k) float32, rows (B, k) int64) on the index's device, best first,
            ties by the lower row, ``-inf`` / ``-1`` padding past ``ntotal`` or where IVF/HNSW
            find fewer than k. Rows index :attr:`projected_corpus` (they equal the ids
            while the ids are the defaults and nothing is removed).
        """
        if self.first_stage_space == "base":
            space = self._base_space(queries)
        else:
            space = projected.float()
        scores, ids = self._faiss.search(space, k, candidates)
        return scores.to(self.device), ids.to(self.device)

    @torch.no_grad()
    def first_stage_search(
        self, queries: np.ndarray | torch.Tensor, k: int, *, allow: Any = None
    ) -> tuple[Any, Any]:
        """The first stage alone (the base retriever when ``first_stage_space="base"``).

        Returns (scores (B, k), ids (B, k)) with ids as :meth:`search` returns them
        (``-inf`` / ``-1`` or None padded), same container type as ``queries``; ``allow``
        as in :meth:`search`. ``k`` up to ``first_stage.MAX_K`` (ValueError above); only
        ``min(k, ntotal)`` results are computed.
        """
        faiss_stage.check_k(k)
        q, was_numpy = check_queries(queries, self.ntotal, self.model.config.input_dim)
        candidates = self._candidates(allow)
        q = q.to(self.device)
        if candidates is not None and candidates.numel() == 0:
            scores, rows = faiss_stage.pad(
                torch.empty(q.shape[0], 0, device=self.device),
                torch.empty(q.shape[0], 0, dtype=torch.int64, device=self.device),
                k,
            )
        else:
            pq = self.model.project(q) if self.first_stage_space == "projected" else q
            scores, rows = self._live_first_stage(q, pq, k, candidates)
        return self._results(scores, rows, was_numpy)

    def _results(
        self, scores: torch.Tensor, rows: torch.Tensor, was_numpy: bool
    ) -> tuple[Any, Any]:
        """(scores, ids) of (B, k) scores and rows: rows mapped to ids, numpy if asked."""
        ids = self._ids.of_slots(rows)
        if was_numpy:
            scores = scores.cpu().numpy()
            if isinstance(ids, torch.Tensor):
                ids = ids.cpu().numpy()
            else:
                table = np.empty(tuple(rows.shape), dtype=object)
                for r, row in enumerate(ids):
                    table[r, :] = row
                ids = table
        return scores, ids

    @torch.no_grad()
    def query_state(
        self,
        queries: np.ndarray | torch.Tensor,
        *,
        feedback_k: int | None = None,
        encoder: str | None = None,
        allow: Any = None,
    ) -> QueryState:
        """The query side of :meth:`search` for (B, n) base-encoder query embeddings.

        The same first stage, feedback weights, ``T_q``, ``T_bar`` and ``q~`` that ``search``
        scores with (computed by the same code, in the same blocks of ``SEARCH_CHUNK``
        queries, so bit-identical), for explanations and inspection. Always torch tensors;
        ``feedback_ids`` are rows of :attr:`projected_corpus` (not ids: see
        :attr:`QueryState`).

        Args:
            queries: (B, n) numpy array or torch tensor.
            feedback_k: override the index's feedback set size (capped at ``ntotal``).
            encoder: when given and the index records its encoder, they must match.
            allow: as in :meth:`search` (ValueError when it allows no document).
        """
        q, _, kf = self._checked(queries, 1, "rerank", feedback_k, encoder)
        candidates = self._candidates(allow)
        if candidates is not None:
            if candidates.numel() == 0:
                raise ValueError("allow selects no document: there is no feedback set")
            kf = min(kf, int(candidates.numel()))
        parts = [
            self._query_state_chunk(q[lo : lo + SEARCH_CHUNK], kf, candidates)
            for lo in range(0, max(q.shape[0], 1), SEARCH_CHUNK)  # B = 0: one empty block
        ]
        if len(parts) == 1:
            return parts[0]
        weights = None
        if any(p.feedback_weights is not None for p in parts):
            # None is the uniform mean: as explicit weights, ones (blocks may differ).
            weights = torch.cat(
                [
                    torch.ones_like(p.feedback_scores)
                    if p.feedback_weights is None
                    else p.feedback_weights
                    for p in parts
                ]
            )
        cat = {
            name: torch.cat([getattr(p, name) for p in parts])
            for name in QueryState._fields
            if name != "feedback_weights"
        }
        return QueryState(feedback_weights=weights, **cat)

    def _checked(
        self, queries: Any, k: Any, mode: Any, feedback_k: Any, encoder: str | None
    ) -> tuple[torch.Tensor, bool, int]:
        """:func:`check_search_args` against this index: (queries, was numpy, feedback_k)."""
        return check_search_args(
            queries,
            k,
            mode,
            feedback_k,
            self.feedback_k,
            encoder,
            self.encoder,
            self.ntotal,
            self.model.config.input_dim,
        )

    def _query_state_chunk(
        self, q: torch.Tensor, kf: int, candidates: torch.Tensor | None = None
    ) -> QueryState:
        """:meth:`query_state` of one block of queries (the first half of a search)."""
        q = q.to(self.device)
        model = self.model
        pq = model.project(q)
        fs_scores, fs_ids = self._live_first_stage(q, pq, kf, candidates)
        _, safe_ids, weights = feedback_set(model, fs_scores, fs_ids)
        tq, td, q_tilde = model.query_state(pq, self._corpus, safe_ids, weights, self._doc_cache)
        return QueryState(pq, fs_scores, fs_ids, weights, tq, td, q_tilde)

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
    ) -> tuple[Any, Any]:
        """Top-k documents for (B, n) base-encoder query embeddings.

        Results are ordered by score, ties broken by the earlier-added document (for default
        ids: the lower id). Where fewer than k documents qualify (a small index or filter,
        rerank mode past ``feedback_k``, an approximate first stage finding fewer) the tail
        is padding: score ``-inf`` and id ``-1`` (int ids) or ``None`` (string ids).

        Args:
            queries: (B, n) numpy array or torch tensor.
            k: results per query. In rerank mode at most ``feedback_k`` are real; the rest
                are padding (score ``-inf``, id ``-1``), as with k > N in exhaustive mode.
            mode: ``"rerank"`` (score the feedback set) or ``"exhaustive"`` (score all).
            feedback_k: override the index's feedback set size for this call.
            encoder: when given and the index records its encoder, they must match.
            workspace_bytes: bound, in bytes, on the extra memory of the exhaustive scan
                (``imrnns_kernels.modulated_topk``: chunk buffers of all worker threads,
                top-k states, query-side tensors). The query state of each block of up to
                ``SEARCH_CHUNK`` queries (first-stage results, feedback rows: O(B x
                feedback_k x m)) comes on top. Ignored in rerank mode. None: the default.
            allow: search only these documents: a collection of ids (set, list, array of
                the index's kind; an unknown or removed id raises ValueError naming it) or a
                boolean mask of shape (:attr:`ntotal`,) aligned with :attr:`ids` (add
                order). With a flat first stage the result equals that of an index built
                from the allowed documents alone, added in the same order, in both modes:
                the feedback set is drawn from allowed documents only, and exhaustive mode
                scans only them. An IVF/HNSW first stage filters within the lists or graph
                nodes it visits (faiss ID selector), so its feedback set holds only allowed
                documents but can differ from a rebuilt index's (approximate either way).
                An empty selection gives padding only. Costs one gather of the allowed
                rows per call (first-stage vectors; projected rows in exhaustive mode).

        Returns:
            (scores (B, k) float32, ids (B, k)), scores of the container type of
            ``queries``. Int ids: an int64 array (numpy queries) or tensor (torch queries),
            ``-1`` padding. String ids: a (B, k) numpy object array of str (numpy queries)
            or a list of B lists of str (torch queries), ``None`` padding.
        """
        check_workspace_bytes(workspace_bytes)
        q, was_numpy, kf = self._checked(queries, k, mode, feedback_k, encoder)
        candidates = self._candidates(allow)
        scanned = None  # exhaustive mode: the whole stored corpus (removed rows dropped)
        if candidates is not None:
            kf = min(kf, int(candidates.numel()))
            few_dead = allow is None and self._n_dead <= DEAD_SKIP_MAX
            if mode == "exhaustive" and candidates.numel() and not few_dead:
                scanned = self._corpus.index_select(0, candidates.to(self._corpus.device))
        if candidates is not None and candidates.numel() == 0:
            outs = [
                faiss_stage.pad(
                    torch.empty(q.shape[0], 0, device=self.device),
                    torch.empty(q.shape[0], 0, dtype=torch.int64, device=self.device),
                    k,
                )
            ]
        else:
            outs = [
                self._search_chunk(
                    q[lo : lo + SEARCH_CHUNK], k, mode, kf, workspace_bytes, candidates, scanned
                )
                for lo in range(0, q.shape[0], SEARCH_CHUNK)
            ]
        scores = torch.cat([o[0] for o in outs]) if outs else torch.empty(0, k)
        rows = torch.cat([o[1] for o in outs]) if outs else torch.empty(0, k, dtype=torch.int64)
        return self._results(scores, rows, was_numpy)

    def _search_chunk(
        self,
        q: torch.Tensor,
        k: int,
        mode: str,
        kf: int,
        workspace_bytes: int | None = None,
        candidates: torch.Tensor | None = None,
        scanned: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, rows) of one block; ``scanned``: the rows exhaustive mode scans (the
        ``candidates`` rows gathered, in order), or None: the whole stored corpus, searched
        k + (removed rows) deep and the removed rows dropped."""
        model = self.model
        state = self._query_state_chunk(q, kf, candidates)
        fs_ids, tq, q_tilde = state.feedback_ids, state.query_transform, state.modulated_queries
        valid = fs_ids >= 0
        safe_ids = torch.where(valid, fs_ids, torch.zeros_like(fs_ids))
        if mode == "exhaustive":
            whole = scanned is None
            scanned = self._corpus if whole else scanned
            depth = min(k + self._n_dead if whole else k, int(scanned.shape[0]))
            # The scan's running top-k is (B, depth): past ntotal only the padding grows with k.
            scores, ids = imrnns_kernels.modulated_topk(
                scanned,
                tq,
                model.doc_norm.weight,
                model.doc_norm.bias,
                q_tilde,
                depth,
                model.config.modulation,
                model.config.layer_norm_eps,
                workspace_bytes=workspace_bytes,
            )
            if whole:
                if self._n_dead:
                    return self._drop_dead(scores, ids, k)
                return faiss_stage.pad(scores, ids, k)
            ids = torch.where(ids >= 0, candidates.to(ids.device)[ids.clamp(min=0)], ids)
            return faiss_stage.pad(scores, ids, k)
        scores = model.score_ids(self._corpus, safe_ids, tq, q_tilde)
        scores = torch.where(valid, scores, torch.full_like(scores, float("-inf")))
        return topk_by_score_then_id(scores, torch.where(valid, fs_ids, -1), k)

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> Path:
        """Write the index to ``directory`` atomically (temporary directory, then rename).

        Layout (:mod:`imrnns.index.storage`): ``manifest.json`` (config, sizes, SHA-256 of
        every file), ``adapter/`` (the model, as :meth:`IMRNN.save_pretrained`),
        ``corpus.safetensors`` (projected corpus, per-document cache), ``first_stage.faiss``.
        A failure at any point leaves the previous content of ``directory`` intact.
        ``directory`` must be new, empty, or an earlier index save (it is replaced as a
        whole), recognised by content: its ``manifest.json`` is ours and it holds only the
        files an index save writes. Anything else (a web folder with its own
        ``manifest.json``, a directory of other files) raises ValueError naming the files
        that would be lost, and nothing on disk changes. Concurrent saves to the same
        directory each succeed in turn; a concurrent :meth:`load` reads one whole version.

        The manifest's SHA-256 sums detect corruption (truncated files, flipped bytes, a file
        of another save), not tampering: whoever can rewrite the files can rewrite the
        manifest. :meth:`load` also checks what each file claims (see there).
        """
        directory = Path(directory)
        if self._faiss is None or self.ntotal == 0:
            raise ValueError("the index is empty: nothing to save")
        if self._n_dead and self._dead_ids_reused():
            # A removed id added again holds two stored rows (one a tombstone); saved ids
            # must be unique, so drop the tombstones now (results do not change).
            self.compact()
        int_ids = None
        if self._ids.kind == "int" and not self._ids.default:
            int_ids = torch.from_numpy(np.asarray(self._ids.table))
        removed = None
        if self._dead is not None and self._n_dead:
            removed = torch.from_numpy(np.flatnonzero(self._dead.numpy()))
        storage.write_index(
            directory,
            self.model,
            self._corpus,
            self._doc_cache,
            self._faiss,
            self.doc_ids,
            self.settings(),
            int_ids=int_ids,
            removed=removed,
            next_id=self._next_id_to_save(),
        )
        return directory

    def _dead_ids_reused(self) -> bool:
        """Whether a removed document's id is held again by a live one."""
        if self._ids.default:  # ids equal rows: all distinct
            return False
        dead = np.flatnonzero(self._dead.numpy())
        lookup = self._ids._lookup(self._dead)
        return any(d in lookup for d in self._keys(self.ids_at(dead)))

    @staticmethod
    def _keys(ids: np.ndarray | list[str]) -> list[Any]:
        return ids.tolist() if isinstance(ids, np.ndarray) else ids

    def _next_id_to_save(self) -> int | None:
        """The next default id when a load could not infer it (largest stored id + 1),
        else None: the save stays version 1 when nothing else needs version 2."""
        if self._ids.kind != "int":
            return None
        table = self._ids.table
        inferred = int(table.max()) + 1 if len(table) else 0
        return None if self._ids.next_default == inferred else self._ids.next_default

    @classmethod
    def load(
        cls,
        directory: str | Path,
        *,
        device: str | torch.device | None = None,
        verify: bool = True,
        rows: tuple[int, int] | None = None,
    ) -> IMRNNIndex:
        """Load an index written by :meth:`save` (or ``DistributedIMRNNIndex.save``).

        Args:
            directory: the index directory.
            device: where to place the corpus and model (default CPU).
            verify: check every file's size and SHA-256 against the manifest (recommended;
                costs one read of the files).
            rows: ``(lo, hi)``: load only documents ``lo .. hi - 1`` (a shard): the projected
                corpus and the cache are read by slice, a flat first stage through a memory
                map, so the other rows are never held. Default ids become positions in
                the slice (0 .. hi - lo - 1); saved int or string ids, and removals, are
                kept (``lo, hi`` count stored rows, removed ones included). IVF/HNSW first
                stages are read whole once and
                rebuilt over the slice (approximate: not equal to the saved one).

        What is checked (:mod:`imrnns.index.storage`), before the data is used: the manifest
        lists only the index's own file names (nothing outside ``directory`` is opened); each
        file has the listed size and, with ``verify``, SHA-256; the corpus holds the promised
        tensors, shapes and dtype and only finite rows (a NaN/Inf row is named); the faiss
        file is the promised type, dimension, inner-product metric and size (from its
        header, before faiss reads it). The SHA-256 sums detect corruption, not tampering:
        these content checks bound what a rewritten index can do, they do not make an index
        from an untrusted source trustworthy. A save swapping a new version in while this
        reads makes the read start again (:func:`imrnns._atomic.read_directory`): the
        result is one whole version, never a mix.

        Raises:
            FileNotFoundError: the directory or a file it lists is missing.
            ValueError: (``IndexError_``) a file is truncated, modified or not what the
                manifest promises, or the pieces disagree; the message names the file.
        """

        def read(found: Path) -> IMRNNIndex:
            return cls._load_found(found, device, verify, rows)

        return read_directory(directory, read)

    @classmethod
    def _load_found(
        cls,
        directory: Path,
        device: str | torch.device | None,
        verify: bool,
        rows: tuple[int, int] | None,
    ) -> IMRNNIndex:
        """:meth:`load` of one resolved directory (no retry here)."""
        manifest = storage.read_manifest(directory, verify)
        model = load_pretrained(directory / "adapter")
        n = manifest["ntotal"]
        place = (device or "cpu") if rows is None else "cpu"
        index = cls._with_saved_settings(directory, model, manifest["index"], place)
        expected = index._expected(n)
        if rows is not None:
            return cls._load_rows(directory, manifest, model, rows, device, expected)
        corpus, cache = storage.read_corpus(directory, expected)
        index._corpus = corpus.to(index.device, index.storage_dtype)
        index._doc_cache = None if cache is None else cache.to(index.device)
        saved = storage.read_first_stage(directory, expected)
        index._faiss = faiss_stage.to_gpu(saved, index.device)
        int_ids, removed = storage.read_ids(directory, manifest)
        names = None
        if "doc_ids.json" in manifest["files"]:
            names = storage.read_doc_ids(directory, n)
        index._install_ids(directory, names, int_ids, removed, n)
        if manifest.get("next_id") is not None:
            index._set_next_id(manifest["next_id"], IndexError_, str(directory / "manifest.json"))
        if index.first_stage == "ivf":
            faiss_stage.set_nprobe(index._faiss, index.nprobe)
        return index

    def _install_ids(
        self,
        directory: Path,
        names: list[str] | None,
        int_ids: torch.Tensor | None,
        removed: torch.Tensor | None,
        n: int,
    ) -> None:
        """Give the ``n`` loaded rows their saved ids (default 0 .. n - 1) and tombstones."""
        if names is not None and int_ids is not None:
            raise IndexError_(f"{directory}: holds both string ids and int ids")
        self._ids = DocumentIds()
        if names is not None:
            self._ids.append("str", names)
        elif int_ids is not None:
            self._ids.append("int", int_ids.numpy())
        elif n:
            self._ids.append("int", np.arange(n, dtype=np.int64))
        self._dead_rows, self._n_dead = None, 0
        if removed is not None and removed.numel():
            self._dead_rows = RowBuffer((), torch.bool, torch.device("cpu"))
            self._dead_rows.append(torch.zeros(n, dtype=torch.bool))
            self._dead_rows.data[removed] = True
            self._n_dead = int(removed.numel())

    def _expected(self, ntotal: int) -> storage.Expected:
        """What a saved index with these settings and ``ntotal`` documents must hold."""
        return storage.Expected(
            ntotal=ntotal,
            working_dim=self.model.config.working_dim,
            storage_dtype=self.storage_dtype,
            cache_width=self.document_cache_width,
            first_stage=self.first_stage,
            first_stage_dim=self.first_stage_dim,
        )

    @classmethod
    def _with_saved_settings(
        cls, directory: Path, model: IMRNN, cfg: dict[str, Any], device: str | torch.device
    ) -> IMRNNIndex:
        """An empty index with a manifest's settings, or IndexError_ naming the manifest."""
        try:
            return cls(model, device=device, **cfg)
        except (TypeError, ValueError) as exc:
            raise IndexError_(
                f"{directory / 'manifest.json'}: invalid index settings ({exc})"
            ) from exc

    @classmethod
    def _load_rows(
        cls,
        directory: Path,
        manifest: dict[str, Any],
        model: IMRNN,
        rows: tuple[int, int],
        device: str | torch.device | None,
        expected: storage.Expected,
    ) -> IMRNNIndex:
        """:meth:`load` of rows ``[lo, hi)`` (files already checked against the manifest)."""
        n = int(manifest["ntotal"])
        if (
            not isinstance(rows, tuple | list)
            or len(rows) != 2
            or not all(isinstance(r, int) and not isinstance(r, bool) for r in rows)
            or not 0 <= rows[0] <= rows[1] <= n
        ):
            raise ValueError(f"rows must be (lo, hi) with 0 <= lo <= hi <= {n}, got {rows!r}")
        lo, hi = int(rows[0]), int(rows[1])
        cfg = faiss_stage.settings_for_rows(manifest["index"], hi - lo)
        cls._with_saved_settings(directory, model, cfg, "cpu")  # checked before any work
        corpus, cache = storage.read_corpus(directory, expected, rows=(lo, hi))
        saved = storage.read_first_stage(directory, expected, mmap=expected.first_stage == "flat")
        vectors = faiss_stage.reconstruct(saved, lo, hi)
        del saved
        names = None
        if "doc_ids.json" in manifest["files"]:
            names = storage.read_doc_ids(directory, n)[lo:hi]
        int_ids, removed = storage.read_ids(directory, manifest)
        index = cls.from_parts(
            model,
            corpus,
            vectors,
            document_cache=cache,
            doc_ids=names,
            ids=None if int_ids is None else int_ids[lo:hi].numpy(),
            device=device or "cpu",
            **cfg,
        )
        if removed is not None:
            inside = removed[(removed >= lo) & (removed < hi)] - lo
            if inside.numel():
                index._install_ids(
                    directory,
                    index.doc_ids,
                    None if index.doc_ids is not None else torch.from_numpy(index.ids.copy()),
                    inside,
                    hi - lo,
                )
        if manifest.get("next_id") is not None and "doc_ids.json" not in manifest["files"]:
            # A slice holds fewer ids: the saved next id is above its largest one too.
            index._ids.kind = "int"
            index._set_next_id(manifest["next_id"], IndexError_, str(directory / "manifest.json"))
        return index


def _describe(x: Any) -> str:
    """A value's type, dtype and shape for an error message."""
    if isinstance(x, torch.Tensor):
        return f"torch {x.dtype} {tuple(x.shape)}"
    if isinstance(x, np.ndarray):
        return f"numpy {x.dtype} {x.shape}"
    return type(x).__name__


def feedback_set(
    model: IMRNN, fs_scores: torch.Tensor, fs_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(valid (B, K) bool, ids with padding replaced by 0, feedback weights or None).

    IVF/HNSW first stages can return fewer than K hits (faiss pads with id -1): padded slots
    get weight 0 (or the model's weights masked), so the feedback mean ignores them.

    Raises:
        ValueError: some query got no document at all.
    """
    valid = fs_ids >= 0
    safe_ids = torch.where(valid, fs_ids, torch.zeros_like(fs_ids))
    weights = model.feedback_weights(
        torch.where(valid, fs_scores, torch.full_like(fs_scores, -1e4))
    )
    if not bool(valid.all()):
        if not bool(valid.any(dim=1).all()):
            raise ValueError("the first stage returned no documents for some queries")
        mask = valid.to(torch.float32)
        weights = mask if weights is None else weights * mask
    return valid, safe_ids, weights


def check_unique_doc_ids(doc_ids: Sequence[str], known: Sequence[str]) -> None:
    """Raise ValueError unless every name of ``doc_ids`` is new: not in ``known`` (the names
    already held) and not repeated within ``doc_ids``. The message names up to five.

    Costs one hash of each new name and one lookup per known name (no set of ``known`` kept).
    """
    new = set(doc_ids)
    if len(new) != len(doc_ids):
        seen: set[str] = set()
        repeated = [d for d in doc_ids if d in seen or seen.add(d)]
        raise ValueError(
            f"doc_ids must be unique: {_few(list(dict.fromkeys(repeated)))} appear more "
            "than once in this add()"
        )
    if not new.isdisjoint(known):
        taken = [d for d in known if d in new]
        raise ValueError(f"doc_ids must be new: {_few(taken)} already in the index")


def topk_by_score_then_id(
    scores: torch.Tensor, ids: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of (B, K) ``scores`` with ties broken by the lower id; pad with -inf / -1.

    ``ids`` (B, K) int64 names each score's document (``-1``: padding, sorted last). Returns
    (scores (B, k) float32, ids (B, k) int64); an id whose score is infinite becomes -1.
    """
    b, kk = scores.shape
    # Order by id first, then a stable sort by score keeps equal scores in id order.
    by_id = torch.argsort(
        torch.where(ids < 0, torch.iinfo(torch.int64).max, ids), dim=1, stable=True
    )
    s, i = scores.gather(1, by_id), ids.gather(1, by_id)
    order = torch.argsort(s, dim=1, descending=True, stable=True)
    s, i = s.gather(1, order), i.gather(1, order)
    take = min(k, kk)
    out_s = torch.full((b, k), float("-inf"), dtype=torch.float32, device=scores.device)
    out_i = torch.full((b, k), -1, dtype=torch.int64, device=scores.device)
    out_s[:, :take], out_i[:, :take] = s[:, :take], i[:, :take]
    out_i[torch.isinf(out_s)] = -1
    return out_s, out_i


def shard_first_stage_over_gpus(index: IMRNNIndex) -> IMRNNIndex:
    """Spread one process's faiss first stage over all local GPUs (faiss-gpu, ``shard=True``).

    For one process driving several GPUs; with one rank per GPU (torchrun), each rank's
    shard already moves to its own GPU when the index's device is CUDA. Only the guard is
    tested (tests/retriever/test_distributed.py): the test machines have no GPU and no faiss-gpu.

    Raises:
        RuntimeError: faiss-gpu is not installed or sees fewer than two GPUs.
        ValueError: the index is empty.
    """
    index._faiss = faiss_stage.to_all_gpus(index._faiss)
    return index
