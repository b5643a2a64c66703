"""Searches from several threads at once return exactly what sequential searches return.

One :class:`IMRNNIndex` shared by a thread pool (the recommended server layout,
docs/concurrency.md): flat first stage (torch, or faiss's brute force for small batches when
faiss is installed), faiss IVF and HNSW, both model forms (v0.1 ``transform_of_mean``, v0.2
``mean_of_transforms``), both modes, and the evaluation's search functions. Every thread
runs at two intra-op threads, so the exhaustive scans use the shared worker pool
(``imrnns_kernels._runtime.run_workers``) concurrently.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import torch

import imrnns_kernels as K
from imrnns import IMRNNConfig, IMRNNIndex
from imrnns.evaluate import base_search, imrnn_search
from imrnns.index import first_stage
from tests.helpers import randomised

THREADS = 6
N, DIM, M, B = 3000, 24, 16, 40
FORMS = {
    "v0.1": {"aggregation": "transform_of_mean"},
    "v0.2": {"aggregation": "mean_of_transforms", "feedback_weighting": "score_weighted"},
}


@pytest.fixture
def cpu_two_threads() -> Iterator[None]:
    """The CPU backend (the dispatch choice is process-wide: the pool's threads see it) and
    two intra-op threads, the count threads started here begin with."""
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with K.use_backend("cpu"):
            yield
    finally:
        torch.set_num_threads(saved)


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    corpus = rng.standard_normal((N, DIM)).astype(np.float32)
    corpus[N - 25 :] = corpus[:25]  # exact duplicates: ties must still go to the lower id
    return corpus, rng.standard_normal((B, DIM)).astype(np.float32)


def _index(form: str, stage: str, similarity: str = "cosine") -> IMRNNIndex:
    torch.manual_seed(7)
    model = randomised(IMRNNConfig(input_dim=DIM, dim=M, **FORMS[form]))
    extra: dict[str, Any] = {"nlist": 16, "nprobe": 4} if stage == "ivf" else {}
    index = IMRNNIndex(model, feedback_k=20, first_stage=stage, similarity=similarity, **extra)
    index.add(_data()[0])
    return index


def _calls(index: IMRNNIndex, queries: np.ndarray) -> list[Callable[[], Any]]:
    """Many different calls: modes, k, batch sizes (1 query: faiss brute force when
    installed; the whole batch: the torch scan), numpy and torch inputs, the query state."""
    calls: list[Callable[[], Any]] = []
    for lo, hi in ((0, 1), (3, 4), (0, B), (5, 17), (17, 40)):
        q = queries[lo:hi]
        for mode in ("rerank", "exhaustive"):
            for k in (1, 10):
                calls.append(lambda q=q, mode=mode, k=k: index.search(q, k, mode))
        calls.append(lambda q=q: index.search(torch.from_numpy(q), 7, "exhaustive"))
        calls.append(lambda q=q: index.first_stage_search(q, 12))
        calls.append(lambda q=q: tuple(index.query_state(q)))
    return calls


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if a is None or b is None:
        return a is b
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a.dtype == b.dtype and np.array_equal(a, b)


def _check_concurrent(calls: list[Callable[[], Any]], rounds: int = 3) -> None:
    """Run every call sequentially, then all of them ``rounds`` times, shuffled, from a
    thread pool; each concurrent result must equal its sequential one exactly."""
    expected = [call() for call in calls]
    order = [i for _ in range(rounds) for i in range(len(calls))]
    random.Random(0).shuffle(order)
    with ThreadPoolExecutor(THREADS) as pool:
        got = list(pool.map(lambda i: (i, calls[i]()), order))
    bad = [i for i, result in got if not _same(result, expected[i])]
    assert not bad, f"{len(bad)} of {len(got)} concurrent results differ (calls {sorted(set(bad))})"


@pytest.mark.parametrize("form", sorted(FORMS))
def test_concurrent_searches_equal_sequential_flat(cpu_two_threads: None, form: str) -> None:
    index = _index(form, "flat")
    _check_concurrent(_calls(index, _data()[1]))
    assert torch.get_num_threads() == 2


def test_concurrent_searches_equal_sequential_dot_similarity(cpu_two_threads: None) -> None:
    index = _index("v0.2", "flat", similarity="dot")
    _check_concurrent(_calls(index, _data()[1]), rounds=2)


@pytest.mark.parametrize("stage", ["ivf", "hnsw"])
def test_concurrent_searches_equal_sequential_faiss(cpu_two_threads: None, stage: str) -> None:
    pytest.importorskip("faiss")
    index = _index("v0.2", stage)
    _check_concurrent(_calls(index, _data()[1]), rounds=2)


def test_concurrent_flat_backends_equal_sequential(
    cpu_two_threads: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flat first stage forced to each of its backends, called from many threads."""
    index = _index("v0.2", "flat")
    queries = _data()[1]
    backends = ["torch"] + (["faiss"] if first_stage.faiss_available() else [])
    for backend in backends:
        monkeypatch.setenv(first_stage.BACKEND_ENV, backend)
        calls = [lambda q=queries[lo : lo + 5]: index.first_stage_search(q, 15) for lo in range(35)]
        _check_concurrent(calls)


def test_concurrent_evaluation_searches_equal_sequential(cpu_two_threads: None) -> None:
    """The evaluation's searches (each builds its own index) from several threads."""
    corpus, queries = _data(1)
    torch.manual_seed(3)
    model = randomised(IMRNNConfig(input_dim=DIM, dim=M))
    calls: list[Callable[[], Any]] = []
    for similarity in ("cosine", "dot"):
        calls.append(lambda s=similarity: base_search(corpus, queries, 50, similarity=s))
        for mode in ("rerank", "exhaustive"):
            calls.append(
                lambda s=similarity, mode=mode: imrnn_search(
                    model, corpus, queries, mode=mode, k=20, feedback_k=20, similarity=s
                )
            )
    _check_concurrent(calls, rounds=2)
