"""Exhaustive search (modulated_topk): Triton kernel (interpreted) and CPU path vs reference,
the diagonal algebra vs float64, and the deterministic streaming top-k."""

from __future__ import annotations

import pytest
import torch

import imrnns_kernels as K
from imrnns_kernels import reference as R
from imrnns_kernels import topk
from imrnns_kernels.scoring import cpu as cpu_topk
from imrnns_kernels.scoring import moments
from imrnns_kernels.scoring import triton as triton_topk
from imrnns_kernels.testing import DTYPES, assert_close, scoring_inputs

BACKENDS = ("triton", "cpu")
MODULATIONS = ("diagonal", "affine")


def _all_scores(x, modulation):
    """(B, N) float64 reference scores of every document."""
    x64 = x.double()
    b, n = x.queries.shape[0], x.corpus.shape[0]
    ids = torch.arange(n).expand(b, n)
    corpus, transform, ln_w, ln_b, queries = x64
    from imrnns_kernels.reference import modulate_layernorm

    d = modulate_layernorm(corpus[ids], transform, ln_w, ln_b, modulation, 1e-5)
    d = torch.nn.functional.normalize(d, dim=-1)
    return torch.einsum("bm,bnm->bn", torch.nn.functional.normalize(queries, dim=-1), d)


def _check_topk(scores, ids, full, k):
    """Results agree with the float64 score table whatever the order of near-ties:
    the k-th best values match rank by rank, each returned id carries its own score, ids are
    distinct, and the order is (score desc, id asc)."""
    b, n = full.shape
    take = min(k, n)
    assert scores.shape == (b, k) and ids.shape == (b, k)
    assert scores.dtype == torch.float32 and ids.dtype == torch.int64
    want = torch.sort(full, dim=1, descending=True).values[:, :take]
    assert_close(scores[:, :take], want, torch.float32)
    assert_close(scores[:, :take], full.gather(1, ids[:, :take]), torch.float32)
    for row in ids[:, :take]:
        assert len(set(row.tolist())) == take
    s, i = scores[:, :take], ids[:, :take]
    ordered = (s[:, :-1] > s[:, 1:]) | ((s[:, :-1] == s[:, 1:]) & (i[:, :-1] < i[:, 1:]))
    assert bool(ordered.all())
    if k > n:
        assert bool((ids[:, n:] == -1).all())
        assert bool(torch.isneginf(scores[:, n:]).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("modulation", "b"), [("diagonal", 3), ("diagonal", 37), ("affine", 3)])
@pytest.mark.parametrize("m", [50, 256, 384])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(backend, modulation, m, dtype, b):
    """Diagonal: b = 3 takes Triton's two-pass row kernel (at most SMALL_BATCH queries),
    b = 37 its tensor-core dot kernel over two query tiles (affine has one kernel)."""
    n, k = 1000 + 17, 10
    x = scoring_inputs(b, n, m, modulation, dtype)
    with K.use_backend(backend):
        scores, ids = K.modulated_topk(x.corpus, *x[1:], k=k, modulation=modulation)
    _check_topk(scores, ids, _all_scores(x, modulation), k)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("modulation", MODULATIONS)
@pytest.mark.parametrize("k", [37, 50, 100])
def test_k_equal_to_and_larger_than_n(backend, modulation, k):
    b, n, m = 2, 37, 24
    x = scoring_inputs(b, n, m, modulation)
    with K.use_backend(backend):
        scores, ids = K.modulated_topk(x.corpus, *x[1:], k=k, modulation=modulation)
    _check_topk(scores, ids, _all_scores(x, modulation), k)
    _ref_s, ref_i = R.modulated_topk(*x.double()[:5], k=k, modulation=modulation)
    assert bool((ids == -1).eq(ref_i == -1).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("modulation", MODULATIONS)
def test_streaming_merge_over_many_chunks(backend, modulation, monkeypatch):
    """Small chunks: the running top-k is merged ~10 times; same results as one chunk."""
    b, n, m, k = 4, 1000 + 17, 50, 25
    x = scoring_inputs(b, n, m, modulation)
    if backend == "triton":
        scores, ids = triton_topk.modulated_topk(*x, k, modulation, chunk_rows=97)
    else:
        monkeypatch.setattr(cpu_topk, "MIN_CHUNK", 16)
        monkeypatch.setattr(cpu_topk, "MAX_CHUNK", 97)
        monkeypatch.setattr(cpu_topk, "QUERY_BLOCK", 3)  # two query blocks
        scores, ids = cpu_topk.modulated_topk(*x, k, modulation)
    _check_topk(scores, ids, _all_scores(x, modulation), k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicate_documents_tie_by_lower_id(backend, monkeypatch):
    """Copies of one document in different chunks come out adjacent, and lowest id first
    wherever the kernel scores the copies identically (the order check of _check_topk)."""
    b, n, m = 2, 400, 32
    x = scoring_inputs(b, n, m, "diagonal")
    corpus = x.corpus.clone()
    group = [5, 77, 123, 250, 391]
    corpus[group] = corpus[77].clone()
    full = _all_scores(x._replace(corpus=corpus), "diagonal")
    if backend == "triton":
        scores, ids = triton_topk.modulated_topk(corpus, *x[1:], n, "diagonal", chunk_rows=100)
    else:
        monkeypatch.setattr(cpu_topk, "MIN_CHUNK", 16)
        monkeypatch.setattr(cpu_topk, "MAX_CHUNK", 100)
        scores, ids = cpu_topk.modulated_topk(corpus, *x[1:], n, "diagonal")
    _check_topk(scores, ids, full, n)
    for row in ids.tolist():
        pos = sorted(row.index(d) for d in group)
        assert pos == list(range(pos[0], pos[0] + len(group)))


def test_topk_machinery_breaks_exact_ties_by_lower_id():
    """Exact ties straddling the cut of a chunk and across chunks (torch.topk is unstable)."""
    scores = torch.tensor(
        [
            [0.5, 0.9, 0.5, 0.5, 0.1, 0.5, 0.9, 0.5],
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        ]
    )
    top = topk.StreamingTopK(2, 4, torch.device("cpu"))
    for start in range(0, 8, 3):  # chunks [0:3], [3:6], [6:8]
        top.add(scores[:, start : start + 3], start)
    s, i = top.result()
    assert i.tolist() == [[1, 6, 0, 2], [0, 1, 2, 3]]
    assert s[0].tolist() == pytest.approx([0.9, 0.9, 0.5, 0.5])
    _, idx = topk.chunk_topk(scores, 3)
    assert idx.tolist()[1] == [0, 1, 2] and sorted(idx.tolist()[0]) == [0, 1, 6]
    big = torch.zeros(3, 5000)
    big[:, 4321] = 1.0
    _v, idx = topk.chunk_topk(big, 4)
    assert idx.tolist() == [[4321, 0, 1, 2]] * 3
    # many ties at the cut of a large chunk (the torch.topk + stable-sort repair path)
    top = topk.StreamingTopK(1, 2, torch.device("cpu"))
    flat = torch.full((1, 30), 0.3)
    flat[0, 25] = 0.7
    for start in range(0, 30, 10):
        top.add(flat[:, start : start + 10], start)
    assert top.result()[1].tolist() == [[25, 0]]
    # -inf columns (pairs a kernel dropped) never enter, in the first chunk or a later one
    top = topk.StreamingTopK(1, 4, torch.device("cpu"))
    top.add(torch.tensor([[float("-inf"), 0.2, float("-inf")]]), 0)
    top.add(torch.tensor([[float("-inf"), 0.4]]), 3)
    s, i = top.result()
    assert i.tolist() == [[4, 1, -1, -1]]
    assert s[0, :2].tolist() == pytest.approx([0.4, 0.2]) and bool(torch.isneginf(s[0, 2:]).all())


def test_diagonal_algebra_matches_float64_reference_closely():
    """The GEMM + epilogue form of the diagonal score vs the materialising float64 reference,
    including near-initial parameters (s ~ 0.5, b ~ 0: tiny variance relative to eps)."""
    b, n, m = 4, 513, 256
    for init in (False, True):
        x = scoring_inputs(b, n, m, "diagonal")
        if init:
            transform = torch.cat(
                [torch.sigmoid(0.01 * torch.randn(b, m)), torch.tanh(0.01 * torch.randn(b, m))], 1
            )
            x = x._replace(transform=transform, ln_weight=torch.ones(m), ln_bias=torch.zeros(m))
        x = x._replace(corpus=x.corpus + 0.05)  # a shared component, as real embeddings have
        atoms = moments.diagonal_atoms(*x[1:], torch.float32)
        d = x.corpus
        mom = torch.einsum("abm,nm->abn", atoms.lin, d)
        mom[4:] += torch.einsum("abm,nm->abn", atoms.quad, d * d)
        got = moments.cosine_epilogue_(*mom.unbind(0), atoms.consts, 1e-5)
        assert_close(got, _all_scores(x, "diagonal"), torch.float32)
        # and the algebra itself is exact: in float64 it agrees to 1e-10
        atoms64 = moments.diagonal_atoms(*x.double()[1:], torch.float64)
        d64 = d.double()
        mom = torch.einsum("abm,nm->abn", atoms64.lin, d64)
        mom[4:] += torch.einsum("abm,nm->abn", atoms64.quad, d64 * d64)
        got64 = moments.cosine_epilogue_(*mom.unbind(0), atoms64.consts, 1e-5)
        assert_close(got64, _all_scores(x, "diagonal"), torch.float64)


def test_affine_centering_is_exact():
    b, n, m = 2, 100, 40
    x = scoring_inputs(b, n, m, "affine").double()
    prep = moments.affine_prep(*x[1:], torch.float64)
    y = torch.einsum("bij,nj->bni", prep.weight, x.corpus) + prep.bias[:, None, :]
    assert float(y.mean(dim=-1).abs().max()) < 1e-14


@pytest.mark.parametrize(("k", "exc"), [(0, ValueError), (-3, ValueError), (2.0, TypeError)])
def test_bad_k(k, exc):
    x = scoring_inputs(2, 11, 6, "diagonal")
    with pytest.raises(exc, match="k must be"):
        K.modulated_topk(x.corpus, *x[1:], k=k)


def test_bad_shapes_and_empty_corpus():
    x = scoring_inputs(2, 11, 6, "diagonal")
    with pytest.raises(ValueError, match="queries dim 7"):
        K.modulated_topk(x.corpus, x.transform, x.ln_weight, x.ln_bias, torch.randn(2, 7), k=3)
    with pytest.raises(ValueError, match="empty"):
        K.modulated_topk(x.corpus[:0], *x[1:], k=3)
    with pytest.raises(ValueError, match="transform must have shape"):
        K.modulated_topk(x.corpus, *x[1:], k=3, modulation="affine")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b", [2, 9])
def test_rows_with_a_large_common_offset(backend, b):
    """Rows N(100, 1), near-uniform scales: the one-pass moments lose ~13 bits. The CPU path
    recomputes the flagged pairs, Triton's dot kernel (b = 9) drops and counts them and the
    call is redone by the two-pass row kernel (b = 2 runs it directly)."""
    from imrnns_kernels.scoring import triton as triton_topk

    n, m, k = 301, 48, 20
    g = torch.Generator().manual_seed(5)
    x = scoring_inputs(b, n, m, "diagonal")
    transform = torch.cat(
        [1.0 + 0.01 * torch.randn(b, m, generator=g), 0.01 * torch.randn(b, m, generator=g)], 1
    )
    x = x._replace(corpus=100.0 + torch.randn(n, m, generator=g), transform=transform)
    assert (b > triton_topk.SMALL_BATCH) == (b == 9)
    with K.use_backend(backend):
        scores, ids = K.modulated_topk(x.corpus, *x[1:], k=k, modulation="diagonal")
    _check_topk(scores, ids, _all_scores(x, "diagonal"), k)


@pytest.mark.parametrize(("b", "m"), [(9, 50), (37, 113), (16, 256)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dot_kernel_compiled_shapes_match(b, m, dtype):
    """The dot kernel with the block shapes it is compiled with on a GPU (128-row tiles,
    32-wide slices, 2 stages), query blocks partial (9, 37) and full (16), through the
    interpreter: the masks of their partial tiles, against the float64 scores and against
    the interpreter's own block shapes."""
    n = 1000 + 17
    x = scoring_inputs(b, n, m, "diagonal", dtype=dtype)
    atoms = moments.diagonal_atoms(x.transform, x.ln_weight, x.ln_bias, x.queries, torch.float32)
    lin, quad = triton_topk.dot_operands(atoms)
    out = torch.empty(b, n)
    ill = torch.zeros(1, dtype=torch.int32)
    args = (x.corpus, lin, quad, atoms.consts.contiguous(), out, ill, 0, n, 1e-5)
    triton_topk._diag_chunk(*args, blocks=triton_topk._diag_blocks(m, b, compiled=True))
    got = out.clone()
    assert int(ill.item()) == 0
    assert_close(got, _all_scores(x, "diagonal").float(), torch.float32)
    triton_topk._diag_chunk(*args)
    assert_close(got, out, torch.float32)
