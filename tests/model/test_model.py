"""The model computes exactly docs/design.md section 1, for both forms and both aggregations."""

from __future__ import annotations

import json

import pytest
import torch

from imrnns import IMRNN, IMRNNConfig
from tests.helpers import randomised
from tests.restate import restate_scores

CASES = [
    ("diagonal", "mean_of_transforms", 50, 50),
    ("diagonal", "transform_of_mean", 67, 23),
    ("affine", "mean_of_transforms", 41, 17),
    ("affine", "transform_of_mean", 30, 30),
]


@pytest.mark.parametrize(("modulation", "aggregation", "n", "m"), CASES)
@pytest.mark.parametrize("weighted", [False, True])
def test_scores_match_restatement(modulation, aggregation, n, m, weighted):
    cfg = IMRNNConfig(input_dim=n, dim=m, modulation=modulation, aggregation=aggregation)
    model = randomised(cfg).double()
    b, k = 3, 7
    q, c = torch.randn(b, n, dtype=torch.float64), torch.randn(b, k, n, dtype=torch.float64)
    w = torch.rand(b, k, dtype=torch.float64) + 0.05 if weighted else None
    got = model.score(q, c, w)
    state = model.state_dict()
    for i in range(b):
        want = restate_scores(
            state,
            q[i],
            c[i],
            modulation=modulation,
            aggregation=aggregation,
            weights=None if w is None else w[i],
        )
        torch.testing.assert_close(got[i].double(), want, atol=1e-6, rtol=0)


def test_forward_returns_consistent_modulation_vectors():
    cfg = IMRNNConfig(input_dim=40, dim=24)
    model = randomised(cfg)
    q, c = torch.randn(2, 40), torch.randn(2, 5, 40)
    out = model(q, c)
    assert out.scores.shape == (2, 5) and out.scores.dtype == torch.float32
    assert out.query_transform.shape == (2, 48) and out.document_transform.shape == (2, 48)
    assert out.modulated_documents.shape == (2, 5, 24) and out.modulated_queries.shape == (2, 24)
    cos = torch.nn.functional.cosine_similarity(
        out.modulated_queries[:, None, :], out.modulated_documents, dim=-1
    )
    torch.testing.assert_close(out.scores, cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(model.score(q, c), out.scores)
    # diagonal transforms are (sigmoid, tanh): scale in (0, 1), bias in (-1, 1)
    s = out.query_transform[:, :24]
    assert bool((s > 0).all() and (s < 1).all())


def test_uniform_weights_equal_no_weights():
    model = randomised(IMRNNConfig(input_dim=20, dim=20))
    q, c = torch.randn(2, 20), torch.randn(2, 6, 20)
    torch.testing.assert_close(model.score(q, c, torch.full((2, 6), 3.0)), model.score(q, c))


def test_score_weighted_softmax():
    model = IMRNN(
        IMRNNConfig(input_dim=8, feedback_weighting="score_weighted", feedback_temperature=0.5)
    )
    w = model.feedback_weights(torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(w, torch.softmax(torch.tensor([[2.0, 0.0]]), dim=1))
    assert IMRNN(IMRNNConfig(input_dim=8)).feedback_weights(torch.ones(1, 2)) is None


def test_candidate_order_is_equivariant():
    model = randomised(IMRNNConfig(input_dim=32, dim=16))
    q, c = torch.randn(1, 32), torch.randn(1, 9, 32)
    perm = torch.randperm(9)
    torch.testing.assert_close(model.score(q, c)[:, perm], model.score(q, c[:, perm]))


def test_official_initialisation():
    model = IMRNN(IMRNNConfig(input_dim=16))
    torch.testing.assert_close(model.projector.weight, torch.eye(16))
    assert float(model.query_hypernet.hypernet[0].bias.detach().abs().max()) == 0.0
    std = float(model.doc_hypernet.hypernet[0].weight.detach().std())
    assert 0.005 < std < 0.02
    affine = IMRNN(IMRNNConfig(input_dim=6, modulation="affine"))
    w = affine.query_hypernet.hypernet[6].bias[:36].view(6, 6)
    torch.testing.assert_close(w, torch.eye(6))


def test_gradients_flow_to_every_parameter():
    model = randomised(IMRNNConfig(input_dim=12, dim=10)).train()
    out = model(torch.randn(3, 12), torch.randn(3, 4, 12))
    out.scores.sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
        assert float(p.grad.abs().sum()) > 0, name


def test_dropout_only_in_training():
    model = randomised(IMRNNConfig(input_dim=12, dim=10, dropout=0.5))
    q, c = torch.randn(2, 12), torch.randn(2, 4, 12)
    torch.testing.assert_close(model.score(q, c), model.score(q, c))
    model.train()
    torch.manual_seed(1)
    a = model(q, c).scores
    torch.manual_seed(2)
    assert not torch.allclose(a, model(q, c).scores)


@pytest.mark.parametrize(
    ("queries", "candidates", "exc", "pattern"),
    [
        (torch.randn(2, 11), torch.randn(2, 3, 12), ValueError, r"last dim 12.*\(2, 11\)"),
        (torch.randn(2, 12), torch.randn(2, 3, 11), ValueError, r"candidates.*\(2, 3, 11\)"),
        (torch.randn(12), torch.randn(2, 3, 12), ValueError, r"rank 2.*\(12,\)"),
        (torch.randn(2, 12), torch.randn(3, 12), ValueError, r"rank 3"),
        (torch.randn(2, 12), torch.randn(3, 3, 12), ValueError, r"batch size"),
        (torch.randn(2, 12), torch.randn(2, 0, 12), ValueError, r"empty candidate set"),
        (torch.ones(2, 12, dtype=torch.int64), torch.randn(2, 3, 12), TypeError, r"int64"),
        (torch.randn(2, 12), torch.ones(2, 3, 12, dtype=torch.int32), TypeError, r"int32"),
        ([[0.0] * 12], torch.randn(1, 3, 12), TypeError, r"torch.Tensor"),
    ],
)
def test_bad_input_is_rejected(queries, candidates, exc, pattern):
    model = IMRNN(IMRNNConfig(input_dim=12, dim=8))
    with pytest.raises(exc, match=pattern):
        model.score(queries, candidates)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_embeddings_are_rejected(bad):
    model = IMRNN(IMRNNConfig(input_dim=12, dim=8))
    q, c = torch.randn(2, 12), torch.randn(2, 3, 12)
    c[1, 2, 5] = bad
    with pytest.raises(ValueError, match=r"candidates contains 1 NaN/Inf"):
        model.score(q, c)
    q[0, 0] = bad
    with pytest.raises(ValueError, match=r"queries contains 1 NaN/Inf"):
        model(q, c[:, :2])


def test_mismatched_devices_are_rejected():
    model = IMRNN(IMRNNConfig(input_dim=12, dim=8))
    with pytest.raises(ValueError, match=r"meta.*model is on cpu"):
        model.score(torch.randn(2, 12, device="meta"), torch.randn(2, 3, 12))


def test_bad_feedback_weights():
    model = IMRNN(IMRNNConfig(input_dim=12, dim=8))
    q, c = torch.randn(2, 12), torch.randn(2, 3, 12)
    with pytest.raises(ValueError, match=r"non-negative"):
        model.score(q, c, torch.tensor([[1.0, -1.0, 1.0], [1.0, 1.0, 1.0]]))
    with pytest.raises(ValueError, match=r"sum to zero"):
        model.score(q, c, torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"NaN/Inf"):
        model.score(q, c, torch.full((2, 3), float("nan")))
    with pytest.raises(ValueError, match=r"shape \(2, 3\)"):
        model.score(q, c, torch.ones(2, 4))


def test_reduced_precision_inputs_are_upcast():
    model = randomised(IMRNNConfig(input_dim=16, dim=16))
    q, c = torch.randn(2, 16), torch.randn(2, 5, 16)
    got = model.score(q.half(), c.bfloat16())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, model.score(q.half().float(), c.bfloat16().float()))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"input_dim": 0},
        {"input_dim": 8, "dim": -1},
        {"input_dim": 8, "modulation": "full"},
        {"input_dim": 8, "aggregation": "max"},
        {"input_dim": 8, "feedback_weighting": "rank"},
        {"input_dim": 8, "feedback_temperature": 0.0},
        {"input_dim": 8, "hidden_dims": (128,)},
        {"input_dim": 8, "dropout": 1.0},
        # Regression: accepted, then every score failed as "queries contains NaN/Inf".
        {"input_dim": 8, "layer_norm_eps": -1.0},
        {"input_dim": 8, "layer_norm_eps": float("nan")},
        {"input_dim": 8, "layer_norm_eps": "1e-5"},
    ],
)
def test_config_validation(kwargs):
    with pytest.raises(ValueError):
        IMRNNConfig(**kwargs)


@pytest.mark.parametrize("eps", [0.0, 0, -0.0, float("inf")])
def test_layer_norm_eps_must_be_positive_and_finite(eps):
    # Regression: 0 was accepted; a constant projected row then normalises to 0/0 = NaN.
    with pytest.raises(ValueError, match="layer_norm_eps must be a finite float > 0"):
        IMRNNConfig(input_dim=8, layer_norm_eps=eps)


def test_a_checkpoint_with_layer_norm_eps_0_is_refused_naming_its_config(tmp_path):
    IMRNN(IMRNNConfig(input_dim=8)).save_pretrained(tmp_path / "adapter")
    path = tmp_path / "adapter" / "config.json"
    saved = json.loads(path.read_text())
    saved["config"]["layer_norm_eps"] = 0.0
    path.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"config\.json: invalid config \(layer_norm_eps"):
        IMRNN.from_pretrained(tmp_path / "adapter")


def test_config_round_trip():
    cfg = IMRNNConfig(input_dim=10, dim=4, modulation="affine", hidden_dims=(32, 16))
    again = IMRNNConfig.from_dict(cfg.to_dict())
    assert again == cfg
    with pytest.raises(ValueError, match="unknown IMRNNConfig fields"):
        IMRNNConfig.from_dict({**cfg.to_dict(), "bogus": 1})
