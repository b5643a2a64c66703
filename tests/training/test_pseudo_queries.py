"""Corpus pseudo-queries (``TrainConfig.pseudo_queries``): texts, data, loss, runs.

Synthetic collections (no encoder) on the CPU backend, as in tests/training/test_train.py,
except one test that encodes three titles of a tiny BEIR folder with the offline MiniLM
preset.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from imrnns.data import load_corpus_fields
from imrnns.evaluate import EmbeddedSplit
from imrnns.training import (
    PseudoQueries,
    TrainConfig,
    build_pseudo_queries,
    prepare_training_data,
    pseudo_query_texts,
    train,
    train_from_beir,
)
from imrnns.training.batches import _epoch_generator
from imrnns.training.losses import _step_loss
from tests.helpers import SMALL, check_resume, synthetic_graded

PSEUDO = dataclasses.replace(SMALL, pseudo_queries="title", pseudo_batch=16)


pytestmark = pytest.mark.usefixtures("cpu_backend_one_thread")


@pytest.fixture(scope="module")
def small_split() -> EmbeddedSplit:
    return synthetic_graded(n_docs=120, dim=16, n_train=80, n_test=10)[0]


def _pseudo(split: EmbeddedSplit, source: str = "title", seed: int = 1) -> PseudoQueries:
    """One pseudo-query per document: its embedding plus noise (a stand-in for a title)."""
    rng = np.random.default_rng(seed)
    x = split.corpus + 0.3 * rng.standard_normal(split.corpus.shape).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = list(split.dataset.corpus_ids)
    return PseudoQueries(source, ids, [f"title of {d}" for d in ids], x.astype(np.float32))


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


# ----------------------------------------------------------------------------- config, texts


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("pseudo_queries", "abstract", "pseudo_queries must be one of"),
        ("pseudo_queries", None, "pseudo_queries must be one of"),
        ("pseudo_weight", 0.0, "pseudo_weight must be a finite number > 0"),
        ("pseudo_weight", -1.0, "pseudo_weight"),
        ("pseudo_weight", float("inf"), "pseudo_weight"),
        ("pseudo_weight", float("nan"), "pseudo_weight"),
        ("pseudo_weight", True, "pseudo_weight"),
        ("pseudo_weight", "1", "pseudo_weight"),
        ("pseudo_batch", 0, "pseudo_batch must be a positive int"),
        ("pseudo_batch", 2.5, "pseudo_batch must be a positive int"),
    ],
)
def test_config_rejects_bad_pseudo_values(field: str, value: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{field: value})


def test_config_default_is_off_and_round_trips() -> None:
    assert TrainConfig().pseudo_queries == ""
    cfg = TrainConfig(pseudo_queries="first_sentence", pseudo_weight=0.5, pseudo_batch=64)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_pseudo_query_texts() -> None:
    ids = ["a", "b", "c", "d"]
    titles = ["  Aspirin prevents strokes. ", "", "DNA repair", "x"]
    texts = [
        "BACKGROUND Aspirin is old. It works. More text.",
        "OBJECTIVE: To test things (n = 3). Then more.",
        "DNA methylation matters in e.g. cancer. Second sentence.",
        "",
    ]
    assert pseudo_query_texts(ids, titles, texts, "title") == (
        ["a", "c", "d"],
        ["Aspirin prevents strokes.", "DNA repair", "x"],
    )
    got_ids, got = pseudo_query_texts(ids, titles, texts, "first_sentence")
    assert got_ids == ["a", "b", "c"]  # d has no text
    assert got == [
        "Aspirin is old.",  # the all-caps heading is dropped
        "To test things (n = 3).",
        "DNA methylation matters in e.g. cancer.",  # an acronym is not a heading
    ]
    with pytest.raises(ValueError, match="source must be one of"):
        pseudo_query_texts(ids, titles, texts, "")
    with pytest.raises(ValueError, match="parallel"):
        pseudo_query_texts(ids, titles[:2], texts, "title")


def test_pseudo_queries_container_validates() -> None:
    emb = np.zeros((2, 4), np.float32)
    with pytest.raises(ValueError, match="source"):
        PseudoQueries("", ["a", "b"], ["x", "y"], emb)
    with pytest.raises(ValueError, match="parallel"):
        PseudoQueries("title", ["a"], ["x", "y"], emb)
    with pytest.raises(ValueError, match="unique"):
        PseudoQueries("title", ["a", "a"], ["x", "y"], emb)
    with pytest.raises(ValueError, match="NaN"):
        PseudoQueries("title", ["a", "b"], ["x", "y"], np.full((2, 4), np.nan, np.float32))
    with pytest.raises(TypeError, match="2-D"):
        PseudoQueries("title", ["a", "b"], ["x", "y"], np.zeros(2, np.float32))


def test_build_pseudo_queries_reads_titles_and_encodes_them_as_queries(tmp_path: Path) -> None:
    from imrnns.encoders import Encoder

    rows = [
        {"_id": "d1", "title": "Aspirin prevents strokes.", "text": "BACKGROUND Aspirin. X."},
        {"_id": 2, "title": "Statins lower cholesterol.", "text": "We studied statins."},
        {"_id": "d3", "title": None, "text": "No title here."},
    ]
    with gzip.open(tmp_path / "corpus.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.write("\n".join(json.dumps(r) for r in rows) + "\n")
    assert load_corpus_fields(tmp_path) == (
        ["d1", "2", "d3"],
        ["Aspirin prevents strokes.", "Statins lower cholesterol.", ""],
        ["BACKGROUND Aspirin. X.", "We studied statins.", "No title here."],
    )
    enc = Encoder("minilm", cache_dir=tmp_path / "cache", show_progress=False)
    pq = build_pseudo_queries(tmp_path, "title", encoder=enc)
    assert pq.doc_ids == ["d1", "2"] and pq.texts[0] == "Aspirin prevents strokes."
    np.testing.assert_allclose(pq.emb, enc.encode_query(pq.texts), rtol=0, atol=1e-6)
    with pytest.raises(FileNotFoundError):
        load_corpus_fields(tmp_path / "missing")


# ----------------------------------------------------------------------------- data


def test_prepare_training_data_pseudo_set(small_split: EmbeddedSplit) -> None:
    pseudo = _pseudo(small_split)
    off = prepare_training_data(small_split, SMALL)
    on = prepare_training_data(small_split, PSEUDO, pseudo=pseudo)
    assert off.pseudo is None and off.describe()["num_pseudo_queries"] == 0
    ps = on.pseudo
    assert ps is not None and on.describe()["num_pseudo_queries"] == 120
    # One pseudo-query per document, its own document the single positive (gain 1) ...
    assert ps.ids[:2] == ["pseudo:d0", "pseudo:d1"]
    assert [p for p in ps.positives[:3]] == [([0], [1]), ([1], [1]), ([2], [1])]
    # ... including documents relevant to validation queries (test-time mirrors that) ...
    val_docs = {on.corpus_ids.index(d) for q in on.val.ids for d in on.val.qrels[q]}
    assert val_docs <= {docs[0] for docs, _ in ps.positives}
    # ... while the real queries, their cited set and the val subsets do not change.
    assert on.train.ids == off.train.ids and on.val.ids == off.val.ids
    assert on.train.cited == off.train.cited
    assert on.val_subsets == off.val_subsets
    assert on.fingerprint != off.fingerprint
    # Hard-negative pools come from the base first stage, like real queries'.
    assert ps.pool_ids.shape == (120, PSEUDO.negative_pool)


def test_prepare_training_data_pseudo_errors(small_split: EmbeddedSplit) -> None:
    pseudo = _pseudo(small_split)
    with pytest.raises(ValueError, match="needs pseudo="):
        prepare_training_data(small_split, PSEUDO)
    with pytest.raises(ValueError, match="pseudo_queries is off"):
        prepare_training_data(small_split, SMALL, pseudo=pseudo)
    with pytest.raises(ValueError, match="of source 'first_sentence'"):
        prepare_training_data(small_split, PSEUDO, pseudo=_pseudo(small_split, "first_sentence"))
    bad = PseudoQueries("title", ["nope"], ["x"], np.ones((1, 16), np.float32))
    with pytest.raises(ValueError, match="not in the corpus"):
        prepare_training_data(small_split, PSEUDO, pseudo=bad)
    wide = PseudoQueries("title", ["d0"], ["x"], np.ones((1, 8), np.float32))
    with pytest.raises(ValueError, match="same encoder"):
        prepare_training_data(small_split, PSEUDO, pseudo=wide)


# ----------------------------------------------------------------------------- loss, runs


def test_pseudo_examples_enter_the_loss_with_their_weight(small_split: EmbeddedSplit) -> None:
    pseudo = _pseudo(small_split)
    data = prepare_training_data(small_split, PSEUDO, pseudo=pseudo)
    from imrnns import IMRNN
    from imrnns.training.loop import _init_projector

    torch.manual_seed(0)
    model = IMRNN(PSEUDO.model_config(16))
    _init_projector(model, data.corpus, PSEUDO.projector_init)
    unit = torch.nn.functional.normalize(data.corpus, dim=1)
    rows, prows = list(range(16)), list(range(10, 26))

    def loss(weight: float, with_pseudo: bool) -> float:
        cfg = dataclasses.replace(PSEUDO, pseudo_weight=weight)
        gen, pgen = _epoch_generator(0, 1), _epoch_generator(0, 1, stream=1)
        extra = (prows, pgen) if with_pseudo else ((), None)
        return float(_step_loss(model, data, rows, cfg, gen, unit, *extra).detach())

    real = loss(1.0, False)
    one, two = loss(1.0, True) - real, loss(2.0, True) - real
    assert one > 0
    assert two == pytest.approx(2 * one, rel=1e-5)


def test_pseudo_queries_change_training_and_are_deterministic(
    tmp_path: Path, small_split: EmbeddedSplit
) -> None:
    pseudo = _pseudo(small_split)
    data = prepare_training_data(small_split, PSEUDO, pseudo=pseudo)
    a = train(data, tmp_path / "a", PSEUDO, progress=False)
    b = train(data, tmp_path / "b", PSEUDO, progress=False)
    for name in ("best", "last/model"):
        fa = (tmp_path / "a" / name / "model.safetensors").read_bytes()
        assert fa == (tmp_path / "b" / name / "model.safetensors").read_bytes()
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    off = train(prepare_training_data(small_split, SMALL), tmp_path / "off", SMALL,
                progress=False)  # fmt: skip
    wa, wo = _weights(tmp_path / "a" / "last/model"), _weights(tmp_path / "off" / "last/model")
    assert any(not torch.equal(wa[k], wo[k]) for k in wa)
    assert a["history"][1]["loss"] > off["history"][1]["loss"]  # the pseudo term is added
    heavier = dataclasses.replace(PSEUDO, pseudo_weight=3.0)
    h = train(prepare_training_data(small_split, heavier, pseudo=pseudo), tmp_path / "h",
              heavier, progress=False)  # fmt: skip
    assert h["history"][1]["loss"] != a["history"][1]["loss"]
    assert a["data"]["num_pseudo_queries"] == 120


def test_resume_with_pseudo_queries_matches_an_uninterrupted_run(
    tmp_path: Path, small_split: EmbeddedSplit
) -> None:
    cfg = dataclasses.replace(PSEUDO, epochs=3)
    data = prepare_training_data(small_split, cfg, pseudo=_pseudo(small_split))
    check_resume(data, cfg, tmp_path, 1)


def test_train_from_beir_passes_pseudo_queries_to_the_refit(
    tmp_path: Path, small_split: EmbeddedSplit
) -> None:
    pseudo = _pseudo(small_split)
    out = train_from_beir(tmp_path / "unused", tmp_path / "o", config=PSEUDO, refit_epochs=1,
                          embedded=small_split, pseudo=pseudo, progress=False)  # fmt: skip
    assert out["data"]["num_pseudo_queries"] == 120
    assert out["refit"]["data"]["num_pseudo_queries"] == 120
    assert out["config"]["pseudo_queries"] == "title"
    with pytest.raises(ValueError, match="pseudo_queries is off"):
        train_from_beir(tmp_path / "unused", tmp_path / "p", config=SMALL, embedded=small_split,
                        pseudo=pseudo, progress=False)  # fmt: skip
