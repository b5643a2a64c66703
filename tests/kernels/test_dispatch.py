"""The dispatcher: backend choice, overrides, and validation shared by every op."""

from __future__ import annotations

import pytest
import torch

import imrnns_kernels as K
from imrnns_kernels import dispatch, reference
from imrnns_kernels.testing import unit_rows


def _args(b=2, n=11, m=6, k=3, modulation="diagonal"):
    corpus = unit_rows(n, m)
    out = K.transform_dim(m, modulation)
    return {
        "corpus": corpus,
        "ids": torch.randint(0, n, (b, k)),
        "transform": torch.randn(b, out),
        "ln_weight": torch.ones(m),
        "ln_bias": torch.zeros(m),
        "queries": torch.randn(b, m),
        "modulation": modulation,
    }


def test_backend_selection(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert K.select_backend(torch.device("cpu")) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert K.select_backend(torch.device("cpu")) == "cpu"
    assert K.select_backend(torch.device("cuda")) == "triton"
    with K.use_backend("reference"):
        assert K.select_backend(torch.device("cuda")) == "reference"
    monkeypatch.setenv("IMRNNS_BACKEND", "reference")
    assert K.select_backend(torch.device("cpu")) == "reference"
    monkeypatch.setenv("IMRNNS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="IMRNNS_BACKEND"):
        K.select_backend(torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown backend"), K.use_backend("gpu"):
        pass


def test_every_backend_agrees_on_every_op():
    a = _args()
    results = {}
    for backend in dispatch.BACKENDS:
        with K.use_backend(backend):
            results[backend] = K.modulated_score(**a)
    for backend, got in results.items():
        torch.testing.assert_close(got, results["reference"], atol=1e-5, rtol=1e-5, msg=backend)


def test_grad_requests_fall_back_to_a_differentiable_path():
    a = _args()
    a["transform"].requires_grad_(True)
    for backend in dispatch.BACKENDS:
        with K.use_backend(backend):
            K.modulated_score(**a).sum().backward()
        assert a["transform"].grad is not None and bool(torch.isfinite(a["transform"].grad).all())
        a["transform"].grad = None


@pytest.mark.parametrize(
    ("change", "exc", "pattern"),
    [
        ({"ids": torch.tensor([[0, 11, 1], [0, 1, 2]])}, ValueError, r"ids in \[0, 11\].*11 rows"),
        ({"ids": torch.tensor([[0, -1, 1], [0, 1, 2]])}, ValueError, r"ids in \[-1, 2\]"),
        ({"ids": torch.zeros(2, 0, dtype=torch.int64)}, ValueError, r"empty candidate set"),
        ({"ids": torch.zeros(2, 3)}, TypeError, r"ids must be int32 or int64"),
        ({"ids": torch.zeros(3, 3, dtype=torch.int64)}, ValueError, r"ids has 3 rows.*2 queries"),
        ({"queries": torch.randn(2, 7)}, ValueError, r"queries dim 7 does not match corpus dim 6"),
        ({"transform": torch.randn(2, 13)}, ValueError, r"transform must have shape \(2, 12\)"),
        ({"ln_weight": torch.ones(5)}, ValueError, r"ln_weight must have shape \(6,\)"),
        ({"modulation": "full"}, ValueError, r"modulation must be one of"),
        ({"corpus": torch.ones(11, 6, dtype=torch.int32)}, TypeError, r"corpus must be a floating"),
        ({"queries": torch.full((2, 6), float("nan"))}, ValueError, r"queries contains 12 NaN"),
        ({"queries": torch.randn(2, 6, device="meta")}, ValueError, r"one device"),
    ],
)
def test_modulated_score_validation(change, exc, pattern):
    a = {**_args(), **change}
    with pytest.raises(exc, match=pattern):
        K.modulated_score(**a)


@pytest.mark.parametrize(
    ("k", "exc"), [(0, ValueError), (-3, ValueError), (2.0, TypeError), (True, TypeError)]
)
def test_topk_rejects_bad_k(k, exc):
    a = _args()
    a.pop("ids")
    with pytest.raises(exc, match="k must be"):
        K.modulated_topk(k=k, **a)


def test_topk_rejects_empty_corpus():
    a = _args()
    a.pop("ids")
    a["corpus"] = torch.zeros(0, 6)
    with pytest.raises(ValueError, match="corpus is empty"):
        K.modulated_topk(k=3, **a)


def test_adapter_reduce_validation():
    corpus = unit_rows(9, 5)
    w = K.HyperNetWeights(
        torch.randn(16, 5),
        torch.randn(16),
        torch.randn(8, 16),
        torch.randn(8),
        torch.randn(10, 8),
        torch.randn(10),
    )
    ids = torch.randint(0, 9, (2, 4))
    assert K.adapter_reduce(corpus, ids, w).shape == (2, 10)
    with pytest.raises(ValueError, match="does not match affine modulation"):
        K.adapter_reduce(corpus, ids, w, modulation="affine")
    with pytest.raises(ValueError, match="input width 5 does not match corpus dim 4"):
        K.adapter_reduce(unit_rows(9, 4), ids, w)
    with pytest.raises(TypeError, match="HyperNetWeights"):
        K.adapter_reduce(corpus, ids, tuple(w))
    with pytest.raises(ValueError, match="sum to zero"):
        K.adapter_reduce(corpus, ids, w, torch.zeros(2, 4))


def test_project_matches_definition():
    x, w, b = torch.randn(3, 4, 7), torch.randn(5, 7), torch.randn(5)
    y = K.project(x, w, b)
    want = x @ w.T + b
    torch.testing.assert_close(y, want / want.norm(dim=-1, keepdim=True))
    with pytest.raises(ValueError, match="x has last dim 6 but the projection expects 7"):
        K.project(torch.randn(2, 6), w, b)


@pytest.mark.parametrize("backend", ("triton", "cpu", "reference"))
def test_project_checks_and_casts_the_bias(backend):
    # A bias of the wrong shape or another float dtype failed inside F.linear (RuntimeError).
    x, w, b = torch.randn(3, 7), torch.randn(5, 7), torch.randn(5)
    with K.use_backend(backend):
        want = K.project(x, w, b)
        torch.testing.assert_close(K.project(x, w, b.half()), K.project(x, w, b.half().float()))
        assert K.project(x, w.double(), b).dtype == torch.float64
        with pytest.raises(ValueError, match=r"bias must have shape \(5,\)"):
            K.project(x, w, torch.randn(6))
        with pytest.raises(ValueError, match="bias must have rank 1"):
            K.project(x, w, torch.randn(5, 1))
        with pytest.raises(TypeError, match="bias must be a floating-point tensor"):
            K.project(x, w, torch.ones(5, dtype=torch.int64))
    torch.testing.assert_close(want, torch.nn.functional.normalize(x @ w.T + b, dim=-1))


@pytest.mark.parametrize("backend", ("triton", "cpu", "reference"))
@pytest.mark.parametrize("modulation", ["diagonal", "affine"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_modulate_layernorm_with_mixed_dtypes(backend, modulation, dtype):
    # A half-precision model's p(q) and LayerNorm with adapter_reduce's float32 transform
    # raised RuntimeError inside einsum / F.layer_norm; now computed in the promoted dtype.
    m = 6
    x = torch.randn(2, 3, m)
    t = torch.randn(2, K.transform_dim(m, modulation))
    g, beta = 1 + 0.3 * torch.randn(m), 0.1 * torch.randn(m)
    want = reference.modulate_layernorm(
        x.to(dtype).double(),
        t.double(),
        g.to(dtype).double(),
        beta.to(dtype).double(),
        modulation,
    )
    with K.use_backend(backend):
        got = K.modulate_layernorm(x.to(dtype), t, g.to(dtype), beta.to(dtype), modulation)
    assert got.dtype == torch.promote_types(dtype, torch.float32)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
