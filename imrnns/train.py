"""Train IMRNN adapters on frozen-encoder embeddings of a BEIR folder.

What one training step does, for a batch of B training queries:

1. Project the whole corpus with the current projector, ``p(D)`` (N x m; gradients flow
   through it: for SciFact a 5183 x 384 x 384 GEMM, about 1.5 GFLOP, cheap).
2. Each query's feedback set is its first-stage top ``feedback_k`` by base-encoder cosine,
   exactly as :class:`imrnns.index.IMRNNIndex` builds it at inference, so the document-side
   aggregation sees realistic inputs. ``model.query_state`` gives ``T_q`` and ``q~``.
3. Candidates: the query's positives (every document with qrel > 0, graded), hard negatives
   sampled from the base first stage's top ``negative_pool`` (judged positives removed), and
   optionally the other batch queries' positives (in-batch negatives). ``model.score_ids``
   scores them with the fused op (its backward where present).
4. Loss (``TrainConfig.loss``, ``+``-separated terms are summed):

   - ``"ce"``: temperature-scaled cross-entropy. Every positive ``p`` is a target against the
     candidates of lower grade (non-relevant ones, and lower-graded positives on graded
     qrels): ``-log(exp(s_p/t) / (exp(s_p/t) + sum_{g_j < g_p} exp(s_j/t)))``, weighted by
     the gain ``2^g - 1``. With in-batch negatives this is the multiple-negatives ranking loss
     (``"mnrl"`` is the same term with in-batch negatives switched on).
   - ``"margin"``: the paper's ``max(0, gamma - cos(q~, d+) + cos(q~, d-))`` over every
     (higher-grade, lower-grade) candidate pair.
   - ``"improvement"``: the official v0.2 objective, ``max(0, margin + base_gap - gap)``:
     the adapted positive-negative gap must beat the base encoder's gap by ``margin``.

Corpus pseudo-queries (``TrainConfig.pseudo_queries``, off by default): every corpus
document's title (or the first sentence of its abstract), encoded with the *query* encoder,
becomes an extra training query whose single positive (gain 1) is its own document, with
hard negatives mined from the base first stage exactly as for real queries. Each step adds
``pseudo_batch`` of them to the loss with weight ``pseudo_weight`` (the epoch is still one
pass over the real queries). This is label-free, transductive domain adaptation (as in
ICT/GPL): it uses the unlabelled corpus, which every split shares, and no judgement of any
split. Pseudo-queries exist for every document, including those relevant to validation or
test queries, so validation mirrors test; the seen-doc / unseen-doc subsets stay defined by
the *real* training qrels only. The point is to dilute the prior "documents cited by
training queries are good": every document has a training query, and the adapter gets
query-to-document supervision on documents no real training query cites.

Optimisation: AdamW, linear warm-up then linear decay, gradient clipping. Model selection and
early stopping use a validation slice carved from the training split (never from test): its
queries are split into seen-doc / unseen-doc relative to the remaining training queries
(:func:`imrnns.data.seen_doc_split`), and the default criterion is the mean of the two
subsets' nDCG@10, so that memorising which documents get cited cannot win on its own.

Output directory::

    out/best/            the selected adapter (IMRNN.save_pretrained: load with from_pretrained)
    out/last/            last finished epoch: model/ + trainer_state.pt, written atomically
    out/training.json    config, data, per-epoch history, selection

A run killed at any point and restarted with the same arguments resumes from ``last/`` and
ends with the same weights as an uninterrupted run: all randomness comes from generators
seeded by ``(seed, epoch)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from imrnns._atomic import atomic_directory, atomic_file, resolve_directory
from imrnns._json import finite
from imrnns.checkpoints import load_pretrained, save_pretrained
from imrnns.data import load_corpus_fields, seen_doc_split
from imrnns.evaluate import EmbeddedSplit, base_search, embed_beir, imrnn_search
from imrnns.metrics import evaluate_run, mean_metrics, run_from_results
from imrnns.model import IMRNN, IMRNNConfig

__all__ = [
    "LOSSES",
    "PSEUDO_SOURCES",
    "SELECTIONS",
    "PseudoQueries",
    "TrainConfig",
    "TrainingData",
    "build_pseudo_queries",
    "parse_overrides",
    "prepare_training_data",
    "pseudo_query_texts",
    "split_validation",
    "train",
    "train_from_beir",
]

LOSSES = ("ce", "mnrl", "margin", "improvement")
SELECTIONS = ("mean", "unseen", "seen", "overall", "overall_if_unseen")
PROJECTOR_INITS = ("auto", "identity", "pca", "random")
# "" (off), the document title, or the first sentence of its text (see pseudo_query_texts).
PSEUDO_SOURCES = ("", "title", "first_sentence")
FREEZABLE = ("projector", "query_hypernet", "doc_hypernet", "query_norm", "doc_norm")
# Parsed with str.split; the other string fields are checked against their allowed values.
_STR_FIELDS = ("loss", "freeze")
_BOOL_FIELDS = ("in_batch_negatives", "graded")
_FLOAT_FIELDS = ("temperature", "margin", "improvement_margin", "distill_weight",
                 "distill_temperature", "anchor_weight", "dropout", "query_noise", "lr",
                 "weight_decay", "warmup", "max_grad_norm", "ema_decay", "val_fraction",
                 "pseudo_weight")  # fmt: skip
STATE_NAME = "trainer_state.pt"
SUMMARY_NAME = "training.json"


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
        negative_pool: sample them from the base first stage's top ``negative_pool``.
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
    Corpus pseudo-queries (label-free; see the module docstring):
        pseudo_queries: ``""`` (off, the default), ``"title"`` (each document's title as a
            query for that document) or ``"first_sentence"`` (the first sentence of its
            text, a leading all-caps heading such as ``BACKGROUND`` removed).
        pseudo_weight: loss weight of the pseudo-query term (> 0).
        pseudo_batch: pseudo-queries per optimiser step, drawn without replacement from a
            per-epoch shuffle of all of them (so an epoch costs about
            ``1 + pseudo_batch / batch_size`` times as much).

    Defaults: chosen on the SciFact validation slice (121 of the 809 train queries; never
    the test split) by the mean of seen-doc and unseen-doc validation nDCG@10. Distillation
    (weight 5) held unseen-doc validation nDCG at the base encoder's level (0.639 vs 0.631)
    while seen-doc rose 0.689 -> 0.872; without it unseen-doc fell to 0.56-0.59.
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


# ------------------------------------------------------------------------------ data


@dataclass
class _QuerySet:
    """Queries with their embeddings, first-stage results and judgements (internal)."""

    ids: list[str]
    emb: torch.Tensor  # (Q, n) float32
    fb_ids: torch.Tensor  # (Q, feedback_k) int64, base first stage
    fb_scores: torch.Tensor  # (Q, feedback_k) float32
    pool_ids: torch.Tensor  # (Q, negative_pool) int64, base first stage
    qrels: dict[str, dict[str, int]]
    positives: list[tuple[list[int], list[int]]]  # per query: (doc rows, grades > 0)
    cited: set[int] = dataclasses.field(default_factory=set)  # rows relevant to any query


@dataclass
class TrainingData:
    """Embedded training and validation queries over one corpus.

    Build it with :func:`prepare_training_data`.
    """

    corpus_ids: list[str]
    corpus: torch.Tensor  # (N, n) float32
    train: _QuerySet
    val: _QuerySet
    val_subsets: dict[str, list[str]]  # "seen_doc" / "unseen_doc" validation query ids
    fingerprint: str
    val_corpus_np: np.ndarray = dataclasses.field(repr=False, default_factory=lambda: np.empty(0))
    # Anchor pseudo-queries (documents no training query cites) and their base neighbours.
    anchor_rows: torch.Tensor = dataclasses.field(
        repr=False, default_factory=lambda: torch.empty(0, dtype=torch.int64)
    )
    anchor_fb: torch.Tensor = dataclasses.field(
        repr=False, default_factory=lambda: torch.empty(0, 0, dtype=torch.int64)
    )
    anchor_fb_scores: torch.Tensor = dataclasses.field(
        repr=False, default_factory=lambda: torch.empty(0, 0)
    )
    # Corpus pseudo-queries (TrainConfig.pseudo_queries), None when off.
    pseudo: _QuerySet | None = dataclasses.field(repr=False, default=None)

    def describe(self) -> dict[str, Any]:
        return {
            "num_docs": len(self.corpus_ids),
            "dim": int(self.corpus.shape[1]),
            "num_train_queries": len(self.train.ids),
            "num_val_queries": len(self.val.ids),
            "num_val_seen_doc": len(self.val_subsets["seen_doc"]),  # 0 without holdout
            "num_val_unseen_doc": len(self.val_subsets["unseen_doc"]),
            "num_anchors": int(self.anchor_rows.shape[0]),
            "num_pseudo_queries": 0 if self.pseudo is None else len(self.pseudo.ids),
            "fingerprint": self.fingerprint,
        }


@dataclass(frozen=True)
class PseudoQueries:
    """Label-free pseudo-queries built from a corpus, one per document at most.

    Build it with :func:`build_pseudo_queries` (or directly from precomputed embeddings).

    Attributes:
        source: the :data:`PSEUDO_SOURCES` entry that produced the texts.
        doc_ids: the document each pseudo-query stands for (its single positive).
        texts: the pseudo-query texts, parallel to ``doc_ids``.
        emb: (P, n) float32 query-encoder embeddings of ``texts``.
    """

    source: str
    doc_ids: list[str] = dataclasses.field(repr=False)
    texts: list[str] = dataclasses.field(repr=False)
    emb: np.ndarray = dataclasses.field(repr=False)

    def __post_init__(self) -> None:
        if self.source not in PSEUDO_SOURCES or not self.source:
            raise ValueError(f"source must be one of {PSEUDO_SOURCES[1:]}, got {self.source!r}")
        if not isinstance(self.emb, np.ndarray) or self.emb.ndim != 2:
            raise TypeError(f"emb must be a 2-D numpy array, got {type(self.emb).__name__}")
        if not len(self.doc_ids) == len(self.texts) == self.emb.shape[0]:
            raise ValueError(
                f"doc_ids ({len(self.doc_ids)}), texts ({len(self.texts)}) and emb rows "
                f"({self.emb.shape[0]}) must be parallel"
            )
        if len(set(self.doc_ids)) != len(self.doc_ids):
            raise ValueError("doc_ids must be unique (one pseudo-query per document)")
        if not np.isfinite(self.emb).all():
            raise ValueError("pseudo-query embeddings contain NaN or Inf")

    def __repr__(self) -> str:
        return f"PseudoQueries(source={self.source!r}, num={len(self.doc_ids)})"


# A leading all-caps section heading of a structured abstract ("BACKGROUND", "OBJECTIVE:",
# "BACKGROUND AND AIMS"), followed by a capitalised word; 4+ letters so acronyms survive.
_HEADING = re.compile(r"^[A-Z]{4,}(?:\s+[A-Z]{2,})*\s*[:.]?\s+(?=[A-Z0-9])")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\[])")


def pseudo_query_texts(
    doc_ids: Sequence[str], titles: Sequence[str], texts: Sequence[str], source: str
) -> tuple[list[str], list[str]]:
    """Pseudo-query texts for a corpus: ``(doc_ids, queries)`` of the documents that have one.

    Args:
        doc_ids, titles, texts: parallel corpus fields (:func:`imrnns.data.load_corpus_fields`).
        source: ``"title"`` (the title, stripped) or ``"first_sentence"`` (the first
            sentence of the text after a leading all-caps heading).

    Documents whose pseudo-query would be empty are left out.
    """
    if source not in PSEUDO_SOURCES or not source:
        raise ValueError(f"source must be one of {PSEUDO_SOURCES[1:]}, got {source!r}")
    if not len(doc_ids) == len(titles) == len(texts):
        raise ValueError("doc_ids, titles and texts must be parallel")
    ids, out = [], []
    for d, title, text in zip(doc_ids, titles, texts, strict=True):
        if source == "title":
            q = title.strip()
        else:
            body = _HEADING.sub("", text.strip(), count=1)
            q = _SENTENCE_END.split(body, maxsplit=1)[0].strip()
        if q:
            ids.append(d)
            out.append(q)
    return ids, out


def build_pseudo_queries(
    data_dir: str | Path,
    source: str,
    *,
    encoder: Any = "minilm",
    cache_dir: str | Path | None = None,
    show_progress: bool = True,
) -> PseudoQueries:
    """Read a BEIR corpus and encode its pseudo-queries with the *query* encoder (cached).

    Uses only the corpus (no queries, no qrels of any split).

    Args:
        data_dir: the BEIR folder (``corpus.jsonl[.gz]``).
        source: ``"title"`` or ``"first_sentence"`` (see :func:`pseudo_query_texts`).
        encoder: an :class:`imrnns.encoders.Encoder` or a name/folder for one; it must be
            the encoder of the corpus embeddings the pseudo-queries are trained against.
        cache_dir: embedding cache folder (default: ``$IMRNNS_CACHE`` or the user cache).
        show_progress: progress bar while encoding.
    """
    from imrnns.encoders import resolve_encoder

    ids, queries = pseudo_query_texts(*load_corpus_fields(data_dir), source)
    if not ids:
        raise ValueError(f"the corpus of {data_dir} has no non-empty {source} pseudo-query")
    emb = resolve_encoder(encoder, cache_dir, show_progress).encode_query(queries)
    return PseudoQueries(source, ids, queries, np.ascontiguousarray(emb, dtype=np.float32))


def split_validation(
    query_ids: Sequence[str], fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """Deterministic (train, validation) query split.

    The same partition as the official ``imrnns`` 0.2.3 trainer (sorted ids, shuffled by
    ``random.Random(seed)``, the first ``round((1 - fraction) * Q)`` train), so both trainers
    see the same queries.
    """
    shuffled = sorted(query_ids)
    random.Random(seed).shuffle(shuffled)
    cut = round(len(shuffled) * (1.0 - fraction))
    if cut <= 0 or cut >= len(shuffled):
        raise ValueError(
            f"val_fraction={fraction} leaves no training or no validation query out of "
            f"{len(shuffled)}"
        )
    return shuffled[:cut], shuffled[cut:]


def _fingerprint(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, np.ndarray):
            h.update(str(p.shape).encode())
            h.update(np.ascontiguousarray(p).tobytes())
        else:
            h.update(json.dumps(p, sort_keys=True).encode())
        h.update(b"\0")
    return h.hexdigest()


def _query_set(
    ids: list[str],
    emb: np.ndarray,
    qrels: Mapping[str, Mapping[str, int]],
    corpus: np.ndarray,
    row_of: Mapping[str, int],
    feedback_k: int,
    negative_pool: int,
) -> _QuerySet:
    depth = min(max(feedback_k, negative_pool), corpus.shape[0])
    if len(ids) == 0:
        scores, top = np.zeros((0, depth), np.float32), np.zeros((0, depth), np.int64)
    else:
        scores, top = base_search(corpus, emb, depth)
    positives = []
    for q in ids:
        judged = sorted(((row_of[d], int(g)) for d, g in qrels[q].items() if g > 0))
        positives.append(([r for r, _ in judged], [g for _, g in judged]))
    kf, kp = min(feedback_k, depth), min(negative_pool, depth)
    cited = {r for docs, _ in positives for r in docs}
    return _QuerySet(
        ids=list(ids),
        emb=torch.from_numpy(np.ascontiguousarray(emb, dtype=np.float32)),
        fb_ids=torch.from_numpy(top[:, :kf].astype(np.int64)),
        fb_scores=torch.from_numpy(scores[:, :kf].astype(np.float32)),
        pool_ids=torch.from_numpy(top[:, :kp].astype(np.int64)),
        qrels={q: dict(qrels[q]) for q in ids},
        positives=positives,
        cited=cited,
    )


def prepare_training_data(
    split: EmbeddedSplit,
    config: TrainConfig,
    *,
    val_query_ids: Sequence[str] | None = None,
    holdout: bool = True,
    pseudo: PseudoQueries | None = None,
) -> TrainingData:
    """Carve the validation slice from the training split and mine first-stage results.

    Args:
        split: the embedded *training* split.
        config: uses ``val_fraction``, ``seed``, ``feedback_k`` and ``negative_pool``.
        val_query_ids: an explicit validation slice instead of the seeded random one.
        holdout: False trains on every query and validates on none (a final refit with
            settings already chosen on a validation slice).
        pseudo: the corpus pseudo-queries, required when ``config.pseudo_queries`` is set
            (and then of that source), refused otherwise. Every one is used, whichever
            split judges its document; the seen-doc / unseen-doc validation subsets
            depend on the real training queries only.

    Raises:
        ValueError: no query with a positive judgement, an empty train/validation side, or
            ``pseudo`` missing, unexpected, of another source, of another dimension, or
            naming a document not in the corpus.
    """
    ds = split.dataset
    usable = [q for q in ds.query_ids if any(g > 0 for g in ds.qrels[q].values())]
    if len(usable) < (2 if holdout else 1):
        raise ValueError(
            f"the {ds.split} split of {ds.name} has {len(usable)} queries with a relevant "
            "document (qrel > 0); training needs at least 2 (one for validation)"
        )
    if not holdout:
        train_ids, val_ids = list(usable), []
    elif val_query_ids is None:
        train_ids, val_ids = split_validation(usable, config.val_fraction, config.seed)
    else:
        chosen = set(val_query_ids)
        unknown = sorted(chosen - set(usable))
        if unknown:
            raise ValueError(f"validation query ids without positives in the split: {unknown[:5]}")
        train_ids = [q for q in usable if q not in chosen]
        val_ids = [q for q in usable if q in chosen]
        if not train_ids or not val_ids:
            raise ValueError("val_query_ids leaves no training or no validation query")
    row_of_q = {q: i for i, q in enumerate(ds.query_ids)}
    row_of_d = {d: i for i, d in enumerate(ds.corpus_ids)}
    corpus = np.ascontiguousarray(split.corpus, dtype=np.float32)

    def make(ids: list[str]) -> _QuerySet:
        emb = split.queries[[row_of_q[q] for q in ids]]
        return _query_set(
            ids, emb, ds.qrels, corpus, row_of_d, config.feedback_k, config.negative_pool
        )

    train_set, val_set = make(train_ids), make(val_ids)
    seen, unseen = seen_doc_split(train_set.qrels, val_set.qrels)
    fp_parts: tuple[Any, ...] = (
        ds.name, ds.split, ds.corpus_ids, train_ids, val_ids, ds.qrels, corpus, split.queries
    )  # fmt: skip
    pseudo_set = _pseudo_set(pseudo, config, corpus, row_of_d)
    if pseudo is not None:
        fp_parts += (pseudo.source, pseudo.doc_ids, pseudo.emb)
    fp = _fingerprint(*fp_parts)
    return TrainingData(
        corpus_ids=list(ds.corpus_ids),
        corpus=torch.from_numpy(corpus),
        train=train_set,
        val=val_set,
        val_subsets={"seen_doc": seen, "unseen_doc": unseen},
        fingerprint=fp,
        val_corpus_np=corpus,
        pseudo=pseudo_set,
        **_anchors(corpus, train_set.cited, config),
    )


def _pseudo_set(
    pseudo: PseudoQueries | None,
    config: TrainConfig,
    corpus: np.ndarray,
    row_of: Mapping[str, int],
) -> _QuerySet | None:
    """The pseudo-queries as a query set: id ``pseudo:<doc>``, that document relevant (1)."""
    if not config.pseudo_queries:
        if pseudo is not None:
            raise ValueError("pseudo-queries given but config.pseudo_queries is off ('')")
        return None
    if pseudo is None:
        raise ValueError(
            f"config.pseudo_queries={config.pseudo_queries!r} needs pseudo= "
            "(imrnns.train.build_pseudo_queries)"
        )
    if pseudo.source != config.pseudo_queries:
        raise ValueError(
            f"pseudo-queries of source {pseudo.source!r} given for config.pseudo_queries="
            f"{config.pseudo_queries!r}"
        )
    if pseudo.emb.shape[1] != corpus.shape[1]:
        raise ValueError(
            f"pseudo-query dim {pseudo.emb.shape[1]} != corpus dim {corpus.shape[1]}: they "
            "must come from the same encoder"
        )
    unknown = [d for d in pseudo.doc_ids if d not in row_of]
    if unknown:
        raise ValueError(f"pseudo-queries name documents not in the corpus: {unknown[:5]}")
    if not pseudo.doc_ids:
        raise ValueError("pseudo-queries are empty")
    ids = [f"pseudo:{d}" for d in pseudo.doc_ids]
    qrels = {q: {d: 1} for q, d in zip(ids, pseudo.doc_ids, strict=True)}
    return _query_set(
        ids, pseudo.emb, qrels, corpus, row_of, config.feedback_k, config.negative_pool
    )


# Anchor pseudo-queries are capped: their neighbour search costs (anchors x N x n).
MAX_ANCHORS = 20000


def _anchors(corpus: np.ndarray, cited: set[int], config: TrainConfig) -> dict[str, torch.Tensor]:
    if config.anchor_weight <= 0:
        return {}
    rows = np.array([r for r in range(corpus.shape[0]) if r not in cited], dtype=np.int64)
    if len(rows) > MAX_ANCHORS:
        rng = np.random.default_rng(config.seed)
        rows = np.sort(rng.choice(rows, MAX_ANCHORS, replace=False))
    if len(rows) == 0:
        raise ValueError("anchor_weight > 0 needs documents that no training query cites")
    depth = min(config.feedback_k + 1, corpus.shape[0])
    scores, top = base_search(corpus, corpus[rows], depth)
    # Drop each anchor itself (normally its first hit; exact duplicates may come later).
    keep = top != rows[:, None]
    first = np.argmin(keep, axis=1)  # position of the anchor (0 if absent and all kept)
    absent = keep.all(axis=1)
    first[absent] = depth - 1  # not found: drop the last hit instead
    mask = np.ones_like(keep)
    mask[np.arange(len(rows)), first] = False
    kf = depth - 1
    return {
        "anchor_rows": torch.from_numpy(rows),
        "anchor_fb": torch.from_numpy(top[mask].reshape(len(rows), kf).astype(np.int64)),
        "anchor_fb_scores": torch.from_numpy(scores[mask].reshape(len(rows), kf)),
    }


# ------------------------------------------------------------------------------ batches


def _batch_candidates(
    data: TrainingData,
    rows: Sequence[int],
    config: TrainConfig,
    gen: torch.Generator,
    qs: _QuerySet | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Candidate ids (B, L), gains (B, L) float and validity (B, L) bool for a batch.

    ``rows`` index ``qs`` (default: the training queries; the pseudo-queries otherwise).

    Columns: the union of the batch's positives (shared by all rows; a row sees another
    row's positive as a negative only with in-batch negatives), then ``num_negatives`` hard
    negatives of the row's own. A hard negative already present as a valid union column is
    masked out so no document is counted twice.
    """
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
            # Cited by a *real* training query (pseudo-queries cite every document).
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


def _loss(
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


def _distill(
    scores: torch.Tensor, base: torch.Tensor, keep: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Mean over queries of KL(softmax(base/t) || softmax(scores/t)) over the kept columns."""
    neg_inf = torch.finfo(scores.dtype).min
    log_p = torch.log_softmax((base / temperature).masked_fill(~keep, neg_inf), dim=1)
    log_q = torch.log_softmax((scores / temperature).masked_fill(~keep, neg_inf), dim=1)
    kl = (log_p.exp() * (log_p - log_q)).masked_fill(~keep, 0.0).sum(dim=1)
    return kl.mean()


# ------------------------------------------------------------------------------ validation


def _metrics_dict(
    data: TrainingData, scores: np.ndarray, ids: np.ndarray
) -> dict[str, float | None]:
    """Overall and per-subset means; None (not NaN: training.json stays valid JSON) for an
    empty subset."""
    vs = data.val
    per_query = evaluate_run(vs.qrels, run_from_results(vs.ids, data.corpus_ids, scores, ids))
    out: dict[str, float | None] = {f"overall_{m}": v for m, v in mean_metrics(per_query).items()}
    for name, qids in data.val_subsets.items():
        for m, v in mean_metrics(per_query, qids).items():
            out[f"{name}_{m}"] = None if math.isnan(v) else v
    return out


def validate(model: IMRNN, data: TrainingData, feedback_k: int) -> dict[str, float | None]:
    """Validation nDCG@10 / Recall@100 / MRR@10 in rerank mode, overall and per subset."""
    with torch.no_grad():
        scores, ids = imrnn_search(
            model, data.val_corpus_np, data.val.emb.numpy(), mode="rerank", feedback_k=feedback_k
        )
    return _metrics_dict(data, scores, ids)


def _selection_value(
    metrics: Mapping[str, float | None],
    selection: str,
    base: Mapping[str, float | None] | None = None,
) -> float:
    overall = float(metrics["overall_nDCG@10"])  # type: ignore[arg-type]
    seen, unseen = metrics["seen_doc_nDCG@10"], metrics["unseen_doc_nDCG@10"]
    if selection == "overall":
        return overall
    if selection == "overall_if_unseen":
        floor = None if base is None else base.get("unseen_doc_nDCG@10")
        if unseen is None or floor is None:
            return overall
        # Qualifying epochs score in [0, 1]; the others below -1, closest to the floor first.
        return overall if unseen >= floor else float(unseen) - float(floor) - 1.0
    if selection == "seen":
        return overall if seen is None else float(seen)
    if selection == "unseen":
        return overall if unseen is None else float(unseen)
    vals = [float(v) for v in (seen, unseen) if v is not None]
    return float(np.mean(vals)) if vals else overall


def base_validation(data: TrainingData) -> dict[str, float | None]:
    """The base encoder's validation metrics (exact cosine search), for reference."""
    scores, ids = base_search(data.val_corpus_np, data.val.emb.numpy())
    return _metrics_dict(data, scores, ids)


# ------------------------------------------------------------------------------ training


def _lr_lambda(total: int, warmup_steps: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        rest = max(1, total - warmup_steps)
        return max(0.0, (total - step) / rest)

    return f


def _init_projector(model: IMRNN, corpus: torch.Tensor, how: str) -> None:
    """Initialise ``p(x) = normalize(P x + p0)`` (see ``TrainConfig.projector_init``)."""
    n, m = model.config.input_dim, model.config.working_dim
    if how == "auto":
        how = "identity" if m == n else "pca"
    if how == "random":
        return
    with torch.no_grad():
        if how == "identity":
            if m != n:
                raise ValueError(
                    f"projector_init='identity' needs dim == input_dim, got {m} != {n}"
                )
            model.projector.weight.copy_(torch.eye(n))
            model.projector.bias.zero_()
            return
        x = torch.nn.functional.normalize(corpus.double(), dim=1)
        mean = x.mean(dim=0)
        cov = (x - mean).T @ (x - mean) / max(1, x.shape[0] - 1)
        _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
        top = vecs[:, -m:].flip(1).T  # (m, n), largest first
        # eigh's signs are arbitrary: fix each row's largest entry positive (reproducible).
        signs = torch.sign(top.gather(1, top.abs().argmax(dim=1, keepdim=True)))
        top = top * signs
        model.projector.weight.copy_(top.float())
        model.projector.bias.copy_(-(top @ mean).float())


def _ema_copy(model: IMRNN) -> IMRNN:
    ema = IMRNN(model.config)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    return ema.eval()


def _ema_update(ema: IMRNN, model: IMRNN, decay: float, step: int) -> None:
    """``ema = d * ema + (1 - d) * model`` with the warm-up ``d = min(decay, (1+t)/(10+t))``."""
    d = min(decay, (1.0 + step) / (10.0 + step))
    with torch.no_grad():
        for e, p in zip(ema.state_dict().values(), model.state_dict().values(), strict=True):
            if e.is_floating_point():
                e.mul_(d).add_(p, alpha=1.0 - d)
            else:
                e.copy_(p)


def _epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    """The epoch's generator; ``stream`` 1 is the pseudo-queries' own, independent one."""
    g = torch.Generator()
    g.manual_seed(seed * 1_000_003 + epoch + stream * (1 << 48))
    return g


def _pseudo_schedule(
    data: TrainingData, config: TrainConfig, epoch: int, steps: int
) -> tuple[list[list[int]], torch.Generator | None]:
    """Each step's pseudo-query rows for one epoch and the generator for their negatives.

    Rows come from a per-epoch shuffle of all pseudo-queries, ``pseudo_batch`` per step,
    wrapping around when an epoch uses more than there are.
    """
    if data.pseudo is None or not data.pseudo.ids:
        return [[] for _ in range(steps)], None
    gen = _epoch_generator(config.seed, epoch, stream=1)
    total = len(data.pseudo.ids)
    order = torch.randperm(total, generator=gen).tolist()
    per = min(config.pseudo_batch, total)
    return [[order[(i * per + j) % total] for j in range(per)] for i in range(steps)], gen


def _save_last(out: Path, model: IMRNN, state: dict[str, Any]) -> None:
    """Model and trainer state together, atomically (one directory swapped in)."""
    with atomic_directory(out / "last") as tmp:
        save_pretrained(model, tmp / "model")
        torch.save(state, tmp / STATE_NAME)


def _write_summary(out: Path, summary: Mapping[str, Any]) -> None:
    with atomic_file(out / SUMMARY_NAME, "w") as fh:
        json.dump(finite(summary), fh, indent=2, sort_keys=True, allow_nan=False)
        fh.write("\n")


def _load_last(out: Path) -> tuple[IMRNN, dict[str, Any]] | None:
    try:
        last = resolve_directory(out / "last")
    except FileNotFoundError:
        return None
    state_path = last / STATE_NAME
    if not state_path.is_file():
        return None
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    return load_pretrained(last / "model"), state


def train(
    data: TrainingData,
    out_dir: str | Path,
    config: TrainConfig | None = None,
    *,
    resume: bool = True,
    progress: bool = True,
    callback: Callable[[int, dict[str, Any]], None] | None = None,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train an adapter on prepared data; write checkpoints to ``out_dir``.

    Args:
        data: from :func:`prepare_training_data`.
        out_dir: output directory (see the module docstring for its layout).
        config: the run's settings (default :class:`TrainConfig`).
        resume: continue from ``out_dir/last`` when it holds a run with the same config and
            data; a finished run is not retrained. False starts over.
        progress: tqdm progress bar with the loss and the validation nDCG@10.
        callback: called as ``callback(epoch, record)`` after each epoch's checkpoint.
        stop_after: stop after this many epochs (the learning-rate schedule still spans
            ``config.epochs``): a refit on all queries (``holdout=False`` data, no
            validation) for the epoch count a validated run selected. Without validation
            queries ``best/`` is the last epoch.

    Returns:
        A plain dict: ``checkpoint`` (path of ``best/``), ``best_epoch``,
        ``best_selection_value``, ``best_validation`` (metrics), ``base_validation``,
        ``history`` (per epoch: loss, validation metrics, seconds), ``train_seconds``,
        ``config``, ``data``, ``resumed_from_epoch``.

    Raises:
        ValueError: ``out_dir/last`` holds a run with another config or other data.
    """
    config = config or TrainConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = int(data.corpus.shape[1])
    steps_per_epoch = math.ceil(len(data.train.ids) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs

    torch.manual_seed(config.seed)
    model = IMRNN(config.model_config(n))
    _init_projector(model, data.corpus, config.projector_init)
    for part in config.frozen_parts:
        getattr(model, part).requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(total_steps, round(config.warmup * total_steps))
    )
    # The weight average (TrainConfig.ema_decay): a copy of the model that validation,
    # selection and best/ use; its parameters follow the trained ones after every step.
    ema = _ema_copy(model) if config.ema_decay > 0 else None
    has_val = bool(data.val.ids)
    base_val = base_validation(data) if has_val else {}
    if stop_after is not None and (isinstance(stop_after, bool) or not isinstance(stop_after, int)
                                   or stop_after <= 0):  # fmt: skip
        raise ValueError(f"stop_after must be a positive int or None, got {stop_after!r}")
    last_epoch = config.epochs if stop_after is None else min(stop_after, config.epochs)
    state: dict[str, Any] = {
        "config": config.to_dict(),
        "fingerprint": data.fingerprint,
        "epoch": 0,
        "history": [],
        "best_value": -math.inf,
        "best_epoch": -1,
        "bad_epochs": 0,
        "finished": False,
        "train_seconds": 0.0,
        "last_epoch": last_epoch,
        "step": 0,
    }
    resumed_from = None
    loaded = _load_last(out) if resume else None
    if loaded is not None:
        last_model, last_state = loaded
        if (
            last_state.get("config") != config.to_dict()
            or last_state.get("last_epoch", last_epoch) != last_epoch
        ):
            raise ValueError(
                f"{out / 'last'} holds a run with another config; use another out_dir or "
                f"resume=False. Saved: {last_state.get('config')}; now: {config.to_dict()}"
            )
        if last_state.get("fingerprint") != data.fingerprint:
            raise ValueError(
                f"{out / 'last'} holds a run on other data (fingerprint mismatch); use another "
                "out_dir or resume=False"
            )
        model.load_state_dict(last_model.state_dict())
        if ema is not None:
            ema.load_state_dict(last_state["ema"])
        optimizer.load_state_dict(last_state["optimizer"])
        scheduler.load_state_dict(last_state["scheduler"])
        state.update({k: v for k, v in last_state.items()
                      if k not in ("optimizer", "scheduler", "ema")})  # fmt: skip
        resumed_from = int(state["epoch"])

    corpus_unit = torch.nn.functional.normalize(data.corpus, dim=1)
    if state["epoch"] == 0 and not state["history"]:
        # Epoch 0: the untrained adapter (the identity-initialised model), the reference
        # every later epoch must beat to be selected.
        metrics = validate(model, data, config.feedback_k) if has_val else None
        value = _selection_value(metrics, config.selection, base_val) if metrics else 0.0
        state["history"].append({"epoch": 0, "loss": None, "validation": metrics,
                                 "selection_value": value if has_val else None,
                                 "seconds": 0.0})  # fmt: skip
        state["best_value"], state["best_epoch"] = value, 0
        save_pretrained(model, out / "best")
    if "step" not in state:  # runs saved before the weight average counted steps
        state["step"] = state["epoch"] * steps_per_epoch

    # Multi-threaded CPU scatter-adds (the backward of corpus[ids]) sum in a varying order:
    # with 2 threads two SciFact runs differed by 5e-6 after 2 epochs and by 0.05 in weights
    # after 16. Deterministic algorithms remove that (warn_only: CUDA ops without a
    # deterministic version warn instead of failing).
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    bar = tqdm(
        total=last_epoch * steps_per_epoch,
        initial=min(state["epoch"], last_epoch) * steps_per_epoch,
        desc=f"train {config.modulation}",
        disable=not progress,
        dynamic_ncols=True,
    )
    try:
        while not state["finished"] and state["epoch"] < last_epoch:
            epoch = state["epoch"] + 1
            t0 = time.perf_counter()
            gen = _epoch_generator(config.seed, epoch)
            torch.manual_seed(config.seed * 1_000_003 + epoch)  # dropout, if configured
            order = torch.randperm(len(data.train.ids), generator=gen).tolist()
            pseudo_rows, pseudo_gen = _pseudo_schedule(data, config, epoch, steps_per_epoch)
            model.train()
            losses = []
            for step, lo in enumerate(range(0, len(order), config.batch_size)):
                rows = order[lo : lo + config.batch_size]
                optimizer.zero_grad(set_to_none=True)
                loss = _step_loss(model, data, rows, config, gen, corpus_unit,
                                  pseudo_rows[step], pseudo_gen)  # fmt: skip
                loss.backward()
                if config.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                if ema is not None:
                    _ema_update(ema, model, config.ema_decay, state["step"])
                state["step"] += 1
                losses.append(float(loss.detach()))
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{losses[-1]:.4f}",
                                val_ndcg=_fmt(state["history"][-1]["validation"]))  # fmt: skip
            model.eval()
            chosen = model if ema is None else ema
            metrics = validate(chosen, data, config.feedback_k) if has_val else None
            # Without validation every epoch "improves": best/ is the last epoch.
            value = (
                _selection_value(metrics, config.selection, base_val) if metrics else float(epoch)
            )
            seconds = time.perf_counter() - t0
            record = {"epoch": epoch, "loss": float(np.mean(losses)), "validation": metrics,
                      "selection_value": value if has_val else None,
                      "seconds": seconds}  # fmt: skip
            state["history"].append(record)
            state["train_seconds"] += seconds
            improved = value > state["best_value"]
            if improved:
                state["best_value"], state["best_epoch"], state["bad_epochs"] = value, epoch, 0
                save_pretrained(chosen, out / "best")
            else:
                state["bad_epochs"] += 1
            state["epoch"] = epoch
            if config.patience > 0 and state["bad_epochs"] >= config.patience:
                state["finished"] = True
            if epoch >= last_epoch:
                state["finished"] = True
            bar.set_postfix(epoch=epoch, loss=f"{record['loss']:.4f}", val_ndcg=_fmt(metrics))
            extra = {} if ema is None else {"ema": ema.state_dict()}
            _save_last(out, model, {**state, "optimizer": optimizer.state_dict(),
                                    "scheduler": scheduler.state_dict(), **extra})  # fmt: skip
            summary = _summary(state, data, base_val, out, resumed_from)
            _write_summary(out, summary)
            if callback is not None:
                callback(epoch, record)
    finally:
        bar.close()
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    summary = _summary(state, data, base_val, out, resumed_from)
    _write_summary(out, summary)
    return summary


def _fmt(metrics: Mapping[str, Any] | None) -> str:
    return "-" if not metrics else f"{metrics['overall_nDCG@10']:.4f}"


def _summary(
    state: Mapping[str, Any],
    data: TrainingData,
    base_val: Mapping[str, float],
    out: Path,
    resumed_from: int | None,
) -> dict[str, Any]:
    history = list(state["history"])
    best = next((h for h in history if h["epoch"] == state["best_epoch"]), None)
    return {
        "checkpoint": str(out / "best"),
        "best_epoch": state["best_epoch"],
        "best_selection_value": state["best_value"] if data.val.ids else None,
        "best_validation": None if best is None else best["validation"],
        "base_validation": dict(base_val),
        "epochs_completed": state["epoch"],
        "finished": state["finished"],
        "history": history,
        "train_seconds": state["train_seconds"],
        "config": state["config"],
        "data": data.describe(),
        "resumed_from_epoch": resumed_from,
    }


def train_from_beir(
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    split: str = "train",
    config: TrainConfig | None = None,
    encoder: Any = "minilm",
    cache_dir: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
    refit: bool = False,
    refit_epochs: int | None = None,
    embedded: EmbeddedSplit | None = None,
    pseudo: PseudoQueries | None = None,
    show_progress: bool | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Train an adapter on one split of a BEIR folder (the CLI's ``imrnns train``).

    Args:
        data_dir: the BEIR folder (``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``).
        out_dir: where ``best/``, ``last/`` and ``training.json`` go.
        split: the training split; the validation slice is carved from it.
        config: a :class:`TrainConfig`; keyword ``overrides`` replace its fields
            (``modulation="affine"``, ``epochs=5``, ...); an override of None keeps the
            config's value (so a CLI can pass unset options through).
        encoder, cache_dir: the frozen encoder and its embedding cache.
        resume: continue an interrupted run in ``out_dir``.
        progress: progress bars (``show_progress`` is an alias; when given it wins).
        refit: after the validated run, train again on *all* queries of the split (no
            holdout) for the number of epochs validation selected, into ``out_dir/refit``
            (its ``best/`` is the refit adapter). Nothing is selected on the refit itself.
        refit_epochs: refit for this many epochs instead (implies ``refit``): an epoch count
            chosen on validation outside this run, e.g. by cross-validation over several
            validation slices. The schedule still spans ``config.epochs``.
        embedded: precomputed embeddings of the split (skips the encoder).
        pseudo: precomputed corpus pseudo-queries; by default, when
            ``config.pseudo_queries`` is set, :func:`build_pseudo_queries` reads them from
            ``data_dir``'s corpus and encodes them with ``encoder`` (cached).

    Returns:
        :func:`train`'s dict plus ``"dataset"``, ``"split"``, ``"encoder"``, and with
        ``refit`` a ``"refit"`` entry (the refit run's dict, None when epoch 0 won).
    """
    if show_progress is not None:
        progress = show_progress
    if refit_epochs is not None:
        if isinstance(refit_epochs, bool) or not isinstance(refit_epochs, int) or refit_epochs <= 0:
            raise ValueError(f"refit_epochs must be a positive int or None, got {refit_epochs!r}")
        refit = True
    config = config or TrainConfig()
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown training options {unknown}; TrainConfig fields: {sorted(known)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides:
        config = dataclasses.replace(config, **overrides)
    needs_encoder = embedded is None or (config.pseudo_queries and pseudo is None)
    if needs_encoder:
        from imrnns.encoders import resolve_encoder

        # One Encoder for the split and the pseudo-queries: its model loads at most once.
        encoder = resolve_encoder(encoder, cache_dir, progress)
    if embedded is None:
        embedded = embed_beir(
            data_dir, split, encoder=encoder, cache_dir=cache_dir, show_progress=progress
        )
    if config.pseudo_queries and pseudo is None:
        pseudo = build_pseudo_queries(data_dir, config.pseudo_queries, encoder=encoder,
                                      cache_dir=cache_dir, show_progress=progress)  # fmt: skip
    data = prepare_training_data(embedded, config, pseudo=pseudo)
    result = train(data, out_dir, config, resume=resume, progress=progress)
    result.update(dataset=embedded.dataset.name, split=embedded.dataset.split,
                  encoder=embedded.encoder)  # fmt: skip
    if refit:
        result["refit"] = None
        epochs = result["best_epoch"] if refit_epochs is None else refit_epochs
        if epochs > 0:
            all_data = prepare_training_data(embedded, config, holdout=False, pseudo=pseudo)
            result["refit"] = train(all_data, Path(out_dir) / "refit", config, resume=resume,
                                    progress=progress, stop_after=epochs)  # fmt: skip
    return result


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


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m imrnns.train --data DIR --out DIR [--set key=value ...]``: print JSON."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m imrnns.train", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--data", required=True, help="BEIR folder")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--split", default="train")
    parser.add_argument("--encoder", default="minilm")
    parser.add_argument("--cache", default=None, help="embedding cache folder")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="TrainConfig overrides, e.g. modulation=affine dim=64")  # fmt: skip
    parser.add_argument("--refit", action="store_true", help="refit on all queries afterwards")
    parser.add_argument("--refit-epochs", type=int, default=None, metavar="N",
                        help="refit for N epochs instead of the selected epoch (implies --refit)")  # fmt: skip
    parser.add_argument("--no-resume", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        overrides = parse_overrides(args.set)
    except ValueError as exc:
        parser.error(str(exc))
    result = train_from_beir(
        args.data, args.out, split=args.split, encoder=args.encoder, cache_dir=args.cache,
        resume=not args.no_resume, progress=not args.no_progress, refit=args.refit,
        refit_epochs=args.refit_epochs,
        **overrides,
    )  # fmt: skip
    print(json.dumps(finite(result), indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    from imrnns.cli import guarded

    raise SystemExit(guarded(main, "python -m imrnns.train"))
