"""Exhaustive modulated top-k on the CPU: chunked BLAS with a streaming, deterministic top-k.

Same results as :func:`imrnns_kernels.reference.modulated_topk` (ties by lower id, ``-inf`` /
``-1`` padding when k > N) without its (B, N, m) modulated corpus or (B, N) score matrix:
the corpus is read in row chunks, each chunk is scored for a block of queries, and a running
top-k keeps (B, k) results.

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

- ``diagonal``: the algebra of :mod:`imrnns_kernels.ops._scoring_common`: per block of
  ``GEMM_BLOCK`` rows, one GEMM of the rows by the (m x 6B) atoms and one of their squares by
  the (m x 2B) ones; per chunk, an O(1)-per-score epilogue: 8m multiply-adds per (document,
  query).
- ``affine``: per chunk and query, ``Y' = D W'^T + b'`` (a GEMM, m^2 per document: the
  quadratic forms of LayerNorm cannot be factored below that), then the moments by two thin
  GEMMs and the same epilogue.

Chunks are shared dynamically among worker threads, each with its own buffers and running
top-k, merged at the end (deterministic: the merge order is total). Each chunk's top-k is a
compare against the running k-th score and a ``nonzero``; only the first chunks pay a
``torch.topk``.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from typing import NamedTuple

import torch

from imrnns_kernels.ops import _scoring_common as C

# Default budget (workspace_bytes=None): a fraction of the corpus bytes per call, shared by
# the workers, each worker's share clamped to [1 MB, MAX_WORKSPACE_BYTES].
WORKSPACE_FRACTION = 0.15
MAX_WORKSPACE_BYTES = 48 << 20
# Rows per chunk (one epilogue and one top-k update each), at most MAX_CHUNK.
# - diagonal: the GEMMs go GEMM_BLOCK rows at a time (a block of 1024 rows, 1 MB at m=256 in
#   fp32, and its squares stay in one core's L2 between the two GEMMs), so a chunk can be
#   long: its size only sets how often the ~25 epilogue and top-k ops run. Capped so the
#   (6, query block, chunk) moments take at most DIAGONAL_MOMENT_BYTES: N=1e6, m=256, k=100
#   on 2 EPYC cores took 650 / 558 / 575 ms with 4096 / 16384 / 32768-row chunks for 16
#   queries, 1863 / 1802 / 1836 ms with 4096 / 8192 / 16384 rows for 64 queries, and
#   263 / 213 ms with 4096 / 16384 rows for one query.
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
# Peak bytes per (query, top-k slot) of one worker's running top-k: the (B, k) state (12 B)
# plus one merge's transients (survivor lists, the (B, <=3k) concatenation, merge_topk's
# two sorts and gathers: about 240 B), counted from StreamingTopK.add and merge_topk.
TOPK_SLOT_BYTES = 256
# Search at m up to this computes in float64 (see modulated_topk).
FP64_MAX_M = 32
# Pairs the epilogue flags as ill-conditioned (rows sharing a large common offset; never on a
# projected corpus in practice) are recomputed two-pass in pieces of chunk / this many pairs.
RESCORE_PIECE_DIV = 16
# What the allocator and the runtime add on top of the tensors counted below, measured as
# peak RSS (VmHWM) of a first call after a warm-up (N=262144, m=256, B=32, k=100, EPYC
# 2 vCPU, glibc 2.36): 1.8-2.8 MiB above the counted tensors at chunks of 2134-4096 rows,
# about half of it gone with a fixed mmap threshold (glibc's dynamic threshold keeps freed
# chunk-sized transients on the heap). Allowed: per worker, a share of its chunk buffers
# and a fixed part (thread stack, arena, BLAS thread buffers).
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
    return qside + 2 * qb * C.NUM_CONSTS * item


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
    return C.merge_topk(
        torch.cat([t.scores for t in tops], dim=1), torch.cat([t.ids for t in tops], dim=1), k
    )


@contextlib.contextmanager
def _one_intra_op_thread(plan: WorkspacePlan) -> Iterator[None]:
    """Run a one-worker plan on one intra-op thread, as every worker runs.

    ``run_workers`` runs a single worker inline, on torch's intra-op threads; the affine
    path's many small per-query ops then wait on a barrier each: a budget that left one
    worker took 30.8 s against 3.4 s for two workers (N=262144, m=64, B=32, EPYC 2 vCPU).
    Serialised with the workers' lock, as ``run_workers`` changes the thread count.
    """
    if plan.workers > 1 or torch.get_num_threads() == 1 or getattr(C._LOCAL, "in_worker", False):
        yield
        return
    with C._WORKERS_LOCK:
        saved = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(saved)


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
    MKL rounds a GEMM of fewer than 12 rows differently (measured on EPYC, torch 2.13: 1, 3,
    5, 11 rows differ from the same rows inside a larger product; 12 and more agree), so a
    short tail would make the scores depend on the chunk size, i.e. on the budget.
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
    atoms = C.diagonal_atoms(transform, ln_weight, ln_bias, queries, dtype)
    lin = atoms.lin.reshape(6 * bsz, m)
    quad = atoms.quad.reshape(2 * bsz, m)
    convert = corpus.dtype != dtype
    chunk = plan.chunk
    q_hat = C.normalized_queries(queries, dtype)
    blocks = _gemm_blocks(chunk)
    longest = max(r1 - r0 for r0, r1 in blocks)

    def make_state() -> dict:
        return {
            "moments": torch.empty(6, bsz, chunk, dtype=dtype),
            "squares": torch.empty(longest, m, dtype=dtype),
            "converted": torch.empty(longest, m, dtype=dtype) if convert else None,
            "ill": torch.empty(bsz, chunk, dtype=torch.bool),
            "top": C.StreamingTopK(bsz, k, corpus.device),
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

    return _merged(C.run_workers(plan.num_chunks, make_state, body, plan.workers), k)


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
    scores, flagged = C.cosine_epilogue_flagged_(
        *st["moments"].unbind(0), consts, eps, ill=st["ill"]
    )
    if flagged:
        dtype = q_hat.dtype
        C.rescore_flagged_(
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
    prep = C.affine_prep(transform, ln_weight, ln_bias, queries, dtype)
    wt = prep.weight.transpose(1, 2)  # (B, m_in, m_out): y'^T = d^T W'^T
    # Moment columns: y' @ [1/m, q^g, g^2, g beta] and y'^2 @ [1/m, g^2].
    ones = torch.full((bsz, m, 1), 1.0 / m, dtype=dtype)
    lin_vecs = torch.cat([ones, prep.vecs.transpose(1, 2)], dim=2).contiguous()  # (B, m, 4)
    sq_vecs = torch.cat([ones, prep.vecs[:, 1:2].transpose(1, 2)], dim=2).contiguous()  # (B,m,2)
    convert = corpus.dtype != dtype
    chunk = plan.chunk
    q_hat = C.normalized_queries(queries, dtype)

    def make_state() -> dict:
        return {
            "y": torch.empty(chunk, m, dtype=dtype),
            "moments": torch.empty(6, bsz, chunk, dtype=dtype),
            "converted": torch.empty(chunk, m, dtype=dtype) if convert else None,
            "ill": torch.empty(bsz, chunk, dtype=torch.bool),
            "top": C.StreamingTopK(bsz, k, corpus.device),
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

    return _merged(C.run_workers(plan.num_chunks, make_state, body, plan.workers), k)


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
    (:func:`imrnns_kernels.ops._scoring_common.run_workers`).

    ``workspace_bytes``: bound on the call's total extra memory, all workers together (see
    :func:`plan_workspace`); None: the default budget. The results do not depend on it.

    Raises:
        ValueError: ``workspace_bytes`` is below this call's minimum (named in the message).
    """
    dtype = C.compute_dtype(transform)
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
    with torch.no_grad(), _one_intra_op_thread(plan):
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
