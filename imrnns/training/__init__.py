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

   None of them materialises a (positives x candidates) table per query: the cross-entropy
   takes one logsumexp over the lower-grade candidates per (query, grade level), shared by
   that grade's positives; the pairwise terms sort each level's competitors once and sum
   each positive's hinges by a binary search and a suffix sum. The union of the batch's
   positives is the same candidate set for every query, so it is scored by two GEMMs of the
   moment algebra rather than one gathered copy per query. A many-positive collection then
   costs per query about what a one-positive one does (benchmarks/test_bench_training.py).

Data that does not fit in memory: :func:`prepare_streaming_data` takes the training queries
as a re-iterable stream of :class:`QueryRecord` (:class:`BeirQueryStream` reads a BEIR
split's qrels and a memory-mapped embedding array; any iterable or function returning an
iterator works) and mines their first stage ``mining_chunk`` queries at a time, every
epoch; memory is bounded by that setting, not by the number of queries. The in-memory path,
:func:`prepare_training_data`, trains exactly as before.

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

Modules, in import order (each imports only those above it):

- :mod:`~imrnns.training.config`: :class:`TrainConfig` and :func:`parse_overrides`.
- :mod:`~imrnns.training.pseudo_queries`: corpus pseudo-query texts and embeddings.
- :mod:`~imrnns.training.data`: :func:`prepare_training_data` (validation split, first-stage
  feedback sets and hard-negative pools, pseudo-query and anchor sets) and
  :func:`prepare_streaming_data` (the same for streamed queries, mined in chunks).
- :mod:`~imrnns.training.batches`: per-epoch generators and batches, the pseudo-query
  schedule, a batch's candidate columns.
- :mod:`~imrnns.training.losses`: the loss terms above and one step's total.
- :mod:`~imrnns.training.validation`: validation metrics and the selection criterion.
- :mod:`~imrnns.training.loop`: :func:`train` (optimiser, schedule, weight average,
  selection, checkpoints and resume).
- :mod:`~imrnns.training.beir`: :func:`train_from_beir`, the one-call entry of ``imrnns train``,
  and :class:`BeirQueryStream`.
"""

from __future__ import annotations

from imrnns.training.beir import BeirQueryStream, train_from_beir
from imrnns.training.config import (
    FREEZABLE,
    LOSSES,
    PROJECTOR_INITS,
    PSEUDO_SOURCES,
    SELECTIONS,
    TrainConfig,
    parse_overrides,
)
from imrnns.training.data import (
    MAX_ANCHORS,
    QueryRecord,
    QuerySource,
    TrainingData,
    prepare_streaming_data,
    prepare_training_data,
    split_validation,
)
from imrnns.training.loop import STATE_NAME, SUMMARY_NAME, train
from imrnns.training.pseudo_queries import PseudoQueries, build_pseudo_queries, pseudo_query_texts
from imrnns.training.validation import base_validation, validate

__all__ = [
    "FREEZABLE",
    "LOSSES",
    "MAX_ANCHORS",
    "PROJECTOR_INITS",
    "PSEUDO_SOURCES",
    "SELECTIONS",
    "STATE_NAME",
    "SUMMARY_NAME",
    "BeirQueryStream",
    "PseudoQueries",
    "QueryRecord",
    "QuerySource",
    "TrainConfig",
    "TrainingData",
    "base_validation",
    "build_pseudo_queries",
    "parse_overrides",
    "prepare_streaming_data",
    "prepare_training_data",
    "pseudo_query_texts",
    "split_validation",
    "train",
    "train_from_beir",
    "validate",
]
