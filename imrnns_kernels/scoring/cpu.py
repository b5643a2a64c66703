"""Candidate scoring and exhaustive top-k on the CPU: chunked BLAS, an O(1) epilogue per
score, and a streaming deterministic top-k. No triton import.

Same results as :mod:`imrnns_kernels.scoring.reference`; the algebra (six moments per
(document, query) pair, then a cosine epilogue) is :mod:`imrnns_kernels.scoring.moments`.

Candidate scoring (:func:`modulated_score`)
-------------------------------------------
Queries are processed in blocks whose gathered candidates (block x K x m) stay in cache, so
each candidate row is read from memory once; each op of a block (gather, square, batched
GEMMs) runs on torch's intra-op threads, and one epilogue over the whole (B, K) table of
moments follows.

Why intra-op threads here and Python worker threads (``run_workers``) in exhaustive search: a
rerank block is four large ops, so four barriers per block; and the query-side ops before it
(HyperNet, feedback gather-mean, atoms) use the intra-op threads too, which libgomp keeps
spinning for a while after each region, so worker threads started right after them found
the second core taken and ran slower (benchmarks/RESULTS.md, "Fused ops").

- ``diagonal``: one batched GEMM of the gathered candidates by 6 atoms per query, one of their
  squares by 2, then the epilogue. It never materialises ``LN(d * s + b)``.
- ``affine``: ``Y' = D W'^T + b'`` by a batched GEMM (with W', b' centred), the moments by
  two thin batched GEMMs, then the same epilogue.

Training: :class:`ModulatedScoreCPU` has an analytic backward giving gradients to the
transform, the queries, the LayerNorm weight and bias, and the corpus (scattered into an
(N, m) gradient with ``index_add_``; duplicate ids accumulate). It computes in float64 when
the transform is float64, which is how ``torch.autograd.gradcheck`` checks it.

Exhaustive top-k (:func:`modulated_topk`)
-----------------------------------------
Same results as the reference (ties by lower id, ``-inf`` / ``-1`` padding when k > N)
without its (B, N, m) modulated corpus or (B, N) score matrix: the corpus is read in row
chunks, each chunk is scored for a block of queries, and a running top-k keeps (B, k)
results.

Memory: ``workspace_bytes`` bounds the call's *total* extra memory, all worker threads
together: per-worker chunk buffers (moments, squares or ``y``, converted-dtype rows), the
per-worker running top-k with its merge transients, the query-side tensors of one query block
(the affine ``W'`` is (block, m, m)), the final cross-worker merge and the outputs.
:func:`plan_workspace` turns a budget into (workers, rows per chunk): each worker gets at
least ``min(MIN_CHUNK, N)`` rows, workers are dropped until that fits, and a budget too small
for one worker raises ``ValueError`` naming the minimum. ``None`` keeps the default: about
:data:`WORKSPACE_FRACTION` of the corpus bytes per call, split among the workers, each
clamped to [1 MB, :data:`MAX_WORKSPACE_BYTES`].

Results do not depend on the plan: every chunk GEMM has the same number of rows (the last
chunk is read as the corpus's final ``chunk`` rows and only its new columns are kept), the
query block is fixed, and the merges order by (score desc, id asc), a total order.

- ``diagonal``: per block of ``GEMM_BLOCK`` rows, one GEMM of the rows by the (m x 6B) atoms
  and one of their squares by the (m x 2B) ones; per chunk, an O(1)-per-score epilogue: 8m
  multiply-adds per (document, query).
- ``affine``: per chunk and query, ``Y' = D W'^T + b'`` (a GEMM, m^2 per document: the
  quadratic forms of LayerNorm cannot be factored below that), then the moments by two thin
  GEMMs and the same epilogue.

Chunks are shared dynamically among worker threads, each with its own buffers and running
top-k, merged at the end (deterministic: the merge order is total). Each chunk's top-k is a
compare against the running k-th score and a ``nonzero``; only the first chunks pay a
``torch.topk``.
"""

from __future__ import annotations

import itertools
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from imrnns_kernels._runtime import (
    NORMALIZE_EPS,
    compute_dtype,
    needs_grad,
    one_intra_op_thread,
    run_workers,
    scratch,
)
from imrnns_kernels.scoring.moments import (
    NUM_CONSTS,
    affine_prep,
    cosine_epilogue_flagged_,
    diagonal_atoms,
    normalized_queries,
    rescore_flagged_,
)
from imrnns_kernels.topk import TOPK_SLOT_BYTES, StreamingTopK, merge_topk

# --------------------------------------------------------------------------- candidate scoring

# Gathered candidates per query block, in elements: 2^19 fp32 = 2 MB (plus the squares),
# which keeps a block in L2 (2 MB per core on the EPYC CI machines) / L3 between the gather,
# the square and the GEMMs; the fastest of the sizes timed (benchmarks/RESULTS.md).
BLOCK_ELEMENTS = 1 << 19


def _forward(
    corpus: torch.Tensor,
    ids: torch.Tensor,
    transform: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    queries: torch.Tensor,
    modulation: str,
    eps: float,
) -> torch.Tensor:
    dtype = compute_dtype(transform.dtype)
    bsz, kk = ids.shape
    m = corpus.shape[1]
    block = max(1, min(bsz, BLOCK_ELEMENTS // max(kk * m, 1)))
    flat_ids = ids.reshape(-1).long()
    offsets = torch.arange(block * kk)
    if modulation == "diagonal":
        atoms = diagonal_atoms(transform, ln_weight, ln_bias, queries, dtype, queries_first=True)
        lin_t, quad_t = atoms.lin, atoms.quad  # (B, 6, m), (B, 2, m)
        consts_all = atoms.consts
    else:
        prep = affine_prep(transform, ln_weight, ln_bias, queries, dtype)
        ones = torch.full((bsz, 1, m), 1.0 / m, dtype=dtype)
        lin_t = torch.cat([ones, prep.vecs], dim=1)  # (B, 4, m): mu, P, Gy, Vy
        quad_t = torch.cat([ones, prep.vecs[:, 1:2]], dim=1)  # (B, 2, m): E2, Gy2
        # y' = D W'^T + b' per query: the batched operand is W'^T so y' comes out (K, m).
        w_t = prep.weight.transpose(1, 2)
        consts_all = prep.consts

    # Moments of every candidate, (B, 6, K): the blocks fill it, and one epilogue over the
    # whole table follows (22 small ops once, rather than once per block).
    moments = torch.empty(bsz, 6, kk, dtype=dtype)

    convert = corpus.dtype != dtype

    def make_state() -> dict:
        # Buffers kept across calls (_runtime.scratch): no page faults per block.
        return {
            "docs": scratch("score.docs", (block * kk, m), dtype) if convert else None,
            "work": scratch("score.work", (block * kk, m), dtype),  # squares, or y'
            "extra": scratch("score.extra", (block, 2, kk), dtype),
        }

    def body(st: dict, i: int) -> None:
        b0 = i * block
        b1 = min(bsz, b0 + block)
        nb = b1 - b0
        rows = nb * kk
        # The gather: embedding_bag with one row per bag is a plain row copy, faster than
        # index_select into a kept buffer (benchmarks/RESULTS.md); its output is reused by
        # the allocator from block to block (no page faults per block).
        docs = F.embedding_bag(flat_ids[b0 * kk : b1 * kk], corpus, offsets[:rows], mode="sum")
        if convert:
            docs = st["docs"][:rows].copy_(docs)
        docs = docs.view(nb, kk, m)
        mom = moments[b0:b1]
        ext = st["extra"][:nb]
        work = st["work"][:rows].view(nb, kk, m)
        if modulation == "diagonal":
            sq = torch.mul(docs, docs, out=work)
            torch.bmm(lin_t[b0:b1], docs.transpose(1, 2), out=mom)
            torch.bmm(quad_t[b0:b1], sq.transpose(1, 2), out=ext)
            mom[:, 4:].add_(ext)
        else:
            y = torch.baddbmm(prep.bias[b0:b1, None, :], docs, w_t[b0:b1], out=work)
            mom[:, :4] = torch.bmm(lin_t[b0:b1], y.transpose(1, 2))
            torch.bmm(quad_t[b0:b1], y.mul_(y).transpose(1, 2), out=ext)
            mom[:, 4:] = ext

    state = make_state()
    for i in range(-(-bsz // block)):
        body(state, i)
    ill = torch.empty(bsz, kk, dtype=torch.bool)
    scores, flagged = cosine_epilogue_flagged_(*moments.unbind(1), consts_all, eps, ill=ill)
    if flagged:
        # Rows sharing a large common offset: redo those pairs two-pass (never on projected
        # corpora in practice, see ILL_CONDITIONED).
        rescore_flagged_(
            scores,
            ill,
            lambda q, k: corpus[ids[q, k].long()].to(dtype),
            transform.to(dtype),
            ln_weight,
            ln_bias,
            normalized_queries(queries, dtype),
            modulation,
            eps,
            block * kk,
        )
    return scores


def score_backward(
    grad: torch.Tensor,
    corpus: torch.Tensor,
    ids: torch.Tensor,
    transform: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    queries: torch.Tensor,
    modulation: str,
    eps: float,
    need_corpus: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``sum(grad * score)`` (PyTorch, vectorised over (B, K, m)).

    With d~ = z g + beta, z = (y - mu) r, d^ = d~ / max(||d~||, 1e-12), score = <q^, d^>::

        dq^  = sum_k G d^                    dd~ = G (q^ - d^ score) / ||d~||
        dg   = sum dd~ z    dbeta = sum dd~  dz  = dd~ g
        dy   = r (dz - mean(dz) - z mean(dz z))
        diagonal: ds = sum_k dy d, db = sum_k dy, dd = dy s
        affine:   dW = sum_k dy d^T, db = sum_k dy, dd = W^T dy
        dq   = (dq^ - q^ <q^, dq^>) / ||q||    (F.normalize; dq^ / 1e-12 below the eps)

    Returns (d corpus or None, d transform, d ln_weight, d ln_bias, d queries), each in its
    input's dtype.
    """
    dtype = compute_dtype(transform.dtype)
    bsz, kk = ids.shape
    m = corpus.shape[1]
    g, beta = ln_weight.to(dtype), ln_bias.to(dtype)
    t = transform.to(dtype)
    d = corpus.index_select(0, ids.reshape(-1).long()).view(bsz, kk, m).to(dtype)
    if modulation == "diagonal":
        s, b = t[:, None, :m], t[:, None, m:]
        y = d * s + b
    else:
        w = t[:, : m * m].view(bsz, m, m)
        y = torch.baddbmm(t[:, None, m * m :], d, w.transpose(1, 2))
    mu = y.mean(dim=-1, keepdim=True)
    yc = y - mu
    r = torch.rsqrt((yc * yc).mean(dim=-1, keepdim=True) + eps)
    z = yc * r
    dt = z * g + beta
    dnorm = torch.linalg.vector_norm(dt, dim=-1, keepdim=True)
    dden = dnorm.clamp_min(NORMALIZE_EPS)
    dh = dt / dden
    q = queries.to(dtype)
    qnorm = torch.linalg.vector_norm(q, dim=-1, keepdim=True)
    qh = q / qnorm.clamp_min(NORMALIZE_EPS)
    score = torch.einsum("bm,bkm->bk", qh, dh)
    gr = grad.to(dtype)
    dqh = torch.einsum("bk,bkm->bm", gr, dh)
    # Below the eps the denominator is the constant eps: the gradient is a plain scaling.
    radial = torch.where(dnorm >= NORMALIZE_EPS, (gr * score)[..., None], 0.0)
    ddt = (gr[..., None] * qh[:, None, :] - dh * radial) / dden
    d_g = (ddt * z).sum(dim=(0, 1))
    d_beta = ddt.sum(dim=(0, 1))
    dz = ddt * g
    dy = r * (dz - dz.mean(dim=-1, keepdim=True) - z * (dz * z).mean(dim=-1, keepdim=True))
    if modulation == "diagonal":
        d_t = torch.cat([(dy * d).sum(dim=1), dy.sum(dim=1)], dim=1)
        dd = dy * s if need_corpus else None
    else:
        d_w = torch.bmm(dy.transpose(1, 2), d).reshape(bsz, m * m)
        d_t = torch.cat([d_w, dy.sum(dim=1)], dim=1)
        dd = torch.bmm(dy, w) if need_corpus else None
    qproj = torch.where(qnorm >= NORMALIZE_EPS, (qh * dqh).sum(-1, keepdim=True), 0.0)
    d_q = (dqh - qh * qproj) / qnorm.clamp_min(NORMALIZE_EPS)
    d_corpus = None
    if dd is not None:
        d_corpus = torch.zeros(corpus.shape, dtype=dtype, device=corpus.device)
        d_corpus.index_add_(0, ids.reshape(-1).long(), dd.reshape(-1, m))
        d_corpus = d_corpus.to(corpus.dtype)
    return (
        d_corpus,
        d_t.to(transform.dtype),
        d_g.to(ln_weight.dtype),
        d_beta.to(ln_bias.dtype),
        d_q.to(queries.dtype),
    )


class ModulatedScoreCPU(torch.autograd.Function):
    """``score[b, k] = <normalize(q_b), normalize(LN(T_b(corpus[ids[b, k]])))>``, (B, K).

    Forward: the chunked BLAS scoring above, in the compute dtype (float64 for a float64
    transform). Backward: :func:`score_backward`, gradients to corpus, transform, ln_weight,
    ln_bias and queries (none to ids, modulation or eps). Saves only the inputs.
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
        return _forward(corpus, ids, transform, ln_weight, ln_bias, queries, modulation, eps)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        corpus, ids, transform, ln_weight, ln_bias, queries = ctx.saved_tensors
        d_corpus, d_t, d_g, d_beta, d_q = score_backward(
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
    """(B, K) float32 modulated cosines of each query's candidates (reference signature).

    Differentiable with respect to every float input (see :class:`ModulatedScoreCPU`, which
    returns the compute dtype: float64 under gradcheck).
    """
    if needs_grad(corpus, transform, ln_weight, ln_bias, queries):
        scores = ModulatedScoreCPU.apply(
            corpus, ids, transform, ln_weight, ln_bias, queries, modulation, eps
        )
    else:
        scores = _forward(corpus, ids, transform, ln_weight, ln_bias, queries, modulation, eps)
    return scores.float()


modulated_score.supports_autograd = True  # type: ignore[attr-defined]
modulated_score.backward = score_backward  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- exhaustive top-k

# Default budget (workspace_bytes=None): a fraction of the corpus bytes per call, shared by
# the workers, each worker's share clamped to [1 MB, MAX_WORKSPACE_BYTES].
WORKSPACE_FRACTION = 0.15
MAX_WORKSPACE_BYTES = 48 << 20
# Rows per chunk (one epilogue and one top-k update each), at most MAX_CHUNK.
# - diagonal: the GEMMs go GEMM_BLOCK rows at a time (a block of 1024 rows, 1 MB at m=256 in
#   fp32, and its squares stay in one core's L2 between the two GEMMs), so a chunk can be
#   long: its size only sets how often the ~25 epilogue and top-k ops run. Capped so the
#   (6, query block, chunk) moments take at most DIAGONAL_MOMENT_BYTES: past a few thousand
#   rows longer chunks gain little (benchmarks/RESULTS.md).
# - affine: AFFINE_MAX_CHUNK, the size that keeps a chunk and its y in L2 + L3.
MIN_CHUNK = 256
MAX_CHUNK = 32768
AFFINE_MAX_CHUNK = 4096
DIAGONAL_MOMENT_BYTES = 6 << 20
GEMM_BLOCK = 1024
# Queries scored together per pass over the corpus: more columns make the GEMM more
# efficient but the (6 * block, chunk) moment buffer larger. Not reduced for small budgets:
# a GEMM's rounding may depend on its shape, and results must not depend on the budget.
QUERY_BLOCK = 64
# Search at m up to this computes in float64 (see modulated_topk).
FP64_MAX_M = 32
# Pairs the epilogue flags as ill-conditioned (rows sharing a large common offset; never on a
# projected corpus in practice) are recomputed two-pass in pieces of chunk / this many pairs.
RESCORE_PIECE_DIV = 16
# What the allocator and the runtime add on top of the tensors counted below (peak RSS above
# them, benchmarks/RESULTS.md): glibc's dynamic mmap threshold keeps freed chunk-sized
# transients on the heap. Allowed: per worker, a share of its chunk buffers and a fixed part
# (thread stack, arena, BLAS thread buffers).
ALLOCATOR_SLACK = 0.25
THREAD_BYTES = 1 << 20


class WorkspacePlan(NamedTuple):
    """How one call spends its working memory.

    ``query_block``: queries scored per pass over the corpus; ``workers``: worker threads;
    ``chunk``: corpus rows per chunk (and per GEMM); ``num_chunks``: chunks per pass;
    ``bytes``: the plan's bound on the call's extra memory (the sum of its parts).
    """

    query_block: int
    workers: int
    chunk: int
    num_chunks: int
    bytes: int


def _max_chunk(qb: int, modulation: str, item: int) -> int:
    """The largest chunk worth taking (see MAX_CHUNK's comment)."""
    if modulation != "diagonal":
        return min(MAX_CHUNK, AFFINE_MAX_CHUNK)
    rows = DIAGONAL_MOMENT_BYTES // (6 * qb * item)
    if rows >= GEMM_BLOCK:
        rows -= rows % GEMM_BLOCK
    return max(MIN_CHUNK, min(MAX_CHUNK, rows))


def _block_bytes(m: int, modulation: str, item: int, convert: bool) -> int:
    """Bytes per row of a worker's GEMM-block buffers (the diagonal form's squares and
    converted rows)."""
    if modulation != "diagonal":
        return 0
    return (2 if convert else 1) * m * item


def _row_bytes(qb: int, m: int, modulation: str, item: int, convert: bool) -> int:
    """Bytes one corpus row of a chunk costs one worker (buffers and per-chunk transients)."""
    rows = 6 * qb  # (6, qb, chunk) moments
    if modulation != "diagonal":
        # Converted rows, y, and the (chunk, 4) + (chunk, 2) moment columns of one query.
        rows += (m if convert else 0) + m + 6
    rows += qb  # the epilogue's mu^2
    # Ill-conditioning flags: a bool mask and two comparison temporaries (and a bool one);
    # flagged pairs are recomputed RESCORE_PIECE_DIV-th of a chunk at a time, each pair
    # holding about 5 m-vectors (its row, y, the centred y, z, d~).
    extra = 2 * qb * item + 2 * qb + (5 * m * item) // RESCORE_PIECE_DIV
    # Bool masks of the top-k update, and the stable re-sort of tied rows (a copy, values
    # and int64 indices): only with duplicate documents, but a bound must cover it.
    return item * rows + 2 * qb + qb * (2 * item + 8) + extra


def _query_bytes(qb: int, m: int, modulation: str, item: int) -> int:
    """Peak bytes of one query block's query-side tensors (atoms / W', their temporaries)."""
    # diagonal_atoms holds about 16 (qb, m) tensors at its peak (the stacked list and the
    # stack); affine_prep adds the centred (qb, m, m) W'.
    qside = 16 * qb * m * item
    if modulation == "affine":
        qside += qb * m * m * item
    return qside + 2 * qb * NUM_CONSTS * item


def _total(
    workers: int, chunk: int, row: int, qb: int, k: int, base: int, block_row: int = 0
) -> int:
    """The bound of a plan: base + the larger of the scan phase and the final merge."""
    slots = qb * k
    rows = chunk * row + min(GEMM_BLOCK + 12, chunk) * block_row  # + the longest block
    scan = workers * (int(rows * (1 + ALLOCATOR_SLACK)) + TOPK_SLOT_BYTES * slots)
    scan += workers * THREAD_BYTES
    # After the scan the chunk buffers are freed; the workers' states (12 B per slot) are
    # concatenated and sorted twice (ids and permutation, scores and order, gathers).
    merge = workers * slots * (12 + 52) + 12 * slots
    return base + max(scan, merge)


def plan_workspace(
    n: int,
    m: int,
    batch: int,
    k: int,
    modulation: str,
    corpus_dtype: torch.dtype,
    dtype: torch.dtype = torch.float32,
    workspace_bytes: int | None = None,
    threads: int | None = None,
) -> WorkspacePlan:
    """(query block, workers, chunk rows) for a search of ``batch`` queries over (n, m) rows.

    ``workspace_bytes`` is the bound on the call's total extra memory (all workers); None is
    the default budget (module docstring). ``threads`` defaults to ``torch.get_num_threads()``.

    Raises:
        ValueError: ``workspace_bytes`` cannot hold one worker with ``min(MIN_CHUNK, n)`` rows;
            the message names the budget and the minimum for this call.
    """
    item = torch.finfo(dtype).bits // 8
    convert = corpus_dtype != dtype
    qb = max(1, min(QUERY_BLOCK, batch))
    row = _row_bytes(qb, m, modulation, item, convert)
    block_row = _block_bytes(m, modulation, item, convert)
    base = _query_bytes(qb, m, modulation, item) + 2 * batch * k * 12  # + outputs (and cat)
    threads = max(1, torch.get_num_threads() if threads is None else threads)
    min_chunk = max(1, min(MIN_CHUNK, n))
    max_chunk = _max_chunk(qb, modulation, item)
    if workspace_bytes is None:
        # The default: a share of the corpus per worker, clamped (the historical rule).
        workers = threads
        share = n * m * torch.empty(0, dtype=corpus_dtype).element_size()
        share = share * WORKSPACE_FRACTION / workers
        per_worker = min(MAX_WORKSPACE_BYTES, max(int(share), 1 << 20))
        widths = (2 if convert else 1) if modulation == "diagonal" else (3 if convert else 2)
        old_row = item * (m * widths + 8 * qb)
        chunk = int(max(MIN_CHUNK, min(max_chunk, per_worker // max(old_row, 1), n)))
        chunk = min(chunk, n)
    else:
        workers = max(1, min(threads, -(-n // min_chunk)))

        def total(w: int, c: int) -> int:
            return _total(w, c, row, qb, k, base, block_row)

        while workers > 1 and total(workers, min_chunk) > workspace_bytes:
            workers -= 1
        need = total(1, min_chunk)
        if need > workspace_bytes:
            raise ValueError(
                f"workspace_bytes={workspace_bytes} is too small for this search: it needs at "
                f"least {need} bytes ({need / 2**20:.2f} MiB) for {batch} queries in blocks of "
                f"{qb}, m={m}, k={k}, {modulation} modulation, one worker with {min_chunk} rows "
                "per chunk"
            )
        scan = (workspace_bytes - base) // workers - TOPK_SLOT_BYTES * qb * k - THREAD_BYTES
        chunk = int(scan / (1 + ALLOCATOR_SLACK) - (GEMM_BLOCK + 12) * block_row) // row
        # Spread the rows over the workers (a chunk each at least) and keep the size cap.
        chunk = max(min_chunk, min(chunk, max_chunk, -(-n // workers)))
    chunk = max(1, min(chunk, n))
    num_chunks = -(-n // chunk)
    workers = max(1, min(workers, num_chunks))
    total_bytes = _total(workers, chunk, row, qb, k, base, block_row)
    return WorkspacePlan(qb, workers, chunk, num_chunks, total_bytes)


def _merged(states: list[dict], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    tops = [st["top"] for st in states]
    # Free the chunk buffers before the merge allocates: the plan counts the two apart.
    states.clear()
    if len(tops) == 1:
        return tops[0].result()
    return merge_topk(
        torch.cat([t.scores for t in tops], dim=1), torch.cat([t.ids for t in tops], dim=1), k
    )


def _gemm_blocks(chunk: int) -> list[tuple[int, int]]:
    """Row ranges of a chunk's GEMMs: GEMM_BLOCK rows each, a short tail (< 12 rows, which
    MKL would round differently) merged into the block before it."""
    bounds = [*range(0, chunk, GEMM_BLOCK), chunk]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < 12:
        del bounds[-2]
    return list(itertools.pairwise(bounds))


def _chunk_rows(n: int, chunk: int, i: int) -> tuple[int, int]:
    """(first row read, columns to skip) of chunk ``i``.

    The last chunk is read as the corpus's final ``chunk`` rows, overlapping the one before,
    and its first columns (already scored) are skipped: every GEMM then has ``chunk`` rows.
    MKL rounds a GEMM of fewer than 12 rows differently from the same rows inside a larger
    product (benchmarks/RESULTS.md), so a short tail would make the scores depend on the
    chunk size, i.e. on the budget.
    """
    start = i * chunk
    lo = min(start, n - chunk)
    return lo, start - lo


def _diagonal(
    corpus: torch.Tensor,
    transform: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    eps: float,
    dtype: torch.dtype,
    plan: WorkspacePlan,
) -> tuple[torch.Tensor, torch.Tensor]:
    n, m = corpus.shape
    bsz = queries.shape[0]
    atoms = diagonal_atoms(transform, ln_weight, ln_bias, queries, dtype)
    lin = atoms.lin.reshape(6 * bsz, m)
    quad = atoms.quad.reshape(2 * bsz, m)
    convert = corpus.dtype != dtype
    chunk = plan.chunk
    q_hat = normalized_queries(queries, dtype)
    blocks = _gemm_blocks(chunk)
    longest = max(r1 - r0 for r0, r1 in blocks)

    def make_state() -> dict:
        return {
            "moments": torch.empty(6, bsz, chunk, dtype=dtype),
            "squares": torch.empty(longest, m, dtype=dtype),
            "converted": torch.empty(longest, m, dtype=dtype) if convert else None,
            "ill": torch.empty(bsz, chunk, dtype=torch.bool),
            "top": StreamingTopK(bsz, k, corpus.device),
        }

    def body(st: dict, i: int) -> None:
        lo, skip = _chunk_rows(n, chunk, i)
        d = corpus[lo : lo + chunk]
        out = st["moments"]
        flat = out.view(6 * bsz, chunk)
        sq = st["squares"]
        # Both GEMMs and the squares go GEMM_BLOCK rows at a time, so the block's rows (fp16
        # or bf16 storage: converted here, block by block) and squares are still in the
        # core's L2 when the second GEMM reads them. Each column's result does not depend on
        # the split (every block has >= 12 rows, see _chunk_rows).
        for r0, r1 in blocks:
            rows = d[r0:r1]
            if convert:
                rows = st["converted"][: r1 - r0].copy_(rows)
            torch.mm(lin, rows.t(), out=flat[:, r0:r1])
            rsq = torch.mul(rows, rows, out=sq[: r1 - r0])
            flat[4 * bsz :, r0:r1].addmm_(quad, rsq.t())
        # (atoms x docs) layout: each moment is a contiguous (B, rows) slab, so the epilogue
        # and the top-k run on contiguous rows (the (docs x atoms) product was no faster
        # end to end: its strided epilogue and top-k cost more than the GEMM saved).
        _finish_chunk(
            st, atoms.consts, d, lo, skip, transform, ln_weight, ln_bias, q_hat, "diagonal", eps
        )

    return _merged(run_workers(plan.num_chunks, make_state, body, plan.workers), k)


def _finish_chunk(
    st: dict,
    consts: torch.Tensor,
    d: torch.Tensor,
    lo: int,
    skip: int,
    transform: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    q_hat: torch.Tensor,
    modulation: str,
    eps: float,
) -> None:
    """The tail shared by both forms: the chunk's moments (``st["moments"]``) to scores,
    flagged (ill-conditioned) pairs recomputed two-pass in bounded pieces, and the new
    columns (``skip`` onwards, rows from ``lo``) merged into the worker's running top-k."""
    scores, flagged = cosine_epilogue_flagged_(*st["moments"].unbind(0), consts, eps, ill=st["ill"])
    if flagged:
        dtype = q_hat.dtype
        rescore_flagged_(
            scores,
            st["ill"],
            lambda _q, c: d[c].to(dtype),
            transform.to(dtype),
            ln_weight,
            ln_bias,
            q_hat,
            modulation,
            eps,
            max(1, d.shape[0] // RESCORE_PIECE_DIV),
        )
    st["top"].add(scores[:, skip:], lo + skip)


def _affine(
    corpus: torch.Tensor,
    transform: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    eps: float,
    dtype: torch.dtype,
    plan: WorkspacePlan,
) -> tuple[torch.Tensor, torch.Tensor]:
    n, m = corpus.shape
    bsz = queries.shape[0]
    prep = affine_prep(transform, ln_weight, ln_bias, queries, dtype)
    wt = prep.weight.transpose(1, 2)  # (B, m_in, m_out): y'^T = d^T W'^T
    # Moment columns: y' @ [1/m, q^g, g^2, g beta] and y'^2 @ [1/m, g^2].
    ones = torch.full((bsz, m, 1), 1.0 / m, dtype=dtype)
    lin_vecs = torch.cat([ones, prep.vecs.transpose(1, 2)], dim=2).contiguous()  # (B, m, 4)
    sq_vecs = torch.cat([ones, prep.vecs[:, 1:2].transpose(1, 2)], dim=2).contiguous()  # (B,m,2)
    convert = corpus.dtype != dtype
    chunk = plan.chunk
    q_hat = normalized_queries(queries, dtype)

    def make_state() -> dict:
        return {
            "y": torch.empty(chunk, m, dtype=dtype),
            "moments": torch.empty(6, bsz, chunk, dtype=dtype),
            "converted": torch.empty(chunk, m, dtype=dtype) if convert else None,
            "ill": torch.empty(bsz, chunk, dtype=torch.bool),
            "top": StreamingTopK(bsz, k, corpus.device),
        }

    def body(st: dict, i: int) -> None:
        lo, skip = _chunk_rows(n, chunk, i)
        d = corpus[lo : lo + chunk]
        if st["converted"] is not None:
            d = st["converted"].copy_(d)
        out = st["moments"]
        y = st["y"]
        for b in range(bsz):
            torch.addmm(prep.bias[b], d, wt[b], out=y)
            lin = y @ lin_vecs[b]  # (rows, 4): mu, P, Gy, Vy
            sq = y.mul_(y) @ sq_vecs[b]  # (rows, 2): E2, Gy2
            out[0:4, b].copy_(lin.t())
            out[4:6, b].copy_(sq.t())
        _finish_chunk(
            st, prep.consts, d, lo, skip, transform, ln_weight, ln_bias, q_hat, "affine", eps
        )

    return _merged(run_workers(plan.num_chunks, make_state, body, plan.workers), k)


def modulated_topk(
    corpus: torch.Tensor,
    transform: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    modulation: str = "diagonal",
    eps: float = 1e-5,
    workspace_bytes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exhaustive top-k of the modulated cosine; the reference's signature and results.

    Returns ((B, k) float32 scores, (B, k) int64 ids), best first, ties by lower id, padded
    with ``-inf`` / ``-1`` when k > N. Inputs of any strides are accepted (chunks are read
    through views). Not differentiable: exhaustive search is an inference operation.
    Parallel over corpus chunks on up to ``torch.get_num_threads()`` worker threads
    (:func:`imrnns_kernels._runtime.run_workers`).

    ``workspace_bytes``: bound on the call's total extra memory, all workers together (see
    :func:`plan_workspace`); None: the default budget. The results do not depend on it.

    Raises:
        ValueError: ``workspace_bytes`` is below this call's minimum (named in the message).
    """
    dtype = compute_dtype(transform.dtype)
    n, m = corpus.shape
    bsz = queries.shape[0]
    if m <= FP64_MAX_M:
        # MKL rounds the rows of a small-m GEMM differently by position (affine m = 5,
        # diagonal m = 12: identical rows scored 1 ulp apart, so duplicates did not come
        # lower id first). In float64 identical rows round to the same float32 score; at
        # such m the GEMMs are cheap either way.
        dtype = torch.float64
    plan = plan_workspace(n, m, bsz, k, modulation, corpus.dtype, dtype, workspace_bytes)
    run = _diagonal if modulation == "diagonal" else _affine
    scores, ids = [], []
    with torch.no_grad(), one_intra_op_thread(plan.workers):
        for q0 in range(0, bsz, plan.query_block):
            q1 = min(bsz, q0 + plan.query_block)
            s, i = run(
                corpus, transform[q0:q1], ln_weight, ln_bias, queries[q0:q1], k, eps, dtype, plan
            )
            scores.append(s)
            ids.append(i)
    if not scores:
        return torch.empty(0, k, dtype=torch.float32), torch.empty(0, k, dtype=torch.int64)
    return torch.cat(scores), torch.cat(ids)
