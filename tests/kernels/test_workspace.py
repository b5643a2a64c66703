"""``workspace_bytes`` of exhaustive search: the plan respects the budget, results do not
depend on it, and bad values fail clearly. (Measured peaks: benchmarks/test_bench_memory.py.)"""

from __future__ import annotations

import argparse
import itertools

import numpy as np
import pytest
import torch

import imrnns_kernels as K
from imrnns import IMRNN, IMRNNConfig, IMRNNIndex
from imrnns.cli import workspace_bytes_arg
from imrnns_kernels import reference as R
from imrnns_kernels.scoring import cpu as cpu_topk
from imrnns_kernels.scoring import triton as triton_topk
from imrnns_kernels.testing import scoring_inputs

MIB = 1 << 20


@pytest.mark.parametrize(
    ("n", "m", "b", "k", "modulation", "corpus_dtype"),
    [
        (262144, 256, 32, 100, "diagonal", torch.float32),
        (1_000_000, 384, 200, 10, "diagonal", torch.bfloat16),
        (262144, 64, 32, 100, "affine", torch.float32),
        (50_000, 128, 7, 1000, "affine", torch.float16),
        (1017, 50, 3, 25, "diagonal", torch.float32),
        (5, 8, 2, 3, "affine", torch.float32),
    ],
)
@pytest.mark.parametrize("threads", [1, 2, 8])
def test_plan_respects_the_budget(n, m, b, k, modulation, corpus_dtype, threads):
    minimum = None
    for budget in [1 << 30, 64 * MIB, 12 * MIB + 12345, 4 * MIB, MIB, 300_000]:
        try:
            plan = cpu_topk.plan_workspace(
                n, m, b, k, modulation, corpus_dtype, workspace_bytes=budget, threads=threads
            )
        except ValueError as exc:
            assert f"workspace_bytes={budget}" in str(exc) and "at least" in str(exc)
            minimum = minimum or budget
            continue
        assert minimum is None, "a larger budget failed where a smaller one fits"
        assert plan.bytes <= budget
        assert 1 <= plan.workers <= threads
        assert min(cpu_topk.MIN_CHUNK, n) <= plan.chunk <= min(n, cpu_topk.MAX_CHUNK)
        assert plan.num_chunks == -(-n // plan.chunk) and plan.workers <= plan.num_chunks
        assert plan.query_block == min(cpu_topk.QUERY_BLOCK, b)
    # The default plan is reported too (no budget, never refused).
    plan = cpu_topk.plan_workspace(n, m, b, k, modulation, corpus_dtype, threads=threads)
    assert plan.bytes > 0 and plan.chunk >= 1


def test_workers_drop_before_the_budget_is_refused():
    args = (262144, 256, 32, 100, "diagonal", torch.float32)
    two = cpu_topk.plan_workspace(*args, workspace_bytes=8 * MIB, threads=2)
    one = cpu_topk.plan_workspace(*args, workspace_bytes=4 * MIB, threads=2)
    assert two.workers == 2 and one.workers == 1
    with pytest.raises(ValueError, match=r"workspace_bytes=1000000 is too small.*at least"):
        cpu_topk.plan_workspace(*args, workspace_bytes=1_000_000, threads=2)


CASES = list(
    itertools.product(
        ("diagonal", "affine"), (torch.float32, torch.bfloat16), [(3, 1017, 50), (70, 3001, 40)]
    )
)


@pytest.mark.parametrize(("modulation", "dtype", "shape"), CASES)
def test_cpu_results_identical_across_budgets(modulation, dtype, shape):
    b, n, m = shape
    x = scoring_inputs(b, n, m, modulation, dtype)
    with K.use_backend("cpu"):
        want = K.modulated_topk(x.corpus, *x[1:], k=25, modulation=modulation)
        plans = set()
        for budget in (1 << 30, 8 * MIB, 4 * MIB, 13 * MIB // 4 + 7):
            plan = cpu_topk.plan_workspace(
                n, m, b, 25, modulation, x.corpus.dtype, workspace_bytes=budget
            )
            plans.add((plan.workers, plan.chunk))
            got = K.modulated_topk(
                x.corpus, *x[1:], k=25, modulation=modulation, workspace_bytes=budget
            )
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), budget
    if n > 2000:
        assert len(plans) >= 2, "the budgets should give different plans"


def test_short_last_chunk_scores_like_a_full_one(monkeypatch):
    """n = 2 chunks + 5 rows: the tail is read as a full chunk (MKL rounds tiny GEMMs
    differently), so the scores equal those of a single-chunk pass bit for bit."""
    b, n, m = 4, 2 * 300 + 5, 40
    x = scoring_inputs(b, n, m, "diagonal")
    one = cpu_topk.modulated_topk(*x, n, "diagonal", workspace_bytes=1 << 30)
    monkeypatch.setattr(cpu_topk, "MIN_CHUNK", 16)
    monkeypatch.setattr(cpu_topk, "MAX_CHUNK", 300)
    many = cpu_topk.modulated_topk(*x, n, "diagonal", workspace_bytes=1 << 30)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


def test_gemm_blocks_cover_the_chunk_without_short_blocks(monkeypatch):
    monkeypatch.setattr(cpu_topk, "GEMM_BLOCK", 64)
    assert cpu_topk._gemm_blocks(300) == [(0, 64), (64, 128), (128, 192), (192, 256), (256, 300)]
    # A tail under 12 rows joins the block before it (MKL rounds tiny GEMMs differently).
    assert cpu_topk._gemm_blocks(263) == [(0, 64), (64, 128), (128, 192), (192, 263)]
    assert cpu_topk._gemm_blocks(40) == [(0, 40)]


@pytest.mark.parametrize("chunk", [300, 263])
def test_gemm_blocks_do_not_change_scores(monkeypatch, chunk):
    """The diagonal GEMMs split into blocks inside a chunk give the single-GEMM scores, bit
    for bit (so results stay independent of the plan)."""
    b, n, m = 5, 3 * chunk + 17, 48
    x = scoring_inputs(b, n, m, "diagonal")
    monkeypatch.setattr(cpu_topk, "MIN_CHUNK", 16)
    monkeypatch.setattr(cpu_topk, "MAX_CHUNK", chunk)
    whole = cpu_topk.modulated_topk(*x, n, "diagonal", workspace_bytes=1 << 30)
    monkeypatch.setattr(cpu_topk, "GEMM_BLOCK", 64)
    plan = cpu_topk.plan_workspace(n, m, b, n, "diagonal", x.corpus.dtype, workspace_bytes=1 << 30)
    assert plan.chunk == chunk and len(cpu_topk._gemm_blocks(plan.chunk)) > 1
    blocked = cpu_topk.modulated_topk(*x, n, "diagonal", workspace_bytes=1 << 30)
    assert torch.equal(whole[0], blocked[0]) and torch.equal(whole[1], blocked[1])


def test_triton_chunk_from_budget():
    rows = triton_topk.plan_chunk_rows(10**6, 256, 32, 100, "diagonal", 16 * MIB)
    assert triton_topk.MIN_CHUNK_ROWS <= rows < 10**6
    fixed = 24 * 32 * 256 * 4 + triton_topk.TOPK_SLOT_BYTES * 32 * 100
    assert fixed + rows * 32 * 22 <= 16 * MIB
    with pytest.raises(ValueError, match="workspace_bytes=1000 is too small"):
        triton_topk.plan_chunk_rows(10**6, 256, 32, 100, "affine", 1000)
    x = scoring_inputs(2, 2100, 16, "diagonal")
    want = triton_topk.modulated_topk(*x, 7, "diagonal")
    got = triton_topk.modulated_topk(*x, 7, "diagonal", workspace_bytes=600_000)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


@pytest.mark.parametrize(
    ("value", "exc"),
    [(0, ValueError), (-5, ValueError), (1.5e6, TypeError), (True, TypeError), ("1MB", TypeError)],
)
def test_bad_workspace_bytes(value, exc):
    x = scoring_inputs(2, 50, 8, "diagonal")
    with pytest.raises(exc, match="workspace_bytes"):
        K.modulated_topk(x.corpus, *x[1:], k=3, workspace_bytes=value)


def test_reference_accepts_and_ignores_it():
    x = scoring_inputs(2, 50, 8, "diagonal")
    a = R.modulated_topk(*x, 5, "diagonal", 1e-5, workspace_bytes=1)
    b = R.modulated_topk(*x, 5, "diagonal")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with K.use_backend("reference"):
        c = K.modulated_topk(x.corpus, *x[1:], k=5, workspace_bytes=10)
    assert torch.equal(c[1], b[1])


def test_index_search_takes_a_budget():
    torch.manual_seed(0)
    model = IMRNN(IMRNNConfig(input_dim=24, dim=16))
    index = IMRNNIndex(model, feedback_k=10)
    rng = np.random.default_rng(0)
    index.add(rng.standard_normal((700, 24)).astype(np.float32))
    q = rng.standard_normal((5, 24)).astype(np.float32)
    with K.use_backend("cpu"):
        want = index.search(q, 8, mode="exhaustive")
        got = index.search(q, 8, mode="exhaustive", workspace_bytes=2 * MIB)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])
        with pytest.raises(ValueError, match="workspace_bytes=10 is too small"):
            index.search(q, 8, mode="exhaustive", workspace_bytes=10)
        with pytest.raises(TypeError, match="workspace_bytes"):
            index.search(q, 8, mode="exhaustive", workspace_bytes=2.0)


def test_cli_workspace_mb():
    assert workspace_bytes_arg("12.5") == int(12.5 * MIB)
    for bad in ("0", "-1", "nan", "inf", "lots"):
        with pytest.raises(argparse.ArgumentTypeError):
            workspace_bytes_arg(bad)
