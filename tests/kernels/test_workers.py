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
