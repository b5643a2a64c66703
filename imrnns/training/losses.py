"""Training losses: the ranking terms, the distillation term, and one step's total.

The terms work on score matrices: ``scores`` (B, L) adapted cosines of each query's L
candidate columns, ``gains`` (B, L) their relevance grades, ``valid`` (B, L) which columns
count. :func:`_step_loss` composes them for a batch (the maths is in :mod:`imrnns.training`).

Tested in tests/test_train.py (each term against a hand computation) and
tests/test_pseudo_queries.py (the pseudo-query term of a step).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from imrnns.model import IMRNN
from imrnns.training.batches import _batch_candidates
from imrnns.training.config import TrainConfig
from imrnns.training.data import TrainingData, _QuerySet


def _pair_mask(gains: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, L, L) bool: column p is a positive that should outrank column j."""
    higher = gains[:, :, None] > gains[:, None, :]
    return higher & valid[:, :, None] & valid[:, None, :] & (gains[:, :, None] > 0)


def _ce_loss(
    scores: torch.Tensor, gains: torch.Tensor, valid: torch.Tensor, temperature: float,
    graded: bool,
) -> torch.Tensor:  # fmt: skip
    """Graded cross-entropy: each positive against the candidates of lower grade."""
    s = scores / temperature
    pairs = _pair_mask(gains, valid)  # (B, P, J)
    competitors = s[:, None, :].masked_fill(~pairs, float("-inf"))
    lse = torch.logsumexp(torch.cat([competitors, s[:, :, None]], dim=2), dim=2)  # (B, L)
    per_pos = lse - s  # -log softmax of each positive against its competitors
    is_pos = (gains > 0) & valid & pairs.any(dim=2)
    w = (torch.pow(2.0, gains) - 1.0) if graded else torch.ones_like(gains)
    w = torch.where(is_pos, w, torch.zeros_like(w))
    per_pos = torch.where(is_pos, per_pos, torch.zeros_like(per_pos))
    denom = w.sum(dim=1)
    has = denom > 0
    if not bool(has.any()):
        return scores.sum() * 0.0
    per_query = (per_pos * w).sum(dim=1)[has] / denom[has]
    return per_query.mean()


def _pairwise_hinge(
    gaps: torch.Tensor, pairs: torch.Tensor, margins: torch.Tensor | float
) -> torch.Tensor:
    """Mean over each query's pairs of ``relu(margin - gap)``, then over queries."""
    hinge = torch.relu(margins - gaps).masked_fill(~pairs, 0.0)
    count = pairs.sum(dim=(1, 2))
    has = count > 0
    if not bool(has.any()):
        return gaps.sum() * 0.0
    return (hinge.sum(dim=(1, 2))[has] / count[has]).mean()


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
    pairs = None
    for term in config.loss_terms:
        if term in ("ce", "mnrl"):
            total = total + _ce_loss(scores, gains, valid, config.temperature, config.graded)
            continue
        if pairs is None:
            pairs = _pair_mask(gains, valid)
        gaps = scores[:, :, None] - scores[:, None, :]
        if term == "margin":
            total = total + _pairwise_hinge(gaps, pairs, config.margin)
        else:  # improvement: beat the base encoder's gap by a margin
            base_gaps = base_scores[:, :, None] - base_scores[:, None, :]
            total = total + _pairwise_hinge(gaps, pairs, config.improvement_margin + base_gaps)
    return total


def _query_loss(
    model: IMRNN,
    data: TrainingData,
    qs: _QuerySet,
    rows: Sequence[int],
    cand: torch.Tensor,
    gains: torch.Tensor,
    valid: torch.Tensor,
    config: TrainConfig,
    gen: torch.Generator,
    corpus_p: torch.Tensor,
    corpus_unit: torch.Tensor,
) -> torch.Tensor:
    """Ranking loss plus distillation for the batch ``rows`` of the query set ``qs``."""
    idx = torch.tensor(list(rows), dtype=torch.int64)
    q = qs.emb[idx]
    if config.query_noise > 0:
        noise = torch.randn(q.shape, generator=gen) * config.query_noise / math.sqrt(q.shape[1])
        q = torch.nn.functional.normalize(q, dim=1) + noise
    pq = model.project(q)
    fb = qs.fb_ids[idx]
    weights = model.feedback_weights(qs.fb_scores[idx])
    tq, _, q_tilde = model.query_state(pq, corpus_p, fb, weights)
    scores = model.score_ids(corpus_p, cand, tq, q_tilde)
    q_unit = torch.nn.functional.normalize(q, dim=1)
    base = torch.einsum("bn,bln->bl", q_unit, corpus_unit[cand])
    loss = _loss(scores, base, gains, valid, config)
    if config.distill_weight > 0:
        fb_scores = model.score_ids(corpus_p, fb, tq, q_tilde)
        fb_base = torch.einsum("bn,bln->bl", q_unit, corpus_unit[fb])
        keep = torch.ones_like(fb, dtype=torch.bool)
        for i, r in enumerate(rows):
            pos = set(qs.positives[r][0])
            keep[i] = torch.tensor([d not in pos for d in fb[i].tolist()])
        loss = loss + config.distill_weight * _distill(
            fb_scores, fb_base, keep, config.distill_temperature
        )
    return loss


def _step_loss(
    model: IMRNN,
    data: TrainingData,
    rows: Sequence[int],
    config: TrainConfig,
    gen: torch.Generator,
    corpus_unit: torch.Tensor,
    pseudo_rows: Sequence[int] = (),
    pseudo_gen: torch.Generator | None = None,
) -> torch.Tensor:
    """One step's loss: the real batch ``rows`` (ranking + distillation), the anchor term,
    and ``pseudo_weight`` times the same ranking + distillation loss on the pseudo-query
    batch ``pseudo_rows`` (its negatives and noise drawn from ``pseudo_gen``, so the real
    batch's draws do not depend on whether pseudo-queries are on)."""
    cand, gains, valid = _batch_candidates(data, rows, config, gen)
    corpus_p = model.project(data.corpus)  # (N, m), differentiable through the projector
    loss = _query_loss(model, data, data.train, rows, cand, gains, valid, config, gen,
                       corpus_p, corpus_unit)  # fmt: skip
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
        p_cand, p_gains, p_valid = _batch_candidates(
            data, pseudo_rows, config, pseudo_gen, data.pseudo
        )
        loss = loss + config.pseudo_weight * _query_loss(
            model, data, data.pseudo, pseudo_rows, p_cand, p_gains, p_valid, config,
            pseudo_gen, corpus_p, corpus_unit,
        )  # fmt: skip
    return loss
