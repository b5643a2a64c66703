"""A forked child can search: the persistent worker pool is reset in the child.

``fork()`` copies only the calling thread. Before ``_runtime`` reset its pool at fork, the
child inherited a pool object that believed its idle threads existed, so the child's first
multi-worker exhaustive search waited forever for workers that were never started.
"""

from __future__ import annotations

import multiprocessing
import queue
import sys
import threading
from typing import Any

import pytest
import torch

import imrnns_kernels as K
from imrnns_kernels import _runtime as runtime

pytestmark = pytest.mark.skipif(
    sys.platform == "win32" or "fork" not in multiprocessing.get_all_start_methods(),
    reason="needs os.fork",
)

# A child that finishes at all finishes in well under a second; one that deadlocks never does.
CHILD_TIMEOUT = 60.0
M, N, B, K_TOP = 32, 20000, 6, 5


def _inputs() -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(17)
    corpus = torch.randn(N, M, generator=gen)
    transform = torch.randn(B, 2 * M, generator=gen)
    queries = torch.randn(B, M, generator=gen)
    return corpus, transform, torch.ones(M), torch.zeros(M), queries


def _search() -> tuple[torch.Tensor, torch.Tensor]:
    with K.use_backend("cpu"):
        return K.modulated_topk(*_inputs(), K_TOP, "diagonal", 1e-5)


def _child(out: Any) -> None:
    scores, ids = _search()
    out.put((torch.get_num_threads(), scores.tolist(), ids.tolist()))


def _run_child() -> tuple[int, list, list]:
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_child, args=(out,), daemon=True)
    child.start()
    try:
        result = out.get(timeout=CHILD_TIMEOUT)
    except queue.Empty:
        result = None
    child.join(5)
    if child.is_alive():
        child.kill()
        child.join()
    assert result is not None, f"the forked child's search did not finish in {CHILD_TIMEOUT} s"
    assert child.exitcode == 0
    return result


@pytest.fixture
def two_threads():
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(saved)


def test_a_forked_child_searches_after_the_parent_used_the_pool(two_threads):
    want_s, want_i = _search()
    assert runtime._POOL is not None, "the parent's search must have started the pool"
    threads, scores, ids = _run_child()
    assert ids == want_i.tolist()
    assert scores == want_s.tolist()
    assert threads == 2


def test_a_fork_while_another_thread_runs_workers(two_threads):
    # Another thread is inside run_workers at the moment of the fork: it holds the workers'
    # lock and has set torch's thread count to 1. The child has neither that thread nor a
    # way to release its lock.
    _search()
    inside, release = threading.Event(), threading.Event()

    def body(_state: None, _i: int) -> None:
        inside.set()
        release.wait(CHILD_TIMEOUT)

    busy = threading.Thread(target=runtime.run_workers, args=(2, lambda: None, body, 2))
    busy.start()
    try:
        assert inside.wait(CHILD_TIMEOUT)
        threads, _, ids = _run_child()
    finally:
        release.set()
        busy.join()
    assert ids == _search()[1].tolist()
    assert threads == 2, "the child must get the thread count the in-flight call had saved"
