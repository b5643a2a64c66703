"""Training data prepared once per run: the validation split and the mined first stage.

:func:`prepare_training_data` carves the validation slice from the training split, runs the
base encoder's first stage for every query (feedback sets, hard-negative pools), builds the
pseudo-query set and the anchors, and fingerprints it all so that a resumed run can check it
trains on the same data.

:func:`prepare_streaming_data` does the same for training queries that need not fit in memory:
they are read from a re-iterable source of :class:`QueryRecord` (a BEIR folder:
:class:`imrnns.training.BeirQueryStream`, or any iterable) once to check, count and
fingerprint them and to carve the validation slice, then once per epoch, ``mining_chunk``
queries at a time: each chunk's first stage is mined when it is reached and dropped after
its batches, so memory is bounded by ``TrainConfig.mining_chunk`` (plus the corpus and the
validation slice), not by the number of queries.

Tested in tests/training/test_train.py and tests/training/test_pseudo_queries.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from imrnns.data import seen_doc_split
from imrnns.evaluate import EmbeddedSplit, base_search
from imrnns.training.config import TrainConfig
from imrnns.training.pseudo_queries import PseudoQueries

__all__ = [
    "MAX_ANCHORS",
    "QueryRecord",
    "QuerySource",
    "TrainingData",
    "prepare_streaming_data",
    "prepare_training_data",
    "split_validation",
]


@dataclass
class _QuerySet:
    """Queries with their embeddings, first-stage results and judgements (internal)."""

    ids: list[str]
    emb: torch.Tensor  # (Q, n) float32
    fb_ids: torch.Tensor  # (Q, feedback_k) int64, base first stage
    fb_scores: torch.Tensor  # (Q, feedback_k) float32
    pool_ids: torch.Tensor  # (Q, negative_pool) int64, base first stage
    qrels: dict[str, dict[str, int]]
    positives: list[tuple[list[int], list[int]]]  # per query: (doc rows, grades > 0)
    cited: set[int] = dataclasses.field(default_factory=set)  # rows relevant to any query


@dataclass
class TrainingData:
    """Embedded training and validation queries over one corpus.

    Build it with :func:`prepare_training_data`.
    """

    corpus_ids: list[str]
    corpus: torch.Tensor  # (N, n) float32
    train: _QuerySet
    val: _QuerySet
    val_subsets: dict[str, list[str]]  # "seen_doc" / "unseen_doc" validation query ids
    fingerprint: str
    val_corpus_np: np.ndarray = dataclasses.field(repr=False, default_factory=lambda: np.empty(0))
    # Anchor pseudo-queries (documents no training query cites) and their base neighbours.
    anchor_rows: torch.Tensor = dataclasses.field(
        repr=False, default_factory=lambda: torch.empty(0, dtype=torch.int64)
    )
    anchor_fb: torch.Tensor = dataclasses.field(
        repr=False, default_factory=lambda: torch.empty(0, 0, dtype=torch.int64)
    )
    anchor_fb_scores: torch.Tensor = dataclasses.field(
        repr=False, default_factory=lambda: torch.empty(0, 0)
    )
    # Corpus pseudo-queries (TrainConfig.pseudo_queries), None when off.
    pseudo: _QuerySet | None = dataclasses.field(repr=False, default=None)
    # Streamed training queries (prepare_streaming_data): ``train`` then holds none of them,
    # only the rows they cite.
    stream: _QueryStream | None = dataclasses.field(repr=False, default=None)
    # Queries left out or short, by reason (documented skips): "no_positive" (every grade
    # <= 0: left out), "short_of_negatives" (kept, with fewer than num_negatives pool
    # documents once its positives are removed: the missing columns are padding; in-memory
    # data only).
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def num_train_queries(self) -> int:
        return self.stream.count if self.stream is not None else len(self.train.ids)

    def steps_per_epoch(self, batch_size: int) -> int:
        """Optimiser steps of one epoch: batches never span two streamed chunks."""
        if self.stream is None:
            return math.ceil(len(self.train.ids) / batch_size)
        return sum(math.ceil(size / batch_size) for size in self.stream.chunk_sizes())

    def describe(self) -> dict[str, Any]:
        return {
            "num_docs": len(self.corpus_ids),
            "dim": int(self.corpus.shape[1]),
            "num_train_queries": self.num_train_queries,
            "num_val_queries": len(self.val.ids),
            "num_val_seen_doc": len(self.val_subsets["seen_doc"]),  # 0 without holdout
            "num_val_unseen_doc": len(self.val_subsets["unseen_doc"]),
            "num_anchors": int(self.anchor_rows.shape[0]),
            "num_pseudo_queries": 0 if self.pseudo is None else len(self.pseudo.ids),
            "streamed": self.stream is not None,
            "skipped_queries_without_positive": self.skipped.get("no_positive", 0),
            # None for streamed data: its pools are mined only when training reaches them.
            "queries_short_of_negatives": self.skipped.get("short_of_negatives"),
            "fingerprint": self.fingerprint,
        }


def split_validation(
    query_ids: Sequence[str], fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """Deterministic (train, validation) query split.

    The same partition as the official ``imrnns`` 0.2.3 trainer (sorted ids, shuffled by
    ``random.Random(seed)``, the first ``round((1 - fraction) * Q)`` train), so both trainers
    see the same queries.
    """
    shuffled = sorted(query_ids)
    random.Random(seed).shuffle(shuffled)
    cut = round(len(shuffled) * (1.0 - fraction))
    if cut <= 0 or cut >= len(shuffled):
        raise ValueError(
            f"val_fraction={fraction} leaves no training or no validation query out of "
            f"{len(shuffled)}"
        )
    return shuffled[:cut], shuffled[cut:]


def _fingerprint(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, np.ndarray):
            h.update(str(p.shape).encode())
            h.update(np.ascontiguousarray(p).tobytes())
        else:
            h.update(json.dumps(p, sort_keys=True).encode())
        h.update(b"\0")
    return h.hexdigest()


def _doc_row(row_of: Mapping[str, int], doc_id: str, query_id: str) -> int:
    try:
        return row_of[doc_id]
    except KeyError:
        raise ValueError(
            f"query {query_id!r} judges document {doc_id!r}, which is not in the corpus"
        ) from None


def _short_of_negatives(qs: _QuerySet, num_negatives: int) -> int:
    """How many queries have fewer than ``num_negatives`` pool documents besides their
    positives (their remaining hard-negative columns are padding)."""
    if num_negatives == 0:
        return 0
    short = 0
    for (docs, _), pool in zip(qs.positives, qs.pool_ids.tolist(), strict=True):
        pos = set(docs)
        short += sum(d not in pos for d in pool) < num_negatives
    return short


def _query_set(
    ids: list[str],
    emb: np.ndarray,
    qrels: Mapping[str, Mapping[str, int]],
    corpus: np.ndarray,
    row_of: Mapping[str, int],
    feedback_k: int,
    negative_pool: int,
) -> _QuerySet:
    depth = min(max(feedback_k, negative_pool), corpus.shape[0])
    if len(ids) == 0:
        scores, top = np.zeros((0, depth), np.float32), np.zeros((0, depth), np.int64)
    else:
        scores, top = base_search(corpus, emb, depth)
    positives = []
    for q in ids:
        judged = sorted(((_doc_row(row_of, d, q), int(g)) for d, g in qrels[q].items() if g > 0))
        positives.append(([r for r, _ in judged], [g for _, g in judged]))
    kf, kp = min(feedback_k, depth), min(negative_pool, depth)
    cited = {r for docs, _ in positives for r in docs}
    return _QuerySet(
        ids=list(ids),
        emb=torch.from_numpy(np.ascontiguousarray(emb, dtype=np.float32)),
        fb_ids=torch.from_numpy(top[:, :kf].astype(np.int64)),
        fb_scores=torch.from_numpy(scores[:, :kf].astype(np.float32)),
        pool_ids=torch.from_numpy(top[:, :kp].astype(np.int64)),
        qrels={q: dict(qrels[q]) for q in ids},
        positives=positives,
        cited=cited,
    )


def prepare_training_data(
    split: EmbeddedSplit,
    config: TrainConfig,
    *,
    val_query_ids: Sequence[str] | None = None,
    holdout: bool = True,
    pseudo: PseudoQueries | None = None,
) -> TrainingData:
    """Carve the validation slice from the training split and mine first-stage results.

    Args:
        split: the embedded *training* split.
        config: uses ``val_fraction``, ``seed``, ``feedback_k`` and ``negative_pool``.
        val_query_ids: an explicit validation slice instead of the seeded random one.
        holdout: False trains on every query and validates on none (a final refit with
            settings already chosen on a validation slice).
        pseudo: the corpus pseudo-queries, required when ``config.pseudo_queries`` is set
            (and then of that source), refused otherwise. Every one is used, whichever
            split judges its document; the seen-doc / unseen-doc validation subsets
            depend on the real training queries only.

    Feedback sets, hard negatives and distillation targets are mined by cosine (the
    official recipe) whatever ``split.similarity`` says; for a dot-product encoder a
    UserWarning says so, since an index built with ``similarity="dot"`` then draws its
    feedback sets by inner product, unlike training.

    Queries whose every grade is <= 0 are left out, counted in ``describe()`` as
    ``skipped_queries_without_positive``; training queries with fewer than
    ``num_negatives`` pool documents besides their positives are kept (the missing columns
    are padding) and counted as ``queries_short_of_negatives``.

    Raises:
        ValueError: no query with a positive judgement, an empty train/validation side, a
            judgement naming a document not in the corpus, or ``pseudo`` missing,
            unexpected, of another source, of another dimension, or naming a document not
            in the corpus.
    """
    similarity = getattr(split, "similarity", "cosine")
    if similarity != "cosine":
        warnings.warn(
            f"the {split.dataset.split} embeddings come from a {similarity!r}-similarity "
            "encoder, but training mines feedback sets, hard negatives and distillation "
            "targets by cosine; an index with similarity="
            f"{similarity!r} draws its feedback sets by {similarity}, so they can differ "
            "from the ones the adapter was trained with",
            UserWarning,
            stacklevel=2,
        )
    ds = split.dataset
    usable = [q for q in ds.query_ids if any(g > 0 for g in ds.qrels[q].values())]
    skipped = {"no_positive": len(ds.query_ids) - len(usable)}
    if len(usable) < (2 if holdout else 1):
        need = "2 (one for validation)" if holdout else "1"
        raise ValueError(
            f"the {ds.split} split of {ds.name} (qrels/{ds.split}.tsv) has {len(usable)} "
            f"queries with a relevant document (qrel > 0) of {len(ds.query_ids)} judged "
            f"({skipped['no_positive']} with only grades <= 0 were skipped); training needs "
            f"at least {need}"
        )
    if not holdout:
        train_ids, val_ids = list(usable), []
    elif val_query_ids is None:
        train_ids, val_ids = split_validation(usable, config.val_fraction, config.seed)
    else:
        chosen = set(val_query_ids)
        unknown = sorted(chosen - set(usable))
        if unknown:
            raise ValueError(f"validation query ids without positives in the split: {unknown[:5]}")
        train_ids = [q for q in usable if q not in chosen]
        val_ids = [q for q in usable if q in chosen]
        if not train_ids or not val_ids:
            raise ValueError("val_query_ids leaves no training or no validation query")
    row_of_q = {q: i for i, q in enumerate(ds.query_ids)}
    row_of_d = {d: i for i, d in enumerate(ds.corpus_ids)}
    corpus = np.ascontiguousarray(split.corpus, dtype=np.float32)

    def make(ids: list[str]) -> _QuerySet:
        emb = split.queries[[row_of_q[q] for q in ids]]
        return _query_set(
            ids, emb, ds.qrels, corpus, row_of_d, config.feedback_k, config.negative_pool
        )

    train_set, val_set = make(train_ids), make(val_ids)
    skipped["short_of_negatives"] = _short_of_negatives(train_set, config.num_negatives)
    seen, unseen = seen_doc_split(train_set.qrels, val_set.qrels)
    fp_parts: tuple[Any, ...] = (
        ds.name, ds.split, ds.corpus_ids, train_ids, val_ids, ds.qrels, corpus, split.queries
    )  # fmt: skip
    pseudo_set = _pseudo_set(pseudo, config, corpus, row_of_d)
    if pseudo is not None:
        fp_parts += (pseudo.source, pseudo.doc_ids, pseudo.emb)
    fp = _fingerprint(*fp_parts)
    return TrainingData(
        corpus_ids=list(ds.corpus_ids),
        corpus=torch.from_numpy(corpus),
        train=train_set,
        val=val_set,
        val_subsets={"seen_doc": seen, "unseen_doc": unseen},
        fingerprint=fp,
        val_corpus_np=corpus,
        pseudo=pseudo_set,
        skipped=skipped,
        **_anchors(corpus, train_set.cited, config),
    )


def _pseudo_set(
    pseudo: PseudoQueries | None,
    config: TrainConfig,
    corpus: np.ndarray,
    row_of: Mapping[str, int],
) -> _QuerySet | None:
    """The pseudo-queries as a query set: id ``pseudo:<doc>``, that document relevant (1)."""
    if not config.pseudo_queries:
        if pseudo is not None:
            raise ValueError("pseudo-queries given but config.pseudo_queries is off ('')")
        return None
    if pseudo is None:
        raise ValueError(
            f"config.pseudo_queries={config.pseudo_queries!r} needs pseudo= "
            "(imrnns.training.build_pseudo_queries)"
        )
    if pseudo.source != config.pseudo_queries:
        raise ValueError(
            f"pseudo-queries of source {pseudo.source!r} given for config.pseudo_queries="
            f"{config.pseudo_queries!r}"
        )
    if pseudo.emb.shape[1] != corpus.shape[1]:
        raise ValueError(
            f"pseudo-query dim {pseudo.emb.shape[1]} != corpus dim {corpus.shape[1]}: they "
            "must come from the same encoder"
        )
    unknown = [d for d in pseudo.doc_ids if d not in row_of]
    if unknown:
        raise ValueError(f"pseudo-queries name documents not in the corpus: {unknown[:5]}")
    if not pseudo.doc_ids:
        raise ValueError("pseudo-queries are empty")
    ids = [f"pseudo:{d}" for d in pseudo.doc_ids]
    qrels = {q: {d: 1} for q, d in zip(ids, pseudo.doc_ids, strict=True)}
    return _query_set(
        ids, pseudo.emb, qrels, corpus, row_of, config.feedback_k, config.negative_pool
    )


# Anchor pseudo-queries are capped: their neighbour search costs (anchors x N x n).
MAX_ANCHORS = 20000


def _anchors(corpus: np.ndarray, cited: set[int], config: TrainConfig) -> dict[str, torch.Tensor]:
    if config.anchor_weight <= 0:
        return {}
    rows = np.array([r for r in range(corpus.shape[0]) if r not in cited], dtype=np.int64)
    if len(rows) > MAX_ANCHORS:
        rng = np.random.default_rng(config.seed)
        rows = np.sort(rng.choice(rows, MAX_ANCHORS, replace=False))
    if len(rows) == 0:
        raise ValueError("anchor_weight > 0 needs documents that no training query cites")
    depth = min(config.feedback_k + 1, corpus.shape[0])
    scores, top = base_search(corpus, corpus[rows], depth)
    # Drop each anchor itself (normally its first hit; exact duplicates may come later).
    keep = top != rows[:, None]
    first = np.argmin(keep, axis=1)  # position of the anchor (0 if absent and all kept)
    absent = keep.all(axis=1)
    first[absent] = depth - 1  # not found: drop the last hit instead
    mask = np.ones_like(keep)
    mask[np.arange(len(rows)), first] = False
    kf = depth - 1
    return {
        "anchor_rows": torch.from_numpy(rows),
        "anchor_fb": torch.from_numpy(top[mask].reshape(len(rows), kf).astype(np.int64)),
        "anchor_fb_scores": torch.from_numpy(scores[mask].reshape(len(rows), kf)),
    }


# --------------------------------------------------------------------------- streaming


@dataclass(frozen=True)
class QueryRecord:
    """One training query of a stream.

    Attributes:
        query_id: its id (unique in the stream).
        embedding: (n,) base-encoder embedding (any float array; stored as float32).
        qrels: ``{document id: grade}``; grades <= 0 are non-relevant.
    """

    query_id: str
    embedding: np.ndarray
    qrels: Mapping[str, int]


# A re-iterable of records (a list, an object whose __iter__ starts over) or a function
# returning a fresh iterator: the stream is read once to prepare and once per epoch.
QuerySource = Iterable[QueryRecord] | Callable[[], Iterable[QueryRecord]]


def _open_source(source: QuerySource) -> Iterator[QueryRecord]:
    items = source() if callable(source) else source
    if not isinstance(items, Iterable):
        raise TypeError(
            f"queries must be an iterable of QueryRecord or a function returning one, got "
            f"{type(items).__name__}"
        )
    return iter(items)


def _check_source(source: QuerySource) -> None:
    if callable(source):
        return
    if not isinstance(source, Iterable):
        raise TypeError(
            f"queries must be an iterable of QueryRecord or a function returning one, got "
            f"{type(source).__name__}"
        )
    if iter(source) is source:
        raise TypeError(
            f"queries is a one-shot iterator ({type(source).__name__}): training reads the "
            "stream once per epoch; pass a list, a re-iterable object or a function returning "
            "a fresh iterator"
        )


def _held_out(query_id: str, seed: int, fraction: float) -> bool:
    """A query's seeded coin (SHA-256 of the seed and its id): validation with probability
    ``fraction``, independent of the stream's order and length."""
    digest = hashlib.sha256(f"{seed}\0{query_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2.0**64


def _checked_record(
    record: Any, index: int, dim: int, row_of: Mapping[str, int]
) -> tuple[str, np.ndarray, dict[str, int]]:
    """(id, (n,) float32 embedding, qrels) of one record, or a ValueError/TypeError naming
    the record's position and what is wrong."""
    if not isinstance(record, QueryRecord):
        raise TypeError(f"query record {index} is a {type(record).__name__}, not a QueryRecord")
    qid = record.query_id
    if not isinstance(qid, str) or not qid:
        raise ValueError(f"query record {index}: query_id must be a non-empty string, got {qid!r}")
    emb = np.asarray(record.embedding)
    if emb.shape != (dim,) or not np.issubdtype(emb.dtype, np.floating):
        raise ValueError(
            f"query {qid!r} (record {index}): embedding must be a ({dim},) float array like "
            f"the corpus rows, got shape {emb.shape} dtype {emb.dtype}"
        )
    if not np.isfinite(emb).all():
        raise ValueError(f"query {qid!r} (record {index}): embedding contains NaN or Inf")
    if not isinstance(record.qrels, Mapping):
        raise TypeError(f"query {qid!r} (record {index}): qrels must be a mapping doc id -> grade")
    qrels: dict[str, int] = {}
    for doc, grade in record.qrels.items():
        if isinstance(grade, bool) or not isinstance(grade, (int, np.integer)):
            raise ValueError(f"query {qid!r}: grade of {doc!r} must be an int, got {grade!r}")
        _doc_row(row_of, doc, qid)
        qrels[doc] = int(grade)
    return qid, emb.astype(np.float32, copy=False), qrels


def _record_digest(h: Any, qid: str, emb: np.ndarray, qrels: Mapping[str, int]) -> None:
    h.update(qid.encode())
    h.update(b"\0")
    h.update(np.ascontiguousarray(emb, dtype=np.float32).tobytes())
    h.update(json.dumps(sorted(qrels.items())).encode())
    h.update(b"\1")


@dataclass
class _QueryStream:
    """The streamed training queries: re-read every epoch, mined ``chunk`` at a time."""

    source: QuerySource
    corpus: np.ndarray  # (N, n) float32, for mining
    row_of: dict[str, int]
    held_out: set[str]  # validation query ids, skipped when training
    count: int  # training queries (with a positive, not held out)
    digest: str  # of every record, in stream order
    chunk: int
    feedback_k: int
    negative_pool: int

    def chunk_sizes(self) -> list[int]:
        full, rest = divmod(self.count, self.chunk)
        return [self.chunk] * full + ([rest] if rest else [])

    def chunks(self) -> Iterator[_QuerySet]:
        """The training queries in stream order, ``chunk`` per query set, each mined (first
        stage, negative pool) when reached.

        Raises:
            ValueError: the stream no longer gives the records it gave when prepared.
        """
        h = hashlib.sha256()
        count = 0
        ids: list[str] = []
        embs: list[np.ndarray] = []
        qrels: dict[str, dict[str, int]] = {}
        dim = self.corpus.shape[1]
        for index, record in enumerate(_open_source(self.source)):
            qid, emb, judged = _checked_record(record, index, dim, self.row_of)
            _record_digest(h, qid, emb, judged)
            if qid in self.held_out or not any(g > 0 for g in judged.values()):
                continue
            count += 1
            ids.append(qid)
            embs.append(emb)
            qrels[qid] = judged
            if len(ids) == self.chunk:
                # The records are dropped before the chunk is handed out and the chunk before
                # the next records are read: one chunk in memory at a time.
                mined = self._mine(ids, embs, qrels)
                ids, embs, qrels = [], [], {}
                yield mined
                del mined
        if ids:
            mined = self._mine(ids, embs, qrels)
            ids, embs, qrels = [], [], {}
            yield mined
            del mined
        if count != self.count or h.hexdigest() != self.digest:
            raise ValueError(
                f"the query stream changed since it was prepared ({count} training queries now, "
                f"{self.count} then, or other records): training would mix two data sets"
            )

    def _mine(
        self, ids: list[str], embs: list[np.ndarray], qrels: dict[str, dict[str, int]]
    ) -> _QuerySet:
        qs = _query_set(ids, np.stack(embs), qrels, self.corpus, self.row_of, self.feedback_k,
                        self.negative_pool)  # fmt: skip
        qs.qrels = {}  # only validation reads them; a chunk needs its positives only
        return qs


def prepare_streaming_data(
    corpus_ids: Sequence[str],
    corpus: np.ndarray,
    queries: QuerySource,
    config: TrainConfig,
    *,
    name: str = "stream",
    holdout: bool = True,
    pseudo: PseudoQueries | None = None,
) -> TrainingData:
    """Training data whose training queries are streamed, ``mining_chunk`` at a time.

    One pass over ``queries`` checks every record, counts the training queries, collects
    the validation slice (each query is held out with probability ``val_fraction`` by a
    seeded hash of its id, so the slice does not depend on the stream's order) and
    fingerprints the stream. Every epoch then reads the stream again in its order,
    shuffling the queries within each chunk of ``mining_chunk`` (seeded by
    ``(seed, epoch)``) and mining each chunk's first stage when it is reached. An epoch has
    ``sum(ceil(chunk / batch_size))`` steps: batches do not span chunks.

    Memory: the corpus, the validation slice (``val_fraction`` of the queries, with its
    first stage), the ids of the validation queries and of the cited documents, and one
    chunk (``mining_chunk`` x (n + 2 feedback_k + negative_pool) numbers plus its
    positives, and while it is mined a (``mining_chunk``, N) block of first-stage scores);
    never the whole stream. Only this preparing pass also holds every query id once (to
    refuse a repeated id). The in-memory path
    (:func:`prepare_training_data`) is unchanged by this one.

    Args:
        corpus_ids: (N,) document ids; the records' qrels name them.
        corpus: (N, n) document embeddings.
        queries: the training queries: a re-iterable of :class:`QueryRecord` (a list, a
            :class:`imrnns.training.BeirQueryStream`) or a function returning a fresh
            iterator; read once here and once per epoch, in the same order each time.
        config: uses ``val_fraction``, ``seed``, ``feedback_k``, ``negative_pool``,
            ``num_negatives`` and ``mining_chunk``.
        name: the data set's name in the fingerprint.
        holdout: False validates on no query (every query trains).
        pseudo: corpus pseudo-queries, as for :func:`prepare_training_data`.

    Raises:
        TypeError: ``queries`` is a one-shot iterator, or a record is not a QueryRecord.
        ValueError: a record with an empty or repeated id, an embedding of another
            dimension or with NaN/Inf, a non-integer grade or a document not in the corpus
            (the message names the record); no training or no validation query with a
            positive grade; or ``pseudo`` as :func:`prepare_training_data` refuses it.
            Queries whose grades are all <= 0 are skipped and counted
            (``describe()["skipped_queries_without_positive"]``).
    """
    corpus = np.ascontiguousarray(corpus, dtype=np.float32)
    if corpus.ndim != 2 or corpus.shape[0] != len(corpus_ids) or corpus.shape[0] == 0:
        raise ValueError(
            f"corpus must be (N, n) with N = len(corpus_ids) = {len(corpus_ids)} > 0, got "
            f"{corpus.shape}"
        )
    if not np.isfinite(corpus).all():
        raise ValueError("corpus embeddings contain NaN or Inf")
    _check_source(queries)
    row_of = {d: i for i, d in enumerate(corpus_ids)}
    if len(row_of) != len(corpus_ids):
        raise ValueError("corpus_ids has duplicates")
    dim = corpus.shape[1]
    h = hashlib.sha256()
    seen: set[str] = set()
    val_ids: list[str] = []
    val_emb: list[np.ndarray] = []
    val_qrels: dict[str, dict[str, int]] = {}
    cited: set[int] = set()
    count = no_positive = 0
    for index, record in enumerate(_open_source(queries)):
        qid, emb, judged = _checked_record(record, index, dim, row_of)
        if qid in seen:
            raise ValueError(f"query {qid!r} appears twice in the stream (record {index})")
        seen.add(qid)
        _record_digest(h, qid, emb, judged)
        if not any(g > 0 for g in judged.values()):
            no_positive += 1
        elif holdout and _held_out(qid, config.seed, config.val_fraction):
            val_ids.append(qid)
            val_emb.append(emb)
            val_qrels[qid] = judged
        else:
            count += 1
            cited.update(row_of[d] for d, g in judged.items() if g > 0)
    del seen
    if count == 0 or (holdout and not val_ids):
        path = getattr(queries, "qrels_path", None)  # a BeirQueryStream names its file
        where = f" ({path})" if path is not None else ""
        raise ValueError(
            f"the query stream{where} has {count} training and {len(val_ids)} validation "
            f"queries with a relevant document (qrel > 0; {no_positive} without one were "
            "skipped): training needs at least one of each (holdout=False needs no validation "
            "query)"
        )
    stream = _QueryStream(
        source=queries, corpus=corpus, row_of=row_of, held_out=set(val_ids), count=count,
        digest=h.hexdigest(), chunk=config.mining_chunk, feedback_k=config.feedback_k,
        negative_pool=config.negative_pool,
    )  # fmt: skip
    val_arr = np.stack(val_emb) if val_emb else np.zeros((0, dim), np.float32)
    val_set = _query_set(val_ids, val_arr, val_qrels, corpus, row_of, config.feedback_k,
                         config.negative_pool)  # fmt: skip
    train_set = _query_set([], np.zeros((0, dim), np.float32), {}, corpus, row_of,
                           config.feedback_k, config.negative_pool)  # fmt: skip
    train_set.cited = cited
    seen_doc, unseen_doc = seen_doc_split({"": {corpus_ids[r]: 1 for r in cited}}, val_set.qrels)
    pseudo_set = _pseudo_set(pseudo, config, corpus, row_of)
    fp_parts: tuple[Any, ...] = (
        "stream", name, list(corpus_ids), corpus, stream.digest, sorted(val_ids), holdout,
        config.mining_chunk,
    )  # fmt: skip
    if pseudo is not None:
        fp_parts += (pseudo.source, pseudo.doc_ids, pseudo.emb)
    return TrainingData(
        corpus_ids=list(corpus_ids),
        corpus=torch.from_numpy(corpus),
        train=train_set,
        val=val_set,
        val_subsets={"seen_doc": seen_doc, "unseen_doc": unseen_doc},
        fingerprint=_fingerprint(*fp_parts),
        val_corpus_np=corpus,
        pseudo=pseudo_set,
        stream=stream,
        skipped={"no_positive": no_positive},
        **_anchors(corpus, cited, config),
    )
