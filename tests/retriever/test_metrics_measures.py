"""Measures named as ir-measures names them, BEIR's ignore-identical-ids, Holm's correction,
the paired bootstrap, and the Holm marker and family of an evaluation.

Hand-computed values use trec_eval's definitions: nDCG with linear gain and ``log2(rank + 1)``
discount, ``P@k`` = relevant in the top k / k, AP = mean over relevant documents of the
precision at their rank (unretrieved relevant documents count 0).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import pytrec_eval

from imrnns import IMRNN, IMRNNConfig
from imrnns.data import BeirDataset
from imrnns.evaluate import EmbeddedSplit, evaluate_embeddings, format_table
from imrnns.metrics import (
    DEFAULT_METRICS,
    bootstrap_ci,
    evaluate_run,
    holm,
    mean_metrics,
    paired_tests,
    parse_metrics,
    prepare_run,
)

pytestmark = pytest.mark.usefixtures("cpu_backend_one_thread")


def _ranked(*doc_ids: str) -> dict[str, float]:
    return {d: float(len(doc_ids) - i) for i, d in enumerate(doc_ids)}


# ----------------------------------------------------------------------------- measure names


def test_any_measure_by_its_ir_measures_name_matches_hand_values() -> None:
    qrels = {"q": {"d1": 1, "d2": 2, "d9": 1}}  # d9 is never retrieved
    run = {"q": _ranked("x1", "d1", "x2", "d2", "x3", "x4")}
    got = evaluate_run(qrels, run, "nDCG@10 R@100 RR@10 P@5 AP P(rel=2)@5 Success@1")["q"]
    dcg = 1 / math.log2(3) + 2 / math.log2(5)
    idcg = 2 + 1 / math.log2(3) + 1 / math.log2(4)
    assert got["nDCG@10"] == pytest.approx(dcg / idcg, abs=1e-9)
    assert got["R@100"] == pytest.approx(2 / 3)
    assert got["RR@10"] == pytest.approx(1 / 2)
    assert got["P@5"] == pytest.approx(2 / 5)
    assert got["AP"] == pytest.approx((1 / 2 + 2 / 4) / 3)
    assert got["P(rel=2)@5"] == pytest.approx(1 / 5)
    assert got["Success@1"] == 0.0
    assert list(got) == ["nDCG@10", "R@100", "RR@10", "P@5", "AP", "P(rel=2)@5", "Success@1"]


def test_measures_agree_with_pytrec_eval_on_a_random_run() -> None:
    rng = np.random.default_rng(3)
    qrels = {f"q{i}": {f"d{j}": int(rng.integers(0, 3)) for j in range(0, 40, 3)} for i in range(8)}
    run = {q: {f"d{j}": float(rng.standard_normal()) for j in range(40)} for q in qrels}
    ours = evaluate_run(qrels, run, ["nDCG@10", "R@20", "P@5", "AP"])
    ref = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.20", "P.5", "map"})
    for q, row in ref.evaluate(run).items():
        assert ours[q]["nDCG@10"] == pytest.approx(row["ndcg_cut_10"], abs=1e-12)
        assert ours[q]["R@20"] == pytest.approx(row["recall_20"], abs=1e-12)
        assert ours[q]["P@5"] == pytest.approx(row["P_5"], abs=1e-12)
        assert ours[q]["AP"] == pytest.approx(row["map"], abs=1e-12)


def test_default_metrics_keep_beirs_keys_and_equal_the_ir_measures_names() -> None:
    qrels = {"q": {"d1": 1, "d2": 1}}
    run = {"q": _ranked("d3", "d1", "d4", "d2")}
    default = evaluate_run(qrels, run)["q"]
    assert list(default) == list(DEFAULT_METRICS) == ["nDCG@10", "Recall@100", "MRR@10"]
    named = evaluate_run(qrels, run, "nDCG@10 R@100 RR@10")["q"]
    assert list(named) == ["nDCG@10", "R@100", "RR@10"]  # reported under the names asked for
    assert [named[m] for m in named] == [default[m] for m in default]


def test_parse_metrics_refuses_bad_names_cutoffs_and_repeats() -> None:
    with pytest.raises(ValueError, match=r"unknown measure 'ndcg_cut_10'.*ir-measures"):
        parse_metrics("ndcg_cut_10")
    # R@0 aborted the interpreter inside pytrec_eval (a C assertion), so it never gets there.
    for bad in ("R@0", "P@0", "nDCG@2147483648"):
        with pytest.raises(ValueError, match="cut-off must be in"):
            parse_metrics(bad)
    with pytest.raises(ValueError, match=r"'Recall@100' repeats 'R@100'"):
        parse_metrics("R@100 Recall@100")
    with pytest.raises(ValueError, match="at least one measure"):
        parse_metrics("   ")
    with pytest.raises(TypeError, match="metrics must be"):
        parse_metrics(10)  # type: ignore[arg-type]
    # Known to ir-measures, but no installed provider computes it: refused up front.
    with pytest.raises(ValueError, match="could not compute alpha_nDCG@10"):
        parse_metrics("alpha_nDCG@10")


def test_ties_are_ordered_by_doc_id_for_every_measure() -> None:
    """trec_eval breaks ties by doc id descending, the MS MARCO RR code ascending: the same
    run scored RR 0.5 and RR@10 1.0 in one report. One order now: doc id ascending."""
    qrels = {"q": {"a": 1}}
    run = {"q": {"b": 1.0, "a": 1.0}}
    got = evaluate_run(qrels, run, "RR RR@10 nDCG@10 P@1")["q"]
    assert got == {"RR": 1.0, "RR@10": 1.0, "nDCG@10": 1.0, "P@1": 1.0}
    assert evaluate_run(qrels, run)["q"] == {"nDCG@10": 1.0, "Recall@100": 1.0, "MRR@10": 1.0}


def test_depth_cuts_measures_without_a_cutoff() -> None:
    qrels = {"q": {"d1": 1}}
    run = {"q": _ranked("x", "y", "d1")}
    assert evaluate_run(qrels, run, "AP")["q"]["AP"] == pytest.approx(1 / 3)
    assert evaluate_run(qrels, run, "AP", depth=2)["q"]["AP"] == 0.0
    with pytest.raises(ValueError, match="depth must be a positive int"):
        evaluate_run(qrels, run, "AP", depth=0)


def test_mean_metrics_follows_the_metrics_in_the_table() -> None:
    pq = evaluate_run({"a": {"d": 1}, "b": {"e": 1}}, {"a": _ranked("d")}, "P@1 AP")
    assert mean_metrics(pq) == {"P@1": 0.5, "AP": 0.5}
    assert all(math.isnan(v) for v in mean_metrics(pq, []).values())
    assert set(mean_metrics({}, [])) == set(DEFAULT_METRICS)


# ----------------------------------------------------------------------------- identical ids


def test_ignore_identical_ids_drops_the_query_own_document() -> None:
    qrels = {"q1": {"d2": 1}}
    run = {"q1": {"q1": 3.0, "d2": 2.0, "d3": 1.0}}
    kept = evaluate_run(qrels, run, "RR@10 P@1")["q1"]
    dropped = evaluate_run(qrels, run, "RR@10 P@1", ignore_identical_ids=True)["q1"]
    assert kept == {"RR@10": 0.5, "P@1": 0.0}
    assert dropped == {"RR@10": 1.0, "P@1": 1.0}
    assert list(prepare_run(run, ignore_identical_ids=True)["q1"]) == ["d2", "d3"]


def _self_retrieval_split() -> EmbeddedSplit:
    """An ArguAna-like corpus: the queries are also documents, under the same ids.

    Each query's own document is its nearest neighbour; its relevant document comes next.
    """
    corpus = np.array(
        [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.9, 0.3, 0.0], [0.2, 0.95, 0.1], [0, 0, 1.0]],
        dtype=np.float32,
    )
    doc_ids = ["qa", "qb", "da", "db", "dz"]
    queries = corpus[:2].copy()
    qrels = {"qa": {"da": 1}, "qb": {"db": 1}}
    ds = BeirDataset("selfref", "test", doc_ids, ["t"] * 5, ["qa", "qb"], ["x", "y"], qrels)
    return EmbeddedSplit(ds, corpus, queries, encoder="tiny")


def test_ignore_identical_ids_changes_an_evaluation_on_a_tiny_collection() -> None:
    split = _self_retrieval_split()
    kept = evaluate_embeddings(split, None, metrics="RR@10 P@1 R@1", permutations=50)
    dropped = evaluate_embeddings(
        split, None, metrics="RR@10 P@1 R@1", ignore_identical_ids=True, permutations=50
    )
    assert {m: kept["base"][m] for m in ("RR@10", "P@1", "R@1")} == {
        "RR@10": 0.5, "P@1": 0.0, "R@1": 0.0,
    }  # fmt: skip
    assert {m: dropped["base"][m] for m in ("RR@10", "P@1", "R@1")} == {
        "RR@10": 1.0, "P@1": 1.0, "R@1": 1.0,
    }  # fmt: skip
    assert dropped["ignore_identical_ids"] is True and kept["ignore_identical_ids"] is False


def test_ignore_identical_ids_still_scores_depth_documents() -> None:
    # depth 2: the search retrieves 3 so that 2 remain once the query's own id is dropped.
    split = _self_retrieval_split()
    out = evaluate_embeddings(
        split, None, metrics="NumRet", depth=2, ignore_identical_ids=True, permutations=50
    )
    assert out["base"]["NumRet"] == 2.0


# ----------------------------------------------------------------------------- Holm


def test_holm_by_hand() -> None:
    # Sorted: 0.005 x4 = 0.02, 0.01 x3 = 0.03, 0.03 x2 = 0.06, 0.04 x1 = 0.04 -> max so far 0.06.
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([0.2]) == [0.2] and holm([]) == []


def test_holm_equals_the_step_down_procedure_at_every_level() -> None:
    """Holm's procedure: walk p ascending, reject while p_(j) <= alpha / (m - j + 1), stop at
    the first acceptance. The adjusted p is below alpha exactly for the rejected tests."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        m = int(rng.integers(1, 12))
        p = rng.uniform(0, 0.2, m) ** 2
        adjusted = np.array(holm(p))
        assert (adjusted >= p - 1e-15).all() and (adjusted <= 1).all()
        for alpha in (0.001, 0.01, 0.05, 0.1):
            rejected = np.zeros(m, dtype=bool)
            for j, i in enumerate(np.argsort(p, kind="stable")):
                if p[i] > alpha / (m - j):
                    break
                rejected[i] = True
            np.testing.assert_array_equal(adjusted <= alpha, rejected)


def test_holm_matches_statsmodels() -> None:
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    p = [0.01, 0.04, 0.03, 0.005, 0.2, 0.0001]
    expected = multitest.multipletests(p, method="holm")[1]
    assert holm(p) == pytest.approx(list(expected), abs=1e-12)


@pytest.mark.parametrize("bad", [[0.1, math.nan], [1.2], [-0.1], [[0.1, 0.2]]])
def test_holm_rejects_bad_p_values(bad: list) -> None:
    with pytest.raises(ValueError, match="p-values must be"):
        holm(bad)


# ----------------------------------------------------------------------------- bootstrap


def test_bootstrap_interval_contains_the_difference_and_shrinks_with_n() -> None:
    rng = np.random.default_rng(1)

    def interval(n: int) -> tuple[float, float, float]:
        a = rng.uniform(0, 1, n)
        b = np.clip(a + rng.normal(0.05, 0.2, n), 0, 1)
        low, high = bootstrap_ci(a, b, resamples=2000, seed=0)
        return low, float((b - a).mean()), high

    small, large = interval(50), interval(800)
    for low, delta, high in (small, large):
        assert low < delta < high
    # The width falls like 1/sqrt(n): 16x the queries, about 1/4 of the width.
    assert (large[2] - large[0]) < 0.4 * (small[2] - small[0])


def test_bootstrap_is_the_percentile_of_paired_resampled_means() -> None:
    a = np.array([0.1, 0.5, 0.3, 0.9, 0.2, 0.7])
    b = np.array([0.2, 0.4, 0.8, 0.95, 0.3, 0.6])
    low, high = bootstrap_ci(a, b, resamples=500, level=0.9, seed=7)
    idx = np.random.default_rng(7).integers(0, 6, size=(500, 6))
    means = (b - a)[idx].mean(axis=1)
    assert (low, high) == tuple(np.quantile(means, [0.05, 0.95]))


def test_bootstrap_is_deterministic_under_a_seed() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.uniform(size=40), rng.uniform(size=40)
    assert bootstrap_ci(a, b, seed=3) == bootstrap_ci(a, b, seed=3)
    assert bootstrap_ci(a, b, seed=3) != bootstrap_ci(a, b, seed=4)
    same = bootstrap_ci(a, a, resamples=100)
    assert same == (0.0, 0.0)


def test_bootstrap_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="resamples must be a positive int"):
        bootstrap_ci([0.1, 0.2], [0.2, 0.3], resamples=0)
    with pytest.raises(ValueError, match="level must be in"):
        bootstrap_ci([0.1, 0.2], [0.2, 0.3], level=1.0)
    with pytest.raises(ValueError, match="equal-length"):
        bootstrap_ci([0.1, 0.2], [0.2])
    with pytest.raises(ValueError, match="finite"):
        bootstrap_ci([0.1, math.inf], [0.2, 0.3])


def test_bootstrap_memory_is_bounded_for_many_queries() -> None:
    # 200,000 queries x 10,000 resamples would be 16 GB of indices in one draw.
    rng = np.random.default_rng(0)
    a = rng.uniform(size=200_000)
    low, high = bootstrap_ci(a, a + 0.01, resamples=30, seed=0)
    assert low == pytest.approx(0.01) and high == pytest.approx(0.01)


def test_randomisation_p_of_a_scifact_sized_test_is_one_undivided_draw() -> None:
    """Blocked draws keep a 300-query, 10,000-permutation test in one block: the same p as
    the single ``rng.choice`` draw the README's p-values came from."""
    rng = np.random.default_rng(5)
    a, b = rng.uniform(size=300), rng.uniform(size=300) * 0.9 + 0.07
    d = b - a
    signs = np.random.default_rng(0).choice((-1.0, 1.0), size=(10000, 300))
    hits = np.sum(np.abs((signs * d).mean(axis=1)) >= abs(d.mean()) - 1e-15)
    assert paired_tests(a, b)["p_randomisation"] == (hits + 1) / 10001


# ----------------------------------------------------------------------------- in an evaluation


def _tiny() -> EmbeddedSplit:
    rng = np.random.default_rng(0)
    corpus = rng.standard_normal((30, 6)).astype(np.float32)
    queries = rng.standard_normal((8, 6)).astype(np.float32)
    doc_ids = [f"d{i}" for i in range(30)]
    qids = [f"q{i}" for i in range(8)]
    qrels = {q: {f"d{(3 * i + j) % 30}": 1 for j in range(3)} for i, q in enumerate(qids)}
    ds = BeirDataset("tiny", "test", doc_ids, ["t"] * 30, qids, ["x"] * 8, qrels)
    return EmbeddedSplit(ds, corpus, queries, encoder="tiny")


def _perturbed_model() -> IMRNN:
    import torch

    torch.manual_seed(0)
    model = IMRNN(IMRNNConfig(input_dim=6))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def test_every_reported_test_is_holm_adjusted_over_one_family() -> None:
    out = evaluate_embeddings(
        _tiny(), _perturbed_model(), feedback_k=10, metrics="nDCG@10 P@5",
        train_qrels={"t": {"d0": 1, "d1": 1, "d2": 1, "d9": 1}}, permutations=300,
        bootstrap=500,
    )  # fmt: skip
    tests = [
        (mode, subset, m, t)
        for mode, summary in out["imrnn"].items()
        for subset, block in summary["significance"].items()
        for m, t in block.items()
    ]
    assert out["tests"]["family_size"] == len(tests) == 2 * 3 * 2  # modes x subsets x metrics
    for key in ("p_ttest", "p_randomisation"):
        expected = holm([t[key] for *_, t in tests])
        assert [t[f"{key}_holm"] for *_, t in tests] == pytest.approx(expected)
    for _mode, subset, _metric, t in tests:
        assert ("ci_low" in t) == (subset == "overall")  # intervals for the headline
        if subset == "overall":
            assert t["ci_low"] <= t["delta"] <= t["ci_high"]
    again = evaluate_embeddings(
        _tiny(), _perturbed_model(), feedback_k=10, metrics="nDCG@10 P@5",
        train_qrels={"t": {"d0": 1, "d1": 1, "d2": 1, "d9": 1}}, permutations=300,
        bootstrap=500,
    )  # fmt: skip
    assert again["imrnn"] == out["imrnn"]  # seeded: the same numbers twice


def test_the_marker_uses_the_holm_adjusted_p() -> None:
    """Raw p 0.01 but Holm 0.06: no star (the table starred raw p < 0.05 before)."""
    test = {"delta": 0.1, "t": 2.0, "p_ttest": 0.01, "p_randomisation": 0.01,
            "p_ttest_holm": 0.06, "p_randomisation_holm": 0.06, "ci_low": 0.01,
            "ci_high": 0.2}  # fmt: skip
    summary = {"nDCG@10": 0.5, "num_queries": 10}
    result = {
        "metrics": ["nDCG@10"],
        "tests": {"alpha": 0.05, "family_size": 6, "bootstrap": {"level": 0.95}},
        "base": dict(summary),
        "imrnn": {"rerank": {**summary, "significance": {"overall": {"nDCG@10": test}}}},
    }
    table = format_table(result)
    assert "0.5000*" not in table and not table.rstrip().endswith("*")
    assert "[+0.0100, +0.2000]" in table and "0.06" in table
    test["p_randomisation_holm"] = 0.04
    starred = format_table(result)
    assert "0.5000*" in starred and starred.rstrip().endswith("*")
