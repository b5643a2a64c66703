"""BEIR-standard retrieval metrics through pytrec_eval (trec_eval's own numbers).

BEIR reports nDCG@10 (``ndcg_cut_10``), Recall@100 (``recall_100``) and MRR@10. trec_eval's
``recip_rank`` has no cut-off, so MRR@10 is ``recip_rank`` over each run truncated to its
top 10 — the way BEIR computes it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pytrec_eval
from scipy import stats

from imrnns.data import MAX_GRADE

METRICS = ("nDCG@10", "Recall@100", "MRR@10")


def run_from_results(
    query_ids: Sequence[str],
    doc_ids: Sequence[str],
    scores: np.ndarray,
    ids: np.ndarray,
) -> dict[str, dict[str, float]]:
    """A TREC run ``{qid: {docid: score}}`` from (B, k) search results; ``-1`` ids are padding.

    Scores are made strictly decreasing by rank (trec_eval re-sorts by score and breaks ties
    by document id, which would silently reorder tied results).
    """
    if len(query_ids) != scores.shape[0] or scores.shape != ids.shape:
        raise ValueError(
            f"{len(query_ids)} query ids for scores {scores.shape} and ids {ids.shape}"
        )
    run: dict[str, dict[str, float]] = {}
    for qid, row_ids in zip(query_ids, ids, strict=True):
        kept = [int(i) for i in row_ids if i >= 0]
        # Rank-derived scores keep our order exactly, ties included.
        run[qid] = {doc_ids[i]: float(len(kept) - r) for r, i in enumerate(kept)}
    return run


def evaluate_run(
    qrels: Mapping[str, Mapping[str, int]], run: Mapping[str, Mapping[str, float]]
) -> dict[str, dict[str, float]]:
    """Per-query ``{qid: {"nDCG@10", "Recall@100", "MRR@10"}}`` for the queries in ``qrels``.

    A query of ``qrels`` missing from ``run`` scores 0 on every metric (trec_eval would drop
    it and inflate the mean).
    """
    qrels = {q: {d: _grade(q, d, r) for d, r in docs.items()} for q, docs in qrels.items()}
    full = {q: dict(run.get(q, {})) for q in qrels}
    for q, docs in full.items():
        bad = [d for d, s in docs.items() if not math.isfinite(s)]
        if bad:
            raise ValueError(f"run scores must be finite: query {q!r}, document {bad[0]!r}")
    top10 = {q: dict(sorted(docs.items(), key=lambda kv: -kv[1])[:10]) for q, docs in full.items()}
    main = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100"}).evaluate(full)
    mrr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top10)
    out: dict[str, dict[str, float]] = {}
    for q in qrels:
        m, r = main.get(q, {}), mrr.get(q, {})
        out[q] = {
            "nDCG@10": float(m.get("ndcg_cut_10", 0.0)),
            "Recall@100": float(m.get("recall_100", 0.0)),
            "MRR@10": float(r.get("recip_rank", 0.0)),
        }
    return out


def _grade(qid: str, doc_id: str, r: object) -> int:
    """A qrels grade as an int: int() alone truncates 1.5 to 1, and trec_eval wraps grades
    beyond a C int (2^32 scores as 0) and allocates per level (2^31 - 1 took 17 GB)."""
    if isinstance(r, bool) or not isinstance(r, (int, float, np.integer, np.floating)):
        raise ValueError(f"qrels grade of ({qid!r}, {doc_id!r}) must be an int, got {r!r}")
    if not float(r).is_integer() or abs(r) > MAX_GRADE:
        raise ValueError(
            f"qrels grade of ({qid!r}, {doc_id!r}) must be an int in "
            f"[-{MAX_GRADE}, {MAX_GRADE}], got {r!r}"
        )
    return int(r)


def mean_metrics(
    per_query: Mapping[str, Mapping[str, float]], query_ids: Sequence[str] | None = None
) -> dict[str, float]:
    """Mean of each metric over ``query_ids`` (default: all queries)."""
    qids = list(per_query) if query_ids is None else list(query_ids)
    if not qids:
        return {m: math.nan for m in METRICS}
    return {m: float(np.mean([per_query[q][m] for q in qids])) for m in METRICS}


def paired_tests(
    a: Sequence[float], b: Sequence[float], *, permutations: int = 10000, seed: int = 0
) -> dict[str, float]:
    """Paired significance of ``mean(b) - mean(a)``: two-sided t-test and randomisation test.

    Returns ``{"delta", "t", "p_ttest", "p_randomisation"}``. The randomisation test flips
    the sign of each per-query difference at random (Smucker et al., 2007).
    """
    if isinstance(permutations, bool) or not isinstance(permutations, int) or permutations <= 0:
        # 0 would report p = 1.0 from no samples at all.
        raise ValueError(f"permutations must be a positive int, got {permutations!r}")
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 2:
        raise ValueError(
            f"paired tests need two equal-length lists (>= 2), got {x.shape}, {y.shape}"
        )
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("paired tests need finite per-query values (got NaN or Inf)")
    d = y - x
    delta = float(d.mean())
    if float(d.std()) == 0.0:  # scipy returns NaN for identical lists; the answer is known
        t, p_t = (0.0, 1.0) if delta == 0.0 else (math.copysign(math.inf, delta), 0.0)
    else:
        res = stats.ttest_rel(y, x)
        t, p_t = float(res.statistic), float(res.pvalue)
    rng = np.random.default_rng(seed)
    signs = rng.choice((-1.0, 1.0), size=(permutations, len(d)))
    null = np.abs((signs * d).mean(axis=1))
    p_r = float((np.sum(null >= abs(delta) - 1e-15) + 1) / (permutations + 1))
    return {"delta": delta, "t": float(t), "p_ttest": float(p_t), "p_randomisation": p_r}
