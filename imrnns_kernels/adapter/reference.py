"""The document HyperNet and its reductions in plain PyTorch: the oracle of the adapter family.

Per-document adapter generation with the (weighted) mean over each query's feedback set, and
the whole-corpus forms (``feedback="corpus"``): the mean transform over every document, and
the per-document cache that turns :func:`adapter_reduce` into a weighted gather-mean. Written
for clarity, not speed: it materialises (B, K, OUT). Same signatures as the fused
implementations in :mod:`imrnns_kernels.adapter.cpu` and :mod:`imrnns_kernels.adapter.triton`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from imrnns_kernels._runtime import compute_dtype
from imrnns_kernels._validation import dim_from_transform
from imrnns_kernels.types import HyperNetWeights


def hypernet(
    x: torch.Tensor,
    weights: HyperNetWeights,
    dropout: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """Raw HyperNet output ``W3 relu(W2 relu(W1 x + b1) + b2) + b3``.

    Args:
        x: (..., m) projected embeddings.
        weights: the six tensors of the MLP (see :class:`HyperNetWeights`).
        dropout: dropout probability after each ReLU (official v0.1 trains with 0.1).
        training: apply dropout only when True.

    Returns:
        (..., OUT) pre-activation output.
    """
    h = F.relu(F.linear(x, weights.w1, weights.b1))
    h = F.dropout(h, dropout, training)
    h = F.relu(F.linear(h, weights.w2, weights.b2))
    h = F.dropout(h, dropout, training)
    return F.linear(h, weights.w3, weights.b3)


def activate(raw: torch.Tensor, modulation: str) -> torch.Tensor:
    """Output activation of the HyperNet, giving the transform vector.

    - ``diagonal``: OUT = 2m, returns ``[sigmoid(o[:m]), tanh(o[m:])]`` (scale s, bias b).
    - ``affine``: OUT = m*m + m, returns ``o`` unchanged (``W = o[:m*m].view(m, m)``, ``b``).
    """
    if modulation == "affine":
        return raw
    m = dim_from_transform(raw.shape[-1], modulation)
    return torch.cat([torch.sigmoid(raw[..., :m]), torch.tanh(raw[..., m:])], dim=-1)


def _hidden(x: torch.Tensor, weights: HyperNetWeights) -> torch.Tensor:
    """The HyperNet's last hidden state ``relu(W2 relu(W1 x + b1) + b2)``: (..., m) -> (..., h2)."""
    h = F.relu(F.linear(x, weights.w1, weights.b1))
    return F.relu(F.linear(h, weights.w2, weights.b2))


def adapter_reduce(
    corpus: torch.Tensor,
    ids: torch.Tensor,
    weights: HyperNetWeights,
    feedback_weights: torch.Tensor | None = None,
    modulation: str = "diagonal",
    cache: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean document transform over each query's feedback set.

    ``T_bar[b] = sum_k w[b,k] * act(A_d(corpus[ids[b,k]])) / sum_k w[b,k]``

    Args:
        corpus: (N, m) projected documents (fp32, fp16 or bf16; computed in fp32).
        ids: (B, K) int64/int32 feedback-document ids into ``corpus``.
        weights: document HyperNet weights (m -> h1 -> h2 -> OUT).
        feedback_weights: (B, K) non-negative weights, or None for the uniform mean.
        modulation: ``"diagonal"`` (OUT = 2m) or ``"affine"`` (OUT = m*m + m).
        cache: optional per-document cache from :func:`document_transforms`: (N, OUT)
            activated outputs ``act(A_d(corpus))`` for ``diagonal``, (N, h2) last hidden
            states for ``affine``. When given, ``corpus`` is only used for its row count.

    Returns:
        (B, OUT) mean transform, float32 (float64 for a float64 HyperNet, so float64 models
        and gradchecks keep their precision). This reference materialises (B, K, OUT).
    """
    out_dtype = compute_dtype(weights.w1.dtype)
    if cache is not None:
        rows = cache[ids.long()].to(weights.w1.dtype)  # (B, K, OUT) or (B, K, h2)
        per_doc = rows if modulation == "diagonal" else F.linear(rows, weights.w3, weights.b3)
    else:
        docs = corpus[ids.long()].to(weights.w1.dtype)  # (B, K, m)
        per_doc = activate(hypernet(docs, weights), modulation)  # (B, K, OUT)
    if feedback_weights is None:
        return per_doc.mean(dim=1).to(out_dtype)
    w = feedback_weights.to(per_doc.dtype)
    w = w / w.sum(dim=1, keepdim=True)
    return torch.einsum("bk,bko->bo", w, per_doc).to(out_dtype)


def document_transforms(
    corpus: torch.Tensor,
    weights: HyperNetWeights,
    modulation: str = "diagonal",
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Per-document cache for :func:`adapter_reduce` (they depend only on the document).

    Args:
        corpus: (N, m) projected documents.
        weights: document HyperNet weights.
        modulation: ``"diagonal"``: returns (N, OUT) activated outputs ``act(A_d(d))``;
            ``"affine"``: returns (N, h2) last hidden states, because the output layer is
            linear and the mean of outputs is exactly ``W3 @ mean(h) + b3``.
        chunk_rows: ignored here (the fused implementations bound their memory with it).

    Returns:
        (N, OUT) or (N, h2) tensor, float32 (float64 for a float64 HyperNet).
    """
    out_dtype = compute_dtype(weights.w1.dtype)
    docs = corpus.to(weights.w1.dtype)
    if modulation == "affine":
        return _hidden(docs, weights).to(out_dtype)
    return activate(hypernet(docs, weights), modulation).to(out_dtype)


def corpus_transform(
    corpus: torch.Tensor,
    weights: HyperNetWeights,
    modulation: str = "diagonal",
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Whole-corpus feedback: ``mean_{d in corpus} act(A_d(d))``, one (OUT,) vector.

    float32 (float64 for a float64 HyperNet). ``chunk_rows`` is ignored here; this reference
    materialises (N, OUT).
    """
    out_dtype = compute_dtype(weights.w1.dtype)
    docs = corpus.to(weights.w1.dtype)
    return activate(hypernet(docs, weights), modulation).mean(dim=0).to(out_dtype)
