"""The command line: every command has --help; encode/search run end to end on real text."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from imrnns import IMRNN, IMRNNConfig
from imrnns.cli import build_parser, main

COMMANDS = ["encode", "search", "evaluate", "train", "demo", "explain"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "--json" in capsys.readouterr().out


def test_module_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "imrnns", "--help"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0 and all(c in proc.stdout for c in COMMANDS)


def test_parser_defaults_to_vendored_scifact():
    args = build_parser().parse_args(["evaluate"])
    assert Path(args.data).name == "scifact" and args.split == "test" and args.mode == "rerank"


def test_train_passes_every_option_through(monkeypatch, tmp_path):
    """``imrnns train`` takes the options of ``python -m imrnns.cli.train``: --set, --refit,
    --refit-epochs, --no-resume; a named option wins over the same key in --set."""
    import imrnns.training as train_mod

    seen: dict = {}

    def fake(**kwargs):
        seen.update(kwargs)
        return {"best_epoch": 1}

    monkeypatch.setattr(train_mod, "train_from_beir", fake)
    argv = ["train", "--out", str(tmp_path / "run"), "--set", "loss=margin", "epochs=3",
            "pseudo_queries=title", "--epochs", "5", "--refit-epochs", "4", "--no-resume",
            "--json"]  # fmt: skip
    assert main(argv) == 0
    assert seen["loss"] == "margin" and seen["pseudo_queries"] == "title"
    assert seen["epochs"] == 5 and seen["refit_epochs"] == 4 and seen["resume"] is False
    assert "modulation" not in seen and "seed" not in seen  # TrainConfig defaults apply
    seen.clear()
    assert main(["train", "--out", str(tmp_path / "run2"), "--json"]) == 0
    assert seen["resume"] is True and seen["refit"] is False and seen["refit_epochs"] is None


def _tiny_beir(root: Path) -> Path:
    docs = [
        ("d1", "Aspirin", "Aspirin reduces the risk of heart attack in adults."),
        ("d2", "Vitamin D", "Vitamin D deficiency is linked to weak bones."),
        ("d3", "", "Exercise improves cardiovascular health and mood."),
        ("d4", "Sleep", "Lack of sleep impairs memory consolidation."),
        ("d5", "Coffee", "Caffeine intake is associated with alertness."),
    ]
    (root / "qrels").mkdir(parents=True)
    with open(root / "corpus.jsonl", "w") as fh:
        for i, t, x in docs:
            fh.write(json.dumps({"_id": i, "title": t, "text": x}) + "\n")
    with open(root / "queries.jsonl", "w") as fh:
        fh.write(json.dumps({"_id": "q1", "text": "does aspirin prevent heart attacks"}) + "\n")
        fh.write(json.dumps({"_id": "q2", "text": "what helps memory"}) + "\n")
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td4\t1\n")
    return root


@pytest.mark.slow
def test_encode_and_search_on_real_text(tmp_path, capsys):
    data = _tiny_beir(tmp_path / "beir")
    cache = tmp_path / "cache"
    assert main(["encode", "--data", str(data), "--cache", str(cache), "--json"]) == 0
    enc = json.loads(capsys.readouterr().out)
    assert (enc["documents"], enc["queries"], enc["dim"]) == (5, 2, 384)
    ckpt = IMRNN(IMRNNConfig(input_dim=384)).save_pretrained(tmp_path / "adapter")
    argv = [
        "search",
        "--data",
        str(data),
        "--cache",
        str(cache),
        "--checkpoint",
        str(ckpt),
        "--k",
        "3",
        "--feedback-k",
        "5",
        "--json",
        "--save-index",
        str(tmp_path / "idx"),
        "does aspirin prevent heart attacks",
    ]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    hits = out["results"][0]["hits"]
    assert [h["rank"] for h in hits] == [1, 2, 3]
    # an identity-initialised adapter keeps the base encoder's obvious top hit
    assert hits[0]["doc_id"] == "d1"
    again = [
        "search",
        "--index",
        str(tmp_path / "idx"),
        "--cache",
        str(cache),
        "--json",
        "--k",
        "3",
        "does aspirin prevent heart attacks",
    ]
    assert main(again) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["hits"] == hits


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["search", "--data", str(tmp_path / "missing"), "--json", "x"]) == 2
    assert "error" in capsys.readouterr().err


def test_evaluate_json_is_strict_and_os_errors_exit_2(monkeypatch, tmp_path, capsys):
    """--json wrote NaN (an empty subset's mean) as the non-JSON token NaN; an output path
    that is a directory ended in a traceback (exit 1) instead of an error line (exit 2)."""
    import imrnns.evaluate as ev

    def fake(**kwargs):
        if kwargs["per_query_out"] is not None:  # the real writer, on a directory
            ev.write_per_query(kwargs["per_query_out"], {"per_query": {}})
        nan = float("nan")
        return {"base": {"nDCG@10": 0.5, "seen_doc": {"nDCG@10": nan, "num_queries": 0}},
                "t": np.float32("inf")}  # fmt: skip

    monkeypatch.setattr(ev, "evaluate_beir", fake)
    assert main(["evaluate", "--checkpoint", "x", "--json"]) == 0

    def strict(token):
        raise AssertionError(f"non-JSON token {token}")

    out = json.loads(capsys.readouterr().out, parse_constant=strict)
    assert out["base"]["seen_doc"]["nDCG@10"] is None and out["t"] is None
    (tmp_path / "dir").mkdir()
    argv = ["evaluate", "--checkpoint", "x", "--json", "--per-query", str(tmp_path / "dir")]
    assert main(argv) == 2
    assert "imrnns evaluate: error:" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir"]  # no temporary left behind


def test_train_bad_set_values_exit_2(capsys):
    # loss=1 raised AttributeError (traceback); graded=False was the truthy string "False".
    for item in ("loss=1", "graded=False", "lr=Infinity", "temperature=abc"):
        assert main(["train", "--out", "unused", "--set", item, "--json"]) == 2
        key = item.split("=")[0]
        assert f"imrnns train: error: {key} must be" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["imrnns.cli.train", "imrnns.cli.evaluate"])
def test_module_entry_points_exit_2_on_bad_input(module, monkeypatch, capsys, tmp_path) -> None:
    # Regression: `python -m imrnns.cli.train` / `imrnns.cli.evaluate` ended bad input in a traceback.
    import runpy
    import warnings

    missing = tmp_path / "no-such-beir-folder"
    argv = [module, "--data", str(missing)] + (
        ["--out", str(tmp_path / "o")] * (module == "imrnns.cli.train")
    )
    monkeypatch.setattr(sys, "argv", argv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "found in sys.modules" of runpy
        with pytest.raises(SystemExit) as exc:
            runpy.run_module(module, run_name="__main__")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"python -m {module}: error:" in err and str(missing) in err
    assert not (tmp_path / "o").exists()
