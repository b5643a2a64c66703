"""The fused ops as PyTorch custom operators (``torch.ops.imrnns.*``, docs/compile.md).

- ``torch.library.opcheck`` on every operator (schema, autograd registration, fake tensors,
  AOT dispatch with dynamic shapes and gradients): non-power-of-two shapes, fp32, the CPU
  backend (the interpreter would make each of opcheck's many calls slow), and the reference
  and Triton (interpreted) backends for the differentiable ones, whose backward differs.
- ``torch.compile(fullgraph=True)`` of a function calling ``modulated_score``,
  ``modulated_topk`` and ``adapter_reduce``: no graph break, the eager results exactly, and
  the value checks still raise when the compiled code runs.
- CUDA-graph facts that hold on any machine: the top-k operator is tagged
  ``cudagraph_unsafe``, and value checks are skipped while a stream is being captured.

The model-level tests (IMRNN.score compiled and exported, backward through it) are in
tests/model/test_compile_export.py.
"""

from __future__ import annotations

import pytest
import torch

import imrnns_kernels as K
from imrnns_kernels import _validation, dispatch
from imrnns_kernels.testing import assert_close, scoring_inputs, unit_rows
from imrnns_kernels.types import HyperNetWeights

MODULATIONS = ("diagonal", "affine")
OPS = torch.ops.imrnns
# opcheck's import of torch.testing internals warns about torch.jit: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")
# B, N, m, K: none a power of two.
B, N, M, KK = 3, 13, 6, 5


def _hypernet(m: int, modulation: str, requires_grad: bool = False) -> HyperNetWeights:
    out = K.transform_dim(m, modulation)
    shapes = [(7, m), (7,), (5, 7), (5,), (out, 5), (out,)]
    return HyperNetWeights(
        *(
            (torch.randn(s) / (s[-1] ** 0.5 if len(s) == 2 else 3)).requires_grad_(requires_grad)
            for s in shapes
        )
    )


def _ids(b: int = B, k: int = KK, n: int = N) -> torch.Tensor:
    ids = torch.randint(0, n, (b, k))
    ids[0, :2] = n - 1  # a duplicate, and the last row
    return ids


def _score_args(modulation: str, requires_grad: bool) -> tuple:
    x = scoring_inputs(B, N, M, modulation)
    t = [v.clone().requires_grad_(requires_grad) for v in x]
    return (t[0], _ids(), *t[1:], modulation, 1e-5)


def _opcheck(op, args, kwargs=None) -> None:
    result = torch.library.opcheck(op, args, kwargs)
    assert all(v == "SUCCESS" for v in result.values()), result


# ----------------------------------------------------------------------------- opcheck
@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
@pytest.mark.parametrize("modulation", MODULATIONS)
def test_opcheck_modulated_score(backend, modulation):
    # reference: the backward recomputes it under autograd; cpu, triton: their analytic
    # backward through the backward operator.
    with K.use_backend(backend):
        _opcheck(OPS.modulated_score.default, _score_args(modulation, requires_grad=True))


@pytest.mark.parametrize("modulation", MODULATIONS)
def test_opcheck_modulated_score_backward(modulation):
    corpus, ids, t, lw, lb, q, mod, eps = _score_args(modulation, requires_grad=False)
    t = t.t().contiguous().t()  # a transposed layout: the gradients still come contiguous
    grad = torch.randn(B, KK)
    with K.use_backend("cpu"):
        for need_corpus in (True, False):
            _opcheck(
                OPS.modulated_score_backward.default,
                (grad, corpus, ids, t, lw, lb, q, mod, eps, "cpu", need_corpus),
            )


@pytest.mark.parametrize("modulation", MODULATIONS)
def test_opcheck_modulated_topk(modulation):
    x = scoring_inputs(B, N, M, modulation)
    with K.use_backend("cpu"):
        _opcheck(OPS.modulated_topk.default, (*x, 4, modulation, 1e-5))
        # k > N pads; a workspace budget; inputs that require grad give outputs that do not.
        args = (x.corpus, *(v.clone().requires_grad_() for v in x[1:]), N + 2, modulation, 1e-5)
        _opcheck(OPS.modulated_topk.default, args, {"workspace_bytes": 4 << 20})


def _reduce_args(modulation: str, weighted: bool, cached: bool) -> tuple:
    w = _hypernet(M, modulation, requires_grad=True)
    corpus = unit_rows(N, M).requires_grad_()
    fw = torch.softmax(torch.randn(B, KK), dim=1).requires_grad_() if weighted else None
    cache = None
    if cached:
        with torch.no_grad():
            cache = K.document_transforms(corpus, w, modulation).requires_grad_()
    return (corpus, _ids(), *w, fw, modulation, cache)


@pytest.mark.parametrize("modulation", MODULATIONS)
@pytest.mark.parametrize(
    ("backend", "weighted", "cached"),
    [
        ("cpu", False, False),
        ("cpu", True, False),
        ("cpu", True, True),  # the cached path has a backward of its own
        ("reference", True, True),  # recomputed under autograd: one case covers it
        ("triton", True, False),  # interpreted; its backward is the cpu one
    ],
)
def test_opcheck_adapter_reduce(backend, modulation, weighted, cached):
    with K.use_backend(backend):
        _opcheck(OPS.adapter_reduce.default, _reduce_args(modulation, weighted, cached))


@pytest.mark.parametrize(
    ("op", "backend"),
    [
        ("document_transforms", "cpu"),
        ("corpus_transform", "cpu"),
        ("document_transforms", "reference"),
    ],
)
@pytest.mark.parametrize("modulation", MODULATIONS)
def test_opcheck_corpus_ops(op, backend, modulation):
    w = _hypernet(M, modulation, requires_grad=True)
    with K.use_backend(backend):
        # chunk_rows 4 < N: several chunks.
        _opcheck(getattr(OPS, op).default, (unit_rows(N, M).requires_grad_(), *w, modulation, 4))


@pytest.mark.parametrize("modulation", MODULATIONS)
def test_opcheck_adapter_backward(modulation):
    corpus, ids, *w, fw, mod, _ = _reduce_args(modulation, weighted=True, cached=False)
    detached = [t.detach() for t in (corpus, *w, fw)]
    corpus, *w, fw = detached
    grad = torch.randn(B, K.transform_dim(M, modulation))
    needs = [True, True, False, True, False, True, False, True, True]
    _opcheck(
        OPS.adapter_backward.default,
        (grad, corpus, ids, *w, fw, None, mod, "adapter_reduce", "cpu", False, needs),
    )


# ----------------------------------------------------------------------------- compile
def _ops_pipeline(corpus, ids, w, fw, lw, lb, queries, modulation):
    """The three fused ops a search runs, chained as IMRNN does."""
    transform = K.adapter_reduce(corpus, ids, w, fw, modulation)
    scores = K.modulated_score(corpus, ids, transform, lw, lb, queries, modulation)
    top_scores, top_ids = K.modulated_topk(corpus, transform, lw, lb, queries, 4, modulation)
    return scores, top_scores, top_ids


def _pipeline_inputs(modulation: str) -> tuple:
    x = scoring_inputs(B, N, M, modulation)
    w = _hypernet(M, modulation)
    if modulation == "affine":  # keep W near the identity: a well-conditioned LayerNorm
        w = w._replace(b3=w.b3 + torch.cat([torch.eye(M).flatten(), torch.zeros(M)]))
    fw = torch.softmax(torch.randn(B, KK), dim=1)
    return x.corpus, _ids(), w, fw, x.ln_weight, x.ln_bias, x.queries, modulation


@pytest.mark.parametrize("modulation", MODULATIONS)
def test_compile_fullgraph_matches_eager(modulation):
    args = _pipeline_inputs(modulation)
    torch._dynamo.reset()
    with K.use_backend("cpu"):
        want = _ops_pipeline(*args)
        # fullgraph=True raises at the first graph break. Inductor (the default backend):
        # only the operators are in this graph, so there is no C++ to build.
        got = torch.compile(_ops_pipeline, fullgraph=True)(*args)
        explained = torch._dynamo.explain(_ops_pipeline)(*args)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)  # the same implementation ran: identical
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    ops = {str(n.target) for g in explained.graphs for n in g.graph.nodes}
    assert {"imrnns.adapter_reduce.default", "imrnns.modulated_score.default"} <= ops
    assert "imrnns.modulated_topk.default" in ops


def test_compiled_calls_still_check_values():
    # Traced, the value checks are skipped (the tensors are fake); the operators run them
    # when the compiled code executes, with the eager messages.
    corpus, ids, w, fw, lw, lb, queries, modulation = _pipeline_inputs("diagonal")
    compiled = torch.compile(_ops_pipeline, fullgraph=True, backend="aot_eager")
    with K.use_backend("cpu"):
        compiled(corpus, ids, w, fw, lw, lb, queries, modulation)
        bad_ids = ids.clone()
        bad_ids[1, 3] = N
        with pytest.raises(ValueError, match=r"ids holds ids in \[\d+, 13\].*13 rows"):
            compiled(corpus, bad_ids, w, fw, lw, lb, queries, modulation)
        with pytest.raises(ValueError, match="queries contains 1 NaN/Inf"):
            bad = queries.clone()
            bad[1, 2] = float("nan")
            compiled(corpus, ids, w, fw, lw, lb, bad, modulation)
        with pytest.raises(ValueError, match="feedback_weights must be non-negative"):
            compiled(corpus, ids, w, -fw, lw, lb, queries, modulation)
        # Static checks fail at trace time, with the eager message.
        with pytest.raises(Exception, match="queries dim 5 does not match corpus dim 6"):
            compiled(corpus, ids, w, fw, lw, lb, queries[:, :5], modulation)


def test_use_backend_inside_compiled_code_is_never_silently_ignored(monkeypatch):
    # The operators choose when they run; a use_backend block traced into the graph would
    # not reach them, and the compiled call ran the automatic choice instead.
    x = scoring_inputs(B, N, M, "diagonal")
    ids = _ids()

    def forced(*args):
        with K.use_backend("reference"):
            return K.modulated_score(*args)

    ran = []
    real = dispatch.implementation

    def spy(*args, **kwargs):
        choice = real(*args, **kwargs)
        ran.append(choice.backend)
        return choice

    monkeypatch.setattr(dispatch, "implementation", spy)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch._dynamo.reset()
    with pytest.raises(Exception, match="would not reach the operators"):
        torch.compile(forced, fullgraph=True, backend="aot_eager")(x.corpus, ids, *x[1:])
    # Without fullgraph the block splits the graph and runs eagerly: the choice holds.
    ran.clear()
    torch.compile(forced, backend="aot_eager")(x.corpus, ids, *x[1:])
    assert ran == ["reference"]


def test_eager_public_ops_check_once_and_keep_their_errors(monkeypatch):
    # Eager calls validate in the public function and tell the operator not to again: one
    # NaN scan and one id-range read per call, as before the operators.
    x = scoring_inputs(B, N, M, "diagonal")
    ids = _ids()
    scans = []
    real = _validation.check_all_finite
    monkeypatch.setattr(_validation, "check_all_finite", lambda **t: scans.append(1) or real(**t))
    with K.use_backend("cpu"):
        K.modulated_score(x.corpus, ids, *x[1:])
    assert len(scans) == 1
    with pytest.raises(ValueError, match=r"ids holds ids in \[-1, "):
        K.modulated_score(x.corpus, ids - 1, *x[1:])


def test_topk_outputs_never_require_grad():
    x = scoring_inputs(B, N, M, "diagonal")
    leaves = [v.clone().requires_grad_() for v in x[1:]]
    with K.use_backend("cpu"):
        scores, ids = K.modulated_topk(x.corpus, *leaves, 3)
    assert not scores.requires_grad and not ids.requires_grad


def test_backward_runs_the_implementation_the_forward_ran():
    # The forward's implementation is found again when the graph is set up, in the same
    # context: leaving the use_backend block before backward() changes nothing.
    args = _score_args("affine", requires_grad=True)
    grads = {}
    for backend in ("cpu", "reference"):
        with K.use_backend(backend):
            out = K.modulated_score(*args)
        out.pow(2).sum().backward()
        grads[backend] = [t.grad.clone() for t in (args[0], *args[2:6])]
        for t in (args[0], *args[2:6]):
            t.grad = None
    for a, b in zip(grads["cpu"], grads["reference"], strict=True):
        assert_close(a, b, torch.float32)


# ----------------------------------------------------------------------------- CUDA graphs
def test_cuda_graph_facts():
    # modulated_topk syncs with the host on every backend: inductor's CUDA graphs must
    # leave it out, which the tag tells them.
    assert torch.Tag.cudagraph_unsafe in OPS.modulated_topk.default.tags
    for op in ("modulated_score", "adapter_reduce", "document_transforms", "corpus_transform"):
        assert torch.Tag.cudagraph_unsafe not in getattr(OPS, op).default.tags


def test_value_checks_are_skipped_while_a_cuda_stream_is_captured(monkeypatch):
    class Captured:
        is_cuda = True

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert not _validation.values_readable(Captured())  # type: ignore[arg-type]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert _validation.values_readable(Captured())  # type: ignore[arg-type]


def test_dispatch_finds_the_analytic_backwards():
    with K.use_backend("cpu"):
        choice = dispatch.implementation("modulated_score", torch.device("cpu"), True)
    assert hasattr(choice.function, "backward")
    assert not hasattr(dispatch.backend_function("modulated_score", "reference"), "backward")
    with pytest.raises(ValueError, match="no cpu implementation"):
        dispatch.backend_function("project", "cpu")
