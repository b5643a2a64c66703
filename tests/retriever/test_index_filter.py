"""IMRNNIndex.search(allow=...): equals an index built from the allowed documents alone.

Both modes (rerank, exhaustive) and both first-stage spaces / aggregations (v0.2
``mean_of_transforms`` over the base first stage, v0.1 ``transform_of_mean`` over the
projected one); ties from duplicate documents, allow sets smaller than k and than
feedback_k (padding), empty sets, masks, removals, and the approximate stages (which only
promise allowed ids).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imrnns import IMRNN, IMRNNConfig, IMRNNIndex
from imrnns.index.first_stage import faiss_available
from tests.helpers import randomised, rebuilt_index

DIM, N, B = 24, 160, 6
MODES = ["rerank", "exhaustive"]
KINDS = ["v02-base", "v01-projected"]


def _model(kind: str) -> IMRNN:
    aggregation = "mean_of_transforms" if kind == "v02-base" else "transform_of_mean"
    torch.manual_seed(3)
    return randomised(IMRNNConfig(input_dim=DIM, dim=DIM, aggregation=aggregation))


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(corpus with duplicated rows (exact ties), queries, unique int ids in random order)."""
    rng = np.random.default_rng(seed)
    corpus = rng.standard_normal((N, DIM)).astype(np.float32)
    corpus[40:50] = corpus[10:20]  # duplicates: equal scores, broken by add order
    corpus[90:95] = corpus[10:15]
    queries = rng.standard_normal((B, DIM)).astype(np.float32)
    queries[-1] = corpus[12]  # a query on a duplicated document: ties at the top
    ids = rng.choice(10**6, size=N, replace=False).astype(np.int64)
    return corpus, queries, ids


def _index(kind: str, feedback_k: int = 12) -> IMRNNIndex:
    return IMRNNIndex(_model(kind), feedback_k=feedback_k)


def _same(got: tuple, want: tuple) -> None:
    got_s, got_i = (np.asarray(x) for x in got)
    want_s, want_i = (np.asarray(x) for x in want)
    assert got_i.tolist() == want_i.tolist()
    np.testing.assert_allclose(got_s, want_s, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", [120, 30, 7, 3, 1])  # 7, 3, 1 < k = 10 and < feedback_k
def test_allow_equals_an_index_of_the_allowed_documents(kind: str, mode: str, size: int) -> None:
    corpus, queries, ids = _data()
    index = _index(kind)
    index.add(corpus, ids=ids)
    rng = np.random.default_rng(size)
    keep = np.sort(rng.choice(N, size=size, replace=False))
    keep = np.union1d(keep, [12, 42]) if size >= 30 else keep  # a tie inside the set
    want_index = rebuilt_index(index, keep, ids[keep])
    for q in (queries, queries[:1]):  # one query: the faiss brute-force backend when present
        want = want_index.search(q, 10, mode)
        got = index.search(q, 10, mode, allow=set(ids[keep].tolist()))
        _same(got, want)
        mask = np.isin(index.ids, ids[keep])
        _same(index.search(q, 10, mode, allow=mask), want)
        _same(index.search(torch.from_numpy(q), 10, mode, allow=torch.from_numpy(mask)), want)
    state = index.query_state(queries, allow=ids[keep])
    rows = state.feedback_ids[state.feedback_ids >= 0].unique().numpy()
    assert set(rows.tolist()) <= set(keep.tolist())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_allow_equals_an_index_added_from_the_allowed_embeddings(kind: str, mode: str) -> None:
    # The literal statement: add() only the allowed documents (no ties: distinct rows).
    rng = np.random.default_rng(5)
    corpus = rng.standard_normal((N, DIM)).astype(np.float32)
    queries = rng.standard_normal((B, DIM)).astype(np.float32)
    names = [f"doc-{i}" for i in range(N)]
    keep = np.sort(rng.choice(N, size=50, replace=False))
    index, alone = _index(kind), _index(kind)
    index.add(corpus, doc_ids=names)
    alone.add(corpus[keep], ids=[names[i] for i in keep])
    got = index.search(queries, 15, mode, allow=[names[i] for i in keep])
    want = alone.search(queries, 15, mode)
    assert got[1].tolist() == want[1].tolist()
    np.testing.assert_allclose(got[0], want[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_allow_after_removals_and_string_ids(mode: str) -> None:
    corpus, queries, _ = _data(1)
    names = [f"d{i}" for i in range(N)]
    index = _index("v02-base")
    index.add(corpus[:100], doc_ids=names[:100])
    index.add(corpus[100:], ids=names[100:])
    index.remove(names[5:25:2])  # below the compaction threshold: tombstones
    assert index._n_dead == 10
    live = [i for i in range(N) if names[i] not in set(names[5:25:2])]
    allowed = [i for i in live if i % 3 != 1]
    want = rebuilt_index(index, np.array(allowed), [names[i] for i in allowed])
    got = index.search(queries, 12, mode, allow={names[i] for i in allowed})
    exp = want.search(queries, 12, mode)
    assert isinstance(got[1], np.ndarray) and got[1].dtype == object
    assert got[1].tolist() == exp[1].tolist()
    np.testing.assert_allclose(got[0], exp[0], rtol=0, atol=1e-6)
    mask = np.array([names.index(d) in set(allowed) for d in index.ids])
    assert index.search(queries, 12, mode, allow=mask)[1].tolist() == exp[1].tolist()


@pytest.mark.parametrize("mode", MODES)
def test_an_empty_allow_set_gives_padding_only(mode: str) -> None:
    corpus, queries, _ = _data()
    index = _index("v02-base")
    index.add(corpus)
    scores, ids = index.search(queries, 4, mode, allow=set())
    assert ids.shape == (B, 4) and (ids == -1).all() and np.isneginf(scores).all()
    scores, ids = index.search(queries, 4, mode, allow=np.zeros(N, dtype=bool))
    assert (ids == -1).all() and np.isneginf(scores).all()
    assert (index.first_stage_search(queries, 3, allow=[])[1] == -1).all()
    with pytest.raises(ValueError, match="allow selects no document"):
        index.query_state(queries, allow=[])


def test_string_padding_is_none_with_minus_inf_scores() -> None:
    corpus, queries, _ = _data()
    index = _index("v02-base")
    index.add(corpus[:5], ids=["a", "b", "c", "d", "e"])
    scores, ids = index.search(torch.from_numpy(queries), 8, "exhaustive", allow={"b", "d"})
    assert isinstance(ids, list) and all(row[2:] == [None] * 6 for row in ids)
    assert all(set(row[:2]) == {"b", "d"} for row in ids)
    assert torch.isneginf(scores[:, 2:]).all() and torch.isfinite(scores[:, :2]).all()


def test_bad_allow_raises_naming_it() -> None:
    corpus, queries, _ = _data()
    index = _index("v02-base")
    index.add(corpus[:20])
    index.remove([3])
    with pytest.raises(ValueError, match=r"allow: ids not in the index: 3, 99"):
        index.search(queries, 3, allow=[1, 3, 99])
    with pytest.raises(TypeError, match="this index holds int ids, got 'x'"):
        index.search(queries, 3, allow=["x"])
    with pytest.raises(ValueError, match=r"boolean mask must have shape \(19,\)"):
        index.search(queries, 3, allow=np.ones(20, dtype=bool))
    with pytest.raises(TypeError, match="allow must be a collection of ids"):
        index.search(queries, 3, allow=4)


@pytest.mark.skipif(not faiss_available(), reason="faiss not installed")
@pytest.mark.parametrize("first_stage", ["ivf", "hnsw"])
@pytest.mark.parametrize("mode", MODES)
def test_approximate_stages_return_only_allowed_ids(first_stage: str, mode: str) -> None:
    corpus, queries, ids = _data()
    index = IMRNNIndex(_model("v02-base"), feedback_k=12, first_stage=first_stage, nlist=8)
    index.add(corpus, ids=ids)
    keep = set(ids[::4].tolist())
    index.remove(ids[1:9:2])
    scores, got = index.search(queries, 10, mode, allow=keep)
    real = got[got >= 0]
    assert real.size > 0 and set(real.tolist()) <= keep
    assert np.isneginf(scores[got < 0]).all()
    state = index.query_state(queries, allow=keep)
    rows = state.feedback_ids[state.feedback_ids >= 0].numpy()
    assert set(index._ids.table[rows].tolist()) <= keep
