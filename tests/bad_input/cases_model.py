"""Bad input to the model: its config and the arguments of score/forward."""

from __future__ import annotations

import numpy as np
import torch

from imrnns import IMRNNConfig
from tests.bad_input.harness import (
    N_IN,
    case,
)


# --------------------------------------------------------------------------- the model
@case("model", ValueError, r"dim must be a positive int, got 0")
def config_dim_zero(ws):
    return lambda: IMRNNConfig(input_dim=8, dim=0)


@case("model", ValueError, r"input_dim must be a positive int, got True")
def config_bool_dim(ws):
    return lambda: IMRNNConfig(input_dim=True)


@case("model", ValueError, r"modulation must be one of")
def config_modulation(ws):
    return lambda: IMRNNConfig(modulation="full")


@case("model", ValueError, r"aggregation must be one of")
def config_aggregation(ws):
    return lambda: IMRNNConfig(aggregation="max")


@case("model", ValueError, r"feedback_temperature must be > 0, got 0")
def config_temperature(ws):
    return lambda: IMRNNConfig(feedback_weighting="score_weighted", feedback_temperature=0.0)


@case("model", ValueError, r"dropout must be in \[0, 1\), got 1.0")
def config_dropout(ws):
    return lambda: IMRNNConfig(dropout=1.0)


@case("model", ValueError, r"hidden_dims must be two positive ints")
def config_hidden(ws):
    return lambda: IMRNNConfig(hidden_dims=(128,))


@case("model", ValueError, r"unknown IMRNNConfig fields \['width'\]")
def config_unknown_field(ws):
    return lambda: IMRNNConfig.from_dict({"input_dim": 8, "width": 3})


@case("model", ValueError, r"candidates must have rank 3")
def score_candidates_rank_2(ws):
    return lambda: ws.model.score(torch.randn(2, N_IN), torch.randn(2, N_IN))


@case("model", ValueError, r"disagree on the batch size")
def score_batch_mismatch(ws):
    return lambda: ws.model.score(torch.randn(2, N_IN), torch.randn(3, 4, N_IN))


@case("model", ValueError, r"queries must have last dim 16 \(the model's input_dim\)")
def score_input_dim(ws):
    return lambda: ws.model.score(torch.randn(2, 15), torch.randn(2, 4, N_IN))


@case("model", TypeError, r"queries must be a floating-point tensor")
def score_int_queries(ws):
    return lambda: ws.model.score(torch.ones(2, N_IN, dtype=torch.int64), torch.randn(2, 4, N_IN))


@case("model", ValueError, r"candidates contains 1 NaN/Inf")
def score_nan_candidate(ws):
    c = torch.randn(2, 4, N_IN)
    c[1, 2, 3] = float("nan")
    return lambda: ws.model.score(torch.randn(2, N_IN), c)


@case("model", ValueError, r"queries contains 1 NaN/Inf")
def score_inf_query(ws):
    q = torch.randn(2, N_IN)
    q[0, 0] = float("-inf")
    return lambda: ws.model.score(q, torch.randn(2, 4, N_IN))


@case("model", ValueError, r"empty candidate set")
def score_no_candidates(ws):
    return lambda: ws.model.score(torch.randn(2, N_IN), torch.randn(2, 0, N_IN))


@case("model", TypeError, r"queries must be a torch.Tensor, got ndarray")
def score_numpy(ws):
    return lambda: ws.model.score(np.zeros((2, N_IN), np.float32), torch.randn(2, 4, N_IN))


@case("model", ValueError, r"feedback_weights must be non-negative")
def score_negative_weights(ws):
    return lambda: ws.model.score(torch.randn(2, N_IN), torch.randn(2, 4, N_IN), -torch.ones(2, 4))
