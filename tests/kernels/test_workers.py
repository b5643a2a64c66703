"""The CPU worker pool (run_workers) and the per-thread scratch buffers of the fused ops."""

from __future__ import annotations

import threading

import pytest
import torch

from imrnns_kernels import _runtime as runtime


@pytest.fixture
def two_threads():
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(saved)


def test_every_item_runs_once_on_at_most_workers_states(two_threads):
    seen: list[int] = []
    lock = threading.Lock()

    def body(state: list[int], i: int) -> None:
        state.append(i)
        with lock:
            seen.append(i)

    states = runtime.run_workers(37, list, body, workers=2)
    assert sorted(seen) == list(range(37))
    assert 1 <= len(states) <= 2
    assert sorted(i for st in states for i in st) == list(range(37))
    assert torch.get_num_threads() == 2


def test_an_error_in_a_worker_reaches_the_caller_and_the_pool_recovers(two_threads):
    def body(_state: None, i: int) -> None:
        if i == 5:
            raise RuntimeError("item 5 failed")

    with pytest.raises(RuntimeError, match="item 5 failed"):
        runtime.run_workers(20, lambda: None, body, workers=2)
    assert torch.get_num_threads() == 2  # restored after the failure
    done: list[int] = []
    runtime.run_workers(8, lambda: None, lambda _s, i: done.append(i), workers=2)
    assert sorted(done) == list(range(8))


def test_workers_see_the_callers_grad_mode_and_one_thread(two_threads):
    modes: list[tuple[bool, int]] = []

    def body(_state: None, _i: int) -> None:
        modes.append((torch.is_grad_enabled(), torch.get_num_threads()))

    with torch.no_grad():
        runtime.run_workers(6, lambda: None, body, workers=2)
    assert modes and all(mode == (False, 1) for mode in modes)
    assert torch.is_grad_enabled()


def test_a_nested_call_runs_inline(two_threads):
    inner: list[str] = []

    def body(_state: None, i: int) -> None:
        me = threading.get_ident()
        runtime.run_workers(
            3, lambda: None, lambda _s, _j: inner.append(threading.get_ident() == me)
        )

    runtime.run_workers(4, lambda: None, body, workers=2)
    assert len(inner) == 12 and all(inner)


def test_scratch_is_per_thread_per_key_and_grows():
    a = runtime.scratch("test.a", (4, 8), torch.float32)
    again = runtime.scratch("test.a", (2, 8), torch.float32)
    assert again.data_ptr() == a.data_ptr()  # reused
    assert runtime.scratch("test.b", (4, 8), torch.float32).data_ptr() != a.data_ptr()
    bigger = runtime.scratch("test.a", (64, 64), torch.float32)
    assert bigger.shape == (64, 64)
    other: list[int] = []
    t = threading.Thread(
        target=lambda: other.append(runtime.scratch("test.a", (64, 64), torch.float32).data_ptr())
    )
    t.start()
    t.join()
    assert other[0] != bigger.data_ptr()  # another thread, another buffer
    huge = runtime.SCRATCH_KEEP_BYTES // 4 + 1
    first = runtime.scratch("test.huge", (huge,), torch.float32)
    assert runtime.scratch("test.huge", (huge,), torch.float32).data_ptr() != first.data_ptr()


def _fresh_thread_count() -> int:
    """torch's thread count in a thread that never used torch before."""
    seen: list[int] = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    t.start()
    t.join()
    return seen[0]


def test_a_thread_started_during_a_call_keeps_the_default_thread_count(two_threads):
    # torch.set_num_threads also sets the default a new thread starts with: a server thread
    # that began while another thread searched used to stay at one thread for good.
    runtime.run_workers(2, lambda: None, lambda _s, _i: None, workers=2)  # the pool exists
    inside, release = threading.Event(), threading.Event()

    def body(_state: None, i: int) -> None:
        if i == 0:
            inside.set()
            release.wait(30)

    busy = threading.Thread(target=runtime.run_workers, args=(2, lambda: None, body, 2))
    busy.start()
    try:
        assert inside.wait(30)
        during = _fresh_thread_count()
    finally:
        release.set()
        busy.join()
    assert during == 2
    assert _fresh_thread_count() == 2 and torch.get_num_threads() == 2


def test_a_one_worker_plan_leaves_other_threads_counts_alone(two_threads):
    with runtime.one_intra_op_thread(1):
        assert torch.get_num_threads() == 1  # the caller runs on one thread ...
        assert _fresh_thread_count() == 2  # ... a thread started meanwhile gets the default
    assert torch.get_num_threads() == 2 and _fresh_thread_count() == 2


def test_concurrent_calls_from_threads_each_cover_every_item(two_threads):
    def call(tag: int) -> list[tuple[int, int]]:
        torch.set_num_threads(2)
        states = runtime.run_workers(40, list, lambda st, i: st.append((tag, i)), workers=2)
        return sorted(x for st in states for x in st)

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(call, range(24)))
    assert results == [[(tag, i) for i in range(40)] for tag in range(24)]
    assert torch.get_num_threads() == 2 and _fresh_thread_count() == 2
