"""Shared bits of the scoring benchmarks: inputs, the naive baseline, interleaved timers.

Peak memory: :func:`benchmarks._common.peak_extra_memory`."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.scaling.providers import naive_exhaustive


def unit_corpus(n: int, m: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """(n, m) random unit rows (projected embeddings), generated in slabs to bound memory."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty(n, m, dtype=dtype)
    for r0 in range(0, n, 1 << 16):
        x = torch.randn(min(1 << 16, n - r0), m, generator=gen)
        out[r0 : r0 + x.shape[0]] = F.normalize(x, dim=1)
    return out


def scoring_params(
    b: int, m: int, modulation: str = "diagonal", seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(transform, ln_weight, ln_bias, queries) that look trained (no identity shortcuts)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    if modulation == "diagonal":
        transform = torch.cat([torch.sigmoid(randn(b, m)), torch.tanh(randn(b, m))], 1)
    else:
        w = torch.eye(m) + randn(b, m, m) / m**0.5
        transform = torch.cat([w.reshape(b, m * m), 0.3 * randn(b, m)], 1)
    return transform, 1.0 + 0.3 * randn(m), 0.1 * randn(m), randn(b, m)


def naive_topk(
    corpus: torch.Tensor,
    transform: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    modulation: str = "diagonal",
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The naive PyTorch baseline: per query, materialise T(D), LayerNorm, normalise, matmul,
    topk (:func:`benchmarks.scaling.providers.naive_exhaustive`, the scaling sweep's ``naive`` provider). The
    reference op does all queries at once; at N=1e6, B=16 its (B, N, m) fp32 intermediates
    would need 16 GB each, so the baseline loops over queries."""
    return naive_exhaustive(corpus, transform, ln_weight, ln_bias, queries, k, modulation, eps)


def interleaved_times(
    fns: dict[str, Callable[[], Any]],
    rounds: int,
    cpu: dict[str, list[float]] | None = None,
    burst: int = 1,
) -> dict[str, list[float]]:
    """Wall times of each function, called in turn ``rounds`` times: slow drifts of machine
    load (shared CI runners) hit every contender alike, so their ratio is fair.

    ``burst``: calls of one function in a row per turn (each timed): a throughput (queries
    per second) is a steady-state rate, and a call made right after another contender's
    pays for that contender's side effects (the official forward allocates and frees about
    400 MB per batch, leaving a trimmed heap and cold TLBs behind).

    ``cpu``, when given, receives the process CPU time of each call (all threads): on a
    machine shared with other jobs it measures the work done, which load does not inflate
    as much as it inflates wall time.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    if cpu is not None:
        cpu.update({name: [] for name in fns})
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(burst):
                c0 = time.process_time()
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
                if cpu is not None:
                    cpu[name].append(time.process_time() - c0)
    return times


def summary(times: list[float]) -> dict[str, float]:
    return {"min_s": min(times), "median_s": statistics.median(times)}
