"""imrnns.metrics against rankings whose nDCG@10 / Recall@100 / MRR@10 are worked out by hand.

trec_eval (and so BEIR) computes nDCG with the *linear* gain ``rel`` and discount
``log2(rank + 1)``; Recall@100 counts documents with ``rel > 0`` in the top 100; MRR@10 is
the reciprocal rank of the first relevant document within the top 10, else 0.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from imrnns.metrics import METRICS, evaluate_run, mean_metrics, paired_tests, run_from_results


def _log2(x: float) -> float:
    return math.log(x, 2)


def _ranked(*doc_ids: str) -> dict[str, float]:
    """A run row with strictly decreasing scores in the given order."""
    return {d: float(len(doc_ids) - i) for i, d in enumerate(doc_ids)}


def test_binary_relevance_by_hand() -> None:
    qrels = {"q": {"d1": 1, "d2": 1}}
    run = {"q": _ranked("d3", "d1", "d4", "d2")}
    got = evaluate_run(qrels, run)["q"]
    dcg = 1 / _log2(3) + 1 / _log2(5)  # d1 at rank 2, d2 at rank 4
    idcg = 1 + 1 / _log2(3)
    assert got["nDCG@10"] == pytest.approx(dcg / idcg, abs=1e-6)  # 0.650921
    assert got["nDCG@10"] == pytest.approx(0.650921, abs=1e-6)
    assert got["Recall@100"] == pytest.approx(1.0)
    assert got["MRR@10"] == pytest.approx(0.5)


def test_graded_relevance_uses_linear_gain() -> None:
    # d1 is grade 2, d2 grade 1, d5 judged non-relevant (grade 0).
    qrels = {"q": {"d1": 2, "d2": 1, "d5": 0}}
    run = {"q": _ranked("d2", "d5", "d1")}
    got = evaluate_run(qrels, run)["q"]
    dcg = 1 / _log2(2) + 0 + 2 / _log2(4)  # = 2.0
    idcg = 2 / _log2(2) + 1 / _log2(3)
    assert got["nDCG@10"] == pytest.approx(dcg / idcg, abs=1e-6)  # 0.760193
    assert got["Recall@100"] == pytest.approx(1.0)  # both rel > 0 documents retrieved
    assert got["MRR@10"] == pytest.approx(1.0)  # d2 (grade 1) is relevant at rank 1


def test_cutoffs_at_10_and_100() -> None:
    docs = [f"x{i}" for i in range(120)]
    # Relevant documents at ranks 11 and 101 (1-based).
    docs[10], docs[100] = "r1", "r2"
    qrels = {"q": {"r1": 1, "r2": 1}}
    got = evaluate_run(qrels, {"q": _ranked(*docs)})["q"]
    assert got["nDCG@10"] == 0.0  # nothing relevant in the top 10
    assert got["MRR@10"] == 0.0  # recip_rank would be 1/11 without the cut
    assert got["Recall@100"] == pytest.approx(0.5)  # r1 in the top 100, r2 at rank 101


def test_query_missing_from_run_scores_zero_and_counts_in_mean() -> None:
    qrels = {"a": {"d1": 1}, "b": {"d2": 1}}
    run = {"a": _ranked("d1")}
    per_query = evaluate_run(qrels, run)
    assert per_query["b"] == {"nDCG@10": 0.0, "Recall@100": 0.0, "MRR@10": 0.0}
    assert mean_metrics(per_query) == {"nDCG@10": 0.5, "Recall@100": 0.5, "MRR@10": 0.5}
    assert mean_metrics(per_query, ["a"]) == {"nDCG@10": 1.0, "Recall@100": 1.0, "MRR@10": 1.0}
    assert all(math.isnan(v) for v in mean_metrics(per_query, []).values())


def test_run_from_results_keeps_rank_order_despite_ties_and_padding() -> None:
    doc_ids = ["d0", "d1", "d2", "d3"]
    # Tied scores: our order (d2 before d1) must survive; trec_eval alone would re-sort
    # ties by document id and put d1 first.
    scores = np.array([[0.5, 0.5, 0.1, -np.inf]], dtype=np.float32)
    ids = np.array([[2, 1, 3, -1]])
    run = run_from_results(["q"], doc_ids, scores, ids)
    assert list(run["q"]) == ["d2", "d1", "d3"]  # -1 padding dropped
    got = evaluate_run({"q": {"d1": 1}}, run)["q"]
    assert got["MRR@10"] == pytest.approx(0.5)
    assert got["nDCG@10"] == pytest.approx(1 / _log2(3), abs=1e-6)


def test_run_from_results_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="query ids"):
        run_from_results(["a", "b"], ["d0"], np.zeros((1, 1)), np.zeros((1, 1), dtype=int))
    with pytest.raises(ValueError, match="query ids"):
        run_from_results(["a"], ["d0"], np.zeros((1, 2)), np.zeros((1, 1), dtype=int))


def test_mean_over_several_queries_by_hand() -> None:
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}, "q3": {"c": 1}}
    run = {"q1": _ranked("a", "x"), "q2": _ranked("x", "y", "b"), "q3": _ranked("x", "y")}
    means = mean_metrics(evaluate_run(qrels, run))
    assert means["MRR@10"] == pytest.approx((1 + 1 / 3 + 0) / 3)
    assert means["nDCG@10"] == pytest.approx((1 + 1 / _log2(4) + 0) / 3)
    assert means["Recall@100"] == pytest.approx(2 / 3)
    assert set(means) == set(METRICS)


def test_paired_tests_t_statistic_by_hand() -> None:
    a = [1.0, 2.0, 3.0, 4.0]
    b = [2.0, 2.0, 5.0, 5.0]
    # d = [1, 0, 2, 1]: mean 1, sample sd sqrt(2/3), t = 1 / (sd / sqrt(4)) = sqrt(6).
    out = paired_tests(a, b, permutations=2000, seed=1)
    assert out["delta"] == pytest.approx(1.0)
    assert out["t"] == pytest.approx(math.sqrt(6.0))
    assert out["p_ttest"] == pytest.approx(2 * stats.t.sf(math.sqrt(6.0), df=3))
    # Sign flips of [1, 0, 2, 1]: |mean| >= 1 only for all-equal signs on the non-zero
    # entries (the zero's sign is free): 2 * 2 / 16 = 0.25.
    assert out["p_randomisation"] == pytest.approx(0.25, abs=0.03)


def test_paired_tests_identical_and_constant_shift() -> None:
    same = paired_tests([0.1, 0.2, 0.3], [0.1, 0.2, 0.3])
    assert same["delta"] == 0.0 and same["p_ttest"] == 1.0 and same["p_randomisation"] == 1.0
    shift = paired_tests([0.0] * 4, [1.0] * 4, permutations=4000)
    assert shift["delta"] == 1.0 and shift["p_ttest"] == 0.0
    assert shift["p_randomisation"] == pytest.approx(2 / 16, abs=0.02)  # all-same signs only


def test_paired_tests_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="equal-length"):
        paired_tests([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="equal-length"):
        paired_tests([1.0], [1.0])


@pytest.mark.parametrize(
    "grade",
    [1.5, 0.9, True, "1", math.nan, 2**32, 2**40, -(2**31) - 1],
)
def test_evaluate_run_rejects_bad_grades(grade: object) -> None:
    # int() truncated 1.5 and 0.9; pytrec_eval wrapped 2^32 to 0 (nDCG 0), made
    # -(2^31 + 1) relevant, and crashed the process (segfault) on 2^40.
    with pytest.raises(ValueError, match=r"qrels grade of \('q', 'b'\)"):
        evaluate_run({"q": {"b": grade}}, {"q": _ranked("a", "b")})


def test_evaluate_run_accepts_integral_grades_of_any_numeric_type() -> None:
    run = {"q": _ranked("a", "b")}
    expected = evaluate_run({"q": {"b": 2}}, run)
    assert evaluate_run({"q": {"b": 2.0}}, run) == expected
    assert evaluate_run({"q": {"b": np.int64(2)}}, run) == expected


def test_evaluate_run_rejects_non_finite_run_scores() -> None:
    with pytest.raises(ValueError, match="run scores must be finite"):
        evaluate_run({"q": {"a": 1}}, {"q": {"a": math.nan, "b": 1.0}})


def test_paired_tests_rejects_nan_and_no_permutations() -> None:
    with pytest.raises(ValueError, match="finite"):
        paired_tests([0.1, math.nan], [0.2, 0.3])
    # 0 permutations reported p = 1.0 from no samples.
    for bad in (0, -5, 1.5, True):
        with pytest.raises(ValueError, match="permutations must be a positive int"):
            paired_tests([0.1, 0.2], [0.2, 0.3], permutations=bad)
