"""Per-document adapter generation with an on-the-fly (weighted) mean: chunked PyTorch, no
triton import.

The maths, for query b with feedback ids ``ids[b, :]`` and normalised weights
``w^[b,k] = w[b,k] / sum_k w[b,k]`` (``1/K`` when no weights are given)::

    x    = corpus[ids[b,k]]                       (m,)     upcast to the compute dtype
    h1   = relu(W1 x + b1)                        (h1,)
    h2   = relu(W2 h1 + b2)                       (h2,)
    o    = W3 h2 + b3                             (OUT,)
    y    = act(o)      diagonal: [sigmoid(o[:m]), tanh(o[m:])];  affine: o
    T[b] = sum_k w^[b,k] y[b,k]                   (OUT,)

The naive statement (:mod:`imrnns_kernels.adapter.reference`) materialises (B, K, OUT): 26 MB
per query for ``affine`` at m=256. Here:

- ``affine``: the output layer is linear, so ``T[b] = W3 (sum_k w^[b,k] h2[b,k]) + b3``
  exactly: the rows only ever produce 64-d hidden states, and the output is one
  (B, h2) @ (h2, OUT) GEMM. At m=256, B=32, K=100 that is 0.27 GFLOP instead of 27.
- ``diagonal``: the activations are not linear, so every row needs its OUT outputs; rows are
  processed in chunks of whole queries (``chunk_rows`` rows) through buffers reused by every
  chunk, ``tanh`` is folded into one in-place ``sigmoid_`` (:func:`folded_output_layer`), and
  each chunk is reduced by one batched (q, 1, K) @ (q, K, OUT) matmul: about a third of the
  reference's time and a tenth of its peak memory, and GEMM-bound (benchmarks/RESULTS.md,
  "Fused ops").
- With a per-document cache (:func:`document_transforms`, computed once per index since it
  depends only on the document) the op is a weighted gather-mean: ``embedding_bag``.

Backward (:func:`adapter_reduce_backward`, shared with the Triton path through
:func:`backward_from_ctx`) recomputes the rows
chunk by chunk from the saved inputs, so training never holds (B, K, OUT) either. Gradients
flow to the six HyperNet tensors, the corpus rows (scatter-added) and the feedback weights.
Compute and output dtype: float64 when the HyperNet weights are float64 (float64 models,
gradcheck), else float32 (fp16/bf16 corpus rows are upcast on load), as the reference.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from imrnns_kernels._runtime import compute_dtype, needs_grad
from imrnns_kernels.types import HyperNetWeights

# Rows of the (B, K) id table per chunk: a few thousand rows keep the (rows, 2m) fp32 block
# within L2/L3; much smaller chunks pay per-call overhead, a whole batch spills to DRAM
# (benchmarks/RESULTS.md).
DEFAULT_CHUNK_ROWS = 4096
# Rows per chunk of the (recomputing) backward on GPU: (rows, 2m) fp32 temporaries, 128 MiB
# at m=256.
GPU_CHUNK_ROWS = 65536


def cast_weights(weights: HyperNetWeights, dtype: torch.dtype) -> HyperNetWeights:
    return HyperNetWeights(*(t.to(dtype) for t in weights))


def normalised_weights(
    feedback_weights: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor | None:
    """(B, K) ``w / sum_k w`` in ``dtype``, or None for the uniform mean."""
    if feedback_weights is None:
        return None
    w = feedback_weights.to(dtype)
    return w / w.sum(dim=1, keepdim=True)


def query_chunks(b: int, k: int, chunk_rows: int) -> Iterator[tuple[int, int, int, int]]:
    """``(q0, q1, k0, k1)`` blocks of the (B, K) table with about ``chunk_rows`` rows each.

    Whole queries when K fits in a chunk (so a chunk reduces with one batched matmul), else
    one query at a time split along K (so a single huge feedback set stays bounded too).
    """
    if k <= chunk_rows:
        step = max(1, chunk_rows // k)
        for q0 in range(0, b, step):
            yield q0, min(b, q0 + step), 0, k
    else:
        for q in range(b):
            for k0 in range(0, k, chunk_rows):
                yield q, q + 1, k0, min(k, k0 + chunk_rows)


def hidden_(x: torch.Tensor, w: HyperNetWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, m) -> (h1 (rows, h1), h2 (rows, h2)), ReLU applied in place."""
    h1 = torch.addmm(w.b1, x, w.w1.t()).relu_()
    h2 = torch.addmm(w.b2, h1, w.w2.t()).relu_()
    return h1, h2


def folded_output_layer(w: HyperNetWeights, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W3', b3')``: the diagonal output layer with its bias half (rows m:) doubled.

    ``tanh(x) = 2 sigmoid(2x) - 1``, so with the doubled rows one contiguous ``sigmoid_``
    over all 2m columns gives ``[s, (t + 1) / 2]``; the ``2u - 1`` is applied after the
    reduction (exact because the normalised weights sum to 1). ``sigmoid_`` is about 3x
    cheaper per value than ``tanh_`` (benchmarks/RESULTS.md), and it is one call instead of
    two strided ones. The absolute error of ``2u - 1`` is about 1e-7.
    """
    scale = torch.ones(w.w3.shape[0], 1, dtype=w.w3.dtype, device=w.w3.device)
    scale[m:] = 2.0
    return w.w3 * scale, w.b3 * scale[:, 0]


def sigmoid_rows(h2: torch.Tensor, w3f: torch.Tensor, b3f: torch.Tensor) -> torch.Tensor:
    """(rows, 2m) ``[sigmoid(o[:m]), sigmoid(2 o[m:])]`` from folded weights, in place."""
    return torch.addmm(b3f, h2, w3f.t()).sigmoid_()


def unfold_(u: torch.Tensor, m: int) -> torch.Tensor:
    """``u[:, m:] = 2 u[:, m:] - 1`` in place: sigmoid(2x) -> tanh(x), also after a mean."""
    u[:, m:].mul_(2.0).sub_(1.0)
    return u


def gather(corpus: torch.Tensor, idx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``corpus[idx]`` in ``dtype``. ``index_select``, several times faster than advanced
    indexing ``corpus[idx]`` (benchmarks/RESULTS.md)."""
    return torch.index_select(corpus, 0, idx).to(dtype)


def _reduce_into(
    dst: torch.Tensor, rows: torch.Tensor, wn: torch.Tensor | None, nq: int, nk: int, k: int
) -> None:
    """``dst (nq, D) += sum_k w^ rows`` for rows laid out (nq * nk, D), query-major."""
    r = rows.view(nq, nk, -1)
    if wn is None:
        # Uniform: a plain sum, scaled by 1/K (1/K of the *whole* set: chunks may split K).
        dst.add_(r.sum(dim=1), alpha=1.0 / k)
    else:
        dst.unsqueeze(1).baddbmm_(wn.unsqueeze(1), r)


class _Workspace:
    """Per-call buffers for one chunk's rows, reused by every chunk.

    Reusing them instead of allocating per chunk keeps the peak at one chunk's worth and
    avoids the allocator churn (fresh pages, glibc heap growth) that otherwise about doubles
    the peak RSS (benchmarks/RESULTS.md).
    """

    def __init__(self, rows: int, m: int, w: HyperNetWeights, out_width: int | None) -> None:
        opts = {"dtype": w.w1.dtype, "device": w.w1.device}
        self.x = torch.empty(rows, m, **opts)
        self.h1 = torch.empty(rows, w.w1.shape[0], **opts)
        self.h2 = torch.empty(rows, w.w2.shape[0], **opts)
        self.o = None if out_width is None else torch.empty(rows, out_width, **opts)

    def hidden(self, corpus: torch.Tensor, idx: torch.Tensor, w: HyperNetWeights) -> torch.Tensor:
        """(rows, h2) hidden states of ``corpus[idx]``, written into the buffers."""
        r = idx.numel()
        x = self.x[:r]
        if corpus.dtype == x.dtype:
            torch.index_select(corpus, 0, idx, out=x)
        else:
            x.copy_(torch.index_select(corpus, 0, idx))  # fp16/bf16 rows: upcast
        h1 = torch.addmm(w.b1, x, w.w1.t(), out=self.h1[:r]).relu_()
        return torch.addmm(w.b2, h1, w.w2.t(), out=self.h2[:r]).relu_()


@torch.no_grad()
def adapter_reduce_forward(
    corpus: torch.Tensor,
    ids: torch.Tensor,
    w: HyperNetWeights,
    wn: torch.Tensor | None,
    modulation: str,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked forward. ``w`` already in the compute dtype, ``wn`` normalised or None.

    Returns:
        (out (B, OUT) in the compute dtype, hbar (B, h2) for affine else None).
    """
    b, k = ids.shape
    dtype = w.w1.dtype
    m = corpus.shape[1]
    h2_dim, out_dim = w.w3.shape[1], w.w3.shape[0]
    ids = ids.long()
    width = h2_dim if modulation == "affine" else out_dim
    acc = torch.zeros(b, width, dtype=dtype, device=corpus.device)
    chunks = list(query_chunks(b, k, chunk_rows))
    max_rows = max(((q1 - q0) * (k1 - k0) for q0, q1, k0, k1 in chunks), default=0)
    ws = _Workspace(max_rows, m, w, out_dim if modulation == "diagonal" else None)
    if modulation == "diagonal":
        w3f, b3f = folded_output_layer(w, m)
    for q0, q1, k0, k1 in chunks:
        h2 = ws.hidden(corpus, ids[q0:q1, k0:k1].reshape(-1), w)
        if modulation == "affine":
            rows = h2
        else:
            rows = torch.addmm(b3f, h2, w3f.t(), out=ws.o[: h2.shape[0]]).sigmoid_()
        wc = None if wn is None else wn[q0:q1, k0:k1]
        _reduce_into(acc[q0:q1], rows, wc, q1 - q0, k1 - k0, k)
    if modulation == "affine":
        # Exact: sum_k w^ (W3 h + b3) = W3 (sum_k w^ h) + b3 because sum_k w^ = 1.
        return torch.addmm(w.b3, acc, w.w3.t()), acc
    return unfold_(acc, m), None


def _w3t_grad(g: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """(B, h2) ``W3^T G[b]`` in float64. It reduces over OUT = m*m + m: in fp32 that loses
    about 1e-5 relative at m=256, so accumulate in float64, in OUT chunks."""
    out = torch.zeros(g.shape[0], w3.shape[1], dtype=torch.float64, device=g.device)
    for o0 in range(0, g.shape[1], 8192):
        out += g[:, o0 : o0 + 8192].double() @ w3[o0 : o0 + 8192].double()
    return out


def adapter_reduce_backward(
    grad_out: torch.Tensor,
    corpus: torch.Tensor,
    ids: torch.Tensor,
    w: HyperNetWeights,
    feedback_weights: torch.Tensor | None,
    hbar: torch.Tensor | None,
    modulation: str,
    chunk_rows: int,
    need_corpus: bool,
    need_fw: bool,
    hidden_output: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, list[torch.Tensor]]:
    """Gradients of :func:`adapter_reduce_forward`, recomputing rows chunk by chunk.

    ``T[b] = sum_k w^[b,k] y[b,k]`` with ``w^ = w / S_b``, so for the upstream grad G (B, OUT)::

        dL/dy[b,k]  = w^[b,k] G[b]
        dL/dw[b,k]  = (G[b] . y[b,k] - sum_j w^[b,j] G[b] . y[b,j]) / S_b
        affine:     dW3 = G^T hbar, db3 = sum_b G[b], dL/dh2[b,k] = w^[b,k] (W3^T G[b])
        diagonal:   do = dL/dy * act'(o) with sigmoid' = s (1 - s), tanh' = 1 - t^2

    and the usual chain through the two ReLU layers; ``dL/dcorpus`` is scatter-added by id.

    Args:
        grad_out: (B, OUT) upstream gradient.
        w: HyperNet weights in the compute dtype.
        feedback_weights: the raw (B, K) weights, or None (uniform).
        hbar: (B, h2) mean hidden state of the forward, for affine; None: accumulated here
            from the recomputed rows (the custom operator's backward saves no forward state).
        hidden_output: the output is the weighted mean of the hidden states h2 themselves
            (``document_transforms`` for affine, with K = 1): no output layer, so G is
            dL/dh2 and the W3, b3 gradients are zero.

    Returns:
        (grad_corpus (N, m) in the compute dtype or None, grad_feedback_weights (B, K) or
        None, [dW1, db1, dW2, db2, dW3, db3] in the compute dtype).
    """
    dtype = w.w1.dtype
    b, k = ids.shape
    m = corpus.shape[1]
    ids = ids.long()
    g = grad_out.to(dtype)
    wn = normalised_weights(feedback_weights, dtype)
    # Weight gradients sum over all B*K rows (25,600 at B=256, K=100): chunk partials are
    # accumulated in float64, so the error stays that of one chunk's fp32 GEMM.
    dw = [torch.zeros_like(t, dtype=torch.float64) for t in w]
    grad_corpus = (
        torch.zeros(corpus.shape, dtype=dtype, device=corpus.device) if need_corpus else None
    )
    # dL/dw is a difference of two dot products over OUT that nearly cancel: the per-row
    # G . y are computed in float64 and G . T is formed from those same values (not from the
    # forward's output), so the difference carries no fp32 reduction error (about 1e-5
    # relative at m=256 in fp32 otherwise).
    gy_all = None
    if need_fw and feedback_weights is not None:
        gy_all = torch.empty(b, k, dtype=torch.float64, device=corpus.device)
    hbar_acc = None
    if hidden_output:
        # T[b] = sum_k w^ h2[b,k]: G is dL/dh2-bar directly, and G . y = G . h2.
        gw3_64 = g.double()
        gb3_64 = torch.zeros(b, dtype=torch.float64, device=g.device)
        gw3 = g
    elif modulation == "affine":
        if hbar is not None:
            dw[4] = g.t() @ hbar.to(dtype)
        else:
            hbar_acc = torch.zeros(b, w.w3.shape[1], dtype=dtype, device=g.device)
        dw[5] = g.sum(dim=0)
        gw3_64 = _w3t_grad(g, w.w3)
        gb3_64 = g.double() @ w.b3.double()
        gw3 = gw3_64.to(dtype)
    else:
        w3f, b3f = folded_output_layer(w, m)
        # G . y = [G_s, 2 G_b] . u - sum(G_b) with u the folded sigmoids; and
        # dy/do = [s (1 - s), 4 u (1 - u)] on the two halves (tanh' = 1 - t^2 = 4 u (1 - u)).
        g_dot = g.clone()
        g_dot[:, m:] *= 2.0
        g_dot_off = g[:, m:].sum(dim=1)  # (B,)
        g_der = g.clone()
        g_der[:, m:] *= 4.0
    for q0, q1, k0, k1 in query_chunks(b, k, chunk_rows):
        nq, nk = q1 - q0, k1 - k0
        idx = ids[q0:q1, k0:k1].reshape(-1)
        x = gather(corpus, idx, dtype)
        h1, h2 = hidden_(x, w)
        wc = (
            torch.full((nq, nk), 1.0 / k, dtype=dtype, device=x.device)
            if wn is None
            else wn[q0:q1, k0:k1]
        )
        if hbar_acc is not None:
            _reduce_into(hbar_acc[q0:q1], h2, None if wn is None else wc, nq, nk, k)
        if modulation == "affine" or hidden_output:
            gq = gw3[q0:q1]  # (nq, h2)
            dh2 = (wc.unsqueeze(2) * gq.unsqueeze(1)).reshape(nq * nk, -1)
            if gy_all is not None:
                gy = torch.bmm(h2.double().view(nq, nk, -1), gw3_64[q0:q1].unsqueeze(2))
                gy_all[q0:q1, k0:k1] = gy.squeeze(2) + gb3_64[q0:q1, None]
        else:
            u = sigmoid_rows(h2, w3f, b3f)  # (rows, OUT) folded sigmoids
            if gy_all is not None:
                gy = torch.bmm(u.double().view(nq, nk, -1), g_dot[q0:q1, :, None].double())
                gy_all[q0:q1, k0:k1] = gy.squeeze(2) - g_dot_off[q0:q1, None].double()
            u.mul_(1.0 - u)  # u (1 - u): the derivative up to the factor 4 folded in g_der
            do = u.view(nq, nk, -1).mul_(wc.unsqueeze(2)).mul_(g_der[q0:q1].unsqueeze(1))
            do = do.view(nq * nk, -1)
            dw[4].add_(do.t() @ h2)
            dw[5].add_(do.sum(dim=0))
            dh2 = do @ w.w3
        dz2 = dh2.mul_(h2 > 0)
        dw[2].add_(dz2.t() @ h1)
        dw[3].add_(dz2.sum(dim=0))
        dz1 = (dz2 @ w.w2).mul_(h1 > 0)
        dw[0].add_(dz1.t() @ x)
        dw[1].add_(dz1.sum(dim=0))
        if grad_corpus is not None:
            grad_corpus.index_add_(0, idx, dz1 @ w.w1)
    if hbar_acc is not None:
        dw[4] = g.t() @ hbar_acc
    grad_fw = None
    if gy_all is not None:
        w64 = feedback_weights.double()  # type: ignore[union-attr]
        s = w64.sum(dim=1, keepdim=True)
        gt = (w64 / s * gy_all).sum(dim=1, keepdim=True)  # G . T
        grad_fw = ((gy_all - gt) / s).to(dtype)
    return grad_corpus, grad_fw, [d.to(dtype) for d in dw]


class CpuAdapterReduceFunction(torch.autograd.Function):
    """Autograd wrapper of the chunked forward/backward.

    Inputs: corpus (N, m), ids (B, K), feedback_weights (B, K) or None, modulation, chunk_rows,
    then the six HyperNet tensors. Output: (B, OUT) in the compute dtype (float64 for a
    float64 HyperNet, so gradcheck sees full precision; float32 otherwise). Only the inputs,
    and the (B, h2) mean hidden state (affine) are saved; rows are recomputed in backward.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        corpus: torch.Tensor,
        ids: torch.Tensor,
        feedback_weights: torch.Tensor | None,
        modulation: str,
        chunk_rows: int,
        *params: torch.Tensor,
    ) -> torch.Tensor:
        dtype = compute_dtype(params[0].dtype)
        w = cast_weights(HyperNetWeights(*params), dtype)
        wn = normalised_weights(feedback_weights, dtype)
        out, hbar = adapter_reduce_forward(corpus, ids, w, wn, modulation, chunk_rows)
        ctx.save_for_backward(corpus, ids, feedback_weights, hbar, *params)
        ctx.modulation, ctx.chunk_rows = modulation, chunk_rows
        return out

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        corpus, ids, fw, hbar, *params = ctx.saved_tensors
        return backward_from_ctx(ctx, grad_out, corpus, ids, fw, hbar, params)


def backward_from_ctx(
    ctx: torch.autograd.function.FunctionCtx,
    grad_out: torch.Tensor,
    corpus: torch.Tensor,
    ids: torch.Tensor,
    fw: torch.Tensor | None,
    hbar: torch.Tensor | None,
    params: list[torch.Tensor],
) -> tuple[torch.Tensor | None, ...]:
    """Shared ``backward`` body of the CPU and Triton autograd Functions (same input order)."""
    needs = ctx.needs_input_grad  # type: ignore[attr-defined]
    dtype = compute_dtype(params[0].dtype)
    w = cast_weights(HyperNetWeights(*params), dtype)
    grad_corpus, grad_fw, dw = adapter_reduce_backward(
        grad_out,
        corpus,
        ids,
        w,
        fw,
        hbar,
        ctx.modulation,  # type: ignore[attr-defined]
        ctx.chunk_rows,  # type: ignore[attr-defined]
        need_corpus=needs[0],
        need_fw=needs[2],
    )
    if grad_corpus is not None:
        grad_corpus = grad_corpus.to(corpus.dtype)
    if grad_fw is not None:
        grad_fw = grad_fw.to(fw.dtype)  # type: ignore[union-attr]
    grads = [
        d.to(p.dtype) if need else None for d, p, need in zip(dw, params, needs[5:], strict=True)
    ]
    return (grad_corpus, None, grad_fw, None, None, *grads)


def cached_reduce(
    cache: torch.Tensor,
    ids: torch.Tensor,
    weights: HyperNetWeights,
    feedback_weights: torch.Tensor | None,
    modulation: str,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> torch.Tensor:
    """Weighted gather-mean of cached per-document rows (autograd-native, any device).

    ``diagonal``: ``T[b] = sum_k w^ cache[ids[b,k]]`` with cache (N, OUT) = act(A_d(corpus)).
    ``affine``: ``T[b] = W3 (sum_k w^ cache[ids[b,k]]) + b3`` with cache (N, h2) hidden states.
    ``embedding_bag`` gathers and reduces in one pass without a (B, K, D) intermediate.
    """
    dtype = compute_dtype(weights.w1.dtype)
    wn = normalised_weights(feedback_weights, dtype)
    if cache.dtype == dtype:
        # One embedding_bag: gather and reduce in one pass, parallel over bags on torch's
        # intra-op threads (splitting it over run_workers blocks was slower: RESULTS).
        if wn is None:
            red = F.embedding_bag(ids, cache, mode="mean")
        else:
            red = F.embedding_bag(ids, cache, per_sample_weights=wn, mode="sum")
    else:
        # Low-precision cache: upcast per chunk so the sum accumulates in the compute dtype.
        b, k = ids.shape
        parts = []
        for q0, q1, k0, k1 in query_chunks(b, k, chunk_rows):
            rows = cache[ids[q0:q1, k0:k1].long()].to(dtype)  # (nq, nk, D)
            wc = (
                torch.full((q1 - q0, k1 - k0), 1.0 / k, dtype=dtype, device=rows.device)
                if wn is None
                else wn[q0:q1, k0:k1]
            )
            parts.append((q0, q1, torch.bmm(wc.unsqueeze(1), rows).squeeze(1)))
        red = torch.zeros(b, cache.shape[1], dtype=dtype, device=cache.device)
        for q0, q1, part in parts:
            red = red.index_add(0, torch.arange(q0, q1, device=red.device), part)
    if modulation == "affine":
        w = cast_weights(weights, dtype)
        return F.linear(red, w.w3, w.b3)
    return red


def cached_reduce_backward(
    grad_out: torch.Tensor,
    cache: torch.Tensor,
    ids: torch.Tensor,
    weights: HyperNetWeights,
    feedback_weights: torch.Tensor | None,
    modulation: str,
    chunk_rows: int,
    need_cache: bool,
    need_fw: bool,
    need_out_layer: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of :func:`cached_reduce`, chunk by chunk (no (B, K, D) intermediate).

    With ``c[b,k] = cache[ids[b,k]]``, ``red[b] = sum_k w^[b,k] c[b,k]`` and the output
    ``T = red`` (diagonal) or ``T = W3 red + b3`` (affine), for the upstream grad G (B, OUT)::

        R[b]          = G[b] (diagonal),   W3^T G[b] (affine; dW3 = G^T red, db3 = sum_b G[b])
        dL/dcache[i]  = sum over (b, k) with ids[b,k] = i of w^[b,k] R[b]
        dL/dw[b,k]    = (R[b] . c[b,k] - sum_j w^[b,j] R[b] . c[b,j]) / S_b

    (for affine the ``G . b3`` term of ``G . y`` cancels in that difference). The HyperNet's
    first two layers take no part, so they get no gradient.

    Returns:
        (d cache, d feedback_weights, d W3, d b3), each in its input's dtype or None when not
        asked for (and d W3, d b3 always None for diagonal).
    """
    dtype = compute_dtype(weights.w1.dtype)
    b, k = ids.shape
    ids = ids.long()
    g = grad_out.to(dtype)
    wn = normalised_weights(feedback_weights, dtype)
    affine = modulation == "affine"
    r64 = _w3t_grad(g, weights.w3) if affine else g.double()
    r = r64.to(dtype)
    d_cache = torch.zeros(cache.shape, dtype=dtype, device=cache.device) if need_cache else None
    red = None
    if affine and need_out_layer:
        red = torch.zeros(b, cache.shape[1], dtype=dtype, device=cache.device)
    gy_all = None
    if need_fw and feedback_weights is not None:
        gy_all = torch.empty(b, k, dtype=torch.float64, device=cache.device)
    for q0, q1, k0, k1 in query_chunks(b, k, chunk_rows):
        nq, nk = q1 - q0, k1 - k0
        idx = ids[q0:q1, k0:k1].reshape(-1)
        wc = (
            torch.full((nq, nk), 1.0 / k, dtype=dtype, device=cache.device)
            if wn is None
            else wn[q0:q1, k0:k1]
        )
        if red is not None or gy_all is not None:
            rows = gather(cache, idx, dtype)
            if red is not None:
                _reduce_into(red[q0:q1], rows, None if wn is None else wc, nq, nk, k)
            if gy_all is not None:
                gy = torch.bmm(rows.double().view(nq, nk, -1), r64[q0:q1].unsqueeze(2))
                gy_all[q0:q1, k0:k1] = gy.squeeze(2)
        if d_cache is not None:
            d_cache.index_add_(0, idx, (wc.unsqueeze(2) * r[q0:q1].unsqueeze(1)).flatten(0, 1))
    d_fw = None
    if gy_all is not None:
        w64 = feedback_weights.double()  # type: ignore[union-attr]
        s = w64.sum(dim=1, keepdim=True)
        gt = (w64 / s * gy_all).sum(dim=1, keepdim=True)
        d_fw = ((gy_all - gt) / s).to(feedback_weights.dtype)  # type: ignore[union-attr]
    d_w3 = d_b3 = None
    if red is not None:
        d_w3 = (g.t() @ red).to(weights.w3.dtype)
        d_b3 = g.sum(dim=0).to(weights.b3.dtype)
    return (None if d_cache is None else d_cache.to(cache.dtype)), d_fw, d_w3, d_b3


def adapter_backward(
    grad: torch.Tensor,
    corpus: torch.Tensor,
    ids: torch.Tensor,
    weights: HyperNetWeights,
    feedback_weights: torch.Tensor | None,
    cache: torch.Tensor | None,
    modulation: str,
    needs: tuple[bool, ...],
    hidden_output: bool = False,
) -> tuple[torch.Tensor | None, ...]:
    """The analytic backward of every op of this family, in plain PyTorch (any device): the
    ``backward`` the builtin CPU and Triton implementations carry for the custom operators.

    ``adapter_reduce`` as is; ``document_transforms`` is ``adapter_reduce`` with ids
    ``arange(N)`` as (N, 1) (``hidden_output`` for affine, whose output is h2);
    ``corpus_transform`` is ``adapter_reduce`` with ids ``arange(N)`` as (1, N). Rows are
    recomputed in chunks of :data:`DEFAULT_CHUNK_ROWS` (CPU tensors) or
    :data:`GPU_CHUNK_ROWS`.

    Args:
        grad: (B, OUT) upstream gradient ((B, h2) with ``hidden_output``).
        needs: which gradients to compute, for (corpus, feedback_weights, cache, w1, b1, w2,
            b2, w3, b3).

    Returns:
        The nine gradients in that order, each in its input's dtype, None where not needed
        (and for the corpus when a cache is given: the output does not depend on it then).
    """
    chunk = DEFAULT_CHUNK_ROWS if corpus.device.type == "cpu" else GPU_CHUNK_ROWS
    if cache is not None:
        d_cache, d_fw, d_w3, d_b3 = cached_reduce_backward(
            grad, cache, ids, weights, feedback_weights, modulation, chunk,
            need_cache=needs[2], need_fw=needs[1], need_out_layer=needs[7] or needs[8],
        )  # fmt: skip
        return (
            None,
            d_fw if needs[1] else None,
            d_cache,
            None, None, None, None,
            d_w3 if needs[7] else None,
            d_b3 if needs[8] else None,
        )  # fmt: skip
    dtype = compute_dtype(weights.w1.dtype)
    grad_corpus, grad_fw, dw = adapter_reduce_backward(
        grad, corpus, ids, cast_weights(weights, dtype), feedback_weights, None, modulation,
        chunk, need_corpus=needs[0], need_fw=needs[1], hidden_output=hidden_output,
    )  # fmt: skip
    return (
        None if grad_corpus is None else grad_corpus.to(corpus.dtype),
        None if grad_fw is None else grad_fw.to(feedback_weights.dtype),  # type: ignore[union-attr]
        None,
        *(
            d.to(p.dtype) if need else None
            for d, p, need in zip(dw, weights, needs[3:], strict=True)
        ),
    )


def adapter_reduce(
    corpus: torch.Tensor,
    ids: torch.Tensor,
    weights: HyperNetWeights,
    feedback_weights: torch.Tensor | None = None,
    modulation: str = "diagonal",
    cache: torch.Tensor | None = None,
    *,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> torch.Tensor:
    """(B, OUT) weighted mean of ``act(A_d(corpus[ids]))``; see the module docstring.

    Same signature and results as :func:`imrnns_kernels.adapter.reference.adapter_reduce`,
    without materialising (B, K, OUT). Differentiable (HyperNet weights, corpus, feedback weights).
    """
    if cache is not None:
        return cached_reduce(cache, ids, weights, feedback_weights, modulation, chunk_rows)
    if needs_grad(corpus, feedback_weights, *weights):
        return CpuAdapterReduceFunction.apply(
            corpus, ids, feedback_weights, modulation, chunk_rows, *weights
        )
    dtype = compute_dtype(weights.w1.dtype)
    w = cast_weights(weights, dtype)
    out, _ = adapter_reduce_forward(
        corpus, ids, w, normalised_weights(feedback_weights, dtype), modulation, chunk_rows
    )
    return out


adapter_reduce.supports_autograd = True  # type: ignore[attr-defined]
adapter_reduce.backward = adapter_backward  # type: ignore[attr-defined]


def document_transforms(
    corpus: torch.Tensor,
    weights: HyperNetWeights,
    modulation: str = "diagonal",
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Per-document cache: (N, OUT) ``act(A_d(d))`` for diagonal, (N, h2) hidden for affine.

    Chunked over rows (``chunk_rows``, default :data:`DEFAULT_CHUNK_ROWS`) into one
    preallocated output. Differentiable when the weights or the corpus require grad (then
    through plain autograd, which keeps each chunk's intermediates).
    """
    chunk = chunk_rows or DEFAULT_CHUNK_ROWS
    dtype = compute_dtype(weights.w1.dtype)
    w = cast_weights(weights, dtype)
    n, m = corpus.shape
    if needs_grad(corpus, *weights):
        parts = []
        for r0 in range(0, n, chunk):
            x = corpus[r0 : r0 + chunk].to(dtype)
            h = F.relu(F.linear(F.relu(F.linear(x, w.w1, w.b1)), w.w2, w.b2))
            if modulation == "diagonal":
                o = F.linear(h, w.w3, w.b3)
                h = torch.cat([torch.sigmoid(o[:, :m]), torch.tanh(o[:, m:])], dim=1)
            parts.append(h)
        return torch.cat(parts)
    width = w.w3.shape[1] if modulation == "affine" else w.w3.shape[0]
    out = torch.empty(n, width, dtype=dtype, device=corpus.device)
    w3f_b3f = folded_output_layer(w, m)
    with torch.no_grad():
        for r0 in range(0, n, chunk):
            r1 = min(n, r0 + chunk)
            _, h2 = hidden_(corpus[r0:r1].to(dtype), w)
            if modulation == "affine":
                out[r0:r1] = h2
            else:
                o = torch.addmm(w3f_b3f[1], h2, w3f_b3f[0].t(), out=out[r0:r1])
                unfold_(o.sigmoid_(), m)
    return out


document_transforms.supports_autograd = True  # type: ignore[attr-defined]
document_transforms.backward = adapter_backward  # type: ignore[attr-defined]


def corpus_transform_via(
    reduce_fn: Callable[..., torch.Tensor],
    corpus: torch.Tensor,
    weights: HyperNetWeights,
    modulation: str,
    chunk_rows: int,
    group: int,
) -> torch.Tensor:
    """``mean_d act(A_d(d))`` over the corpus, through a fused ``adapter_reduce``.

    Each chunk of ``chunk_rows`` rows is cut into pseudo-queries of ``group`` consecutive
    rows (the last padded with weight 0), reduced by ``reduce_fn`` (same signature as
    ``adapter_reduce``), and the per-group means are combined by their row counts. Nothing
    of size (N, OUT) is ever held; differentiable whenever ``reduce_fn`` is.
    """
    n = corpus.shape[0]
    total = None
    for r0 in range(0, n, chunk_rows):
        r1 = min(n, r0 + chunk_rows)
        rows = r1 - r0
        g = min(group, rows)
        nb = -(-rows // g)
        ids = torch.arange(r0, r0 + nb * g, device=corpus.device)
        valid = ids < r1
        ids = torch.where(valid, ids, torch.full_like(ids, r0)).view(nb, g)
        fw = valid.view(nb, g).to(torch.float32)
        part = reduce_fn(corpus, ids, weights, fw, modulation)  # (nb, OUT) group means
        part = (fw.sum(dim=1, keepdim=True) * part).sum(dim=0)
        total = part if total is None else total + part
    assert total is not None  # internal: dispatch rejects an empty corpus
    return total / n


def corpus_transform(
    corpus: torch.Tensor,
    weights: HyperNetWeights,
    modulation: str = "diagonal",
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """(OUT,) mean of ``act(A_d(d))`` over every corpus row (whole-corpus feedback).

    Chunked: memory is bounded by ``chunk_rows`` rows of intermediates; for ``affine`` only
    hidden states are summed and the output layer runs once.
    """
    chunk = chunk_rows or DEFAULT_CHUNK_ROWS
    return corpus_transform_via(adapter_reduce, corpus, weights, modulation, chunk, chunk)


corpus_transform.supports_autograd = True  # type: ignore[attr-defined]
corpus_transform.backward = adapter_backward  # type: ignore[attr-defined]
