"""Property-based tests (hypothesis): every public fused op against its plain reference.

Each op is called through the public dispatcher with the ``cpu`` and the ``triton`` backend
forced (Triton runs in its interpreter: tests/conftest.py sets ``TRITON_INTERPRET=1``), over
random shapes (non-powers of two, single rows, K > N with duplicate ids), storage dtypes
(fp32/fp16/bf16) and value regimes:

- ``unit``: unit-norm rows, as a projected corpus;
- ``scaled``: rows scaled by 10^-3 .. 10^3 each (large and small magnitudes);
- ``offset``: rows with a common offset of up to 30 standard deviations;
- ``tiny_var``: transforms that make the LayerNorm input nearly constant (variance from
  1e-10 to 1e-4 against eps = 1e-5);
- ``dupes``: a corpus made of a few repeated rows (exact ties everywhere).

The oracle is :mod:`imrnns_kernels.reference` run in float64 on exactly the stored values.
A fused op computes in float32, so it must be within the fp32 tolerance of imrnns_kernels.testing,
or, where the problem itself is ill-conditioned in float32, within 8x of the error the plain
reference makes when run in float32 on the same inputs (``ref32``): the fused op must be no
less accurate than the naive statement of the same maths, up to a small factor. Examples
are derandomised (reproducible in CI) and kept few (about 30 per test) so the file runs in
well under 90 s on two cores.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import imrnns_kernels as K
from imrnns_kernels import reference
from imrnns_kernels.testing import TOLERANCES
from imrnns_kernels.types import HyperNetWeights

BACKENDS = ("cpu", "triton")
REGIMES = ("unit", "scaled", "offset", "tiny_var", "dupes")
STORAGE = (torch.float32, torch.float16, torch.bfloat16)
FP32 = TOLERANCES[torch.float32]
# Fused ops may be up to this many times less accurate than the naive fp32 statement.
REF_FACTOR = 8.0

PROPERTY = settings(
    max_examples=7,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# Known failures are marked xfail (never skipped) so they stay visible; none at present.
# Fixed: the diagonal one-pass moments cancelled for rows sharing a large common offset (such
# pairs are now flagged and recomputed two-pass on every path), and the CPU top-k scored
# identical rows 1 ulp apart at small m (affine m = 5: 166 tie inversions among 64 rows made
# of 4 distinct ones; diagonal m = 12 too; it now computes in float64 up to m = 32).
NO_KNOWN_FAILURES: dict[tuple[str, str], Any] = {}
SCORE_KNOWN: dict[tuple[str, str], Any] = {}
TOPK_KNOWN: dict[tuple[str, str], Any] = {}


def combos(known: dict[tuple[str, str], Any] = NO_KNOWN_FAILURES) -> list[Any]:
    """(backend, regime) pairs; known failures are marked xfail, never skipped."""
    return [
        pytest.param(
            backend,
            regime,
            marks=[known[backend, regime]] if (backend, regime) in known else [],
            id=f"{backend}-{regime}",
        )
        for backend in BACKENDS
        for regime in REGIMES
    ]


@dataclass
class Case:
    """One drawn example; tensors are built from ``seed`` (cheap to draw, easy to replay)."""

    b: int
    k: int
    n: int
    m: int
    dtype: torch.dtype
    modulation: str
    regime: str
    weighted: bool
    seed: int

    def gen(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)


@st.composite
def cases(draw: Any, regime: str | None = None, max_m: int = 24) -> Case:
    return Case(
        b=draw(st.integers(1, 7)),  # Triton's top-k switches kernels above 4 queries
        k=draw(st.integers(1, 9)),
        n=draw(st.integers(1, 40)),
        m=draw(st.integers(2, max_m)),
        dtype=draw(st.sampled_from(STORAGE)),
        modulation=draw(st.sampled_from(("diagonal", "affine"))),
        regime=regime or draw(st.sampled_from(REGIMES)),
        weighted=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


# --------------------------------------------------------------------------- inputs
def corpus_for(c: Case, g: torch.Generator) -> torch.Tensor:
    """(n, m) rows in the storage dtype, per regime."""
    x = torch.randn(c.n, c.m, generator=g, dtype=torch.float64)
    if c.regime == "unit":
        x = x / x.norm(dim=1, keepdim=True)
    elif c.regime == "scaled":
        x = x * 10.0 ** (torch.rand(c.n, 1, generator=g, dtype=torch.float64) * 6 - 3)
    elif c.regime == "offset":
        # a common offset of 10 to 1000 standard deviations on every feature
        x = x + 10.0 ** (1 + 2 * torch.rand(1, generator=g, dtype=torch.float64))
    elif c.regime == "dupes":
        base = x[: max(1, min(3, c.n))]
        x = base[torch.randint(0, base.shape[0], (c.n,), generator=g)]
    else:  # tiny_var: ordinary rows, the transform does the damage
        x = x / x.norm(dim=1, keepdim=True)
    if c.dtype == torch.float16:
        x = x.clamp(-6e4, 6e4)
    return x.to(c.dtype)


def transform_for(c: Case, g: torch.Generator) -> torch.Tensor:
    """(b, OUT) float32 query-side transforms; ``tiny_var`` makes T(d) nearly constant."""
    b, m = c.b, c.m
    if c.modulation == "diagonal":
        s = torch.sigmoid(torch.randn(b, m, generator=g))
        bias = torch.tanh(torch.randn(b, m, generator=g))
        if c.regime == "tiny_var":
            # LayerNorm input variance ~ (spread)^2 from 1e-10 to 1e-4 against eps = 1e-5.
            spread = 10.0 ** (torch.rand(b, 1, generator=g) * 3 - 5)
            spread[torch.rand(b, 1, generator=g) < 0.25] = 0.0  # exactly constant: var = 0
            s = s * spread
            bias = 0.5 + spread * torch.randn(b, m, generator=g)
        elif c.regime == "offset":
            # near-uniform scales keep the rows' common offset in T(d): mean(T(d)) >> std
            s = 0.5 + 0.01 * torch.randn(b, m, generator=g)
        return torch.cat([s, bias], dim=1)
    w = torch.eye(m) + torch.randn(b, m, m, generator=g) / m**0.5
    bias = 0.3 * torch.randn(b, m, generator=g)
    if c.regime == "tiny_var":
        spread = 10.0 ** (torch.rand(b, 1, 1, generator=g) * 3 - 5)
        spread[torch.rand(b, 1, 1, generator=g) < 0.25] = 0.0
        w = w * spread
        bias = 0.5 + spread[:, :, 0] * torch.randn(b, m, generator=g)
    return torch.cat([w.reshape(b, m * m), bias], dim=1)


def layer_norm_for(c: Case, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return 1.0 + 0.3 * torch.randn(c.m, generator=g), 0.1 * torch.randn(c.m, generator=g)


def hypernet_for(c: Case, g: torch.Generator, h1: int = 19, h2: int = 11) -> HyperNetWeights:
    """float32 HyperNet with O(1) pre-activations (every ReLU and sigmoid does something)."""
    out = K.transform_dim(c.m, c.modulation)

    def linear(o: int, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(o, i, generator=g) / i**0.5, 0.3 * torch.randn(o, generator=g)

    return HyperNetWeights(*linear(h1, c.m), *linear(h2, h1), *linear(out, h2))


def ids_for(c: Case, g: torch.Generator) -> torch.Tensor:
    """(b, k) ids; k may exceed n, so duplicates are common (and always allowed)."""
    return torch.randint(0, c.n, (c.b, c.k), generator=g)


def weights_for(c: Case, g: torch.Generator) -> torch.Tensor | None:
    if not c.weighted:
        return None
    w = torch.softmax(torch.randn(c.b, c.k, generator=g) / 0.3, dim=1)
    # A zero weight in every row but a positive sum: dropped documents must not count.
    w[:, 0] = 0.0 if c.k > 1 else w[:, 0]
    return w


def d64(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.double()
    if isinstance(x, HyperNetWeights):
        return HyperNetWeights(*(t.double() for t in x))
    return x


# --------------------------------------------------------------------------- comparison
def assert_as_accurate(
    got: torch.Tensor, ref64: torch.Tensor, ref32: torch.Tensor, what: str, c: Any = None
) -> None:
    """|got - ref64| <= max(atol + rtol |ref64|, REF_FACTOR * max |ref32 - ref64|)."""
    assert got.shape == ref64.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    assert bool(torch.isfinite(got).all()), f"{what}: non-finite output for {c}"
    got64, want = got.double(), ref64.double()
    err = (got64 - want).abs()
    ref_err = float((ref32.double() - want).abs().max()) if want.numel() else 0.0
    allowed = torch.clamp(FP32["atol"] + FP32["rtol"] * want.abs(), min=REF_FACTOR * ref_err)
    bad = err > allowed
    assert not bool(bad.any()), (
        f"{what}: {int(bad.sum())}/{err.numel()} elements off; worst error "
        f"{float(err.max()):.3e} (fp32 reference's own error {ref_err:.3e}) for {c}"
    )


def run_backend(backend: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    with K.use_backend(backend), torch.no_grad():
        return fn(*args, **kwargs)


# --------------------------------------------------------------------------- the ops
@pytest.mark.parametrize(("backend", "regime"), combos())
@PROPERTY
@given(data=st.data())
def test_project(backend: str, regime: str, data: Any) -> None:
    c = data.draw(cases(regime))
    g = c.gen()
    x = corpus_for(c, g)
    w = torch.randn(c.k + 1, c.m, generator=g) / c.m**0.5
    bias = None if c.weighted else 0.1 * torch.randn(c.k + 1, generator=g)
    got = run_backend(backend, K.project, x.float(), w, bias)
    want = reference.project(d64(x), d64(w), d64(bias))
    ref32 = reference.project(x.float(), w, bias)
    assert_as_accurate(got, want, ref32, "project", c)
    norms = got.double().norm(dim=-1)
    assert bool(((norms - 1).abs() < 1e-5).all()), "project must return unit rows"


@pytest.mark.parametrize(("backend", "regime"), combos())
@PROPERTY
@given(data=st.data())
def test_adapter_reduce(backend: str, regime: str, data: Any) -> None:
    c = data.draw(cases(regime))
    g = c.gen()
    corpus, ids, hn = corpus_for(c, g), ids_for(c, g), hypernet_for(c, g)
    fw = weights_for(c, g)
    got = run_backend(backend, K.adapter_reduce, corpus, ids, hn, fw, c.modulation)
    want = reference.adapter_reduce(d64(corpus), ids, d64(hn), d64(fw), c.modulation)
    ref32 = reference.adapter_reduce(corpus, ids, hn, fw, c.modulation)
    assert got.dtype == torch.float32
    assert_as_accurate(got, want, ref32, "adapter_reduce", c)
    # duplicate ids count once per occurrence: same as the explicit mean over (b, k) slots
    if hasattr(K, "document_transforms"):
        cache = run_backend(backend, K.document_transforms, corpus, hn, c.modulation)
        cache_ref = reference.document_transforms(d64(corpus), d64(hn), c.modulation)
        cache_ref32 = reference.document_transforms(corpus, hn, c.modulation)
        assert_as_accurate(cache, cache_ref, cache_ref32, "document_transforms", c)
        via = run_backend(backend, K.adapter_reduce, corpus, ids, hn, fw, c.modulation, cache=cache)
        assert_as_accurate(via, want, ref32, "adapter_reduce(cache=...)", c)


@pytest.mark.parametrize(("backend", "regime"), combos())
@PROPERTY
@given(data=st.data(), chunk=st.sampled_from([None, 1, 3, 7]))
def test_corpus_transform(backend: str, regime: str, data: Any, chunk: int | None) -> None:
    c = data.draw(cases(regime))
    if not hasattr(K, "corpus_transform"):
        pytest.skip("corpus_transform is not a public op yet")
    g = c.gen()
    corpus, hn = corpus_for(c, g), hypernet_for(c, g)
    got = run_backend(backend, K.corpus_transform, corpus, hn, c.modulation, chunk)
    want = reference.corpus_transform(d64(corpus), d64(hn), c.modulation)
    ref32 = reference.corpus_transform(corpus, hn, c.modulation)
    assert_as_accurate(got, want, ref32, "corpus_transform", c)


@pytest.mark.parametrize(("backend", "regime"), combos())
@PROPERTY
@given(data=st.data(), ndim=st.sampled_from([2, 3]))
def test_modulate_layernorm(backend: str, regime: str, data: Any, ndim: int) -> None:
    c = data.draw(cases(regime))
    g = c.gen()
    if ndim == 2:
        x = corpus_for(replace(c, n=c.b), g).float()  # (b, m)
    else:
        x = corpus_for(c, g).float()[ids_for(c, g)]  # (b, k, m), duplicates included
    t = transform_for(c, g)
    lw, lb = layer_norm_for(c, g)
    got = run_backend(backend, K.modulate_layernorm, x, t, lw, lb, c.modulation, 1e-5)
    want = reference.modulate_layernorm(d64(x), d64(t), d64(lw), d64(lb), c.modulation, 1e-5)
    ref32 = reference.modulate_layernorm(x, t, lw, lb, c.modulation, 1e-5)
    assert_as_accurate(got, want, ref32, "modulate_layernorm", c)


@pytest.mark.parametrize(("backend", "regime"), combos(SCORE_KNOWN))
@PROPERTY
@given(data=st.data())
def test_modulated_score(backend: str, regime: str, data: Any) -> None:
    c = data.draw(cases(regime))
    g = c.gen()
    corpus, ids = corpus_for(c, g), ids_for(c, g)
    t = transform_for(c, g)
    lw, lb = layer_norm_for(c, g)
    q = torch.randn(c.b, c.m, generator=g)
    args = (c.modulation, 1e-5)
    got = run_backend(backend, K.modulated_score, corpus, ids, t, lw, lb, q, *args)
    want = reference.modulated_score(d64(corpus), ids, d64(t), d64(lw), d64(lb), d64(q), *args)
    ref32 = reference.modulated_score(corpus, ids, t, lw, lb, q, *args)
    assert got.dtype == torch.float32
    assert_as_accurate(got, want, ref32, "modulated_score", c)
    assert bool((got.abs() <= 1 + 1e-5).all()), "cosines must lie in [-1, 1]"
    # the same id twice in a row scores the same
    for b in range(c.b):
        for j in range(1, c.k):
            same = ids[b, :j] == ids[b, j]
            if bool(same.any()):
                first = int(torch.nonzero(same)[0])
                assert float((got[b, j] - got[b, first]).abs()) <= FP32["atol"]


@pytest.mark.parametrize(("backend", "regime"), combos(TOPK_KNOWN))
@PROPERTY
@given(data=st.data())
def test_modulated_topk(backend: str, regime: str, data: Any) -> None:
    c = data.draw(cases(regime))
    g = c.gen()
    corpus = corpus_for(c, g)
    t = transform_for(c, g)
    lw, lb = layer_norm_for(c, g)
    q = torch.randn(c.b, c.m, generator=g)
    k = c.k if c.weighted else c.n + c.k  # sometimes k > N: padding
    s, i = run_backend(backend, K.modulated_topk, corpus, t, lw, lb, q, k, c.modulation, 1e-5)
    assert s.shape == (c.b, k) and i.shape == (c.b, k)
    assert s.dtype == torch.float32 and i.dtype == torch.int64
    # reference scores of every document, float64 and float32
    every = torch.arange(c.n).expand(c.b, c.n)
    full64 = reference.modulated_score(
        d64(corpus), every, d64(t), d64(lw), d64(lb), d64(q), c.modulation, 1e-5
    )
    full32 = reference.modulated_score(corpus, every, t, lw, lb, q, c.modulation, 1e-5)
    ref_err = float((full32.double() - full64).abs().max())
    tol = max(FP32["atol"], REF_FACTOR * ref_err)
    real = min(k, c.n)
    # padding: exactly the positions past N, as -inf / -1
    assert bool((i[:, real:] == -1).all()) and bool(torch.isneginf(s[:, real:]).all())
    assert bool((i[:, :real] >= 0).all()) and bool(torch.isfinite(s[:, :real]).all())
    for b in range(c.b):
        row_i, row_s = i[b, :real], s[b, :real].double()
        assert len(set(row_i.tolist())) == real, "an id returned twice"
        assert bool((row_s[1:] <= row_s[:-1]).all()), "scores must be non-increasing"
        # each returned score is that document's score
        assert float((row_s - full64[b, row_i]).abs().max()) <= tol, (c, backend)
        # nothing left out scores better than the last one kept
        left = torch.ones(c.n, dtype=torch.bool)
        left[row_i] = False
        if bool(left.any()):
            assert float(full64[b, left].max()) <= float(row_s[-1]) + tol, (c, backend)
        # Exact duplicate rows score identically, so the lower id must come first: every
        # lower-id copy of a returned row is returned too, at an earlier place.
        rows = corpus.float()
        place = {int(d): p for p, d in enumerate(row_i)}
        for p, d in enumerate(row_i.tolist()):
            for j in range(d):
                if torch.equal(rows[j], rows[d]):
                    assert j in place and place[j] < p, (
                        f"query {b}: duplicate rows {j} and {d}: {d} placed {p}, "
                        f"{j} {'placed ' + str(place[j]) if j in place else 'dropped'} ({c})"
                    )


def test_cpu_diagonal_scoring_of_offset_rows() -> None:
    """The once-reported CPU bug, deterministically: rows N(10, 1), m = 2, near-uniform
    scales (|score| ~ 1e11 before ill-conditioned pairs were recomputed two-pass)."""
    g = torch.Generator().manual_seed(0)
    m, n, b = 2, 30, 3
    corpus = torch.randn(n, m, generator=g) + 10.0
    t = torch.cat(
        [0.5 + 0.01 * torch.randn(b, m, generator=g), torch.randn(b, m, generator=g).tanh()], 1
    )
    lw, lb = 1 + 0.3 * torch.randn(m, generator=g), 0.1 * torch.randn(m, generator=g)
    q = torch.randn(b, m, generator=g)
    ids = torch.arange(n).expand(b, n)
    got = run_backend("cpu", K.modulated_score, corpus, ids, t, lw, lb, q, "diagonal", 1e-5)
    want = reference.modulated_score(d64(corpus), ids, d64(t), d64(lw), d64(lb), d64(q))
    ref32 = reference.modulated_score(corpus, ids, t, lw, lb, q)
    assert_as_accurate(got, want, ref32, "modulated_score (cpu, offset rows)")


# --------------------------------------------------------------------------- gradients
GRAD = settings(PROPERTY, max_examples=12)


@pytest.mark.parametrize("backend", BACKENDS)
@GRAD
@given(c=cases(max_m=12))
def test_gradients_match_the_reference(backend: str, c: Case) -> None:
    """Training goes through the fused ops when they declare autograd support."""
    g = c.gen()
    c.dtype, c.regime = torch.float32, "unit"  # gradients of well-conditioned inputs
    corpus = corpus_for(c, g).requires_grad_(True)
    ids = ids_for(c, g)
    hn = HyperNetWeights(*(p.requires_grad_(True) for p in hypernet_for(c, g)))
    t = transform_for(c, g).requires_grad_(True)
    lw, lb = layer_norm_for(c, g)
    q = torch.randn(c.b, c.m, generator=g).requires_grad_(True)
    fw = weights_for(c, g)

    def loss(use: str) -> list[torch.Tensor]:
        with K.use_backend(use):
            red = K.adapter_reduce(corpus, ids, hn, fw, c.modulation)
            sc = K.modulated_score(corpus, ids, t, lw, lb, q, c.modulation, 1e-5)
        total = (red * torch.linspace(-1, 1, red.shape[1])).sum() + (sc * sc).sum()
        return list(torch.autograd.grad(total, [corpus, t, q, *hn]))

    got, want = loss(backend), loss("reference")
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m: f"{m} for {c}")
