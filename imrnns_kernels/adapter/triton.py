"""Fused per-document adapter generation with on-the-fly reduction: Triton kernels ->
launchers -> autograd Function.

For B queries with K feedback ids each into the projected corpus (N, m), normalised weights
``w^[b,k] = w[b,k] / sum_k w[b,k]`` (``1/K`` when none are given) and the document HyperNet
``m -> h1 -> h2 -> OUT`` (official 128, 64)::

    h2[b,k] = relu(W2 relu(W1 corpus[ids[b,k]] + b1) + b2)           (h2,)
    T[b]    = sum_k w^[b,k] act(W3 h2[b,k] + b3)                      (OUT,)

with ``act = [sigmoid, tanh]`` on the two halves for ``diagonal`` (OUT = 2m) and the
identity for ``affine`` (OUT = m*m + m). Nothing of size (B, K, OUT) is ever written:

1. ``_hidden_kernel``: gathers BLOCK_R rows by id (fp16/bf16 upcast on load), runs layers
   1-2 with W1^T / W2^T tiles on chip (m x 128 and 128 x 64 are small) and either stores the
   (B*K, h2) hidden states (diagonal: 64 floats a row, 1/8 of 2m at m=256) or, for
   ``affine``, one program per query accumulates the weighted mean ``hbar[b]`` (B, h2).
2. ``diagonal``: ``_diag_reduce_kernel``, one program per (query, BLOCK_O columns), loads
   its W3 tile once, streams the query's K hidden rows, applies the output layer, the
   activation and the weighted sum in registers, and writes (B, OUT).
   ``tanh(x) = 2 sigmoid(2x) - 1``: the bias half of W3/b3 is doubled on load, one sigmoid
   covers all columns, and ``2u - 1`` is applied once after the sum (exact: sum w^ = 1).
3. ``affine``: the output layer is linear, so ``T = W3 hbar + b3`` exactly: one small
   (B, h2) @ (h2, OUT) GEMM, ``_linear_act_kernel``. 100x fewer FLOPs than per row at K=100.

With a per-document cache (:func:`document_transforms`: (N, OUT) activated outputs for
diagonal, (N, h2) hidden states for affine) the op is a weighted gather-mean
(``_gather_mean_kernel``), followed for affine by the same output GEMM.

Backward: :class:`AdapterReduceFunction` saves only the inputs, the output and ``hbar``, and
recomputes rows in chunks with the shared device-agnostic torch backward of
:mod:`imrnns_kernels.adapter.cpu` (cuBLAS GEMMs on GPU): gradients to the HyperNet
weights, the corpus rows and the feedback weights. Calls the kernels cannot serve (a float64
HyperNet, an empty batch, training through a cache) run that module's torch code on the same
device.

All dots accumulate in fp32 with ``input_precision="ieee"``: TF32 would cost about 1e-3
relative error, outside the fp32 tolerance of the reference comparison.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from imrnns_kernels._runtime import compute_dtype, interpreting, needs_grad, pow2
from imrnns_kernels.adapter import cpu as cpu_impl
from imrnns_kernels.types import HyperNetWeights

# Every dot of these kernels: the reduction tolerance needs fp32 products (see above).
_DOT_PRECISION = "ieee"
# Rows per chunk of the (recomputing) backward on GPU (defined beside that backward).
GPU_CHUNK_ROWS = cpu_impl.GPU_CHUNK_ROWS
# Rows per chunk of whole-corpus feedback, cut into pseudo-queries of _CORPUS_GROUP rows.
CORPUS_CHUNK_ROWS = 1 << 20
_CORPUS_GROUP = 256


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _rows_hidden(
    x_ptr,
    ids_ptr,
    rows,
    mask_r,
    w1_ptr,
    b1,
    w2t,
    b2,
    M,
    stride_x,
    stride_w1,
    offs_h1,
    mask_h1,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_H1: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """(BLOCK_R, BLOCK_H2) ``relu(W2 relu(W1 x + b1) + b2)`` for the rows ``ids[rows]``."""
    doc = tl.load(ids_ptr + rows, mask=mask_r, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_R, BLOCK_H1), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        x = tl.load(
            x_ptr + doc[:, None] * stride_x + offs_m[None, :],
            mask=mask_r[:, None] & mask_m[None, :],
            other=0.0,
        ).to(tl.float32)
        # W1^T tile: element (i, j) = W1[j, m0 + i].
        w1t = tl.load(
            w1_ptr + offs_h1[None, :] * stride_w1 + offs_m[:, None],
            mask=mask_m[:, None] & mask_h1[None, :],
            other=0.0,
        ).to(tl.float32)
        acc = tl.dot(x, w1t, acc, input_precision=DOT_PRECISION)
    h1 = tl.maximum(acc + b1[None, :], 0.0)
    h2 = tl.dot(h1, w2t, input_precision=DOT_PRECISION)
    return tl.maximum(h2 + b2[None, :], 0.0)


@triton.jit
def _hidden_kernel(
    # pointers
    x_ptr,
    ids_ptr,
    wn_ptr,
    w1_ptr,
    b1_ptr,
    w2_ptr,
    b2_ptr,
    h_ptr,
    # sizes
    R,
    K,
    M,
    H1,
    H2,
    inv_k,
    # strides
    stride_x,
    stride_w1,
    stride_w2,
    stride_h,
    # meta-parameters
    HAS_WEIGHTS: tl.constexpr,
    REDUCE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_H1: tl.constexpr,
    BLOCK_H2: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Layers 1-2 over gathered rows.

    REDUCE=False: program i stores h2 for flattened rows [i*BLOCK_R, (i+1)*BLOCK_R) of the
    (R,) id list into h (R, H2). REDUCE=True: program b loops over query b's K rows and
    stores ``hbar[b] = sum_k w^[b,k] h2[b,k]`` into h (B, H2).
    """
    pid = tl.program_id(0).to(tl.int64)
    offs_h1 = tl.arange(0, BLOCK_H1)
    offs_h2 = tl.arange(0, BLOCK_H2)
    mask_h1 = offs_h1 < H1
    mask_h2 = offs_h2 < H2
    b1 = tl.load(b1_ptr + offs_h1, mask=mask_h1, other=0.0).to(tl.float32)
    b2 = tl.load(b2_ptr + offs_h2, mask=mask_h2, other=0.0).to(tl.float32)
    # W2^T tile (BLOCK_H1, BLOCK_H2): element (i, j) = W2[j, i]; held for the whole program.
    w2t = tl.load(
        w2_ptr + offs_h2[None, :] * stride_w2 + offs_h1[:, None],
        mask=mask_h1[:, None] & mask_h2[None, :],
        other=0.0,
    ).to(tl.float32)
    if REDUCE:
        acc = tl.zeros((BLOCK_H2,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_R):
            offs_k = k0 + tl.arange(0, BLOCK_R)
            mask_r = offs_k < K
            rows = pid * K + offs_k
            h2 = _rows_hidden(
                x_ptr, ids_ptr, rows, mask_r, w1_ptr, b1, w2t, b2, M, stride_x, stride_w1,
                offs_h1, mask_h1, BLOCK_R, BLOCK_M, BLOCK_H1, DOT_PRECISION,
            )  # fmt: skip
            if HAS_WEIGHTS:
                wr = tl.load(wn_ptr + rows, mask=mask_r, other=0.0)
            else:
                wr = tl.where(mask_r, inv_k, 0.0)
            acc += tl.sum(h2 * wr[:, None], axis=0)
        tl.store(h_ptr + pid * stride_h + offs_h2, acc, mask=mask_h2)
    else:
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        mask_r = rows < R
        h2 = _rows_hidden(
            x_ptr, ids_ptr, rows, mask_r, w1_ptr, b1, w2t, b2, M, stride_x, stride_w1,
            offs_h1, mask_h1, BLOCK_R, BLOCK_M, BLOCK_H1, DOT_PRECISION,
        )  # fmt: skip
        tl.store(
            h_ptr + rows[:, None] * stride_h + offs_h2[None, :],
            h2,
            mask=mask_r[:, None] & mask_h2[None, :],
        )


@triton.jit
def _diag_reduce_kernel(
    # pointers
    h_ptr,
    wn_ptr,
    w3_ptr,
    b3_ptr,
    out_ptr,
    # sizes
    K,
    M,
    OUT,
    H2,
    inv_k,
    # strides
    stride_h,
    stride_w3,
    stride_out,
    # meta-parameters
    HAS_WEIGHTS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_H2: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """``out[b, cols] = sum_k w^[b,k] act(W3[cols] h2[b,k] + b3[cols])``, grid (B, OUT/BLOCK_O)."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_o = tl.program_id(1)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    mask_o = offs_o < OUT
    offs_h2 = tl.arange(0, BLOCK_H2)
    mask_h2 = offs_h2 < H2
    # Bias half doubled: sigmoid(2x) there, turned into tanh(x) = 2u - 1 after the sum.
    scale = tl.where(offs_o < M, 1.0, 2.0)
    w3t = (
        tl.load(
            w3_ptr + offs_o[None, :] * stride_w3 + offs_h2[:, None],
            mask=mask_h2[:, None] & mask_o[None, :],
            other=0.0,
        ).to(tl.float32)
        * scale[None, :]
    )
    b3 = tl.load(b3_ptr + offs_o, mask=mask_o, other=0.0).to(tl.float32) * scale
    acc = tl.zeros((BLOCK_O,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        rows = pid_b * K + offs_k
        h = tl.load(
            h_ptr + rows[:, None] * stride_h + offs_h2[None, :],
            mask=mask_k[:, None] & mask_h2[None, :],
            other=0.0,
        )
        u = tl.sigmoid(tl.dot(h, w3t, input_precision=DOT_PRECISION) + b3[None, :])
        if HAS_WEIGHTS:
            wr = tl.load(wn_ptr + rows, mask=mask_k, other=0.0)
        else:
            wr = tl.where(mask_k, inv_k, 0.0)
        acc += tl.sum(u * wr[:, None], axis=0)
    acc = tl.where(offs_o < M, acc, 2.0 * acc - 1.0)
    tl.store(out_ptr + pid_b * stride_out + offs_o, acc, mask=mask_o)


@triton.jit
def _linear_act_kernel(
    # pointers
    h_ptr,
    w3_ptr,
    b3_ptr,
    out_ptr,
    # sizes
    R,
    M,
    OUT,
    H2,
    # strides
    stride_h,
    stride_w3,
    stride_out,
    # meta-parameters
    DIAGONAL: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_H2: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """``out (R, OUT) = act(h (R, H2) @ W3^T + b3)``; act = identity, or diagonal's."""
    pid_r = tl.program_id(0).to(tl.int64)
    pid_o = tl.program_id(1)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    mask_o = offs_o < OUT
    offs_h2 = tl.arange(0, BLOCK_H2)
    mask_h2 = offs_h2 < H2
    h = tl.load(
        h_ptr + offs_r[:, None] * stride_h + offs_h2[None, :],
        mask=mask_r[:, None] & mask_h2[None, :],
        other=0.0,
    ).to(tl.float32)
    w3t = tl.load(
        w3_ptr + offs_o[None, :].to(tl.int64) * stride_w3 + offs_h2[:, None],
        mask=mask_h2[:, None] & mask_o[None, :],
        other=0.0,
    ).to(tl.float32)
    b3 = tl.load(b3_ptr + offs_o, mask=mask_o, other=0.0).to(tl.float32)
    o = tl.dot(h, w3t, input_precision=DOT_PRECISION) + b3[None, :]
    if DIAGONAL:
        o = tl.where(offs_o[None, :] < M, tl.sigmoid(o), 2.0 * tl.sigmoid(2.0 * o) - 1.0)
    tl.store(
        out_ptr + offs_r[:, None] * stride_out + offs_o[None, :],
        o.to(out_ptr.dtype.element_ty),
        mask=mask_r[:, None] & mask_o[None, :],
    )


@triton.jit
def _gather_mean_kernel(
    # pointers
    c_ptr,
    ids_ptr,
    wn_ptr,
    out_ptr,
    # sizes
    K,
    D,
    inv_k,
    # strides
    stride_c,
    stride_out,
    # meta-parameters
    HAS_WEIGHTS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``out[b, cols] = sum_k w^[b,k] cache[ids[b,k], cols]``, grid (B, D/BLOCK_D)."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        rows = pid_b * K + offs_k
        doc = tl.load(ids_ptr + rows, mask=mask_k, other=0).to(tl.int64)
        vals = tl.load(
            c_ptr + doc[:, None] * stride_c + offs_d[None, :],
            mask=mask_k[:, None] & mask_d[None, :],
            other=0.0,
        ).to(tl.float32)
        if HAS_WEIGHTS:
            wr = tl.load(wn_ptr + rows, mask=mask_k, other=0.0)
        else:
            wr = tl.where(mask_k, inv_k, 0.0)
        acc += tl.sum(vals * wr[:, None], axis=0)
    tl.store(out_ptr + pid_b * stride_out + offs_d, acc, mask=mask_d)


# ----------------------------------------------------------------------------- launchers
def _f32(weights: HyperNetWeights) -> HyperNetWeights:
    return HyperNetWeights(*(t.detach().to(torch.float32).contiguous() for t in weights))


def _wn(feedback_weights: torch.Tensor | None) -> torch.Tensor | None:
    if feedback_weights is None:
        return None
    w = feedback_weights.detach().to(torch.float32)
    return (w / w.sum(dim=1, keepdim=True)).contiguous()


def _hidden(
    corpus: torch.Tensor,
    ids: torch.Tensor,
    w: HyperNetWeights,
    wn: torch.Tensor | None,
    reduce: bool,
) -> torch.Tensor:
    """(B*K, h2) hidden states of every gathered row, or (B, h2) weighted means (reduce)."""
    b, k = ids.shape
    m = corpus.shape[1]
    h1, h2 = w.w1.shape[0], w.w2.shape[0]
    ids_flat = ids.reshape(-1).contiguous()
    corpus = corpus if corpus.stride(1) == 1 else corpus.contiguous()
    if interpreting():
        # The interpreter's cost grows with the number of programs: one big block.
        block_r, block_m = pow2(k if reduce else b * k, hi=128), pow2(m, hi=256)
        num_warps = 4
    else:
        # (32, 128) fp32 accumulator plus the (128, 64) W2^T tile held for the whole program,
        # 8 warps: the largest row block that compiles without register spills for sm_90
        # (benchmarks/RESULTS.md, "GPU: NVIDIA H200").
        block_r, block_m, num_warps = 32, 64, 8
    out = torch.empty(b if reduce else b * k, h2, dtype=torch.float32, device=corpus.device)
    grid = (b,) if reduce else (triton.cdiv(b * k, block_r),)
    _hidden_kernel[grid](
        corpus, ids_flat, wn, w.w1, w.b1, w.w2, w.b2, out,
        b * k, k, m, h1, h2, 1.0 / k,
        corpus.stride(0), w.w1.stride(0), w.w2.stride(0), out.stride(0),
        HAS_WEIGHTS=wn is not None, REDUCE=reduce,
        BLOCK_R=block_r, BLOCK_M=block_m, BLOCK_H1=pow2(h1), BLOCK_H2=pow2(h2),
        DOT_PRECISION=_DOT_PRECISION, num_warps=num_warps,
    )  # fmt: skip
    return out


def _linear_act(
    h: torch.Tensor, w: HyperNetWeights, m: int, diagonal: bool, out: torch.Tensor | None = None
) -> torch.Tensor:
    """(R, OUT) ``act(h @ W3^T + b3)`` into ``out`` (fp32 unless given)."""
    r, h2 = h.shape
    n_out = w.w3.shape[0]
    if out is None:
        out = torch.empty(r, n_out, dtype=torch.float32, device=h.device)
    if interpreting():
        block_r, block_o = pow2(r, hi=128), pow2(n_out, hi=8192)
    else:
        # (32, 64) output tiles at 8 warps: no register spills for sm_90; larger tiles spill
        # with the diagonal activation (benchmarks/RESULTS.md).
        block_r, block_o = pow2(r, hi=32), 64
    grid = (triton.cdiv(r, block_r), triton.cdiv(n_out, block_o))
    _linear_act_kernel[grid](
        h, w.w3, w.b3, out,
        r, m, n_out, h2,
        h.stride(0), w.w3.stride(0), out.stride(0),
        DIAGONAL=diagonal, BLOCK_R=block_r, BLOCK_O=block_o, BLOCK_H2=pow2(h2),
        DOT_PRECISION=_DOT_PRECISION, num_warps=4 if interpreting() else 8,
    )  # fmt: skip
    return out


def _gather_mean(cache: torch.Tensor, ids: torch.Tensor, wn: torch.Tensor | None) -> torch.Tensor:
    """(B, D) weighted mean of cache rows: a gather-reduce, one read of each gathered row."""
    b, k = ids.shape
    d = cache.shape[1]
    cache = cache if cache.stride(1) == 1 else cache.contiguous()
    out = torch.empty(b, d, dtype=torch.float32, device=cache.device)
    if interpreting():
        block_k, block_d = pow2(k, lo=1, hi=128), pow2(d, lo=1, hi=2048)
    else:
        block_k, block_d = 16, 256
    grid = (b, triton.cdiv(d, block_d))
    _gather_mean_kernel[grid](
        cache, ids.reshape(-1).contiguous(), wn, out,
        k, d, 1.0 / k,
        cache.stride(0), out.stride(0),
        HAS_WEIGHTS=wn is not None, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip
    return out


def adapter_reduce_forward(
    corpus: torch.Tensor,
    ids: torch.Tensor,
    weights: HyperNetWeights,
    feedback_weights: torch.Tensor | None,
    modulation: str,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fused forward: ((B, OUT) float32, (B, h2) mean hidden state for affine else None)."""
    b, k = ids.shape
    m = corpus.shape[1]
    w = _f32(weights)
    wn = _wn(feedback_weights)
    corpus = corpus.detach()
    if modulation == "affine":
        hbar = _hidden(corpus, ids, w, wn, reduce=True)
        return _linear_act(hbar, w, m, diagonal=False), hbar
    h = _hidden(corpus, ids, w, None, reduce=False)  # (B*K, h2)
    n_out = w.w3.shape[0]
    h2 = h.shape[1]
    out = torch.empty(b, n_out, dtype=torch.float32, device=corpus.device)
    if interpreting():
        block_k, block_o = pow2(k, hi=128), pow2(n_out, hi=1024)
    else:
        # 8 warps: no register spills for sm_90 (4 warps spill; benchmarks/RESULTS.md).
        block_k, block_o = 32, 128
    grid = (b, triton.cdiv(n_out, block_o))
    _diag_reduce_kernel[grid](
        h, wn, w.w3, w.b3, out,
        k, m, n_out, h2, 1.0 / k,
        h.stride(0), w.w3.stride(0), out.stride(0),
        HAS_WEIGHTS=wn is not None, BLOCK_K=block_k, BLOCK_O=block_o, BLOCK_H2=pow2(h2),
        DOT_PRECISION=_DOT_PRECISION, num_warps=4 if interpreting() else 8,
    )  # fmt: skip
    return out, None


class AdapterReduceFunction(torch.autograd.Function):
    """``T = sum_k w^ act(A_d(corpus[ids]))`` with a fused Triton forward.

    Forward: :func:`adapter_reduce_forward` (see the module docstring); saves the inputs and,
    for affine, the (B, h2) mean hidden state: nothing of size (B, K, OUT) or (B, OUT).
    Backward: recomputes the rows in chunks of ``chunk_rows`` and returns gradients for the
    corpus (scatter-added by id), the feedback weights and the six HyperNet tensors
    (:func:`imrnns_kernels.adapter.cpu.adapter_reduce_backward`, on the same device).

    Shapes: corpus (N, m), ids (B, K), feedback_weights (B, K) or None -> (B, OUT) float32.
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
        out, hbar = adapter_reduce_forward(
            corpus, ids, HyperNetWeights(*params), feedback_weights, modulation
        )
        ctx.save_for_backward(corpus, ids, feedback_weights, hbar, *params)
        ctx.modulation, ctx.chunk_rows = modulation, chunk_rows
        return out

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        corpus, ids, fw, hbar, *params = ctx.saved_tensors
        return cpu_impl.backward_from_ctx(ctx, grad_out, corpus, ids, fw, hbar, params)


def adapter_reduce(
    corpus: torch.Tensor,
    ids: torch.Tensor,
    weights: HyperNetWeights,
    feedback_weights: torch.Tensor | None = None,
    modulation: str = "diagonal",
    cache: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, OUT) float32 weighted mean of ``act(A_d(corpus[ids]))`` (fused; see module doc).

    A float64 HyperNet goes to the torch implementation and gives float64, as the reference.

    Same signature and results as :func:`imrnns_kernels.adapter.reference.adapter_reduce`.
    ``cache``: (N, OUT) per-document activated outputs (diagonal) or (N, h2) hidden states
    (affine) from :func:`document_transforms`; the op is then a weighted gather-mean.
    """
    if compute_dtype(weights.w1.dtype) == torch.float64:
        # A float64 HyperNet (float64 models, gradcheck) keeps float64: the torch path.
        return cpu_impl.adapter_reduce(corpus, ids, weights, feedback_weights, modulation, cache)
    if ids.shape[0] == 0:  # no queries: nothing to launch (a zero-size grid is an error)
        if needs_grad(corpus, feedback_weights, cache, *weights):
            # Training on an empty batch: an empty result that is still part of the graph
            # (a bare zeros tensor broke loss.backward()); the torch path gives exactly that.
            return cpu_impl.adapter_reduce(
                corpus, ids, weights, feedback_weights, modulation, cache
            ).float()
        return torch.zeros(0, weights.out_dim, dtype=torch.float32, device=corpus.device)
    if cache is not None:
        if needs_grad(cache, feedback_weights, *weights):
            # Training through a cache: plain autograd (embedding_bag) on the same device.
            return cpu_impl.cached_reduce(cache, ids, weights, feedback_weights, modulation).float()
        red = _gather_mean(cache, ids, _wn(feedback_weights))
        if modulation == "affine":
            return _linear_act(red, _f32(weights), corpus.shape[1], diagonal=False)
        return red
    if needs_grad(corpus, feedback_weights, *weights):
        chunk = cpu_impl.DEFAULT_CHUNK_ROWS if corpus.device.type == "cpu" else GPU_CHUNK_ROWS
        out = AdapterReduceFunction.apply(
            corpus, ids, feedback_weights, modulation, chunk, *weights
        )
        return out.float()
    out, _ = adapter_reduce_forward(corpus, ids, weights, feedback_weights, modulation)
    return out


adapter_reduce.supports_autograd = True  # type: ignore[attr-defined]
adapter_reduce.backward = cpu_impl.adapter_backward  # type: ignore[attr-defined]


def document_transforms(
    corpus: torch.Tensor,
    weights: HyperNetWeights,
    modulation: str = "diagonal",
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Per-document cache: (N, OUT) ``act(A_d(d))`` (diagonal) or (N, h2) hidden (affine).

    ``_hidden_kernel`` over every row, then for diagonal ``_linear_act_kernel`` with the
    activation fused. The (N, h2) hidden temporary is 1/8 of the (N, 2m) output at m=256,
    so ``chunk_rows`` is not needed here (accepted for signature compatibility).
    """
    if needs_grad(corpus, *weights) or compute_dtype(weights.w1.dtype) == torch.float64:
        return cpu_impl.document_transforms(corpus, weights, modulation, chunk_rows)
    n, m = corpus.shape
    w = _f32(weights)
    ids = torch.arange(n, device=corpus.device).view(1, n)
    h = _hidden(corpus.detach(), ids, w, None, reduce=False)  # (N, h2)
    if modulation == "affine":
        return h
    return _linear_act(h, w, m, diagonal=True)


document_transforms.supports_autograd = True  # type: ignore[attr-defined]
document_transforms.backward = cpu_impl.adapter_backward  # type: ignore[attr-defined]


def corpus_transform(
    corpus: torch.Tensor,
    weights: HyperNetWeights,
    modulation: str = "diagonal",
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """(OUT,) float32 ``mean_d act(A_d(d))`` over the whole corpus, chunked.

    Each chunk is cut into pseudo-queries of 256 consecutive rows (enough programs to fill
    the GPU) and reduced by the fused :func:`adapter_reduce`; per-group means are combined by
    their row counts. Never holds (N, OUT).
    """
    if compute_dtype(weights.w1.dtype) == torch.float64:
        return cpu_impl.corpus_transform(corpus, weights, modulation, chunk_rows)
    chunk = chunk_rows or CORPUS_CHUNK_ROWS
    return cpu_impl.corpus_transform_via(
        adapter_reduce, corpus, weights, modulation, chunk, _CORPUS_GROUP
    )


corpus_transform.supports_autograd = True  # type: ignore[attr-defined]
corpus_transform.backward = cpu_impl.adapter_backward  # type: ignore[attr-defined]
