"""Fused candidate scoring: gather + modulation + LayerNorm + cosine, forward and backward.

``score[b, k] = <normalize(q_b), normalize(LN(T_b(corpus[ids[b, k]])))>`` for B queries and a
(B, K) table of candidate ids, with T_b ``d * s + b`` (``diagonal``) or ``W d + b``
(``affine``). Each candidate row is read once, everything else stays in registers, and only
the (B, K) float32 scores are written.

Kernels:

- :func:`_score_fwd_diag_kernel`: one program per (query, block of candidates); a candidate's
  whole row is in registers, so LayerNorm is the exact two-pass form (mean, then the centred
  variance) and matches the reference to fp32 rounding.
- :func:`_affine_scores_kernel`: ``y' = W' d + b'`` in (rows x BLOCK_J) tiles by ``tl.dot``
  over BLOCK_I slices of the row, folding each tile into the six moments of
  :mod:`imrnns_kernels.ops._scoring_common` (W', b' centred so that mean(y') = 0 exactly:
  no cancellation in E[y^2] - mean^2), then the shared cosine epilogue. ``GATHER`` picks rows
  through the id table (rerank) or a contiguous range (exhaustive search, see
  :mod:`imrnns_kernels.ops.modulated_topk`).
- :func:`_score_bwd_kernel`: one program per query, looping over its candidates; recomputes
  the forward and accumulates the query's gradients in registers (no atomics: deterministic).
  The per-candidate ``dL/dy`` rows go to a buffer when the affine ``dW = dy^T D`` (a batched
  GEMM, done by torch) or the corpus gradient needs them.

Inputs: the corpus may be fp32, fp16 or bf16 with any row stride (a last-dim stride other than
1 is copied with ``.contiguous()``); the small tensors are made contiguous. Everything is
computed in fp32 (``tl.dot`` on fp32 operands with ``input_precision`` "tf32x3" on sm_80+,
"ieee" otherwise, see :func:`dot_precision`: plain TF32 would break the fp32 tolerance) and
the scores are float32. Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from imrnns_kernels.ops import _scoring_common as C

NORM_EPS: tl.constexpr = tl.constexpr(C.NORMALIZE_EPS)
# Precision of every tl.dot (fp32 operands, fp32 accumulation). Plain TF32 (10-bit mantissa)
# would miss the fp32 tolerance by two orders of magnitude; "tf32x3" splits each operand into
# a TF32 head and tail and keeps three products: fp32-level accuracy on tensor cores, about
# 3x the throughput of "ieee" FMA dots on an H100 (not measured: no GPU this session).
# IMRNNS_DOT_PRECISION=ieee overrides; GPUs before sm_80 (no TF32) use "ieee".
_DOT_PRECISION_ENV = "IMRNNS_DOT_PRECISION"


def dot_precision(device: torch.device) -> str:
    """The ``input_precision`` of the kernels' ``tl.dot`` on ``device``."""
    forced = os.environ.get(_DOT_PRECISION_ENV)
    if forced:
        if forced not in ("ieee", "tf32x3"):
            raise ValueError(f"{_DOT_PRECISION_ENV} must be 'ieee' or 'tf32x3', got {forced!r}")
        return forced
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 0):
        return "ieee"
    return "tf32x3"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_device(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.device.type != "cuda" and not interpreting():
            raise ValueError(
                f"the Triton path needs CUDA tensors (or TRITON_INTERPRET=1), got a tensor on "
                f"{t.device}: use imrnns_kernels.dispatch, which picks the CPU path there"
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
    """Scores from the six moments; see _scoring_common for the formulas and constants."""
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


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


def affine_blocks(m: int) -> tuple[int, int, int, int]:
    """(BLOCK_R, BLOCK_J, BLOCK_I, num_warps) of :func:`_affine_scores_kernel`.

    Interpreted: whole rows in one tile (the interpreter's cost is per program and per loop
    step, not per element). Compiled: 128 rows x 64-wide output tiles over 32-wide slices at
    8 warps (sm_90 ptxas, offline: 236 registers, no spill); every program streams its
    query's W' (m^2 fp32) through L2, so taller row blocks halve that traffic. Not autotuned:
    no GPU this session.
    """
    if interpreting():
        bm = _pow2(m)
        return 256, bm, bm, 4
    return 128, 64, 32, 8


def affine_launch(
    corpus: torch.Tensor,
    ids: torch.Tensor | None,
    prep: C.AffinePrep,
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
        block_m = _pow2(m)
        # Whole rows in registers: cap BLOCK_K * BLOCK_M at 8192 fp32 values per program and
        # BLOCK_K at 64 (sm_90 ptxas, offline: 128 x 64 tiles spilled 48-80 bytes per thread).
        block_k = max(16, min(_pow2(kk), 8192 // block_m, 64)) if not interpreting() else 64
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
    prep = C.affine_prep(transform, ln_weight, ln_bias, queries, torch.float32)
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
    block_m = _pow2(m)
    # Nine (BLOCK_K x BLOCK_M) fp32 temporaries are live per candidate block: 2048 values
    # keeps them in registers (sm_90 ptxas, offline: m=256 -> 8 x 256 at 4 warps, 141
    # registers, no spill; 16 x 256 spilled).
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


# Fused candidate scoring with an analytic backward.
#
# Shapes: corpus (N, m), ids (B, K), transform (B, OUT), ln_weight/ln_bias (m,),
# queries (B, m) -> scores (B, K) float32. With d~ = LN(T_b(d)) = z g + beta,
# d^ = d~ / ||d~||, q^ = q / ||q||, G = dL/dscore:
#
# dq^ = sum_k G d^,    dd~ = G (q^ - d^ score) / ||d~||,
# dg = sum dd~ z,      dbeta = sum dd~,
# dy = r (dz - mean(dz) - z mean(dz z)),  dz = dd~ g,
# diagonal: ds = sum_k dy d, db = sum_k dy;   affine: dW = sum_k dy d^T, db = sum_k dy,
# corpus:   index_add of dy s (diagonal) or W^T dy (affine) at ids (duplicates add up).
#
# No gradient for ids. Gradients are fp32 sums (cast to each input's dtype).
ModulatedScoreFunction = C.score_function(
    "ModulatedScoreFunction", modulated_score_forward, modulated_score_backward
)


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
    if torch.is_grad_enabled() and any(
        t.requires_grad for t in (corpus, transform, ln_weight, ln_bias, queries)
    ):
        return ModulatedScoreFunction.apply(
            corpus, ids, transform, ln_weight, ln_bias, queries, modulation, eps
        )
    return modulated_score_forward(
        corpus, ids, transform, ln_weight, ln_bias, queries, modulation, eps
    )


modulated_score.supports_autograd = True  # type: ignore[attr-defined]
