"""Training data prepared once per run: the validation split and the mined first stage.

:func:`prepare_training_data` carves the validation slice from the training split, runs the
base encoder's first stage for every query (feedback sets, hard-negative pools), builds the
pseudo-query set and the anchors, and fingerprints it all so that a resumed run can check it
trains on the same data.

Tested in tests/test_train.py and tests/test_pseudo_queries.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from imrnns.data import seen_doc_split
from imrnns.evaluate import EmbeddedSplit, base_search
from imrnns.training.config import TrainConfig
from imrnns.training.pseudo_queries import PseudoQueries

__all__ = ["MAX_ANCHORS", "TrainingData", "prepare_training_data", "split_validation"]


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

    def describe(self) -> dict[str, Any]:
        return {
            "num_docs": len(self.corpus_ids),
            "dim": int(self.corpus.shape[1]),
            "num_train_queries": len(self.train.ids),
            "num_val_queries": len(self.val.ids),
            "num_val_seen_doc": len(self.val_subsets["seen_doc"]),  # 0 without holdout
            "num_val_unseen_doc": len(self.val_subsets["unseen_doc"]),
            "num_anchors": int(self.anchor_rows.shape[0]),
            "num_pseudo_queries": 0 if self.pseudo is None else len(self.pseudo.ids),
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
        judged = sorted(((row_of[d], int(g)) for d, g in qrels[q].items() if g > 0))
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

    Raises:
        ValueError: no query with a positive judgement, an empty train/validation side, or
            ``pseudo`` missing, unexpected, of another source, of another dimension, or
            naming a document not in the corpus.
    """
    ds = split.dataset
    usable = [q for q in ds.query_ids if any(g > 0 for g in ds.qrels[q].values())]
    if len(usable) < (2 if holdout else 1):
        raise ValueError(
            f"the {ds.split} split of {ds.name} has {len(usable)} queries with a relevant "
            "document (qrel > 0); training needs at least 2 (one for validation)"
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
