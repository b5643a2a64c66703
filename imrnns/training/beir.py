"""Training from a BEIR folder in one call: embed (cached), prepare, train, optionally refit.

The library entry behind ``imrnns train``. Tested in tests/training/test_train.py and
tests/training/test_pseudo_queries.py (on synthetic embeddings and the vendored SciFact).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from imrnns.data import (
    _INT_RE,
    _QRELS_HEADER,
    MAX_GRADE,
    _find_file,
    _find_qrels,
    _get_id,
    _lines,
    _read_jsonl,
)
from imrnns.evaluate import EmbeddedSplit, embed_beir
from imrnns.training.config import TrainConfig
from imrnns.training.data import QueryRecord, prepare_training_data
from imrnns.training.loop import train
from imrnns.training.pseudo_queries import PseudoQueries, build_pseudo_queries

__all__ = ["BeirQueryStream", "train_from_beir"]


def train_from_beir(
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    split: str = "train",
    config: TrainConfig | None = None,
    encoder: Any = "minilm",
    cache_dir: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
    refit: bool = False,
    refit_epochs: int | None = None,
    embedded: EmbeddedSplit | None = None,
    pseudo: PseudoQueries | None = None,
    show_progress: bool | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Train an adapter on one split of a BEIR folder (the CLI's ``imrnns train``).

    Args:
        data_dir: the BEIR folder (``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``).
        out_dir: where ``best/``, ``last/`` and ``training.json`` go.
        split: the training split; the validation slice is carved from it.
        config: a :class:`TrainConfig`; keyword ``overrides`` replace its fields
            (``modulation="affine"``, ``epochs=5``, ...); an override of None keeps the
            config's value (so a CLI can pass unset options through).
        encoder, cache_dir: the frozen encoder (a preset name or model folder, an
            :class:`imrnns.encoders.Encoder`, a ``SentenceTransformer``, or a callable from
            texts to an (N, n) array) and its embedding cache.
        resume: continue an interrupted run in ``out_dir``.
        progress: progress bars (``show_progress`` is an alias; when given it wins).
        refit: after the validated run, train again on *all* queries of the split (no
            holdout) for the number of epochs validation selected, into ``out_dir/refit``
            (its ``best/`` is the refit adapter). Nothing is selected on the refit itself.
        refit_epochs: refit for this many epochs instead (implies ``refit``): an epoch count
            chosen on validation outside this run, e.g. by cross-validation over several
            validation slices. The schedule still spans ``config.epochs``.
        embedded: precomputed embeddings of the split (skips the encoder).
        pseudo: precomputed corpus pseudo-queries; by default, when
            ``config.pseudo_queries`` is set, :func:`build_pseudo_queries` reads them from
            ``data_dir``'s corpus and encodes them with ``encoder`` (cached).

    Returns:
        :func:`train`'s dict plus ``"dataset"``, ``"split"``, ``"encoder"``, and with
        ``refit`` a ``"refit"`` entry (the refit run's dict, None when epoch 0 won).
    """
    if show_progress is not None:
        progress = show_progress
    if refit_epochs is not None:
        if isinstance(refit_epochs, bool) or not isinstance(refit_epochs, int) or refit_epochs <= 0:
            raise ValueError(f"refit_epochs must be a positive int or None, got {refit_epochs!r}")
        refit = True
    config = config or TrainConfig()
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown training options {unknown}; TrainConfig fields: {sorted(known)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides:
        config = dataclasses.replace(config, **overrides)
    needs_encoder = embedded is None or (config.pseudo_queries and pseudo is None)
    if needs_encoder:
        from imrnns.encoders import resolve_encoder

        # One Encoder for the split and the pseudo-queries: its model loads at most once.
        encoder = resolve_encoder(encoder, cache_dir, progress)
    if embedded is None:
        embedded = embed_beir(
            data_dir, split, encoder=encoder, cache_dir=cache_dir, show_progress=progress
        )
    if config.pseudo_queries and pseudo is None:
        pseudo = build_pseudo_queries(data_dir, config.pseudo_queries, encoder=encoder,
                                      cache_dir=cache_dir, show_progress=progress)  # fmt: skip
    data = prepare_training_data(embedded, config, pseudo=pseudo)
    result = train(data, out_dir, config, resume=resume, progress=progress)
    result.update(dataset=embedded.dataset.name, split=embedded.dataset.split,
                  encoder=embedded.encoder)  # fmt: skip
    if refit:
        result["refit"] = None
        epochs = result["best_epoch"] if refit_epochs is None else refit_epochs
        if epochs > 0:
            all_data = prepare_training_data(embedded, config, holdout=False, pseudo=pseudo)
            result["refit"] = train(all_data, Path(out_dir) / "refit", config, resume=resume,
                                    progress=progress, stop_after=epochs)  # fmt: skip
    return result


class BeirQueryStream:
    """The judged queries of a BEIR split, read from the files on every pass.

    Iterating yields one :class:`QueryRecord` per query of ``qrels/<split>.tsv[.gz]``, in
    file order, with its embedding row. Only the ids are held in memory (query id -> row,
    and the ids already passed, which is how a query whose judgements are not on
    consecutive lines is caught); the judgements and the embeddings are read as they come,
    so ``query_embeddings`` can stay on disk (``np.load(path, mmap_mode="r")``).

    Args:
        data_dir: the BEIR folder.
        split: the qrels split.
        query_embeddings: (Q, n) base-encoder embeddings of the queries, one row per id of
            ``query_ids``.
        query_ids: the ids of ``query_embeddings``' rows; default: the ids of
            ``queries.jsonl[.gz]`` in file order.

    Raises:
        FileNotFoundError: the folder, ``queries.jsonl`` or the split is missing.
        ValueError: ``query_embeddings`` is not 2-D or has another number of rows than
            ``query_ids``; a repeated query id. While iterating: a malformed qrels line, a
            query id without an embedding row, a conflicting repeated judgement, or a query
            whose judgements are not on consecutive lines (sort the file by query id); the
            message names the file and the line.
    """

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        query_embeddings: Any,
        query_ids: Sequence[str] | None = None,
    ) -> None:
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"BEIR dataset folder not found: {root}")
        self.qrels_path = _find_qrels(root, split)
        if query_ids is None:
            queries_path = _find_file(root, "queries.jsonl")
            query_ids = [_get_id(obj, queries_path, n) for n, obj in _read_jsonl(queries_path)]
        self.row_of = {q: i for i, q in enumerate(query_ids)}
        if len(self.row_of) != len(query_ids):
            raise ValueError("query_ids has duplicates")
        shape = getattr(query_embeddings, "shape", None)
        if shape is None or len(shape) != 2 or shape[0] != len(query_ids):
            raise ValueError(
                f"query_embeddings must be (Q, n) with Q = {len(query_ids)} query ids, got "
                f"shape {shape}"
            )
        self.embeddings = query_embeddings

    def __iter__(self) -> Iterator[QueryRecord]:
        path = self.qrels_path
        current: str | None = None
        judged: dict[str, int] = {}
        passed: set[str] = set()
        first = True
        for lineno, line in _lines(path):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            cols = line.split("\t")
            if first:
                first = False
                if tuple(c.strip() for c in cols) == _QRELS_HEADER:
                    continue
            if len(cols) != 3:
                raise ValueError(
                    f"{path}:{lineno}: expected 3 tab-separated columns (query-id, corpus-id, "
                    f"score), got {len(cols)}: {line!r}"
                )
            qid, doc_id, score_str = (c.strip() for c in cols)
            if not _INT_RE.fullmatch(score_str) or abs(int(score_str)) > MAX_GRADE:
                raise ValueError(
                    f"{path}:{lineno}: score must be an integer in [-{MAX_GRADE}, {MAX_GRADE}], "
                    f"got {score_str!r}"
                )
            if qid != current:
                if current is not None:
                    yield self._record(current, judged, path, lineno)
                    passed.add(current)
                if qid in passed:
                    raise ValueError(
                        f"{path}:{lineno}: query {qid!r} has judgements on lines that are not "
                        "consecutive; streaming reads each query's judgements together (sort "
                        "the file by query id)"
                    )
                current, judged = qid, {}
            score = int(score_str)
            if judged.get(doc_id, score) != score:
                raise ValueError(
                    f"{path}:{lineno}: conflicting score {score} for ({qid!r}, {doc_id!r}); an "
                    f"earlier line gave {judged[doc_id]}"
                )
            judged[doc_id] = score
        if current is not None:
            yield self._record(current, judged, path, None)

    def _record(
        self, qid: str, judged: dict[str, int], path: Path, lineno: int | None
    ) -> QueryRecord:
        row = self.row_of.get(qid)
        if row is None:
            where = f"{path}:{lineno}" if lineno is not None else str(path)
            raise ValueError(f"{where}: unknown query id {qid!r} (no embedding row)")
        return QueryRecord(qid, np.asarray(self.embeddings[row], dtype=np.float32), judged)
