"""Candidate scoring (modulated_score): Triton kernel (interpreted) and CPU path vs reference.

The reference runs in float64 on exactly the stored corpus values; both fast paths upcast the
stored values exactly and accumulate in fp32, so they are held to the fp32 tolerance for
every storage dtype.
"""

from __future__ import annotations

import pytest
import torch

import imrnns_kernels as K
from imrnns_kernels import reference as R
from imrnns_kernels.scoring import triton as triton_score
from imrnns_kernels.scoring.cpu import ModulatedScoreCPU
from imrnns_kernels.testing import DTYPES, assert_close, scoring_inputs
from imrnns_kernels.topk import topk_by_id

BACKENDS = ("triton", "cpu")
MODULATIONS = ("diagonal", "affine")


def _ids(b: int, k: int, n: int) -> torch.Tensor:
    ids = torch.randint(0, n, (b, k))
    ids[:, 1] = ids[:, 4]  # duplicate candidates within a row
    ids[0, -1] = n - 1  # the last corpus row
    return ids


def _reference(x, ids, modulation):
    x64 = x.double()
    return R.modulated_score(x64.corpus, ids, *x64[1:], modulation=modulation)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("modulation", MODULATIONS)
@pytest.mark.parametrize("m", [50, 256, 384])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(backend, modulation, m, dtype):
    b, k, n = 3, 37, 1000 + 17
    x = scoring_inputs(b, n, m, modulation, dtype)
    ids = _ids(b, k, n)
    with K.use_backend(backend):
        got = K.modulated_score(x.corpus, ids, *x[1:], modulation=modulation)
    assert got.shape == (b, k) and got.dtype == torch.float32
    assert_close(got, _reference(x, ids, modulation), torch.float32)
    # duplicate ids score the same (up to GEMM blocking: BLAS may round a row differently
    # depending on its position in the block)
    assert_close(got[:, 1], got[:, 4], torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_ids_and_strided_inputs(backend):
    b, k, n, m = 2, 19, 300, 50
    x = scoring_inputs(b, n, m, "diagonal")
    ids = _ids(b, k, n)
    want = _reference(x, ids, "diagonal")
    # rows of a wider tensor (row stride != m: read in place) ...
    wide = torch.zeros(n, m + 13)
    wide[:, :m] = x.corpus
    # ... a column-strided view (no unit last-dim stride: copied), a transposed transform,
    # and a non-contiguous queries view.
    colstrided = torch.zeros(n, 2 * m)[:, ::2]
    colstrided.copy_(x.corpus)
    transform = x.transform.t().contiguous().t()
    queries = torch.zeros(b, 2 * m)[:, ::2]
    queries.copy_(x.queries)
    with K.use_backend(backend):
        for corpus in (wide[:, :m], colstrided):
            got = K.modulated_score(
                corpus, ids.int(), transform, x.ln_weight, x.ln_bias, queries, "diagonal"
            )
            assert_close(got, want, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("modulation", MODULATIONS)
def test_gradients_match_reference_autograd(backend, modulation):
    """fp32 gradients of the fused path vs autograd through the float64 reference."""
    b, k, n, m = 3, 21, 120, 50
    x = scoring_inputs(b, n, m, modulation)
    ids = _ids(b, k, n)
    grad = torch.randn(b, k)
    ours = [t.clone().requires_grad_(True) for t in x]
    with K.use_backend(backend):
        out = K.modulated_score(ours[0], ids, *ours[1:], modulation=modulation)
    (out * grad).sum().backward()
    ref = [t.double().clone().requires_grad_(True) for t in x]
    # The reference's float32 cast would round the gradients: differentiate its float64 body.
    want = _reference_f64(ref, ids, modulation)
    (want * grad.double()).sum().backward()
    for name, a, r in zip(x._fields, ours, ref, strict=True):
        assert a.grad is not None, name
        assert_close(a.grad, r.grad, torch.float32)


def _reference_f64(leaves, ids, modulation):
    corpus, transform, ln_w, ln_b, queries = leaves
    from imrnns_kernels.reference import modulate_layernorm

    d = modulate_layernorm(corpus[ids], transform, ln_w, ln_b, modulation, 1e-5)
    d = torch.nn.functional.normalize(d, dim=-1)
    q = torch.nn.functional.normalize(queries, dim=-1)
    return torch.einsum("bm,bkm->bk", q, d)


@pytest.mark.parametrize("modulation", MODULATIONS)
def test_cpu_backward_gradcheck_float64(modulation):
    b, _k, n, m = 2, 5, 9, 6
    x = scoring_inputs(b, n, m, modulation).double()
    ids = torch.tensor([[0, 3, 3, 8, 1], [2, 2, 5, 7, 0]])
    leaves = [t.clone().requires_grad_(True) for t in x]

    def fn(corpus, transform, ln_w, ln_b, queries):
        return ModulatedScoreCPU.apply(
            corpus, ids, transform, ln_w, ln_b, queries, modulation, 1e-5
        )

    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_step_on_model_uses_fused_path(backend):
    """IMRNN.forward trains through the fused scoring op: gradients reach the projector."""
    from imrnns import IMRNN, IMRNNConfig

    model = IMRNN(IMRNNConfig(input_dim=24, dim=16))
    q, c = torch.randn(2, 24), torch.randn(2, 5, 24)
    with K.use_backend(backend):
        model(q, c).scores.sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert grads["projector.weight"] is not None and grads["doc_norm.weight"] is not None
    ref_model = IMRNN(IMRNNConfig(input_dim=24, dim=16))
    ref_model.load_state_dict(model.state_dict())
    with K.use_backend("reference"):
        ref_model(q, c).scores.sum().backward()
    for name, p in ref_model.named_parameters():
        if p.grad is not None:
            assert_close(grads[name], p.grad, torch.float32)


def test_rerank_topk_helper_ties_and_padding():
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.1], [0.2, 0.2, 0.2, 0.2]])
    ids = torch.tensor([[7, 3, 2, 9], [5, 1, 1, 4]])
    s, i = topk_by_id(scores, ids, 6)
    assert i.tolist() == [[3, 2, 7, 9, -1, -1], [1, 1, 4, 5, -1, -1]]
    assert s[0, :4].tolist() == pytest.approx([0.9, 0.5, 0.5, 0.1])
    assert bool(torch.isinf(s[:, 4:]).all() and (s[:, 4:] < 0).all())
    with pytest.raises(ValueError, match="k must be"):
        topk_by_id(scores, ids, 0)


def test_triton_launcher_rejects_cpu_tensors_when_not_interpreting(monkeypatch):
    x = scoring_inputs(1, 10, 8, "diagonal")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA"):
        triton_score.modulated_score_forward(
            x.corpus, torch.zeros(1, 2, dtype=torch.long), *x[1:], "diagonal", 1e-5
        )


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        (lambda a: a.update(queries=torch.randn(2, 7)), "queries dim 7"),
        (lambda a: a.update(ids=torch.tensor([[0, 11], [1, 2]])), "outside the corpus"),
        (lambda a: a.update(ids=torch.tensor([[0, -1], [1, 2]])), "outside the corpus"),
        (lambda a: a.update(ids=torch.zeros(3, 2, dtype=torch.long)), "ids has 3 rows"),
        (lambda a: a.update(transform=torch.randn(2, 9)), "transform must have shape"),
        (lambda a: a.update(ln_weight=torch.ones(5)), "ln_weight must have shape"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, pattern):
    x = scoring_inputs(2, 11, 6, "diagonal")
    args = {
        "corpus": x.corpus,
        "ids": torch.tensor([[0, 1], [2, 10]]),
        "transform": x.transform,
        "ln_weight": x.ln_weight,
        "ln_bias": x.ln_bias,
        "queries": x.queries,
    }
    change(args)
    with pytest.raises(ValueError, match=pattern):
        K.modulated_score(**args)


def test_dot_precision_choice(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("IMRNNS_DOT_PRECISION", raising=False)
    assert triton_score.dot_precision(cpu) == "ieee"  # no TF32 off CUDA
    monkeypatch.setenv("IMRNNS_DOT_PRECISION", "tf32x3")
    assert triton_score.dot_precision(cpu) == "tf32x3"
    monkeypatch.setenv("IMRNNS_DOT_PRECISION", "tf32")
    with pytest.raises(ValueError, match="IMRNNS_DOT_PRECISION"):
        triton_score.dot_precision(cpu)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m", [2, 5, 50])
def test_rows_with_a_large_common_offset(backend, m):
    """Rows N(100, 1) and nearly uniform scales: mu^2 / var ~ 1e4, where the one-pass
    moments lose ~13 bits (|score| reached 1e11 at m = 2). Those pairs are flagged and
    recomputed two-pass, so the fp32 tolerance holds."""
    b, k, n = 3, 23, 97
    g = torch.Generator().manual_seed(11)
    x = scoring_inputs(b, n, m, "diagonal")
    corpus = 100.0 + torch.randn(n, m, generator=g)
    transform = torch.cat(
        [1.0 + 0.01 * torch.randn(b, m, generator=g), 0.01 * torch.randn(b, m, generator=g)], 1
    )
    x = x._replace(corpus=corpus, transform=transform)
    ids = _ids(b, k, n)
    with K.use_backend(backend):
        got = K.modulated_score(x.corpus, ids, *x[1:], modulation="diagonal")
    assert torch.isfinite(got).all()
    want = _reference(x, ids, "diagonal")
    if m > 2:
        assert_close(got, want, torch.float32)
    else:
        # m = 2 is ill-conditioned in fp32 itself (var(y) can be tiny next to y^2): hold the
        # op to the plain reference's own fp32 error, as tests/kernels/test_properties.py does.
        naive = R.modulated_score(x.corpus, ids, *x[1:], modulation="diagonal")
        ref_err = (naive.double() - want).abs().max().item()
        assert (got.double() - want).abs().max().item() <= max(1e-5, 8 * ref_err)


@pytest.mark.parametrize("modulation", MODULATIONS)
def test_cpu_blocks_and_reused_buffers(modulation, monkeypatch):
    """Several query blocks over 2 workers, and successive calls of other shapes and storage
    dtypes reusing the per-thread buffers: every call matches the reference, and an earlier
    result is not overwritten by a later call."""
    from imrnns_kernels.scoring import cpu as cpu_score

    monkeypatch.setattr(cpu_score, "BLOCK_ELEMENTS", 2 * 37 * 50)  # 2 queries a block
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        results = []
        for b, k, m, dtype in [
            (7, 37, 50, torch.float32),
            (3, 11, 50, torch.float16),
            (9, 37, 64, torch.bfloat16),
            (5, 37, 50, torch.float32),
        ]:
            x = scoring_inputs(b, 301, m, modulation, dtype)
            ids = _ids(b, k, 301)
            with K.use_backend("cpu"):
                got = K.modulated_score(x.corpus, ids, *x[1:], modulation=modulation)
            want = _reference(x, ids, modulation)
            assert_close(got, want, torch.float32)
            results.append((got.clone(), got))
    finally:
        torch.set_num_threads(threads)
    for kept, returned in results:
        assert torch.equal(kept, returned)


@pytest.mark.parametrize("backend", ("triton", "cpu", "reference"))
@pytest.mark.parametrize("modulation", MODULATIONS)
def test_no_queries_gives_an_empty_table(backend, modulation):
    # B=0 (ids (0, K)): the CPU epilogue took amax() of an empty tensor and raised.
    x = scoring_inputs(0, 7, 5, modulation)
    ids = torch.zeros(0, 3, dtype=torch.int64)
    with K.use_backend(backend):
        out = K.modulated_score(x.corpus, ids, *x[1:], modulation=modulation)
        leaves = [t.clone().requires_grad_() for t in x]
        scored = K.modulated_score(leaves[0], ids, *leaves[1:], modulation=modulation)
        scored.sum().backward()
    assert out.shape == (0, 3) and out.dtype == torch.float32
    assert all(t.grad is None or not t.grad.any() for t in leaves)


@pytest.mark.parametrize("backend", ("triton", "cpu", "reference"))
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_half_precision_layernorm_parameters(backend, dtype):
    # fp16/bf16 LayerNorm parameters (a half-precision model) with a float32 transform: the
    # reference failed inside F.layer_norm while the fused paths computed in float32.
    x = scoring_inputs(2, 9, 6, "diagonal")
    ids = _ids(2, 5, 9)
    g, beta = x.ln_weight.to(dtype), x.ln_bias.to(dtype)
    want = R.modulated_score(
        x.corpus.double(), ids, x.transform.double(), g.double(), beta.double(), x.queries.double()
    )
    with K.use_backend(backend):
        got = K.modulated_score(x.corpus, ids, x.transform, g, beta, x.queries)
    assert_close(got, want, torch.float32)


@pytest.mark.parametrize("backend", ("triton", "cpu", "reference"))
@pytest.mark.parametrize("name", ["ln_weight", "ln_bias"])
def test_non_finite_layernorm_parameters_are_rejected(backend, name):
    # NaN/Inf in the LayerNorm parameters made every score NaN without an error.
    x = scoring_inputs(2, 9, 6, "diagonal")._asdict()
    x[name] = x[name].clone()
    x[name][2] = float("nan")
    ids = _ids(2, 5, 9)
    with K.use_backend(backend), pytest.raises(ValueError, match=f"{name} contains 1 NaN/Inf"):
        K.modulated_score(
            x["corpus"], ids, x["transform"], x["ln_weight"], x["ln_bias"], x["queries"]
        )
    with K.use_backend(backend), pytest.raises(ValueError, match=f"{name} contains 1 NaN/Inf"):
        K.modulated_topk(x["corpus"], x["transform"], x["ln_weight"], x["ln_bias"], x["queries"], 3)
