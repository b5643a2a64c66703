"""The training losses without the positives x candidates blow-up, against the old ones.

``_oracle_*`` below are the loss functions as they were before the rewrite (one softmax per
positive over a (B, L, L) pair mask; pairwise hinges over (B, L, L) gaps), kept verbatim as
the oracle: the new per-grade-level forms must give the same values and gradients to the
float32 tolerance on fixed inputs, and never a NaN where the old ones had none.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from imrnns.training import TrainConfig
from imrnns.training.losses import _ce_loss, _loss, _pairwise_hinge
from tests.helpers import TOLERANCES

FP32 = TOLERANCES[torch.float32]


# ----------------------------------------------------------------------------- the oracle
def _oracle_pair_mask(gains: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, L, L) bool: column p is a positive that should outrank column j."""
    higher = gains[:, :, None] > gains[:, None, :]
    return higher & valid[:, :, None] & valid[:, None, :] & (gains[:, :, None] > 0)


def _oracle_ce_loss(
    scores: torch.Tensor,
    gains: torch.Tensor,
    valid: torch.Tensor,
    temperature: float,
    graded: bool,
) -> torch.Tensor:
    s = scores / temperature
    pairs = _oracle_pair_mask(gains, valid)  # (B, P, J)
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


def _oracle_pairwise_hinge(
    gaps: torch.Tensor, pairs: torch.Tensor, margins: torch.Tensor | float
) -> torch.Tensor:
    hinge = torch.relu(margins - gaps).masked_fill(~pairs, 0.0)
    count = pairs.sum(dim=(1, 2))
    has = count > 0
    if not bool(has.any()):
        return gaps.sum() * 0.0
    return (hinge.sum(dim=(1, 2))[has] / count[has]).mean()


def _oracle_loss(
    scores: torch.Tensor,
    base_scores: torch.Tensor,
    gains: torch.Tensor,
    valid: torch.Tensor,
    config: TrainConfig,
) -> torch.Tensor:
    total = scores.new_zeros(())
    pairs = None
    for term in config.loss_terms:
        if term in ("ce", "mnrl"):
            total = total + _oracle_ce_loss(scores, gains, valid, config.temperature, config.graded)
            continue
        if pairs is None:
            pairs = _oracle_pair_mask(gains, valid)
        gaps = scores[:, :, None] - scores[:, None, :]
        if term == "margin":
            total = total + _oracle_pairwise_hinge(gaps, pairs, config.margin)
        else:
            base_gaps = base_scores[:, :, None] - base_scores[:, None, :]
            total = total + _oracle_pairwise_hinge(
                gaps, pairs, config.improvement_margin + base_gaps
            )
    return total


# ----------------------------------------------------------------------------- inputs
def batch(
    seed: int,
    b: int = 6,
    positives: int = 12,
    negatives: int = 20,
    grades: tuple[int, ...] = (1, 2, 3),
    graded: bool = True,
    in_batch: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scores, base, gains, valid) shaped like ``_batch_candidates``' output: a union of
    positive columns (each row's own graded, the rest negatives or invalid), hard negatives,
    a few invalid (padding) columns, and exact score ties."""
    gen = torch.Generator().manual_seed(seed)
    width = positives + negatives
    scores = torch.rand(b, width, generator=gen) * 2 - 1
    if width > 5:
        scores[:, 3] = scores[:, 5]  # ties, also between a positive and a negative
    base = torch.rand(b, width, generator=gen) * 2 - 1
    gains = torch.zeros(b, width)
    valid = torch.zeros(b, width, dtype=torch.bool)
    choice = torch.tensor(grades, dtype=torch.float32)
    for i in range(b):
        own = torch.randperm(positives, generator=gen)[: 1 + i % positives]
        pick = torch.randint(len(grades), (own.numel(),), generator=gen)
        gains[i, own] = choice[pick] if graded else 1.0
        valid[i, own] = True
        if in_batch:
            valid[i, :positives] = True
        valid[i, positives:] = torch.rand(negatives, generator=gen) > 0.1
    return scores, base, gains, valid


CASES = [
    dict(seed=0),
    dict(seed=1, grades=(1,)),
    dict(seed=2, grades=(1, 2), in_batch=False),
    dict(seed=3, graded=False),
    dict(seed=4, b=32, positives=300, negatives=32, grades=(1, 2)),  # NFCorpus-like
    dict(seed=5, b=3, positives=2, negatives=0, grades=(1, 2)),  # no negatives at all
]


def _value_and_grads(fn, scores: torch.Tensor, base: torch.Tensor):
    s = scores.clone().requires_grad_(True)
    b = base.clone().requires_grad_(True)
    out = fn(s, b)
    grads = torch.autograd.grad(out, (s, b), allow_unused=True, materialize_grads=True)
    return out.detach(), grads


@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
@pytest.mark.parametrize("loss", ["ce", "margin", "improvement", "ce+margin+improvement"])
@pytest.mark.parametrize("graded", [True, False])
def test_losses_match_the_pair_mask_oracle(case: dict, loss: str, graded: bool) -> None:
    scores, base, gains, valid = batch(**case)
    cfg = TrainConfig(loss=loss, graded=graded, temperature=0.05, margin=0.3)
    got, got_grads = _value_and_grads(lambda s, b: _loss(s, b, gains, valid, cfg), scores, base)
    want, want_grads = _value_and_grads(
        lambda s, b: _oracle_loss(s, b, gains, valid, cfg), scores, base
    )
    assert torch.isfinite(got) and torch.isfinite(want)
    torch.testing.assert_close(got, want, **FP32)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert bool(torch.isfinite(g).all())
        torch.testing.assert_close(g, w, **FP32)


@pytest.mark.parametrize("temperature", [0.01, 0.05, 1.0])
def test_ce_matches_the_oracle_at_every_temperature(temperature: float) -> None:
    scores, _, gains, valid = batch(7, b=16, positives=60, negatives=32)
    for graded in (True, False):
        torch.testing.assert_close(
            _ce_loss(scores, gains, valid, temperature, graded),
            _oracle_ce_loss(scores, gains, valid, temperature, graded),
            **FP32,
        )


def test_hinge_counts_each_ranked_pair_once_at_the_margin_boundary() -> None:
    # Exactly at the margin a pair costs 0 (relu(0)); just inside it costs its distance.
    scores = torch.tensor([[0.5, 0.25, 0.25, 0.5]], dtype=torch.float64)
    gains = torch.tensor([[2.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    valid = torch.ones(1, 4, dtype=torch.bool)
    # pairs: (0,1) 0.25-0.25=0, (0,2) 0, (0,3) 0.25, (1,2) 0.25, (1,3) 0.5 -> mean 0.2
    got = _pairwise_hinge(scores, gains, valid, 0.25)
    assert float(got) == pytest.approx(0.2, abs=1e-12)
    # A pair exactly at the margin has no gradient either (relu'(0) = 0, as the oracle's).
    x = scores.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(_pairwise_hinge(x, gains, valid, 0.25), x)
    y = scores.clone().requires_grad_(True)
    oracle = _oracle_pairwise_hinge(
        y[:, :, None] - y[:, None, :], _oracle_pair_mask(gains, valid), 0.25
    )
    (want,) = torch.autograd.grad(oracle, y)
    torch.testing.assert_close(grad, want, atol=1e-12, rtol=0)
    torch.testing.assert_close(grad, torch.tensor([[-0.2, -0.4, 0.2, 0.4]], dtype=torch.float64))


def test_positives_without_any_competitor_give_zero_loss_and_finite_gradients() -> None:
    # Every valid column is a positive of the same grade: no pair, no softmax term.
    scores = torch.tensor([[0.3, 0.1, 0.0]], requires_grad=True)
    gains = torch.tensor([[1.0, 1.0, 0.0]])
    valid = torch.tensor([[True, True, False]])
    for loss in ("ce", "margin", "improvement"):
        out = _loss(scores, scores.detach(), gains, valid, TrainConfig(loss=loss))
        (grad,) = torch.autograd.grad(out, scores)
        assert float(out.detach()) == 0.0
        assert bool(torch.isfinite(grad).all()) and bool((grad == 0).all())


def test_losses_at_scale_stay_within_b_times_l_memory() -> None:
    # 32 queries x 3032 columns: the old form's (B, L, L) tensors were 1.2 GB each (float32)
    # and it held several at once; the per-level forms keep to (B, L) ones (under 1 MB).
    from benchmarks._common import peak_extra_memory

    scores, _, gains, valid = batch(8, b=32, positives=3000, negatives=32, grades=(1, 2))
    cfg = dataclasses.replace(TrainConfig(), loss="ce+margin+improvement")
    s = scores.clone().requires_grad_(True)

    def run() -> torch.Tensor:
        out = _loss(s, scores * 0.5, gains, valid, cfg)
        out.backward()
        return out.detach()

    out, peak = peak_extra_memory(run)
    assert torch.isfinite(out) and bool(torch.isfinite(s.grad).all())
    if peak is not None:
        assert peak < 256 * 2**20, f"{peak / 2**20:.0f} MB"


# ----------------------------------------------------------------------------- shared columns
def _scoring_state(modulation: str, seed: int, offset: float = 0.0):
    from imrnns import IMRNNConfig
    from tests.helpers import randomised

    torch.manual_seed(seed)
    model = randomised(IMRNNConfig(input_dim=24, dim=16, modulation=modulation)).train()
    rows = torch.randn(40, 16) + offset
    corpus_p = torch.nn.functional.normalize(rows, dim=1).requires_grad_(True)
    pq = torch.nn.functional.normalize(torch.randn(5, 16), dim=1)
    fb = torch.randint(0, 40, (5, 7))
    tq, _, q_tilde = model.query_state(pq, corpus_p, fb)
    if offset and modulation == "diagonal":
        # y = d * s + b nearly constant (rows sharing a large offset, s ~ 1, b ~ 0): its
        # one-pass variance is ill-conditioned, the case the shared path hands to the op.
        tq = torch.cat([torch.ones(5, 16), torch.zeros(5, 16)], dim=1) + 0.01 * tq
    return model, corpus_p, tq, q_tilde


def _grads(model, corpus_p, tq, q_tilde, fn):
    weights = torch.linspace(-1.0, 2.0, 5 * 9).view(5, 9)
    scores = fn()
    params = [corpus_p, *(p for p in model.parameters() if p.requires_grad)]
    grads = torch.autograd.grad((scores * weights).sum(), params, allow_unused=True)
    return scores.detach(), [
        torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)
    ]


@pytest.mark.usefixtures("cpu_backend_one_thread")
@pytest.mark.parametrize("modulation", ["diagonal", "affine"])
@pytest.mark.parametrize("offset", [0.0, 30.0])  # 30: ill-conditioned moments, the op's path
def test_shared_columns_score_and_differentiate_as_the_op(
    modulation: str, offset: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    from imrnns import IMRNN
    from imrnns.training.losses import _candidate_scores

    widths: list[int] = []
    real = IMRNN.score_ids

    def spy(self, corpus, ids, *rest):
        widths.append(ids.shape[1])
        return real(self, corpus, ids, *rest)

    monkeypatch.setattr(IMRNN, "score_ids", spy)

    shared = torch.tensor([1, 4, 5, 9, 22, 39])
    own = torch.tensor([[0, 2, 3]] * 5) + torch.arange(5)[:, None]
    cand = torch.cat([shared.expand(5, -1), own], dim=1)
    state = _scoring_state(modulation, 3, offset)
    got, got_g = _grads(*state, lambda: _candidate_scores(state[0], state[1], cand, 6, *state[2:]))
    state = _scoring_state(modulation, 3, offset)
    want, want_g = _grads(*state, lambda: state[0].score_ids(state[1], cand, *state[2:]))
    torch.testing.assert_close(got, want, **FP32)
    for g, w in zip(got_g, want_g, strict=True):
        torch.testing.assert_close(g, w, **FP32)
    # The shared columns go to the op only for affine or ill-conditioned moments.
    shared_by_op = modulation == "affine" or offset > 0
    assert widths == ([6, 3] if shared_by_op else [3]) + [9]  # then the reference call's 9


# ----------------------------------------------------------------------------- one whole step
# The step as it was before the rewrite (commit 3bb0ddf, imrnns/training/{batches,losses}.py),
# kept verbatim but for names: every row's candidates scored by the op (no shared-column
# GEMMs), base cosines by one einsum, the distillation's positives by per-row sets.
def _oracle_batch_candidates(data, rows, config, gen, qs=None):
    qs = data.train if qs is None else qs
    union = sorted({d for r in rows for d in qs.positives[r][0]})
    col = {d: j for j, d in enumerate(union)}
    b, u, h = len(rows), len(union), config.num_negatives
    gains = torch.zeros(b, u + h)
    valid = torch.zeros(b, u + h, dtype=torch.bool)
    ids = torch.zeros(b, u + h, dtype=torch.int64)
    if u:
        ids[:, :u] = torch.tensor(union, dtype=torch.int64)
    in_batch = config.uses_in_batch
    if in_batch:
        valid[:, :u] = True
    for i, r in enumerate(rows):
        docs, grades = qs.positives[r]
        for d, g in zip(docs, grades, strict=True):
            gains[i, col[d]] = float(g) if config.graded else 1.0
            valid[i, col[d]] = True
        if h == 0:
            continue
        pos = set(docs)
        pool = [d for d in qs.pool_ids[r].tolist() if d not in pos]
        if not pool:
            continue
        chosen: list[int] = []
        if config.cited_negatives > 0:
            cited = [d for d in pool if d in data.train.cited]
            perm = torch.randperm(len(cited), generator=gen)[: config.cited_negatives].tolist()
            chosen = [cited[p] for p in perm]
        taken = set(chosen)
        rest = [d for d in pool if d not in taken]
        perm = torch.randperm(len(rest), generator=gen)[: h - len(chosen)].tolist()
        chosen += [rest[p] for p in perm]
        for j, d in enumerate(chosen):
            ids[i, u + j] = d
            valid[i, u + j] = not (in_batch and d in col)
    return ids, gains, valid


def _oracle_query_loss(model, qs, rows, cand, gains, valid, config, gen, corpus_p, corpus_unit):
    import math

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
    loss = _oracle_loss(scores, base, gains, valid, config)
    if config.distill_weight > 0:
        fb_scores = model.score_ids(corpus_p, fb, tq, q_tilde)
        fb_base = torch.einsum("bn,bln->bl", q_unit, corpus_unit[fb])
        keep = torch.ones_like(fb, dtype=torch.bool)
        for i, r in enumerate(rows):
            pos = set(qs.positives[r][0])
            keep[i] = torch.tensor([d not in pos for d in fb[i].tolist()])
        loss = loss + config.distill_weight * _oracle_distill(
            fb_scores, fb_base, keep, config.distill_temperature
        )
    return loss


def _oracle_distill(scores, base, keep, temperature):
    neg_inf = torch.finfo(scores.dtype).min
    log_p = torch.log_softmax((base / temperature).masked_fill(~keep, neg_inf), dim=1)
    log_q = torch.log_softmax((scores / temperature).masked_fill(~keep, neg_inf), dim=1)
    kl = (log_p.exp() * (log_p - log_q)).masked_fill(~keep, 0.0).sum(dim=1)
    return kl.mean()


def _oracle_step_loss(model, data, rows, config, gen, corpus_unit):
    cand, gains, valid = _oracle_batch_candidates(data, rows, config, gen)
    corpus_p = model.project(data.corpus)
    loss = _oracle_query_loss(model, data.train, rows, cand, gains, valid, config, gen,
                              corpus_p, corpus_unit)  # fmt: skip
    if config.anchor_weight > 0:
        pick = torch.randperm(data.anchor_rows.shape[0], generator=gen)[: config.anchor_batch]
        a_fb = data.anchor_fb[pick]
        a_pq = corpus_p[data.anchor_rows[pick]]
        a_tq, _, a_qt = model.query_state(
            a_pq, corpus_p, a_fb, model.feedback_weights(data.anchor_fb_scores[pick])
        )
        a_scores = model.score_ids(corpus_p, a_fb, a_tq, a_qt)
        loss = loss + config.anchor_weight * _oracle_distill(
            a_scores, data.anchor_fb_scores[pick], torch.ones_like(a_fb, dtype=torch.bool),
            config.distill_temperature,
        )  # fmt: skip
    return loss


@pytest.fixture(scope="module")
def graded_data():
    from imrnns.training import prepare_training_data
    from tests.helpers import synthetic_graded

    split = synthetic_graded(seed=11, n_docs=200, dim=24, n_train=120, n_test=4)[0]
    cfg = TrainConfig(feedback_k=20, negative_pool=40, num_negatives=12, cited_negatives=4,
                      distill_weight=0.5, anchor_weight=0.3, query_noise=0.1, seed=3)  # fmt: skip
    return prepare_training_data(split, cfg), cfg


@pytest.mark.usefixtures("cpu_backend_one_thread")
@pytest.mark.parametrize("loss", ["ce", "ce+margin+improvement"])
@pytest.mark.parametrize("graded", [True, False])
@pytest.mark.parametrize("modulation", ["diagonal", "affine"])
def test_a_whole_step_matches_the_old_step_on_a_frozen_seed(
    graded_data, loss: str, graded: bool, modulation: str
) -> None:
    # Five graded positives per query (two of grade 2, three of grade 1), 16 queries: the
    # union has ~80 shared columns. Same seed, same draws: the same loss and gradients.
    from imrnns import IMRNN
    from imrnns.training.losses import _step_loss

    data, base_cfg = graded_data
    cfg = dataclasses.replace(base_cfg, loss=loss, graded=graded, modulation=modulation)
    unit = torch.nn.functional.normalize(data.corpus, dim=1)
    rows = list(range(3, 19))
    results = []
    for step in (_step_loss, _oracle_step_loss):
        torch.manual_seed(0)
        model = IMRNN(cfg.model_config(int(data.corpus.shape[1]))).train()
        with torch.no_grad():  # random biases and LayerNorm affines: zeros would hide mistakes
            for p in model.parameters():
                p.add_(0.1 * torch.randn(p.shape))
        out = step(model, data, rows, cfg, torch.Generator().manual_seed(42), unit)
        grads = torch.autograd.grad(out, list(model.parameters()), allow_unused=True)
        results.append((out.detach(), grads))
    (got, got_g), (want, want_g) = results
    assert bool(torch.isfinite(got)) and float(got) > 0
    torch.testing.assert_close(got, want, **FP32)
    for g, w in zip(got_g, want_g, strict=True):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w, **FP32)
