"""Exhaustive search streams: peak memory stays within a budget smaller than the corpus.

A corpus several times larger than the memory budget is searched exhaustively (every
document scored, top-k kept); the extra memory the search allocates on top of the corpus
must stay under the budget. Two measurements, each in a fresh subprocess so earlier
allocations cannot hide in the allocator:

- ``modulated_topk``: the fused op alone (CPU backend), the streaming top-k;
- ``IMRNNIndex.search(mode="exhaustive")``: the whole path (faiss first stage, feedback
  aggregation, streaming top-k).

Peak resident memory is read from ``/proc/self/status`` (``VmHWM``) after resetting it with
``/proc/self/clear_refs`` once the inputs exist, so the figure is the search's own peak.
On CUDA the same check uses ``torch.cuda.max_memory_allocated``.

Configuration (environment): ``IMRNNS_BENCH_MEMORY_ROWS`` (default 262144 documents),
``IMRNNS_BENCH_MEMORY_DIM`` (m, default 256), ``IMRNNS_BENCH_MEMORY_BUDGET`` (the budget as
a fraction of the projected corpus's bytes, default 0.25) or ``IMRNNS_BENCH_MEMORY_BUDGET_MB``
(an absolute budget). The CPU op has no public budget argument yet; its module constants
``MAX_WORKSPACE_BYTES`` / ``WORKSPACE_FRACTION`` bound its chunk buffers, and the benchmark
sets the first to 60% of the budget (the rest covers the top-k state, the per-query
constants and allocator slack) when the budget is tighter than the default.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import imrnns_kernels as K
from benchmarks.conftest import requires_cuda

ROOT = Path(__file__).resolve().parents[1]
ROWS = int(os.environ.get("IMRNNS_BENCH_MEMORY_ROWS", 262144))
DIM = int(os.environ.get("IMRNNS_BENCH_MEMORY_DIM", 256))
BUDGET_FRACTION = float(os.environ.get("IMRNNS_BENCH_MEMORY_BUDGET", 0.25))
BUDGET_MB = os.environ.get("IMRNNS_BENCH_MEMORY_BUDGET_MB")
QUERIES, TOPK, INPUT_DIM = 32, 100, 384
AFFINE_DIM = 64


def budget_bytes(corpus_bytes: int) -> int:
    if BUDGET_MB is not None:
        return int(float(BUDGET_MB) * (1 << 20))
    return int(BUDGET_FRACTION * corpus_bytes)


def _rss(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def cap_cpu_workspace(budget: int) -> None:
    """Bound the CPU op's chunk buffers to 60% of the budget (no public argument yet).

    ``MAX_WORKSPACE_BYTES`` caps each worker thread's buffers, so the cap is divided by the
    number of workers (torch's intra-op threads).
    """
    from imrnns_kernels.cpu import modulated_topk as impl

    cap = int(0.6 * budget / max(1, torch.get_num_threads()))
    if hasattr(impl, "MAX_WORKSPACE_BYTES") and cap < impl.MAX_WORKSPACE_BYTES:
        impl.MAX_WORKSPACE_BYTES = cap


def build(what: str, modulation: str, rows: int, dim: int) -> tuple[Callable[[], Any], int]:
    """(the search to run, bytes of the projected corpus it scans)."""
    g = torch.Generator().manual_seed(0)
    b = QUERIES
    if what == "op":
        corpus = torch.randn(rows, dim, generator=g)
        corpus /= corpus.norm(dim=1, keepdim=True)
        if modulation == "diagonal":
            t = torch.cat(
                [torch.rand(b, dim, generator=g), torch.rand(b, dim, generator=g) - 0.5], 1
            )
        else:
            w = torch.eye(dim) + torch.randn(b, dim, dim, generator=g) / dim**0.5
            t = torch.cat([w.reshape(b, -1), 0.1 * torch.randn(b, dim, generator=g)], 1)
        lw, lb, q = torch.ones(dim), torch.zeros(dim), torch.randn(b, dim, generator=g)
        K.modulated_topk(corpus[:4096], t, lw, lb, q, TOPK, modulation)  # warm-up
        return lambda: K.modulated_topk(corpus, t, lw, lb, q, TOPK, modulation), corpus.numel() * 4
    from imrnns import IMRNN, IMRNNConfig, IMRNNIndex

    model = IMRNN(IMRNNConfig(input_dim=INPUT_DIM, dim=dim, modulation=modulation))
    index = IMRNNIndex(model, feedback_k=100)
    for lo in range(0, rows, 65536):
        index.add(torch.randn(min(65536, rows - lo), INPUT_DIM, generator=g))
    queries = torch.randn(b, INPUT_DIM, generator=g)
    index.search(queries[:2], TOPK, mode="exhaustive")  # warm-up
    pc = index.projected_corpus
    return lambda: index.search(queries, TOPK, mode="exhaustive"), pc.numel() * pc.element_size()


def child_main(what: str, modulation: str, rows: int, dim: int, budget: int) -> None:
    """In a fresh process: peak memory of one search above the resident inputs (JSON out)."""
    cap_cpu_workspace(budget)
    with K.use_backend("cpu"), torch.no_grad():
        run, corpus_bytes = build(what, modulation, rows, dim)
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # VmHWM := current RSS
        base = _rss("VmRSS")
        t0 = time.perf_counter()
        _, ids = run()
        secs = time.perf_counter() - t0
        peak = _rss("VmHWM")
    print(json.dumps({"extra": peak - base, "base": base, "corpus_bytes": corpus_bytes,
                      "seconds": secs, "ids_ok": bool((ids >= 0).all())}))  # fmt: skip


def measure(what: str, modulation: str, rows: int = ROWS, dim: int = DIM) -> dict[str, Any]:
    budget = budget_bytes(rows * dim * 4)
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
        "from benchmarks.test_bench_memory import child_main; "
        f"child_main({what!r}, {modulation!r}, {rows}, {dim}, {budget})"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["budget"] = budget
    return out


def _linux_peak_supported() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


needs_proc = pytest.mark.skipif(
    not _linux_peak_supported(), reason="needs Linux /proc/self/clear_refs to reset VmHWM"
)


def _has_streaming_cpu_topk() -> bool:
    from imrnns_kernels import dispatch

    return "cpu" in dispatch._REGISTRY.get("modulated_topk", {})


@needs_proc
@pytest.mark.skipif(
    not _has_streaming_cpu_topk(),
    reason="no CPU modulated_topk registered (the reference materialises)",
)
@pytest.mark.parametrize("what", ["op", "index"])
@pytest.mark.parametrize("modulation", ["diagonal", "affine"])
@pytest.mark.benchmark(group="exhaustive-memory")
def test_exhaustive_search_stays_within_budget(benchmark, what, modulation):
    # affine scoring costs m^2 per (document, query): m = 64 keeps a pass to seconds here
    dim = DIM if modulation == "diagonal" else min(DIM, AFFINE_DIM)
    res = measure(what, modulation, dim=dim)
    assert res["ids_ok"]
    assert res["corpus_bytes"] > res["budget"], "the corpus must be larger than the budget"
    benchmark.extra_info.update(
        {
            "rows": ROWS,
            "dim": dim,
            "queries": QUERIES,
            "k": TOPK,
            "corpus_mb": res["corpus_bytes"] / 2**20,
            "budget_mb": res["budget"] / 2**20,
            "peak_extra_mb": res["extra"] / 2**20,
            "search_seconds": res["seconds"],
            "corpus_gb_per_s": res["corpus_bytes"] / res["seconds"] / 1e9,
        }
    )
    # Timing in this process (the memory figure above comes from a clean one).
    cap_cpu_workspace(res["budget"])
    with K.use_backend("cpu"), torch.no_grad():
        run, _ = build(what, modulation, ROWS, dim)
        benchmark.pedantic(run, rounds=2, iterations=1)
    assert res["extra"] <= res["budget"], (
        f"{what}/{modulation}: exhaustive search allocated {res['extra'] / 2**20:.1f} MB on top of "
        f"a {res['corpus_bytes'] / 2**20:.0f} MB corpus; budget {res['budget'] / 2**20:.1f} MB"
    )


@requires_cuda
@pytest.mark.benchmark(group="exhaustive-memory")
def test_cuda_exhaustive_topk_stays_within_budget(benchmark):
    """Same check on a GPU: the Triton streaming top-k's extra device memory."""
    dev = torch.device("cuda")
    rows = max(ROWS, 4_000_000)
    g = torch.Generator(device=dev).manual_seed(0)
    corpus = torch.randn(rows, DIM, device=dev, generator=g)
    corpus /= corpus.norm(dim=1, keepdim=True)
    t = torch.cat(
        [torch.rand(QUERIES, DIM, device=dev), torch.rand(QUERIES, DIM, device=dev) - 0.5], 1
    )
    lw, lb = torch.ones(DIM, device=dev), torch.zeros(DIM, device=dev)
    q = torch.randn(QUERIES, DIM, device=dev)
    K.modulated_topk(corpus[:4096], t, lw, lb, q, TOPK)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    benchmark.pedantic(
        lambda: K.modulated_topk(corpus, t, lw, lb, q, TOPK), rounds=3, warmup_rounds=1
    )
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    budget = budget_bytes(corpus.numel() * 4)
    benchmark.extra_info.update(
        {"rows": rows, "peak_extra_mb": extra / 2**20, "budget_mb": budget / 2**20}
    )
    assert extra <= budget
