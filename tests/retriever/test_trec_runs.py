"""TREC run files: written (atomic, deterministic, ties by doc id), read (errors name file
and line), scored as external runs through the API and both command lines, and a written
run scoring exactly as the evaluation that wrote it."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from imrnns import IMRNN, IMRNNConfig
from imrnns.data import BeirDataset
from imrnns.evaluate import (
    EmbeddedSplit,
    compare_runs,
    evaluate_beir,
    evaluate_embeddings,
    run_out_paths,
)
from imrnns.metrics import read_trec_run, write_trec_run

pytestmark = pytest.mark.usefixtures("cpu_backend_one_thread")


# ----------------------------------------------------------------------------- writing


def test_written_lines_are_sorted_ranked_and_tied_by_doc_id(tmp_path: Path) -> None:
    run = {"q2": {"z": 0.5, "b": 0.5, "a": 0.25}, "q10": {"d": 1.0}}
    path = write_trec_run(tmp_path / "r.trec", run, tag="sys")
    assert path.read_text() == (
        "q10 Q0 d 1 1.0 sys\n"  # queries in sorted id order ("q10" < "q2")
        "q2 Q0 b 1 0.5 sys\n"  # tie at 0.5: b before z
        "q2 Q0 z 2 0.5 sys\n"
        "q2 Q0 a 3 0.25 sys\n"
    )
    # The same run built in another order writes the same bytes.
    shuffled = {"q10": {"d": 1.0}, "q2": {"a": 0.25, "b": 0.5, "z": 0.5}}
    assert write_trec_run(tmp_path / "s.trec", shuffled, tag="sys").read_bytes() == (
        path.read_bytes()
    )


def test_scores_round_trip_exactly(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    scores = rng.standard_normal(50).astype(np.float32)
    run = {"q": {f"d{i}": float(s) for i, s in enumerate(scores)}}
    for name in ("r.trec", "r.trec.gz"):
        back = read_trec_run(write_trec_run(tmp_path / name, run))
        assert back == run  # repr of a float reads back to the same float


def test_gzip_output_is_deterministic(tmp_path: Path) -> None:
    run = {"q": {"a": 1.0, "b": 2.0}}
    first = write_trec_run(tmp_path / "a.trec.gz", run).read_bytes()
    second = write_trec_run(tmp_path / "b.trec.gz", run).read_bytes()
    assert first == second
    assert gzip.decompress(first).decode() == "q Q0 b 1 2.0 imrnns\nq Q0 a 2 1.0 imrnns\n"


@pytest.mark.parametrize(
    ("run", "tag", "match"),
    [
        ({"q 1": {"a": 1.0}}, "t", "query id 'q 1'"),
        ({"q": {"a\tb": 1.0}}, "t", "document id"),
        ({"q": {"a": 1.0}}, "my run", "tag 'my run'"),
        ({"q": {"a": float("nan")}}, "t", "finite"),
    ],
)
def test_write_refuses_what_a_run_file_cannot_hold(
    tmp_path: Path, run: dict, tag: str, match: str
) -> None:
    target = tmp_path / "r.trec"
    target.write_text("old\n")
    with pytest.raises(ValueError, match=match):
        write_trec_run(target, run, tag=tag)
    assert target.read_text() == "old\n"  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.trec"]  # no temporary left


# ----------------------------------------------------------------------------- reading


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("q Q0 a 1 0.5\n", r"r.trec:1: expected 6 whitespace-separated columns"),
        ("q Q0 a 1 0.5 t\n\nq Q0 b x 0.4 t\n", r"r.trec:3: rank 'x' is not an integer"),
        ("q Q0 a 1 high t\n", r"r.trec:1: score 'high' is not a finite number"),
        ("q Q0 a 1 nan t\n", r"r.trec:1: score 'nan' is not a finite number"),
        ("q Q0 a 1 inf t\n", r"r.trec:1: score 'inf'"),
        ("q Q0 a 1 0.5 t\nq Q0 a 2 0.4 t\n", r"r.trec:2: document 'a' listed twice for 'q'"),
        ("\n  \n", r"r.trec: the TREC run file has no lines"),
    ],
)
def test_read_errors_name_the_file_and_line(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "r.trec"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        read_trec_run(path)


def test_read_refuses_missing_and_binary_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="TREC run file not found"):
        read_trec_run(tmp_path / "none.trec")
    (tmp_path / "bin.trec").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match="bin.trec: not a readable TREC run file"):
        read_trec_run(tmp_path / "bin.trec")
    (tmp_path / "bad.gz").write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="bad.gz: not a readable TREC run file"):
        read_trec_run(tmp_path / "bad.gz")


def test_read_orders_by_score_not_by_rank_column(tmp_path: Path) -> None:
    # trec_eval ignores the rank column; so do we (scores decide).
    (tmp_path / "r.trec").write_text("q Q0 a 1 0.1 t\nq Q0 b 2 0.9 t\n")
    run = read_trec_run(tmp_path / "r.trec")
    out = compare_runs({"q": {"b": 1}, "p": {"a": 1}}, {"r": run}, metrics="RR@10")
    assert out["per_query"]["r"] == {"q": {"RR@10": 1.0}, "p": {"RR@10": 0.0}}


# ----------------------------------------------------------------------------- run_out paths


def test_run_out_paths(tmp_path: Path) -> None:
    systems = ["base", "imrnn-rerank"]
    assert run_out_paths(tmp_path / "r.trec", ["base"]) == {"base": tmp_path / "r.trec"}
    assert run_out_paths(tmp_path / "r.trec", systems) == {
        "base": tmp_path / "r.base.trec",
        "imrnn-rerank": tmp_path / "r.imrnn-rerank.trec",
    }
    assert run_out_paths(tmp_path / "{system}.run", systems)["base"] == tmp_path / "base.run"
    assert run_out_paths(tmp_path / "runs", systems)["base"] == tmp_path / "runs.base"
    (tmp_path / "d").mkdir()
    with pytest.raises(ValueError, match="would replace the directory"):
        run_out_paths(tmp_path / "d", ["base"])
    with pytest.raises(ValueError, match="the same file"):
        run_out_paths(tmp_path / "{system}" / ".." / "same.trec", systems)


# ----------------------------------------------------------------------------- round trips


def _tied_split() -> EmbeddedSplit:
    """Rows 0 and 1 are the same document under ids "b" then "a": the index ranks row 0
    first (ties by lower row), a run file by doc id ("a" first). Only "a" is relevant."""
    corpus = np.array(
        [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.6, 0.8], [0, 0, 1.0]],
        dtype=np.float32,
    )
    queries = np.array([[1.0, 0.1, 0.0], [0.0, 0.5, 0.9], [0.5, 0.5, 0.1]], dtype=np.float32)
    doc_ids = ["b", "a", "c", "d", "e"]
    qrels = {"q0": {"a": 1}, "q1": {"d": 1, "e": 2}, "q2": {"c": 1, "b": 1}}
    ds = BeirDataset("tied", "test", doc_ids, ["t"] * 5, ["q0", "q1", "q2"], ["x"] * 3, qrels)
    return EmbeddedSplit(ds, corpus, queries, encoder="tiny")


def test_written_runs_score_exactly_as_the_evaluation_that_wrote_them(tmp_path: Path) -> None:
    split = _tied_split()
    model = IMRNN(IMRNNConfig(input_dim=3))
    metrics = "nDCG@10 RR@10 P@1 AP"
    out = evaluate_embeddings(
        split, model, feedback_k=5, metrics=metrics, permutations=100, bootstrap=200,
        run_out=tmp_path / "{system}.trec",
    )  # fmt: skip
    assert out["per_query"]["base"]["q0"]["P@1"] == 1.0  # "a" ranks first: ties by doc id
    assert set(out["run_out"]) == {"base", "imrnn-rerank", "imrnn-exhaustive"}
    files = {name: Path(p) for name, p in out["run_out"].items()}
    again = compare_runs(
        split.dataset.qrels, files, reference="base", metrics=metrics, permutations=100,
        bootstrap=200,
    )  # fmt: skip
    assert again["per_query"] == out["per_query"]
    for mode in ("rerank", "exhaustive"):
        assert again["systems"][f"imrnn-{mode}"] == out["imrnn"][mode]


# ----------------------------------------------------------------------------- external runs


def _beir(root: Path) -> Path:
    root.mkdir(parents=True)
    docs = [{"_id": d, "title": "", "text": f"doc {d}"} for d in ("b", "a", "c", "d", "e")]
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    queries = [{"_id": q, "text": q} for q in ("q0", "q1", "q2", "t0")]
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (root / "qrels").mkdir()
    (root / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\nq0\ta\t1\nq1\td\t1\nq1\te\t2\nq2\tc\t1\nq2\tb\t1\n"
    )
    (root / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nt0\tc\t1\n")
    return root


def _runs(tmp_path: Path) -> tuple[Path, Path]:
    good = {"q0": {"a": 3.0, "b": 2.0}, "q1": {"e": 2.0, "d": 1.0}, "q2": {"c": 1.0}}
    weak = {"q0": {"c": 3.0, "a": 2.0}, "q1": {"a": 2.0, "d": 1.0}, "q2": {"e": 1.0}}
    return (
        write_trec_run(tmp_path / "good.trec", good, "good"),
        write_trec_run(tmp_path / "weak.trec", weak, "weak"),
    )


def test_external_runs_against_a_baseline_encode_nothing(tmp_path: Path) -> None:
    root = _beir(tmp_path / "beir")
    good, weak = _runs(tmp_path)
    out = evaluate_beir(
        root, runs=[good], baseline=weak, encoder="no-such-encoder", metrics="nDCG@10 P@1",
        permutations=100, bootstrap=300,
    )  # fmt: skip
    assert "base" not in out and out["reference"] == str(weak)
    assert out["runs"][str(good)]["P@1"] == 1.0 and out["runs"][str(weak)]["P@1"] == 0.0
    sig = out["runs"][str(good)]["significance"]
    assert set(sig) == {"overall", "unseen_doc"}  # seen-doc has 1 query (q2): no test
    assert out["tests"]["family_size"] == 4
    t = sig["overall"]["P@1"]
    assert t["delta"] == 1.0 and t["ci_low"] == t["ci_high"] == 1.0
    assert t["p_randomisation_holm"] >= t["p_randomisation"]


def test_external_run_against_the_base_encoder(tmp_path: Path) -> None:
    root = _beir(tmp_path / "beir")
    good, _ = _runs(tmp_path)
    out = evaluate_beir(root, None, runs=good, embedded=_tied_split(), permutations=100)
    assert out["reference"] == "base" and set(out["runs"]) == {str(good)}
    assert set(out["runs"][str(good)]["significance"]["overall"]) == {
        "nDCG@10", "Recall@100", "MRR@10",
    }  # fmt: skip


def test_external_run_errors(tmp_path: Path) -> None:
    root = _beir(tmp_path / "beir")
    other = write_trec_run(tmp_path / "other.trec", {"x1": {"a": 1.0}})
    with pytest.raises(ValueError, match="has none of the 3 judged query ids"):
        evaluate_beir(root, runs=[other], baseline=other, permutations=10)
    good, weak = _runs(tmp_path)
    with pytest.raises(ValueError, match="run_out writes computed rankings"):
        evaluate_beir(root, runs=[good], baseline=weak, run_out=tmp_path / "o.trec")
    with pytest.raises(ValueError, match="external run names must not be"):
        evaluate_embeddings(_tied_split(), None, runs={"base": good})
    with pytest.raises(ValueError, match="reference must be"):
        evaluate_embeddings(_tied_split(), None, reference="nope")
    with pytest.raises(ValueError, match="given twice"):
        evaluate_beir(root, runs=[good, good], baseline=weak)


# ----------------------------------------------------------------------------- command lines


def _strict(text: str) -> dict:
    def bad(token: str) -> None:
        raise AssertionError(f"non-JSON token {token}")

    return json.loads(text, parse_constant=bad)


def test_cli_scores_runs_and_refuses_bad_measures_before_encoding(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    from imrnns.cli import main

    root = _beir(tmp_path / "beir")
    good, weak = _runs(tmp_path)
    argv = ["evaluate", "--data", str(root), "--run", str(good), "--baseline", str(weak),
            "--metrics", "nDCG@10 P@1", "AP", "--json", "--bootstrap", "200",
            "--permutations", "100"]  # fmt: skip
    assert main(argv) == 0
    out = _strict(capsys.readouterr().out)
    assert out["metrics"] == ["nDCG@10", "P@1", "AP"] and out["reference"] == str(weak)
    assert out["runs"][str(good)]["significance"]["overall"]["AP"]["p_randomisation_holm"] > 0
    assert main([a for a in argv if a != "--json"]) == 0  # the text report
    table = capsys.readouterr().out
    assert "Holm" in table and str(good) in table

    import imrnns.evaluate as ev

    def no_encoding(*args, **kwargs):
        raise AssertionError("encoded before checking the measures")

    monkeypatch.setattr(ev, "embed_beir", no_encoding)
    assert main(["evaluate", "--data", str(root), "--metrics", "ndcg_cut_10"]) == 2
    assert "imrnns evaluate: error: unknown measure 'ndcg_cut_10'" in capsys.readouterr().err
    for option, value, message in (
        ("--bootstrap", "-1", "bootstrap must be a non-negative int"),
        ("--permutations", "0", "permutations must be a positive int"),
        ("--alpha", "1.5", "alpha must be in (0, 1)"),
        ("--depth", "0", "depth must be a positive int"),
    ):
        assert main(["evaluate", "--data", str(root), option, value]) == 2
        assert message in capsys.readouterr().err


def test_cli_run_out_writes_runs_that_score_the_same(tmp_path: Path, monkeypatch, capsys) -> None:
    import imrnns.cli.evaluate as cli_eval

    root = _beir(tmp_path / "beir")
    real = cli_eval.evaluate_beir
    monkeypatch.setattr(
        cli_eval, "evaluate_beir", lambda *a, **k: real(*a, **{**k, "embedded": _tied_split()})
    )
    ckpt = IMRNN(IMRNNConfig(input_dim=3)).save_pretrained(tmp_path / "adapter")
    argv = ["--data", str(root), "--checkpoint", str(ckpt), "--mode", "rerank", "--json",
            "--run-out", str(tmp_path / "out" / "r.trec"), "--permutations", "50",
            "--bootstrap", "100", "--ignore-identical-ids"]  # fmt: skip
    assert cli_eval.main(argv) == 0
    out = _strict(capsys.readouterr().out)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "r.base.trec", "r.imrnn-rerank.trec",
    ]  # fmt: skip
    assert out["ignore_identical_ids"] is True
    back = evaluate_beir(
        root, runs=[tmp_path / "out" / "r.imrnn-rerank.trec"],
        baseline=tmp_path / "out" / "r.base.trec", permutations=50, bootstrap=100,
    )  # fmt: skip
    base = back["runs"][str(tmp_path / "out" / "r.base.trec")]
    assert {m: base[m] for m in ("nDCG@10", "Recall@100", "MRR@10")} == {
        m: out["base"][m] for m in ("nDCG@10", "Recall@100", "MRR@10")
    }
