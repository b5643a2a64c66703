"""Attribution: the pseudo-inverse back-projection of a modulation delta to tokens, plain and
filtered; :class:`Explainer` (cached per model and table) and :func:`explain` (one call).

For a delta ``delta`` (m,) in the projected space, ``x = P^+ delta`` (n,) and the token
scores are ``cos(x, E_v)`` for every row ``E_v`` of the encoder's (V, n) input embedding
table. The plain method ranks by ``|cos|``; the filter ranks the lexical, supported tokens
by ``|cos| * idf`` (see :mod:`imrnns.explain`).

Tested in ``tests/explain/test_explain.py``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from imrnns.explain._cache import _IdCache
from imrnns.explain.faithfulness import FAITHFULNESS, score_meaning
from imrnns.explain.vocabulary import STOP_WORDS, CorpusVocabulary, _token_info, _TokenInfo
from imrnns_kernels._validation import check_finite, check_float, describe

if TYPE_CHECKING:
    from imrnns.model import IMRNN

__all__ = [
    "METHOD_FILTERED",
    "METHOD_PLAIN",
    "Explainer",
    "Explanation",
    "TokenScore",
    "explain",
    "projection_pinv",
]

# ``Explanation.method`` (and the "method" of its JSON): which ranking produced the tokens.
METHOD_PLAIN = "moore-penrose-backprojection"
METHOD_FILTERED = "moore-penrose-backprojection+filter"


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class TokenScore:
    """One token of an explanation.

    Attributes:
        token: the vocabulary entry (``##`` fragments keep their marker in the plain method).
        score: signed cosine between the back-projected modulation delta and the token's
            input embedding.
        sign: +1 when the modulation moves towards the token, -1 when away from it.
        weight: the IDF weight used to rank it (1.0 in the plain method or without IDF).
        token_id: its id in the tokenizer's vocabulary.
        in_text: whether it is a word of the pair's query or document text (None when no
            text was given).
    """

    token: str
    score: float
    sign: int
    weight: float = 1.0
    token_id: int = -1
    in_text: bool | None = None

    @property
    def relevance(self) -> float:
        """The ranking key: ``|score| * weight``."""
        return abs(self.score) * self.weight

    def to_dict(self) -> dict[str, Any]:
        return {
            "token": self.token,
            "score": self.score,
            "sign": self.sign,
            "weight": self.weight,
            "relevance": self.relevance,
            "token_id": self.token_id,
            "in_text": self.in_text,
        }


@dataclass(frozen=True)
class Explanation:
    """Why IMRNN scores a (query, document) pair as it does.

    Attributes:
        query_tokens: tokens of the query's modulation delta ``q~ - p(q)``, best first.
        document_tokens: tokens of the document's modulation delta ``d~ - p(d)``.
        base_score: cosine of the base-encoder embeddings.
        imrnn_score: IMRNN score ``cos(q~, d~)``.
        score_delta: ``imrnn_score - base_score``, the modulation's contribution.
        query_delta: (m,) float32 CPU tensor ``q~ - p(q)``.
        document_delta: (m,) float32 CPU tensor ``d~ - p(d)``.
        filtered: whether the spurious-token filter was on (back-projection only).
        query_text, document_text, document_id: what was explained, when known.
        attribution: the word-attribution method (:mod:`imrnns.explain.words`) when the
            tokens come from one; then each token is a word of the text and its ``score`` is
            its signed effect on ``score_delta`` (the adapter's added score), and the deltas
            are zeros. None: back-projection (tokens score by cosine).
        faithfulness: the method's figures in the deletion benchmark
            (:data:`imrnns.explain.faithfulness.FAITHFULNESS`), when it has been measured.
        seconds: wall time of this explanation, when measured.
    """

    query_tokens: list[TokenScore]
    document_tokens: list[TokenScore]
    base_score: float
    imrnn_score: float
    score_delta: float
    query_delta: torch.Tensor = field(repr=False)
    document_delta: torch.Tensor = field(repr=False)
    filtered: bool = True
    query_text: str | None = None
    document_text: str | None = None
    document_id: str | None = None
    attribution: str | None = None
    faithfulness: Mapping[str, Any] | None = field(default=None, repr=False)
    seconds: float | None = field(default=None, repr=False)

    @property
    def method(self) -> str:
        if self.attribution is not None:
            return self.attribution
        return METHOD_FILTERED if self.filtered else METHOD_PLAIN

    def to_dict(self, include_deltas: bool = False) -> dict[str, Any]:
        """JSON-ready dict (deltas only on request: they are m floats each)."""
        out: dict[str, Any] = {
            "method": self.method,
            "query": self.query_text,
            "document_id": self.document_id,
            "document": self.document_text,
            "base_score": self.base_score,
            "imrnn_score": self.imrnn_score,
            "score_delta": self.score_delta,
            "query_tokens": [t.to_dict() for t in self.query_tokens],
            "document_tokens": [t.to_dict() for t in self.document_tokens],
            "token_scores": score_meaning(self.attribution),
        }
        if self.faithfulness is not None:
            out["faithfulness"] = dict(self.faithfulness)
        if self.seconds is not None:
            out["seconds"] = self.seconds
        if include_deltas:
            out["query_delta"] = self.query_delta.tolist()
            out["document_delta"] = self.document_delta.tolist()
        return out


# --------------------------------------------------------------------------- caches

_PINV = _IdCache()
_TABLES = _IdCache()


def _tensor_key(t: torch.Tensor, *extra: Any) -> tuple:
    # _version moves on every in-place update (optimizer steps, copy_ under no_grad), so a
    # trained-further adapter never reuses a stale pseudo-inverse.
    return (t._version, t.data_ptr(), t.dtype, t.device, tuple(t.shape), *extra)


def _compute_dtype(model: IMRNN) -> torch.dtype:
    return torch.float64 if model.dtype == torch.float64 else torch.float32


def projection_pinv(model: IMRNN) -> torch.Tensor:
    """(n, m) Moore-Penrose pseudo-inverse of the projection matrix P (m, n), cached.

    Computed once per version of the weight, by an SVD in float64 (so that a float32
    projection's small singular values do not lose their digits), and stored in the model's
    compute dtype on its device.
    """
    w = model.projector.weight
    dtype = _compute_dtype(model)
    key = _tensor_key(w, dtype)
    hit = _PINV.get(w)
    if hit is not None and hit[0] == key:
        return hit[1]
    pinv = torch.linalg.pinv(w.detach().to("cpu", torch.float64)).to(w.device, dtype)
    _PINV.put(w, (key, pinv))
    return pinv


def _normalised_table(
    table: torch.Tensor, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    key = _tensor_key(table, device, dtype)
    hit = _TABLES.get(table)
    if hit is not None and hit[0] == key:
        return hit[1]
    # Checked here, once per table version, rather than on every call: the scan covers the
    # whole (V, n) table (V = 30,522 rows for MiniLM) and would dominate a small call.
    check_finite("token_table", table)
    normed = F.normalize(table.detach().to(device, dtype), dim=1)
    _TABLES.put(table, (key, normed))
    return normed


# --------------------------------------------------------------------------- explainer


def _is_instance(obj: Any, module: str, name: str) -> bool:
    """``isinstance(obj, <module>.<name>)`` without importing ``module``.

    An instance of a class can only exist once the class's module has been imported, so a
    module missing from ``sys.modules`` means False. The check stays exact while this package
    imports neither the model nor the index: ``IMRNN.explain`` imports this package, so an
    import of ``imrnns.model`` (or of ``imrnns.index``, which imports it) from here would
    close an import cycle.
    """
    cls = getattr(sys.modules.get(module), name, None)
    return isinstance(cls, type) and isinstance(obj, cls)


def _as_tensor(name: str, x: Any, dim: int) -> torch.Tensor:
    """(B, dim) float tensor from (dim,) / (B, dim) numpy or torch."""
    if isinstance(x, np.ndarray):
        if not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"{name} must hold floats, got numpy dtype {x.dtype} {x.shape}")
        x = torch.from_numpy(np.ascontiguousarray(x))
    t = check_float(name, x, (1, 2))
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.shape[1] != dim:
        raise ValueError(
            f"{name} must have last dim {dim} (the model's input_dim), got {describe(t)}"
        )
    check_finite(name, t)
    return t


def _check_texts(name: str, texts: Sequence[str] | str | None, count: int) -> list[str] | None:
    if texts is None:
        return None
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if len(texts) != count or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"{name} must be {count} strings (one per pair), got {len(texts)} items")
    return texts


class Explainer:
    """Explains IMRNN scores token by token; caches everything that does not change per call.

    Args:
        model: the adapter.
        token_table: (V, n) input token-embedding table of the base encoder the adapter was
            trained on (``Encoder.token_embeddings()``); n must be the model's input_dim.
        tokenizer: that encoder's tokenizer (``Encoder.tokenizer``): token strings, special
            tokens and word splitting. Without it tokens are shown as ``[id]``, no token is
            excluded and the filter is unavailable.
        idf: a :class:`CorpusVocabulary` (corpus support + IDF weights), or a (V,) tensor of
            non-negative token weights (0 drops a token), or None (no weighting).
        stop_words: the words the filter drops.
    """

    def __init__(
        self,
        model: IMRNN,
        token_table: torch.Tensor | np.ndarray,
        tokenizer: Any | None = None,
        *,
        idf: CorpusVocabulary | torch.Tensor | None = None,
        stop_words: Iterable[str] = STOP_WORDS,
    ) -> None:
        if not _is_instance(model, "imrnns.model", "IMRNN"):
            raise TypeError(f"model must be an IMRNN, got {type(model).__name__}")
        if isinstance(token_table, np.ndarray):
            token_table = torch.from_numpy(token_table)
        table = check_float("token_table", token_table, 2)
        n = model.config.input_dim
        if table.shape[1] != n or table.shape[0] == 0:
            raise ValueError(
                f"token_table must have shape (vocab, {n}): the input embedding table of the "
                f"{n}-d encoder the adapter was trained on; got {describe(table)}. A table of "
                f"another width belongs to another encoder and cannot be compared with the "
                f"back-projected deltas."
            )
        self.model = model
        self.token_table = table
        self.tokenizer = tokenizer
        self.stop_words = frozenset(w.lower() for w in stop_words)
        vocab = table.shape[0]
        if isinstance(idf, CorpusVocabulary):
            if idf.df.shape != (vocab,):
                raise ValueError(
                    f"idf covers {idf.df.shape[0]} tokens but token_table has {vocab} rows: "
                    "build the CorpusVocabulary with the tokenizer of this table"
                )
            weights: torch.Tensor | None = idf.idf
            support: torch.Tensor | None = idf.in_corpus
        elif idf is not None:
            weights = check_float("idf", idf, 1).detach().float().cpu()
            if weights.shape != (vocab,):
                raise ValueError(f"idf must have shape ({vocab},), got {describe(weights)}")
            if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
                raise ValueError("idf weights must be finite and non-negative")
            support = weights > 0
        else:
            weights = support = None
        self._weights, self._support = weights, support

    # ---------------------------------------------------------------- pieces
    @property
    def pinv(self) -> torch.Tensor:
        """(n, m) pseudo-inverse of the projection (cached across calls and explainers)."""
        return projection_pinv(self.model)

    def _info(self) -> _TokenInfo | None:
        if self.tokenizer is None:
            return None
        return _token_info(self.tokenizer, self.token_table.shape[0], self.stop_words)

    def backproject(self, deltas: torch.Tensor) -> torch.Tensor:
        """(..., m) modulation deltas -> (..., n): ``P^+ delta``."""
        m = self.model.config.working_dim
        deltas = check_float("deltas", deltas)
        if deltas.shape[-1] != m:
            raise ValueError(
                f"deltas must have last dim {m} (the working dim), got {describe(deltas)}"
            )
        pinv = self.pinv
        return deltas.to(pinv.device, pinv.dtype) @ pinv.T

    def similarities(self, deltas: torch.Tensor) -> torch.Tensor:
        """(R, m) deltas -> (R, V) cosines of their back-projections with every token row."""
        x = self.backproject(deltas)
        table = _normalised_table(self.token_table, x.device, x.dtype)
        return F.normalize(x, dim=-1) @ table.T

    def _text_support(
        self, info: _TokenInfo, texts: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows (R,) int64, support (U, V) bool): row r's text is unique text ``rows[r]``,
        whose words are the tokens marked in ``support[rows[r]]``.

        Each distinct text is split once (explain passes every pair text twice: once for the
        query delta, once for the document delta).
        """
        unique: dict[str, int] = {}
        rows = torch.tensor([unique.setdefault(t, len(unique)) for t in texts], dtype=torch.long)
        r_idx: list[int] = []
        c_idx: list[int] = []
        for u, text in enumerate(unique):
            ids = {info.word_to_id[w] for w in info.split(text) if w in info.word_to_id}
            r_idx += [u] * len(ids)
            c_idx += ids
        mask = torch.zeros(len(unique), len(info.tokens), dtype=torch.bool)
        if r_idx:
            mask[torch.tensor(r_idx), torch.tensor(c_idx)] = True
        return rows, mask

    def attribute(
        self,
        deltas: torch.Tensor,
        *,
        top_k: int = 10,
        filter: bool = True,
        texts: Sequence[str] | None = None,
    ) -> list[list[TokenScore]]:
        """Top tokens of each (R, m) modulation delta, best first.

        Args:
            deltas: (R, m) deltas in the projected space.
            top_k: tokens per delta (fewer when the filter leaves fewer).
            filter: drop spurious tokens and weight by IDF (module docstring); False is the
                paper's plain method.
            texts: R strings, the text each delta's tokens must come from (filter) and that
                ``in_text`` refers to; None: corpus support (when the explainer has an idf
                vocabulary) or none.
        """
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0:
            raise ValueError(f"top_k must be a positive int, got {top_k!r}")
        deltas = check_float("deltas", deltas, 2)
        r = deltas.shape[0]
        text_list = _check_texts("texts", texts, r)
        info = self._info()
        if filter and info is None:
            raise ValueError(
                "filter=True needs the tokenizer (to tell words from fragments and stop "
                "words): pass tokenizer=, or filter=False for the plain method"
            )
        x = F.normalize(self.backproject(deltas), dim=-1)
        table = _normalised_table(self.token_table, x.device, x.dtype)
        rows = support = None
        if info is not None and text_list is not None:
            rows, support = self._text_support(info, text_list)
        if filter:
            assert info is not None  # checked above
            allowed = info.lexical
            if support is not None:
                allowed = allowed & support.any(dim=0)
            elif self._support is not None:
                allowed = allowed & self._support
            if self._weights is not None:
                allowed = allowed & (self._weights > 0)
            # Only the tokens some row may return are scored: with text support that is the
            # pairs' own words, a small part of the vocabulary, so the similarity GEMM, the
            # masking and the top-k shrink with it.
            cols = allowed.nonzero().squeeze(1)
            sims = (x @ table[cols.to(table.device)].T).cpu()
            key = sims.abs()
            if self._weights is not None:
                key = key * self._weights[cols].to(key.dtype).unsqueeze(0)
            if support is not None:
                key = key.masked_fill(~support[:, cols][rows], float("-inf"))
        else:
            cols = None
            sims = (x @ table.T).cpu()
            key = sims.abs()
            if info is not None:
                key = key.masked_fill(info.special.unsqueeze(0), float("-inf"))
        k = min(top_k, key.shape[1])
        vals, idx = torch.topk(key, k, dim=1)
        scores = sims.gather(1, idx)
        ids = idx if cols is None else cols[idx]
        in_text = None if support is None else support[rows.unsqueeze(1), ids]
        weights = self._weights if filter and self._weights is not None else None
        vals_l, ids_l, scores_l = vals.tolist(), ids.tolist(), scores.tolist()
        w_l = None if weights is None else weights[ids].tolist()
        t_l = None if in_text is None else in_text.tolist()
        out: list[list[TokenScore]] = []
        for row in range(r):
            items: list[TokenScore] = []
            for j in range(k):
                if not vals_l[row][j] > 0:  # -inf: filtered out; 0: a zero delta says nothing
                    break
                i, s = ids_l[row][j], scores_l[row][j]
                items.append(
                    TokenScore(
                        token=info.tokens[i] if info is not None else f"[{i}]",
                        score=s,
                        sign=1 if s >= 0 else -1,
                        weight=1.0 if w_l is None else w_l[row][j],
                        token_id=i,
                        in_text=None if t_l is None else t_l[row][j],
                    )
                )
            out.append(items)
        return out

    # ---------------------------------------------------------------- pairs
    @torch.no_grad()
    def _modulate(
        self,
        q: torch.Tensor,
        d: torch.Tensor,
        feedback: Any,
        feedback_k: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(p(q), q~, p(d), d~), each (B, m)."""
        model = self.model
        if feedback is None:
            # The pair alone: the document is the query's whole feedback set (official
            # explain; forward's candidates double as the feedback set).
            out = model(q, d.unsqueeze(1))
            return (
                out.projected_queries,
                out.modulated_queries,
                out.projected_documents[:, 0],
                out.modulated_documents[:, 0],
            )
        pq = model.project(q)
        if isinstance(feedback, torch.Tensor | np.ndarray):
            fb = torch.from_numpy(feedback) if isinstance(feedback, np.ndarray) else feedback
            fb = check_float("feedback", fb, (2, 3))
            if fb.dim() == 2:
                fb = fb.unsqueeze(0).expand(q.shape[0], -1, -1)
            if fb.shape[0] != q.shape[0] or fb.shape[2] != q.shape[1] or fb.shape[1] == 0:
                raise ValueError(
                    f"feedback must have shape (B={q.shape[0]}, K, {q.shape[1]}) (base "
                    f"embeddings of each query's feedback documents), got {describe(fb)}"
                )
            b, k, n = fb.shape
            corpus = model.project(fb.reshape(b * k, n).to(model.device))
            ids = torch.arange(b * k, device=corpus.device).view(b, k)
            tq, _, q_tilde = model.query_state(pq, corpus, ids)
        else:
            tq, q_tilde = self._index_query_state(feedback, q, pq, feedback_k)
        pd = model.project(d)
        d_tilde = model.modulate_documents(pd.unsqueeze(1), tq)[:, 0]
        return pq, q_tilde, pd, d_tilde

    def _index_query_state(
        self, index: Any, q: torch.Tensor, pq: torch.Tensor, feedback_k: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The query state a search of ``index`` uses: same feedback set, same weights."""
        if not _is_instance(index, "imrnns.index", "IMRNNIndex"):
            raise TypeError(
                "feedback must be None (the document alone), an IMRNNIndex (its first-stage "
                f"feedback set) or a (B, K, n) tensor of feedback embeddings, got "
                f"{type(index).__name__}"
            )
        model = self.model
        if index.model is not model:
            raise ValueError(
                "feedback index was built with another IMRNN: its projected corpus does not "
                "match this model (explain with index.model)"
            )
        kf = index.feedback_k if feedback_k is None else feedback_k
        if isinstance(kf, bool) or not isinstance(kf, int) or kf <= 0:
            raise ValueError(f"feedback_k must be a positive int, got {kf!r}")
        # The index's own query side (same code as its search), so the explained scores are
        # bitwise those of index.search.
        state = index.query_state(q.float(), feedback_k=kf)
        return state.query_transform.to(pq.device), state.modulated_queries.to(pq.device)

    def explain(
        self,
        query_embeddings: torch.Tensor | np.ndarray,
        doc_embeddings: torch.Tensor | np.ndarray,
        *,
        top_k: int = 10,
        filter: bool = True,
        query_texts: Sequence[str] | str | None = None,
        doc_texts: Sequence[str] | str | None = None,
        doc_ids: Sequence[str] | None = None,
        feedback: Any = None,
        feedback_k: int | None = None,
    ) -> list[Explanation]:
        """Explain B (query, document) pairs; see :func:`explain`."""
        n = self.model.config.input_dim
        q = _as_tensor("query_embeddings", query_embeddings, n)
        d = _as_tensor("doc_embeddings", doc_embeddings, n)
        if q.shape[0] != d.shape[0]:
            raise ValueError(
                f"query_embeddings and doc_embeddings disagree on the number of pairs: "
                f"{describe(q)} vs {describe(d)}"
            )
        b = q.shape[0]
        qt = _check_texts("query_texts", query_texts, b)
        dt = _check_texts("doc_texts", doc_texts, b)
        if doc_ids is not None and len(doc_ids) != b:
            raise ValueError(f"doc_ids must hold {b} ids, got {len(doc_ids)}")
        model = self.model
        q = q.to(model.device, model.dtype)
        d = d.to(model.device, model.dtype)
        was_training = model.training
        model.eval()  # dropout would make explanations random
        try:
            pq, q_tilde, pd, d_tilde = self._modulate(q, d, feedback, feedback_k)
        finally:
            model.train(was_training)
        dtype = _compute_dtype(model)
        with torch.no_grad():
            base = F.cosine_similarity(q.to(dtype), d.to(dtype), dim=1)
            imrnn = F.cosine_similarity(q_tilde.to(dtype), d_tilde.to(dtype), dim=1)
            deltas = torch.cat([q_tilde - pq, d_tilde - pd]).to(dtype)
        texts = None
        if qt is not None or dt is not None:
            pair = [f"{qt[i] if qt else ''}\n{dt[i] if dt else ''}" for i in range(b)]
            texts = pair + pair
        tokens = self.attribute(deltas, top_k=top_k, filter=filter, texts=texts)
        # One small copy per row, so an Explanation never pins the whole batch's storage.
        deltas_cpu = [row.clone() for row in deltas.detach().float().cpu()]
        base_l, imrnn_l = base.cpu().tolist(), imrnn.cpu().tolist()
        return [
            Explanation(
                query_tokens=tokens[i],
                document_tokens=tokens[b + i],
                base_score=base_l[i],
                imrnn_score=imrnn_l[i],
                score_delta=imrnn_l[i] - base_l[i],
                query_delta=deltas_cpu[i],
                document_delta=deltas_cpu[b + i],
                filtered=filter,
                query_text=qt[i] if qt else None,
                document_text=dt[i] if dt else None,
                document_id=None if doc_ids is None else str(doc_ids[i]),
                faithfulness=FAITHFULNESS.get(METHOD_FILTERED if filter else METHOD_PLAIN),
            )
            for i in range(b)
        ]

    __call__ = explain


def explain(
    model: IMRNN,
    query_emb: torch.Tensor | np.ndarray,
    doc_emb: torch.Tensor | np.ndarray,
    token_table: torch.Tensor | np.ndarray,
    *,
    tokenizer: Any | None = None,
    top_k: int = 10,
    filter: bool = True,
    query_texts: Sequence[str] | str | None = None,
    doc_texts: Sequence[str] | str | None = None,
    doc_ids: Sequence[str] | None = None,
    idf: CorpusVocabulary | torch.Tensor | None = None,
    feedback: Any = None,
    feedback_k: int | None = None,
) -> list[Explanation]:
    """Explain B (query, document) pairs by Moore-Penrose back-projection.

    Args:
        model: the adapter.
        query_emb, doc_emb: (B, n) or (n,) base-encoder embeddings (numpy or torch).
        token_table: (V, n) input token-embedding table of the base encoder.
        tokenizer: the encoder's tokenizer (needed by the filter and for token strings).
        top_k: tokens per side.
        filter: drop fragments, stop words and unsupported tokens and weight by IDF (default);
            False reproduces the paper's plain method.
        query_texts, doc_texts: B strings; the filter keeps only words of the pair's texts.
        doc_ids: B document ids, carried into the explanations.
        idf: :class:`CorpusVocabulary` (corpus support and IDF) or (V,) weights.
        feedback: the query's feedback set. None: the document alone (the official explain).
            An :class:`~imrnns.index.IMRNNIndex` built on ``model``: the index's first-stage
            feedback set, so that the scores are those of ``index.search``. A (B, K, n) or
            (K, n) tensor: base embeddings of each query's feedback documents.
        feedback_k: feedback set size when ``feedback`` is an index (default: the index's).

    Returns:
        One :class:`Explanation` per pair, in order.

    The pseudo-inverse, the normalised table and the tokenizer's word tables are cached
    across calls (weakly keyed); build an :class:`Explainer` to also keep the IDF vector.
    """
    explainer = Explainer(model, token_table, tokenizer, idf=idf)
    return explainer.explain(
        query_emb,
        doc_emb,
        top_k=top_k,
        filter=filter,
        query_texts=query_texts,
        doc_texts=doc_texts,
        doc_ids=doc_ids,
        feedback=feedback,
        feedback_k=feedback_k,
    )
