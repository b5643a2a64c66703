"""Word attributions through the encoder: which words of the query and of the document make
the adapter's added score.

The quantity explained is what the adapter added to the pair's score,

    A(q, d) = IMRNN(q, d) - cos(q, d),

with q and d the base encoder's embeddings of the query text and the document text (the
question a user asks is "why did the adapter move this document", not "why is it similar").
Each word w of a side (its normalised form, every occurrence counted together) gets a signed
effect e_w: positive when the word raises A, negative when it lowers it. Four methods:

- ``"occlusion"``: ``e_w = A(text) - A(text without w)``, the text re-encoded with every
  occurrence of w deleted (batched through the encoder). Exact by construction (it *is* the
  deletion experiment), one encoder pass per distinct word the encoder sees.
- ``"integrated-gradients"``: Sundararajan et al. (2017) on the word-piece input embeddings
  e_t (before position embeddings and LayerNorm), baseline 0 for the text's pieces (special
  tokens and prompt kept), path integral by ``steps``-point Gauss-Legendre quadrature:
  ``a_t = e_t . sum_s w_s dA/dx_t (alpha_s e)``; completeness: ``sum_t a_t = A(x) - A(0)`` up
  to the quadrature error (:attr:`WordEffects.completeness`). ``e_w = sum`` of its pieces.
- ``"gradient-x-input"``: ``a_t = e_t . dA/de_t``, one forward and backward pass.
- ``"word-gradient"``: first order at the embedding, no encoder pass over the text. With
  mean pooling, deleting w's p_w pieces out of T pooled tokens moves the (unit) embedding x
  by about ``-(p_w / T) v_w^perp``, v_w the encoder's embedding of w alone and ``perp`` the
  part orthogonal to x (the normalisation's Jacobian), so
  ``e_w ~ (p_w / T) (dA/dx) . v_w^perp``. Costs a tokenisation, the lone-word embeddings
  (memoised per explainer) and a gradient through the adapter alone.

The methods are compared in ``benchmarks/explain_faithfulness.py`` (deletion of the top-k
words, ERASER-style); :data:`imrnns.explain.faithfulness.FAITHFULNESS` holds its figures.

Where the query's feedback set comes from (``feedback=``), as in :func:`imrnns.explain.explain`:
None, the document alone (both sides move the feedback set: the official explain); an
:class:`~imrnns.index.IMRNNIndex`, whose search state scores the pair: document edits keep the
query's state (``T_q``, ``q~``), so other documents' scores never change; query edits re-run
the first stage (occlusion) or hold the feedback set fixed (gradients: the first stage is
piecewise constant in the query); a (B, K, n) tensor of feedback embeddings.

Only words the encoder sees count: pieces past the encoder's ``max_length`` are truncated
before the pass, so words that occur only there have no effect and are not candidates.

Tested in ``tests/explain/test_faithfulness.py``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from imrnns.explain.attribution import Explanation, TokenScore, _is_instance
from imrnns.explain.faithfulness import FAITHFULNESS
from imrnns.explain.methods import (
    DEFAULT_METHOD,
    METHOD_INTEGRATED_GRADIENTS,
    METHOD_OCCLUSION,
    METHOD_WORD_GRADIENT,
    WORD_METHODS,
)
from imrnns.explain.vocabulary import delete_words, word_spans
from imrnns_kernels._validation import check_finite, check_float, describe

if TYPE_CHECKING:
    from imrnns.model import IMRNN

__all__ = [
    "DEFAULT_METHOD",
    "WORD_METHODS",
    "WordEffects",
    "WordExplainer",
]


SIDES = ("query", "document")


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class WordEffects:
    """The signed effect of every word the encoder sees, on one side of one pair.

    Attributes:
        words: the side's distinct normalised words, in order of first occurrence.
        effects: (len(words),) float64, the effect of each on ``A = IMRNN - base``.
        pieces: (len(words),) int64, word pieces of all its occurrences the encoder sees.
        completeness: integrated gradients only: ``(sum of all piece attributions,
            A(x) - A(baseline))``; None for the other methods.
    """

    words: list[str]
    effects: np.ndarray
    pieces: np.ndarray
    completeness: tuple[float, float] | None = None

    def ranked(self) -> list[str]:
        """The words by effect, largest first (ties: first occurrence)."""
        order = sorted(range(len(self.words)), key=lambda i: (-self.effects[i], i))
        return [self.words[i] for i in order]


@dataclass
class PairEffects:
    """Word effects on both sides of one pair, with the pair's scores."""

    base_score: float
    imrnn_score: float
    query: WordEffects
    document: WordEffects
    seconds: float = 0.0

    @property
    def added_score(self) -> float:
        return self.imrnn_score - self.base_score


# --------------------------------------------------------------------------- the score


class _AddedScore:
    """``A = IMRNN - cos`` of one pair as a differentiable function of either side's
    embedding (rows are variants of that side; the other side is held)."""

    def __init__(
        self, model: IMRNN, q: torch.Tensor, d: torch.Tensor, feedback: Any, feedback_k: Any
    ) -> None:
        self.model = model
        self.q = q.reshape(1, -1).to(model.device, model.dtype)
        self.d = d.reshape(1, -1).to(model.device, model.dtype)
        self.index = None
        self.corpus: torch.Tensor | None = None
        self.cache: torch.Tensor | None = None
        with torch.no_grad():
            self.pd = model.project(self.d)
        if feedback is None:
            self.mode = "pair"
        elif isinstance(feedback, torch.Tensor):
            self.mode = "fixed"
            fb = feedback.to(model.device, model.dtype)
            with torch.no_grad():
                self.corpus = model.project(fb)
            self.ids = torch.arange(fb.shape[0], device=model.device).unsqueeze(0)
            self.weights: torch.Tensor | None = None
        else:
            self.mode = "index"
            index = feedback
            self.index = index
            self.feedback_k = index.feedback_k if feedback_k is None else feedback_k
            state = index.query_state(self.q.float(), feedback_k=self.feedback_k)
            self.corpus = index.projected_corpus
            self.cache = index.document_cache
            ids = state.feedback_ids.to(model.device)
            self.weights = state.feedback_weights
            if bool((ids < 0).any()) and self.weights is None:
                # QueryState promises zero weights on padding; without them the padded rows
                # would enter the feedback mean.
                raise ValueError("the index's feedback set has padding (-1) but no weights")
            self.ids = ids.clamp(min=0)
            self.tq = state.query_transform.to(model.device, model.dtype)
            self.q_tilde = state.modulated_queries.to(model.device, model.dtype)

    def _cos(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.cosine_similarity(a, b.expand_as(a), dim=1)

    def _state(self, q_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(T_q, q~) of R query rows with this pair's feedback set held."""
        model = self.model
        assert self.corpus is not None
        pq = model.project(q_rows)
        r = q_rows.shape[0]
        ids = self.ids.expand(r, -1)
        weights = None if self.weights is None else self.weights.expand(r, -1)
        tq, _, q_tilde = model.query_state(pq, self.corpus, ids, weights, self.cache)
        return tq, q_tilde

    def document(self, d_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(IMRNN (R,), base (R,)) of the pair with its document embedding replaced by each
        of the (R, n) rows."""
        model = self.model
        d_rows = d_rows.to(model.device, model.dtype)
        r = d_rows.shape[0]
        base = self._cos(d_rows, self.q)
        if self.mode == "pair":
            out = model(self.q.expand(r, -1), d_rows.unsqueeze(1))
            return out.scores[:, 0], base
        if self.mode == "index":
            tq, q_tilde = self.tq, self.q_tilde
        else:
            tq, q_tilde = self._state(self.q)
        pd = model.project(d_rows).unsqueeze(1)
        d_tilde = model.modulate_documents(pd, tq.expand(r, -1))[:, 0]
        return self._cos(d_tilde, q_tilde), base

    def query(
        self, q_rows: torch.Tensor, *, exact: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(IMRNN (R,), base (R,)) of the pair with its query embedding replaced by each of
        the (R, n) rows. ``exact`` (no gradient) re-runs an index's first stage for each row,
        as a search of that query would; otherwise the feedback set is held."""
        model = self.model
        q_rows = q_rows.to(model.device, model.dtype)
        r = q_rows.shape[0]
        base = self._cos(q_rows, self.d)
        if self.mode == "pair":
            out = model(q_rows, self.d.expand(r, -1).unsqueeze(1))
            return out.scores[:, 0], base
        if self.mode == "index" and exact:
            assert self.index is not None
            state = self.index.query_state(q_rows.detach().float(), feedback_k=self.feedback_k)
            tq = state.query_transform.to(model.device, model.dtype)
            q_tilde = state.modulated_queries.to(model.device, model.dtype)
        else:
            tq, q_tilde = self._state(q_rows)
        d_tilde = model.modulate_documents(self.pd.expand(r, -1).unsqueeze(1), tq)[:, 0]
        return self._cos(d_tilde, q_tilde), base

    def added(self, side: str, rows: torch.Tensor, *, exact: bool = True) -> torch.Tensor:
        """(R,) ``A`` with that side replaced by each row."""
        if side == "document":
            imrnn, base = self.document(rows)
        else:
            imrnn, base = self.query(rows, exact=exact)
        return imrnn - base


# --------------------------------------------------------------------------- the encoder


@dataclass
class _Pieces:
    """One text as the encoder sees it: its word pieces mapped to its words."""

    input_ids: list[int]
    piece_word: np.ndarray  # (L,) int64: index into words, -1 for specials, prompt, punctuation
    text_piece: np.ndarray  # (L,) bool: a piece of the text (not a special token, not prompt)
    words: list[str]  # distinct normalised words with a piece in the window
    pieces: np.ndarray  # (len(words),) int64: pieces of each word (all occurrences)


class _EncoderPath:
    """The encoder's own forward pass (its tokenisation, prompt, truncation, modules), with a
    hook that replaces the word-piece embeddings: gradients reach the input tokens."""

    def __init__(self, encoder: Any) -> None:
        for attr in ("model", "tokenizer", "transformer"):
            try:
                getattr(encoder, attr)
            except (TypeError, AttributeError) as e:
                raise TypeError(
                    f"word attributions need a transformer encoder (imrnns.encoders.Encoder): "
                    f"{type(encoder).__name__} has no usable .{attr} ({e})"
                ) from e
        self.encoder = encoder
        self.tokenizer = encoder.tokenizer
        if not getattr(self.tokenizer, "is_fast", False):
            raise TypeError(
                f"word attributions need a fast tokenizer (character offsets), got "
                f"{type(self.tokenizer).__name__}"
            )

    def prefix(self, role: str) -> str:
        enc = self.encoder
        return (enc.query_prefix if role == "query" else enc.passage_prefix) or ""

    def pieces(self, text: str, role: str) -> _Pieces:
        prefix = self.prefix(role)
        enc = self.tokenizer(
            prefix + text,
            truncation=True,
            max_length=int(self.encoder.max_length),
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
        )
        ids = list(enc["input_ids"])
        special = np.asarray(enc["special_tokens_mask"], dtype=bool)
        spans = word_spans(text, self.tokenizer)
        starts = np.asarray([s for s, _, _ in spans], dtype=np.int64)
        ends = np.asarray([e for _, e, _ in spans], dtype=np.int64)
        index: dict[str, int] = {}
        piece_word = np.full(len(ids), -1, dtype=np.int64)
        text_piece = np.zeros(len(ids), dtype=bool)
        off = len(prefix)
        for t, (a, b) in enumerate(enc["offset_mapping"]):
            if special[t] or b <= off or b <= a:
                continue
            text_piece[t] = True
            a, b = a - off, b - off
            j = int(np.searchsorted(starts, a, side="right")) - 1
            if j >= 0 and a >= starts[j] and b <= ends[j]:
                piece_word[t] = index.setdefault(spans[j][2], len(index))
        words = list(index)
        counts = np.bincount(piece_word[piece_word >= 0], minlength=len(words)).astype(np.int64)
        return _Pieces(ids, piece_word, text_piece, words, counts)

    def encode(self, texts: list[str], role: str, batch_size: int) -> torch.Tensor:
        """(R, n) float32 embeddings, exactly as ``encode_query`` / ``encode_document``."""
        fn = self.encoder.encode_query if role == "query" else self.encoder.encode_document
        out = fn(texts, cache=False, batch_size=batch_size, show_progress=False)
        return torch.from_numpy(np.ascontiguousarray(out))

    def attribution_pass(
        self,
        texts: list[str],
        pieces: list[_Pieces],
        role: str,
        alphas: list[float],
        target: Callable[[torch.Tensor], torch.Tensor] | None,
    ) -> tuple[torch.Tensor, list[np.ndarray]]:
        """One forward and backward pass over R rows: row r is ``texts[r]`` with its text
        pieces' input embeddings scaled by ``alphas[r]``.

        Returns (the R embeddings, detached; per row, ``e_t . dT/dx_t`` for every piece t,
        where T = ``target(embeddings).sum()``). Rows are independent, so the gradient of the
        sum at a row is the gradient of that row's own target. ``target=None``: the
        embeddings alone (no backward pass; the per-piece list is empty).
        """
        enc = self.encoder
        st_model = enc.model
        feats = st_model.preprocess(texts, prompt=self.prefix(role) or None, task=role)
        ids = feats["input_ids"]
        scale = torch.ones(ids.shape, dtype=torch.float32)
        for r, p in enumerate(pieces):
            got = ids[r, : len(p.input_ids)].tolist()
            if got != p.input_ids or int(feats["attention_mask"][r].sum()) != len(p.input_ids):
                raise ValueError(
                    f"the encoder's tokenisation of text {r} differs from its tokenizer's "
                    f"({len(got)} vs {len(p.input_ids)} pieces): cannot map its pieces to words"
                )
            scale[r, : len(p.input_ids)][torch.from_numpy(p.text_piece)] = alphas[r]
        holder: dict[str, torch.Tensor] = {}

        def hook(_module: Any, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
            holder["e"] = output.detach()
            x = output.detach() * scale.to(output.device, output.dtype).unsqueeze(-1)
            x.requires_grad_(torch.is_grad_enabled())
            holder["x"] = x
            return x

        handle = enc.transformer.get_input_embeddings().register_forward_hook(hook)
        try:
            with torch.set_grad_enabled(target is not None):
                out = st_model(feats, task=role)["sentence_embedding"]
                if enc.normalized:
                    out = F.normalize(out, dim=-1)
                if target is None:
                    return out.detach().float().cpu(), []
                total = target(out).sum()
                (grad,) = torch.autograd.grad(total, holder["x"])
        finally:
            handle.remove()
        per_piece = (grad * holder["e"]).sum(-1).detach().double().cpu()
        rows = [per_piece[r, : len(p.input_ids)].numpy() for r, p in enumerate(pieces)]
        return out.detach().float().cpu(), rows


def _gauss_legendre(steps: int) -> tuple[list[float], list[float]]:
    """Nodes and weights of the ``steps``-point Gauss-Legendre rule on [0, 1]."""
    x, w = np.polynomial.legendre.leggauss(steps)
    return ((x + 1.0) / 2.0).tolist(), (w / 2.0).tolist()


# --------------------------------------------------------------------------- explainer


class WordExplainer:
    """Explains IMRNN scores by the words of the query and document texts, through the
    encoder (module docstring for the maths of each method).

    Args:
        model: the adapter.
        encoder: the base encoder the adapter was trained on, an
            :class:`imrnns.encoders.Encoder` (a transformer with a fast tokenizer).
        method: one of :data:`WORD_METHODS` (default :data:`DEFAULT_METHOD`).
        steps: integrated-gradients quadrature points.
        batch_size: texts (or interpolation rows) per encoder pass.
    """

    def __init__(
        self,
        model: IMRNN,
        encoder: Any,
        *,
        method: str = DEFAULT_METHOD,
        steps: int = 16,
        batch_size: int = 32,
    ) -> None:
        if not _is_instance(model, "imrnns.model", "IMRNN"):
            raise TypeError(f"model must be an IMRNN, got {type(model).__name__}")
        if method not in WORD_METHODS:
            raise ValueError(f"method must be one of {list(WORD_METHODS)}, got {method!r}")
        for name, value in (("steps", steps), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.model = model
        self.path = _EncoderPath(encoder)
        self.encoder = encoder
        n = model.config.input_dim
        dim = getattr(encoder, "dim", None)
        if dim is not None and dim != n:
            raise ValueError(
                f"encoder {getattr(encoder, 'name', '')!r} gives {dim}-d embeddings but the "
                f"adapter takes {n}-d ones: explain with the encoder it was trained on"
            )
        self.method = method
        self.steps = steps
        self.batch_size = batch_size
        self._word_vectors: dict[tuple[str, str], torch.Tensor] = {}

    # ---------------------------------------------------------------- public
    def word_effects(
        self,
        query_texts: Sequence[str] | str,
        doc_texts: Sequence[str] | str,
        *,
        feedback: Any = None,
        feedback_k: int | None = None,
        query_embeddings: torch.Tensor | np.ndarray | None = None,
        doc_embeddings: torch.Tensor | np.ndarray | None = None,
    ) -> list[PairEffects]:
        """The signed effect of every word on both sides of B pairs (:class:`PairEffects`).

        ``query_embeddings`` / ``doc_embeddings``: (B, n) embeddings of the texts by this
        encoder, when the caller has them (an index's cached corpus): they score the pair
        and save an encoder pass each. Otherwise the texts are encoded here.
        """
        qt, dt = _pair_texts(query_texts, doc_texts)
        model = self.model
        n = model.config.input_dim
        fb = _feedback_rows(feedback, len(qt), n, model)
        was_training = model.training
        model.eval()  # dropout would make attributions random
        try:
            q_emb = _given_or_encoded(
                "query_embeddings", query_embeddings, qt, "query", self.path, self.batch_size
            )
            d_emb = _given_or_encoded(
                "doc_embeddings", doc_embeddings, dt, "document", self.path, self.batch_size
            )
            _check_width(q_emb, d_emb, n)
            out: list[PairEffects] = []
            for i in range(len(qt)):
                t0 = time.perf_counter()
                pair_fb = fb[i] if isinstance(fb, torch.Tensor) else feedback
                scorer = _AddedScore(model, q_emb[i], d_emb[i], pair_fb, feedback_k)
                with torch.no_grad():
                    imrnn, base = scorer.document(scorer.d)
                sides = {
                    side: self._side(scorer, text, side, emb)
                    for side, text, emb in (
                        ("query", qt[i], q_emb[i]),
                        ("document", dt[i], d_emb[i]),
                    )
                }
                out.append(
                    PairEffects(
                        base_score=float(base[0]),
                        imrnn_score=float(imrnn[0]),
                        query=sides["query"],
                        document=sides["document"],
                        seconds=time.perf_counter() - t0,
                    )
                )
            return out
        finally:
            model.train(was_training)

    def explain(
        self,
        query_texts: Sequence[str] | str,
        doc_texts: Sequence[str] | str,
        *,
        top_k: int = 10,
        doc_ids: Sequence[str] | None = None,
        feedback: Any = None,
        feedback_k: int | None = None,
        query_embeddings: torch.Tensor | np.ndarray | None = None,
        doc_embeddings: torch.Tensor | np.ndarray | None = None,
    ) -> list[Explanation]:
        """Explain B (query text, document text) pairs: per side, the ``top_k`` words of
        largest ``|effect|`` with their signed effect on the adapter's added score.
        Arguments as :meth:`word_effects`."""
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0:
            raise ValueError(f"top_k must be a positive int, got {top_k!r}")
        qt, dt = _pair_texts(query_texts, doc_texts)
        if doc_ids is not None and len(doc_ids) != len(qt):
            raise ValueError(f"doc_ids must hold {len(qt)} ids, got {len(doc_ids)}")
        pairs = self.word_effects(
            qt,
            dt,
            feedback=feedback,
            feedback_k=feedback_k,
            query_embeddings=query_embeddings,
            doc_embeddings=doc_embeddings,
        )
        m = self.model.config.working_dim
        out = []
        for i, p in enumerate(pairs):
            out.append(
                Explanation(
                    query_tokens=_tokens(p.query, top_k),
                    document_tokens=_tokens(p.document, top_k),
                    base_score=p.base_score,
                    imrnn_score=p.imrnn_score,
                    score_delta=p.added_score,
                    query_delta=torch.zeros(m),
                    document_delta=torch.zeros(m),
                    filtered=False,
                    query_text=qt[i],
                    document_text=dt[i],
                    document_id=None if doc_ids is None else str(doc_ids[i]),
                    attribution=self.method,
                    faithfulness=FAITHFULNESS.get(self.method),
                    seconds=p.seconds,
                )
            )
        return out

    __call__ = explain

    # ---------------------------------------------------------------- methods
    def _side(self, scorer: _AddedScore, text: str, side: str, emb: torch.Tensor) -> WordEffects:
        role = "query" if side == "query" else "document"
        pieces = self.path.pieces(text, role)
        if not pieces.words:
            return WordEffects([], np.zeros(0), np.zeros(0, dtype=np.int64))
        if self.method == METHOD_OCCLUSION:
            return self._occlusion(scorer, text, side, pieces)
        if self.method == METHOD_WORD_GRADIENT:
            return self._word_gradient(scorer, side, emb, pieces)
        return self._gradient(scorer, text, side, pieces)

    def _occlusion(self, scorer: _AddedScore, text: str, side: str, pieces: _Pieces) -> WordEffects:
        tok = self.path.tokenizer
        variants = [text] + [delete_words(text, (w,), tok) for w in pieces.words]
        emb = self.path.encode(
            variants, "query" if side == "query" else "document", self.batch_size
        )
        with torch.no_grad():
            a = scorer.added(side, emb).double().cpu()
        check_finite("occlusion scores", a)
        return WordEffects(pieces.words, (a[0] - a[1:]).numpy(), pieces.pieces)

    def _gradient(self, scorer: _AddedScore, text: str, side: str, pieces: _Pieces) -> WordEffects:
        ig = self.method == METHOD_INTEGRATED_GRADIENTS
        alphas, weights = _gauss_legendre(self.steps) if ig else ([1.0], [1.0])
        role = "query" if side == "query" else "document"
        per_piece = np.zeros(len(pieces.input_ids))
        bs = self.batch_size
        for lo in range(0, len(alphas), bs):
            chunk = alphas[lo : lo + bs]
            _, rows = self.path.attribution_pass(
                [text] * len(chunk),
                [pieces] * len(chunk),
                role,
                chunk,
                lambda x: scorer.added(side, x, exact=False),
            )
            for w, row in zip(weights[lo : lo + bs], rows, strict=True):
                per_piece += w * row
        effects = np.zeros(len(pieces.words))
        mask = pieces.piece_word >= 0
        np.add.at(effects, pieces.piece_word[mask], per_piece[mask])
        completeness = None
        if ig:
            # A(x) - A(baseline): both ends through the same pass (no gradient needed).
            ends, _ = self.path.attribution_pass(
                [text, text], [pieces, pieces], role, [1.0, 0.0], None
            )
            with torch.no_grad():
                a = scorer.added(side, ends, exact=False).double()
            completeness = (float(per_piece[pieces.text_piece].sum()), float(a[0] - a[1]))
        if not np.isfinite(effects).all():
            raise ValueError(f"{self.method}: non-finite attributions for text {text[:60]!r}")
        return WordEffects(pieces.words, effects, pieces.pieces, completeness)

    def word_vectors(self, words: Sequence[str], role: str) -> torch.Tensor:
        """(len(words), n) embeddings of each word alone (memoised per explainer)."""
        missing = [w for w in dict.fromkeys(words) if (role, w) not in self._word_vectors]
        if missing:
            if len(self._word_vectors) + len(missing) > _MAX_WORD_VECTORS:
                self._word_vectors.clear()  # bounded memory: start again rather than grow
            emb = self.path.encode(missing, role, max(self.batch_size, 256))
            for w, row in zip(missing, emb, strict=True):
                self._word_vectors[(role, w)] = row
        return torch.stack([self._word_vectors[(role, w)] for w in words])

    def _word_gradient(
        self, scorer: _AddedScore, side: str, emb: torch.Tensor, pieces: _Pieces
    ) -> WordEffects:
        role = "query" if side == "query" else "document"
        vectors = self.word_vectors(pieces.words, role).to(scorer.model.dtype)
        x = emb.reshape(1, -1).to(scorer.model.device, scorer.model.dtype).requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(scorer.added(side, x, exact=False).sum(), x)
        grad = grad[0].detach().cpu()
        x0 = x[0].detach().cpu()
        if self.encoder.normalized:
            unit = F.normalize(x0, dim=0)
            vectors = vectors - (vectors @ unit).unsqueeze(1) * unit
        else:
            vectors = vectors - x0
        pooled = len(pieces.input_ids)
        effects = (pieces.pieces / pooled) * (vectors.double() @ grad.double()).numpy()
        return WordEffects(pieces.words, effects, pieces.pieces)


_MAX_WORD_VECTORS = 200_000  # 200k x 384 float32 = 300 MB at most


def _tokens(effects: WordEffects, top_k: int) -> list[TokenScore]:
    order = sorted(range(len(effects.words)), key=lambda i: (-abs(effects.effects[i]), i))[:top_k]
    return [
        TokenScore(
            token=effects.words[i],
            score=float(effects.effects[i]),
            sign=1 if effects.effects[i] >= 0 else -1,
            in_text=True,
        )
        for i in order
    ]


def _pair_texts(
    query_texts: Sequence[str] | str, doc_texts: Sequence[str] | str
) -> tuple[list[str], list[str]]:
    qt = [query_texts] if isinstance(query_texts, str) else list(query_texts)
    dt = [doc_texts] if isinstance(doc_texts, str) else list(doc_texts)
    for name, texts in (("query_texts", qt), ("doc_texts", dt)):
        bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
        if bad:
            raise TypeError(f"{name} must hold strings, got {bad[0]}")
    if len(qt) != len(dt) or not qt:
        raise ValueError(
            f"query_texts and doc_texts must be equally many (one pair each, at least one), "
            f"got {len(qt)} and {len(dt)}"
        )
    return qt, dt


def _check_width(q: torch.Tensor, d: torch.Tensor, n: int) -> None:
    if q.shape[1] != n or d.shape[1] != n:
        raise ValueError(
            f"the encoder gives {q.shape[1]}-d embeddings but the adapter takes {n}-d ones"
        )


def _given_or_encoded(
    name: str, given: Any, texts: list[str], role: str, path: _EncoderPath, batch_size: int
) -> torch.Tensor:
    if given is None:
        return path.encode(texts, role, batch_size)
    if isinstance(given, np.ndarray):
        given = torch.from_numpy(np.ascontiguousarray(given))
    t = check_float(name, given, (1, 2))
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.shape[0] != len(texts):
        raise ValueError(f"{name} must have one row per pair ({len(texts)}), got {describe(t)}")
    check_finite(name, t)
    return t.detach().float().cpu()


def _feedback_rows(feedback: Any, b: int, n: int, model: Any) -> Any:
    """None, an index built on ``model``, or a (B, K, n) tensor from (K, n) / (B, K, n)."""
    if feedback is None:
        return None
    if isinstance(feedback, np.ndarray):
        feedback = torch.from_numpy(np.ascontiguousarray(feedback))
    if isinstance(feedback, torch.Tensor):
        fb = check_float("feedback", feedback, (2, 3))
        if fb.dim() == 2:
            fb = fb.unsqueeze(0).expand(b, -1, -1)
        if fb.shape[0] != b or fb.shape[2] != n or fb.shape[1] == 0:
            raise ValueError(
                f"feedback must have shape (B={b}, K, {n}) (base embeddings of each query's "
                f"feedback documents), got {describe(fb)}"
            )
        check_finite("feedback", fb)
        return fb
    if not _is_instance(feedback, "imrnns.index", "IMRNNIndex"):
        raise TypeError(
            "feedback must be None (the document alone), an IMRNNIndex or a (B, K, n) tensor "
            f"of feedback embeddings, got {type(feedback).__name__}"
        )
    if feedback.model is not model:
        raise ValueError(
            "feedback index was built with another IMRNN: its projected corpus does not match "
            "this model (explain with index.model)"
        )
    return feedback
