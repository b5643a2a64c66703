"""Shared algebra of the modulated cosine score, and the deterministic streaming top-k.

Plain PyTorch only (no Triton): the CPU implementations in :mod:`imrnns_kernels.cpu` and the
Triton launchers in :mod:`imrnns_kernels.ops` both build their per-query constants here, so
the two paths cannot drift apart.

The score (see :func:`imrnns_kernels.reference.modulated_score`) of a document d for a query
with transform T, LayerNorm (g, beta, eps) and modulated query q is::

    y = T(d),  mu = mean(y),  r = 1 / sqrt(var(y) + eps),  d~ = r (y - mu) * g + beta
    score = <q^, d~> / max(||d~||, 1e-12),   q^ = q / max(||q||, 1e-12)

Everything in it is a function of six *moments* of y, sums over the m features::

    mu  = sum(y) / m            E2  = sum(y^2) / m         P   = sum(q^ g y)
    Gy  = sum(g^2 y)            Gy2 = sum(g^2 y^2)         Vy  = sum(g beta y)

    var   = E2 - mu^2
    <q^, d~> = r (P - mu <q^, g>) + <q^, beta>
    ||d~||^2 = r^2 (Gy2 - 2 mu Gy + mu^2 sum(g^2)) + 2 r (Vy - mu sum(g beta)) + ||beta||^2

LayerNorm is shift-invariant, so y may be replaced by y - c for any constant c; the callers
shift y so that its mean is small, which keeps ``E2 - mu^2`` free of cancellation:

- ``diagonal`` (y = d * s + b): b is centred, ``b' = b - mean(b)``. Then every moment is an
  affine function of the dot products of d with 6 query-dependent vectors and of d*d with 2
  more (:func:`diagonal_atoms`), so exhaustive scoring is a GEMM of the corpus (N x m) by an
  (m x 6B) matrix plus a GEMM of the squared corpus by an (m x 2B) one, and an O(1) epilogue.
  That is 8m multiply-adds per (document, query): fewer are not possible in general, since
  ||d~|| needs two distinct diagonal quadratic forms (weights s^2 and g^2 s^2).
- ``affine`` (y = W d + b): the rows of W and b are centred over the output index,
  ``W' = W - 1 (1^T W) / m``, ``b' = b - mean(b)``, so mean(y') = 0 exactly in real
  arithmetic (:func:`affine_prep`) and the moments are taken of ``y' = W' d + b'``.

Verified against the float64 reference in tests/test_modulated_topk.py: the fp32 algebra
stays within 1e-7 of it on unit-norm inputs.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, NamedTuple, TypeVar

import torch

# F.normalize's default eps, as the official implementation's cosine.
NORMALIZE_EPS = 1e-12

# Column layout of the per-query constants table (B, NUM_CONSTS).
C_CB = 0  # sum(b'^2)/m              (diagonal; 0 for affine, already inside E2)
C_QGB = 1  # <q^ g, b'>               (diagonal; 0 for affine)
C_QG = 2  # <q^, g>
C_QBETA = 3  # <q^, beta>
C_G2B2 = 4  # sum(g^2 b'^2)            (diagonal; 0 for affine)
C_G2B = 5  # sum(g^2 b')              (diagonal; 0 for affine)
C_GBETAB = 6  # sum(g beta b')        (diagonal; 0 for affine)
C_GBETA = 7  # sum(g beta)
C_BETA2 = 8  # ||beta||^2
C_G2 = 9  # sum(g^2)
NUM_CONSTS = 10

# Row layout of the diagonal atoms: lin (6, B, m) is dotted with d, quad (2, B, m) with d*d.
A_MU, A_P, A_GY, A_VY, A_E2, A_GY2 = range(6)


def compute_dtype(transform: torch.Tensor) -> torch.dtype:
    """The dtype every path computes in: float32, or float64 for a float64 transform
    (as the reference, so that gradcheck in float64 runs the real code)."""
    return torch.promote_types(transform.dtype, torch.float32)


def normalized_queries(queries: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q / max(||q||, 1e-12)`` in ``dtype`` (F.normalize's formula)."""
    q = queries.to(dtype)
    return q / torch.linalg.vector_norm(q, dim=1, keepdim=True).clamp_min(NORMALIZE_EPS)


def _consts(
    q_hat: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    b_centered: torch.Tensor | None,
) -> torch.Tensor:
    """(B, NUM_CONSTS) per-query constants; ``b_centered`` None means they are in the moments."""
    bsz, m = q_hat.shape
    c = torch.zeros(bsz, NUM_CONSTS, dtype=q_hat.dtype, device=q_hat.device)
    c[:, C_QG] = q_hat @ g
    c[:, C_QBETA] = q_hat @ beta
    c[:, C_GBETA] = torch.dot(g, beta)
    c[:, C_BETA2] = torch.dot(beta, beta)
    c[:, C_G2] = torch.dot(g, g)
    if b_centered is not None:
        bp, g2 = b_centered, g * g
        c[:, C_CB] = (bp * bp).sum(1) / m
        c[:, C_QGB] = (q_hat * g * bp).sum(1)
        c[:, C_G2B2] = (bp * bp) @ g2
        c[:, C_G2B] = bp @ g2
        c[:, C_GBETAB] = bp @ (g * beta)
    return c


class DiagonalAtoms(NamedTuple):
    """Query-side vectors of the diagonal algebra (see the module docstring).

    ``lin`` (6, B, m): dotted with d, rows [mu, P, Gy, Vy, E2, Gy2] (A_* order);
    ``quad`` (2, B, m): dotted with d*d, added to the E2 and Gy2 rows;
    ``consts`` (B, NUM_CONSTS).
    """

    lin: torch.Tensor
    quad: torch.Tensor
    consts: torch.Tensor


def diagonal_atoms(
    transform: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    queries: torch.Tensor,
    dtype: torch.dtype,
    queries_first: bool = False,
) -> DiagonalAtoms:
    """Atoms for ``y = d * s + b``: 6 vectors dotted with d, 2 with d*d, per query.

    ``queries_first`` lays ``lin`` / ``quad`` out as (B, 6, m) / (B, 2, m) instead of
    (6, B, m) / (2, B, m): the operand layout of a per-query batched GEMM.

    With b' = b - mean(b) (LayerNorm is shift-invariant) and y' = d * s + b'::

        mu  = <s/m, d>                         E2  = <2 s b'/m, d> + <s^2/m, d^2> + sum(b'^2)/m
        P   = <q^ g s, d> + <q^ g, b'>         Gy2 = <2 g^2 s b', d> + <g^2 s^2, d^2> + sum(g^2 b'^2)
        Gy  = <g^2 s, d> + sum(g^2 b')         Vy  = <g beta s, d> + sum(g beta b')
    """
    m = queries.shape[1]
    t = transform.to(dtype)
    s, b = t[:, :m], t[:, m:]
    bp = b - b.mean(dim=1, keepdim=True)
    g, beta = ln_weight.to(dtype), ln_bias.to(dtype)
    q_hat = normalized_queries(queries, dtype)
    g2 = g * g
    dim = 1 if queries_first else 0
    lin = torch.stack(
        [s / m, q_hat * g * s, g2 * s, (g * beta) * s, (2.0 / m) * s * bp, 2.0 * g2 * s * bp],
        dim=dim,
    )
    quad = torch.stack([s * s / m, g2 * s * s], dim=dim)
    return DiagonalAtoms(lin, quad, _consts(q_hat, g, beta, bp))


class AffinePrep(NamedTuple):
    """Query-side tensors of the affine form with W and b centred over the output index.

    ``weight`` (B, m, m): W' (y' = W' d + b'), ``bias`` (B, m): b',
    ``vecs`` (B, 3, m): [q^ g, g^2, g beta] (broadcast over B for the last two),
    ``consts`` (B, NUM_CONSTS) with the diagonal-only entries zero.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    vecs: torch.Tensor
    consts: torch.Tensor


def affine_prep(
    transform: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    queries: torch.Tensor,
    dtype: torch.dtype,
) -> AffinePrep:
    """Centred W', b' and the moment vectors for ``y = W d + b``."""
    bsz, m = queries.shape
    t = transform.to(dtype)
    w = t[:, : m * m].reshape(bsz, m, m)
    b = t[:, m * m :]
    # Subtracting the column means of W (the mean over the output index i of W[i, j]) and the
    # mean of b makes mean_i(y'_i) = 0 for every d: no cancellation in E2 - mu^2.
    wc = (w - w.mean(dim=1, keepdim=True)).contiguous()
    bc = (b - b.mean(dim=1, keepdim=True)).contiguous()
    g, beta = ln_weight.to(dtype), ln_bias.to(dtype)
    q_hat = normalized_queries(queries, dtype)
    vecs = torch.stack([q_hat * g, (g * g).expand(bsz, m), (g * beta).expand(bsz, m)], dim=1)
    return AffinePrep(wc, bc, vecs.contiguous(), _consts(q_hat, g, beta, None))


def cosine_epilogue_(
    mu: torch.Tensor,
    p: torch.Tensor,
    gy: torch.Tensor,
    vy: torch.Tensor,
    e2: torch.Tensor,
    gy2: torch.Tensor,
    consts: torch.Tensor,
    eps: float,
    queries_last: bool = False,
) -> torch.Tensor:
    """Scores from the six moments (PyTorch; all arguments broadcast against each other).

    ``consts`` is (B, NUM_CONSTS); the moments are (B, n) (or (n, B) with ``queries_last``):
    each query's constants apply to its row (column). Overwrites ``p``, ``gy``, ``vy``,
    ``e2`` and ``gy2`` in place (they are scratch on the hot path: about 20 in-place passes
    over a (B, n) slab, no allocation but ``mu^2``) and returns the scores in ``p``'s storage.
    """
    return cosine_epilogue_flagged_(mu, p, gy, vy, e2, gy2, consts, eps, queries_last)[0]


def cosine_epilogue_flagged_(
    mu: torch.Tensor,
    p: torch.Tensor,
    gy: torch.Tensor,
    vy: torch.Tensor,
    e2: torch.Tensor,
    gy2: torch.Tensor,
    consts: torch.Tensor,
    eps: float,
    queries_last: bool = False,
    ill: torch.Tensor | None = None,
) -> tuple[torch.Tensor, bool]:
    """:func:`cosine_epilogue_` that also says whether any score is ill-conditioned.

    Returns (scores, flagged). With ``ill`` (a bool tensor of the scores' shape) and flagged
    true, ``ill`` marks the pairs whose one-pass moments lose too many bits (see
    :data:`ILL_CONDITIONED`); they must be recomputed by :func:`exact_scores`. When flagged
    is false ``ill`` is left as it was: the common case costs two maxima, no mask.
    """
    # c[:, X] is each query's constant X, shaped to broadcast over the moments.
    c = consts.t()[None, :, :] if queries_last else consts[:, :, None]
    mu2 = mu * mu
    # var = E2 + cb - mu^2, clamped at 0 against rounding, then r = 1/sqrt(var + eps).
    r = e2.sub_(mu2)
    torch.maximum(r, -c[:, C_CB], out=r)
    r.add_(c[:, C_CB] + eps)
    flagged = False
    if ill is not None:
        # E2 - mu^2 loses log2(mu^2 / (var + eps)) bits: flag the pairs that lose too many.
        excess = torch.sub(mu2, r, alpha=ILL_CONDITIONED)
        # (no queries or no candidates: amax of an empty tensor is an error, nothing to flag)
        flagged = excess.numel() > 0 and bool(excess.amax() > 0)
        if flagged:
            torch.gt(excess, 0, out=ill)
    r.rsqrt_()
    # <q^, d~> = r (P + <q^g, b'> - mu <q^, g>) + <q^, beta>
    num = p.addcmul_(mu, c[:, C_QG], value=-1.0).add_(c[:, C_QGB]).mul_(r).add_(c[:, C_QBETA])
    # Q = Gy2 + sum(g^2 b'^2) - 2 mu (Gy + sum(g^2 b')) + mu^2 sum(g^2)
    gy.add_(c[:, C_G2B])
    q = gy2.add_(c[:, C_G2B2]).addcmul_(mu, gy, value=-2.0).addcmul_(mu2, c[:, C_G2])
    if ill is not None:
        # Q is sum(g^2 (y - mu)^2) expanded: the same cancellation, weighted by g^2.
        excess = torch.mul(mu2, c[:, C_G2]).sub_(q, alpha=ILL_CONDITIONED)
        if excess.numel() > 0 and bool(excess.amax() > 0):
            if flagged:
                ill |= excess > 0
            else:
                torch.gt(excess, 0, out=ill)
                flagged = True
    # L = Vy + sum(g beta b') - mu sum(g beta)
    lin = vy.addcmul_(mu, c[:, C_GBETA], value=-1.0).add_(c[:, C_GBETAB])
    # ||d~||^2 = r (r Q + 2 L) + ||beta||^2; score = num / max(||d~||, 1e-12)
    den = q.mul_(r).add_(lin, alpha=2.0).mul_(r).add_(c[:, C_BETA2])
    den.clamp_min_(NORMALIZE_EPS * NORMALIZE_EPS).rsqrt_()
    return num.mul_(den), flagged


# The one-pass moments lose about log2(mu^2 / var) bits to cancellation. Rows of a projected
# corpus have |mean| / std <= 0.1 (SciFact, shipped adapter: mu^2 / var <= 0.01 for every
# query-document pair), so this only triggers on inputs such as rows sharing a common offset
# of many standard deviations; there the affected scores are recomputed two-pass.
ILL_CONDITIONED = 16.0


def exact_scores(
    rows: torch.Tensor,
    transform: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    q_hat: torch.Tensor,
    modulation: str,
    eps: float,
) -> torch.Tensor:
    """(P,) two-pass scores of P (document, query) pairs, the reference's maths.

    Args: ``rows`` (P, m) documents; ``transform`` (P, OUT) each pair's query transform, or
    (1, OUT) shared by all; ``q_hat`` (P, m) or (1, m) likewise; all in the compute dtype.
    The fallback for pairs that :func:`cosine_epilogue_` flags as ill-conditioned.
    """
    m = rows.shape[1]
    if modulation == "diagonal":
        y = rows * transform[:, :m] + transform[:, m:]
    elif transform.shape[0] == 1:
        y = torch.addmm(transform[:, m * m :], rows, transform[0, : m * m].view(m, m).t())
    else:
        w = transform[:, : m * m].view(-1, m, m)
        y = torch.baddbmm(transform[:, m * m :, None], w, rows[:, :, None]).squeeze(2)
    yc = y - y.mean(dim=1, keepdim=True)
    z = yc * torch.rsqrt((yc * yc).mean(dim=1, keepdim=True) + eps)
    dt = z * ln_weight.to(rows.dtype) + ln_bias.to(rows.dtype)
    den = torch.linalg.vector_norm(dt, dim=1).clamp_min(NORMALIZE_EPS)
    return (q_hat * dt).sum(dim=1) / den


def rescore_flagged_(
    scores: torch.Tensor,
    ill: torch.Tensor,
    rows_of: Callable[[torch.Tensor], torch.Tensor],
    transform: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    q_hat: torch.Tensor,
    modulation: str,
    eps: float,
    piece: int,
) -> None:
    """Overwrite the (B, n) ``scores`` flagged in ``ill`` with :func:`exact_scores`.

    ``rows_of(q, c)`` returns the (P, m) documents of the pairs (query ``q[i]``, column
    ``c[i]``) in the compute dtype; ``transform`` (B, OUT) and ``q_hat`` (B, m) are per query.
    Pairs go ``piece`` at a time, so the extra memory is bounded by ``piece`` rows whatever
    the number of flagged pairs.
    """
    qi, ci = torch.nonzero(ill, as_tuple=True)
    piece = max(1, piece)
    if modulation == "affine":
        # One query at a time: a per-pair (m, m) W would cost m^2 per flagged pair.
        for b in torch.unique(qi).tolist():
            cols = ci[qi == b]
            for p0 in range(0, cols.numel(), piece):
                c = cols[p0 : p0 + piece]
                q = torch.full_like(c, b)
                scores[b, c] = exact_scores(
                    rows_of(q, c),
                    transform[b : b + 1],
                    ln_weight,
                    ln_bias,
                    q_hat[b : b + 1],
                    modulation,
                    eps,
                ).to(scores.dtype)
        return
    for p0 in range(0, qi.numel(), piece):
        q, c = qi[p0 : p0 + piece], ci[p0 : p0 + piece]
        scores[q, c] = exact_scores(
            rows_of(q, c), transform[q], ln_weight, ln_bias, q_hat[q], modulation, eps
        ).to(scores.dtype)


def score_function(
    name: str,
    forward: Callable[..., torch.Tensor],
    backward: Callable[..., tuple[torch.Tensor | None, ...]],
) -> type[torch.autograd.Function]:
    """The autograd Function of candidate scoring around a path's ``forward`` / ``backward``.

    ``forward(corpus, ids, transform, ln_weight, ln_bias, queries, modulation, eps)`` gives
    the (B, K) scores; ``backward(grad, <the same six tensors>, modulation, eps,
    need_corpus=...)`` gives (d corpus or None, d transform, d ln_weight, d ln_bias,
    d queries). The CPU and Triton paths share this shape (one definition, two backends);
    ids and the two constants get no gradient.
    """

    def fwd(
        ctx: torch.autograd.function.FunctionCtx,
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
        return forward(corpus, ids, transform, ln_weight, ln_bias, queries, modulation, eps)

    def bwd(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        corpus, ids, transform, ln_weight, ln_bias, queries = ctx.saved_tensors
        d_corpus, d_t, d_g, d_beta, d_q = backward(
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

    return type(
        name,
        (torch.autograd.Function,),
        {"forward": staticmethod(fwd), "backward": staticmethod(bwd), "__doc__": forward.__doc__},
    )


# --------------------------------------------------------------------------- top-k


def merge_topk(
    scores: torch.Tensor, ids: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best ``k`` of each row of (scores, ids), ordered by (score desc, id asc).

    Two sorts make the order total and deterministic whatever order the inputs come in:
    a sort by id, then a *stable* sort by score keeps equal scores in id order.
    Rows shorter than ``k`` are padded with ``-inf`` / ``-1``.
    """
    ids_sorted, perm = torch.sort(ids, dim=1)
    s = scores.gather(1, perm)
    s, order = torch.sort(s, dim=1, descending=True, stable=True)
    i = ids_sorted.gather(1, order)
    bsz, n = s.shape
    if n >= k:
        return s[:, :k].contiguous(), i[:, :k].contiguous()
    out_s = torch.full((bsz, k), float("-inf"), dtype=s.dtype, device=s.device)
    out_i = torch.full((bsz, k), -1, dtype=torch.int64, device=s.device)
    out_s[:, :n] = s
    out_i[:, :n] = i
    return out_s, out_i


def chunk_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, n) -> the ``min(k, n)`` best columns of each row, ties at the cut by lower column.

    ``torch.topk`` is fast but not stable: when several columns tie with the k-th value it may
    keep a higher column and drop a lower one. Rows where that can happen (more than k values
    >= the k-th) are redone with a stable sort; with real-valued scores that only happens for
    duplicate documents, so the common cost is one extra compare-and-count pass.
    """
    n = scores.shape[1]
    kk = min(k, n)
    vals, idx = torch.topk(scores, kk, dim=1, largest=True, sorted=True)
    if kk < n:
        count = (scores >= vals[:, -1:]).sum(dim=1)
        bad = torch.nonzero(count > kk).flatten()
        if bad.numel():
            v, i = torch.sort(scores[bad], dim=1, descending=True, stable=True)
            vals[bad] = v[:, :kk]
            idx[bad] = i[:, :kk]
    return vals, idx


class StreamingTopK:
    """Running top-k over column chunks of a (B, N) score matrix that is never materialised.

    ``add(chunk_scores, offset)`` takes the scores of columns ``offset .. offset + n``; the
    state is ((B, k) scores, (B, k) ids), ordered by (score desc, id asc), padded with
    ``-inf`` / ``-1`` while fewer than k columns have been seen.
    """

    def __init__(self, batch: int, k: int, device: torch.device) -> None:
        self.k = k
        self.scores = torch.full((batch, k), float("-inf"), dtype=torch.float32, device=device)
        self.ids = torch.full((batch, k), -1, dtype=torch.int64, device=device)
        self.empty = True

    def add(self, chunk_scores: torch.Tensor, offset: int) -> None:
        """Merge columns ``offset ..`` (higher than every column added before)."""
        # Select on the float32 values that are returned: float64 scores of identical rows
        # can differ in their last bits and would then not tie (and go lower id first).
        chunk_scores = chunk_scores.float()
        if self.empty:
            # Nothing held yet: every column is a candidate, so the survivor filter below
            # would only cost passes and host syncs (a one-chunk search is all first chunk).
            self.empty = False
            vals, idx = chunk_topk(chunk_scores, self.k)
            # A -inf column never enters (as below, where only scores above -inf survive).
            idx = torch.where(torch.isneginf(vals), -1, idx + offset)
            self.scores, self.ids = merge_topk(vals, idx, self.k)
            return
        # Only scores strictly above the current k-th best can enter: an equal score loses the
        # tie to the lower id already held. After the first chunks almost nothing passes
        # (about k ln(N/k) survivors per query over a whole scan), so a compare and a nonzero
        # replace torch.topk: 0.8 ms -> ~0.1 ms per (16 x 4096) chunk on one EPYC core.
        # Most chunks of a long scan hold nothing above any query's k-th best: a row maximum
        # settles that faster than the (B, n) compare and count below.
        if not bool((chunk_scores.amax(dim=1, keepdim=True) > self.scores[:, -1:]).any()):
            return
        survivors = chunk_scores > self.scores[:, -1:]
        counts = survivors.sum(dim=1)
        most = int(counts.max())
        if most == 0:
            return
        if most <= 2 * self.k:
            rows, cols = survivors.nonzero(as_tuple=True)  # row-major: grouped by row
            starts = torch.cumsum(counts, 0) - counts
            pos = torch.arange(rows.numel(), device=rows.device) - starts[rows]
            vals = torch.full(
                (chunk_scores.shape[0], most),
                float("-inf"),
                dtype=torch.float32,
                device=chunk_scores.device,
            )
            idx = torch.full_like(vals, -1, dtype=torch.int64)
            vals[rows, pos] = chunk_scores[rows, cols].float()
            idx[rows, pos] = cols + offset
        else:
            vals, idx = chunk_topk(chunk_scores, self.k)
            vals, idx = vals.float(), idx.add_(offset)
        self.scores, self.ids = merge_topk(
            torch.cat([self.scores, vals], dim=1), torch.cat([self.ids, idx], dim=1), self.k
        )

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scores, self.ids


def topk_by_id(
    scores: torch.Tensor, ids: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused top-k of a rerank: best ``k`` of (B, K) candidate scores as (scores, corpus ids).

    Ties are broken by the lower corpus id; ``k > K`` pads with ``-inf`` / ``-1``. Duplicate
    candidate ids are kept (each occurrence is a candidate with the same score), as a (B, K)
    table of scores would show them.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if scores.shape != ids.shape or scores.dim() != 2:
        raise ValueError(
            f"scores and ids must be (B, K) of one shape, got {tuple(scores.shape)} and "
            f"{tuple(ids.shape)}"
        )
    return merge_topk(scores.float(), ids.long(), k)


# --------------------------------------------------------------------------- CPU workers

_State = TypeVar("_State")
_WORKERS_LOCK = threading.Lock()
_LOCAL = threading.local()  # .in_worker: nested calls run inline instead of deadlocking
# Persistent helper threads, created on first use and kept (daemon, idle on a queue).
# Starting a Python thread that touches torch cost 2.7 ms on the 2-core CI machine (thread-
# local allocator arenas and torch state are set up afresh, and the new arena's pages fault
# in again), which was a third of a 256-query rerank; a reused thread costs ~30 us.
_POOL: ThreadPoolExecutor | None = None
_POOL_THREADS = 64


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=_POOL_THREADS, thread_name_prefix="imrnns-worker")
    return _POOL


def run_workers(
    num_items: int,
    make_state: Callable[[], _State],
    body: Callable[[_State, int], None],
    workers: int | None = None,
) -> list[_State]:
    """Run ``body(state, i)`` for every ``i < num_items`` on worker threads, one ``state``
    (buffers, a running top-k) per worker, items handed out dynamically; returns the states.

    Why not torch's own intra-op threads: a chunk of scoring is ~30 medium-sized ops, and each
    multi-threaded op ends in a barrier. On the 2-core CI machines, shared with other jobs,
    a barrier often waits a whole scheduler slice for the descheduled sibling: exhaustive search
    (N=1e6, B=16) took 15-18 s with 2 intra-op threads against 2.7-3.0 s with 1. One thread
    per worker and one join per call is the shape faiss uses (one OpenMP region per search).

    ``workers`` defaults to ``torch.get_num_threads()``. The calling thread is worker 0; the
    others come from a persistent pool (see ``_POOL``). While the workers run, torch's thread
    count is 1 (process-wide) and is restored afterwards; concurrent calls are serialised, and
    a call from inside a worker (``body`` calling another op that uses workers) runs inline.
    """
    workers = torch.get_num_threads() if workers is None else workers
    workers = max(1, min(workers, num_items, _POOL_THREADS + 1))
    if workers == 1 or getattr(_LOCAL, "in_worker", False):
        state = make_state()
        for i in range(num_items):
            body(state, i)
        return [state]
    with _WORKERS_LOCK:
        saved = torch.get_num_threads()
        torch.set_num_threads(1)
        counter = itertools.count()
        # Grad mode is per thread: a worker would start with grad on even when the caller
        # (e.g. an autograd Function's forward) runs under no_grad, and in-place out= ops
        # then fail. Carry the caller's mode into every worker.
        grad_enabled = torch.is_grad_enabled()
        states: list[_State | None] = [None] * workers
        errors: list[BaseException] = []

        def run(slot: int) -> None:
            _LOCAL.in_worker = True
            if slot:
                # OpenMP's thread count is per thread: a pool thread left at the default
                # would start its own team of OpenMP threads inside BLAS calls, which then
                # compete with the caller's team (a later rerank ran 11 -> 16-20 ms).
                torch.set_num_threads(1)
            previous_grad = torch.is_grad_enabled()
            torch.set_grad_enabled(grad_enabled)
            try:
                state = make_state()
                states[slot] = state
                for i in counter:  # next() on a shared count is atomic under the GIL
                    if i >= num_items or errors:
                        break
                    body(state, i)
            except BaseException as exc:  # re-raised in the caller's thread
                errors.append(exc)
            finally:
                _LOCAL.in_worker = False
                torch.set_grad_enabled(previous_grad)

        try:
            futures = [_pool().submit(run, w) for w in range(1, workers)]
            run(0)
            wait(futures)
        finally:
            torch.set_num_threads(saved)
    if errors:
        raise errors[0]
    return [st for st in states if st is not None]


# Thread-local scratch buffers, reused across calls. A freshly allocated multi-MB tensor is
# a fresh mmap whose pages fault in on first touch: glibc returns large freed blocks to the
# OS, so a 256-query rerank that allocated its 2 MB gather blocks per call took 1,000-4,000
# page faults per call (3x the gather's own time). Worker threads are persistent (_POOL), so
# their buffers are too. At most SCRATCH_KEEP_BYTES per (thread, key) are kept.
_SCRATCH = threading.local()
SCRATCH_KEEP_BYTES = 16 << 20


def scratch(key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor of ``shape`` backed by this thread's buffer for ``key``.

    The buffer is reused by the next call with the same key on the same thread: never return
    it (or a view of it) to a caller, and use one key per simultaneously live buffer.
    """
    numel = 1
    for size in shape:
        numel *= int(size)
    buffers = getattr(_SCRATCH, "buffers", None)
    if buffers is None:
        buffers = _SCRATCH.buffers = {}
    buf = buffers.get((key, dtype))
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype)
        if numel * buf.element_size() <= SCRATCH_KEEP_BYTES:
            buffers[key, dtype] = buf
    return buf[:numel].view(shape)
