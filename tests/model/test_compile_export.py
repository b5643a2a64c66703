"""IMRNN.score under torch.compile and torch.export (docs/compile.md).

The fused ops are custom operators, so the whole score path (projection, HyperNets,
LayerNorms, the feedback reduction, the scoring) is one graph: ``fullgraph=True`` compiles,
``torch.export`` captures it, and both give the eager scores. Inductor builds C++ for the
plain ops of the model; its first build on a machine costs most of this module's time, so it
runs once (scalar code: the ISA probe builds are skipped), and the other checks use
``aot_eager``, which traces the same graph (Dynamo, the operators' fake implementations and
registered autograd, AOTAutograd) without generating code.
"""

from __future__ import annotations

import pytest
import torch
import torch._inductor.config as inductor_config

import imrnns_kernels as K
from imrnns import IMRNN, IMRNNConfig
from tests.helpers import assert_close, randomised

B, KK, N_IN, M = 3, 5, 24, 12
# The import of torch.export's internals warns about torch.jit: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")


class ScoreModule(torch.nn.Module):
    """``IMRNN.score`` as a module's forward, what ``torch.export`` captures."""

    def __init__(self, model: IMRNN) -> None:
        super().__init__()
        self.model = model

    def forward(self, queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        return self.model.score(queries, candidates)


def _model(modulation: str = "diagonal", aggregation: str = "mean_of_transforms") -> IMRNN:
    config = IMRNNConfig(input_dim=N_IN, dim=M, modulation=modulation, aggregation=aggregation)
    return randomised(config)


def _inputs(b: int = B) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(b, N_IN), torch.randn(b, KK, N_IN)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    with K.use_backend("cpu"):
        yield
    torch._dynamo.reset()


def test_score_compiles_with_inductor_in_one_graph():
    model = _model()
    q, c = _inputs()
    want = model.score(q, c)
    explained = torch._dynamo.explain(model.score)(q, c)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    with inductor_config.patch({"cpp.vec_isa_ok": False}):
        got = torch.compile(model.score, fullgraph=True)(q, c)
    # Inductor fuses the plain ops (projection, LayerNorms): fp32 rounding, not identity.
    assert_close(got, want, torch.float32)


@pytest.mark.parametrize(
    ("modulation", "aggregation", "weighted"),
    [("affine", "mean_of_transforms", True), ("diagonal", "transform_of_mean", True)],
)
def test_score_variants_trace_in_one_graph(modulation, aggregation, weighted):
    model = _model(modulation, aggregation)
    q, c = _inputs()
    w = torch.softmax(torch.randn(B, KK), dim=1) if weighted else None
    got = torch.compile(model.score, fullgraph=True, backend="aot_eager")(q, c, w)
    assert torch.equal(got, model.score(q, c, w))


def test_score_exports_and_runs():
    model = _model()
    q, c = _inputs()
    batch = torch.export.Dim("batch", min=1, max=1024)
    exported = torch.export.export(
        ScoreModule(model), (q, c), dynamic_shapes=({0: batch}, {0: batch})
    )
    # score runs under no_grad: export nests its body in a submodule of the graph.
    targets = {
        str(n.target)
        for module in exported.graph_module.modules()
        if isinstance(module, torch.fx.GraphModule)
        for n in module.graph.nodes
        if n.op == "call_function"
    }
    assert {"imrnns.adapter_reduce.default", "imrnns.modulated_score.default"} <= targets
    for b in (B, 7):  # the batch is dynamic: one program serves every size
        q, c = _inputs(b)
        assert_close(exported.module()(q, c), model.score(q, c), torch.float32)


def test_backward_through_the_compiled_score_matches_eager():
    model = _model("affine")
    q, c = _inputs()
    w = torch.softmax(torch.randn(B, KK), dim=1)

    def loss(queries, candidates, weights):
        return model(queries, candidates, weights).scores.pow(2).sum()

    def grads(fn) -> dict[str, torch.Tensor]:
        model.zero_grad()
        fn(q, c, w).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want = grads(loss)
    got = grads(torch.compile(loss, fullgraph=True, backend="aot_eager"))
    assert got.keys() == want.keys() and "projector.weight" in got
    for name in want:
        scale = want[name].abs().max().clamp_min(1.0)
        assert_close(got[name] / scale, want[name] / scale, torch.float32)


def test_compiled_score_still_rejects_nan():
    # Traced, the model's own NaN scan of its inputs is skipped; the operators' checks run
    # when the compiled code executes, so NaN embeddings still raise (naming the operator's
    # argument they reached) instead of giving NaN scores.
    model = _model()
    q, c = _inputs()
    compiled = torch.compile(model.score, fullgraph=True, backend="aot_eager")
    compiled(q, c)
    c[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="candidates contains 1 NaN/Inf"):
        model.score(q, c)
    with pytest.raises(ValueError, match="NaN/Inf"):
        compiled(q, c)
