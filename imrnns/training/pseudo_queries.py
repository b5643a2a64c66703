"""Corpus pseudo-queries: label-free training queries made from the corpus itself.

Every document's title (or the first sentence of its text) becomes a query whose single
positive is that document (``TrainConfig.pseudo_queries``; the idea is in
:mod:`imrnns.training`). This module makes the texts and their embeddings;
:func:`imrnns.training.data.prepare_training_data` turns them into a query set and
:func:`imrnns.training.batches._pseudo_schedule` draws them per step.

Tested in tests/training/test_pseudo_queries.py.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imrnns.data import load_corpus_fields
from imrnns.training.config import PSEUDO_SOURCES

__all__ = ["PseudoQueries", "build_pseudo_queries", "pseudo_query_texts"]


@dataclass(frozen=True)
class PseudoQueries:
    """Label-free pseudo-queries built from a corpus, one per document at most.

    Build it with :func:`build_pseudo_queries` (or directly from precomputed embeddings).

    Attributes:
        source: the :data:`PSEUDO_SOURCES` entry that produced the texts.
        doc_ids: the document each pseudo-query stands for (its single positive).
        texts: the pseudo-query texts, parallel to ``doc_ids``.
        emb: (P, n) float32 query-encoder embeddings of ``texts``.
    """

    source: str
    doc_ids: list[str] = dataclasses.field(repr=False)
    texts: list[str] = dataclasses.field(repr=False)
    emb: np.ndarray = dataclasses.field(repr=False)

    def __post_init__(self) -> None:
        if self.source not in PSEUDO_SOURCES or not self.source:
            raise ValueError(f"source must be one of {PSEUDO_SOURCES[1:]}, got {self.source!r}")
        if not isinstance(self.emb, np.ndarray) or self.emb.ndim != 2:
            raise TypeError(f"emb must be a 2-D numpy array, got {type(self.emb).__name__}")
        if not len(self.doc_ids) == len(self.texts) == self.emb.shape[0]:
            raise ValueError(
                f"doc_ids ({len(self.doc_ids)}), texts ({len(self.texts)}) and emb rows "
                f"({self.emb.shape[0]}) must be parallel"
            )
        if len(set(self.doc_ids)) != len(self.doc_ids):
            raise ValueError("doc_ids must be unique (one pseudo-query per document)")
        if not np.isfinite(self.emb).all():
            raise ValueError("pseudo-query embeddings contain NaN or Inf")

    def __repr__(self) -> str:
        return f"PseudoQueries(source={self.source!r}, num={len(self.doc_ids)})"


# A leading all-caps section heading of a structured abstract ("BACKGROUND", "OBJECTIVE:",
# "BACKGROUND AND AIMS"), followed by a capitalised word; 4+ letters so acronyms survive.
_HEADING = re.compile(r"^[A-Z]{4,}(?:\s+[A-Z]{2,})*\s*[:.]?\s+(?=[A-Z0-9])")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\[])")


def pseudo_query_texts(
    doc_ids: Sequence[str], titles: Sequence[str], texts: Sequence[str], source: str
) -> tuple[list[str], list[str]]:
    """Pseudo-query texts for a corpus: ``(doc_ids, queries)`` of the documents that have one.

    Args:
        doc_ids, titles, texts: parallel corpus fields (:func:`imrnns.data.load_corpus_fields`).
        source: ``"title"`` (the title, stripped) or ``"first_sentence"`` (the first
            sentence of the text after a leading all-caps heading).

    Documents whose pseudo-query would be empty are left out.
    """
    if source not in PSEUDO_SOURCES or not source:
        raise ValueError(f"source must be one of {PSEUDO_SOURCES[1:]}, got {source!r}")
    if not len(doc_ids) == len(titles) == len(texts):
        raise ValueError("doc_ids, titles and texts must be parallel")
    ids, out = [], []
    for d, title, text in zip(doc_ids, titles, texts, strict=True):
        if source == "title":
            q = title.strip()
        else:
            body = _HEADING.sub("", text.strip(), count=1)
            q = _SENTENCE_END.split(body, maxsplit=1)[0].strip()
        if q:
            ids.append(d)
            out.append(q)
    return ids, out


def build_pseudo_queries(
    data_dir: str | Path,
    source: str,
    *,
    encoder: Any = "minilm",
    cache_dir: str | Path | None = None,
    show_progress: bool = True,
) -> PseudoQueries:
    """Read a BEIR corpus and encode its pseudo-queries with the *query* encoder (cached).

    Uses only the corpus (no queries, no qrels of any split).

    Args:
        data_dir: the BEIR folder (``corpus.jsonl[.gz]``).
        source: ``"title"`` or ``"first_sentence"`` (see :func:`pseudo_query_texts`).
        encoder: an :class:`imrnns.encoders.Encoder` or a name/folder for one; it must be
            the encoder of the corpus embeddings the pseudo-queries are trained against.
        cache_dir: embedding cache folder (default: ``$IMRNNS_CACHE`` or the user cache).
        show_progress: progress bar while encoding.
    """
    from imrnns.encoders import resolve_encoder

    ids, queries = pseudo_query_texts(*load_corpus_fields(data_dir), source)
    if not ids:
        raise ValueError(f"the corpus of {data_dir} has no non-empty {source} pseudo-query")
    emb = resolve_encoder(encoder, cache_dir, show_progress).encode_query(queries)
    return PseudoQueries(source, ids, queries, np.ascontiguousarray(emb, dtype=np.float32))
