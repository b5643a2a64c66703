"""The index's similarity: cosine (default, today's behaviour) or the raw dot product of
dot-product encoders, through the index, its save/load, the encoder mapping and evaluation."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

import imrnns.evaluate as evaluate_module
from imrnns import IMRNNConfig, IMRNNIndex
from imrnns.data import BeirDataset
from imrnns.encoders import FunctionEncoder
from imrnns.evaluate import (
    EmbeddedSplit,
    base_search,
    embed_beir,
    evaluate_embeddings,
    index_similarity,
)
from imrnns.index.core import INDEX_SIMILARITIES
from imrnns.metrics import read_trec_run
from tests.helpers import assert_close, randomised

pytestmark = pytest.mark.usefixtures("cpu_backend_one_thread")

N_IN = 16
FORMS = {
    "v0.2": {"aggregation": "mean_of_transforms"},
    "v0.1-base": {"aggregation": "transform_of_mean"},
}


def _model(form: str = "v0.2", seed: int = 0) -> Any:
    torch.manual_seed(seed)
    return randomised(IMRNNConfig(input_dim=N_IN, dim=8, **FORMS[form]))


def _data(n: int = 60, b: int = 7, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Documents of very different norms (0.1 to 10): dot and cosine rankings disagree."""
    rng = np.random.default_rng(seed)
    corpus = rng.standard_normal((n, N_IN)).astype(np.float32)
    corpus *= rng.uniform(0.1, 10.0, (n, 1)).astype(np.float32)
    return corpus, rng.standard_normal((b, N_IN)).astype(np.float32)


def _brute(corpus: np.ndarray, queries: np.ndarray, k: int, cosine: bool) -> tuple[Any, Any]:
    """Exact top-k in float64, ties by lower id: (scores, ids)."""
    c, q = torch.from_numpy(corpus).double(), torch.from_numpy(queries).double()
    if cosine:
        c, q = torch.nn.functional.normalize(c, dim=1), torch.nn.functional.normalize(q, dim=1)
    s = q @ c.T
    order = np.lexsort((np.arange(s.shape[1])[None, :].repeat(s.shape[0], 0), -s.numpy()))
    ids = torch.from_numpy(order[:, :k].copy())
    return torch.gather(s, 1, ids), ids


# ------------------------------------------------------------------------------ the index


def test_dot_index_first_stage_is_the_exact_inner_product_ranking() -> None:
    corpus, queries = _data()
    index = IMRNNIndex(_model(), feedback_k=10, similarity="dot")
    index.add(corpus)
    scores, ids = index.first_stage_search(queries, 10)
    ref_scores, ref_ids = _brute(corpus, queries, 10, cosine=False)
    assert np.array_equal(ids, ref_ids.numpy())
    assert_close(torch.from_numpy(scores), ref_scores, torch.float32)
    # The vectors are kept as given, not as unit rows.
    assert np.array_equal(index.first_stage_vectors(), corpus)


def test_a_document_with_a_large_norm_wins_under_dot_only() -> None:
    rng = np.random.default_rng(3)
    q = rng.standard_normal((1, N_IN)).astype(np.float32)
    aligned = q / np.linalg.norm(q)  # cosine 1, norm 1
    long = 50.0 * (0.6 * aligned + 0.8 * rng.standard_normal((1, N_IN)).astype(np.float32))
    corpus = np.concatenate([aligned, long]).astype(np.float32)
    results = {}
    for similarity in ("cosine", "dot"):
        index = IMRNNIndex(_model(), feedback_k=2, similarity=similarity)
        index.add(corpus)
        results[similarity] = index.first_stage_search(q, 2)[1][0].tolist()
    assert results == {"cosine": [0, 1], "dot": [1, 0]}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_dot_index_feeds_the_imrnn_stage_its_dot_feedback_set(form: str) -> None:
    corpus, queries = _data()
    model = _model(form)
    dot = IMRNNIndex(model, feedback_k=5, similarity="dot", first_stage_space="base")
    dot.add(corpus)
    state = dot.query_state(queries)
    assert torch.equal(state.feedback_ids, _brute(corpus, queries, 5, cosine=False)[1])
    cos = IMRNNIndex(model, feedback_k=5, first_stage_space="base")
    cos.add(corpus)
    assert not torch.equal(cos.query_state(queries).feedback_ids, state.feedback_ids)
    # The IMRNN stage is still the modulated cosine: rerank scores are cosines, and they are
    # exactly the model's scores of the dot feedback set.
    scores, ids = dot.search(queries, 5, "rerank")
    assert np.all(np.abs(scores) <= 1.0 + 1e-6)
    assert set(map(tuple, np.sort(ids, 1))) == set(
        map(tuple, np.sort(state.feedback_ids.numpy(), 1))
    )


def test_cosine_is_the_default_and_unchanged() -> None:
    corpus, queries = _data()
    model = _model()
    default = IMRNNIndex(model, feedback_k=10)
    default.add(corpus)
    assert default.similarity == "cosine" and default.settings()["similarity"] == "cosine"
    scores, ids = default.first_stage_search(queries, 10)
    ref_scores, ref_ids = _brute(corpus, queries, 10, cosine=True)
    assert np.array_equal(ids, ref_ids.numpy())
    assert_close(torch.from_numpy(scores), ref_scores, torch.float32)
    unit = corpus / np.linalg.norm(corpus, axis=1, keepdims=True)
    assert_close(torch.from_numpy(default.first_stage_vectors()), torch.from_numpy(unit),
                 torch.float32)  # fmt: skip
    explicit = IMRNNIndex(model, feedback_k=10, similarity="cosine")
    explicit.add(corpus)
    for mode in ("rerank", "exhaustive"):
        a, b = default.search(queries, 10, mode), explicit.search(queries, 10, mode)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_projected_first_stage_ignores_the_similarity() -> None:
    corpus, queries = _data()
    model = _model("v0.1-base")  # auto: projected space
    out = []
    for similarity in ("cosine", "dot"):
        index = IMRNNIndex(model, feedback_k=8, similarity=similarity)
        assert index.first_stage_space == "projected"
        index.add(corpus)
        out.append(index.search(queries, 8, "rerank"))
    assert np.array_equal(out[0][0], out[1][0]) and np.array_equal(out[0][1], out[1][1])


@pytest.mark.parametrize("similarity", ["euclidean", "manhattan", "Dot", "", None, 1])
def test_unsupported_similarities_are_refused(similarity: Any) -> None:
    with pytest.raises(ValueError, match="similarity must be one of") as err:
        IMRNNIndex(_model(), similarity=similarity)
    assert repr(similarity) in str(err.value)


# ------------------------------------------------------------------------------ persistence


def test_save_load_round_trip_keeps_dot(tmp_path: Path) -> None:
    corpus, queries = _data()
    index = IMRNNIndex(_model(), feedback_k=6, similarity="dot")
    index.add(corpus)
    before = index.search(queries, 6, "rerank"), index.first_stage_search(queries, 6)
    index.save(tmp_path / "ix")
    manifest = json.loads((tmp_path / "ix" / "manifest.json").read_text())
    assert manifest["index"]["similarity"] == "dot"
    loaded = IMRNNIndex.load(tmp_path / "ix")
    assert loaded.similarity == "dot"
    after = loaded.search(queries, 6, "rerank"), loaded.first_stage_search(queries, 6)
    for x, y in zip(before, after, strict=True):
        assert np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1])
    part = IMRNNIndex.load(tmp_path / "ix", rows=(10, 40))
    assert part.similarity == "dot"
    ids = part.first_stage_search(queries, 4)[1]
    assert np.array_equal(ids, _brute(corpus[10:40], queries, 4, cosine=False)[1].numpy())


def test_an_index_saved_before_the_setting_loads_as_cosine(tmp_path: Path) -> None:
    corpus, queries = _data()
    index = IMRNNIndex(_model(), feedback_k=6)
    index.add(corpus)
    index.save(tmp_path / "old")
    path = tmp_path / "old" / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["index"]["similarity"]  # what a save before the setting wrote
    path.write_text(json.dumps(manifest))
    loaded = IMRNNIndex.load(tmp_path / "old")
    assert loaded.similarity == "cosine"
    a, b = index.search(queries, 6), loaded.search(queries, 6)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


# ------------------------------------------------------------------------------ encoders


def test_index_similarity_maps_the_encoder() -> None:
    assert evaluate_module._SIMILARITIES == INDEX_SIMILARITIES
    assert index_similarity("dot") == "dot" and index_similarity("cosine") == "cosine"
    dot = FunctionEncoder(lambda t: np.ones((len(t), 4), np.float32), similarity="dot")
    assert index_similarity(dot) == "dot"
    unit = SimpleNamespace(similarity="euclidean", normalized=True, name="unit")
    assert index_similarity(unit) == "cosine"  # |q - d|^2 = 2 - 2 q.d on unit rows
    free = FunctionEncoder(lambda t: np.ones((len(t), 4), np.float32), similarity="euclidean")
    with pytest.raises(ValueError, match="'euclidean' on vectors that are not unit-norm"):
        index_similarity(free)
    for normalized in (False, True):
        enc = SimpleNamespace(similarity="manhattan", normalized=normalized, name="l1")
        with pytest.raises(ValueError, match="encoder 'l1' declares similarity 'manhattan'"):
            index_similarity(enc)


def test_base_search_dot_and_bad_similarity() -> None:
    corpus, queries = _data()
    scores, ids = base_search(corpus, queries, 9, similarity="dot")
    ref_scores, ref_ids = _brute(corpus, queries, 9, cosine=False)
    assert np.array_equal(ids, ref_ids.numpy())
    assert_close(torch.from_numpy(scores), ref_scores, torch.float32)
    assert np.array_equal(base_search(corpus, queries, 9)[1], _brute(corpus, queries, 9, True)[1])
    with pytest.raises(ValueError, match="similarity must be one of .* got 'euclidean'"):
        base_search(corpus, queries, 9, similarity="euclidean")


def _dataset(n_docs: int, n_queries: int) -> BeirDataset:
    words = "protein cell gene dna study cancer mouse human results tumour growth patients"
    vocab = words.split()
    docs = [
        " ".join(vocab[(i * 5 + j) % len(vocab)] for j in range(1 + i % 6)) for i in range(n_docs)
    ]
    queries = [
        " ".join(vocab[(i * 7 + j) % len(vocab)] for j in range(2)) for i in range(n_queries)
    ]
    doc_ids = [f"d{i}" for i in range(n_docs)]
    query_ids = [f"q{i}" for i in range(n_queries)]
    qrels = {q: {doc_ids[(3 * i) % n_docs]: 1} for i, q in enumerate(query_ids)}
    return BeirDataset("tiny", "test", doc_ids, docs, query_ids, queries, qrels)


def _dot_st_model(root: Path) -> Path:
    """A 2-layer, 16-wide random BERT, mean pooling, a Dense layer, no Normalize, declared
    ``similarity_fn_name="dot"``, saved as sentence-transformers saves it (nothing fetched)."""
    transformers = pytest.importorskip("transformers")
    st = pytest.importorskip("sentence_transformers")
    from sentence_transformers.base.modules import Dense
    from sentence_transformers.sentence_transformer.modules import Pooling

    words = "protein cell gene dna study cancer mouse human results tumour growth patients"
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = specials + words.split() + list("abcdefghijklmnopqrstuvwxyz")
    base = root / "bert"
    base.mkdir(parents=True)
    transformers.BertTokenizerFast(
        vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True, model_max_length=512
    ).save_pretrained(base)
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=48,
    )  # fmt: skip
    transformers.BertModel(config).eval().save_pretrained(base)
    transformer = st.SentenceTransformer(str(base), device="cpu", local_files_only=True)[0]
    torch.manual_seed(1)
    # A Dense layer with a wide weight: documents' norms differ a lot, so dot != cosine.
    dense = Dense(16, N_IN, activation_function=torch.nn.Identity())
    with torch.no_grad():
        dense.linear.weight.mul_(8.0)
    model = st.SentenceTransformer(
        modules=[transformer, Pooling(16, "mean"), dense], device="cpu",
        similarity_fn_name="dot",
    )  # fmt: skip
    path = root / "dot-model"
    model.save(str(path), create_model_card=False)
    return path


def test_a_dot_sentence_transformer_gives_dot_retrieval_in_evaluation(tmp_path: Path) -> None:
    from imrnns.encoders import Encoder

    enc = Encoder(_dot_st_model(tmp_path), device="cpu", batch_size=8, show_progress=False)
    assert (enc.similarity, enc.normalized) == ("dot", False)
    ds = _dataset(24, 6)
    split = embed_beir(ds, encoder=enc, cache_dir=tmp_path / "cache", show_progress=False)
    assert split.similarity == "dot"
    norms = np.linalg.norm(split.corpus, axis=1)
    assert not np.allclose(norms, 1.0)  # not unit rows
    model = _model("v0.2")
    kf = 4
    runs = {}
    for name, data in (("dot", split), ("cos", EmbeddedSplit(ds, split.corpus, split.queries))):
        result = evaluate_embeddings(data, model, modes="rerank", feedback_k=kf, permutations=50,
                                     bootstrap=0, depth=kf, run_out=tmp_path / name / "{system}")  # fmt: skip
        assert result["similarity"] == data.similarity
        runs[name] = {s: read_trec_run(tmp_path / name / s) for s in ("base", "imrnn-rerank")}

    def ranked(run: dict[str, dict[str, float]], qid: str) -> list[str]:
        return sorted(run[qid], key=lambda d: (-run[qid][d], ds.corpus_ids.index(d)))

    n = ds.num_docs  # the metrics' depth (R@100) covers the whole corpus
    dot_ids = _brute(split.corpus, split.queries, n, cosine=False)[1].numpy()
    cos_ids = _brute(split.corpus, split.queries, n, cosine=True)[1].numpy()
    # Here the two similarities pick different feedback sets.
    assert not np.array_equal(np.sort(dot_ids[:, :kf], 1), np.sort(cos_ids[:, :kf], 1))
    for name, expected in (("dot", dot_ids), ("cos", cos_ids)):
        for row, qid in enumerate(ds.query_ids):
            want = [ds.corpus_ids[i] for i in expected[row]]
            # The base run is the exact ranking by the split's similarity ...
            assert ranked(runs[name]["base"], qid) == want
            # ... and the IMRNN rerank reorders exactly its top feedback_k.
            assert sorted(runs[name]["imrnn-rerank"][qid]) == sorted(want[:kf])


def test_embedded_split_refuses_an_unknown_similarity() -> None:
    corpus, queries = np.eye(2, 4, dtype=np.float32), np.eye(1, 4, dtype=np.float32)
    ds = BeirDataset("t", "test", ["a", "b"], ["x", "y"], ["q"], ["z"], {"q": {"a": 1}})
    with pytest.raises(ValueError, match="got 'euclidean'"):
        EmbeddedSplit(ds, corpus, queries, similarity="euclidean")
