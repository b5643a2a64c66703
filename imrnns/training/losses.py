"""Training losses: the ranking terms, the distillation term, and one step's total.

The terms work on score matrices: ``scores`` (B, L) adapted cosines of each query's L
candidate columns, ``gains`` (B, L) their relevance grades, ``valid`` (B, L) which columns
count. :func:`_step_loss` composes them for a batch (the maths is in :mod:`imrnns.training`).

Every term costs O(B x L) per grade level (the cross-entropy's logsumexp per (query, grade
level), the pairwise hinges by sorting), never O(B x L x L): with many graded positives per
query L is large (the union of the batch's positives).

Tested in tests/training/test_train.py (each term against a hand computation),
tests/training/test_losses_at_scale.py (against the former (B, L, L) implementation, values
and gradients; the shared-column scores against the op) and
tests/training/test_pseudo_queries.py (the pseudo-query term of a step).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from imrnns.model import IMRNN
from imrnns.training.batches import Candidates, _batch_columns
from imrnns.training.config import TrainConfig
from imrnns.training.data import TrainingData, _QuerySet
from imrnns_kernels import dispatch
from imrnns_kernels._runtime import NORMALIZE_EPS
from imrnns_kernels.scoring.moments import (
    A_E2,
    A_GY,
    A_GY2,
    A_MU,
    A_P,
    A_VY,
    C_BETA2,
    C_CB,
    C_G2,
    C_G2B,
    C_G2B2,
    C_GBETA,
    C_GBETAB,
    C_QBETA,
    C_QG,
    C_QGB,
    ILL_CONDITIONED,
    diagonal_atoms,
)


def _grade_levels(gains: torch.Tensor, valid: torch.Tensor) -> list[float]:
    """The distinct grades of the batch's valid positive columns, ascending (few: 1 to 3)."""
    return torch.unique(gains[valid & (gains > 0)]).tolist()


def _ce_loss(
    scores: torch.Tensor, gains: torch.Tensor, valid: torch.Tensor, temperature: float,
    graded: bool,
) -> torch.Tensor:  # fmt: skip
    """Graded cross-entropy: each positive against the candidates of lower grade.

    With ``s = scores / temperature`` and, for query b and grade level g, the competitor set
    ``C_g(b) = {j valid : gains[b, j] < g}``, a positive p of grade g costs::

        l_p = -log(exp(s_p) / (exp(s_p) + sum_{j in C_g(b)} exp(s_j)))
            = logaddexp(LSE_g(b), s_p) - s_p,     LSE_g(b) = logsumexp_{j in C_g(b)} s_j

    ``LSE_g(b)`` is computed once per (query, grade level) and shared by every positive of
    that grade, so the work is O(levels x B x L), not O(B x L x L). Positives without a
    competitor are skipped. Per query the positives are averaged with weights ``2^g - 1``
    (``graded``; else 1); queries with no weighted positive are skipped; the result is the
    mean over the rest (0, still attached to the graph, when none is left).

    Shapes: ``scores``, ``gains`` (B, L) float, ``valid`` (B, L) bool; returns a scalar.
    """
    s = scores / temperature
    lse = torch.zeros_like(s)  # LSE_g(b) of each positive column's grade
    has_rival = torch.zeros_like(valid)  # the column's competitor set is not empty
    for level in _grade_levels(gains, valid):
        below = valid & (gains < level)
        any_below = below.any(dim=1, keepdim=True)
        # A row without competitors gets finite inputs (0): logsumexp of an all -inf row has
        # a NaN gradient, which would leak through the masks below.
        rivals = s.masked_fill(~below, float("-inf")).masked_fill(~any_below, 0.0)
        level_lse = torch.logsumexp(rivals, dim=1, keepdim=True)  # (B, 1)
        at_level = valid & (gains == level)
        lse = torch.where(at_level, level_lse, lse)
        has_rival = has_rival | (at_level & any_below)
    is_pos = has_rival  # valid, positive (its grade is a level) and with a competitor
    per_pos = torch.where(is_pos, torch.logaddexp(lse, s) - s, torch.zeros_like(s))
    w = (torch.pow(2.0, gains) - 1.0) if graded else torch.ones_like(gains)
    w = torch.where(is_pos, w, torch.zeros_like(w))
    denom = w.sum(dim=1)
    has = denom > 0
    if not bool(has.any()):
        return scores.sum() * 0.0
    per_query = (per_pos * w).sum(dim=1)[has] / denom[has]
    return per_query.mean()


def _pairwise_hinge(
    values: torch.Tensor, gains: torch.Tensor, valid: torch.Tensor, margin: float
) -> torch.Tensor:
    """Mean over each query's ranked pairs of ``relu(margin - x_p + x_j)``, then over queries.

    The pairs of query b are (p, j) with both valid, ``g_p > 0`` and ``g_p > g_j``; ``x`` is
    ``values`` (B, L). Per grade level g the competitors ``C_g(b)`` (valid, grade below g) are
    sorted once; a positive p of grade g then needs only the competitors above its threshold
    ``t_p = x_p - margin``::

        sum_{j in C_g(b)} relu(x_j - t_p) = S(t_p) - n(t_p) t_p

    with ``n(t)`` the count and ``S(t)`` the sum of the competitors above t (a binary search
    and a suffix sum), so the work is O(levels x B x L log L), not O(B x L x L). Sums run in
    float64: the suffix sums would otherwise lose the small hinge values to cancellation.
    Queries without a pair are skipped; 0 (attached to the graph) when none has one.
    """
    x = values.double()
    bsz, width = x.shape
    total = x.new_zeros(bsz)
    count = x.new_zeros(bsz)
    column = torch.arange(width, device=x.device)
    for level in _grade_levels(gains, valid):
        below = valid & (gains < level)
        at_level = valid & (gains == level)
        n_below = below.sum(dim=1, keepdim=True)  # (B, 1)
        ordered = x.masked_fill(~below, float("inf")).sort(dim=1).values
        finite = ordered.masked_fill(column >= n_below, 0.0)
        suffix = torch.cat(
            [finite.flip(1).cumsum(dim=1).flip(1), finite.new_zeros(bsz, 1)], dim=1
        )  # (B, L + 1): suffix[i] = sum of the sorted competitors from position i on
        threshold = x - margin
        first_above = torch.searchsorted(ordered.detach(), threshold.detach(), right=True)
        n_above = (n_below - first_above).clamp_min(0)
        hinge = suffix.gather(1, first_above) - n_above * threshold
        total = total + torch.where(at_level, hinge, torch.zeros_like(hinge)).sum(dim=1)
        count = count + (at_level * n_below).sum(dim=1)
    has = count > 0
    if not bool(has.any()):
        return values.sum() * 0.0
    return (total[has] / count[has]).mean().to(values.dtype)


def _distill(
    scores: torch.Tensor, base: torch.Tensor, keep: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Mean over queries of KL(softmax(base/t) || softmax(scores/t)) over the kept columns."""
    neg_inf = torch.finfo(scores.dtype).min
    log_p = torch.log_softmax((base / temperature).masked_fill(~keep, neg_inf), dim=1)
    log_q = torch.log_softmax((scores / temperature).masked_fill(~keep, neg_inf), dim=1)
    kl = (log_p.exp() * (log_p - log_q)).masked_fill(~keep, 0.0).sum(dim=1)
    return kl.mean()


def _loss(
    scores: torch.Tensor,
    base_scores: torch.Tensor,
    gains: torch.Tensor,
    valid: torch.Tensor,
    config: TrainConfig,
) -> torch.Tensor:
    """The ranking loss ``TrainConfig.loss``: the sum of its ``+``-joined terms.

    ``scores`` and ``base_scores`` (B, L) are the adapted and base-encoder cosines of the
    candidate columns; ``gains`` (B, L) their grades, ``valid`` (B, L) which columns count.
    """
    total = scores.new_zeros(())
    for term in config.loss_terms:
        if term in ("ce", "mnrl"):
            total = total + _ce_loss(scores, gains, valid, config.temperature, config.graded)
        elif term == "margin":
            total = total + _pairwise_hinge(scores, gains, valid, config.margin)
        else:  # improvement: beat the base encoder's gap by a margin
            total = total + _pairwise_hinge(
                scores - base_scores, gains, valid, config.improvement_margin
            )
    return total


def _shared_scores(
    model: IMRNN,
    corpus_p: torch.Tensor,
    shared: torch.Tensor,
    tq: torch.Tensor,
    q_tilde: torch.Tensor,
) -> torch.Tensor:
    """(B, U) scores of the same U documents ``shared`` for every query of the batch.

    The same function as ``model.score_ids(corpus_p, shared.expand(B, U), tq, q_tilde)``.
    With the CPU backend and diagonal modulation it is computed as the op's one-pass moment
    algebra (:mod:`imrnns_kernels.scoring.moments`) on the U documents gathered once: two
    GEMMs, ``(6B, m) x (m, U)`` and ``(2B, m) x (m, U)``, and the cosine epilogue on (B, U),
    differentiated by autograd (GEMMs again). The op gathers and differentiates a (B, U, m)
    copy instead, which dominates a step when the batch's positives are many (U is the union
    of B queries' positives). Pairs the epilogue flags as ill-conditioned (see
    ``moments.ILL_CONDITIONED``; not seen on projected corpora) send the block to the op,
    and so do other backends and affine modulation (whose moments need a (B, U, m) product
    anyway).
    """
    bsz, u = tq.shape[0], shared.numel()
    use_op = (
        model.config.modulation != "diagonal"
        or u == 0
        or dispatch.implementation("modulated_score", corpus_p.device, True).backend != "cpu"
    )
    if use_op:
        return model.score_ids(corpus_p, shared.expand(bsz, u), tq, q_tilde)
    dtype = torch.float64 if tq.dtype == torch.float64 else torch.float32
    m = corpus_p.shape[1]
    docs = corpus_p[shared].to(dtype)  # (U, m)
    atoms = diagonal_atoms(tq, model.doc_norm.weight, model.doc_norm.bias, q_tilde, dtype)
    lin = (atoms.lin.reshape(-1, m) @ docs.T).view(6, bsz, u)
    quad = (atoms.quad.reshape(-1, m) @ (docs * docs).T).view(2, bsz, u)
    mu, p, gy, vy = lin[A_MU], lin[A_P], lin[A_GY], lin[A_VY]
    e2, gy2 = lin[A_E2] + quad[0], lin[A_GY2] + quad[1]
    c = atoms.consts[:, :, None]  # (B, NUM_CONSTS, 1): per-query constants
    # The op's epilogue (moments.cosine_epilogue_flagged_), out of place for autograd.
    mu2 = mu * mu
    r = torch.maximum(e2 - mu2, -c[:, C_CB]) + (c[:, C_CB] + model.config.layer_norm_eps)
    q = gy2 + c[:, C_G2B2] - 2.0 * mu * (gy + c[:, C_G2B]) + mu2 * c[:, C_G2]
    ill = (mu2 - ILL_CONDITIONED * r > 0) | (mu2 * c[:, C_G2] - ILL_CONDITIONED * q > 0)
    if bool(ill.any()):
        return model.score_ids(corpus_p, shared.expand(bsz, u), tq, q_tilde)
    r = torch.rsqrt(r)
    num = (p - mu * c[:, C_QG] + c[:, C_QGB]) * r + c[:, C_QBETA]
    lin_beta = vy - mu * c[:, C_GBETA] + c[:, C_GBETAB]
    den = (q * r + 2.0 * lin_beta) * r + c[:, C_BETA2]
    return (num * torch.rsqrt(den.clamp_min(NORMALIZE_EPS * NORMALIZE_EPS))).float()


def _candidate_scores(
    model: IMRNN,
    corpus_p: torch.Tensor,
    cand: torch.Tensor,
    shared: int,
    tq: torch.Tensor,
    q_tilde: torch.Tensor,
) -> torch.Tensor:
    """(B, L) scores of the candidate columns: the first ``shared`` columns hold the same ids
    in every row (:func:`_shared_scores`), the rest each row's own (the fused op)."""
    parts = []
    if shared > 0:
        parts.append(_shared_scores(model, corpus_p, cand[0, :shared], tq, q_tilde))
    if cand.shape[1] > shared or not parts:
        parts.append(model.score_ids(corpus_p, cand[:, shared:], tq, q_tilde))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _base_scores(
    q_unit: torch.Tensor, corpus_unit: torch.Tensor, cand: torch.Tensor, shared: int
) -> torch.Tensor:
    """(B, L) base-encoder cosines of the candidate columns (shared ones by one GEMM)."""
    own = torch.einsum("bn,bln->bl", q_unit, corpus_unit[cand[:, shared:]])
    if shared == 0:
        return own
    return torch.cat([q_unit @ corpus_unit[cand[0, :shared]].T, own], dim=1)


def _query_loss(
    model: IMRNN,
    qs: _QuerySet,
    rows: Sequence[int],
    batch: Candidates,
    config: TrainConfig,
    gen: torch.Generator,
    corpus_p: torch.Tensor,
    corpus_unit: torch.Tensor,
) -> torch.Tensor:
    """Ranking loss plus distillation for the batch ``rows`` of the query set ``qs``."""
    cand, gains, valid, shared = batch
    idx = torch.tensor(list(rows), dtype=torch.int64)
    q = qs.emb[idx]
    if config.query_noise > 0:
        noise = torch.randn(q.shape, generator=gen) * config.query_noise / math.sqrt(q.shape[1])
        q = torch.nn.functional.normalize(q, dim=1) + noise
    pq = model.project(q)
    fb = qs.fb_ids[idx]
    weights = model.feedback_weights(qs.fb_scores[idx])
    tq, _, q_tilde = model.query_state(pq, corpus_p, fb, weights)
    scores = _candidate_scores(model, corpus_p, cand, shared, tq, q_tilde)
    q_unit = torch.nn.functional.normalize(q, dim=1)
    # Only the improvement term reads the base cosines.
    needs_base = "improvement" in config.loss_terms
    base = _base_scores(q_unit, corpus_unit, cand, shared) if needs_base else scores.detach()
    loss = _loss(scores, base, gains, valid, config)
    if config.distill_weight > 0:
        fb_scores = model.score_ids(corpus_p, fb, tq, q_tilde)
        fb_base = torch.einsum("bn,bln->bl", q_unit, corpus_unit[fb])
        keep = ~_is_positive(fb, cand[0, :shared], gains[:, :shared] > 0)
        loss = loss + config.distill_weight * _distill(
            fb_scores, fb_base, keep, config.distill_temperature
        )
    return loss


def _is_positive(ids: torch.Tensor, union: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """(B, K) bool: ``ids[b, k]`` is a positive of row b, given the sorted (U,) ``union`` of
    the batch's positives and the (B, U) mask of each row's own (index arithmetic: a binary
    search of the union, no per-row sets)."""
    if union.numel() == 0:
        return torch.zeros_like(ids, dtype=torch.bool)
    col = torch.searchsorted(union, ids).clamp_max(union.numel() - 1)
    return (union[col] == ids) & positive.gather(1, col)


def _step_loss(
    model: IMRNN,
    data: TrainingData,
    rows: Sequence[int],
    config: TrainConfig,
    gen: torch.Generator,
    corpus_unit: torch.Tensor,
    pseudo_rows: Sequence[int] = (),
    pseudo_gen: torch.Generator | None = None,
    queries: _QuerySet | None = None,
) -> torch.Tensor:
    """One step's loss: the real batch ``rows`` (ranking + distillation), the anchor term,
    and ``pseudo_weight`` times the same ranking + distillation loss on the pseudo-query
    batch ``pseudo_rows`` (its negatives and noise drawn from ``pseudo_gen``, so the real
    batch's draws do not depend on whether pseudo-queries are on).

    ``rows`` index ``queries`` (default ``data.train``; a streamed chunk's query set).

    Raises:
        FloatingPointError: the loss is NaN or infinite (diverged weights: lower ``lr``).
    """
    qs = data.train if queries is None else queries
    batch = _batch_columns(qs, rows, config, gen, data.train.cited)
    corpus_p = model.project(data.corpus)  # (N, m), differentiable through the projector
    loss = _query_loss(model, qs, rows, batch, config, gen, corpus_p, corpus_unit)
    if config.anchor_weight > 0:
        pick = torch.randperm(data.anchor_rows.shape[0], generator=gen)[: config.anchor_batch]
        a_fb = data.anchor_fb[pick]
        a_pq = corpus_p[data.anchor_rows[pick]]
        a_tq, _, a_qt = model.query_state(
            a_pq, corpus_p, a_fb, model.feedback_weights(data.anchor_fb_scores[pick])
        )
        a_scores = model.score_ids(corpus_p, a_fb, a_tq, a_qt)
        loss = loss + config.anchor_weight * _distill(
            a_scores,
            data.anchor_fb_scores[pick],
            torch.ones_like(a_fb, dtype=torch.bool),
            config.distill_temperature,
        )
    if len(pseudo_rows) > 0:
        if data.pseudo is None or pseudo_gen is None:
            raise ValueError("pseudo_rows need data.pseudo and pseudo_gen")
        p_batch = _batch_columns(data.pseudo, pseudo_rows, config, pseudo_gen, data.train.cited)
        loss = loss + config.pseudo_weight * _query_loss(
            model, data.pseudo, pseudo_rows, p_batch, config, pseudo_gen, corpus_p, corpus_unit
        )
    if not bool(torch.isfinite(loss)):
        raise FloatingPointError(
            f"training loss is {float(loss.detach())} on a batch of {len(rows)} queries: the "
            "weights diverged (lower lr or raise temperature)"
        )
    return loss
