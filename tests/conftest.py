"""Test set-up: run Triton kernels through the interpreter on CPU.

TRITON_INTERPRET must be set before triton (and so imrnns_kernels.ops) is first imported,
hence at conftest import time. On a CUDA machine set TRITON_INTERPRET=0 to compile for real.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
# Two cores on CI: keep torch from oversubscribing when pytest runs alongside BLAS threads.
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    # Fresh but reproducible inputs per test: a failure can be replayed.
    torch.manual_seed(0)


@pytest.fixture
def cpu_backend_one_thread():
    """The CPU backend on one torch thread, restored afterwards. For training and evaluation
    tests on tiny shapes: on a loaded 2-core machine two BLAS threads per op made them 5x
    slower (0.85 s vs 4.9 s for one small training run)."""
    import imrnns_kernels as K

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with K.use_backend("cpu"):
            yield
    finally:
        torch.set_num_threads(threads)
