"""The first stage: bounded tie resolution, the k bound, the exact flat search without faiss,
flat files readable by either backend, the GPU fallback warning, unique document names.

Work is counted, never timed: every (query, document) pair a search scores goes through
``first_stage.score_block`` (the torch scan) or a faiss search (``IndexFlatIP.search``,
``IndexIVFFlat.search``, ``first_stage.faiss_knn``), and the fixture ``work`` counts them.
Exact results are compared with a float64 brute force ordered by (score desc, id asc) on data
whose float32 inner products are exact (small multiples of 1/4), so ties are real ties.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import imrnns_kernels
from imrnns import IMRNNConfig, IMRNNIndex
from imrnns.distributed import DistributedIMRNNIndex
from imrnns.evaluate import base_search
from imrnns.index import first_stage, search_ties_by_lower_id
from tests.helpers import randomised

faiss = pytest.importorskip("faiss")

DIM = 16
REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- helpers
def brute(docs: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """float64 top-k by (score desc, id asc), padded with -inf / -1 past N."""
    scores = queries.astype(np.float64) @ docs.astype(np.float64).T
    n = docs.shape[0]
    out_s = np.full((len(queries), k), -np.inf, dtype=np.float32)
    out_i = np.full((len(queries), k), -1, dtype=np.int64)
    for r in range(len(queries)):
        order = np.lexsort((np.arange(n), -scores[r]))[:k]
        out_s[r, : len(order)], out_i[r, : len(order)] = scores[r, order], order
    return out_s, out_i


def exact_rows(rng: np.random.Generator, n: int, d: int = DIM) -> np.ndarray:
    """Rows of small multiples of 1/4: float32 inner products are exact, and many tie."""
    return (rng.integers(-3, 4, size=(n, d)) / 4).astype(np.float32)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def model(dim: int = DIM) -> Any:
    torch.manual_seed(0)
    return randomised(IMRNNConfig(input_dim=dim, dim=dim))


class Work:
    """(query, document) pairs scored and faiss calls made, per kind."""

    def __init__(self) -> None:
        self.pairs = 0  # scored by the torch scan
        self.faiss_calls: list[tuple[int, int]] = []  # (queries, depth) per faiss call
        self.faiss_pairs = 0  # scored by faiss flat searches (each scans all N per query)

    @property
    def total_pairs(self) -> int:
        return self.pairs + self.faiss_pairs


@pytest.fixture
def work(monkeypatch: pytest.MonkeyPatch) -> Work:
    w = Work()
    block, knn = getattr(first_stage, "score_block", None), getattr(first_stage, "faiss_knn", None)
    flat_search = faiss.IndexFlatIP.search
    ivf_search = faiss.IndexIVFFlat.search

    def counted_block(q: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        w.pairs += q.shape[0] * rows.shape[0]
        return block(q, rows)

    def counted_knn(x: np.ndarray, vectors: np.ndarray, depth: int) -> Any:
        w.faiss_calls.append((len(x), depth))
        w.faiss_pairs += len(x) * len(vectors)
        return knn(x, vectors, depth)

    def counted_flat(self: Any, x: np.ndarray, depth: int, *args: Any, **kw: Any) -> Any:
        w.faiss_calls.append((len(x), depth))
        w.faiss_pairs += len(x) * self.ntotal
        return flat_search(self, x, depth, *args, **kw)

    def counted_ivf(self: Any, x: np.ndarray, depth: int, *args: Any, **kw: Any) -> Any:
        w.faiss_calls.append((len(x), depth))
        return ivf_search(self, x, depth, *args, **kw)

    monkeypatch.setattr(first_stage, "score_block", counted_block, raising=False)
    monkeypatch.setattr(first_stage, "faiss_knn", counted_knn, raising=False)
    monkeypatch.setattr(faiss.IndexFlatIP, "search", counted_flat)
    monkeypatch.setattr(faiss.IndexIVFFlat, "search", counted_ivf)
    return w


@pytest.fixture
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("IMRNNS_FIRST_STAGE_BACKEND", request.param)
    return request.param


# --------------------------------------------------------------------------- bounded ties
def test_an_all_zero_query_costs_one_pass_not_a_search_per_doubling(work: Work) -> None:
    # Regression: one all-zero query made the whole block search again with k doubled up to
    # N (16 faiss calls, 41 s instead of 0.16 s over 200,000 documents).
    rng = np.random.default_rng(0)
    n, b, k = 3000, 64, 20
    corpus = rng.standard_normal((n, DIM)).astype(np.float32)
    queries = rng.standard_normal((b, DIM)).astype(np.float32)
    queries[17] = 0.0
    index = IMRNNIndex(model(), feedback_k=k, first_stage_space="base")
    index.add(corpus)
    work.__init__()  # count the search only
    scores, ids = index.first_stage_search(queries, k)
    assert work.total_pairs <= b * n + n, "more than one pass plus one row's re-search"
    assert all(depth <= k + 1 for _, depth in work.faiss_calls), work.faiss_calls
    assert ids[17].tolist() == list(range(k)) and not scores[17].any()
    want_s, want_i = brute(unit(corpus), unit(queries), k)
    np.testing.assert_array_equal(ids, want_i)
    np.testing.assert_allclose(scores, want_s, atol=1e-6)


def test_many_identical_documents_cost_one_pass_and_keep_the_lowest_ids(work: Work) -> None:
    # Regression: 500 copies of one document (empty abstracts) made the block search again
    # with doubled k until the copies fit.
    rng = np.random.default_rng(1)
    n, b, k = 3000, 32, 10
    corpus = rng.standard_normal((n, DIM)).astype(np.float32)
    copies = np.arange(1000, 1500)
    corpus[copies] = corpus[7]
    queries = rng.standard_normal((b, DIM)).astype(np.float32)
    queries[3] = corpus[7]
    index = IMRNNIndex(model(), feedback_k=k, first_stage_space="base")
    index.add(corpus)
    work.__init__()
    _, ids = index.first_stage_search(queries, k)
    assert work.total_pairs <= b * n + n
    assert all(depth <= k + 1 for _, depth in work.faiss_calls), work.faiss_calls
    assert ids[3].tolist() == [7, *copies[: k - 1].tolist()]


@pytest.mark.parametrize("backend", ["torch", "faiss"], indirect=True)
@pytest.mark.parametrize("k", [1, 7, 50, 299, 300, 305])
def test_exact_ties_equal_a_float64_brute_force(backend: str, k: int, work: Work, monkeypatch):
    # Blocks of 1024 rows at least; 300 documents in blocks of 64 cross every tie over blocks.
    monkeypatch.setattr(first_stage, "MIN_BLOCK_ROWS", 64)
    monkeypatch.setattr(first_stage, "SCORE_BLOCK_BYTES", 64 * 4)
    rng = np.random.default_rng(k)
    n, b = 300, 40
    docs = exact_rows(rng, n)
    docs[50:120] = docs[3]  # duplicates across blocks
    queries = exact_rows(rng, b)
    queries[5] = 0.0  # every document ties
    queries[6] = docs[3]
    stage = first_stage.FlatStage(DIM)
    stage.add(docs)
    scores, ids = stage.search(torch.from_numpy(queries), k)
    want_s, want_i = brute(docs, queries, k)
    np.testing.assert_array_equal(ids.numpy(), want_i)
    np.testing.assert_array_equal(scores.numpy(), want_s)
    kk = min(k, n)
    if backend == "torch":
        assert work.pairs == b * n and not work.faiss_calls
    else:
        assert work.faiss_calls == [(b, kk + 1 if kk < n else kk)]
        deep_s = brute(docs, queries, kk + 1)[0] if kk < n else None
        tied = 0 if deep_s is None else int((deep_s[:, kk - 1] == deep_s[:, kk]).sum())
        assert work.pairs == tied * n, "one exact pass for each tied row, none for the others"


def test_a_faiss_flat_index_re_searches_only_its_tied_rows(work: Work) -> None:
    # The public helper over a caller's faiss index: one faiss call for the block, then one
    # exact pass for the tied rows only (they were: the whole block, k doubled up to N).
    rng = np.random.default_rng(2)
    n, b, k = 500, 30, 12
    docs = exact_rows(rng, n)
    queries = (rng.standard_normal((b, DIM)) * 0.37).astype(np.float32)  # no natural ties
    queries[4] = 0.0
    index = faiss.IndexFlatIP(DIM)
    index.add(docs)
    work.__init__()
    scores, ids = search_ties_by_lower_id(index, queries, k, n)
    assert work.faiss_calls == [(b, k + 1)]
    assert work.pairs == n, "exactly one exact pass, for the one tied row"
    assert ids[4].tolist() == list(range(k))
    want_s, want_i = brute(docs, queries, k)
    np.testing.assert_array_equal(ids, want_i)
    np.testing.assert_allclose(scores, want_s, atol=1e-5)


def test_an_ivf_stage_re_searches_only_its_tied_rows(work: Work, monkeypatch) -> None:
    # Approximate stages have no exact tie set: the tied rows alone are searched deeper.
    rng = np.random.default_rng(3)
    n, b, k = 400, 16, 5
    corpus = rng.standard_normal((n, DIM)).astype(np.float32)
    corpus[200:260] = corpus[9]  # 61 copies
    queries = rng.standard_normal((b, DIM)).astype(np.float32)
    queries[2] = corpus[9]
    index = IMRNNIndex(model(), feedback_k=k, first_stage="ivf", nlist=4, nprobe=4)
    index.add(corpus)  # nprobe = nlist: every list is probed, so the search is exact
    monkeypatch.setattr(first_stage, "TIE_ENTRIES", 64, raising=False)  # one row per group
    work.__init__()
    _, ids = index.first_stage_search(queries, k)
    assert work.faiss_calls[0] == (b, k + 1)
    assert all(rows == 1 for rows, _ in work.faiss_calls[1:]), work.faiss_calls
    assert [d for _, d in work.faiss_calls[1:]] == [12, 24, 48, 96]  # tie ends past 62
    assert ids[2].tolist() == [9, 200, 201, 202, 203]


def test_normal_use_searches_the_corpus_once_per_block(work: Work) -> None:
    # Regression: on SciFact's 300 test queries the exact first stage ran twice per search
    # because one query tied at the cut (duplicate abstracts). SciFact-sized: N = 5,183,
    # 300 queries, feedback_k = 100, with one duplicate pair at query 0's cut.
    rng = np.random.default_rng(4)
    n, b, fk = 5183, 300, 100
    corpus = rng.standard_normal((n, DIM)).astype(np.float32)
    queries = rng.standard_normal((b, DIM)).astype(np.float32)
    order = np.argsort(-(unit(queries[:1]) @ unit(corpus).T)[0], kind="stable")
    corpus[order[4000]] = corpus[order[fk - 1]]  # a twin of query 0's 100th document
    index = IMRNNIndex(model(), feedback_k=fk, first_stage_space="base")
    index.add(corpus)
    work.__init__()
    _, state_ids = index.first_stage_search(queries, fk)
    assert not work.faiss_calls and work.pairs == b * n, "one pass, no second search"
    twins = sorted([int(order[fk - 1]), int(order[4000])])
    assert twins[0] in state_ids[0].tolist() and twins[1] not in state_ids[0].tolist()
    work.__init__()
    index.search(queries, 10)
    assert work.pairs == b * n and not work.faiss_calls
    assert first_stage.flat_backend(b, torch.device("cpu")) == "torch"  # the rule chose it


def test_base_search_is_the_bounded_exact_search(work: Work) -> None:
    rng = np.random.default_rng(5)
    corpus = rng.standard_normal((700, DIM)).astype(np.float32)
    corpus[100:400] = corpus[0]
    queries = rng.standard_normal((25, DIM)).astype(np.float32)
    queries[0] = corpus[0]
    _, ids = base_search(corpus, queries, 50)
    assert work.total_pairs <= 25 * 700 + 700
    assert ids[0].tolist() == [0, *range(100, 149)]
    np.testing.assert_array_equal(ids, brute(unit(corpus), unit(queries), 50)[1])


# --------------------------------------------------------------------------- the k bound
@pytest.fixture
def small_index() -> tuple[IMRNNIndex, np.ndarray]:
    rng = np.random.default_rng(6)
    index = IMRNNIndex(model(), feedback_k=8)
    index.add(rng.standard_normal((50, DIM)).astype(np.float32))
    return index, rng.standard_normal((3, DIM)).astype(np.float32)


@pytest.mark.parametrize(
    "k", [10**12, first_stage.MAX_K + 1 if hasattr(first_stage, "MAX_K") else 2**31]
)
def test_a_huge_k_is_refused_before_any_allocation(small_index, k: int) -> None:
    # Regression: k = 10**12 went to faiss / torch.full as a (B, k) allocation.
    index, q = small_index
    for call in (
        lambda: index.first_stage_search(q, k),
        lambda: index.search(q, k),
        lambda: index.search(q, k, mode="exhaustive"),
        lambda: base_search(index.first_stage_vectors(), q, k),
    ):
        with pytest.raises(ValueError, match=r"k must be at most 2147483647"):
            call()


@pytest.mark.parametrize("k", [0, -3])
def test_k_must_be_positive(small_index, k: int) -> None:
    index, q = small_index
    with pytest.raises(ValueError, match="k must be positive"):
        index.first_stage_search(q, k)
    with pytest.raises(TypeError, match="k must be an int"):
        first_stage.check_k(2.0)
    with pytest.raises(TypeError, match="k must be an int"):
        first_stage.check_k(True)


def test_k_past_the_corpus_computes_n_results_and_pads(small_index, monkeypatch) -> None:
    # Regression: the exhaustive scan and the first stage ran with k itself (a (B, k) running
    # top-k each); now with min(k, N), and only the result is padded.
    index, q = small_index
    seen: dict[str, list[int]] = {"scan": [], "first": []}
    topk, exact = imrnns_kernels.modulated_topk, getattr(first_stage, "exact_topk", None)

    def spy_topk(*args: Any, **kw: Any) -> Any:
        seen["scan"].append(args[5])
        return topk(*args, **kw)

    def spy_exact(vectors: torch.Tensor, queries: torch.Tensor, k: int) -> Any:
        seen["first"].append(k)
        return exact(vectors, queries, k)

    monkeypatch.setattr(imrnns_kernels, "modulated_topk", spy_topk)
    monkeypatch.setattr(first_stage, "exact_topk", spy_exact, raising=False)
    monkeypatch.setenv("IMRNNS_FIRST_STAGE_BACKEND", "torch")
    big = 100_000
    s, i = index.search(q, big, mode="exhaustive")
    s50, i50 = index.search(q, 50, mode="exhaustive")
    assert seen["scan"] == [50, 50]
    assert s.shape == (3, big) and np.array_equal(i[:, :50], i50) and np.array_equal(s[:, :50], s50)
    assert np.isneginf(s[:, 50:]).all() and (i[:, 50:] == -1).all()
    fs, fi = index.first_stage_search(q, big)
    assert seen["first"][-1] == 50
    assert np.isneginf(fs[:, 50:]).all() and (fi[:, 50:] == -1).all()
    assert sorted(fi[0, :50].tolist()) == list(range(50))


def test_stage_searches_check_their_arguments(monkeypatch) -> None:
    stage = first_stage.FlatStage(DIM)
    with pytest.raises(ValueError, match="the first stage is empty"):
        stage.search(torch.zeros(1, DIM), 3)
    stage.add(np.eye(DIM, dtype=np.float32))
    with pytest.raises(ValueError, match=r"queries must be a \(B, 16\) tensor, got \(2, 5\)"):
        stage.search(torch.ones(2, 5), 3)
    for backend in ("torch", "faiss"):
        monkeypatch.setenv("IMRNNS_FIRST_STAGE_BACKEND", backend)
        s, i = stage.search(torch.empty(0, DIM), 40)
        assert s.shape == (0, 40) and i.shape == (0, 40) and i.dtype == torch.int64, backend
    index = faiss.IndexFlatIP(DIM)
    index.add(np.eye(DIM, dtype=np.float32))
    s, i = search_ties_by_lower_id(index, np.ones((2, DIM), dtype=np.float32), 20, DIM)
    assert i[:, :DIM].tolist() == [list(range(DIM))] * 2 and (i[:, DIM:] == -1).all()
    assert np.isneginf(s[:, DIM:]).all()
    with pytest.raises(ValueError, match="holds 16 vectors, ntotal says 17"):
        search_ties_by_lower_id(index, np.ones((2, DIM), dtype=np.float32), 3, 17)


# --------------------------------------------------------------------------- backends
def test_flat_backend_rule(monkeypatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.delenv("IMRNNS_FIRST_STAGE_BACKEND", raising=False)
    assert first_stage.flat_backend(300, cpu) == "torch"
    assert first_stage.flat_backend(1, cpu) == "faiss"
    assert first_stage.flat_backend(first_stage.FAISS_MAX_BATCH + 1, cpu) == "torch"
    assert first_stage.flat_backend(1, cuda) == "torch"
    monkeypatch.setattr(first_stage, "faiss_available", lambda: False)
    assert first_stage.flat_backend(1, cpu) == "torch"
    monkeypatch.setenv("IMRNNS_FIRST_STAGE_BACKEND", "torch")
    assert first_stage.flat_backend(1, cpu) == "torch"
    monkeypatch.setenv("IMRNNS_FIRST_STAGE_BACKEND", "faster")
    with pytest.raises(ValueError, match="IMRNNS_FIRST_STAGE_BACKEND must be one of"):
        first_stage.flat_backend(1, cpu)


def test_both_backends_return_the_same_exact_results(monkeypatch) -> None:
    rng = np.random.default_rng(7)
    docs, queries = exact_rows(rng, 2000), exact_rows(rng, 9)
    stage = first_stage.FlatStage(DIM)
    stage.add(docs)
    out = {}
    for name in ("torch", "faiss"):
        monkeypatch.setenv("IMRNNS_FIRST_STAGE_BACKEND", name)
        out[name] = stage.search(torch.from_numpy(queries), 33)
    assert torch.equal(out["torch"][1], out["faiss"][1])
    assert torch.equal(out["torch"][0], out["faiss"][0])


def test_flat_files_are_faiss_files(tmp_path: Path) -> None:
    # A flat stage is written in faiss's IndexFlatIP format without faiss and read back
    # without it; faiss reads ours and we read faiss's.
    rng = np.random.default_rng(8)
    docs = rng.standard_normal((37, DIM)).astype(np.float32)
    stage = first_stage.FlatStage(DIM)
    stage.add(docs)
    first_stage.write(stage, tmp_path / "ours.faiss")
    theirs = faiss.IndexFlatIP(DIM)
    theirs.add(docs)
    faiss.write_index(theirs, str(tmp_path / "theirs.faiss"))
    assert (tmp_path / "ours.faiss").read_bytes() == (tmp_path / "theirs.faiss").read_bytes()
    back = faiss.read_index(str(tmp_path / "ours.faiss"))
    np.testing.assert_array_equal(back.reconstruct_n(0, 37), docs)
    read = first_stage.read(tmp_path / "theirs.faiss")
    assert isinstance(read, first_stage.FlatStage) and read.ntotal == 37
    np.testing.assert_array_equal(read.reconstruct(0, 37), docs)
    mapped = first_stage.read(tmp_path / "theirs.faiss", mmap=True)
    np.testing.assert_array_equal(mapped.reconstruct(5, 9), docs[5:9])
    l2 = faiss.IndexFlatL2(DIM)
    faiss.write_index(l2, str(tmp_path / "l2.faiss"))
    with pytest.raises(ValueError, match="another metric than inner product"):
        first_stage.read(tmp_path / "l2.faiss")
    data = (tmp_path / "ours.faiss").read_bytes()
    (tmp_path / "short.faiss").write_bytes(data[:-4])
    with pytest.raises(ValueError, match="short.faiss: not a consistent flat"):
        first_stage.read(tmp_path / "short.faiss")


def test_a_gpu_first_stage_left_on_the_cpu_warns_once() -> None:
    # Regression: without faiss-gpu an IVF/HNSW index on a CUDA device stayed on the CPU
    # without a word.
    if hasattr(faiss, "StandardGpuResources"):
        pytest.skip("faiss-gpu is installed: nothing falls back")
    rng = np.random.default_rng(9)
    train = rng.standard_normal((50, DIM)).astype(np.float32)
    stage = first_stage.build("ivf", train, nlist=2, nprobe=1, hnsw_m=8, ef_search=8)
    getattr(first_stage, "_WARNED", set()).clear()
    cuda = torch.device("cuda", 0)
    with pytest.warns(RuntimeWarning, match=r"runs on the CPU .*imrnns-kernels\[gpu\]"):
        assert first_stage.to_gpu(stage, cuda) is stage
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first_stage.to_gpu(stage, cuda)  # once per process
    flat = first_stage.FlatStage(DIM)
    assert first_stage.to_gpu(flat, torch.device("cpu")) is flat


# --------------------------------------------------------------------------- without faiss
NO_FAISS = textwrap.dedent(
    """
    import importlib.abc, json, os, sys
    from pathlib import Path

    class BlockFaiss(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "faiss" or name.startswith("faiss."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
            return None

    sys.meta_path.insert(0, BlockFaiss())
    import numpy as np, torch
    import imrnns.index
    from imrnns import IMRNNConfig, IMRNNIndex
    from imrnns.evaluate import base_search
    from tests.helpers import randomised

    root = Path(sys.argv[1])
    out = {}
    torch.manual_seed(0)
    model = randomised(IMRNNConfig(input_dim=16, dim=16))
    rng = np.random.default_rng(10)
    corpus = rng.standard_normal((120, 16)).astype(np.float32)
    queries = rng.standard_normal((6, 16)).astype(np.float32)
    names = [f"d{i}" for i in range(120)]
    index = IMRNNIndex(model, feedback_k=9)
    index.add(corpus, doc_ids=names)
    out["rerank"] = index.search(queries, 5)[1].tolist()
    out["exhaustive"] = index.search(queries, 5, mode="exhaustive")[1].tolist()
    out["first"] = index.first_stage_search(queries[:1], 7)[1].tolist()  # faiss's batch size
    index.save(root / "child")
    loaded = IMRNNIndex.load(root / "child")
    out["reloaded"] = loaded.search(queries, 5)[1].tolist()
    out["rows"] = IMRNNIndex.load(root / "child", rows=(10, 60)).first_stage_search(
        queries, 3)[1].tolist()
    out["parent"] = IMRNNIndex.load(root / "parent").search(queries, 5)[1].tolist()
    out["base"] = base_search(corpus, queries, 4)[1].tolist()
    for kind in ("ivf", "hnsw"):
        try:
            IMRNNIndex(model, first_stage=kind)
        except ImportError as exc:
            out[kind] = str(exc)
    try:
        IMRNNIndex.load(root / "parent-ivf")
    except ImportError as exc:
        out["load-ivf"] = str(exc)
    os.environ["IMRNNS_FIRST_STAGE_BACKEND"] = "faiss"
    try:
        index.first_stage_search(queries, 3)
    except ImportError as exc:
        out["forced"] = str(exc)
    out["faiss_loaded"] = any(m == "faiss" or m.startswith("faiss.") for m in sys.modules)
    print(json.dumps(out))
    """
)


def test_the_flat_index_works_without_faiss(tmp_path: Path) -> None:
    # Regression: `import imrnns.index` imported faiss, so nothing worked without it.
    torch.manual_seed(0)
    m = randomised(IMRNNConfig(input_dim=16, dim=16))
    rng = np.random.default_rng(10)
    corpus = rng.standard_normal((120, 16)).astype(np.float32)
    queries = rng.standard_normal((6, 16)).astype(np.float32)
    names = [f"d{i}" for i in range(120)]
    here = IMRNNIndex(m, feedback_k=9)
    here.add(corpus, doc_ids=names)
    here.save(tmp_path / "parent")
    ivf = IMRNNIndex(m, feedback_k=9, first_stage="ivf", nlist=4)
    ivf.add(corpus)
    ivf.save(tmp_path / "parent-ivf")
    proc = subprocess.run(
        [sys.executable, "-c", NO_FAISS, str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["faiss_loaded"] is False
    want = here.search(queries, 5)[1].tolist()
    assert out["rerank"] == want and out["reloaded"] == want and out["parent"] == want
    assert out["exhaustive"] == here.search(queries, 5, mode="exhaustive")[1].tolist()
    assert out["first"] == here.first_stage_search(queries[:1], 7)[1].tolist()
    assert out["base"] == base_search(corpus, queries, 4)[1].tolist()
    # the flat index the child saved without faiss loads here, with faiss
    child = IMRNNIndex.load(tmp_path / "child")
    assert child.search(queries, 5)[1].tolist() == want and child.doc_ids == names
    rows = IMRNNIndex.load(tmp_path / "child", rows=(10, 60))
    assert out["rows"] == rows.first_stage_search(queries, 3)[1].tolist()
    for key in ("ivf", "hnsw", "load-ivf", "forced"):
        assert "pip install 'imrnns-kernels[faiss]'" in out[key], out[key]
        assert "'imrnns-kernels[gpu]' (faiss-gpu)" in out[key], out[key]
    assert "first_stage='ivf' needs faiss" in out["ivf"]


# --------------------------------------------------------------------------- document names
def test_add_refuses_names_repeated_in_the_call() -> None:
    # Regression: duplicate document ids were accepted (and doc_names became ambiguous).
    index = IMRNNIndex(model(), feedback_k=3)
    rows = np.random.default_rng(11).standard_normal((12, DIM)).astype(np.float32)
    names = ["a", "b", "a", "c", "b", "d", "e", "f", "g", "h", "i", "j"]
    with pytest.raises(ValueError, match=r"doc_ids must be unique: 'a', 'b' appear more than"):
        index.add(rows, doc_ids=names)
    assert index.ntotal == 0 and index.doc_ids is None


def test_add_refuses_names_already_in_the_index() -> None:
    index = IMRNNIndex(model(), feedback_k=3)
    rows = np.random.default_rng(12).standard_normal((20, DIM)).astype(np.float32)
    index.add(rows[:10], doc_ids=[f"d{i}" for i in range(10)])
    taken = [f"d{i}" for i in range(3, 10)]
    with pytest.raises(
        ValueError, match=r"must be new: 'd3', 'd4', 'd5', 'd6', 'd7' and 2 more already in"
    ):
        index.add(rows[10:17], doc_ids=taken)
    assert index.ntotal == 10 and index.doc_ids == [f"d{i}" for i in range(10)]
    index.add(rows[10:], doc_ids=[f"n{i}" for i in range(10)])
    assert index.ntotal == 20


def test_the_distributed_index_refuses_duplicate_names_without_a_group() -> None:
    # With torchrun, every rank checks the whole add() batch against its own shard
    # (tests/retriever/test_distributed.py: "duplicate-doc-ids").
    index = DistributedIMRNNIndex(model(), feedback_k=3)
    rows = np.random.default_rng(13).standard_normal((8, DIM)).astype(np.float32)
    index.add(rows[:4], doc_ids=["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="'c' already in the index"):
        index.add(rows[4:], doc_ids=["x", "c", "y", "z"])
    with pytest.raises(ValueError, match="'x' appear more than once"):
        index.add_shard(rows[4:], doc_ids=["x", "x", "y", "z"])
    assert index.ntotal == 4
