"""Exhaustive scoring of the whole corpus with top-k (the naive, materialising version)."""

from __future__ import annotations

import torch

from imrnns_kernels.reference.modulated_score import modulated_score


def topk_lower_id_first(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row, ties broken by the lower column index, padded past the row length.

    Args:
        scores: (B, N) float32.
        k: number of results; when k > N the tail is padded with score ``-inf`` and id ``-1``.

    Returns:
        (scores (B, k) float32, ids (B, k) int64), best first.
    """
    b, n = scores.shape
    # A stable descending sort keeps equal scores in index order: lower id first, deterministic.
    vals, idx = torch.sort(scores, dim=1, descending=True, stable=True)
    take = min(k, n)
    out_s = torch.full((b, k), float("-inf"), dtype=torch.float32, device=scores.device)
    out_i = torch.full((b, k), -1, dtype=torch.int64, device=scores.device)
    out_s[:, :take] = vals[:, :take]
    out_i[:, :take] = idx[:, :take]
    return out_s, out_i


def modulated_topk(
    corpus: torch.Tensor,
    transform: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    modulation: str = "diagonal",
    eps: float = 1e-5,
    workspace_bytes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k over every corpus row of the modulated cosine score.

    The score of document i for query b is the one :func:`modulated_score` gives. This
    reference materialises the (B, N) score matrix and the (B, N, m) modulated corpus.

    Args:
        corpus: (N, m) projected documents, fp32/fp16/bf16.
        transform: (B, OUT) query-side transforms.
        ln_weight, ln_bias: (m,) document LayerNorm parameters.
        queries: (B, m) modulated queries.
        k: results per query; k > N pads with ``-inf`` / ``-1``.
        workspace_bytes: accepted for the common signature and ignored: the oracle
            materialises (B, N, m) on purpose.

    Returns:
        (scores (B, k) float32, ids (B, k) int64), best first, ties by lower id.
    """
    b, n = queries.shape[0], corpus.shape[0]
    ids = torch.arange(n, device=corpus.device).expand(b, n)
    scores = modulated_score(corpus, ids, transform, ln_weight, ln_bias, queries, modulation, eps)
    return topk_lower_id_first(scores, k)
