"""Fused exhaustive search: modulated cosine of every corpus row, streaming top-k.

For B queries over an (N, m) corpus, returns ((B, k) float32 scores, (B, k) int64 ids), best
first, ties broken by the lower id, padded with ``-inf`` / ``-1`` when k > N (faiss's
convention). The corpus is scored in row chunks into a (B, chunk) buffer, each chunk is
reduced to its top-k and merged into a running (B, k) result
(:class:`imrnns_kernels.ops._scoring_common.StreamingTopK`), so no (B, N) score matrix or
modulated corpus is ever held.

Kernels:

- :func:`_diag_scores_kernel` (``diagonal``): a (BLOCK_N docs x BLOCK_B queries) tile of
  scores. Per BLOCK_I slice of the rows it loads the doc tile once, squares it, and runs
  8 ``tl.dot``s against the query atoms (6 dotted with d, 2 with d*d; see
  :mod:`imrnns_kernels.ops._scoring_common`), then applies the O(1) cosine epilogue in
  registers. Each document tile is read once per block of BLOCK_B queries.
- :func:`_diag_rows_kernel` (``diagonal``, at most :data:`SMALL_BATCH` queries): the exact
  two-pass score of a row tile kept in registers, looping over the queries on the CUDA
  cores. With one query the dot kernel would pad its query tile to 16 and run 8 dots of it,
  compute well above the cost of reading the corpus; this one stays below it. It is also
  the exact fallback: the dot kernel drops and counts the pairs whose one-pass moments are
  ill-conditioned, and a call with any such pair is redone with it (one host sync a call).
- ``affine``: :func:`imrnns_kernels.ops.modulated_score._affine_scores_kernel` with
  ``GATHER=False`` (contiguous rows): y' = W' d + b' tiles folded into the six moments.
  Affine scoring costs m^2 multiply-adds per (doc, query) whatever the order of operations:
  LayerNorm's variance is a dense quadratic form in d.

Accumulation is fp32 (fp32 operands, "tf32x3" or "ieee" dots: see
:func:`imrnns_kernels.ops.modulated_score.dot_precision`); the corpus may be fp32, fp16 or
bf16 and is upcast per tile (also required by the interpreter, whose bf16 ``tl.dot`` is
wrong).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from imrnns_kernels.ops import _scoring_common as C
from imrnns_kernels.ops.modulated_score import (
    NORM_EPS,
    _check_device,
    _cos_epilogue,
    _pow2,
    _two_pass_cosine,
    affine_launch,
    dot_precision,
    interpreting,
    rows_view,
)

# Queries up to which exhaustive diagonal search runs the two-pass row kernel (CUDA cores)
# instead of the tensor-core dot kernel, whose query tile cannot be narrower than 16. On an
# H200 (N = 1e7, m = 256, bf16, whole calls; benchmarks/RESULTS.md) the row kernel took
# 2.7 / 6.2 / 10.8 / 20.0 / 38.9 ms for 1 / 2 / 4 / 8 / 16 queries, the dot kernel 43.4 ms
# for 32 (a dot-kernel variant tried in the same run, since removed, took 62-69 ms for 2-16:
# the padded query tile costs about what a full one does).
SMALL_BATCH = 8
ILL: tl.constexpr = tl.constexpr(C.ILL_CONDITIONED)

# Bytes of (B, chunk) fp32 score buffer per chunk: bounds the extra memory on the device
# independently of N (the running top-k is (B, k)).
SCORE_BUFFER_BYTES = 64 << 20
# Smallest chunk a workspace budget may impose: below it the per-chunk launches and top-k
# merges dominate (each chunk costs two kernel launches and a (B, k) merge).
MIN_CHUNK_ROWS = 1024
# Peak bytes per (query, top-k slot) of the running top-k and one merge (as the CPU path's).
TOPK_SLOT_BYTES = 256


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
    one-pass moments are ill-conditioned (:data:`C.ILL_CONDITIONED`) are written as -inf and
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
    # The flags of C.cosine_epilogue_: E2 - mu^2 and the ||d~||^2 expansion lose about
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
    (N = 1e7, m = 256, bf16, B = 32, scores only; benchmarks/RESULTS.md): 29.1 ms, against
    95.6 ms for 64 x 32 x 16 at 8 warps (the shape chosen before any GPU run) and 39.6 ms at
    4 warps. Bigger tiles per warp amortise the "tf32x3" operand splitting of each dot.
    sm_90 ptxas (Triton 3.6): 248 registers, no spill.
    """
    block_b = min(32, _pow2(nq))
    if compiled is None:
        compiled = not interpreting()
    if not compiled:
        return 512, block_b, _pow2(m), 4, 1
    return 128, block_b, 32, 8, 2


def dot_operands(atoms: C.DiagonalAtoms) -> tuple[torch.Tensor, torch.Tensor]:
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
        NUM_CONSTS=C.NUM_CONSTS,
        BLOCK_N=block_n,
        BLOCK_B=block_b,
        BLOCK_I=block_i,
        num_warps=num_warps,
        num_stages=num_stages,
    )


def _rows_blocks(m: int, compiled: bool | None = None) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_M, num_warps) of :func:`_diag_rows_kernel`: the whole row in
    registers (BLOCK_M = m rounded up to a power of two), 8192 fp32 tile elements per
    (compiled) program at 4 warps; interpreted, few large programs. On an H200 (m = 256,
    bf16, N = 1e7; benchmarks/RESULTS.md) 32-row tiles at 4 warps read 2.58 TB/s, 16-row
    tiles 2.28 TB/s, and 8 warps or 64-row tiles were slower (sm_90 ptxas, m = 256: 224
    registers, no spill)."""
    block_m = _pow2(m, 1)
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
    top = C.StreamingTopK(bsz, k, dev)
    out = torch.empty(bsz, chunk, dtype=torch.float32, device=dev)
    with torch.no_grad():
        if modulation == "diagonal":
            ill = torch.zeros(1, dtype=torch.int32, device=dev)
            exact = bsz <= SMALL_BATCH
            if not exact:
                atoms = C.diagonal_atoms(transform, ln_weight, ln_bias, queries, torch.float32)
                lin, quad = dot_operands(atoms)
                consts = atoms.consts.contiguous()
                for start in range(0, n, chunk):
                    rows = min(chunk, n - start)
                    _diag_chunk(corpus, lin, quad, consts, out, ill, start, rows, eps)
                    top.add(out[:, :rows], start)
                # One host sync per call: any flagged pair sends the whole search down the
                # exact path (never seen on a projected corpus; see C.ILL_CONDITIONED).
                exact = bool(ill.item() > 0)
                if exact:
                    top = C.StreamingTopK(bsz, k, dev)
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
            prep = C.affine_prep(transform, ln_weight, ln_bias, queries, torch.float32)
            for start in range(0, n, chunk):
                rows = min(chunk, n - start)
                affine_launch(corpus, None, prep, out, rows, start, eps)
                top.add(out[:, :rows], start)
    return top.result()
