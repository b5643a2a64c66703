"""Bad input to the fused ops of imrnns_kernels: shapes, dtypes, NaN/Inf, k, weights."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import imrnns_kernels as K
from tests.bad_input.harness import (
    Workspace,
    case,
    defined,
    register,
)


# --------------------------------------------------------------------------- fused ops
def score_args(**change: Any) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    b, n, m, k = 2, 11, 6, 3
    corpus = torch.randn(n, m, generator=g)
    a = {
        "corpus": corpus / corpus.norm(dim=1, keepdim=True),
        "ids": torch.randint(0, n, (b, k), generator=g),
        "transform": torch.rand(b, 2 * m, generator=g),
        "ln_weight": torch.ones(m),
        "ln_bias": torch.zeros(m),
        "queries": torch.randn(b, m, generator=g),
        "modulation": "diagonal",
    }
    a.update(change)
    return a


def topk_args(**change: Any) -> dict[str, Any]:
    a = score_args(**change)
    a.pop("ids")
    return a


def hypernet(m: int = 5, out: int = 10) -> K.HyperNetWeights:
    g = torch.Generator().manual_seed(1)
    shapes = ((16, m), (16,), (8, 16), (8,), (out, 8), (out,))
    return K.HyperNetWeights(*(torch.randn(*s, generator=g) for s in shapes))


def _score(**change: Any) -> Callable[[Workspace], Callable[[], Any]]:
    return lambda ws: lambda: K.modulated_score(**score_args(**change))


OPS_SCORE = {
    "ids_past_the_corpus": (
        ValueError,
        r"ids in \[0, 11\].*11 rows",
        {"ids": torch.tensor([[0, 11, 1], [0, 1, 2]])},
    ),
    "negative_ids": (
        ValueError,
        r"ids in \[-1, 2\]",
        {"ids": torch.tensor([[0, -1, 1], [0, 1, 2]])},
    ),
    "float_ids": (TypeError, r"ids must be int32 or int64", {"ids": torch.zeros(2, 3)}),
    "ids_rows_not_queries": (
        ValueError,
        r"ids has 3 rows but there are 2 queries",
        {"ids": torch.zeros(3, 3, dtype=torch.int64)},
    ),
    "empty_candidate_set": (
        ValueError,
        r"empty candidate set",
        {"ids": torch.zeros(2, 0, dtype=torch.int64)},
    ),
    "transform_width": (
        ValueError,
        r"transform must have shape \(2, 12\)",
        {"transform": torch.rand(2, 13)},
    ),
    "queries_dim": (
        ValueError,
        r"queries dim 7 does not match corpus dim 6",
        {"queries": torch.randn(2, 7)},
    ),
    "nan_queries": (
        ValueError,
        r"queries contains 12 NaN/Inf",
        {"queries": torch.full((2, 6), float("nan"))},
    ),
    "inf_transform": (
        ValueError,
        r"transform contains 1 NaN/Inf",
        {
            "transform": torch.full((2, 12), 0.5).index_put_(
                (torch.tensor([0]), torch.tensor([3])), torch.tensor(float("inf"))
            )
        },
    ),
    "int_corpus": (
        TypeError,
        r"corpus must be a floating-point tensor",
        {"corpus": torch.ones(11, 6, dtype=torch.int32)},
    ),
    "unknown_modulation": (
        ValueError,
        r"modulation must be one of \('diagonal', 'affine'\)",
        {"modulation": "full"},
    ),
    "ln_weight_shape": (
        ValueError,
        r"ln_weight must have shape \(6,\)",
        {"ln_weight": torch.ones(5)},
    ),
    "queries_rank_3": (ValueError, r"queries must have rank 2", {"queries": torch.randn(2, 1, 6)}),
    "device_mismatch": (
        ValueError,
        r"tensors must be on one device",
        {"queries": torch.randn(2, 6, device="meta")},
    ),
    "list_not_tensor": (
        TypeError,
        r"queries must be a torch.Tensor, got list",
        {"queries": [[0.0] * 6] * 2},
    ),
}
for _name, (_exc, _match, _change) in OPS_SCORE.items():
    register(f"modulated_score_{_name}", "ops", _exc, _match, _score(**_change))


@case("ops", ValueError, r"k must be positive, got 0")
def topk_k_zero(ws):
    return lambda: K.modulated_topk(k=0, **topk_args())


@case("ops", TypeError, r"k must be an int, got float")
def topk_k_float(ws):
    return lambda: K.modulated_topk(k=2.0, **topk_args())


@case("ops", TypeError, r"k must be an int, got bool")
def topk_k_bool(ws):
    return lambda: K.modulated_topk(k=True, **topk_args())


@case("ops", ValueError, r"corpus is empty")
def topk_empty_corpus(ws):
    return lambda: K.modulated_topk(k=3, **topk_args(corpus=torch.zeros(0, 6)))


@defined("ops")
def topk_k_larger_than_the_corpus(ws):
    def run() -> None:
        s, i = K.modulated_topk(k=15, **topk_args())
        assert s.shape == (2, 15) and (i[:, 11:] == -1).all() and torch.isneginf(s[:, 11:]).all()
        assert (i[:, :11] >= 0).all() and torch.isfinite(s[:, :11]).all()

    return run


@case("ops", ValueError, r"feedback_weights must be non-negative")
def reduce_negative_weights(ws):
    w = torch.ones(2, 4)
    w[0, 1] = -0.5
    return lambda: K.adapter_reduce(
        torch.randn(9, 5), torch.zeros(2, 4, dtype=torch.long), hypernet(), w
    )


@case("ops", ValueError, r"feedback_weights rows \[0, 1\] sum to zero")
def reduce_zero_weights(ws):
    return lambda: K.adapter_reduce(
        torch.randn(9, 5), torch.zeros(2, 4, dtype=torch.long), hypernet(), torch.zeros(2, 4)
    )


@case("ops", ValueError, r"feedback_weights contains 1 NaN/Inf")
def reduce_nan_weights(ws):
    w = torch.ones(2, 4)
    w[1, 2] = float("nan")
    return lambda: K.adapter_reduce(
        torch.randn(9, 5), torch.zeros(2, 4, dtype=torch.long), hypernet(), w
    )


@case("ops", ValueError, r"feedback_weights must have shape \(2, 4\)")
def reduce_weights_shape(ws):
    return lambda: K.adapter_reduce(
        torch.randn(9, 5), torch.zeros(2, 4, dtype=torch.long), hypernet(), torch.ones(2, 3)
    )


@case("ops", ValueError, r"does not match affine modulation at dim 5")
def reduce_width_for_modulation(ws):
    return lambda: K.adapter_reduce(
        torch.randn(9, 5), torch.zeros(2, 4, dtype=torch.long), hypernet(), None, "affine"
    )


@case("ops", ValueError, r"HyperNet input width 5 does not match corpus dim 4")
def reduce_input_width(ws):
    return lambda: K.adapter_reduce(
        torch.randn(9, 4), torch.zeros(2, 4, dtype=torch.long), hypernet()
    )


@case("ops", TypeError, r"weights must be a HyperNetWeights, got tuple")
def reduce_plain_tuple(ws):
    return lambda: K.adapter_reduce(
        torch.randn(9, 5), torch.zeros(2, 4, dtype=torch.long), tuple(hypernet())
    )


@case("ops", ValueError, r"ids holds ids in \[9, 9\], outside the corpus of 9 rows")
def reduce_ids_past_the_corpus(ws):
    return lambda: K.adapter_reduce(torch.randn(9, 5), torch.full((2, 4), 9), hypernet())


@case("ops", ValueError, r"cache must hold the activated per-document outputs")
def reduce_cache_shape(ws):
    if "cache" not in K.adapter_reduce.__code__.co_varnames:
        pytest.skip("adapter_reduce takes no cache yet")
    return lambda: K.adapter_reduce(
        torch.randn(9, 5), torch.zeros(2, 4, dtype=torch.long), hypernet(), cache=torch.zeros(9, 3)
    )


@case("ops", ValueError, r"x has last dim 6 but the projection expects 7")
def project_dim(ws):
    return lambda: K.project(torch.randn(2, 6), torch.randn(5, 7), torch.randn(5))


@case("ops", TypeError, r"x must be a floating-point tensor")
def project_int(ws):
    return lambda: K.project(torch.ones(2, 7, dtype=torch.int64), torch.randn(5, 7), None)


@case("ops", ValueError, r"x must have rank 2 or 3")
def layernorm_rank_4(ws):
    return lambda: K.modulate_layernorm(
        torch.randn(2, 1, 1, 6), torch.rand(2, 12), torch.ones(6), torch.zeros(6), "diagonal"
    )


@case("ops", ValueError, r"chunk_rows must be a positive int or None, got 0")
def document_transforms_chunk(ws):
    return lambda: K.document_transforms(torch.randn(9, 5), hypernet(), "diagonal", 0)


@case("ops", ValueError, r"unknown backend 'gpu'")
def unknown_backend(ws):
    def run() -> None:
        with K.use_backend("gpu"):
            pass

    return run
