"""Retrieval metrics through ir-measures (pytrec_eval, i.e. trec_eval's own code), TREC run
files, and the paired statistics of a comparison.

Measures are named as ir-measures names them (``nDCG@10 R@100 RR@10 P@5 AP Success@10
P(rel=2)@5 ...``; ``ir_measures.parse_measure`` reads the string) and computed by the
provider ir-measures picks: pytrec_eval for nDCG, R, P, AP and Success, the MS MARCO
implementation for ``RR@k`` (trec_eval's ``recip_rank`` has no cut-off). A measure is
reported under the name it was asked for; the defaults are BEIR's ``nDCG@10``,
``Recall@100`` and ``MRR@10``, which ir-measures reads as ``nDCG@10``, ``R@100``, ``RR@10``.

Ranking rule: a query's documents are ordered by score, descending, ties by document id,
ascending, and the providers are given rank-derived scores in that order. trec_eval alone
breaks ties by document id *descending* and the MS MARCO code ascending, so without this
the same run would score differently under two measures of one report.

A run is ``{query_id: {doc_id: score}}`` (what pytrec_eval and ir-measures take). TREC run
files hold one line per retrieved document: ``query_id Q0 doc_id rank score tag``.
"""

from __future__ import annotations

import gzip
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from imrnns._atomic import atomic_file
from imrnns.data import MAX_GRADE

__all__ = [
    "DEFAULT_METRICS",
    "METRICS",
    "bootstrap_ci",
    "evaluate_run",
    "holm",
    "mean_metrics",
    "paired_tests",
    "parse_metrics",
    "prepare_run",
    "read_trec_run",
    "run_from_results",
    "write_trec_run",
]

DEFAULT_METRICS = ("nDCG@10", "Recall@100", "MRR@10")
METRICS = DEFAULT_METRICS  # the name the rest of the package has always imported
# trec_eval stores cut-offs in a C int; a cut-off below 1 aborts the whole process inside
# pytrec_eval (an assertion, not an exception), so both ends are refused up front.
_MAX_CUTOFF = 2**31 - 1
# Elements of one block of the randomisation / bootstrap draws: bounds their memory for any
# number of queries, and keeps a SciFact-sized test (300 x 10,000) in a single block, so its
# draws (and p-values) are those of one undivided call.
_DRAW_BLOCK = 1 << 22

Run = dict[str, dict[str, float]]


# ------------------------------------------------------------------------------- measures


def _ir_measures() -> Any:
    # Imported on first use: ir-measures registers every provider at import (~70 ms), which
    # the training loop and `import imrnns` need not pay.
    import ir_measures

    return ir_measures


def parse_metrics(
    metrics: str | Sequence[str] | Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Parse measure names into ``{name: ir_measures measure}``, in the order given.

    Args:
        metrics: a whitespace-separated string (``"nDCG@10 R@100 RR@10"``), a sequence of
            names, None for :data:`DEFAULT_METRICS`, or a dict this function returned.

    Raises:
        ValueError: an empty list, a name ir-measures does not know, a cut-off outside
            ``[1, 2^31 - 1]``, the same measure twice (``R@100`` and ``Recall@100``), or a
            measure no installed provider computes (checked on a one-query toy run, so a
            bad name fails before any encoding or search).
    """
    irm = _ir_measures()
    if isinstance(metrics, Mapping):  # already parsed
        return dict(metrics)
    if metrics is None:
        names = list(DEFAULT_METRICS)
    elif isinstance(metrics, str):
        names = metrics.split()
    elif isinstance(metrics, Sequence) and all(isinstance(m, str) for m in metrics):
        names = [m.strip() for m in metrics]
    else:
        raise TypeError(f"metrics must be a string or a sequence of strings, got {metrics!r}")
    if not names or any(not n for n in names):
        raise ValueError(f"metrics must name at least one measure, got {metrics!r}")
    parsed: dict[str, Any] = {}
    seen: dict[Any, str] = {}
    for name in names:
        try:
            measure = irm.parse_measure(name)
        except (NameError, ValueError, AssertionError, SyntaxError, TypeError) as exc:
            raise ValueError(
                f"unknown measure {name!r} ({exc}); measures are named as ir-measures names "
                "them, e.g. nDCG@10 R@100 RR@10 P@5 AP Success@10 P(rel=2)@5"
            ) from None
        cutoff = measure.params.get("cutoff")
        if isinstance(cutoff, (int, float)) and not 1 <= cutoff <= _MAX_CUTOFF:
            raise ValueError(f"measure {name!r}: cut-off must be in [1, {_MAX_CUTOFF}]")
        if measure in seen:
            raise ValueError(f"measure {name!r} repeats {seen[measure]!r} (the same measure)")
        seen[measure] = name
        parsed[name] = measure
    # One toy query checks that some installed provider computes every measure.
    _calc(parsed, {"1": {"d": 1}}, {"1": {"d": 1.0}})
    return parsed


def metric_depth(metrics: Mapping[str, Any], default: int) -> int:
    """How deep a run must be for ``metrics``: the largest cut-off, at least ``default``.

    A measure without a cut-off (``AP``, ``RR``, ``nDCG``) sees the whole run it is given,
    so its value depends on the depth the caller chooses (``default``).
    """
    cutoffs = [m.params.get("cutoff") for m in metrics.values()]
    ints = [int(c) for c in cutoffs if isinstance(c, int) and not isinstance(c, bool)]
    return max([default, *ints])


def _calc(
    measures: Mapping[str, Any],
    qrels: Mapping[str, Mapping[str, int]],
    run: Mapping[str, Mapping[str, float]],
) -> dict[str, dict[str, float]]:
    """``{qid: {name: value}}`` from ir-measures; provider failures become ValueError."""
    irm = _ir_measures()
    by_measure = {m: name for name, m in measures.items()}
    out: dict[str, dict[str, float]] = {}
    try:
        evaluator = irm.evaluator(list(measures.values()), qrels)
        for metric in evaluator.iter_calc(run):
            out.setdefault(metric.query_id, {})[by_measure[metric.measure]] = float(metric.value)
    except Exception as exc:  # providers raise anything (perl exit codes, C-level TypeErrors)
        names = " ".join(measures)
        raise ValueError(f"ir-measures could not compute {names}: {exc}") from exc
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


# ------------------------------------------------------------------------------- runs


def run_from_results(
    query_ids: Sequence[str],
    doc_ids: Sequence[str],
    scores: np.ndarray,
    ids: np.ndarray,
    *,
    keep_scores: bool = False,
) -> Run:
    """A TREC run ``{qid: {docid: score}}`` from (B, k) search results; ``-1`` ids are padding.

    With ``keep_scores=False`` the scores are rank-derived (``k - rank``), so the run keeps
    the search's own order exactly, ties included. With ``keep_scores=True`` it holds the
    search scores (float), and ties are then ordered by document id wherever it is scored
    or written (:func:`prepare_run`).
    """
    if len(query_ids) != scores.shape[0] or scores.shape != ids.shape:
        raise ValueError(
            f"{len(query_ids)} query ids for scores {scores.shape} and ids {ids.shape}"
        )
    run: Run = {}
    for qid, row_scores, row_ids in zip(query_ids, scores, ids, strict=True):
        kept = [(int(i), float(s)) for i, s in zip(row_ids, row_scores, strict=True) if i >= 0]
        if keep_scores:
            run[qid] = {doc_ids[i]: s for i, s in kept}
        else:
            run[qid] = {doc_ids[i]: float(len(kept) - r) for r, (i, _) in enumerate(kept)}
    return run


def _ranked(qid: str, docs: Mapping[str, float]) -> list[tuple[str, float]]:
    """One query's documents, best first: score descending, ties by document id ascending."""
    for d, s in docs.items():
        if isinstance(s, bool) or not isinstance(s, (int, float, np.integer, np.floating)):
            raise ValueError(f"run score of ({qid!r}, {d!r}) must be a number, got {s!r}")
        if not math.isfinite(s):
            raise ValueError(f"run scores must be finite: query {qid!r}, document {d!r}")
    return sorted(((str(d), float(s)) for d, s in docs.items()), key=lambda kv: (-kv[1], kv[0]))


def prepare_run(
    run: Mapping[str, Mapping[str, float]],
    *,
    ignore_identical_ids: bool = False,
    depth: int | None = None,
) -> Run:
    """The run as it is scored: each query's documents ranked (score descending, ties by
    document id), without the query's own id when ``ignore_identical_ids``, cut to ``depth``.

    ``ignore_identical_ids`` is BEIR's ``EvaluateRetrieval`` option: a corpus that holds the
    queries themselves (ArguAna, Quora) would otherwise count each query's own document, which
    is never judged. It drops only an exact id match; default off (SciFact's query and document
    ids are distinct numbers with different meanings, and nothing is dropped).
    """
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int) or depth < 1):
        raise ValueError(f"depth must be a positive int or None, got {depth!r}")
    out: Run = {}
    for qid, docs in run.items():
        ranked = _ranked(qid, docs)
        if ignore_identical_ids:
            ranked = [(d, s) for d, s in ranked if d != qid]
        out[str(qid)] = dict(ranked[:depth])
    return out


def evaluate_run(
    qrels: Mapping[str, Mapping[str, int]],
    run: Mapping[str, Mapping[str, float]],
    metrics: str | Sequence[str] | Mapping[str, Any] | None = None,
    *,
    ignore_identical_ids: bool = False,
    depth: int | None = None,
) -> dict[str, dict[str, float]]:
    """Per-query ``{qid: {metric: value}}`` for the queries in ``qrels``.

    Args:
        qrels: ``{qid: {doc_id: grade}}``, integer grades (``rel > 0`` is relevant).
        run: ``{qid: {doc_id: score}}``; queries not in ``qrels`` are ignored.
        metrics: measure names (see :func:`parse_metrics`; default ``DEFAULT_METRICS``), or
            the dict :func:`parse_metrics` returns.
        ignore_identical_ids, depth: see :func:`prepare_run`.

    A query of ``qrels`` missing from ``run`` scores 0 on every metric (trec_eval would drop
    it and inflate the mean). Raises ValueError on a non-finite score or grade, and on a
    measure that comes out NaN.
    """
    measures = metrics if isinstance(metrics, Mapping) else parse_metrics(metrics)
    qrels = {q: {d: _grade(q, d, r) for d, r in docs.items()} for q, docs in qrels.items()}
    ranked = prepare_run(
        {q: run.get(q, {}) for q in qrels},
        ignore_identical_ids=ignore_identical_ids,
        depth=depth,
    )
    # Rank-derived scores: every provider then sees the one order of _ranked.
    ordered = {
        q: {d: float(len(docs) - r) for r, d in enumerate(docs)} for q, docs in ranked.items()
    }
    values = _calc(measures, qrels, ordered) if qrels else {}
    out: dict[str, dict[str, float]] = {}
    for q in qrels:
        row = values.get(q, {})
        out[q] = {name: row.get(name, 0.0) for name in measures}
        bad = [name for name, v in out[q].items() if not math.isfinite(v)]
        if bad:
            raise ValueError(f"measure {bad[0]} is {out[q][bad[0]]} for query {q!r}")
    return out


def mean_metrics(
    per_query: Mapping[str, Mapping[str, float]],
    query_ids: Sequence[str] | None = None,
    metrics: Sequence[str] | None = None,
) -> dict[str, float]:
    """Mean of each metric over ``query_ids`` (default: all queries); NaN for no queries.

    ``metrics`` defaults to the names in ``per_query`` (``DEFAULT_METRICS`` when empty).
    """
    qids = list(per_query) if query_ids is None else list(query_ids)
    if metrics is None:
        first = next(iter(per_query.values()), None)
        metrics = list(first) if first is not None else list(DEFAULT_METRICS)
    if not qids:
        return {m: math.nan for m in metrics}
    return {m: float(np.mean([per_query[q][m] for q in qids])) for m in metrics}


# ------------------------------------------------------------------------------- TREC files


def _check_token(kind: str, value: str) -> str:
    if not isinstance(value, str) or not value or any(c.isspace() for c in value):
        raise ValueError(
            f"{kind} {value!r} cannot be written to a TREC run: it must be a non-empty "
            "string without whitespace"
        )
    return value


def write_trec_run(
    path: str | Path, run: Mapping[str, Mapping[str, float]], tag: str = "imrnns"
) -> Path:
    """Write ``run`` as a TREC run file, atomically; return the path.

    One line per document: ``query_id Q0 doc_id rank score tag``, rank from 1. Queries in
    sorted id order; each query's documents by score descending, ties by document id
    ascending (the order :func:`evaluate_run` scores), so equal runs give identical bytes.
    Scores are written with ``repr`` (shortest round-trip form), so reading the file back
    gives the same floats. A path ending in ``.gz`` is gzip-compressed.
    """
    _check_token("tag", tag)
    lines: list[str] = []
    for qid in sorted(run, key=str):
        _check_token("query id", qid)
        for rank, (doc, score) in enumerate(_ranked(qid, run[qid]), start=1):
            _check_token("document id", doc)
            lines.append(f"{qid} Q0 {doc} {rank} {score!r} {tag}\n")
    path = Path(path)
    data = "".join(lines).encode("utf-8")
    with atomic_file(path, "wb") as fh:
        fh.write(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)
    return path


def read_trec_run(path: str | Path) -> Run:
    """Read a TREC run file (``query_id Q0 doc_id rank score tag``; ``.gz`` accepted).

    The score column orders each query's documents (the rank column is checked to be an
    integer and otherwise ignored, as trec_eval ignores it). Raises ValueError naming the
    file and line for a line without 6 columns, a score that is not a finite number, a rank
    that is not an integer, a document listed twice for one query, or a file with no lines.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"TREC run file not found: {path}")
    run: Run = {}
    with gzip.open(path, "rt") if path.suffix == ".gz" else path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(_lines(fh, path), start=1):
            if not line.strip():
                continue
            cols = line.split()
            if len(cols) != 6:
                raise ValueError(
                    f"{path}:{lineno}: expected 6 whitespace-separated columns "
                    f"(query_id Q0 doc_id rank score tag), got {len(cols)}"
                )
            qid, _, doc, rank, score_text, _ = cols
            try:
                int(rank)
            except ValueError:
                raise ValueError(f"{path}:{lineno}: rank {rank!r} is not an integer") from None
            try:
                score = float(score_text)
            except ValueError:
                score = math.nan
            if not math.isfinite(score):
                raise ValueError(f"{path}:{lineno}: score {score_text!r} is not a finite number")
            docs = run.setdefault(qid, {})
            if doc in docs:
                raise ValueError(f"{path}:{lineno}: document {doc!r} listed twice for {qid!r}")
            docs[doc] = score
    if not run:
        raise ValueError(f"{path}: the TREC run file has no lines")
    return run


def _lines(fh: Iterable[str], path: Path) -> Iterable[str]:
    try:
        yield from fh
    except (UnicodeDecodeError, OSError, EOFError) as exc:
        # A binary or truncated file: name it instead of a bare codec/gzip error.
        raise ValueError(f"{path}: not a readable TREC run file ({exc})") from None


# ------------------------------------------------------------------------------- statistics


def _paired(a: Sequence[float], b: Sequence[float], what: str) -> tuple[np.ndarray, np.ndarray]:
    """``a`` and ``b`` as float64 arrays after the checks every paired statistic needs."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 2:
        raise ValueError(f"{what} need two equal-length lists (>= 2), got {x.shape}, {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError(f"{what} need finite per-query values (got NaN or Inf)")
    return x, y


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def paired_tests(
    a: Sequence[float], b: Sequence[float], *, permutations: int = 10000, seed: int = 0
) -> dict[str, float]:
    """Paired significance of ``mean(b) - mean(a)``: two-sided t-test and randomisation test.

    Returns ``{"delta", "t", "p_ttest", "p_randomisation"}``. The randomisation test flips
    the sign of each per-query difference at random (Smucker et al., 2007):
    ``p = (#{|mean(s * d)| >= |mean(d)|} + 1) / (permutations + 1)``.
    """
    # 0 would report p = 1.0 from no samples at all.
    _positive_int("permutations", permutations)
    x, y = _paired(a, b, "paired tests")
    d = y - x
    delta = float(d.mean())
    if float(d.std()) == 0.0:  # scipy returns NaN for identical lists; the answer is known
        t, p_t = (0.0, 1.0) if delta == 0.0 else (math.copysign(math.inf, delta), 0.0)
    else:
        res = stats.ttest_rel(y, x)
        t, p_t = float(res.statistic), float(res.pvalue)
    rng = np.random.default_rng(seed)
    rows = max(1, _DRAW_BLOCK // len(d))
    hits = 0
    for start in range(0, permutations, rows):
        signs = rng.choice((-1.0, 1.0), size=(min(rows, permutations - start), len(d)))
        null = np.abs((signs * d).mean(axis=1))
        hits += int(np.sum(null >= abs(delta) - 1e-15))
    p_r = float((hits + 1) / (permutations + 1))
    return {"delta": delta, "t": float(t), "p_ttest": float(p_t), "p_randomisation": p_r}


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of ``m`` p-values (family-wise error rate), input order.

    With ``p_(1) <= ... <= p_(m)`` sorted ascending, the adjusted value of the ``i``-th is
    ``max_{j <= i} min(1, (m - j + 1) p_(j))``; rejecting where it is below ``alpha`` is
    Holm's procedure at level ``alpha`` under any dependence between the tests.
    """
    p = np.asarray(list(p_values), dtype=np.float64)
    if p.ndim != 1 or not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise ValueError(f"p-values must be a list of numbers in [0, 1], got {list(p_values)!r}")
    m = len(p)
    order = np.argsort(p, kind="stable")
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adjusted = np.empty(m)
    adjusted[order] = np.maximum.accumulate(scaled)
    return [float(v) for v in adjusted]


def bootstrap_ci(
    a: Sequence[float],
    b: Sequence[float],
    *,
    resamples: int = 10000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Paired percentile bootstrap interval of ``mean(b) - mean(a)``.

    Each of ``resamples`` draws takes ``n`` queries with replacement (the same queries for
    ``a`` and ``b``: paired) and records the mean difference; the interval is the
    ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of those means. The same seed and
    ``n`` draw the same queries, so intervals of several metrics share their resamples.
    Memory is bounded (draws in blocks); cost ``resamples * n``.
    """
    _positive_int("resamples", resamples)
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    x, y = _paired(a, b, "bootstrap intervals")
    d = y - x
    n = len(d)
    rng = np.random.default_rng(seed)
    rows = max(1, _DRAW_BLOCK // n)
    means = np.empty(resamples)
    for start in range(0, resamples, rows):
        stop = min(resamples, start + rows)
        means[start:stop] = d[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)
