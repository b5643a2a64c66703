"""BEIR-standard evaluation of the base encoder and an IMRNN adapter, with significance tests.

Protocol (the numbers BEIR publishes):

- Base encoder: exact search by the encoder's own similarity (the index's flat first
  stage): cosine (inner product of L2-normalised embeddings, all-MiniLM-L6-v2 and most
  models) or, for dot-product models (TAS-B, Contriever), the raw inner product
  (:func:`index_similarity`); top-100 per query.
- IMRNN: :class:`imrnns.index.IMRNNIndex` with a flat first stage in the base-encoder space
  (the official protocol) and ``feedback_k`` feedback documents; ``mode="rerank"`` reorders
  the first stage's top ``feedback_k`` (official behaviour), ``mode="exhaustive"`` scores the
  whole corpus.
- Metrics: any measures ir-measures names (``nDCG@10 R@100 RR@10 P@5 AP ...``; default
  BEIR's nDCG@10, Recall@100 and MRR@10), per query through ir-measures / pytrec_eval
  (:mod:`imrnns.metrics`), averaged over every judged query of the split. Runs are searched
  as deep as the largest cut-off (at least ``RUN_DEPTH``); ``ignore_identical_ids`` drops a
  document whose id is the query's own, as BEIR's ``EvaluateRetrieval`` does.
- Subsets: when the training split's qrels are given, queries are split into *seen-doc*
  (one of their relevant documents is also relevant to a training query) and *unseen-doc*
  queries (:func:`imrnns.data.seen_doc_split`). An adapter can raise the seen-doc numbers by
  learning which documents get cited; the unseen-doc numbers show what it learnt about
  queries. Both are reported beside the overall means.
- Significance: each system (IMRNN modes, external runs) against the reference (the base
  encoder, or a given run), per subset and metric, with a paired t-test and a paired
  randomisation test (:func:`imrnns.metrics.paired_tests`). All tests of one evaluation form
  one family: each p-value is reported raw and Holm-adjusted (:func:`imrnns.metrics.holm`),
  and a result is marked significant on the adjusted randomisation p. The overall difference
  of each system and metric also gets a paired percentile bootstrap interval
  (:func:`imrnns.metrics.bootstrap_ci`).

Per-query results can be written to a TSV or JSON file for further tests, and each computed
system's ranking to a TREC run file; external TREC runs are scored the same way.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imrnns._atomic import atomic_file
from imrnns.data import BeirDataset, load_beir, seen_doc_split
from imrnns.metrics import (
    METRICS,
    bootstrap_ci,
    evaluate_run,
    holm,
    mean_metrics,
    metric_depth,
    paired_tests,
    parse_metrics,
    prepare_run,
    read_trec_run,
    run_from_results,
    write_trec_run,
)
from imrnns.model import IMRNN

__all__ = [
    "MODES",
    "EmbeddedSplit",
    "base_search",
    "compare_runs",
    "embed_beir",
    "evaluate_beir",
    "evaluate_embeddings",
    "imrnn_search",
    "index_similarity",
    "run_out_paths",
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
        similarity: how the encoder compares them, ``"cosine"`` or ``"dot"``
            (:func:`index_similarity`); the base retrieval and the IMRNN first stage use it.
    """

    dataset: BeirDataset
    corpus: np.ndarray = field(repr=False)
    queries: np.ndarray = field(repr=False)
    encoder: str = ""
    similarity: str = "cosine"

    def __post_init__(self) -> None:
        ds = self.dataset
        _check_similarity(self.similarity)
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
        encoder: a preset name or model folder, an :class:`imrnns.encoders.Encoder`, a
            ``SentenceTransformer``, or a callable from a list of texts to an (N, n) array
            (:func:`imrnns.encoders.resolve_encoder`).
        cache_dir: embedding cache folder (default: ``$IMRNNS_CACHE`` or the user cache);
            a second run re-encodes nothing.
        show_progress: progress bars while encoding.
    """
    from imrnns.encoders import resolve_encoder

    dataset = data if isinstance(data, BeirDataset) else load_beir(data, split)
    encoder = resolve_encoder(encoder, cache_dir, show_progress)
    corpus = encoder.encode_document(dataset.corpus_texts)
    similarity = index_similarity(encoder)  # before encoding: a refusal costs nothing
    corpus = encoder.encode_document(dataset.corpus_texts)
    queries = encoder.encode_query(dataset.query_texts)
    # A callable without a fingerprint names nothing checkable: record no encoder.
    return EmbeddedSplit(
        dataset, corpus, queries, encoder=encoder.fingerprint or "", similarity=similarity
    )


# ------------------------------------------------------------------------------ searching

# The similarities an index's first stage serves (imrnns.index.core.INDEX_SIMILARITIES,
# restated: importing the index here would load it with every evaluation import).
_SIMILARITIES = ("cosine", "dot")


def _check_similarity(similarity: Any) -> None:
    if similarity not in _SIMILARITIES:
        raise ValueError(f"similarity must be one of {_SIMILARITIES}, got {similarity!r}")


def index_similarity(encoder: Any) -> str:
    """The index ``similarity`` (``"cosine"`` or ``"dot"``) that ranks as ``encoder`` does.

    ``encoder`` is an :class:`imrnns.encoders.BaseEncoder` (its ``similarity``, the
    sentence-transformers ``similarity_fn_name``, and ``normalized``) or a similarity name.
    ``"cosine"`` and ``"dot"`` map to themselves. ``"euclidean"`` maps to ``"cosine"`` for an
    encoder whose rows are unit-norm (``|q - d|^2 = 2 - 2 q.d`` there, so the rankings are
    equal). Every other case raises ValueError naming the similarity: an inner-product first
    stage cannot rank by ``-|q - d|`` of free-norm vectors, nor by the manhattan distance.
    """
    if isinstance(encoder, str):
        similarity, normalized, name = encoder, False, "the encoder"
    else:
        similarity = getattr(encoder, "similarity", "cosine")
        normalized = bool(getattr(encoder, "normalized", False))
        name = f"encoder {getattr(encoder, 'name', type(encoder).__name__)!r}"
    if similarity in _SIMILARITIES:
        return similarity
    if similarity == "euclidean" and normalized:
        return "cosine"
    raise ValueError(
        f"{name} declares similarity {similarity!r}"
        + (" on vectors that are not unit-norm" if similarity == "euclidean" else "")
        + f": IMRNN indexes rank by inner product and support only {_SIMILARITIES} "
        "(a euclidean model with a Normalize module ranks as cosine)"
    )


def _base_space(x: np.ndarray, similarity: str) -> np.ndarray:
    """Rows as the base retriever compares them: unit rows (cosine) or unchanged (dot)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if similarity == "dot":
        return x
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def base_search(
    corpus: np.ndarray, queries: np.ndarray, k: int = RUN_DEPTH, *, similarity: str = "cosine"
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of the base encoder: ((Q, min(k, N)) scores, ids), best first.

    ``similarity="cosine"`` scores ``q.d / (|q| |d|)``, ``"dot"`` the raw ``q.d`` (the
    encoder's own similarity: :func:`index_similarity`). The index's exact flat first stage
    (:class:`imrnns.index.first_stage.FlatStage`: one blocked GEMM and top-k in PyTorch, or
    faiss where that measures faster; no faiss needed), so exact ties go to the lower id, the
    rule of every ranking in this package, at no extra search (raw faiss keeps an arbitrary
    one of tied duplicates).
    """
    from imrnns.index.first_stage import FlatStage, check_k

    check_k(k)
    _check_similarity(similarity)
    stage = FlatStage(corpus.shape[1])
    stage.add(_base_space(corpus, similarity))
    scores, ids = stage.search(
        torch.from_numpy(_base_space(queries, similarity)), min(k, corpus.shape[0])
    )
    return scores.numpy(), ids.numpy()


def imrnn_search(
    model: IMRNN,
    corpus: np.ndarray,
    queries: np.ndarray,
    *,
    mode: str = "rerank",
    k: int = RUN_DEPTH,
    feedback_k: int = 100,
    similarity: str = "cosine",
) -> tuple[np.ndarray, np.ndarray]:
    """IMRNN top-k through :class:`IMRNNIndex` (flat first stage in the base space, ranking
    by ``similarity`` as :func:`base_search`; the IMRNN stage is the modulated cosine).

    The model's train/eval mode is restored afterwards (the index puts it in eval mode).
    """
    from imrnns.index import IMRNNIndex

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    was_training = model.training
    try:
        index = IMRNNIndex(model, feedback_k=feedback_k, first_stage="flat", similarity=similarity)
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
    per_query: Mapping[str, Mapping[str, float]],
    subsets: Mapping[str, Sequence[str]],
    metrics: Sequence[str] = METRICS,
) -> dict[str, Any]:
    """Overall means at the top level, each subset's means (and size) beneath."""
    out: dict[str, Any] = dict(mean_metrics(per_query, subsets["overall"], metrics))
    out["num_queries"] = len(subsets["overall"])
    for name, qids in subsets.items():
        if name != "overall":
            out[name] = {**mean_metrics(per_query, qids, metrics), "num_queries": len(qids)}
    return out


def _significance(
    per_query: Mapping[str, Mapping[str, Mapping[str, float]]],
    reference: str,
    subsets: Mapping[str, Sequence[str]],
    metrics: Sequence[str],
    *,
    permutations: int,
    seed: int,
    bootstrap: int,
    level: float,
) -> tuple[dict[str, dict[str, dict[str, dict[str, float]]]], int]:
    """Every system against ``reference``, per subset (>= 2 queries) and metric, as one family.

    Returns ``({system: {subset: {metric: test}}}, family size)``; each test holds ``delta``,
    ``t``, ``p_ttest``, ``p_randomisation``, their Holm-adjusted ``p_ttest_holm`` and
    ``p_randomisation_holm`` over the whole family, and for the overall subset the bootstrap
    interval ``ci_low``, ``ci_high`` of ``delta`` (when ``bootstrap`` > 0).
    """
    base = per_query[reference]
    out: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    family: list[dict[str, float]] = []
    for system, table in per_query.items():
        if system == reference:
            continue
        out[system] = {}
        for name, qids in subsets.items():
            if len(qids) < 2:
                continue
            out[system][name] = {}
            for m in metrics:
                a, b = [base[q][m] for q in qids], [table[q][m] for q in qids]
                test = paired_tests(a, b, permutations=permutations, seed=seed)
                if name == "overall" and bootstrap > 0:
                    low, high = bootstrap_ci(a, b, resamples=bootstrap, level=level, seed=seed)
                    test["ci_low"], test["ci_high"] = low, high
                out[system][name][m] = test
                family.append(test)
    for key in ("p_ttest", "p_randomisation"):
        for test, adjusted in zip(family, holm([t[key] for t in family]), strict=True):
            test[f"{key}_holm"] = adjusted
    return out, len(family)


def run_out_paths(run_out: str | Path, systems: Sequence[str]) -> dict[str, Path]:
    """Where each system's TREC run goes: ``{system}`` in ``run_out`` is replaced by the
    system's name; without it, one system writes ``run_out`` itself and several write
    ``<stem>.<system><suffix>`` beside it (``runs.trec`` -> ``runs.base.trec``,
    ``runs.imrnn-rerank.trec``)."""
    text = str(run_out)
    if "{system}" in text:
        paths = {s: Path(text.replace("{system}", s)) for s in systems}
    elif len(systems) == 1:
        paths = {systems[0]: Path(text)}
    else:
        path = Path(text)
        suffix = "".join(path.suffixes[-1:]) if path.suffix else ""
        stem = path.name[: len(path.name) - len(suffix)]
        paths = {s: path.with_name(f"{stem}.{s}{suffix}") for s in systems}
    for system, path in paths.items():
        if path.is_dir():
            raise ValueError(f"run file for {system} would replace the directory {path}")
    if len({path.resolve() for path in paths.values()}) != len(paths):
        raise ValueError(f"run_out {text!r} gives several systems the same file")
    return paths


def _check_tests(permutations: int, bootstrap: int, level: float, alpha: float) -> None:
    """The statistics settings, checked before any search or encoding is spent."""
    if isinstance(permutations, bool) or not isinstance(permutations, int) or permutations <= 0:
        raise ValueError(f"permutations must be a positive int, got {permutations!r}")
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 0:
        raise ValueError(f"bootstrap must be a non-negative int (0: none), got {bootstrap!r}")
    for name, value in (("level", level), ("alpha", alpha)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise ValueError(f"{name} must be in (0, 1), got {value!r}")


def _as_run(name: str, run: Any) -> dict[str, dict[str, float]]:
    if isinstance(run, (str, Path)):
        return read_trec_run(run)
    if isinstance(run, Mapping):
        return {str(q): dict(docs) for q, docs in run.items()}
    raise TypeError(f"run {name!r} must be a TREC run path or a {{qid: {{doc: score}}}} dict")


def compare_runs(
    qrels: Mapping[str, Mapping[str, int]],
    runs: Mapping[str, Any],
    *,
    reference: str | None = None,
    metrics: str | Sequence[str] | None = None,
    query_ids: Sequence[str] | None = None,
    train_qrels: Mapping[str, Mapping[str, int]] | None = None,
    ignore_identical_ids: bool = False,
    permutations: int = 10000,
    seed: int = 0,
    bootstrap: int = 10000,
    level: float = 0.95,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Score several runs on the same judged queries and test each against ``reference``.

    Args:
        qrels: the split's judgements ``{qid: {doc_id: grade}}``.
        runs: ``{system name: run}``, each a ``{qid: {doc_id: score}}`` dict or a TREC run
            file path (:func:`imrnns.metrics.read_trec_run`), scored as given (every line).
        reference: the system the others are tested against (default: the first).
        metrics: measure names (:func:`imrnns.metrics.parse_metrics`).
        query_ids: the queries scored (default: every query of ``qrels``).
        train_qrels: the training split's qrels, for the seen-doc / unseen-doc subsets.
        ignore_identical_ids: drop each query's own id from every run (BEIR's option).
        permutations, seed: of the randomisation test (and the bootstrap's seed).
        bootstrap, level: resamples (0: none) and level of the overall intervals.
        alpha: the level of the significance marker (on Holm-adjusted p).

    Returns:
        ``{"metrics", "reference", "systems": {name: summary}, "tests", "subsets",
        "per_query"}``; each non-reference summary has ``"significance"`` (see
        :func:`evaluate_embeddings`); ``"tests"`` describes the family (correction, size,
        alpha, permutations, bootstrap).
    """
    _check_tests(permutations, bootstrap, level, alpha)
    measures = parse_metrics(metrics)
    names = list(measures)
    if not runs:
        raise ValueError("compare_runs needs at least one run")
    reference = next(iter(runs)) if reference is None else reference
    if reference not in runs:
        raise ValueError(f"reference {reference!r} is not one of the runs {list(runs)}")
    qids = list(qrels) if query_ids is None else list(query_ids)
    if not qids:
        raise ValueError("no judged queries to score")
    loaded = {name: _as_run(name, run) for name, run in runs.items()}
    for name, run in loaded.items():
        if run and not any(q in run for q in qids):
            raise ValueError(
                f"run {name!r} has none of the {len(qids)} judged query ids "
                f"(its first: {next(iter(run))!r}; the qrels' first: {qids[0]!r}): "
                "a run of another split or dataset?"
            )
    judged = {q: qrels[q] for q in qids}
    subsets = _subsets(qids, qrels, train_qrels)
    per_query = {
        name: evaluate_run(judged, run, measures, ignore_identical_ids=ignore_identical_ids)
        for name, run in loaded.items()
    }
    systems = {name: _summary(table, subsets, names) for name, table in per_query.items()}
    tests, size = _significance(
        per_query, reference, subsets, names,
        permutations=permutations, seed=seed, bootstrap=bootstrap, level=level,
    )  # fmt: skip
    for name, sig in tests.items():
        systems[name]["significance"] = sig
    return {
        "metrics": names,
        "reference": reference,
        "ignore_identical_ids": ignore_identical_ids,
        "systems": systems,
        "tests": {
            "correction": "holm",
            "family_size": size,
            "alpha": alpha,
            "marker": "p_randomisation_holm",
            "permutations": permutations,
            "seed": seed,
            "bootstrap": {"resamples": bootstrap, "level": level, "method": "paired percentile"},
        },
        "subsets": subsets,
        "per_query": per_query,
    }


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
    metrics: str | Sequence[str] | None = None,
    depth: int = RUN_DEPTH,
    ignore_identical_ids: bool = False,
    runs: Mapping[str, Any] | None = None,
    reference: str = "base",
    bootstrap: int = 10000,
    level: float = 0.95,
    alpha: float = 0.05,
    run_out: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate the base encoder, the adapter in each mode, and any external runs.

    Args:
        split: the embedded split to evaluate.
        model: the adapter, or None to evaluate the base encoder only.
        modes: ``"rerank"``, ``"exhaustive"`` or both.
        feedback_k: feedback-set size (and rerank depth) of the IMRNN stage.
        train_qrels: the training split's qrels, to report seen-doc / unseen-doc subsets.
        permutations, seed: of the randomisation test (the seed also seeds the bootstrap).
        query_ids: evaluate only these queries of the split (default: all).
        metrics: measure names as ir-measures names them (``"nDCG@10 R@100 RR@10 AP"``);
            each is reported under the name given. Default: ``nDCG@10``, ``Recall@100``,
            ``MRR@10`` (BEIR's spellings of ir-measures' ``nDCG@10 R@100 RR@10``).
        depth: documents retrieved per query, raised to the largest cut-off of ``metrics``
            (measures without a cut-off, such as ``AP``, see this many).
        ignore_identical_ids: drop a retrieved document whose id equals the query's id (BEIR's
            ``EvaluateRetrieval`` option, for ArguAna and Quora); off by default. The search
            then retrieves one more document, so each query still has ``depth``.
        runs: external systems ``{name: TREC run path or run dict}``, scored as given.
        reference: the system every other is tested against: ``"base"`` or a name in ``runs``.
        bootstrap, level: resamples (0: none) and level of the overall difference intervals.
        alpha: significance level of the marker (on the Holm-adjusted randomisation p).
        run_out: write each computed system's ranking (base, imrnn-<mode>) as a TREC run
            there (see :func:`run_out_paths`); the files score exactly as reported.

    Returns:
        A plain dict (JSON-serialisable) with ``"base"`` and ``"imrnn"`` (``{mode: ...}``)
        summaries: overall means of each metric at the top level, the same per subset under
        ``"seen_doc"`` / ``"unseen_doc"``, and for each system other than the reference
        ``"significance"``: ``{subset: {metric: {delta, t, p_ttest, p_randomisation,
        p_ttest_holm, p_randomisation_holm[, ci_low, ci_high]}}}`` (the interval for the
        overall subset). ``"runs"`` holds external systems' summaries; ``"metrics"``,
        ``"reference"`` and ``"tests"`` (the family's correction and settings) describe the
        comparison. ``"per_query"`` holds ``{system: {query_id: {metric: value}}}`` (systems
        ``base``, ``imrnn-rerank``, ``imrnn-exhaustive``, and the external names) and
        ``"subsets"`` the query ids of each subset.
    """
    modes = (modes,) if isinstance(modes, str) else tuple(modes)
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"modes must be a non-empty subset of {MODES}, got {modes!r}")
    if isinstance(feedback_k, bool) or not isinstance(feedback_k, int) or feedback_k <= 0:
        raise ValueError(f"feedback_k must be a positive int, got {feedback_k!r}")
    if isinstance(depth, bool) or not isinstance(depth, int) or depth <= 0:
        raise ValueError(f"depth must be a positive int, got {depth!r}")
    _check_tests(permutations, bootstrap, level, alpha)
    measures = parse_metrics(metrics)
    runs = dict(runs or {})
    clash = [name for name in runs if name == "base" or name.startswith("imrnn-")]
    if clash:
        raise ValueError(f"external run names must not be base or imrnn-<mode>: {clash}")
    if reference != "base" and reference not in runs:
        raise ValueError(f"reference must be 'base' or one of the runs {list(runs)}")
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
    paths = None
    if run_out is not None:
        systems = ["base", *(f"imrnn-{m}" for m in modes)] if model is not None else ["base"]
        paths = run_out_paths(run_out, systems)  # checked before any search
    queries = split.queries[rows]
    depth = metric_depth(measures, depth)
    # One more when the query's own id may be dropped, so that `depth` remain.
    k = min(depth + int(ignore_identical_ids), ds.num_docs)

    def ranking(scores: np.ndarray, ids: np.ndarray) -> dict[str, dict[str, float]]:
        run = run_from_results(qids, ds.corpus_ids, scores, ids, keep_scores=True)
        return prepare_run(run, ignore_identical_ids=ignore_identical_ids, depth=depth)

    sim = split.similarity
    computed = {"base": ranking(*base_search(split.corpus, queries, k, similarity=sim))}
    if model is not None:
        for mode in modes:
            s, i = imrnn_search(
                model, split.corpus, queries, mode=mode, k=k, feedback_k=feedback_k,
                similarity=sim,
            )  # fmt: skip
            computed[f"imrnn-{mode}"] = ranking(s, i)
    compared = compare_runs(
        ds.qrels, {**computed, **runs}, reference=reference, metrics=measures, query_ids=qids,
        train_qrels=train_qrels, ignore_identical_ids=ignore_identical_ids,
        permutations=permutations, seed=seed, bootstrap=bootstrap, level=level, alpha=alpha,
    )  # fmt: skip
    result: dict[str, Any] = {
        "dataset": ds.name,
        "split": ds.split,
        "num_queries": len(qids),
        "num_docs": ds.num_docs,
        "encoder": split.encoder,
        "similarity": split.similarity,
        "feedback_k": feedback_k,
        "depth": depth,
    }
    result.update(_layout(compared))
    if model is not None:
        result["model"] = model.config.to_dict()
    if paths is not None:
        for system, path in paths.items():
            write_trec_run(path, computed[system], tag=system)
        result["run_out"] = {system: str(path) for system, path in paths.items()}
    return result


def _layout(compared: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`compare_runs`' systems in the result layout: ``base``, ``imrnn: {mode: ...}``
    and ``runs: {name: ...}`` (external systems)."""
    out: dict[str, Any] = {
        "metrics": compared["metrics"],
        "reference": compared["reference"],
        "ignore_identical_ids": compared["ignore_identical_ids"],
        "tests": compared["tests"],
    }
    for name, summary in compared["systems"].items():
        if name == "base":
            out["base"] = summary
        elif name.startswith("imrnn-"):
            out.setdefault("imrnn", {})[name.removeprefix("imrnn-")] = summary
        else:
            out.setdefault("runs", {})[name] = summary
    out["subsets"] = compared["subsets"]
    out["per_query"] = compared["per_query"]
    return out


def write_per_query(path: str | Path, result: Mapping[str, Any]) -> Path:
    """Write ``result["per_query"]`` atomically: JSON for a ``.json`` path, else TSV.

    TSV columns: ``query_id subset system`` and one per metric (``result["metrics"]``,
    default ``nDCG@10 Recall@100 MRR@10``; subset is ``seen_doc``/``unseen_doc`` when known,
    else ``all``); one row per (query, system).
    """
    path = Path(path)
    per_query: Mapping[str, Mapping[str, Mapping[str, float]]] = result["per_query"]
    names = list(result.get("metrics", METRICS))
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
        fh.write("\t".join(("query_id", "subset", "system", *names)) + "\n")
        for system, table in per_query.items():
            for qid, metrics in table.items():
                values = [f"{metrics[m]:.6f}" for m in names]
                fh.write("\t".join((qid, subset_of.get(qid, "all"), system, *values)) + "\n")
    return path


def _named_runs(runs: Any) -> dict[str, Any]:
    """External runs as ``{name: path or dict}``: a path's name is the path as given."""
    if runs is None:
        return {}
    if isinstance(runs, Mapping):
        return dict(runs)
    if isinstance(runs, (str, Path)):
        runs = [runs]
    named: dict[str, Any] = {}
    for run in runs:
        if not isinstance(run, (str, Path)):
            raise TypeError(f"runs must be TREC run paths or a {{name: run}} dict, got {run!r}")
        if str(run) in named:
            raise ValueError(f"run {str(run)!r} given twice")
        named[str(run)] = run
    return named


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
    metrics: str | Sequence[str] | None = None,
    depth: int = RUN_DEPTH,
    ignore_identical_ids: bool = False,
    runs: Any = None,
    baseline: str | Path | Mapping[str, Mapping[str, float]] | None = None,
    bootstrap: int = 10000,
    level: float = 0.95,
    alpha: float = 0.05,
    run_out: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate a checkpoint (and the base encoder), or external runs, on a BEIR split.

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
        permutations, seed: of the randomisation test (the seed also seeds the bootstrap).
        embedded: precomputed embeddings of the split (skips the encoder).
        show_progress: progress bars while encoding.
        mode, per_query_out: aliases of ``modes`` and ``per_query_path`` (the CLI's names);
            when given they win.
        metrics, depth, ignore_identical_ids, bootstrap, level, alpha, run_out: see
            :func:`evaluate_embeddings`.
        runs: external TREC run files (a path, a list of paths, or ``{name: path or run}``),
            scored against the split's qrels and tested against the reference.
        baseline: a TREC run (path or run dict) to test every system against instead of the
            base encoder. With a baseline and no checkpoint nothing is encoded: only the
            runs are scored.

    Returns:
        The dict of :func:`evaluate_embeddings` without ``"per_query"`` (written to
        ``per_query_path`` instead), plus ``"checkpoint"``, ``"modes"`` and
        ``"per_query_path"``.
    """
    if mode is not None:
        modes = mode
    if per_query_out is not None:
        per_query_path = per_query_out
    named = _named_runs(runs)
    reference = "base"
    if baseline is not None:
        reference = str(baseline) if isinstance(baseline, (str, Path)) else "baseline"
        named = {reference: baseline, **{k: v for k, v in named.items() if k != reference}}
    runs_only = baseline is not None and checkpoint is None and embedded is None
    if runs_only and run_out is not None:
        raise ValueError("run_out writes computed rankings; with only external runs there are none")
    # Bad measure names and test settings fail before any encoding.
    parse_metrics(metrics)
    _check_tests(permutations, bootstrap, level, alpha)
    if isinstance(depth, bool) or not isinstance(depth, int) or depth <= 0:
        raise ValueError(f"depth must be a positive int, got {depth!r}")
    if embedded is None and not runs_only:
        embedded = embed_beir(
            data_dir, split, encoder=encoder, cache_dir=cache_dir, show_progress=show_progress
        )
    dataset = embedded.dataset if embedded is not None else load_beir(data_dir, split)
    train_qrels = None
    if train_split is not None and train_split != dataset.split:
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
    if runs_only:
        compared = compare_runs(
            dataset.qrels, named, reference=reference, metrics=metrics,
            query_ids=dataset.query_ids, train_qrels=train_qrels,
            ignore_identical_ids=ignore_identical_ids, permutations=permutations, seed=seed,
            bootstrap=bootstrap, level=level, alpha=alpha,
        )  # fmt: skip
        result: dict[str, Any] = {
            "dataset": dataset.name,
            "split": dataset.split,
            "num_queries": dataset.num_queries,
            "num_docs": dataset.num_docs,
            **_layout(compared),
        }
    else:
        with torch.no_grad():
            result = evaluate_embeddings(
                embedded, model, modes=modes, feedback_k=feedback_k, train_qrels=train_qrels,
                permutations=permutations, seed=seed, metrics=metrics, depth=depth,
                ignore_identical_ids=ignore_identical_ids, runs=named, reference=reference,
                bootstrap=bootstrap, level=level, alpha=alpha, run_out=run_out,
            )  # fmt: skip
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


def _systems(result: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    out = [("base", result["base"])] if "base" in result else []
    out += [(f"imrnn-{mode}", s) for mode, s in result.get("imrnn", {}).items()]
    out += list(result.get("runs", {}).items())
    return out


def format_table(result: Mapping[str, Any]) -> str:
    """A plain-text report of a result dict: one row per (system, subset), then each
    system's overall difference from the reference with its interval and p-values.

    ``*`` marks a difference whose Holm-adjusted randomisation p is below the result's alpha.
    """
    names = list(result.get("metrics", METRICS))
    tests = result.get("tests", {})
    alpha = float(tests.get("alpha", 0.05))
    width = max([10, *(len(m) + 1 for m in names)])
    systems = _systems(result)
    sys_width = max([18, *(len(s) for s, _ in systems)])
    header = f"{'system':<{sys_width}} {'subset':<11} {'n':>4} "
    lines = [header + " ".join(f"{m:>{width}}" for m in names)]

    def marked(test: Mapping[str, float]) -> bool:
        return test.get("p_randomisation_holm", test["p_randomisation"]) < alpha

    for system, summary in systems:
        sig = summary.get("significance")
        for subset in SUBSETS:
            block = summary if subset == "overall" else summary.get(subset)
            if block is None:
                continue
            cells = []
            for m in names:
                cell = f"{block[m]:.4f}" if not math.isnan(block[m]) else "nan"
                tested = sig is not None and subset in sig
                cell += "*" if tested and marked(sig[subset][m]) else " "
                cells.append(f"{cell:>{width}}")
            lines.append(
                f"{system:<{sys_width}} {subset:<11} {block['num_queries']:>4} " + " ".join(cells)
            )
    diffs = []
    for system, summary in systems:
        for m, t in summary.get("significance", {}).get("overall", {}).items():
            ci = f"[{t['ci_low']:+.4f}, {t['ci_high']:+.4f}]" if "ci_low" in t else "-"
            diffs.append(
                f"{system:<{sys_width}} {m:<{width}} {t['delta']:+.4f} {ci:>19} "
                f"{t['p_randomisation']:>8.3g} {t.get('p_randomisation_holm', math.nan):>8.3g}"
                + (" *" if marked(t) else "")
            )
    if diffs:
        level = tests.get("bootstrap", {}).get("level", 0.95)
        lines += [
            "",
            f"vs {result.get('reference', 'base')} (overall; {level:.0%} paired bootstrap "
            f"interval; randomisation p raw and Holm-adjusted over {tests.get('family_size', '?')}"
            f" tests; * Holm p < {alpha:g}):",
            f"{'system':<{sys_width}} {'metric':<{width}} {'delta':>7} {'interval':>19} "
            f"{'p':>8} {'p Holm':>8}",
            *diffs,
        ]
    return "\n".join(lines)
