"""IMRNNIndex: equals the model applied to its first-stage candidates, persists safely."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import imrnns_kernels as K
from imrnns import IMRNN, IMRNNConfig, IMRNNIndex
from imrnns.index import IndexError_
from imrnns_kernels.reference import modulated_topk
from tests.helpers import randomised

N, DIM = 300 + 17, 48


@pytest.fixture
def corpus() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.standard_normal((N, DIM)).astype(np.float32)


@pytest.fixture
def queries() -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.standard_normal((5, DIM)).astype(np.float32)


def model_for(modulation: str = "diagonal", aggregation: str = "mean_of_transforms") -> IMRNN:
    m = DIM if modulation == "diagonal" else 12
    return randomised(
        IMRNNConfig(input_dim=DIM, dim=m, modulation=modulation, aggregation=aggregation)
    )


@pytest.mark.parametrize("modulation", ["diagonal", "affine"])
@pytest.mark.parametrize("aggregation", ["mean_of_transforms", "transform_of_mean"])
def test_rerank_equals_model_score_on_first_stage_candidates(
    corpus, queries, modulation, aggregation
):
    model = model_for(modulation, aggregation)
    index = IMRNNIndex(model, feedback_k=20, first_stage_space="base")
    ids_added = index.add(corpus)
    assert isinstance(ids_added, np.ndarray) and ids_added.tolist() == list(range(N))
    scores, ids = index.search(queries, k=10)
    assert scores.shape == (5, 10) and ids.shape == (5, 10)
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    # first stage by hand: cosine of base embeddings, top 20
    cn = corpus / np.linalg.norm(corpus, axis=1, keepdims=True)
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    fs = np.argsort(-(qn @ cn.T), axis=1, kind="stable")[:, :20]
    cand = torch.from_numpy(corpus[fs])
    direct = model.score(torch.from_numpy(queries), cand).numpy()
    for b in range(5):
        order = np.lexsort((fs[b], -direct[b]))[:10]
        np.testing.assert_array_equal(ids[b], fs[b][order])
        np.testing.assert_allclose(scores[b], direct[b][order], atol=1e-5)


@pytest.mark.parametrize("modulation", ["diagonal", "affine"])
def test_exhaustive_equals_brute_force_reference(corpus, queries, modulation):
    model = model_for(modulation)
    index = IMRNNIndex(model, feedback_k=15)
    index.add(torch.from_numpy(corpus))
    q = torch.from_numpy(queries)
    scores, ids = index.search(q, k=25, mode="exhaustive")
    assert isinstance(scores, torch.Tensor) and isinstance(ids, torch.Tensor)
    # brute force: same feedback set, every document scored by the reference
    _, fs_ids = index.search(q, k=15, mode="rerank")
    with torch.no_grad():
        pq, pc = model.project(q), model.project(torch.from_numpy(corpus))
        fs_sorted = torch.sort(fs_ids, dim=1).values
        tq, _, q_tilde = model.query_state(pq, pc, fs_sorted)
        want_s, want_i = modulated_topk(
            pc, tq, model.doc_norm.weight, model.doc_norm.bias, q_tilde, 25, modulation
        )
    torch.testing.assert_close(scores, want_s, atol=1e-5, rtol=0)
    assert (ids == want_i).float().mean() > 0.99  # near-ties may swap within 1e-6
    # every rerank hit is also scored identically in exhaustive mode
    assert bool((scores[:, 0] >= index.search(q, k=1)[0][:, 0] - 1e-5).all())


def test_padding_when_k_exceeds_candidates(corpus, queries):
    index = IMRNNIndex(model_for(), feedback_k=7)
    index.add(corpus[:5])
    s, i = index.search(queries, k=9)
    assert (i[:, 5:] == -1).all() and np.isneginf(s[:, 5:]).all()
    assert (i[:, :5] >= 0).all() and np.isfinite(s[:, :5]).all()
    s, i = index.search(queries, k=9, mode="exhaustive")
    assert (i[:, 5:] == -1).all() and np.isneginf(s[:, 5:]).all()
    assert sorted(i[0, :5].tolist()) == [0, 1, 2, 3, 4]


def test_incremental_add_equals_single_add(corpus, queries):
    model = model_for()
    one, two = IMRNNIndex(model, feedback_k=10), IMRNNIndex(model, feedback_k=10)
    one.add(corpus)
    two.add(corpus[:100])
    assert two.add(corpus[100:]).tolist() == list(range(100, N))
    for mode in ("rerank", "exhaustive"):
        a, b = one.search(queries, 10, mode), two.search(queries, 10, mode)
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_allclose(a[0], b[0], atol=1e-6)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_reduced_storage_dtype(corpus, queries, dtype):
    model = model_for()
    full, low = (
        IMRNNIndex(model, feedback_k=20),
        IMRNNIndex(model, feedback_k=20, storage_dtype=dtype),
    )
    full.add(corpus)
    low.add(corpus)
    assert low.projected_corpus.dtype == getattr(torch, dtype)
    a, b = full.search(queries, 10), low.search(queries, 10)
    tol = 2e-3 if dtype == "float16" else 1.6e-2
    np.testing.assert_allclose(a[0], b[0], atol=tol)


@pytest.mark.parametrize("first_stage", ["ivf", "hnsw"])
def test_approximate_first_stages_run(corpus, queries, first_stage):
    index = IMRNNIndex(model_for(), feedback_k=10, first_stage=first_stage, nlist=8, nprobe=8)
    index.add(corpus)
    s, i = index.search(queries, 5)
    assert (i >= 0).all() and np.isfinite(s).all()
    flat = IMRNNIndex(index.model, feedback_k=10)
    flat.add(corpus)
    # nprobe == nlist makes IVF exact; HNSW at this size is exact in practice
    np.testing.assert_array_equal(i, flat.search(queries, 5)[1])


def test_auto_first_stage_space_follows_semantics():
    assert IMRNNIndex(model_for()).first_stage_space == "base"
    v01 = model_for(aggregation="transform_of_mean")
    assert IMRNNIndex(v01).first_stage_space == "projected"
    assert IMRNNIndex(v01, first_stage_space="base").first_stage_space == "base"


def test_projected_first_stage_space(corpus, queries):
    model = model_for()
    index = IMRNNIndex(model, feedback_k=10, first_stage_space="projected")
    index.add(corpus)
    _, i = index.search(queries, 10)
    with torch.no_grad():
        pq, pc = model.project(torch.from_numpy(queries)), model.project(torch.from_numpy(corpus))
    fs = torch.topk(pq @ pc.T, 10).indices.numpy()
    assert all(set(i[b]) == set(fs[b]) for b in range(5))


def test_save_load_round_trip(tmp_path, corpus, queries):
    index = IMRNNIndex(model_for("affine"), feedback_k=12, storage_dtype="float16", encoder="enc-x")
    index.add(corpus)
    index.save(tmp_path / "idx")
    again = IMRNNIndex.load(tmp_path / "idx")
    assert again.ntotal == N and again.storage_dtype == torch.float16 and again.encoder == "enc-x"
    for mode in ("rerank", "exhaustive"):
        a, b = index.search(queries, 10, mode), again.search(queries, 10, mode)
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_array_equal(a[0], b[0])
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert set(manifest["files"]) >= {
        "corpus.safetensors",
        "first_stage.faiss",
        "adapter/config.json",
    }


def test_truncated_and_tampered_files_are_detected(tmp_path, corpus):
    index = IMRNNIndex(model_for(), feedback_k=5)
    index.add(corpus)
    index.save(tmp_path / "idx")
    target = tmp_path / "idx" / "corpus.safetensors"
    data = target.read_bytes()
    target.write_bytes(data[:-10])
    with pytest.raises(IndexError_, match="corpus.safetensors: .* truncated"):
        IMRNNIndex.load(tmp_path / "idx")
    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 0xFF
    target.write_bytes(bytes(flipped))
    with pytest.raises(IndexError_, match="corpus.safetensors: SHA-256 differs"):
        IMRNNIndex.load(tmp_path / "idx")
    target.unlink()
    with pytest.raises(FileNotFoundError, match="index file missing: .*corpus.safetensors"):
        IMRNNIndex.load(tmp_path / "idx")
    (tmp_path / "idx" / "manifest.json").write_text("{")
    with pytest.raises(IndexError_, match="manifest.json: not valid JSON"):
        IMRNNIndex.load(tmp_path / "idx")
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        IMRNNIndex.load(tmp_path)


def test_failed_save_keeps_previous_index(tmp_path, corpus, queries, monkeypatch):
    index = IMRNNIndex(model_for(), feedback_k=5)
    index.add(corpus[:50])
    index.save(tmp_path / "idx")
    before = IMRNNIndex.load(tmp_path / "idx").search(queries, 3)
    index.add(corpus[50:])

    def boom(*a, **kw):
        raise OSError("disk full")

    monkeypatch.setattr("imrnns.index.first_stage.write", boom)
    with pytest.raises(OSError, match="disk full"):
        index.save(tmp_path / "idx")
    monkeypatch.undo()
    again = IMRNNIndex.load(tmp_path / "idx")
    assert again.ntotal == 50
    np.testing.assert_array_equal(again.search(queries, 3)[1], before[1])
    assert [p.name for p in tmp_path.iterdir()] == ["idx"]


def test_bad_input(corpus, queries):
    model = model_for()
    with pytest.raises(TypeError, match="IMRNN"):
        IMRNNIndex("model")
    with pytest.raises(ValueError, match="feedback_k"):
        IMRNNIndex(model, feedback_k=0)
    with pytest.raises(ValueError, match="first_stage"):
        IMRNNIndex(model, first_stage="lsh")
    with pytest.raises(ValueError, match="storage_dtype"):
        IMRNNIndex(model, storage_dtype="int8")
    index = IMRNNIndex(model, feedback_k=5)
    with pytest.raises(ValueError, match="index is empty"):
        index.search(queries, 3)
    with pytest.raises(ValueError, match=r"shape \(N, 48\), got \(4, 47\)"):
        index.add(np.zeros((4, 47), dtype=np.float32))
    with pytest.raises(TypeError, match="must hold floats"):
        index.add(np.zeros((4, 48), dtype=np.int64))
    bad = corpus[:4].copy()
    bad[2, 3] = np.nan
    with pytest.raises(ValueError, match="embeddings contains 1 NaN/Inf"):
        index.add(bad)
    assert index.ntotal == 0, "a rejected add must not change the index"
    index.add(corpus)
    with pytest.raises(ValueError, match=r"queries must have shape \(B, 48\)"):
        index.search(queries[:, :40], 3)
    with pytest.raises(ValueError, match="mode must be one of"):
        index.search(queries, 3, mode="fast")
    with pytest.raises(ValueError, match="k must be positive"):
        index.search(queries, 0)
    with pytest.raises(TypeError, match="numpy array or torch tensor"):
        index.search(queries.tolist(), 3)
    q = queries.copy()
    q[0, 0] = np.inf
    with pytest.raises(ValueError, match="queries contains 1 NaN/Inf"):
        index.search(q, 3)
    index.encoder = "minilm@abc"
    with pytest.raises(ValueError, match="built with 'minilm@abc'"):
        index.search(queries, 3, encoder="e5@def")


def test_single_query_and_uses_fused_ops(corpus, queries):
    index = IMRNNIndex(model_for(), feedback_k=10)
    index.add(corpus)
    s, i = index.search(queries[:1], 4)
    assert s.shape == (1, 4)
    with K.use_backend("reference"):
        s2, i2 = index.search(queries[:1], 4)
    np.testing.assert_array_equal(i, i2)
    np.testing.assert_allclose(s, s2, atol=1e-5)


def test_ivf_default_nlist_fits_small_corpora(tmp_path, corpus, queries):
    # Regression: the default nlist (4 sqrt(N)) exceeded N below 16 documents, so a small
    # first add() and load(rows=...) of a small IVF slice raised.
    small = IMRNNIndex(model_for(), feedback_k=5, first_stage="ivf")
    small.add(corpus[:10])
    assert small.nlist <= 10 and small.search(queries, 3)[1].shape == (5, 3)
    index = IMRNNIndex(model_for(), feedback_k=5, first_stage="ivf")
    index.add(corpus[:100])
    index.save(tmp_path / "idx")
    part = IMRNNIndex.load(tmp_path / "idx", rows=(3, 8))
    assert part.ntotal == 5 and part.search(queries, 3)[1].max() < 5
    explicit = IMRNNIndex(model_for(), feedback_k=5, first_stage="ivf", nlist=20)
    with pytest.raises(ValueError, match="nlist=20 needs at least 20 documents"):
        explicit.add(corpus[:10])
    assert explicit.ntotal == 0 and explicit.first_stage_vectors().shape[0] == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"first_stage": "hnsw", "hnsw_m": 1},  # faiss segfaults
        {"first_stage": "hnsw", "hnsw_m": 0},  # faiss aborts
        {"first_stage": "hnsw", "hnsw_m": -1},  # faiss hangs
        {"first_stage": "hnsw", "ef_search": 0},
        {"first_stage": "ivf", "nprobe": 0},
        {"first_stage": "ivf", "nlist": 0},
        {"first_stage": "ivf", "nlist": 2.5},
    ],
)
def test_invalid_faiss_parameters_are_rejected_up_front(kwargs):
    name = next(k for k in kwargs if k != "first_stage")
    with pytest.raises(ValueError, match=f"{name} must"):
        IMRNNIndex(model_for(), feedback_k=5, **kwargs)


def test_save_refuses_to_replace_a_directory_of_other_files(tmp_path, corpus):
    # Regression: save() swapped its directory in as a whole, deleting unrelated files.
    index = IMRNNIndex(model_for(), feedback_k=5)
    index.add(corpus[:20])
    target = tmp_path / "work"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    refused = r"work is not an earlier index save \(it has no manifest.json; .*notes.txt"
    with pytest.raises(ValueError, match=refused):
        index.save(target)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    index.save(tmp_path / "idx")
    index.save(tmp_path / "idx")  # replacing an earlier index is the point
    assert IMRNNIndex.load(tmp_path / "idx").ntotal == 20


@pytest.mark.parametrize(
    "edit, pattern",
    [
        (lambda m: m.pop("index"), "invalid 'index' settings"),
        (lambda m: m.pop("ntotal"), "'ntotal' must be"),
        (lambda m: m.__setitem__("files", []), "'files' must map"),
        (lambda m: m["files"]["corpus.safetensors"].pop("bytes"), "'files' must map"),
        (lambda m: m["files"].pop("corpus.safetensors"), "does not list"),
        (lambda m: m.__setitem__("format_version", "1"), "format_version must be an int"),
        (lambda m: m["index"].__setitem__("bogus", 1), "invalid index settings"),
    ],
)
@pytest.mark.parametrize("rows", [None, (0, 5)])
def test_malformed_manifest_is_an_index_error_naming_it(tmp_path, corpus, edit, pattern, rows):
    # Regression: KeyError / AttributeError / TypeError that named no file, and a manifest
    # that no longer listed a file skipped that file's checks.
    index = IMRNNIndex(model_for(), feedback_k=5)
    index.add(corpus[:20])
    index.save(tmp_path / "idx")
    path = tmp_path / "idx" / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(IndexError_, match=f"manifest.json: .*{pattern}"):
        IMRNNIndex.load(tmp_path / "idx", rows=rows)


def test_unreadable_doc_ids_name_the_file_without_verify(tmp_path, corpus):
    index = IMRNNIndex(model_for(), feedback_k=5)
    index.add(corpus[:20], doc_ids=[f"d{i}" for i in range(20)])
    index.save(tmp_path / "idx")
    path = tmp_path / "idx" / "doc_ids.json"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] = 0xFF  # same size, not UTF-8
    path.write_bytes(bytes(raw))
    with pytest.raises(IndexError_, match="doc_ids.json: not valid JSON"):
        IMRNNIndex.load(tmp_path / "idx", verify=False)


def test_query_state_of_no_queries(corpus):
    # Regression: search() of (0, n) queries worked, query_state() failed in torch.cat.
    index = IMRNNIndex(model_for(), feedback_k=5)
    index.add(corpus[:20])
    state = index.query_state(np.zeros((0, DIM), np.float32))
    assert state.feedback_ids.shape == (0, 5) and state.modulated_queries.shape == (0, DIM)


def test_doc_ids_as_one_string_is_refused(corpus):
    # Regression: a str is a sequence, so "abc" named three documents "a", "b", "c".
    index = IMRNNIndex(model_for(), feedback_k=2)
    with pytest.raises(ValueError, match="doc_ids must be 3 strings"):
        index.add(corpus[:3], doc_ids="abc")
    assert index.ntotal == 0
    index.add(corpus[:3], doc_ids=["a", "b", "c"])
    assert index.doc_ids == ["a", "b", "c"]
