"""The adapter's configuration: architecture and official semantics (docs/design.md section 1).

Below :mod:`imrnns.model` and the checkpoint format, which both need it and nothing else from
each other.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from imrnns_kernels import _validation as checks

Modulation = Literal["diagonal", "affine"]
Aggregation = Literal["mean_of_transforms", "transform_of_mean"]
Weighting = Literal["uniform", "score_weighted"]

AGGREGATIONS = ("mean_of_transforms", "transform_of_mean")
WEIGHTINGS = ("uniform", "score_weighted")


@dataclass(frozen=True)
class IMRNNConfig:
    """Architecture and semantics of an IMRNN adapter.

    Attributes:
        input_dim: base-encoder dim n (384 for all-MiniLM-L6-v2, 1024 for e5-large-v2).
        dim: working dim m after projection; None means m = n (official v0.2).
        modulation: ``"diagonal"`` (OUT = 2m) or ``"affine"`` (OUT = m*m + m).
        aggregation: ``"mean_of_transforms"`` (paper, official v0.2) or
            ``"transform_of_mean"`` (official v0.1, needed for its checkpoints).
        feedback_weighting: ``"uniform"`` mean over the feedback set, or ``"score_weighted"``
            by ``softmax(first_stage_score / feedback_temperature)``.
        feedback_temperature: temperature of the score weighting.
        hidden_dims: HyperNet hidden widths (official: 128, 64).
        dropout: dropout after each HyperNet ReLU, in training only (official v0.1: 0.1).
        layer_norm_eps: epsilon of both LayerNorms, finite and > 0 (torch default 1e-5, as
            official): with 0 a constant row (zero variance) normalises to 0/0 = NaN.
    """

    input_dim: int = 384
    dim: int | None = None
    modulation: Modulation = "diagonal"
    aggregation: Aggregation = "mean_of_transforms"
    feedback_weighting: Weighting = "uniform"
    feedback_temperature: float = 0.05
    hidden_dims: tuple[int, int] = (128, 64)
    dropout: float = 0.0
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("input_dim", "dim"):
            value = getattr(self, name)
            if value is None and name == "dim":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        checks.check_modulation(self.modulation)
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.feedback_weighting not in WEIGHTINGS:
            raise ValueError(
                f"feedback_weighting must be one of {WEIGHTINGS}, got {self.feedback_weighting!r}"
            )
        if not self.feedback_temperature > 0:
            raise ValueError(f"feedback_temperature must be > 0, got {self.feedback_temperature}")
        hidden = tuple(self.hidden_dims)
        if len(hidden) != 2 or any(isinstance(h, bool) or int(h) != h or h <= 0 for h in hidden):
            raise ValueError(f"hidden_dims must be two positive ints, got {self.hidden_dims!r}")
        object.__setattr__(self, "hidden_dims", (int(hidden[0]), int(hidden[1])))
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not 0.0 < eps < math.inf:
            raise ValueError(f"layer_norm_eps must be a finite float > 0, got {eps!r}")

    @property
    def working_dim(self) -> int:
        """m: the projected dim."""
        return self.input_dim if self.dim is None else self.dim

    @property
    def transform_dim(self) -> int:
        """OUT: width of a HyperNet output."""
        return checks.transform_dim(self.working_dim, self.modulation)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["hidden_dims"] = list(self.hidden_dims)
        d["dim"] = self.working_dim
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IMRNNConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown IMRNNConfig fields {unknown}; known: {sorted(known)}")
        kwargs = dict(data)
        if "hidden_dims" in kwargs:
            kwargs["hidden_dims"] = tuple(kwargs["hidden_dims"])
        return cls(**kwargs)

    @classmethod
    def official_v01(cls, input_dim: int, dim: int = 256) -> IMRNNConfig:
        """Official v0.1: m=256, diagonal, HyperNet of the mean modulated document."""
        return cls(
            input_dim=input_dim,
            dim=dim,
            modulation="diagonal",
            aggregation="transform_of_mean",
            dropout=0.1,
        )

    @classmethod
    def official_v02(cls, input_dim: int) -> IMRNNConfig:
        """Official v0.2: m=n, diagonal, mean of per-document transforms."""
        return cls(input_dim=input_dim, dim=input_dim, modulation="diagonal")
