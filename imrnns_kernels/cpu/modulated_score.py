"""Candidate scoring on the CPU: gather, batched BLAS, O(1) epilogue; analytic backward.

Same results as :func:`imrnns_kernels.reference.modulated_score`. Queries are processed in
blocks whose gathered candidates (block x K x m) stay in cache, so each candidate row is
read from memory once; each op of a block (gather, square, batched GEMMs) runs on torch's
intra-op threads, and one epilogue over the whole (B, K) table of moments follows.

Why intra-op threads here and Python worker threads (``run_workers``) in exhaustive search: a
rerank block is four large ops, so four barriers per block; and the query-side ops before it
(HyperNet, feedback gather-mean, atoms) use the intra-op threads too, which libgomp keeps
spinning for a while after each region. Worker threads started right after them found the
second core taken: B=256, K=100, m=256 took 9.4-10.2 ms on worker threads against 6.8-6.9 ms
on intra-op threads (2-core EPYC, quiet, side by side).

- ``diagonal``: the algebra of :mod:`imrnns_kernels.ops._scoring_common`: one batched GEMM of
  the gathered candidates by 6 atoms per query, one of their squares by 2, then the epilogue.
  It never materialises ``LN(d * s + b)``.
- ``affine``: ``Y' = D W'^T + b'`` by a batched GEMM (with W', b' centred), the moments by
  two thin batched GEMMs, then the same epilogue.

Training: :class:`ModulatedScoreCPU` has an analytic backward giving gradients to the
transform, the queries, the LayerNorm weight and bias, and the corpus (scattered into an
(N, m) gradient with ``index_add_``; duplicate ids accumulate). It computes in float64 when
the transform is float64, which is how ``torch.autograd.gradcheck`` checks it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from imrnns_kernels.ops import _scoring_common as C

# Gathered candidates per query block, in elements: 2^19 fp32 = 2 MB (plus the squares),
# which keeps a block in L2 (2 MB per core on the EPYC CI machines) / L3 between the gather,
# the square and the GEMMs (2^21: 8.0-8.8 ms, 2^18: 7.3 ms, 2^19: 6.8 ms for B=256, K=100).
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
    dtype = C.compute_dtype(transform)
    bsz, kk = ids.shape
    m = corpus.shape[1]
    block = max(1, min(bsz, BLOCK_ELEMENTS // max(kk * m, 1)))
    flat_ids = ids.reshape(-1).long()
    offsets = torch.arange(block * kk)
    if modulation == "diagonal":
        atoms = C.diagonal_atoms(transform, ln_weight, ln_bias, queries, dtype, queries_first=True)
        lin_t, quad_t = atoms.lin, atoms.quad  # (B, 6, m), (B, 2, m)
        consts_all = atoms.consts
    else:
        prep = C.affine_prep(transform, ln_weight, ln_bias, queries, dtype)
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
        # Buffers kept across calls (C.scratch): no page faults per block.
        return {
            "docs": C.scratch("score.docs", (block * kk, m), dtype) if convert else None,
            "work": C.scratch("score.work", (block * kk, m), dtype),  # squares, or y'
            "extra": C.scratch("score.extra", (block, 2, kk), dtype),
        }

    def body(st: dict, i: int) -> None:
        b0 = i * block
        b1 = min(bsz, b0 + block)
        nb = b1 - b0
        rows = nb * kk
        # The gather: embedding_bag with one row per bag is a plain row copy, faster than
        # index_select into a kept buffer (2.8 vs 3.9 ms with the squares, 25,600 random
        # 1 KB rows, 2 EPYC cores); its output is reused by the allocator from block to block
        # (about 50 page faults per call, none per block).
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
    scores, flagged = C.cosine_epilogue_flagged_(*moments.unbind(1), consts_all, eps, ill=ill)
    if flagged:
        # Rows sharing a large common offset: redo those pairs two-pass (never on projected
        # corpora in practice, see C.ILL_CONDITIONED).
        C.rescore_flagged_(
            scores,
            ill,
            lambda q, k: corpus[ids[q, k].long()].to(dtype),
            transform.to(dtype),
            ln_weight,
            ln_bias,
            C.normalized_queries(queries, dtype),
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
    dtype = C.compute_dtype(transform)
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
    dden = dnorm.clamp_min(C.NORMALIZE_EPS)
    dh = dt / dden
    q = queries.to(dtype)
    qnorm = torch.linalg.vector_norm(q, dim=-1, keepdim=True)
    qh = q / qnorm.clamp_min(C.NORMALIZE_EPS)
    score = torch.einsum("bm,bkm->bk", qh, dh)
    gr = grad.to(dtype)
    dqh = torch.einsum("bk,bkm->bm", gr, dh)
    # Below the eps the denominator is the constant eps: the gradient is a plain scaling.
    radial = torch.where(dnorm >= C.NORMALIZE_EPS, (gr * score)[..., None], 0.0)
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
    qproj = torch.where(qnorm >= C.NORMALIZE_EPS, (qh * dqh).sum(-1, keepdim=True), 0.0)
    d_q = (dqh - qh * qproj) / qnorm.clamp_min(C.NORMALIZE_EPS)
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


# score[b, k] = <normalize(q_b), normalize(LN(T_b(corpus[ids[b, k]])))>, (B, K). Forward:
# _forward (chunked BLAS); backward: score_backward, gradients to corpus, transform,
# ln_weight, ln_bias and queries (none to ids).
ModulatedScoreCPU = C.score_function("ModulatedScoreCPU", _forward, score_backward)


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
    if torch.is_grad_enabled() and any(
        t.requires_grad for t in (corpus, transform, ln_weight, ln_bias, queries)
    ):
        scores = ModulatedScoreCPU.apply(
            corpus, ids, transform, ln_weight, ln_bias, queries, modulation, eps
        )
    else:
        scores = _forward(corpus, ids, transform, ln_weight, ln_bias, queries, modulation, eps)
    return scores.float()


modulated_score.supports_autograd = True  # type: ignore[attr-defined]
