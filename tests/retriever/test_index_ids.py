"""IMRNNIndex documents by id: int and string ids, remove, amortised add, ids on disk."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from imrnns import IMRNN, IMRNNConfig, IMRNNIndex
from imrnns.index import IndexError_, core
from imrnns.index.first_stage import faiss_available
from tests.helpers import randomised, rebuilt_index

DIM, N, B = 20, 120, 5
MODES = ["rerank", "exhaustive"]


def _model(aggregation: str = "mean_of_transforms") -> IMRNN:
    torch.manual_seed(1)
    return randomised(IMRNNConfig(input_dim=DIM, dim=DIM, aggregation=aggregation))


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    corpus = rng.standard_normal((N, DIM)).astype(np.float32)
    corpus[60:64] = corpus[0:4]  # exact ties, broken by add order
    return corpus, rng.standard_normal((B, DIM)).astype(np.float32)


def _results(index: IMRNNIndex, queries: np.ndarray, mode: str, k: int = 10) -> tuple:
    scores, ids = index.search(queries, k, mode)
    return np.asarray(scores), np.asarray(ids).tolist()


def _equal(a: tuple, b: tuple) -> None:
    assert a[1] == b[1]
    np.testing.assert_allclose(a[0], b[0], rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- ids
def test_default_ids_are_add_order_positions() -> None:
    corpus, queries = _data()
    index = IMRNNIndex(_model(), feedback_k=15)
    first = index.add(corpus[:50])
    second = index.add(torch.from_numpy(corpus[50:]))
    assert isinstance(first, np.ndarray) and first.tolist() == list(range(50))
    assert isinstance(second, torch.Tensor) and second.tolist() == list(range(50, N))
    assert index.id_kind == "int" and index.ids.tolist() == list(range(N))
    rows = index.query_state(queries).feedback_ids
    assert index.first_stage_search(queries, 15)[1].tolist() == rows.tolist()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("spelling", ["list", "numpy", "tensor"])
def test_int_ids_map_every_result(mode: str, spelling: str) -> None:
    corpus, queries = _data()
    ids = np.random.default_rng(2).choice(2**62, size=N, replace=False).astype(np.int64)
    given = {"list": ids.tolist(), "numpy": ids, "tensor": torch.from_numpy(ids)}[spelling]
    plain, named = IMRNNIndex(_model(), feedback_k=15), IMRNNIndex(_model(), feedback_k=15)
    plain.add(corpus)
    assert named.add(corpus, ids=given).tolist() == ids.tolist()
    want_s, rows = plain.search(queries, 20, mode)
    got_s, got = named.search(queries, 20, mode)
    assert got.dtype == np.int64
    assert got.tolist() == np.where(rows >= 0, ids[np.maximum(rows, 0)], -1).tolist()
    np.testing.assert_array_equal(got_s, want_s)
    _, t_ids = named.search(torch.from_numpy(queries), 20, mode)
    assert isinstance(t_ids, torch.Tensor) and t_ids.tolist() == got.tolist()


@pytest.mark.parametrize("spelling", ["ids", "doc_ids"])
def test_string_ids_come_back_as_strings(spelling: str) -> None:
    corpus, queries = _data()
    names = [f"doc-{i}" for i in range(N)]
    plain, named = IMRNNIndex(_model(), feedback_k=8), IMRNNIndex(_model(), feedback_k=8)
    plain.add(corpus)
    assert named.add(corpus, **{spelling: names}) == names
    _, rows = plain.search(queries, 10)  # rerank: 8 real results, 2 padded
    scores, got = named.search(queries, 10)
    assert got.dtype == object and got.shape == (B, 10)
    assert got.tolist() == [[names[r] if r >= 0 else None for r in row] for row in rows]
    assert np.isneginf(scores[:, 8:]).all() and (got[:, 8:] == None).all()  # noqa: E711
    _, as_list = named.search(torch.from_numpy(queries), 10)
    assert as_list == got.tolist()
    assert named.doc_ids == names and named.ids == names and named.id_kind == "str"


def test_ids_are_checked_before_anything_changes() -> None:
    corpus, _ = _data()
    index = IMRNNIndex(_model(), feedback_k=5)
    index.add(corpus[:10], ids=range(100, 110))
    cases = [
        ({"ids": [5, 5]}, ValueError, r"ids must be unique: 5 appear more than once"),
        ({"ids": [105, 7]}, ValueError, r"ids must be new: 105 already in the index"),
        ({"ids": ["a", "b"]}, ValueError, r"this index holds int ids, this add\(\) gives str"),
        ({"doc_ids": ["a", "b"]}, ValueError, r"this index holds int ids"),
        ({"ids": [-1, 3]}, ValueError, r"ids must be ints in \[0, 2\*\*63 - 1\].*-1"),
        ({"ids": [True, 3]}, TypeError, r"ids must be all ints or all strings"),
        ({"ids": [1, "a"]}, TypeError, r"ids must be all ints or all strings"),
        ({"ids": [1]}, ValueError, r"ids must be 2 ids, one per embedding row, got 1"),
        ({"ids": 7}, TypeError, r"ids must be a sequence of 2 ints or 2 strings, got int"),
        ({"ids": np.zeros(2)}, TypeError, r"ids must be a 1-D array of ints, got float64"),
        ({"ids": [1, 2], "doc_ids": ["a", "b"]}, ValueError, "not both"),
    ]
    for kwargs, exc, match in cases:
        with pytest.raises(exc, match=match):
            index.add(corpus[10:12], **kwargs)
        assert index.ntotal == 10 and index.ids.tolist() == list(range(100, 110))
    assert index.add(corpus[10:12]).tolist() == [110, 111]  # defaults continue past the max
    named = IMRNNIndex(_model(), feedback_k=5)
    named.add(corpus[:3], doc_ids=["a", "b", "c"])
    with pytest.raises(ValueError, match="doc_ids must be given on every add"):
        named.add(corpus[3:5])
    with pytest.raises(ValueError, match=r"ids must be new: 'b' already in the index"):
        named.add(corpus[3:5], ids=["x", "b"])


# --------------------------------------------------------------------------- remove
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("aggregation", ["mean_of_transforms", "transform_of_mean"])
@pytest.mark.parametrize("path", ["deeper", "gather"])
def test_remove_equals_an_index_without_the_documents(
    mode: str, aggregation: str, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "deeper": few removed rows, searched k + removed deep then dropped; "gather": the live
    # rows gathered (many removed rows, or any allow=).
    if path == "gather":
        monkeypatch.setattr(core, "DEAD_SKIP_MAX", 0)
    corpus, queries = _data()
    ids = np.arange(N, dtype=np.int64) * 3 + 7
    index = IMRNNIndex(_model(aggregation), feedback_k=15)
    index.add(corpus, ids=ids)
    gone = [7, 10, 3 * 60 + 7, 3 * 61 + 7]  # rows 0, 1, 60, 61: ties among duplicates
    assert index.remove(gone) == 4 and index.ntotal == N - 4
    assert index._n_dead == 4  # tombstones: below the compaction threshold
    keep = np.setdiff1d(np.arange(N), [0, 1, 60, 61])
    alone = rebuilt_index(index, keep, ids[keep])
    want = _results(alone, queries, mode)
    _equal(_results(index, queries, mode), want)
    _equal(_results(index, queries[:1], mode), _results(alone, queries[:1], mode))
    got_fs, want_fs = index.first_stage_search(queries, 30), alone.first_stage_search(queries, 30)
    assert got_fs[1].tolist() == want_fs[1].tolist()
    index.compact()
    assert index._n_dead == 0 and index.projected_corpus.shape[0] == N - 4
    _equal(_results(index, queries, mode), want)
    assert index.ids.tolist() == ids[keep].tolist()


def test_remove_unknown_ids_changes_nothing_and_names_them() -> None:
    corpus, queries = _data()
    index = IMRNNIndex(_model(), feedback_k=10)
    index.add(corpus[:30], doc_ids=[f"d{i}" for i in range(30)])
    before = index.search(queries, 5)
    with pytest.raises(ValueError, match=r"remove\(\): ids not in the index: 'nope'"):
        index.remove(["d1", "nope"])
    with pytest.raises(TypeError, match="this index holds str ids, got 3"):
        index.remove([3])
    with pytest.raises(TypeError, match="remove\\(\\) must be a collection of ids"):
        index.remove("d1")
    assert index.ntotal == 30 and index.search(queries, 5)[1].tolist() == before[1].tolist()
    assert index.remove(["d1", "d1"]) == 1
    with pytest.raises(ValueError, match="ids not in the index: 'd1'"):
        index.remove(["d1"])
    index.add(corpus[1:2], ids=["d1"])  # a removed id may come back
    assert index.ids[-1] == "d1" and index.ntotal == 30


def test_compaction_keeps_removal_amortised_and_results_exact() -> None:
    corpus, queries = _data()
    index = IMRNNIndex(_model(), feedback_k=10)
    index.add(corpus)
    removed: list[int] = []
    compactions = 0
    for i in range(0, 100, 2):  # one at a time
        slots_before = index.projected_corpus.shape[0]
        index.remove([i])
        removed.append(i)
        compactions += index.projected_corpus.shape[0] < slots_before
        assert index._n_dead < 0.25 * index.projected_corpus.shape[0] + 1
    assert 1 <= compactions <= math.ceil(math.log(N / 70, 4 / 3)) + 1
    keep = np.setdiff1d(np.arange(N), removed)
    fresh = IMRNNIndex(_model(), feedback_k=10)
    fresh.add(corpus[keep], ids=keep)
    for mode in MODES:
        got, want = _results(index, queries, mode), _results(fresh, queries, mode)
        assert got[1] == want[1]
        np.testing.assert_allclose(got[0], want[0], rtol=0, atol=1e-5)
    index.remove(index.ids)  # everything
    assert index.ntotal == 0
    with pytest.raises(ValueError, match="the index is empty"):
        index.search(queries, 3)


@pytest.mark.skipif(not faiss_available(), reason="faiss not installed")
@pytest.mark.parametrize("first_stage", ["ivf", "hnsw"])
def test_removed_ids_never_come_back_from_approximate_stages(first_stage: str) -> None:
    corpus, queries = _data()
    index = IMRNNIndex(_model(), feedback_k=20, first_stage=first_stage, nlist=6)
    index.add(corpus)
    _, top = index.search(queries, 5)
    gone = set(np.unique(top).tolist())
    index.remove(sorted(gone)[:5])  # tombstones (below the threshold)
    for mode in MODES:
        assert not set(index.search(queries, 30, mode)[1].ravel().tolist()) & set(sorted(gone)[:5])
    rest = (set(sorted(gone)[5:]) | set(range(64, 90))) - set(sorted(gone)[:5])
    index.remove(rest)  # past the threshold: rebuilt
    assert index._n_dead == 0 and index.projected_corpus.shape[0] == index.ntotal
    live = set(index.ids.tolist())
    for mode in MODES:
        got = index.search(queries, 30, mode)[1]
        assert set(got[got >= 0].tolist()) <= live


# --------------------------------------------------------------------------- amortised add
def test_many_small_adds_copy_linear_bytes() -> None:
    # Regression: each add concatenated the corpus, cache and first stage (quadratic).
    corpus, queries = _data()
    index = IMRNNIndex(_model(), feedback_k=10)
    n = 0
    for lo in range(0, N, 1):
        index.add(corpus[lo : lo + 1], ids=[lo])
        n += 1
    buffers = [index._corpus_rows, index._cache_rows, index._faiss._rows, index._ids._ints]
    for buf in buffers:
        assert buf.rows == N
        assert buf.reallocations <= math.ceil(math.log2(N / buf.MIN_CAPACITY)) + 1
        assert buf.rows_copied < 2 * N
    whole = IMRNNIndex(_model(), feedback_k=10)
    whole.add(corpus)
    for mode in MODES:
        got, want = _results(index, queries, mode), _results(whole, queries, mode)
        assert got[1] == want[1]
        np.testing.assert_allclose(got[0], want[0], rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- on disk
@pytest.mark.parametrize("kind", ["default", "int", "str"])
def test_ids_and_removals_survive_save_and_load(tmp_path: Path, kind: str) -> None:
    corpus, queries = _data()
    ids = {"default": None, "int": np.arange(N)[::-1] * 5, "str": [f"s{i}" for i in range(N)]}
    index = IMRNNIndex(_model(), feedback_k=12)
    added = index.add(corpus, ids=ids[kind])
    gone = list(np.asarray(added)[[3, 60, 61]].tolist())
    index.remove(gone)
    before = {mode: _results(index, queries, mode) for mode in MODES}
    index.save(tmp_path / "ix")
    manifest = json.loads((tmp_path / "ix" / "manifest.json").read_text())
    assert manifest["format_version"] == 2
    assert manifest["ids"] == {"int": kind == "int", "removed": 3}
    loaded = IMRNNIndex.load(tmp_path / "ix")
    assert loaded.ntotal == N - 3 and list(loaded.ids) == list(index.ids)
    for mode in MODES:
        _equal(_results(loaded, queries, mode), before[mode])
    with pytest.raises(ValueError, match="ids not in the index"):
        loaded.remove(gone[:1])
    part = IMRNNIndex.load(tmp_path / "ix", rows=(50, 70))
    assert part.ntotal == 18
    if kind != "default":  # default ids of a slice are its positions (as before)
        assert list(part.ids) == [x for x in list(added)[50:70] if x not in gone]


def test_a_plain_index_is_saved_in_the_old_format(tmp_path: Path) -> None:
    # Backward compatibility: default or string ids, nothing removed -> format 1, no new file,
    # so releases before ids read it; and such a directory loads here with its ids.
    corpus, queries = _data()
    index = IMRNNIndex(_model(), feedback_k=12)
    index.add(corpus, doc_ids=[f"d{i}" for i in range(N)])
    index.save(tmp_path / "ix")
    manifest = json.loads((tmp_path / "ix" / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and "ids" not in manifest
    assert sorted(manifest["files"]) == [
        "adapter/config.json",
        "adapter/model.safetensors",
        "corpus.safetensors",
        "doc_ids.json",
        "first_stage.faiss",
    ]
    loaded = IMRNNIndex.load(tmp_path / "ix")
    assert loaded.search(queries, 4)[1].tolist() == index.search(queries, 4)[1].tolist()


def _rewrite(directory: Path, tensors: dict, entry: dict) -> None:
    """Replace ids.safetensors and its manifest entry (sizes and SHA-256 kept consistent)."""
    from safetensors.torch import save_file

    from imrnns.index.storage import sha256_file

    path = directory / "ids.safetensors"
    save_file(tensors, str(path))
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["files"]["ids.safetensors"] = {
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
    }
    manifest["ids"] = entry
    (directory / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("tensors", "entry", "match"),
    [
        ({"ids": torch.zeros(N, dtype=torch.int64)}, {"int": True, "removed": 0}, "ids repeat"),
        ({"ids": torch.arange(N) - 1}, {"int": True, "removed": 0}, "ids must be >= 0"),
        ({"ids": torch.arange(N - 1)}, {"int": True, "removed": 0}, r"expected int64 \(120,\)"),
        ({"ids": torch.arange(N).int()}, {"int": True, "removed": 0}, "I32"),
        ({"removed": torch.tensor([5, 3])}, {"int": False, "removed": 2}, "increasing rows"),
        ({"removed": torch.tensor([N])}, {"int": False, "removed": 1}, "increasing rows"),
        ({"removed": torch.tensor([1])}, {"int": True, "removed": 1}, r"promises \['ids', 're"),
        ({"removed": torch.tensor([1])}, {"int": False, "removed": 0}, "'ids' must be"),
    ],
)
def test_bad_ids_files_are_refused_naming_them(tmp_path: Path, tensors, entry, match) -> None:
    corpus, _ = _data()
    index = IMRNNIndex(_model(), feedback_k=12)
    index.add(corpus, ids=np.arange(N) + 10)
    index.save(tmp_path / "ix")
    _rewrite(tmp_path / "ix", tensors, entry)
    with pytest.raises(IndexError_, match=match) as info:
        IMRNNIndex.load(tmp_path / "ix")
    assert "ids.safetensors" in str(info.value) or "manifest.json" in str(info.value)


# --------------------------------------------------------------------------- the next id
def _five(tmp_path: Path, gone: list[int]) -> IMRNNIndex:
    """5 documents (ids 0 .. 4), ``gone`` removed, saved and loaded."""
    corpus, _ = _data()
    index = IMRNNIndex(_model(), feedback_k=3)
    assert index.add(corpus[:5]).tolist() == [0, 1, 2, 3, 4]
    index.remove(gone)
    index.save(tmp_path / "ix")
    return IMRNNIndex.load(tmp_path / "ix")


@pytest.mark.parametrize("gone", [[4], [3, 4], [2, 3, 4]])
def test_ids_are_never_reused_after_save_and_load(tmp_path: Path, gone: list[int]) -> None:
    # Regression: the next default id was not saved. [4] kept its tombstone (saved, so the
    # load inferred 5 already); [3, 4] and [2, 3, 4] compact the last rows away, and the
    # load handed out 3 (2) again.
    corpus, _ = _data()
    loaded = _five(tmp_path, gone)
    assert loaded.next_id == 5
    assert loaded.add(corpus[5:6]).tolist() == [5]
    manifest = json.loads((tmp_path / "ix" / "manifest.json").read_text())
    if len(gone) > 1:  # saved only where a load could not infer it
        assert manifest["next_id"] == 5 and manifest["format_version"] == 2
        # a slice keeps it too (a shard adds after it)
        assert IMRNNIndex.load(tmp_path / "ix", rows=(0, 2)).next_id == 5
    else:
        assert "next_id" not in manifest


def test_a_save_without_next_id_loads_as_before(tmp_path: Path) -> None:
    # Backward compatibility: a manifest without "next_id" infers it (largest id + 1, or N).
    corpus, _ = _data()
    index = IMRNNIndex(_model(), feedback_k=3)
    index.add(corpus[:5], ids=[7, 3, 9, 1, 2])
    index.save(tmp_path / "ix")
    manifest = json.loads((tmp_path / "ix" / "manifest.json").read_text())
    assert "next_id" not in manifest
    assert IMRNNIndex.load(tmp_path / "ix").add(corpus[:1]).tolist() == [10]
    plain = IMRNNIndex(_model(), feedback_k=3)
    plain.add(corpus[:5])
    plain.save(tmp_path / "plain")
    manifest = json.loads((tmp_path / "plain" / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and "next_id" not in manifest
    assert IMRNNIndex.load(tmp_path / "plain").add(corpus[:1]).tolist() == [5]


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (2, r"next_id must be an int in \[3, 2\*\*63\]"),
        ("6", r"'next_id' must be an int in \[0, 2\*\*63\]"),
        (True, r"'next_id' must be an int"),
        (2**64, r"'next_id' must be an int"),
    ],
)
def test_a_bad_next_id_is_refused_naming_the_manifest(tmp_path: Path, value, match) -> None:
    _five(tmp_path, [3, 4])
    path = tmp_path / "ix" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["next_id"] = value  # the manifest's own checksum is not listed: no rewrite
    path.write_text(json.dumps(manifest))
    with pytest.raises(IndexError_, match=match) as info:
        IMRNNIndex.load(tmp_path / "ix")
    assert "manifest.json" in str(info.value)


def test_from_parts_takes_a_next_id_and_checks_it() -> None:
    corpus, _ = _data()
    index = IMRNNIndex(_model(), feedback_k=3)
    index.add(corpus[:4], ids=[0, 1, 2, 8])
    parts = (index.model, index.projected_corpus, index.first_stage_vectors())
    rebuilt = IMRNNIndex.from_parts(*parts, ids=index.ids, next_id=20, **index.settings())
    assert rebuilt.next_id == 20 and rebuilt.add(corpus[:1]).tolist() == [20]
    with pytest.raises(ValueError, match=r"next_id must be an int in \[9, 2\*\*63\]"):
        IMRNNIndex.from_parts(*parts, ids=index.ids, next_id=8, **index.settings())
    with pytest.raises(ValueError, match="next_id applies to int ids"):
        IMRNNIndex.from_parts(*parts, doc_ids=list("abcd"), next_id=8, **index.settings())


def test_a_removed_id_added_again_saves_and_loads(tmp_path: Path) -> None:
    # Regression: a removed id added again before compaction was saved twice (its tombstone
    # and the new row), and the load refused the directory ("ids repeat").
    corpus, queries = _data()
    for ids in (list(range(10, 18)), [f"d{i}" for i in range(8)]):
        index = IMRNNIndex(_model(), feedback_k=3)
        index.add(corpus[:8], ids=ids)
        index.remove([ids[1]])
        index.add(corpus[8:9], ids=[ids[1]])
        index.save(tmp_path / "ix")
        loaded = IMRNNIndex.load(tmp_path / "ix")
        assert list(loaded.ids) == list(index.ids)
        _equal(
            _results(loaded, queries, "exhaustive", 5), _results(index, queries, "exhaustive", 5)
        )
