"""The IMRNN model: projection, query/document HyperNets, LayerNorms and the modulated cosine.

The maths (docs/design.md section 1), for a query q and candidates d_1..d_K:

    p(x)      = normalize(P x + p0)                               projection, R^n -> R^m
    T_q       = act(A_q(p(q)))                                    query-side transform
    d~_i      = LN_d(T_q(p(d_i)))                                 document modulation
    T_bar     = sum_i w_i act(A_d(p(d_i))) / sum_i w_i            "mean_of_transforms" (v0.2)
              = act(A_d(sum_i w_i d~_i / sum_i w_i))              "transform_of_mean"  (v0.1)
    q~        = LN_q(T_bar(p(q)))                                 query refinement
    score_i   = cos(q~, d~_i)

``act`` and ``T`` depend on the modulation form: ``diagonal`` (official code, FiLM-style:
``[sigmoid, tanh]`` and ``x * s + b``) or ``affine`` (the paper's text: identity and
``W x + b``). Every numeric step goes through :mod:`imrnns_kernels`, so fused kernels slot in
behind its dispatcher without touching this file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import imrnns_kernels as kernels
from imrnns._checkpoint_io import load_state, read_checkpoint, write_checkpoint
from imrnns.config import IMRNNConfig
from imrnns_kernels import _validation as checks
from imrnns_kernels.reference import activate, hypernet


class HyperNet(nn.Module):
    """``Linear(m,h1) -> ReLU -> Dropout -> Linear(h1,h2) -> ReLU -> Dropout -> Linear(h2,OUT)``.

    Kept as an ``nn.Sequential`` named ``hypernet`` so state-dict keys match the official
    checkpoints (``hypernet.{0,3,6}.{weight,bias}``).
    """

    def __init__(self, config: IMRNNConfig) -> None:
        super().__init__()
        m, (h1, h2) = config.working_dim, config.hidden_dims
        self.modulation = config.modulation
        self.dropout = config.dropout
        self.hypernet = nn.Sequential(
            nn.Linear(m, h1),
            nn.ReLU(),
            nn.Dropout(config.dropout),
            nn.Linear(h1, h2),
            nn.ReLU(),
            nn.Dropout(config.dropout),
            nn.Linear(h2, config.transform_dim),
        )
        # Official initialisation: weights N(0, 0.01), biases 0.
        for layer in self.hypernet:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=0.01)
                nn.init.zeros_(layer.bias)
        if config.modulation == "affine":
            # With W ~ 0 every document would collapse to LN(b), a constant, and training
            # would start from a random ranking. Start from W = I, b = 0 instead: the adapter
            # begins as the identity transform. Only the initial values change, not the form.
            with torch.no_grad():
                self.hypernet[6].bias[: m * m] = torch.eye(m).flatten()

    def weights(self) -> kernels.HyperNetWeights:
        """The six tensors as the ops take them."""
        seq = self.hypernet
        return kernels.HyperNetWeights(
            seq[0].weight, seq[0].bias, seq[3].weight, seq[3].bias, seq[6].weight, seq[6].bias
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., m) -> (..., OUT) activated transform vectors."""
        raw = hypernet(x, self.weights(), self.dropout, self.training)
        return activate(raw, self.modulation)


@dataclass
class IMRNNOutput:
    """Everything :meth:`IMRNN.forward` computes, for scores and explanations.

    Shapes: B queries, K candidates, m working dim, OUT transform width.
    """

    scores: torch.Tensor  # (B, K) float32 cosines
    projected_queries: torch.Tensor  # (B, m)   p(q)
    projected_documents: torch.Tensor  # (B, K, m) p(d)
    query_transform: torch.Tensor  # (B, OUT)  act(A_q(p(q))), applied to documents
    document_transform: torch.Tensor  # (B, OUT)  aggregated document-side transform
    modulated_queries: torch.Tensor  # (B, m)   q~
    modulated_documents: torch.Tensor  # (B, K, m) d~


class IMRNN(nn.Module):
    """IMRNN adapter over a frozen base encoder. See the module docstring for the maths."""

    def __init__(self, config: IMRNNConfig | None = None) -> None:
        super().__init__()
        self.config = config or IMRNNConfig()
        n, m = self.config.input_dim, self.config.working_dim
        self.projector = nn.Linear(n, m)
        if n == m:
            # Official v0.2 starts the square projector at the identity: p(x) = x at init.
            with torch.no_grad():
                self.projector.weight.copy_(torch.eye(m))
                self.projector.bias.zero_()
        self.query_hypernet = HyperNet(self.config)
        self.doc_hypernet = HyperNet(self.config)
        self.query_norm = nn.LayerNorm(m, eps=self.config.layer_norm_eps)
        self.doc_norm = nn.LayerNorm(m, eps=self.config.layer_norm_eps)

    # ------------------------------------------------------------------ persistence
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        semantics: str | None = None,
        map_location: str | torch.device = "cpu",
    ) -> IMRNN:
        """Load our directory format or an official v0.1/v0.2 ``.pt`` checkpoint.

        Args:
            path: a directory written by :meth:`save_pretrained`, or an official ``.pt`` file.
            semantics: for ``.pt`` files, force ``"v0.1"`` or ``"v0.2"`` instead of detecting
                it from the file's metadata and projector shape.
            map_location: device to load the tensors onto.

        Raises:
            FileNotFoundError: the path does not exist.
            CheckpointError: (a ValueError) truncated or malformed files, missing/unexpected
                keys or mismatched shapes; the message names the file and the key.
        """
        config, state, source = read_checkpoint(path, semantics)
        model = cls(config)
        load_state(model, state, source)
        model.eval()
        return model.to(map_location)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``model.safetensors`` + ``config.json`` into ``directory``, atomically.

        ``directory`` must be new, empty, or a checkpoint saved before (replaced as a whole);
        a directory of other files raises ValueError.
        """
        return write_checkpoint(self, directory)

    # ------------------------------------------------------------------ building blocks
    @property
    def device(self) -> torch.device:
        return self.projector.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.projector.weight.dtype

    def project(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(..., n) base embeddings -> (..., m) unit vectors p(x)."""
        self._check_embeddings("embeddings", embeddings, None)
        return kernels.project(
            embeddings.to(self.dtype), self.projector.weight, self.projector.bias
        )

    def query_transform(self, projected_queries: torch.Tensor) -> torch.Tensor:
        """(B, m) -> (B, OUT): ``act(A_q(p(q)))``, the transform applied to documents."""
        return self.query_hypernet(projected_queries)

    def feedback_weights(self, first_stage_scores: torch.Tensor | None) -> torch.Tensor | None:
        """(B, K) weights for the feedback mean, or None for the uniform mean.

        ``score_weighted``: ``softmax(first_stage_scores / feedback_temperature)``.
        """
        if self.config.feedback_weighting == "uniform" or first_stage_scores is None:
            return None
        return torch.softmax(first_stage_scores.float() / self.config.feedback_temperature, dim=1)

    def document_transform(
        self,
        corpus: torch.Tensor,
        feedback_ids: torch.Tensor,
        query_transform: torch.Tensor,
        feedback_weights: torch.Tensor | None = None,
        cache: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, OUT) aggregated document-side transform over each query's feedback set.

        Args:
            corpus: (N, m) projected documents.
            feedback_ids: (B, K) ids of each query's feedback documents.
            query_transform: (B, OUT), used by ``transform_of_mean`` (v0.1) only.
            feedback_weights: (B, K) non-negative weights, or None for the uniform mean.
            cache: per-document HyperNet results precomputed by an index
                (:func:`imrnns_kernels.document_transforms`), or None.
        """
        cfg = self.config
        if cfg.aggregation == "mean_of_transforms":
            if self.training and cfg.dropout > 0:
                # Dropout per document row: the fused reduction has no dropout, so go explicit.
                per_doc = self.doc_hypernet(corpus[feedback_ids.long()].to(self.dtype))
                return _weighted_mean(per_doc, feedback_weights)
            extra = {} if cache is None else {"cache": cache}
            return kernels.adapter_reduce(
                corpus,
                feedback_ids,
                self.doc_hypernet.weights(),
                feedback_weights,
                cfg.modulation,
                **extra,
            )
        docs = corpus[feedback_ids.long()].to(self.dtype)
        d_tilde = self.modulate_documents(docs, query_transform)
        return self.doc_hypernet(_weighted_mean(d_tilde, feedback_weights))

    def modulate_documents(self, docs: torch.Tensor, query_transform: torch.Tensor) -> torch.Tensor:
        """(B, K, m) p(d) -> (B, K, m) d~ = LN_d(T_q(p(d)))."""
        return kernels.modulate_layernorm(
            docs,
            query_transform,
            self.doc_norm.weight,
            self.doc_norm.bias,
            self.config.modulation,
            self.config.layer_norm_eps,
        )

    def modulate_queries(
        self, projected_queries: torch.Tensor, document_transform: torch.Tensor
    ) -> torch.Tensor:
        """(B, m) p(q) -> (B, m) q~ = LN_q(T_bar(p(q)))."""
        return kernels.modulate_layernorm(
            projected_queries,
            document_transform,
            self.query_norm.weight,
            self.query_norm.bias,
            self.config.modulation,
            self.config.layer_norm_eps,
        )

    def query_state(
        self,
        projected_queries: torch.Tensor,
        corpus: torch.Tensor,
        feedback_ids: torch.Tensor,
        feedback_weights: torch.Tensor | None = None,
        cache: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Everything a query needs before documents are scored.

        Returns:
            (query_transform (B, OUT), document_transform (B, OUT), modulated queries (B, m)).
        """
        tq = self.query_transform(projected_queries)
        td = self.document_transform(corpus, feedback_ids, tq, feedback_weights, cache)
        return tq, td, self.modulate_queries(projected_queries, td)

    def score_ids(
        self,
        corpus: torch.Tensor,
        candidate_ids: torch.Tensor,
        query_transform: torch.Tensor,
        modulated_queries: torch.Tensor,
    ) -> torch.Tensor:
        """(B, K) float32 ``cos(q~, LN_d(T_q(corpus[ids])))`` through the fused op."""
        return kernels.modulated_score(
            corpus,
            candidate_ids,
            query_transform,
            self.doc_norm.weight,
            self.doc_norm.bias,
            modulated_queries,
            self.config.modulation,
            self.config.layer_norm_eps,
        )

    # ------------------------------------------------------------------ public scoring
    def forward(
        self,
        queries: torch.Tensor,
        candidates: torch.Tensor,
        weights: torch.Tensor | None = None,
    ) -> IMRNNOutput:
        """Score each query's candidates; the candidates are also its feedback set.

        Args:
            queries: (B, n) base-encoder query embeddings.
            candidates: (B, K, n) base-encoder document embeddings, K >= 1.
            weights: optional (B, K) non-negative feedback weights (None: uniform mean).

        Returns:
            :class:`IMRNNOutput` with scores (B, K) and the modulation vectors.
        """
        queries, candidates = self._check_pair(queries, candidates)
        b, k, n = candidates.shape
        pq = self.project(queries)
        corpus = self.project(candidates.reshape(b * k, n))
        ids = torch.arange(b * k, device=corpus.device).view(b, k)
        tq, td, q_tilde = self.query_state(pq, corpus, ids, weights)
        scores = self.score_ids(corpus, ids, tq, q_tilde)
        pd = corpus.view(b, k, -1)
        return IMRNNOutput(
            scores=scores,
            projected_queries=pq,
            projected_documents=pd,
            query_transform=tq,
            document_transform=td,
            modulated_queries=q_tilde,
            modulated_documents=self.modulate_documents(pd, tq),
        )

    @torch.no_grad()
    def score(
        self,
        queries: torch.Tensor,
        candidates: torch.Tensor,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, n), (B, K, n) -> (B, K) float32 modulated cosines (inference, no grad)."""
        queries, candidates = self._check_pair(queries, candidates)
        b, k, n = candidates.shape
        pq = self.project(queries)
        corpus = self.project(candidates.reshape(b * k, n))
        ids = torch.arange(b * k, device=corpus.device).view(b, k)
        tq, _, q_tilde = self.query_state(pq, corpus, ids, weights)
        return self.score_ids(corpus, ids, tq, q_tilde)

    # ------------------------------------------------------------------ validation
    def _check_embeddings(self, name: str, x: object, ndim: int | None) -> None:
        x = checks.check_float(name, x, ndim)
        if x.shape[-1] != self.config.input_dim:
            raise ValueError(
                f"{name} must have last dim {self.config.input_dim} (the model's input_dim), "
                f"got {checks.describe(x)}"
            )
        if x.device != self.device:
            raise ValueError(f"{name} is on {x.device} but the model is on {self.device}")

    def _check_pair(
        self, queries: torch.Tensor, candidates: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_embeddings("queries", queries, 2)
        self._check_embeddings("candidates", candidates, 3)
        if candidates.shape[0] != queries.shape[0]:
            raise ValueError(
                f"queries and candidates disagree on the batch size: queries "
                f"{checks.describe(queries)}, candidates {checks.describe(candidates)}"
            )
        if candidates.shape[1] == 0:
            raise ValueError(f"candidates is an empty candidate set: {checks.describe(candidates)}")
        checks.check_finite("queries", queries)
        checks.check_finite("candidates", candidates)
        return queries.to(self.dtype), candidates.to(self.dtype)

    # ------------------------------------------------------------------ interpretability
    def explain(
        self,
        query_embedding: Any,
        doc_embedding: Any,
        tokenizer_embeddings: Any,
        top_k: int = 10,
        **kwargs: Any,
    ) -> Any:
        """Token-level explanation of the modulation (Moore-Penrose back-projection).

        ``query_embedding``/``doc_embedding``: (n,) for one pair, which returns one
        :class:`~imrnns.explain.Explanation`, or (B, n), which returns a list of them.
        ``tokenizer_embeddings``: the encoder's (V, n) input token-embedding table. Keyword
        arguments (``tokenizer``, ``filter``, ``query_texts``, ``doc_texts``, ``idf``,
        ``feedback``, ...) are those of :func:`imrnns.explain.explain`.
        """
        from imrnns.explain import explain

        out = explain(
            self, query_embedding, doc_embedding, tokenizer_embeddings, top_k=top_k, **kwargs
        )
        single = getattr(query_embedding, "ndim", 2) == 1 and getattr(doc_embedding, "ndim", 2) == 1
        return out[0] if single else out


def _weighted_mean(x: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """(B, K, D) -> (B, D): mean over K, weighted when weights (B, K) are given."""
    if weights is None:
        return x.mean(dim=1)
    checks.check_weights("feedback_weights", weights, tuple(x.shape[:2]))
    w = weights.to(x.dtype)
    return torch.einsum("bk,bkd->bd", w / w.sum(dim=1, keepdim=True), x)
