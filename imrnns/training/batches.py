"""What each step sees: the epoch's random generators and batches, the pseudo-query
schedule, and the candidate columns (positives, in-batch and hard negatives) of a batch.

Every draw comes from a generator seeded by ``(seed, epoch)``, so an epoch replays exactly
after a resume. Tested in tests/training/test_train.py (candidate columns) and
tests/training/test_pseudo_queries.py (schedule, independent pseudo-query stream).
"""

from __future__ import annotations

from collections.abc import Container, Iterator, Sequence
from typing import NamedTuple

import torch

from imrnns.training.config import TrainConfig
from imrnns.training.data import TrainingData, _QuerySet


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


def _epoch_batches(
    data: TrainingData, config: TrainConfig, gen: torch.Generator
) -> Iterator[tuple[_QuerySet, list[int]]]:
    """The epoch's batches: (query set, rows of it), ``batch_size`` rows each.

    In memory: one permutation of all training queries drawn from ``gen`` first, then
    consecutive slices. Streamed (``data.stream``): the chunks in stream order, each chunk's
    own permutation drawn from ``gen`` when the chunk is reached; batches do not span
    chunks. Either way the draws come from ``gen`` in the same order on every run.
    """
    if data.stream is None:
        order = torch.randperm(len(data.train.ids), generator=gen).tolist()
        for lo in range(0, len(order), config.batch_size):
            yield data.train, order[lo : lo + config.batch_size]
        return
    for chunk in data.stream.chunks():
        order = torch.randperm(len(chunk.ids), generator=gen).tolist()
        for lo in range(0, len(order), config.batch_size):
            yield chunk, order[lo : lo + config.batch_size]
        del chunk  # dropped before the next chunk is mined: one chunk in memory at a time


class Candidates(NamedTuple):
    """A batch's candidate columns: ``ids`` (B, L) int64, ``gains`` (B, L) float, ``valid``
    (B, L) bool, and ``shared``: the first ``shared`` columns hold the same ids, ascending, in
    every row (the union of the batch's positives)."""

    ids: torch.Tensor
    gains: torch.Tensor
    valid: torch.Tensor
    shared: int


def _batch_candidates(
    data: TrainingData,
    rows: Sequence[int],
    config: TrainConfig,
    gen: torch.Generator,
    qs: _QuerySet | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Candidate ids (B, L), gains (B, L) float and validity (B, L) bool for a batch of the
    query set ``qs`` (default: the training queries): :func:`_batch_columns` of ``data``."""
    batch = _batch_columns(data.train if qs is None else qs, rows, config, gen, data.train.cited)
    return batch.ids, batch.gains, batch.valid


def _batch_columns(
    qs: _QuerySet,
    rows: Sequence[int],
    config: TrainConfig,
    gen: torch.Generator,
    cited: Container[int],
) -> Candidates:
    """The candidate columns of the batch ``rows`` of ``qs`` (see :class:`Candidates`).

    Columns: the union of the batch's positives (shared by all rows; a row sees another
    row's positive as a negative only with in-batch negatives), then ``num_negatives`` hard
    negatives of the row's own, ``cited_negatives`` of them first from the pool documents in
    ``cited`` (relevant to a real training query). A hard negative already present as a
    valid union column is masked out so no document is counted twice; a pool with fewer
    documents than asked leaves the rest of the row's columns invalid (padding).
    """
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
            cited_pool = [d for d in pool if d in cited]
            perm = torch.randperm(len(cited_pool), generator=gen)[: config.cited_negatives]
            chosen = [cited_pool[p] for p in perm.tolist()]
        taken = set(chosen)
        rest = [d for d in pool if d not in taken]
        perm = torch.randperm(len(rest), generator=gen)[: h - len(chosen)].tolist()
        chosen += [rest[p] for p in perm]
        for j, d in enumerate(chosen):
            ids[i, u + j] = d
            valid[i, u + j] = not (in_batch and d in col)
    return Candidates(ids, gains, valid, u)
