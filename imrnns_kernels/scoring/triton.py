"""Candidate scoring and exhaustive top-k in Triton: kernels -> launchers -> autograd Function.

``score[b, k] = <normalize(q_b), normalize(LN(T_b(corpus[ids[b, k]])))>`` for B queries and a
(B, K) table of candidate ids (:func:`modulated_score`), or for every corpus row with a
streaming top-k (:func:`modulated_topk`), with T_b ``d * s + b`` (``diagonal``) or ``W d + b``
(``affine``). The moment algebra the one-pass kernels use is
:mod:`imrnns_kernels.scoring.moments`.

Candidate scoring. Each candidate row is read once, everything else stays in registers, and
only the (B, K) float32 scores are written.

- :func:`_score_fwd_diag_kernel`: one program per (query, block of candidates); a candidate's
  whole row is in registers, so LayerNorm is the exact two-pass form (mean, then the centred
  variance) and matches the reference to fp32 rounding.
- :func:`_affine_scores_kernel`: ``y' = W' d + b'`` in (rows x BLOCK_J) tiles by ``tl.dot``
  over BLOCK_I slices of the row, folding each tile into the six moments (W', b' centred so
  that mean(y') = 0 exactly: no cancellation in E[y^2] - mean^2), then the shared cosine
  epilogue. ``GATHER`` picks rows through the id table (rerank) or a contiguous range
  (exhaustive search).
- :func:`_score_bwd_kernel`: one program per query, looping over its candidates; recomputes
  the forward and accumulates the query's gradients in registers (no atomics: deterministic).
  The per-candidate ``dL/dy`` rows go to a buffer when the affine ``dW = dy^T D`` (a batched
  GEMM, done by torch) or the corpus gradient needs them.

Exhaustive search. For B queries over an (N, m) corpus, returns ((B, k) float32 scores,
(B, k) int64 ids), best first, ties broken by the lower id, padded with ``-inf`` / ``-1`` when
k > N (faiss's convention). The corpus is scored in row chunks into a (B, chunk) buffer, each
chunk is reduced to its top-k and merged into a running (B, k) result
(:class:`imrnns_kernels.topk.StreamingTopK`), so no (B, N) score matrix or modulated corpus
is ever held.

- :func:`_diag_scores_kernel` (``diagonal``): a (BLOCK_N docs x BLOCK_B queries) tile of
  scores. Per BLOCK_I slice of the rows it loads the doc tile once, squares it, and runs
  8 ``tl.dot``s against the query atoms (6 dotted with d, 2 with d*d), then applies the O(1)
  cosine epilogue in registers. Each document tile is read once per block of BLOCK_B queries.
- :func:`_diag_rows_kernel` (``diagonal``, at most :data:`SMALL_BATCH` queries): the exact
  two-pass score of a row tile kept in registers, looping over the queries on the CUDA
  cores. With one query the dot kernel would pad its query tile to 16 and run 8 dots of it,
  compute well above the cost of reading the corpus; this one stays below it. It is also
  the exact fallback: the dot kernel drops and counts the pairs whose one-pass moments are
  ill-conditioned, and a call with any such pair is redone with it (one host sync a call).
- ``affine``: :func:`_affine_scores_kernel` with ``GATHER=False`` (contiguous rows). Affine
  scoring costs m^2 multiply-adds per (doc, query) whatever the order of operations:
  LayerNorm's variance is a dense quadratic form in d.

Inputs: the corpus may be fp32, fp16 or bf16 with any row stride (a last-dim stride other than
1 is copied with ``.contiguous()``); the small tensors are made contiguous. Everything is
computed in fp32 (fp32 operands upcast per tile, which the interpreter also needs: its bf16
``tl.dot`` is wrong; ``input_precision`` from :func:`imrnns_kernels._runtime.dot_precision`)
and the scores are float32. Runs on CUDA tensors, or on CPU tensors under
``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from imrnns_kernels._runtime import NORMALIZE_EPS, dot_precision, interpreting, needs_grad, pow2
from imrnns_kernels.scoring.moments import (
    ILL_CONDITIONED,
    NUM_CONSTS,
    AffinePrep,
    DiagonalAtoms,
    affine_prep,
    diagonal_atoms,
)
from imrnns_kernels.topk import TOPK_SLOT_BYTES, StreamingTopK

NORM_EPS: tl.constexpr = tl.constexpr(NORMALIZE_EPS)


def _check_device(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.device.type != "cuda" and not interpreting():
            raise ValueError(
                f"the Triton path needs CUDA tensors (or TRITON_INTERPRET=1), got a tensor on "
                f"{t.device}: call imrnns_kernels.<op>, which picks the CPU path there"
            )


def rows_view(corpus: torch.Tensor) -> torch.Tensor:
    """The corpus with a unit last-dim stride (any row stride is fine for the kernels)."""
    return corpus if corpus.stride(1) == 1 else corpus.contiguous()


# --------------------------------------------------------------------------- shared epilogue


@triton.jit
def _cos_epilogue(
    mu,
    p,
    gy,
    vy,
    e2,
    gy2,
    c_cb,
    c_qgb,
    c_qg,
    c_qbeta,
    c_g2b2,
    c_g2b,
    c_gbetab,
    c_gbeta,
    c_beta2,
    c_g2,
    eps,
):
    """Scores from the six moments; see :mod:`imrnns_kernels.scoring.moments` for the
    formulas and constants."""
    var = tl.maximum(e2 + c_cb - mu * mu, 0.0)
    r = tl.rsqrt(var + eps)
    num = r * (p + c_qgb - mu * c_qg) + c_qbeta
    q = gy2 + c_g2b2 - 2.0 * mu * (gy + c_g2b) + mu * mu * c_g2
    lin = vy + c_gbetab - mu * c_gbeta
    den = r * (r * q + 2.0 * lin) + c_beta2
    return num * tl.rsqrt(tl.maximum(den, NORM_EPS * NORM_EPS))


@triton.jit
def _two_pass_cosine(d, mask, s, shift, g, beta, q_hat, m, eps):
    """Scores of a (rows, BLOCK_M) tile for one query, LayerNorm in the exact two-pass form:
    y = d * s + shift, its mean, then the variance of the centred values. Padding columns
    (``mask`` false) have s = shift = 0, hence y = 0, and are masked out when centred."""
    y = d * s[None, :] + shift[None, :]
    mean = tl.sum(y, axis=1) / m
    yc = tl.where(mask, y - mean[:, None], 0.0)
    r = tl.rsqrt(tl.sum(yc * yc, axis=1) / m + eps)
    dt = yc * r[:, None] * g[None, :] + beta[None, :]
    norm = tl.maximum(tl.sqrt(tl.sum(dt * dt, axis=1)), NORM_EPS)
    return tl.sum(dt * q_hat[None, :], axis=1) / norm


# --------------------------------------------------------------------------- forward kernels


@triton.jit
def _score_fwd_diag_kernel(
    # pointers
    corpus_ptr,
    ids_ptr,
    transform_ptr,
    lnw_ptr,
    lnb_ptr,
    q_ptr,
    out_ptr,
    # sizes
    K,
    m,
    # strides (rows; the last dims are contiguous)
    stride_cn,
    stride_ib,
    stride_tb,
    stride_qb,
    stride_ob,
    eps,
    # meta-parameters
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    mask_k = offs_k < K
    mask_m = offs_m < m
    mask = mask_k[:, None] & mask_m[None, :]

    # Gather: int64 row offsets, a corpus can exceed 2^31 elements.
    ids = tl.load(ids_ptr + pid_b * stride_ib + offs_k, mask=mask_k, other=0).to(tl.int64)
    d_ptrs = corpus_ptr + ids[:, None] * stride_cn + offs_m[None, :]
    d = tl.load(d_ptrs, mask=mask, other=0.0).to(tl.float32)

    t_row = transform_ptr + pid_b * stride_tb
    s = tl.load(t_row + offs_m, mask=mask_m, other=0.0).to(tl.float32)
    b = tl.load(t_row + m + offs_m, mask=mask_m, other=0.0).to(tl.float32)
    g = tl.load(lnw_ptr + offs_m, mask=mask_m, other=0.0).to(tl.float32)
    beta = tl.load(lnb_ptr + offs_m, mask=mask_m, other=0.0).to(tl.float32)
    q = tl.load(q_ptr + pid_b * stride_qb + offs_m, mask=mask_m, other=0.0).to(tl.float32)
    q_hat = q / tl.maximum(tl.sqrt(tl.sum(q * q, axis=0)), NORM_EPS)

    score = _two_pass_cosine(d, mask, s, b, g, beta, q_hat, m, eps)
    tl.store(out_ptr + pid_b * stride_ob + offs_k, score, mask=mask_k)


@triton.jit
def _affine_scores_kernel(
    # pointers
    corpus_ptr,
    ids_ptr,
    w_ptr,
    bias_ptr,
    vecs_ptr,
    consts_ptr,
    out_ptr,
    # sizes
    n_rows,
    row_start,
    m,
    # strides
    stride_cn,
    stride_ib,
    stride_wb,
    stride_bb,
    stride_vb,
    stride_cb,
    stride_ob,
    eps,
    # meta-parameters
    DOT_PRECISION: tl.constexpr,
    GATHER: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    """Scores of BLOCK_R rows for one query under ``y' = W' d + b'`` (W', b' centred)."""
    pid_r = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < n_rows
    if GATHER:
        rows = tl.load(ids_ptr + pid_b * stride_ib + offs_r, mask=mask_r, other=0).to(tl.int64)
    else:
        rows = row_start + offs_r.to(tl.int64)

    w_base = w_ptr + pid_b * stride_wb
    v_base = vecs_ptr + pid_b * stride_vb
    s1 = tl.zeros((BLOCK_R,), dtype=tl.float32)
    s2 = tl.zeros((BLOCK_R,), dtype=tl.float32)
    p = tl.zeros((BLOCK_R,), dtype=tl.float32)
    gy = tl.zeros((BLOCK_R,), dtype=tl.float32)
    gy2 = tl.zeros((BLOCK_R,), dtype=tl.float32)
    vy = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for j0 in range(0, m, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        mask_j = offs_j < m
        acc = tl.zeros((BLOCK_R, BLOCK_J), dtype=tl.float32)
        for i0 in range(0, m, BLOCK_I):
            offs_i = i0 + tl.arange(0, BLOCK_I)
            mask_i = offs_i < m
            d_ptrs = corpus_ptr + rows[:, None] * stride_cn + offs_i[None, :]
            # Upcast before tl.dot: fp32 accuracy, and the interpreter's bf16 dot is wrong.
            d = tl.load(d_ptrs, mask=mask_r[:, None] & mask_i[None, :], other=0.0).to(tl.float32)
            # (BLOCK_I, BLOCK_J) tile of W'^T: element (i, j) is W'[j, i].
            wt_ptrs = w_base + offs_j[None, :] * m + offs_i[:, None]
            wt = tl.load(wt_ptrs, mask=mask_i[:, None] & mask_j[None, :], other=0.0)
            acc += tl.dot(d, wt, input_precision=DOT_PRECISION)
        bias = tl.load(bias_ptr + pid_b * stride_bb + offs_j, mask=mask_j, other=0.0)
        y = acc + bias[None, :]  # padding columns: 0
        qg = tl.load(v_base + offs_j, mask=mask_j, other=0.0)
        g2 = tl.load(v_base + m + offs_j, mask=mask_j, other=0.0)
        gbeta = tl.load(v_base + 2 * m + offs_j, mask=mask_j, other=0.0)
        yy = y * y
        s1 += tl.sum(y, axis=1)
        s2 += tl.sum(yy, axis=1)
        p += tl.sum(y * qg[None, :], axis=1)
        gy += tl.sum(y * g2[None, :], axis=1)
        gy2 += tl.sum(yy * g2[None, :], axis=1)
        vy += tl.sum(y * gbeta[None, :], axis=1)

    c = consts_ptr + pid_b * stride_cb
    score = _cos_epilogue(
        s1 / m,
        p,
        gy,
        vy,
        s2 / m,
        gy2,
        tl.load(c + 0),
        tl.load(c + 1),
        tl.load(c + 2),
        tl.load(c + 3),
        tl.load(c + 4),
        tl.load(c + 5),
        tl.load(c + 6),
        tl.load(c + 7),
        tl.load(c + 8),
        tl.load(c + 9),
        eps,
    )
    tl.store(out_ptr + pid_b * stride_ob + offs_r, score, mask=mask_r)


# --------------------------------------------------------------------------- backward kernel


@triton.jit
def _score_bwd_kernel(
    # pointers
    rows_ptr,
    ids_ptr,
    transform_ptr,
    lnw_ptr,
    lnb_ptr,
    q_ptr,
    grad_ptr,
    dy_ptr,
    dtrans_ptr,
    dq_ptr,
    dg_ptr,
    dbeta_ptr,
    # sizes
    K,
    m,
    # strides
    stride_rn,
    stride_ib,
    stride_tb,
    stride_qb,
    stride_gb,
    stride_dtb,
    eps,
    # meta-parameters
    DIAGONAL: tl.constexpr,
    STORE_DY: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Gradients for one query.

    DIAGONAL: rows are corpus rows gathered by ids, y = d * s + b; writes d transform
    [ds, db] and, with STORE_DY, the corpus-row gradients dy * s to ``dy`` (B, K, m).
    Otherwise (affine): rows are the precomputed y (B * K, m); writes db into the bias part
    of d transform and dy to ``dy`` for dW = dy^T D and the corpus gradient W^T dy.
    Always writes dq (B, m) and this query's partial dg, dbeta (B, m), summed by the caller.
    """
    pid_b = tl.program_id(0).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < m
    g = tl.load(lnw_ptr + offs_m, mask=mask_m, other=0.0).to(tl.float32)
    beta = tl.load(lnb_ptr + offs_m, mask=mask_m, other=0.0).to(tl.float32)
    q = tl.load(q_ptr + pid_b * stride_qb + offs_m, mask=mask_m, other=0.0).to(tl.float32)
    q_norm = tl.sqrt(tl.sum(q * q, axis=0))
    q_den = tl.maximum(q_norm, NORM_EPS)
    q_hat = q / q_den
    t_row = transform_ptr + pid_b * stride_tb
    if DIAGONAL:
        s = tl.load(t_row + offs_m, mask=mask_m, other=0.0).to(tl.float32)
        b = tl.load(t_row + m + offs_m, mask=mask_m, other=0.0).to(tl.float32)

    d_qh = tl.zeros((BLOCK_M,), dtype=tl.float32)
    d_g = tl.zeros((BLOCK_M,), dtype=tl.float32)
    d_beta = tl.zeros((BLOCK_M,), dtype=tl.float32)
    d_s = tl.zeros((BLOCK_M,), dtype=tl.float32)
    d_b = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        mask = mask_k[:, None] & mask_m[None, :]
        flat = pid_b * K + offs_k  # row of this candidate in the (B * K, m) buffers
        if DIAGONAL:
            ids = tl.load(ids_ptr + pid_b * stride_ib + offs_k, mask=mask_k, other=0).to(tl.int64)
            d_ptrs = rows_ptr + ids[:, None] * stride_rn + offs_m[None, :]
            d = tl.load(d_ptrs, mask=mask, other=0.0).to(tl.float32)
            y = d * s[None, :] + b[None, :]
        else:
            y_ptrs = rows_ptr + flat[:, None] * stride_rn + offs_m[None, :]
            y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(tl.where(mask, y, 0.0), axis=1) / m
        yc = tl.where(mask, y - mean[:, None], 0.0)
        r = tl.rsqrt(tl.sum(yc * yc, axis=1) / m + eps)
        z = yc * r[:, None]
        dt = z * g[None, :] + beta[None, :]
        d_norm = tl.sqrt(tl.sum(dt * dt, axis=1))
        d_den = tl.maximum(d_norm, NORM_EPS)
        dh = dt / d_den[:, None]
        score = tl.sum(dh * q_hat[None, :], axis=1)
        gr = tl.load(grad_ptr + pid_b * stride_gb + offs_k, mask=mask_k, other=0.0).to(tl.float32)

        d_qh += tl.sum(gr[:, None] * dh, axis=0)
        # normalize's backward; below its eps the denominator is constant (no radial term).
        radial = tl.where(d_norm >= NORM_EPS, gr * score, 0.0)
        ddt = (gr[:, None] * q_hat[None, :] - dh * radial[:, None]) / d_den[:, None]
        ddt = tl.where(mask, ddt, 0.0)
        d_g += tl.sum(ddt * z, axis=0)
        d_beta += tl.sum(ddt, axis=0)
        # LayerNorm's backward: dy = r (dz - mean(dz) - z mean(dz z)).
        dz = ddt * g[None, :]
        mdz = tl.sum(dz, axis=1) / m
        mdzz = tl.sum(dz * z, axis=1) / m
        dy = r[:, None] * (dz - mdz[:, None] - z * mdzz[:, None])
        dy = tl.where(mask, dy, 0.0)
        d_b += tl.sum(dy, axis=0)
        dy_ptrs = dy_ptr + flat[:, None] * m + offs_m[None, :]
        if DIAGONAL:
            d_s += tl.sum(dy * d, axis=0)
            if STORE_DY:
                tl.store(dy_ptrs, dy * s[None, :], mask=mask)
        else:
            tl.store(dy_ptrs, dy, mask=mask)

    dt_row = dtrans_ptr + pid_b * stride_dtb
    if DIAGONAL:
        tl.store(dt_row + offs_m, d_s, mask=mask_m)
        tl.store(dt_row + m + offs_m, d_b, mask=mask_m)
    else:
        tl.store(dt_row + m * m + offs_m, d_b, mask=mask_m)
    q_proj = tl.where(q_norm >= NORM_EPS, tl.sum(q_hat * d_qh, axis=0), 0.0)
    d_q = (d_qh - q_hat * q_proj) / q_den
    tl.store(dq_ptr + pid_b * m + offs_m, d_q, mask=mask_m)
    tl.store(dg_ptr + pid_b * m + offs_m, d_g, mask=mask_m)
    tl.store(dbeta_ptr + pid_b * m + offs_m, d_beta, mask=mask_m)


# --------------------------------------------------------------------------- launchers


def affine_blocks(m: int) -> tuple[int, int, int, int]:
    """(BLOCK_R, BLOCK_J, BLOCK_I, num_warps) of :func:`_affine_scores_kernel`.

    Interpreted: whole rows in one tile (the interpreter's cost is per program and per loop
    step, not per element). Compiled: 128 rows x 64-wide output tiles over 32-wide slices at
    8 warps, the largest tile that compiles without register spills for sm_90
    (benchmarks/RESULTS.md); every program streams its query's W' (m^2 fp32) through L2, so
    taller row blocks halve that traffic. Not autotuned on a GPU yet.
    """
    if interpreting():
        bm = pow2(m)
        return 256, bm, bm, 4
    return 128, 64, 32, 8


def affine_launch(
    corpus: torch.Tensor,
    ids: torch.Tensor | None,
    prep: AffinePrep,
    out: torch.Tensor,
    n_rows: int,
    row_start: int,
    eps: float,
) -> None:
    """Launch :func:`_affine_scores_kernel` for every query over ``n_rows`` rows into ``out``."""
    bsz, m = prep.bias.shape
    block_r, block_j, block_i, num_warps = affine_blocks(m)
    w = prep.weight.float().contiguous()
    bias = prep.bias.float().contiguous()
    vecs = prep.vecs.float().contiguous()
    consts = prep.consts.float().contiguous()
    ids_arg = ids if ids is not None else bias  # unused when GATHER is False
    grid = (triton.cdiv(n_rows, block_r), bsz)
    _affine_scores_kernel[grid](
        corpus,
        ids_arg,
        w,
        bias,
        vecs,
        consts,
        out,
        n_rows,
        row_start,
        m,
        corpus.stride(0),
        ids.stride(0) if ids is not None else 0,
        w.stride(0),
        bias.stride(0),
        vecs.stride(0),
        consts.stride(0),
        out.stride(0),
        eps,
        DOT_PRECISION=dot_precision(corpus.device),
        GATHER=ids is not None,
        BLOCK_R=block_r,
        BLOCK_J=block_j,
        BLOCK_I=block_i,
        num_warps=num_warps,
    )


def modulated_score_forward(
    corpus: torch.Tensor,
    ids: torch.Tensor,
    transform: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    queries: torch.Tensor,
    modulation: str,
    eps: float,
) -> torch.Tensor:
    """Launch the forward kernel: (B, K) float32 scores."""
    _check_device(corpus, ids, transform, queries)
    corpus = rows_view(corpus)
    ids = ids.contiguous()
    bsz, kk = ids.shape
    m = corpus.shape[1]
    out = torch.empty(bsz, kk, dtype=torch.float32, device=corpus.device)
    if modulation == "diagonal":
        transform = transform.contiguous()
        queries = queries.contiguous()
        block_m = pow2(m)
        # Whole rows in registers: cap BLOCK_K * BLOCK_M at 8192 fp32 values per program and
        # BLOCK_K at 64, below which sm_90 compiles without register spills (RESULTS).
        block_k = max(16, min(pow2(kk), 8192 // block_m, 64)) if not interpreting() else 64
        grid = (bsz, triton.cdiv(kk, block_k))
        _score_fwd_diag_kernel[grid](
            corpus,
            ids,
            transform,
            ln_weight.contiguous(),
            ln_bias.contiguous(),
            queries,
            out,
            kk,
            m,
            corpus.stride(0),
            ids.stride(0),
            transform.stride(0),
            queries.stride(0),
            out.stride(0),
            eps,
            BLOCK_K=block_k,
            BLOCK_M=block_m,
            num_warps=4 if block_m <= 256 else 8,
        )
        return out
    prep = affine_prep(transform, ln_weight, ln_bias, queries, torch.float32)
    affine_launch(corpus, ids, prep, out, kk, 0, eps)
    return out


def modulated_score_backward(
    grad: torch.Tensor,
    corpus: torch.Tensor,
    ids: torch.Tensor,
    transform: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    queries: torch.Tensor,
    modulation: str,
    eps: float,
    need_corpus: bool,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernel; returns (d corpus or None, d transform, d ln_weight,
    d ln_bias, d queries) in the inputs' dtypes. See :class:`ModulatedScoreFunction`."""
    corpus = rows_view(corpus)
    ids = ids.contiguous()
    grad = grad.float().contiguous()
    queries_c = queries.contiguous()
    bsz, kk = ids.shape
    m = corpus.shape[1]
    dev = corpus.device
    diagonal = modulation == "diagonal"
    t32 = transform.float().contiguous()
    d_t = torch.zeros(bsz, t32.shape[1], dtype=torch.float32, device=dev)
    d_q = torch.empty(bsz, m, dtype=torch.float32, device=dev)
    d_g = torch.empty(bsz, m, dtype=torch.float32, device=dev)
    d_beta = torch.empty(bsz, m, dtype=torch.float32, device=dev)
    store_dy = (not diagonal) or need_corpus
    dy = torch.empty(bsz * kk if store_dy else 1, m, dtype=torch.float32, device=dev)
    if diagonal:
        rows = corpus
    else:
        w = t32[:, : m * m].view(bsz, m, m)
        docs = corpus[ids.long()].float()  # (B, K, m)
        rows = torch.baddbmm(t32[:, None, m * m :], docs, w.transpose(1, 2)).view(bsz * kk, m)
    block_m = pow2(m)
    # Nine (BLOCK_K x BLOCK_M) fp32 temporaries are live per candidate block: 2048 values
    # keeps them in registers on sm_90 (larger blocks spill; benchmarks/RESULTS.md).
    block_k = 64 if interpreting() else max(2, min(64, 2048 // block_m))
    _score_bwd_kernel[(bsz,)](
        rows,
        ids,
        t32,
        ln_weight.contiguous(),
        ln_bias.contiguous(),
        queries_c,
        grad,
        dy,
        d_t,
        d_q,
        d_g,
        d_beta,
        kk,
        m,
        rows.stride(0),
        ids.stride(0),
        t32.stride(0),
        queries_c.stride(0),
        grad.stride(0),
        d_t.stride(0),
        eps,
        DIAGONAL=diagonal,
        STORE_DY=store_dy,
        BLOCK_K=block_k,
        BLOCK_M=block_m,
        num_warps=4 if block_m <= 256 else 8,
    )
    d_corpus = None
    if diagonal:
        rows_grad = dy if need_corpus else None
    else:
        dyv = dy.view(bsz, kk, m)
        # dW = sum_k dy d^T and the corpus gradient W^T dy: batched GEMMs (tensor cores).
        d_t[:, : m * m] = torch.bmm(dyv.transpose(1, 2), docs).reshape(bsz, m * m)
        rows_grad = torch.bmm(dyv, w).view(bsz * kk, m) if need_corpus else None
    if rows_grad is not None:
        acc = torch.zeros(corpus.shape, dtype=torch.float32, device=dev)
        acc.index_add_(0, ids.reshape(-1).long(), rows_grad)
        d_corpus = acc.to(corpus.dtype)
    return (
        d_corpus,
        d_t.to(transform.dtype),
        d_g.sum(dim=0).to(ln_weight.dtype),
        d_beta.sum(dim=0).to(ln_bias.dtype),
        d_q.to(queries.dtype),
    )


class ModulatedScoreFunction(torch.autograd.Function):
    """Fused candidate scoring with an analytic backward.

    Shapes: corpus (N, m), ids (B, K), transform (B, OUT), ln_weight/ln_bias (m,),
    queries (B, m) -> scores (B, K) float32. With d~ = LN(T_b(d)) = z g + beta,
    d^ = d~ / ||d~||, q^ = q / ||q||, G = dL/dscore::

        dq^ = sum_k G d^,    dd~ = G (q^ - d^ score) / ||d~||,
        dg = sum dd~ z,      dbeta = sum dd~,
        dy = r (dz - mean(dz) - z mean(dz z)),  dz = dd~ g,
        diagonal: ds = sum_k dy d, db = sum_k dy;   affine: dW = sum_k dy d^T, db = sum_k dy,
        corpus:   index_add of dy s (diagonal) or W^T dy (affine) at ids (duplicates add up).

    Forward: :func:`modulated_score_forward`; backward: :func:`modulated_score_backward`.
    Saves only the inputs. No gradient for ids, modulation or eps. Gradients are fp32 sums
    (cast to each input's dtype).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        corpus: torch.Tensor,
        ids: torch.Tensor,
        transform: torch.Tensor,
        ln_weight: torch.Tensor,
        ln_bias: torch.Tensor,
        queries: torch.Tensor,
        modulation: str,
        eps: float,
    ) -> torch.Tensor:
        ctx.save_for_backward(corpus, ids, transform, ln_weight, ln_bias, queries)
        ctx.modulation, ctx.eps = modulation, eps
        return modulated_score_forward(
            corpus, ids, transform, ln_weight, ln_bias, queries, modulation, eps
        )

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        corpus, ids, transform, ln_weight, ln_bias, queries = ctx.saved_tensors
        d_corpus, d_t, d_g, d_beta, d_q = modulated_score_backward(
            grad,
            corpus,
            ids,
            transform,
            ln_weight,
            ln_bias,
            queries,
            ctx.modulation,
            ctx.eps,
            need_corpus=ctx.needs_input_grad[0],
        )
        return d_corpus, None, d_t, d_g, d_beta, d_q, None, None


def modulated_score(
    corpus: torch.Tensor,
    ids: torch.Tensor,
    transform: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    queries: torch.Tensor,
    modulation: str = "diagonal",
    eps: float = 1e-5,
) -> torch.Tensor:
    """(B, K) float32 modulated cosines (the reference's signature), differentiable."""
    if needs_grad(corpus, transform, ln_weight, ln_bias, queries):
        return ModulatedScoreFunction.apply(
            corpus, ids, transform, ln_weight, ln_bias, queries, modulation, eps
        )
    return modulated_score_forward(
        corpus, ids, transform, ln_weight, ln_bias, queries, modulation, eps
    )


modulated_score.supports_autograd = True  # type: ignore[attr-defined]
modulated_score.backward = modulated_score_backward  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- exhaustive top-k

# Queries up to which exhaustive diagonal search runs the two-pass row kernel (CUDA cores)
# instead of the tensor-core dot kernel, whose query tile cannot be narrower than 16 (a
# padded query tile costs about what a full one does). The row kernel's time grows with the
# queries and crosses the dot kernel's between 8 and 16 on an H200 (benchmarks/RESULTS.md,
# "GPU: NVIDIA H200").
SMALL_BATCH = 8
ILL: tl.constexpr = tl.constexpr(ILL_CONDITIONED)

# Bytes of (B, chunk) fp32 score buffer per chunk: bounds the extra memory on the device
# independently of N (the running top-k is (B, k)).
SCORE_BUFFER_BYTES = 64 << 20
# Smallest chunk a workspace budget may impose: below it the per-chunk launches and top-k
# merges dominate (each chunk costs two kernel launches and a (B, k) merge).
MIN_CHUNK_ROWS = 1024


@triton.jit
def _diag_scores_kernel(
    # pointers
    corpus_ptr,
    lin_ptr,
    quad_ptr,
    consts_ptr,
    out_ptr,
    ill_ptr,
    # sizes
    n_rows,
    row_start,
    m,
    nq,
    # strides
    stride_cn,
    stride_ob,
    eps,
    # meta-parameters
    DOT_PRECISION: tl.constexpr,
    NUM_CONSTS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    """Scores of BLOCK_N corpus rows (from ``row_start``) for BLOCK_B queries.

    ``lin`` is (6, m, nq) and ``quad`` (2, m, nq), query index fastest, so that an atom's
    (BLOCK_I, BLOCK_B) tile is one coalesced load. Writes out[b, row - row_start]. Pairs whose
    one-pass moments are ill-conditioned (:data:`ILL_CONDITIONED`) are written as -inf and
    counted in ``ill_ptr[0]``: the caller then redoes the search two-pass.
    """
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_n = offs_n < n_rows
    mask_b = offs_b < nq
    rows = row_start + offs_n.to(tl.int64)  # int64: N * m can exceed 2^31

    acc_mu = tl.zeros((BLOCK_N, BLOCK_B), dtype=tl.float32)
    acc_p = tl.zeros((BLOCK_N, BLOCK_B), dtype=tl.float32)
    acc_gy = tl.zeros((BLOCK_N, BLOCK_B), dtype=tl.float32)
    acc_vy = tl.zeros((BLOCK_N, BLOCK_B), dtype=tl.float32)
    acc_e2 = tl.zeros((BLOCK_N, BLOCK_B), dtype=tl.float32)
    acc_gy2 = tl.zeros((BLOCK_N, BLOCK_B), dtype=tl.float32)
    plane = m * nq  # elements per atom
    for i0 in range(0, m, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        mask_i = offs_i < m
        d_ptrs = corpus_ptr + rows[:, None] * stride_cn + offs_i[None, :]
        d = tl.load(d_ptrs, mask=mask_n[:, None] & mask_i[None, :], other=0.0).to(tl.float32)
        d2 = d * d
        a_ptrs = lin_ptr + offs_i[:, None] * nq + offs_b[None, :]
        q_ptrs = quad_ptr + offs_i[:, None] * nq + offs_b[None, :]
        a_mask = mask_i[:, None] & mask_b[None, :]
        acc_mu += tl.dot(d, tl.load(a_ptrs, mask=a_mask, other=0.0), input_precision=DOT_PRECISION)
        acc_p += tl.dot(
            d, tl.load(a_ptrs + plane, mask=a_mask, other=0.0), input_precision=DOT_PRECISION
        )
        acc_gy += tl.dot(
            d, tl.load(a_ptrs + 2 * plane, mask=a_mask, other=0.0), input_precision=DOT_PRECISION
        )
        acc_vy += tl.dot(
            d, tl.load(a_ptrs + 3 * plane, mask=a_mask, other=0.0), input_precision=DOT_PRECISION
        )
        acc_e2 += tl.dot(
            d, tl.load(a_ptrs + 4 * plane, mask=a_mask, other=0.0), input_precision=DOT_PRECISION
        )
        acc_e2 += tl.dot(d2, tl.load(q_ptrs, mask=a_mask, other=0.0), input_precision=DOT_PRECISION)
        acc_gy2 += tl.dot(
            d, tl.load(a_ptrs + 5 * plane, mask=a_mask, other=0.0), input_precision=DOT_PRECISION
        )
        acc_gy2 += tl.dot(
            d2, tl.load(q_ptrs + plane, mask=a_mask, other=0.0), input_precision=DOT_PRECISION
        )

    c = consts_ptr + offs_b * NUM_CONSTS
    c_cb = tl.load(c + 0, mask=mask_b, other=0.0)[None, :]
    c_g2b2 = tl.load(c + 4, mask=mask_b, other=0.0)[None, :]
    c_g2b = tl.load(c + 5, mask=mask_b, other=0.0)[None, :]
    c_g2 = tl.load(c + 9, mask=mask_b, other=0.0)[None, :]
    score = _cos_epilogue(
        acc_mu,
        acc_p,
        acc_gy,
        acc_vy,
        acc_e2,
        acc_gy2,
        c_cb,
        tl.load(c + 1, mask=mask_b, other=0.0)[None, :],
        tl.load(c + 2, mask=mask_b, other=0.0)[None, :],
        tl.load(c + 3, mask=mask_b, other=0.0)[None, :],
        c_g2b2,
        c_g2b,
        tl.load(c + 6, mask=mask_b, other=0.0)[None, :],
        tl.load(c + 7, mask=mask_b, other=0.0)[None, :],
        tl.load(c + 8, mask=mask_b, other=0.0)[None, :],
        c_g2,
        eps,
    )
    # The flags of moments.cosine_epilogue_flagged_: E2 - mu^2 and the ||d~||^2 expansion lose about
    # log2(mu^2 / var) bits; such pairs are dropped here and the call redone two-pass.
    mu2 = acc_mu * acc_mu
    var_eps = tl.maximum(acc_e2 + c_cb - mu2, 0.0) + eps
    qf = acc_gy2 + c_g2b2 - 2.0 * acc_mu * (acc_gy + c_g2b) + mu2 * c_g2
    mask = mask_n[:, None] & mask_b[None, :]
    ill = ((mu2 > ILL * var_eps) | (mu2 * c_g2 > ILL * qf)) & mask
    score = tl.where(ill, float("-inf"), score)
    tl.atomic_add(ill_ptr, tl.sum(tl.sum(ill.to(tl.int32), axis=1), axis=0))
    out_ptrs = out_ptr + offs_b[None, :].to(tl.int64) * stride_ob + offs_n[:, None]
    tl.store(out_ptrs, score, mask=mask)


@triton.jit
def _diag_rows_kernel(
    # pointers
    corpus_ptr,
    transform_ptr,
    lnw_ptr,
    lnb_ptr,
    q_ptr,
    out_ptr,
    # sizes
    n_rows,
    row_start,
    m,
    nq,
    # strides (rows; the last dims are contiguous)
    stride_cn,
    stride_tb,
    stride_qb,
    stride_ob,
    eps,
    # meta-parameters
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Scores of BLOCK_N contiguous corpus rows for all ``nq`` queries, two-pass.

    The row tile is loaded once and kept in registers while a loop over the queries applies
    each one's y = d * s + b, exact LayerNorm (mean, then the centred variance) and cosine:
    about 10 FLOPs per element and query on the CUDA cores, no ``tl.dot``. For a few queries
    that is below the cost of reading the corpus, where the dot kernel would pad the query
    dimension to 16 (``tl.dot``'s minimum) and run 8 dots of it. It is also the exact
    fallback when :func:`_diag_scores_kernel` flags ill-conditioned pairs.
    """
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    mask_n = offs_n < n_rows
    mask_m = offs_m < m
    mask = mask_n[:, None] & mask_m[None, :]
    rows = row_start + offs_n.to(tl.int64)  # int64: N * m can exceed 2^31
    d_ptrs = corpus_ptr + rows[:, None] * stride_cn + offs_m[None, :]
    d = tl.load(d_ptrs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(lnw_ptr + offs_m, mask=mask_m, other=0.0).to(tl.float32)
    beta = tl.load(lnb_ptr + offs_m, mask=mask_m, other=0.0).to(tl.float32)
    for b in range(nq):
        t_row = transform_ptr + b * stride_tb
        s = tl.load(t_row + offs_m, mask=mask_m, other=0.0).to(tl.float32)
        shift = tl.load(t_row + m + offs_m, mask=mask_m, other=0.0).to(tl.float32)
        q = tl.load(q_ptr + b * stride_qb + offs_m, mask=mask_m, other=0.0).to(tl.float32)
        q_hat = q / tl.maximum(tl.sqrt(tl.sum(q * q, axis=0)), NORM_EPS)
        score = _two_pass_cosine(d, mask, s, shift, g, beta, q_hat, m, eps)
        tl.store(out_ptr + b * stride_ob + offs_n, score, mask=mask_n)


def _diag_blocks(m: int, nq: int, compiled: bool | None = None) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_B, BLOCK_I, num_warps, num_stages) of :func:`_diag_scores_kernel`.

    Interpreted: few, large programs (its cost is per program). Compiled: 128 docs x up to 32
    queries x 32-wide slices at 8 warps, 2 stages: the fastest of the shapes timed on an H200
    (benchmarks/RESULTS.md, "GPU: NVIDIA H200"; benchmarks/gpu_tune.py retimes them), and no
    register spills on sm_90. Bigger tiles per warp amortise the "tf32x3" operand splitting
    of each dot.
    """
    block_b = min(32, pow2(nq))
    if compiled is None:
        compiled = not interpreting()
    if not compiled:
        return 512, block_b, pow2(m), 4, 1
    return 128, block_b, 32, 8, 2


def dot_operands(atoms: DiagonalAtoms) -> tuple[torch.Tensor, torch.Tensor]:
    """The query operands of :func:`_diag_scores_kernel`: lin (6, m, B) and quad (2, m, B),
    query index fastest, so that an atom's (BLOCK_I, BLOCK_B) tile is one coalesced load."""
    return atoms.lin.transpose(1, 2).contiguous(), atoms.quad.transpose(1, 2).contiguous()


def _diag_chunk(
    corpus: torch.Tensor,
    atoms_lin: torch.Tensor,
    atoms_quad: torch.Tensor,
    consts: torch.Tensor,
    out: torch.Tensor,
    ill: torch.Tensor,
    row_start: int,
    n_rows: int,
    eps: float,
    blocks: tuple[int, int, int, int, int] | None = None,
) -> None:
    """Scores of rows ``row_start ..`` into ``out``, operands from :func:`dot_operands`;
    ``blocks`` overrides :func:`_diag_blocks` (benchmarks/gpu_tune.py times alternatives)."""
    m = corpus.shape[1]
    nq = consts.shape[0]
    block_n, block_b, block_i, num_warps, num_stages = blocks or _diag_blocks(m, nq)
    grid = (triton.cdiv(n_rows, block_n), triton.cdiv(nq, block_b))
    _diag_scores_kernel[grid](
        corpus,
        atoms_lin,
        atoms_quad,
        consts,
        out,
        ill,
        n_rows,
        row_start,
        m,
        nq,
        corpus.stride(0),
        out.stride(0),
        eps,
        DOT_PRECISION=dot_precision(corpus.device),
        NUM_CONSTS=NUM_CONSTS,
        BLOCK_N=block_n,
        BLOCK_B=block_b,
        BLOCK_I=block_i,
        num_warps=num_warps,
        num_stages=num_stages,
    )


def _rows_blocks(m: int, compiled: bool | None = None) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_M, num_warps) of :func:`_diag_rows_kernel`: the whole row in
    registers (BLOCK_M = m rounded up to a power of two), 8192 fp32 tile elements per
    (compiled) program at 4 warps; interpreted, few large programs. The fastest of the shapes
    timed on an H200 (benchmarks/RESULTS.md, "GPU: NVIDIA H200"; benchmarks/gpu_tune.py
    retimes them), with no register spills on sm_90."""
    block_m = pow2(m, 1)
    if compiled is None:
        compiled = not interpreting()
    if not compiled:
        return max(1, 32768 // block_m), block_m, 4
    return max(1, 8192 // block_m), block_m, 4


def _diag_rows_chunk(
    corpus: torch.Tensor,
    transform: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    queries: torch.Tensor,
    out: torch.Tensor,
    row_start: int,
    n_rows: int,
    eps: float,
    blocks: tuple[int, int, int] | None = None,
) -> None:
    """Exact scores of rows ``row_start ..`` into ``out``; ``blocks`` overrides
    :func:`_rows_blocks` (benchmarks/gpu_tune.py times alternatives)."""
    m = corpus.shape[1]
    block_n, block_m, num_warps = blocks or _rows_blocks(m)
    _diag_rows_kernel[(triton.cdiv(n_rows, block_n),)](
        corpus,
        transform,
        ln_weight,
        ln_bias,
        queries,
        out,
        n_rows,
        row_start,
        m,
        queries.shape[0],
        corpus.stride(0),
        transform.stride(0),
        queries.stride(0),
        out.stride(0),
        eps,
        BLOCK_N=block_n,
        BLOCK_M=block_m,
        num_warps=num_warps,
    )


def plan_chunk_rows(
    n: int, m: int, batch: int, k: int, modulation: str, workspace_bytes: int
) -> int:
    """Rows per chunk that keep one call's extra device memory within ``workspace_bytes``.

    Fixed: the query-side tensors (diagonal: the atoms, their transposed copies and their
    temporaries, about 24 (B, m) fp32 tensors; affine: W' (B, m, m) plus as many), the (B, k)
    running top-k with one merge's transients (:data:`TOPK_SLOT_BYTES` per slot) and the
    outputs. Per chunk row: the fp32 score column (4 B per query) plus the top-k update's
    masks and, with exact ties, a stable re-sort of the column (18 B per query).

    Raises:
        ValueError: the budget cannot hold ``min(MIN_CHUNK_ROWS, n)`` rows; names the minimum.
    """
    fixed = 24 * batch * m * 4 + TOPK_SLOT_BYTES * batch * k
    if modulation == "affine":
        fixed += batch * m * m * 4
    row = batch * (4 + 18)
    min_rows = max(1, min(MIN_CHUNK_ROWS, n))
    need = fixed + min_rows * row
    if workspace_bytes < need:
        raise ValueError(
            f"workspace_bytes={workspace_bytes} is too small for this search: it needs at "
            f"least {need} bytes ({need / 2**20:.2f} MiB) for {batch} queries, m={m}, k={k}, "
            f"{modulation} modulation, {min_rows} rows per chunk"
        )
    return int(min(n, (workspace_bytes - fixed) // row))


def modulated_topk(
    corpus: torch.Tensor,
    transform: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    modulation: str = "diagonal",
    eps: float = 1e-5,
    chunk_rows: int | None = None,
    workspace_bytes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exhaustive top-k of the modulated cosine (the reference's signature and results).

    ``chunk_rows`` (default: as many rows as fit :data:`SCORE_BUFFER_BYTES` of (B, chunk)
    scores) sets the streaming granularity; tests use small values to exercise the merge.
    ``workspace_bytes`` bounds the call's extra device memory (:func:`plan_chunk_rows`): the
    per-call (B, chunk) score buffer and the top-k's per-chunk transients are sized from what
    the query-side tensors and the (B, k) top-k leave of it. There are no other partial
    buffers (each tile's moments live in registers). Not differentiable.

    Raises:
        ValueError: ``workspace_bytes`` cannot hold a chunk of ``min(MIN_CHUNK_ROWS, N)`` rows.
    """
    _check_device(corpus, transform, queries)
    corpus = rows_view(corpus)
    n, m = corpus.shape
    bsz = queries.shape[0]
    if chunk_rows is None:
        chunk_rows = max(1024, SCORE_BUFFER_BYTES // (4 * max(bsz, 1)))
    if workspace_bytes is not None:
        # A budget only ever shrinks the chunk: past SCORE_BUFFER_BYTES nothing gets faster.
        chunk_rows = min(chunk_rows, plan_chunk_rows(n, m, bsz, k, modulation, workspace_bytes))
    chunk = int(min(n, chunk_rows))
    dev = corpus.device
    top = StreamingTopK(bsz, k, dev)
    out = torch.empty(bsz, chunk, dtype=torch.float32, device=dev)
    with torch.no_grad():
        if modulation == "diagonal":
            ill = torch.zeros(1, dtype=torch.int32, device=dev)
            exact = bsz <= SMALL_BATCH
            if not exact:
                atoms = diagonal_atoms(transform, ln_weight, ln_bias, queries, torch.float32)
                lin, quad = dot_operands(atoms)
                consts = atoms.consts.contiguous()
                for start in range(0, n, chunk):
                    rows = min(chunk, n - start)
                    _diag_chunk(corpus, lin, quad, consts, out, ill, start, rows, eps)
                    top.add(out[:, :rows], start)
                # One host sync per call: any flagged pair sends the whole search down the
                # exact path (never seen on a projected corpus; see ILL_CONDITIONED).
                exact = bool(ill.item() > 0)
                if exact:
                    top = StreamingTopK(bsz, k, dev)
            if exact:
                args = (
                    transform.float().contiguous(),
                    ln_weight.float().contiguous(),
                    ln_bias.float().contiguous(),
                    queries.float().contiguous(),
                )
                for start in range(0, n, chunk):
                    rows = min(chunk, n - start)
                    _diag_rows_chunk(corpus, *args, out, start, rows, eps)
                    top.add(out[:, :rows], start)
        else:
            prep = affine_prep(transform, ln_weight, ln_bias, queries, torch.float32)
            for start in range(0, n, chunk):
                rows = min(chunk, n - start)
                affine_launch(corpus, None, prep, out, rows, start, eps)
                top.add(out[:, :rows], start)
    return top.result()
