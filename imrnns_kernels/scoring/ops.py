"""The scoring family as PyTorch custom operators: ``torch.ops.imrnns.modulated_score``,
``torch.ops.imrnns.modulated_topk`` and the backward ``torch.ops.imrnns.modulated_score_backward``.

Why operators: ``torch.compile`` and ``torch.export`` see each call as one node of known output
shape (the fake implementations below), instead of tracing into Python that picks a backend,
starts worker threads, launches Triton kernels and syncs with the host; so a compiled model
has no graph break at them and an exported one contains them. What runs inside is what the
public functions always ran: :mod:`imrnns_kernels.dispatch` picks the implementation when the
operator executes on real tensors, so eager results are unchanged.

Each operator takes ``validate``: True (the default, and what a traced call records) runs
every input check of the public function when the operator executes, the value checks
(NaN/Inf, id range) included; the public functions check in eager mode themselves and pass
False. See docs/compile.md for which checks run where, and for CUDA graphs.

Gradients (``modulated_score``): the builtin CPU and Triton implementations carry an analytic
backward (``fn.backward``), run by the backward operator; any other implementation (the
reference, a registered function) is recomputed under autograd in the backward pass, so its
gradients are exactly autograd's. ``modulated_topk`` is not differentiable (search is
inference): its outputs never require grad.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from imrnns_kernels import _validation as checks
from imrnns_kernels import dispatch

_Tensor = torch.Tensor

__all__ = [
    "check_score_args",
    "check_topk_args",
    "modulated_score_backward_op",
    "modulated_score_op",
    "modulated_topk_op",
    "needs_input_grad",
    "recompute_grads",
]


# ----------------------------------------------------------------------------- validation
def check_score_args(
    corpus: torch.Tensor,
    ids: torch.Tensor,
    transform: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    queries: torch.Tensor,
    modulation: str,
) -> None:
    """Every check of :func:`imrnns_kernels.modulated_score` (value checks only when
    :func:`imrnns_kernels._validation.values_readable`)."""
    _check_scoring(corpus, transform, ln_weight, ln_bias, queries, modulation)
    checks.check_ids("ids", ids, corpus.shape[0])
    if ids.shape[0] != queries.shape[0]:
        raise ValueError(
            f"ids has {ids.shape[0]} rows but there are {queries.shape[0]} queries "
            f"(ids {checks.describe(ids)}, queries {checks.describe(queries)})"
        )
    checks.check_same_device(corpus=corpus, ids=ids)


def check_topk_args(
    corpus: torch.Tensor,
    transform: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    modulation: str,
    workspace_bytes: int | None,
) -> None:
    """Every check of :func:`imrnns_kernels.modulated_topk`."""
    _check_scoring(corpus, transform, ln_weight, ln_bias, queries, modulation)
    checks.check_k(k)
    if corpus.shape[0] == 0:
        raise ValueError(f"corpus is empty ({checks.describe(corpus)})")
    checks.check_workspace_bytes(workspace_bytes)


def _check_scoring(
    corpus: torch.Tensor,
    transform: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    queries: torch.Tensor,
    modulation: str,
) -> None:
    checks.check_modulation(modulation)
    checks.check_float("corpus", corpus, 2)
    checks.check_float("queries", queries, 2)
    m = corpus.shape[1]
    if queries.shape[1] != m:
        raise ValueError(
            f"queries dim {queries.shape[1]} does not match corpus dim {m} "
            f"(queries {checks.describe(queries)}, corpus {checks.describe(corpus)})"
        )
    checks.check_transform("transform", transform, queries.shape[0], m, modulation)
    checks.check_layernorm(ln_weight, ln_bias, m)
    checks.check_same_device(
        corpus=corpus, transform=transform, queries=queries, ln_weight=ln_weight, ln_bias=ln_bias
    )
    # The corpus is checked for NaN/Inf once when it enters an index, not on every search:
    # a scan of a multi-GB corpus per query would cost as much as the search itself.
    checks.check_all_finite(
        queries=queries, transform=transform, ln_weight=ln_weight, ln_bias=ln_bias
    )


# ----------------------------------------------------------------------------- modulated_score
@torch.library.custom_op("imrnns::modulated_score", mutates_args=())
def modulated_score_op(
    corpus: torch.Tensor,
    ids: torch.Tensor,
    transform: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    queries: torch.Tensor,
    modulation: str,
    eps: float,
    validate: bool = True,
) -> torch.Tensor:
    """(B, K) float32 scores: :func:`imrnns_kernels.modulated_score` as an operator."""
    if validate:
        check_score_args(corpus, ids, transform, ln_weight, ln_bias, queries, modulation)
    fn = dispatch.implementation("modulated_score", corpus.device).function
    with torch.no_grad():
        out = fn(corpus, ids, transform, ln_weight, ln_bias, queries, modulation, eps)
    # The CPU path's scores are a view of its (B, 6, K) moment table: compiled code expects
    # the contiguous layout the fake gives (and the copy frees the table).
    return out.contiguous()


@modulated_score_op.register_fake
def _modulated_score_fake(
    corpus: torch.Tensor,
    ids: torch.Tensor,
    transform: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    queries: torch.Tensor,
    modulation: str,
    eps: float,
    validate: bool = True,
) -> torch.Tensor:
    return corpus.new_empty(ids.shape, dtype=torch.float32)


@torch.library.custom_op("imrnns::modulated_score_backward", mutates_args=())
def modulated_score_backward_op(
    grad: torch.Tensor,
    corpus: torch.Tensor,
    ids: torch.Tensor,
    transform: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    queries: torch.Tensor,
    modulation: str,
    eps: float,
    backend: str,
    need_corpus: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``sum(grad * modulated_score(...))`` by the analytic backward of the
    ``backend`` implementation: (d corpus, d transform, d ln_weight, d ln_bias, d queries),
    each in its input's dtype; d corpus is an empty (0,) tensor unless ``need_corpus``."""
    backward = dispatch.backend_function("modulated_score", backend).backward
    grads = backward(
        grad, corpus, ids, transform, ln_weight, ln_bias, queries, modulation, eps, need_corpus
    )
    d_corpus, d_t, d_g, d_beta, d_q = (
        corpus.new_empty(0) if g is None else g.contiguous()  # the layout the fake promises
        for g in grads
    )
    return d_corpus, d_t, d_g, d_beta, d_q


@modulated_score_backward_op.register_fake
def _modulated_score_backward_fake(
    grad: torch.Tensor,
    corpus: torch.Tensor,
    ids: torch.Tensor,
    transform: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    queries: torch.Tensor,
    modulation: str,
    eps: float,
    backend: str,
    need_corpus: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # Contiguous whatever the inputs' layouts (new_empty, not empty_like), as the real ones.
    return (
        corpus.new_empty(corpus.shape if need_corpus else (0,)),
        transform.new_empty(transform.shape),
        ln_weight.new_empty(ln_weight.shape),
        ln_bias.new_empty(ln_bias.shape),
        queries.new_empty(queries.shape),
    )


def _setup_score(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    corpus, ids, transform, ln_weight, ln_bias, queries, modulation, eps, _ = inputs
    ctx.save_for_backward(corpus, ids, transform, ln_weight, ln_bias, queries)
    ctx.modulation, ctx.eps = modulation, eps
    # The implementation the forward ran (the same call of dispatch, in the same context);
    # under tracing it is chosen here, when the graph is traced.
    choice = dispatch.implementation("modulated_score", corpus.device, needs_grad=True)
    ctx.backend = choice.backend
    ctx.recompute = None if hasattr(choice.function, "backward") else choice.function


def needs_input_grad(ctx: Any, num_inputs: int) -> tuple[bool, ...]:
    """``ctx.needs_input_grad`` for all ``num_inputs`` inputs of an operator: the dispatcher
    drops trailing arguments equal to their defaults (a traced call's ``validate=True``), and
    with them their flags."""
    needs = tuple(ctx.needs_input_grad)
    return needs + (False,) * (num_inputs - len(needs))


def _score_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    corpus, ids, transform, ln_weight, ln_bias, queries = ctx.saved_tensors
    needs = needs_input_grad(ctx, 9)
    tensors = (corpus, transform, ln_weight, ln_bias, queries)
    wants = (needs[0], needs[2], needs[3], needs[4], needs[5])
    if ctx.recompute is not None:

        def run(c: _Tensor, t: _Tensor, w: _Tensor, b: _Tensor, q: _Tensor) -> _Tensor:
            return ctx.recompute(c, ids, t, w, b, q, ctx.modulation, ctx.eps)

        grads = recompute_grads(run, tensors, wants, grad)
    else:
        grads = modulated_score_backward_op(
            grad, *ctx.saved_tensors, ctx.modulation, ctx.eps, ctx.backend, needs[0]
        )
    d_corpus, d_t, d_g, d_beta, d_q = (
        g if want else None for g, want in zip(grads, wants, strict=True)
    )
    return d_corpus, None, d_t, d_g, d_beta, d_q, None, None, None


modulated_score_op.register_autograd(_score_backward, setup_context=_setup_score)


def recompute_grads(
    fn: Callable[..., torch.Tensor],
    tensors: Sequence[torch.Tensor | None],
    wants: Sequence[bool],
    grad: torch.Tensor,
) -> list[torch.Tensor | None]:
    """Gradients of ``sum(grad * fn(*tensors))`` with respect to the ``tensors`` flagged in
    ``wants``, by running ``fn`` again under autograd (an implementation without an analytic
    backward: the reference, or a registered function). None for the others, and for inputs
    the output does not depend on."""
    with torch.enable_grad():
        leaves = [
            None if t is None else t.detach().requires_grad_(bool(want))
            for t, want in zip(tensors, wants, strict=True)
        ]
        out = fn(*leaves)
        wrt = [t for t in leaves if t is not None and t.requires_grad]
        got = iter(torch.autograd.grad(out, wrt, grad, allow_unused=True) if wrt else ())
    return [next(got) if t is not None and t.requires_grad else None for t in leaves]


# ----------------------------------------------------------------------------- modulated_topk
# Tagged cudagraph_unsafe: every implementation syncs with the host while it runs (the
# streaming top-k's survivor counts; the Triton path's ill-conditioning flag), which a CUDA
# graph capture forbids; inductor's CUDA graphs then leave this node out (docs/compile.md).
@torch.library.custom_op(
    "imrnns::modulated_topk", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,)
)
def modulated_topk_op(
    corpus: torch.Tensor,
    transform: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    modulation: str,
    eps: float,
    workspace_bytes: int | None = None,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """((B, k) float32 scores, (B, k) int64 ids): :func:`imrnns_kernels.modulated_topk` as
    an operator."""
    if validate:
        check_topk_args(
            corpus, transform, ln_weight, ln_bias, queries, k, modulation, workspace_bytes
        )
    fn = dispatch.implementation("modulated_topk", corpus.device, needs_grad=False).function
    args = (corpus, transform, ln_weight, ln_bias, queries, k, modulation, eps)
    with torch.no_grad():
        if workspace_bytes is None:  # implementations registered without the argument work
            scores, ids = fn(*args)
        else:
            scores, ids = fn(*args, workspace_bytes=workspace_bytes)
    return scores.contiguous(), ids.contiguous()  # the layout the fake promises


@modulated_topk_op.register_fake
def _modulated_topk_fake(
    corpus: torch.Tensor,
    transform: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    modulation: str,
    eps: float,
    workspace_bytes: int | None = None,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    b = queries.shape[0]
    return (
        corpus.new_empty((b, k), dtype=torch.float32),
        corpus.new_empty((b, k), dtype=torch.int64),
    )


def _setup_topk(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    ctx.mark_non_differentiable(*output)


def _topk_backward(ctx: Any, *grads: torch.Tensor) -> tuple[None, ...]:
    return (None,) * 10


# Registered so that inputs requiring grad give outputs that do not (as the eager function
# always did, under no_grad), rather than outputs whose backward raises.
modulated_topk_op.register_autograd(_topk_backward, setup_context=_setup_topk)
