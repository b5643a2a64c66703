"""What determines a training run: :class:`TrainConfig` and its ``key=value`` overrides.

Tested in tests/training/test_train.py (validation of every field, JSON round trip, overrides) and
through the command line in tests/cli/test_cli.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from imrnns.config import IMRNNConfig

__all__ = [
    "FREEZABLE",
    "LOSSES",
    "PROJECTOR_INITS",
    "PSEUDO_SOURCES",
    "SELECTIONS",
    "TrainConfig",
    "parse_overrides",
]

LOSSES = ("ce", "mnrl", "margin", "improvement")
SELECTIONS = ("mean", "unseen", "seen", "overall", "overall_if_unseen")
PROJECTOR_INITS = ("auto", "identity", "pca", "random")
# "" (off), the document title, or the first sentence of its text
# (imrnns.training.pseudo_queries.pseudo_query_texts).
PSEUDO_SOURCES = ("", "title", "first_sentence")
FREEZABLE = ("projector", "query_hypernet", "doc_hypernet", "query_norm", "doc_norm")
# Parsed with str.split; the other string fields are checked against their allowed values.
_STR_FIELDS = ("loss", "freeze")
_BOOL_FIELDS = ("in_batch_negatives", "graded")
_FLOAT_FIELDS = ("temperature", "margin", "improvement_margin", "distill_weight",
                 "distill_temperature", "anchor_weight", "dropout", "query_noise", "lr",
                 "weight_decay", "warmup", "max_grad_norm", "ema_decay", "val_fraction",
                 "pseudo_weight")  # fmt: skip


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (and so its checkpoint).

    Model:
        modulation: ``"diagonal"`` or ``"affine"``.
        dim: working dim m (None: m = n, the official v0.2 square projector at identity).
        feedback_k: feedback-set size (first-stage top-k by base cosine).
        feedback_weighting: ``"uniform"`` or ``"score_weighted"`` feedback mean.
        hidden_dims: HyperNet hidden widths (official: 128, 64).
        projector_init: ``"identity"`` (m = n only: the adapter starts as the base cosine
            up to LayerNorm centring), ``"pca"`` (the top-m principal directions of the
            training corpus, centred: the best rank-m start when m < n), ``"random"``
            (``nn.Linear``'s default), or ``"auto"`` (identity when m = n, else pca).
    Objective:
        loss: ``"ce"``, ``"mnrl"``, ``"margin"``, ``"improvement"``, or a ``+``-joined sum.
        temperature: of ``"ce"``/``"mnrl"`` (scores are cosines in [-1, 1]).
        margin: gamma of the paper's margin loss.
        improvement_margin: of the official v0.2 objective.
        distill_weight: weight of a listwise distillation term that keeps the base
            encoder's ordering of each training query's *non-relevant* feedback documents:
            ``KL(softmax(base / t) || softmax(adapted / t))`` over them, ``t`` =
            ``distill_temperature``. It stops the adapter from lifting documents it saw as
            positives above everything else (memorising which documents get cited), which
            is what costs accuracy on queries whose answers were never seen in training.
        anchor_weight: weight of the same distillation on *anchor* pseudo-queries: documents
            that no training query cites, used as queries, each against its base top
            ``feedback_k`` neighbours (itself excluded). Queries whose answers training never
            saw land in such neighbourhoods; the term keeps cited documents from jumping
            into them.
        anchor_batch: anchors per step.
        num_negatives: hard negatives per query, sampled afresh each epoch.
        cited_negatives: how many of the ``num_negatives`` are drawn first from pool
            documents that are relevant to *other* training queries. Ordinary hard negatives
            are mostly documents no training query cites, so the loss alone rewards lifting
            every cited document; negatives that are cited elsewhere cancel that prior.
        negative_pool: sample them from the base first stage's top ``negative_pool``
            (at least ``num_negatives``; a query whose pool holds fewer documents besides its
            positives gets padding columns, counted in the data's
            ``queries_short_of_negatives``).
        in_batch_negatives: also use the other batch queries' positives as negatives.
        graded: weight positives by gain ``2^g - 1`` and order graded positives among
            themselves; False treats every qrel > 0 as an equal positive.
        freeze: comma-separated parts kept at their initial values (``"projector"``,
            ``"query_hypernet"``, ``"doc_hypernet"``, ``"query_norm"``, ``"doc_norm"``).
        dropout: HyperNet dropout during training (stored in the model config; inactive at
            inference).
        query_noise: standard deviation of Gaussian noise added to each training query's
            base embedding (then re-normalised) at every step: the adapter cannot key on
            the exact training queries.
    Optimisation:
        epochs, batch_size, lr, weight_decay: AdamW.
        warmup: fraction of all steps with a linear warm-up (then linear decay to 0).
        max_grad_norm: gradient clipping (0 disables).
        ema_decay: keep an exponential moving average of the weights,
            ``ema = d * ema + (1 - d) * w`` after every optimiser step with
            ``d = min(ema_decay, (1 + t) / (10 + t))`` at step ``t`` (the usual warm-up so that
            early averages are not dominated by the initial weights). Validation, selection
            and ``best/`` then use the averaged weights; ``last/`` keeps both. 0 disables.
    Selection:
        val_fraction: fraction of training queries held out for validation.
        selection: ``"mean"`` (mean of seen-doc and unseen-doc validation nDCG@10),
            ``"unseen"``, ``"seen"``, ``"overall"``, or ``"overall_if_unseen"``: overall
            nDCG@10 among the epochs whose unseen-doc validation nDCG@10 is at least the base
            encoder's (an epoch below it scores ``unseen - base - 1``, so it is only chosen
            when no epoch qualifies, and then the one closest to the base level).
        patience: epochs without improvement before stopping (0: never stop early).
        seed: everything random (initialisation, validation split, batches, negatives).
    Data at scale:
        mining_chunk: training queries read, mined (first stage, negative pool) and
            shuffled together when the training queries are streamed
            (:func:`imrnns.training.prepare_streaming_data`): the memory bound of an epoch.
            In-memory data (:func:`imrnns.training.prepare_training_data`) mines every query
            once and is not affected.
    Corpus pseudo-queries (label-free; see :mod:`imrnns.training`):
        pseudo_queries: ``""`` (off, the default), ``"title"`` (each document's title as a
            query for that document) or ``"first_sentence"`` (the first sentence of its
            text, a leading all-caps heading such as ``BACKGROUND`` removed).
        pseudo_weight: loss weight of the pseudo-query term (> 0).
        pseudo_batch: pseudo-queries per optimiser step, drawn without replacement from a
            per-epoch shuffle of all of them (so an epoch costs about
            ``1 + pseudo_batch / batch_size`` times as much).

    Defaults: chosen on the SciFact validation slice (121 of the 809 train queries; never
    the test split) by the mean of seen-doc and unseen-doc validation nDCG@10; distillation
    (weight 5) is what holds unseen-doc validation nDCG@10 at the base encoder's level
    (benchmarks/RESULTS.md, "Training and evaluation on SciFact").
    """

    modulation: str = "diagonal"
    dim: int | None = None
    feedback_k: int = 100
    feedback_weighting: str = "uniform"
    hidden_dims: tuple[int, int] = (128, 64)
    projector_init: str = "auto"
    loss: str = "ce"
    temperature: float = 0.05
    margin: float = 0.1
    improvement_margin: float = 0.05
    distill_weight: float = 5.0
    distill_temperature: float = 0.05
    anchor_weight: float = 0.0
    anchor_batch: int = 32
    num_negatives: int = 32
    cited_negatives: int = 0
    negative_pool: int = 100
    in_batch_negatives: bool = True
    graded: bool = True
    freeze: str = ""
    dropout: float = 0.0
    query_noise: float = 0.0
    epochs: int = 20
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: float = 0.1
    max_grad_norm: float = 1.0
    ema_decay: float = 0.0
    val_fraction: float = 0.15
    selection: str = "mean"
    patience: int = 6
    seed: int = 42
    pseudo_queries: str = ""
    pseudo_weight: float = 1.0
    pseudo_batch: int = 32
    mining_chunk: int = 4096

    def __post_init__(self) -> None:
        if isinstance(self.hidden_dims, list):  # from JSON
            object.__setattr__(self, "hidden_dims", tuple(self.hidden_dims))
        # Types first: a CLI --set value that is not valid JSON arrives as a string
        # ("graded=False" is the truthy string "False"), and comparing it below would
        # raise an unhelpful TypeError or, for a bool, be silently accepted.
        for name in _STR_FIELDS:
            v = getattr(self, name)
            if not isinstance(v, str):
                raise ValueError(f"{name} must be a string, got {v!r}")
        for name in _BOOL_FIELDS:
            v = getattr(self, name)
            if not isinstance(v, bool):
                raise ValueError(f"{name} must be true or false, got {v!r}")
        for name in _FLOAT_FIELDS:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        terms = self.loss_terms
        bad = [t for t in terms if t not in LOSSES]
        if bad or not terms:
            raise ValueError(f"loss must be one of {LOSSES} or a '+'-joined sum, got {self.loss!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.pseudo_queries not in PSEUDO_SOURCES:
            raise ValueError(
                f"pseudo_queries must be one of {PSEUDO_SOURCES}, got {self.pseudo_queries!r}"
            )
        for name in (
            "feedback_k", "negative_pool", "epochs", "batch_size", "anchor_batch", "pseudo_batch",
            "mining_chunk",
        ):  # fmt: skip
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name in ("num_negatives", "cited_negatives", "patience", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        if self.cited_negatives > self.num_negatives:  # after the type checks: "abc" > 3
            raise ValueError(
                f"cited_negatives ({self.cited_negatives}) cannot exceed num_negatives "
                f"({self.num_negatives})"
            )
        if self.num_negatives > self.negative_pool:
            raise ValueError(
                f"num_negatives ({self.num_negatives}) cannot exceed negative_pool "
                f"({self.negative_pool}), the documents they are drawn from"
            )
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}")
        for name in ("temperature", "lr", "distill_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        w = self.pseudo_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 < w < math.inf:
            raise ValueError(f"pseudo_weight must be a finite number > 0, got {w!r}")
        for name in (
            "margin",
            "improvement_margin",
            "weight_decay",
            "max_grad_norm",
            "distill_weight",
            "anchor_weight",
            "query_noise",
        ):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup must be in [0, 1), got {self.warmup!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction!r}")
        # Building the model config validates modulation, dim and feedback_weighting.
        self.model_config(384)
        if self.projector_init not in PROJECTOR_INITS:
            raise ValueError(
                f"projector_init must be one of {PROJECTOR_INITS}, got {self.projector_init!r}"
            )
        bad = [p for p in self.frozen_parts if p not in FREEZABLE]
        if bad:
            raise ValueError(f"freeze must name parts among {FREEZABLE}, got {bad}")

    @property
    def frozen_parts(self) -> tuple[str, ...]:
        return tuple(p.strip() for p in self.freeze.split(",") if p.strip())

    @property
    def loss_terms(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.loss.split("+") if t.strip())

    @property
    def uses_in_batch(self) -> bool:
        return self.in_batch_negatives or "mnrl" in self.loss_terms

    def model_config(self, input_dim: int) -> IMRNNConfig:
        return IMRNNConfig(
            input_dim=input_dim,
            dim=self.dim,
            modulation=self.modulation,  # type: ignore[arg-type]
            feedback_weighting=self.feedback_weighting,  # type: ignore[arg-type]
            hidden_dims=self.hidden_dims,
            dropout=self.dropout,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}; known: {sorted(known)}")
        return cls(**data)


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``key=value`` pairs for :class:`TrainConfig`; values parsed as JSON when possible
    (``epochs=5``, ``dim=null``), else kept as strings (``loss=margin``).

    Raises:
        ValueError: an item without ``=`` or naming no TrainConfig field.
    """
    out: dict[str, Any] = {}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"bad --set {item!r}: expected key=value with key in {sorted(fields)}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out
