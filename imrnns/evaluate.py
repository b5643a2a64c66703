"""BEIR-standard evaluation of the base encoder and an IMRNN adapter, with significance tests.

Protocol (the numbers BEIR publishes):

- Base encoder: exact cosine search (faiss flat inner product on L2-normalised embeddings),
  top-100 per query.
- IMRNN: :class:`imrnns.index.IMRNNIndex` with a flat first stage in the base-encoder space
  (the official protocol) and ``feedback_k`` feedback documents; ``mode="rerank"`` reorders
  the first stage's top ``feedback_k`` (official behaviour), ``mode="exhaustive"`` scores the
  whole corpus.
- Metrics: nDCG@10, Recall@100 and MRR@10 per query through pytrec_eval
  (:mod:`imrnns.metrics`), averaged over every judged query of the split.
- Subsets: when the training split's qrels are given, queries are split into *seen-doc*
  (one of their relevant documents is also relevant to a training query) and *unseen-doc*
  queries (:func:`imrnns.data.seen_doc_split`). An adapter can raise the seen-doc numbers by
  learning which documents get cited; the unseen-doc numbers show what it learnt about
  queries. Both are reported beside the overall means.
- Significance: each IMRNN mode against the base encoder, per subset and metric, with a
  paired t-test and a paired randomisation test (:func:`imrnns.metrics.paired_tests`).

Per-query results can be written to a TSV or JSON file for further tests.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from imrnns._atomic import atomic_file
from imrnns.data import BeirDataset, load_beir, seen_doc_split
from imrnns.metrics import METRICS, evaluate_run, mean_metrics, paired_tests, run_from_results
from imrnns.model import IMRNN

__all__ = [
    "MODES",
    "EmbeddedSplit",
    "base_search",
    "embed_beir",
    "evaluate_beir",
    "evaluate_embeddings",
    "imrnn_search",
    "write_per_query",
]

MODES = ("rerank", "exhaustive")
# BEIR's metrics need at most the top 100 (Recall@100); deeper runs change nothing.
RUN_DEPTH = 100
SUBSETS = ("overall", "seen_doc", "unseen_doc")


@dataclass(frozen=True)
class EmbeddedSplit:
    """A BEIR split with its frozen-encoder embeddings, rows parallel to the id lists.

    Attributes:
        dataset: the loaded split (ids, texts, qrels).
        corpus: (N, n) float32 document embeddings, parallel to ``dataset.corpus_ids``.
        queries: (Q, n) float32 query embeddings, parallel to ``dataset.query_ids``.
        encoder: a name or fingerprint of the encoder that produced them.
    """

    dataset: BeirDataset
    corpus: np.ndarray = field(repr=False)
    queries: np.ndarray = field(repr=False)
    encoder: str = ""

    def __post_init__(self) -> None:
        ds = self.dataset
        for name, arr, rows in (
            ("corpus", self.corpus, ds.num_docs),
            ("queries", self.queries, ds.num_queries),
        ):
            if not isinstance(arr, np.ndarray) or arr.ndim != 2:
                raise TypeError(f"{name} must be a 2-D numpy array, got {type(arr).__name__}")
            if arr.shape[0] != rows:
                raise ValueError(
                    f"{name} has {arr.shape[0]} rows but the {ds.split} split of {ds.name} has "
                    f"{rows}: embeddings and ids must be parallel"
                )
            if not np.isfinite(arr).all():
                raise ValueError(f"{name} embeddings contain NaN or Inf")
        if self.corpus.shape[1] != self.queries.shape[1]:
            raise ValueError(
                f"corpus dim {self.corpus.shape[1]} != query dim {self.queries.shape[1]}: "
                "they must come from the same encoder"
            )


def embed_beir(
    data: str | Path | BeirDataset,
    split: str = "test",
    *,
    encoder: Any = "minilm",
    cache_dir: str | Path | None = None,
    show_progress: bool = True,
) -> EmbeddedSplit:
    """Load a BEIR split and embed its corpus and queries with a frozen encoder (cached).

    Args:
        data: a BEIR folder, or an already loaded :class:`BeirDataset`.
        split: the qrels split (ignored when ``data`` is a dataset).
        encoder: an :class:`imrnns.encoders.Encoder` or a name/folder for one.
        cache_dir: embedding cache folder (default: ``$IMRNNS_CACHE`` or the user cache);
            a second run re-encodes nothing.
        show_progress: progress bars while encoding.
    """
    from imrnns.encoders import resolve_encoder

    dataset = data if isinstance(data, BeirDataset) else load_beir(data, split)
    encoder = resolve_encoder(encoder, cache_dir, show_progress)
    corpus = encoder.encode_document(dataset.corpus_texts)
    queries = encoder.encode_query(dataset.query_texts)
    return EmbeddedSplit(dataset, corpus, queries, encoder=encoder.fingerprint)


# ------------------------------------------------------------------------------ searching


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def base_search(
    corpus: np.ndarray, queries: np.ndarray, k: int = RUN_DEPTH
) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-k of the base encoder: ((Q, k) scores, (Q, k) ids), best first.

    Exact ties go to the lower id (``imrnns.index.search_ties_by_lower_id``), the rule of
    every ranking in this package: raw faiss keeps an arbitrary one of tied duplicates.
    """
    from imrnns.index import search_ties_by_lower_id

    index = faiss.IndexFlatIP(corpus.shape[1])
    index.add(_unit(corpus))
    kk = min(k, corpus.shape[0])
    return search_ties_by_lower_id(index, _unit(queries), kk, corpus.shape[0])


def imrnn_search(
    model: IMRNN,
    corpus: np.ndarray,
    queries: np.ndarray,
    *,
    mode: str = "rerank",
    k: int = RUN_DEPTH,
    feedback_k: int = 100,
) -> tuple[np.ndarray, np.ndarray]:
    """IMRNN top-k through :class:`IMRNNIndex` (flat first stage in the base space).

    The model's train/eval mode is restored afterwards (the index puts it in eval mode).
    """
    from imrnns.index import IMRNNIndex

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    was_training = model.training
    try:
        index = IMRNNIndex(model, feedback_k=feedback_k, first_stage="flat")
        index.add(np.ascontiguousarray(corpus, dtype=np.float32))
        scores, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k, mode)
    finally:
        model.train(was_training)
    return np.asarray(scores), np.asarray(ids)


# ------------------------------------------------------------------------------ evaluation


def _subsets(
    query_ids: Sequence[str],
    qrels: Mapping[str, Mapping[str, int]],
    train_qrels: Mapping[str, Mapping[str, int]] | None,
) -> dict[str, list[str]]:
    subsets = {"overall": list(query_ids)}
    if train_qrels is not None:
        seen, unseen = seen_doc_split(train_qrels, {q: qrels[q] for q in query_ids})
        subsets["seen_doc"], subsets["unseen_doc"] = seen, unseen
    return subsets


def _summary(
    per_query: Mapping[str, Mapping[str, float]], subsets: Mapping[str, Sequence[str]]
) -> dict[str, Any]:
    """Overall means at the top level, each subset's means (and size) beneath."""
    out: dict[str, Any] = dict(mean_metrics(per_query, subsets["overall"]))
    out["num_queries"] = len(subsets["overall"])
    for name, qids in subsets.items():
        if name != "overall":
            out[name] = {**mean_metrics(per_query, qids), "num_queries": len(qids)}
    return out


def _significance(
    base: Mapping[str, Mapping[str, float]],
    system: Mapping[str, Mapping[str, float]],
    subsets: Mapping[str, Sequence[str]],
    permutations: int,
    seed: int,
) -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, qids in subsets.items():
        if len(qids) < 2:
            continue
        out[name] = {
            m: paired_tests(
                [base[q][m] for q in qids],
                [system[q][m] for q in qids],
                permutations=permutations,
                seed=seed,
            )
            for m in METRICS
        }
    return out


def evaluate_embeddings(
    split: EmbeddedSplit,
    model: IMRNN | None = None,
    *,
    modes: str | Sequence[str] = MODES,
    feedback_k: int = 100,
    train_qrels: Mapping[str, Mapping[str, int]] | None = None,
    permutations: int = 10000,
    seed: int = 0,
    query_ids: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Evaluate the base encoder, and the adapter in each mode, on embedded data.

    Args:
        split: the embedded split to evaluate.
        model: the adapter, or None to evaluate the base encoder only.
        modes: ``"rerank"``, ``"exhaustive"`` or both.
        feedback_k: feedback-set size (and rerank depth) of the IMRNN stage.
        train_qrels: the training split's qrels, to report seen-doc / unseen-doc subsets.
        permutations, seed: of the randomisation test.
        query_ids: evaluate only these queries of the split (default: all).

    Returns:
        A plain dict (JSON-serialisable) with ``"base"`` and ``"imrnn"`` (``{mode: ...}``)
        summaries: overall ``nDCG@10``, ``Recall@100``, ``MRR@10`` at the top level, the
        same per subset under ``"seen_doc"`` / ``"unseen_doc"``, and for each mode
        ``"significance"``: ``{subset: {metric: {delta, t, p_ttest, p_randomisation}}}``.
        ``"per_query"`` holds ``{system: {query_id: {metric: value}}}`` (systems ``base``,
        ``imrnn-rerank``, ``imrnn-exhaustive``) and ``"subsets"`` the query ids of each subset.
    """
    modes = (modes,) if isinstance(modes, str) else tuple(modes)
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"modes must be a non-empty subset of {MODES}, got {modes!r}")
    if isinstance(feedback_k, bool) or not isinstance(feedback_k, int) or feedback_k <= 0:
        raise ValueError(f"feedback_k must be a positive int, got {feedback_k!r}")
    ds = split.dataset
    rows = np.arange(ds.num_queries)
    qids = list(ds.query_ids)
    if query_ids is not None:
        pos = {q: i for i, q in enumerate(ds.query_ids)}
        missing = [q for q in query_ids if q not in pos]
        if missing:
            raise ValueError(f"query_ids not in the {ds.split} split: {missing[:5]}")
        if len(set(query_ids)) != len(query_ids):
            # A repeated id would count twice in every mean and significance test.
            dup = sorted(q for q, c in Counter(query_ids).items() if c > 1)
            raise ValueError(f"query_ids has duplicates: {dup[:5]}")
        qids = list(query_ids)
        rows = np.array([pos[q] for q in qids], dtype=np.int64)
    if not qids:
        raise ValueError(f"the {ds.split} split of {ds.name} has no judged queries")
    queries = split.queries[rows]
    subsets = _subsets(qids, ds.qrels, train_qrels)
    qrels = {q: ds.qrels[q] for q in qids}

    per_query: dict[str, dict[str, dict[str, float]]] = {}
    scores, ids = base_search(split.corpus, queries)
    per_query["base"] = evaluate_run(qrels, run_from_results(qids, ds.corpus_ids, scores, ids))
    result: dict[str, Any] = {
        "dataset": ds.name,
        "split": ds.split,
        "num_queries": len(qids),
        "num_docs": ds.num_docs,
        "encoder": split.encoder,
        "feedback_k": feedback_k,
        "base": _summary(per_query["base"], subsets),
    }
    if model is not None:
        result["model"] = model.config.to_dict()
        result["imrnn"] = {}
        for mode in modes:
            s, i = imrnn_search(model, split.corpus, queries, mode=mode, feedback_k=feedback_k)
            name = f"imrnn-{mode}"
            per_query[name] = evaluate_run(qrels, run_from_results(qids, ds.corpus_ids, s, i))
            summary = _summary(per_query[name], subsets)
            summary["significance"] = _significance(
                per_query["base"], per_query[name], subsets, permutations, seed
            )
            result["imrnn"][mode] = summary
    result["subsets"] = subsets
    result["per_query"] = per_query
    return result


def write_per_query(path: str | Path, result: Mapping[str, Any]) -> Path:
    """Write ``result["per_query"]`` atomically: JSON for a ``.json`` path, else TSV.

    TSV columns: ``query_id subset system nDCG@10 Recall@100 MRR@10`` (subset is
    ``seen_doc``/``unseen_doc`` when known, else ``all``); one row per (query, system).
    """
    path = Path(path)
    per_query: Mapping[str, Mapping[str, Mapping[str, float]]] = result["per_query"]
    subsets: Mapping[str, Sequence[str]] = result.get("subsets", {})
    subset_of = {q: name for name in ("seen_doc", "unseen_doc") for q in subsets.get(name, ())}
    if path.suffix == ".json":
        payload = {
            "dataset": result.get("dataset"),
            "split": result.get("split"),
            "subsets": {k: list(v) for k, v in subsets.items() if k != "overall"},
            "per_query": per_query,
        }
        with atomic_file(path, "w") as fh:
            json.dump(payload, fh, indent=1, sort_keys=True)
            fh.write("\n")
        return path
    with atomic_file(path, "w") as fh:
        fh.write("\t".join(("query_id", "subset", "system", *METRICS)) + "\n")
        for system, table in per_query.items():
            for qid, metrics in table.items():
                values = [f"{metrics[m]:.6f}" for m in METRICS]
                fh.write("\t".join((qid, subset_of.get(qid, "all"), system, *values)) + "\n")
    return path


def evaluate_beir(
    data_dir: str | Path,
    checkpoint: str | Path | IMRNN | None = None,
    *,
    split: str = "test",
    modes: str | Sequence[str] = MODES,
    feedback_k: int = 100,
    train_split: str | None = "train",
    encoder: Any = "minilm",
    cache_dir: str | Path | None = None,
    per_query_path: str | Path | None = None,
    permutations: int = 10000,
    seed: int = 0,
    embedded: EmbeddedSplit | None = None,
    show_progress: bool = True,
    mode: str | Sequence[str] | None = None,
    per_query_out: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate a checkpoint (and the base encoder) on one split of a BEIR folder.

    Args:
        data_dir: the BEIR folder.
        checkpoint: an adapter directory (``IMRNN.save_pretrained``), an official ``.pt``
            file, an :class:`IMRNN`, or None for the base encoder alone.
        split: the split to evaluate (``"test"``).
        modes: ``"rerank"``, ``"exhaustive"``, or both (default).
        feedback_k: feedback-set size of the IMRNN stage.
        train_split: the split the adapter was trained on; its qrels define the seen-doc /
            unseen-doc subsets. None, or a split the folder lacks, reports overall only.
        encoder, cache_dir: the frozen encoder and its embedding cache.
        per_query_path: write per-query metrics there (``.json`` or TSV).
        permutations, seed: of the randomisation test.
        embedded: precomputed embeddings of the split (skips the encoder).
        show_progress: progress bars while encoding.
        mode, per_query_out: aliases of ``modes`` and ``per_query_path`` (the CLI's names);
            when given they win.

    Returns:
        The dict of :func:`evaluate_embeddings` without ``"per_query"`` (written to
        ``per_query_path`` instead), plus ``"checkpoint"``, ``"modes"`` and
        ``"per_query_path"``.
    """
    if mode is not None:
        modes = mode
    if per_query_out is not None:
        per_query_path = per_query_out
    if embedded is None:
        embedded = embed_beir(
            data_dir, split, encoder=encoder, cache_dir=cache_dir, show_progress=show_progress
        )
    train_qrels = None
    if train_split is not None and train_split != embedded.dataset.split:
        try:
            train_qrels = load_beir(data_dir, train_split).qrels
        except FileNotFoundError:
            train_qrels = None
    model: IMRNN | None
    if checkpoint is None or isinstance(checkpoint, IMRNN):
        model = checkpoint
    else:
        model = IMRNN.from_pretrained(checkpoint)
    if model is not None and model.config.input_dim != embedded.corpus.shape[1]:
        raise ValueError(
            f"the adapter expects {model.config.input_dim}-d embeddings but the encoder gives "
            f"{embedded.corpus.shape[1]}-d: was it trained with another encoder?"
        )
    with torch.no_grad():
        result = evaluate_embeddings(
            embedded,
            model,
            modes=modes,
            feedback_k=feedback_k,
            train_qrels=train_qrels,
            permutations=permutations,
            seed=seed,
        )
    if per_query_path is not None:
        write_per_query(per_query_path, result)
    result.pop("per_query")
    result["checkpoint"] = (
        None if checkpoint is None or isinstance(checkpoint, IMRNN) else str(checkpoint)
    )
    result["modes"] = [modes] if isinstance(modes, str) else list(modes)
    result["per_query_path"] = None if per_query_path is None else str(per_query_path)
    result["train_split"] = train_split if train_qrels is not None else None
    return result


def format_table(result: Mapping[str, Any]) -> str:
    """A plain-text table of a result dict: one row per (system, subset)."""
    lines = [f"{'system':<18} {'subset':<11} {'n':>4} " + " ".join(f"{m:>10}" for m in METRICS)]

    def row(system: str, summary: Mapping[str, Any], sig: Mapping[str, Any] | None) -> None:
        for subset in SUBSETS:
            block = summary if subset == "overall" else summary.get(subset)
            if block is None:
                continue
            cells = []
            for m in METRICS:
                cell = f"{block[m]:.4f}" if not math.isnan(block[m]) else "nan"
                if sig is not None and subset in sig:
                    p = sig[subset][m]["p_randomisation"]
                    cell += "*" if p < 0.05 else " "
                cells.append(f"{cell:>10}")
            lines.append(f"{system:<18} {subset:<11} {block['num_queries']:>4} " + " ".join(cells))

    row("base", result["base"], None)
    for mode, summary in result.get("imrnn", {}).items():
        row(f"imrnn-{mode}", summary, summary.get("significance"))
    return "\n".join(lines)
