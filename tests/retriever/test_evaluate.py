"""Evaluation: base and IMRNN runs through pytrec_eval, subsets, significance, files, errors."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from imrnns import IMRNN, IMRNNConfig
from imrnns.data import BeirDataset
from imrnns.evaluate import (
    EmbeddedSplit,
    base_search,
    evaluate_beir,
    evaluate_embeddings,
    format_table,
    imrnn_search,
    write_per_query,
)

pytestmark = pytest.mark.usefixtures("cpu_backend_one_thread")


def _log2(x: float) -> float:
    return math.log(x, 2)


def tiny_split() -> EmbeddedSplit:
    """4 documents on the axes of R^4, 3 queries whose base rankings are known exactly.

    q0 = (0.9, 0.5, 0.1, 0): ranking d0, d1, d2, d3 (d3 has score 0, last).
    q1 = (0.1, 0.2, 0.9, 0.3): ranking d2, d3, d1, d0.
    q2 = (0, 0.6, 0, 0.8): ranking d3, d1, then d0 / d2 tied at 0.
    """
    corpus = np.eye(4, dtype=np.float32)
    queries = np.array(
        [[0.9, 0.5, 0.1, 0.0], [0.1, 0.2, 0.9, 0.3], [0.0, 0.6, 0.0, 0.8]], dtype=np.float32
    )
    qrels = {
        "q0": {"d1": 1},  # rank 2
        "q1": {"d2": 2, "d0": 1},  # ranks 1 and 4
        "q2": {"d3": 1, "d1": 1},  # ranks 1 and 2
    }
    ds = BeirDataset("tiny", "test", ["d0", "d1", "d2", "d3"], ["a", "b", "c", "d"],
                     ["q0", "q1", "q2"], ["x", "y", "z"], qrels)  # fmt: skip
    return EmbeddedSplit(ds, corpus, queries, encoder="tiny")


def test_base_metrics_match_hand_computed_rankings() -> None:
    result = evaluate_embeddings(tiny_split(), None)
    pq = result["per_query"]["base"]
    assert pq["q0"]["nDCG@10"] == pytest.approx(1 / _log2(3), abs=1e-6)
    assert pq["q0"]["MRR@10"] == pytest.approx(0.5)
    # q1: grade 2 at rank 1, grade 1 at rank 4; ideal: 2 then 1.
    expected = (2 + 1 / _log2(5)) / (2 + 1 / _log2(3))
    assert pq["q1"]["nDCG@10"] == pytest.approx(expected, abs=1e-6)
    assert pq["q2"]["nDCG@10"] == pytest.approx(1.0)
    assert all(pq[q]["Recall@100"] == 1.0 for q in pq)
    base = result["base"]
    assert base["nDCG@10"] == pytest.approx(np.mean([pq[q]["nDCG@10"] for q in pq]))
    assert base["MRR@10"] == pytest.approx((0.5 + 1 + 1) / 3)
    assert base["num_queries"] == 3 and "imrnn" not in result
    assert "seen_doc" not in base  # no training qrels given


def test_subsets_and_significance() -> None:
    split = tiny_split()
    model = IMRNN(IMRNNConfig(input_dim=4))
    result = evaluate_embeddings(
        split, model, feedback_k=4, train_qrels={"t": {"d1": 1}}, permutations=500
    )
    assert result["subsets"]["seen_doc"] == ["q0", "q2"]  # their relevant d1 is seen
    assert result["subsets"]["unseen_doc"] == ["q1"]
    for mode in ("rerank", "exhaustive"):
        summary = result["imrnn"][mode]
        assert summary["seen_doc"]["num_queries"] == 2
        assert summary["unseen_doc"]["num_queries"] == 1
        sig = summary["significance"]
        assert set(sig) == {"overall", "seen_doc"}  # a 1-query subset has no test
        for tests in sig.values():
            for m in ("nDCG@10", "Recall@100", "MRR@10"):
                assert 0.0 <= tests[m]["p_ttest"] <= 1.0
                assert 0.0 < tests[m]["p_randomisation"] <= 1.0
    json.dumps(result)  # plain, JSON-serialisable
    table = format_table(result)
    assert "imrnn-exhaustive" in table and "unseen_doc" in table


def test_rerank_matches_direct_model_scoring_and_exhaustive_with_full_feedback() -> None:
    rng = np.random.default_rng(0)
    n_docs, dim = 60, 12
    corpus = rng.standard_normal((n_docs, dim)).astype(np.float32)
    queries = rng.standard_normal((5, dim)).astype(np.float32)
    torch.manual_seed(0)
    model = IMRNN(IMRNNConfig(input_dim=dim))
    with torch.no_grad():  # move away from the identity so reranking changes the order
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    kf = 20
    s, ids = imrnn_search(model, corpus, queries, mode="rerank", k=kf, feedback_k=kf)
    _, fb = base_search(corpus, queries, kf)
    direct = model.score(torch.from_numpy(queries), torch.from_numpy(corpus[fb]))
    for b in range(len(queries)):
        order = torch.argsort(direct[b], descending=True, stable=True)
        np.testing.assert_array_equal(ids[b], fb[b][order.numpy()])
        np.testing.assert_allclose(s[b], direct[b][order].numpy(), atol=1e-5)
    # With every document in the feedback set, rerank and exhaustive rank the same set.
    sr, ir = imrnn_search(model, corpus, queries, mode="rerank", k=10, feedback_k=n_docs)
    se, ie = imrnn_search(model, corpus, queries, mode="exhaustive", k=10, feedback_k=n_docs)
    np.testing.assert_array_equal(ir, ie)
    np.testing.assert_allclose(sr, se, atol=1e-5)


def test_imrnn_search_restores_training_mode() -> None:
    model = IMRNN(IMRNNConfig(input_dim=4)).train()
    split = tiny_split()
    imrnn_search(model, split.corpus, split.queries, k=2, feedback_k=2)
    assert model.training


def test_write_per_query_tsv_and_json(tmp_path: Path) -> None:
    result = evaluate_embeddings(
        tiny_split(), IMRNN(IMRNNConfig(input_dim=4)), modes="rerank", feedback_k=4,
        train_qrels={"t": {"d1": 1}}, permutations=100,
    )  # fmt: skip
    tsv = write_per_query(tmp_path / "pq.tsv", result)
    rows = list(csv.DictReader(tsv.open(), delimiter="\t"))
    assert len(rows) == 3 * 2  # 3 queries x (base, imrnn-rerank)
    assert {r["system"] for r in rows} == {"base", "imrnn-rerank"}
    q1 = next(r for r in rows if r["query_id"] == "q1" and r["system"] == "base")
    assert q1["subset"] == "unseen_doc"
    assert float(q1["nDCG@10"]) == pytest.approx(result["per_query"]["base"]["q1"]["nDCG@10"],
                                                 abs=1e-6)  # fmt: skip
    js = json.loads(write_per_query(tmp_path / "pq.json", result).read_text())
    assert js["subsets"]["seen_doc"] == ["q0", "q2"]
    assert js["per_query"]["imrnn-rerank"]["q0"].keys() == {"nDCG@10", "Recall@100", "MRR@10"}


# ----------------------------------------------------------------------------- BEIR folder


def _beir(root: Path, train_qrels: str | None = "query-id\tcorpus-id\tscore\nt0\td1\t1\n") -> Path:
    root.mkdir(parents=True)
    docs = [{"_id": f"d{i}", "title": "", "text": f"doc {i}"} for i in range(4)]
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    queries = [{"_id": q, "text": q} for q in ("q0", "q1", "q2", "t0")]
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (root / "qrels").mkdir()
    test = "query-id\tcorpus-id\tscore\nq0\td1\t1\nq1\td2\t2\nq1\td0\t1\nq2\td3\t1\nq2\td1\t1\n"
    (root / "qrels" / "test.tsv").write_text(test)
    if train_qrels is not None:
        (root / "qrels" / "train.tsv").write_text(train_qrels)
    return root


def test_evaluate_beir_with_checkpoint_directory(tmp_path: Path) -> None:
    root = _beir(tmp_path / "beir")
    ckpt = IMRNN(IMRNNConfig(input_dim=4)).save_pretrained(tmp_path / "adapter")
    out = evaluate_beir(
        root, ckpt, embedded=tiny_split(), feedback_k=4, per_query_path=tmp_path / "pq.tsv",
        permutations=100,
    )  # fmt: skip
    assert out["train_split"] == "train"
    assert out["base"]["seen_doc"]["num_queries"] == 2
    assert set(out["imrnn"]) == {"rerank", "exhaustive"}
    assert out["checkpoint"] == str(ckpt) and "per_query" not in out
    assert (tmp_path / "pq.tsv").is_file()
    json.dumps(out)
    # Base only, and a folder without a train split: overall numbers only.
    root2 = _beir(tmp_path / "beir2", train_qrels=None)
    base_only = evaluate_beir(root2, None, embedded=tiny_split())
    assert base_only["train_split"] is None and "seen_doc" not in base_only["base"]
    assert "imrnn" not in base_only


def test_evaluate_beir_errors(tmp_path: Path) -> None:
    root = _beir(tmp_path / "beir", train_qrels="query-id\tcorpus-id\tscore\nt0\td1\t1\tx\n")
    with pytest.raises(ValueError, match=r"train.tsv:2: expected 3 tab-separated columns"):
        evaluate_beir(root, None, embedded=tiny_split())
    good = _beir(tmp_path / "good")
    with pytest.raises(ValueError, match="expects 8-d embeddings but the encoder gives 4-d"):
        evaluate_beir(good, IMRNN(IMRNNConfig(input_dim=8)), embedded=tiny_split())
    with pytest.raises(ValueError, match="modes must be"):
        evaluate_embeddings(tiny_split(), IMRNN(IMRNNConfig(input_dim=4)), modes=("fast",))
    with pytest.raises(ValueError, match="feedback_k"):
        evaluate_embeddings(tiny_split(), None, feedback_k=0)
    with pytest.raises(FileNotFoundError):
        evaluate_beir(tmp_path / "missing", None)


def test_embedded_split_validates_its_arrays() -> None:
    split = tiny_split()
    with pytest.raises(ValueError, match="corpus has 3 rows"):
        EmbeddedSplit(split.dataset, split.corpus[:3], split.queries)
    bad = split.queries.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        EmbeddedSplit(split.dataset, split.corpus, bad)
    with pytest.raises(ValueError, match="same encoder"):
        EmbeddedSplit(split.dataset, split.corpus, np.zeros((3, 5), dtype=np.float32))


def test_duplicate_query_ids_are_refused() -> None:
    # A repeated id counted twice in every mean (num_queries 3 for 2 distinct queries).
    with pytest.raises(ValueError, match=r"query_ids has duplicates: \['q0'\]"):
        evaluate_embeddings(tiny_split(), None, query_ids=["q0", "q1", "q0"])


def test_main_json_is_strict_when_a_subset_is_empty(tmp_path: Path, monkeypatch, capsys) -> None:
    """An empty seen-doc subset has NaN means; ``--json`` wrote the bare token NaN (not JSON)."""
    import imrnns.cli.evaluate as ev

    root = _beir(tmp_path / "beir", train_qrels="query-id\tcorpus-id\tscore\nt0\td1\t0\n")
    real = ev.evaluate_beir
    monkeypatch.setattr(
        ev, "evaluate_beir", lambda *a, **k: real(*a, **{**k, "embedded": tiny_split()})
    )
    assert ev.main(["--data", str(root), "--json", "--permutations", "50"]) == 0

    def strict(token: str) -> None:
        raise AssertionError(f"non-JSON token {token}")

    out = json.loads(capsys.readouterr().out, parse_constant=strict)
    assert out["base"]["seen_doc"] == {
        "nDCG@10": None, "Recall@100": None, "MRR@10": None, "num_queries": 0,
    }  # fmt: skip
    assert out["base"]["unseen_doc"]["num_queries"] == 3
