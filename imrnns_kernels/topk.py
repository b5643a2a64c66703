"""Deterministic top-k: one ordering, (score desc, id asc), everywhere.

Every result of the ops is ranked by score, ties broken by the lower document id, and padded
with ``-inf`` / ``-1`` when fewer than k columns exist (faiss's convention). Plain PyTorch: the
reference, the CPU path and the Triton launchers all rank with these helpers.

- :func:`merge_topk`: the one ranking helper (best k of (scores, ids) pairs, any order in).
- :func:`chunk_topk`: ``torch.topk`` with the ties at the cut resolved to the lower column.
- :class:`StreamingTopK`: a running top-k over column chunks of a (B, N) score matrix that
  is never materialised (exhaustive search).
- :func:`topk_by_id`: the validated top-k of a rerank's (B, K) candidate scores.
"""

from __future__ import annotations

import torch

# Peak bytes per (query, top-k slot) of one running top-k: the (B, k) state (12 B) plus one
# merge's transients (survivor lists, the (B, <=3k) concatenation, merge_topk's two sorts and
# gathers: about 240 B), counted from StreamingTopK.add and merge_topk. Workspace planners
# of both search paths budget with it.
TOPK_SLOT_BYTES = 256


def merge_topk(
    scores: torch.Tensor, ids: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best ``k`` of each row of (scores, ids), ordered by (score desc, id asc).

    Args:
        scores: (B, n) scores.
        ids: (B, n) int64 ids of those scores, in any order.
        k: results per row.

    Returns:
        ((B, k) scores, (B, k) int64 ids). Two sorts make the order total and deterministic
        whatever order the inputs come in: a sort by id, then a *stable* sort by score keeps
        equal scores in id order. Rows shorter than ``k`` are padded with ``-inf`` / ``-1``.
    """
    ids_sorted, perm = torch.sort(ids, dim=1)
    s = scores.gather(1, perm)
    s, order = torch.sort(s, dim=1, descending=True, stable=True)
    i = ids_sorted.gather(1, order)
    bsz, n = s.shape
    if n >= k:
        return s[:, :k].contiguous(), i[:, :k].contiguous()
    out_s = torch.full((bsz, k), float("-inf"), dtype=s.dtype, device=s.device)
    out_i = torch.full((bsz, k), -1, dtype=torch.int64, device=s.device)
    out_s[:, :n] = s
    out_i[:, :n] = i
    return out_s, out_i


def chunk_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, n) -> the ``min(k, n)`` best columns of each row, ties at the cut by lower column.

    ``torch.topk`` is fast but not stable: when several columns tie with the k-th value it may
    keep a higher column and drop a lower one. Rows where that can happen (more than k values
    >= the k-th) are redone with a stable sort; with real-valued scores that only happens for
    duplicate documents, so the common cost is one extra compare-and-count pass.
    """
    n = scores.shape[1]
    kk = min(k, n)
    vals, idx = torch.topk(scores, kk, dim=1, largest=True, sorted=True)
    if kk < n:
        count = (scores >= vals[:, -1:]).sum(dim=1)
        bad = torch.nonzero(count > kk).flatten()
        if bad.numel():
            v, i = torch.sort(scores[bad], dim=1, descending=True, stable=True)
            vals[bad] = v[:, :kk]
            idx[bad] = i[:, :kk]
    return vals, idx


class StreamingTopK:
    """Running top-k over column chunks of a (B, N) score matrix that is never materialised.

    ``add(chunk_scores, offset)`` takes the scores of columns ``offset .. offset + n``; the
    state is ((B, k) scores, (B, k) ids), ordered by (score desc, id asc), padded with
    ``-inf`` / ``-1`` while fewer than k columns have been seen.
    """

    def __init__(self, batch: int, k: int, device: torch.device) -> None:
        self.k = k
        self.scores = torch.full((batch, k), float("-inf"), dtype=torch.float32, device=device)
        self.ids = torch.full((batch, k), -1, dtype=torch.int64, device=device)
        self.empty = True

    def add(self, chunk_scores: torch.Tensor, offset: int) -> None:
        """Merge columns ``offset ..`` (higher than every column added before)."""
        # Select on the float32 values that are returned: float64 scores of identical rows
        # can differ in their last bits and would then not tie (and go lower id first).
        chunk_scores = chunk_scores.float()
        if self.empty:
            # Nothing held yet: every column is a candidate, so the survivor filter below
            # would only cost passes and host syncs (a one-chunk search is all first chunk).
            self.empty = False
            vals, idx = chunk_topk(chunk_scores, self.k)
            # A -inf column never enters (as below, where only scores above -inf survive).
            idx = torch.where(torch.isneginf(vals), -1, idx + offset)
            self.scores, self.ids = merge_topk(vals, idx, self.k)
            return
        # Only scores strictly above the current k-th best can enter: an equal score loses the
        # tie to the lower id already held. After the first chunks almost nothing passes
        # (about k ln(N/k) survivors per query over a whole scan), so a compare and a nonzero
        # are much cheaper than a torch.topk per chunk (benchmarks/RESULTS.md, "Fused ops").
        # Most chunks of a long scan hold nothing above any query's k-th best: a row maximum
        # settles that faster than the (B, n) compare and count below.
        if not bool((chunk_scores.amax(dim=1, keepdim=True) > self.scores[:, -1:]).any()):
            return
        survivors = chunk_scores > self.scores[:, -1:]
        counts = survivors.sum(dim=1)
        most = int(counts.max())
        if most == 0:
            return
        if most <= 2 * self.k:
            rows, cols = survivors.nonzero(as_tuple=True)  # row-major: grouped by row
            starts = torch.cumsum(counts, 0) - counts
            pos = torch.arange(rows.numel(), device=rows.device) - starts[rows]
            vals = torch.full(
                (chunk_scores.shape[0], most),
                float("-inf"),
                dtype=torch.float32,
                device=chunk_scores.device,
            )
            idx = torch.full_like(vals, -1, dtype=torch.int64)
            vals[rows, pos] = chunk_scores[rows, cols].float()
            idx[rows, pos] = cols + offset
        else:
            vals, idx = chunk_topk(chunk_scores, self.k)
            vals, idx = vals.float(), idx.add_(offset)
        self.scores, self.ids = merge_topk(
            torch.cat([self.scores, vals], dim=1), torch.cat([self.ids, idx], dim=1), self.k
        )

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """((B, k) float32 scores, (B, k) int64 ids), best first."""
        return self.scores, self.ids


def topk_by_id(
    scores: torch.Tensor, ids: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused top-k of a rerank: best ``k`` of (B, K) candidate scores as (scores, corpus ids).

    Ties are broken by the lower corpus id; ``k > K`` pads with ``-inf`` / ``-1``. Duplicate
    candidate ids are kept (each occurrence is a candidate with the same score), as a (B, K)
    table of scores would show them.

    Raises:
        ValueError: ``k`` is not a positive int, or ``scores`` and ``ids`` are not (B, K) of
            one shape.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if scores.shape != ids.shape or scores.dim() != 2:
        raise ValueError(
            f"scores and ids must be (B, K) of one shape, got {tuple(scores.shape)} and "
            f"{tuple(ids.shape)}"
        )
    return merge_topk(scores.float(), ids.long(), k)
