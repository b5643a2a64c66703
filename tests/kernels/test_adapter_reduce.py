"""adapter_reduce, document_transforms, corpus_transform: fused paths against the reference.

The fused paths (the Triton kernels, interpreted on CPU, and the chunked CPU implementation)
compute in fp32 from the stored corpus values (fp32/fp16/bf16, upcast exactly), so they are
compared with the fp32 tolerance against the float64 reference fed the same stored values.
"""

from __future__ import annotations

import pytest
import torch

import imrnns_kernels as K
from imrnns_kernels import dispatch, reference
from imrnns_kernels.adapter import cpu as cpu_impl
from imrnns_kernels.testing import DTYPES, assert_close, unit_rows
from imrnns_kernels.types import HyperNetWeights

FUSED = ("triton", "cpu")
MODULATIONS = ("diagonal", "affine")


def _hypernet(m: int, modulation: str, h1: int = 128, h2: int = 64) -> HyperNetWeights:
    """float64 HyperNet with O(1) pre-activations (the official N(0, 0.01) init would make
    every ReLU and sigmoid nearly linear and hide mistakes)."""
    out = K.transform_dim(m, modulation)

    def linear(o: int, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.randn(o, i, dtype=torch.float64) / i**0.5
        return w, 0.3 * torch.randn(o, dtype=torch.float64)

    return HyperNetWeights(*linear(h1, m), *linear(h2, h1), *linear(out, h2))


def _cast(weights: HyperNetWeights, dtype: torch.dtype) -> HyperNetWeights:
    return HyperNetWeights(*(t.to(dtype) for t in weights))


def _ids(b: int, k: int, n: int) -> torch.Tensor:
    return torch.randint(0, n, (b, k))


def _fw(b: int, k: int) -> torch.Tensor:
    # Softmax-like: positive, uneven, some near zero.
    return torch.softmax(torch.randn(b, k) / 0.3, dim=1)


def _expected(corpus, ids, w64, fw, modulation, cache=None):
    fw64 = None if fw is None else fw.double()
    c64 = None if cache is None else cache.double()
    return reference.adapter_reduce(corpus.double(), ids, w64, fw64, modulation, cache=c64)


# ----------------------------------------------------------------------------- forward
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("modulation", MODULATIONS)
@pytest.mark.parametrize("m", [50, 256])
@pytest.mark.parametrize("k", [1, 7, 100])
@pytest.mark.parametrize("weighted", [False, True], ids=["uniform", "weighted"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_matches_reference(backend, modulation, m, k, weighted, dtype):
    b, n = 2, 2 * k + 17
    w64 = _hypernet(m, modulation)
    corpus = unit_rows(n, m, dtype)
    ids = _ids(b, k, n)
    fw = _fw(b, k) if weighted else None
    with K.use_backend(backend):
        got = K.adapter_reduce(corpus, ids, _cast(w64, torch.float32), fw, modulation)
    assert got.shape == (b, K.transform_dim(m, modulation)) and got.dtype == torch.float32
    assert_close(got, _expected(corpus, ids, w64, fw, modulation), torch.float32)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("modulation", MODULATIONS)
def test_int32_ids_duplicates_and_odd_hidden_dims(backend, modulation):
    # Hidden widths that are not powers of two, ids repeated within a query, int32 ids.
    m, b, k, n = 20, 4, 9, 5
    w64 = _hypernet(m, modulation, h1=40, h2=24)
    corpus = unit_rows(n, m)
    ids = _ids(b, k, n).to(torch.int32)
    fw = _fw(b, k)
    with K.use_backend(backend):
        got = K.adapter_reduce(corpus, ids, _cast(w64, torch.float32), fw, modulation)
    assert_close(got, _expected(corpus, ids, w64, fw, modulation), torch.float32)


@pytest.mark.parametrize("modulation", MODULATIONS)
@pytest.mark.parametrize("chunk_rows", [1, 5, 16, 10_000])
def test_cpu_chunking_is_exact(modulation, chunk_rows):
    # chunk_rows < K splits single queries along K; > B*K is a single chunk.
    m, b, k, n = 12, 5, 7, 30
    w64 = _hypernet(m, modulation, h1=16, h2=16)
    corpus, ids, fw = unit_rows(n, m), _ids(b, k, n), _fw(b, k)
    for f in (None, fw):
        got = cpu_impl.adapter_reduce(
            corpus, ids, _cast(w64, torch.float32), f, modulation, chunk_rows=chunk_rows
        )
        assert_close(got, _expected(corpus, ids, w64, f, modulation), torch.float32)


@pytest.mark.parametrize("backend", FUSED)
def test_empty_batch(backend):
    w = _cast(_hypernet(8, "diagonal", 16, 16), torch.float32)
    with K.use_backend(backend):
        got = K.adapter_reduce(unit_rows(5, 8), torch.zeros(0, 3, dtype=torch.long), w)
    assert got.shape == (0, 16)


# ----------------------------------------------------------------------------- per-document cache
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("modulation", MODULATIONS)
@pytest.mark.parametrize("m", [50, 256])
def test_document_transforms_matches_reference(backend, modulation, m):
    n = 77
    w64 = _hypernet(m, modulation)
    corpus = unit_rows(n, m, torch.bfloat16)
    with K.use_backend(backend):
        got = K.document_transforms(corpus, _cast(w64, torch.float32), modulation, chunk_rows=32)
    expected = reference.document_transforms(corpus.double(), w64, modulation)
    width = 2 * m if modulation == "diagonal" else 64
    assert got.shape == (n, width) and got.dtype == torch.float32
    assert_close(got, expected, torch.float32)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("modulation", MODULATIONS)
@pytest.mark.parametrize("weighted", [False, True], ids=["uniform", "weighted"])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16], ids=str)
def test_cached_reduce_matches_uncached(backend, modulation, weighted, cache_dtype):
    m, b, k, n = 50, 4, 100, 217
    w64 = _hypernet(m, modulation)
    w32 = _cast(w64, torch.float32)
    corpus, ids = unit_rows(n, m), _ids(b, k, n)
    fw = _fw(b, k) if weighted else None
    with K.use_backend(backend):
        cache = K.document_transforms(corpus, w32, modulation).to(cache_dtype)
        got = K.adapter_reduce(corpus, ids, w32, fw, modulation, cache=cache)
    # Against the reference given the same (possibly fp16-rounded) cache ...
    assert_close(got, _expected(corpus, ids, w64, fw, modulation, cache=cache), torch.float32)
    # ... and, for an fp32 cache, against the uncached op itself.
    if cache_dtype == torch.float32:
        assert_close(got, _expected(corpus, ids, w64, fw, modulation), torch.float32)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("modulation", MODULATIONS)
@pytest.mark.parametrize("m,chunk_rows", [(50, 37), (50, None), (256, None)])
def test_corpus_transform_matches_reference(backend, modulation, m, chunk_rows):
    n = 301  # not a multiple of the chunk nor of the Triton path's 256-row groups
    w64 = _hypernet(m, modulation)
    corpus = unit_rows(n, m, torch.float16)
    with K.use_backend(backend):
        got = K.corpus_transform(corpus, _cast(w64, torch.float32), modulation, chunk_rows)
    assert got.shape == (K.transform_dim(m, modulation),) and got.dtype == torch.float32
    assert_close(got, reference.corpus_transform(corpus.double(), w64, modulation), torch.float32)


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("modulation", MODULATIONS)
@pytest.mark.parametrize("weighted", [False, True], ids=["uniform", "weighted"])
@pytest.mark.parametrize("chunk_rows", [2, 1000])
def test_gradcheck_float64(modulation, weighted, chunk_rows):
    # chunk_rows=2 < K: queries split along K, so the chunk bookkeeping is checked too.
    m, b, k, n = 4, 3, 3, 7
    params = [t.requires_grad_() for t in _hypernet(m, modulation, h1=8, h2=6)]
    corpus = torch.randn(n, m, dtype=torch.float64, requires_grad=True)
    ids = _ids(b, k, n)
    fw = (torch.rand(b, k, dtype=torch.float64) + 0.1).requires_grad_() if weighted else None

    def fn(c, f, *p):
        return cpu_impl.CpuAdapterReduceFunction.apply(c, ids, f, modulation, chunk_rows, *p)

    # fast_mode: checks random projections v^T J u, two forwards instead of one per input.
    assert torch.autograd.gradcheck(fn, (corpus, fw, *params), fast_mode=True)


def _grads(fn, corpus, fw, params, g):
    out = fn(corpus, fw, params)
    leaves = [corpus, *params] + ([fw] if fw is not None else [])
    return out, torch.autograd.grad(out, leaves, g)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("modulation", MODULATIONS)
@pytest.mark.parametrize("weighted", [False, True], ids=["uniform", "weighted"])
@pytest.mark.parametrize("m,k", [(50, 7), (256, 30)])
def test_gradients_match_reference_autograd(backend, modulation, weighted, m, k):
    b, n = 2, k + 17
    w64 = _hypernet(m, modulation)
    corpus64, ids = unit_rows(n, m, torch.float64), _ids(b, k, n)
    fw64 = _fw(b, k).double() if weighted else None
    g = torch.randn(b, K.transform_dim(m, modulation), dtype=torch.float64)

    def leaves(dtype):
        c = corpus64.to(dtype).requires_grad_()
        f = None if fw64 is None else fw64.to(dtype).requires_grad_()
        return c, f, [t.to(dtype).requires_grad_() for t in w64]

    # The reference runs in float64 on the very fp32 values the fused path gets, so only the
    # fused path's own fp32 arithmetic is measured (not the rounding of the inputs).
    c, f, p = leaves(torch.float32)
    c, f, p = (
        c.detach().double().requires_grad_(),
        None if f is None else f.detach().double().requires_grad_(),
        [t.detach().double().requires_grad_() for t in p],
    )
    _, expected = _grads(
        lambda c, f, p: reference.adapter_reduce(c, ids, HyperNetWeights(*p), f, modulation)
        .double(),  # the reference returns float32: keep the graph, compare in float64
        c, f, p, g,
    )  # fmt: skip
    c, f, p = leaves(torch.float32)
    with K.use_backend(backend):
        _, got = _grads(
            lambda c, f, p: K.adapter_reduce(c, ids, HyperNetWeights(*p), f, modulation),
            c, f, p, g.float(),
        )  # fmt: skip
    for name, a, e in zip(["corpus", *HyperNetWeights._fields, "fw"], got, expected, strict=False):
        assert a.dtype == torch.float32, name
        scale = e.abs().max().clamp_min(1.0)  # sums of many rows: compare relative to size
        assert_close(a / scale, e / scale, torch.float32)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("modulation", MODULATIONS)
def test_gradients_through_cache(backend, modulation):
    m, b, k, n = 12, 3, 5, 17
    w64 = _hypernet(m, modulation, h1=16, h2=16)
    corpus, ids, fw = unit_rows(n, m, torch.float64), _ids(b, k, n), _fw(b, k).double()
    g = torch.randn(b, K.transform_dim(m, modulation), dtype=torch.float64)

    def run(dtype, use_backend):
        p = [t.to(dtype).requires_grad_() for t in w64]
        f = fw.to(dtype).requires_grad_()
        w = HyperNetWeights(*p)
        with K.use_backend(use_backend):
            cache = K.document_transforms(corpus.to(dtype), w, modulation)
            out = K.adapter_reduce(corpus.to(dtype), ids, w, f, modulation, cache=cache)
        return torch.autograd.grad(out, [*p, f], g.to(out.dtype))

    for a, e in zip(run(torch.float32, backend), run(torch.float64, "reference"), strict=True):
        assert_close(a, e, torch.float32)


def test_training_uses_the_fused_path(monkeypatch):
    # With grads requested the dispatcher keeps the fused implementation (it declares
    # autograd support) instead of falling back to the materialising reference: the chunked
    # forward runs, and the backward operator runs its analytic backward.
    calls = []
    for name in ("adapter_reduce_forward", "adapter_reduce_backward"):
        real = getattr(cpu_impl, name)
        monkeypatch.setattr(
            cpu_impl, name, lambda *a, _n=name, _r=real, **kw: calls.append(_n) or _r(*a, **kw)
        )
    w = [t.float().requires_grad_() for t in _hypernet(8, "diagonal", 16, 16)]
    with K.use_backend("cpu"):
        K.adapter_reduce(unit_rows(9, 8), _ids(2, 3, 9), HyperNetWeights(*w)).sum().backward()
    assert calls == ["adapter_reduce_forward", "adapter_reduce_backward"]
    assert all(t.grad is not None for t in w)


# ----------------------------------------------------------------------------- bad input
def _valid(modulation="diagonal", m=6, b=2, k=3, n=10):
    w = _cast(_hypernet(m, modulation, 16, 8), torch.float32)
    return unit_rows(n, m), _ids(b, k, n), w


@pytest.mark.parametrize("backend", (*FUSED, "reference"))
def test_bad_input_raises_value_error(backend):
    corpus, ids, w = _valid()
    good_fw = torch.ones(2, 3)
    cases = [
        ({"ids": torch.zeros(2, 0, dtype=torch.long)}, "empty candidate set"),
        ({"ids": torch.tensor([[0, 1, 10], [0, 1, 2]])}, r"outside the corpus of 10 rows"),
        ({"ids": torch.tensor([[0, -1, 2], [0, 1, 2]])}, r"outside the corpus"),
        ({"fw": torch.tensor([[1.0, -0.5, 1.0], [1.0, 1.0, 1.0]])}, "non-negative"),
        ({"fw": torch.tensor([[1.0, float("nan"), 1.0], [1.0, 1.0, 1.0]])}, "NaN"),
        ({"fw": torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])}, r"rows \[1\] sum to zero"),
        ({"fw": torch.ones(3, 2)}, r"feedback_weights must have shape \(2, 3\)"),
        ({"cache": torch.zeros(10, 7)}, r"cache must hold .* shape \(10, 12\)"),
        ({"cache": torch.zeros(9, 12)}, r"shape \(10, 12\)"),
        ({"modulation": "scalar"}, "modulation must be one of"),
    ]
    for change, match in cases:
        kw = {"ids": ids, "fw": good_fw, "cache": None, "modulation": "diagonal", **change}
        with K.use_backend(backend), pytest.raises(ValueError, match=match):
            K.adapter_reduce(corpus, kw["ids"], w, kw["fw"], kw["modulation"], cache=kw["cache"])


def test_bad_types_raise_type_error():
    corpus, ids, w = _valid()
    with pytest.raises(TypeError, match="ids must be int32 or int64"):
        K.adapter_reduce(corpus, ids.float(), w)
    with pytest.raises(TypeError, match="cache must be a floating-point"):
        K.adapter_reduce(corpus, ids, w, cache=torch.zeros(10, 12, dtype=torch.long))
    with pytest.raises(TypeError, match="weights must be a HyperNetWeights"):
        K.adapter_reduce(corpus, ids, tuple(w))


def test_affine_cache_must_be_hidden_states():
    corpus, ids, w = _valid("affine")
    with pytest.raises(ValueError, match=r"hidden states \(N, h2\).*shape \(10, 8\)"):
        K.adapter_reduce(corpus, ids, w, modulation="affine", cache=torch.zeros(10, 42))


@pytest.mark.parametrize("op", [K.corpus_transform, K.document_transforms])
def test_corpus_ops_reject_bad_input(op):
    corpus, _, w = _valid()
    with pytest.raises(ValueError, match="corpus is empty"):
        op(corpus[:0], w)
    with pytest.raises(ValueError, match="chunk_rows must be a positive int"):
        op(corpus, w, "diagonal", 0)
    with pytest.raises(ValueError, match="does not match corpus dim"):
        op(unit_rows(10, 7), w)
    with pytest.raises(ValueError, match="does not match affine modulation"):
        op(corpus, w, "affine")


# ----------------------------------------------------------------------------- compiled (CUDA)
requires_compiled_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or dispatch.interpreting(),
    reason="needs a CUDA GPU and TRITON_INTERPRET=0 (compiled kernels)",
)


@requires_compiled_cuda
@pytest.mark.parametrize("modulation", MODULATIONS)
@pytest.mark.parametrize("m,k", [(50, 7), (256, 100), (256, 1000)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_compiled_kernels_match_reference(modulation, m, k, dtype):
    b, n = 33, 2 * k + 17
    w64 = _hypernet(m, modulation)
    corpus, ids, fw = unit_rows(n, m, dtype), _ids(b, k, n), _fw(b, k)
    w32 = HyperNetWeights(*(t.float().cuda() for t in w64))
    for f in (None, fw):
        expected = _expected(corpus, ids, w64, f, modulation)
        fc = None if f is None else f.cuda()
        got = K.adapter_reduce(corpus.cuda(), ids.cuda(), w32, fc, modulation)
        assert_close(got.cpu(), expected, torch.float32)
        cache = K.document_transforms(corpus.cuda(), w32, modulation)
        got = K.adapter_reduce(corpus.cuda(), ids.cuda(), w32, fc, modulation, cache=cache)
        assert_close(got.cpu(), expected, torch.float32)


@pytest.mark.parametrize("backend", (*FUSED, "reference"))
def test_hypernet_of_mixed_dtypes_is_rejected(backend):
    # The reference failed inside F.linear (RuntimeError) while the fused paths computed.
    w = _cast(_hypernet(6, "diagonal", 16, 8), torch.float32)
    mixed = HyperNetWeights(w.w1.half(), *w[1:])
    with K.use_backend(backend), pytest.raises(TypeError, match="w1 torch.float16, b1 torch"):
        K.adapter_reduce(unit_rows(9, 6), _ids(2, 4, 9), mixed)


@pytest.mark.parametrize("backend", (*FUSED, "reference"))
def test_weights_whose_sum_overflows_are_rejected(backend):
    # Finite weights whose row sum overflows float32 gave zeros (reference) or garbage (fused).
    w = _cast(_hypernet(6, "diagonal", 16, 8), torch.float32)
    fw = torch.ones(2, 4)
    fw[1] = 1e38
    with K.use_backend(backend), pytest.raises(ValueError, match=r"rows \[1\] sum to more"):
        K.adapter_reduce(unit_rows(9, 6), _ids(2, 4, 9), w, fw)


@pytest.mark.parametrize("backend", (*FUSED, "reference"))
@pytest.mark.parametrize("modulation", MODULATIONS)
def test_no_queries_under_autograd_stays_in_the_graph(backend, modulation):
    # B=0 on the Triton path returned a bare zeros tensor: loss.backward() then failed.
    w = HyperNetWeights(*(t.float().requires_grad_() for t in _hypernet(4, modulation, 8, 4)))
    corpus = unit_rows(9, 4).requires_grad_()
    with K.use_backend(backend):
        out = K.adapter_reduce(corpus, torch.zeros(0, 3, dtype=torch.int64), w, None, modulation)
    assert out.shape == (0, K.transform_dim(4, modulation)) and out.dtype == torch.float32
    out.sum().backward()
    assert corpus.grad is None or not corpus.grad.any()
