"""The moment algebra of the modulated cosine score, shared by the CPU and Triton paths.

Plain PyTorch only (no Triton): the CPU path (:mod:`imrnns_kernels.scoring.cpu`) and the
Triton launchers (:mod:`imrnns_kernels.scoring.triton`) both build their per-query constants
here, so the two paths cannot drift apart.

The score (see :func:`imrnns_kernels.scoring.reference.modulated_score`) of a document d
for a query with transform T, LayerNorm (g, beta, eps) and modulated query q is::

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

Verified against the float64 reference in tests/kernels/test_modulated_topk.py: the fp32 algebra
stays within 1e-7 of it on unit-norm inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from imrnns_kernels._runtime import NORMALIZE_EPS

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
    rows_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
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
