"""Token-level explanations of IMRNN modulations: Moore-Penrose back-projection, filtered.

The paper's method (arXiv 2601.20084, section "Interpretability"; official ``adapter.py``):
for a query q and a document d the adapter moves ``p(q)`` to ``q~`` and ``p(d)`` to ``d~``.
Each modulation delta (``q~ - p(q)``, ``d~ - p(d)``, in the m-dim projected space) is mapped
back to the encoder's n-dim space with the pseudo-inverse of the projection matrix,
``x = P^+ delta`` (exact inversion when P is square and invertible, the least-squares
preimage otherwise: ``P x = delta`` whenever P has full row rank, as v0.1's 256 x 384 does),
then compared by cosine with every row of the encoder's input token-embedding table
(special tokens excluded). The tokens of largest ``|cosine|`` are the explanation; the sign
says whether the modulation moves towards (+) or away from (-) the token.

Measured on SciFact (``python -m benchmarks.explain_quality``: 100 test queries, each with
its top-1 document, official v0.1 MiniLM adapter): 1.3 % of the plain method's top-10
tokens are words of the query or the document. The cosines of the back-projected deltas
with input word-piece embeddings are at chance level: mean |cos| 0.042 for the pair's own
words, 0.040 for all other words, 0.041 for random directions in R^384. The paper's open
question 1 (noisy tokens such as "Ridges") is this effect. The filter (``filter=True``, the
default) keeps only tokens that can be read as evidence (share of words of the pair: 1.00,
by construction when texts are given; with corpus support alone, no texts: 0.00):

- whole words: WordPiece ``##`` fragments (and SentencePiece pieces without ``▁``) dropped;
- at least two characters, alphanumeric with a letter, not an English stop word;
- supported: a word of the query or document text when texts are given, else a word of the
  corpus vocabulary when a :class:`CorpusVocabulary` is given;
- ranked by ``|cosine| * idf`` (smoothed IDF over the corpus), so that rare, content-bearing
  words outrank frequent ones at equal cosine. (A third of the filtered top-10 is also
  the pair's ten highest-IDF words: the cosines still reorder the rest.)

``filter=False`` reproduces the plain method exactly (the official ranking by ``|cosine|``
with only special tokens excluded). Everything is batched: B pairs cost one (2B, m) x
(m, n) back-projection and one (2B, n) x (n, V) similarity GEMM, over only the columns of
the pairs' words when the filter has texts (100 SciFact pairs: 0.04 s filtered, 0.16 s
plain, one thread of a 2-core CPU, after the first call); the pseudo-inverse, the
normalised token table and the tokenizer's word tables are computed once and cached
(keyed weakly by the projector weight, the table and the tokenizer, and invalidated when
the weight is updated in place).
"""

from __future__ import annotations

import html
import os
import re
import unicodedata
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from imrnns_kernels import _validation as V

if TYPE_CHECKING:
    from imrnns.model import IMRNN

__all__ = [
    "STOP_WORDS",
    "CorpusVocabulary",
    "Explainer",
    "Explanation",
    "TokenScore",
    "explain",
    "format_table",
    "render_html",
]

# NLTK's English list, plus the connectives and reporting verbs of scientific abstracts
# ("furthermore", "demonstrated", "suggest": in SciFact they rank high on IDF yet say nothing
# about the topic). Content words ("cell", "patients", "risk") stay.
STOP_WORDS: frozenset[str] = frozenset(
    """
    a about above after again against ain al all also am among an and any are aren as at be
    because been before being below between both but by can could couldn d did didn do does
    doesn doing don down during e each eg et etc few for from further had hadn has hasn have
    haven having he her here hers herself him himself his how however i ie if in into is isn
    it its itself just ll m ma may me might mightn more most must mustn my myself needn no nor
    not now o of off on once only or other our ours ourselves out over own per re s same shall
    shan she should shouldn so some such t than that the their theirs them themselves then
    there these they this those through thus to too under until up upon ve very via vs was
    wasn we were weren what when where whether which while who whom why will with within
    without won would wouldn y yet you your yours yourself yourselves
    additionally although finally furthermore hence including moreover respectively
    therefore though whereas
    demonstrate demonstrated demonstrates found indicate indicated indicates observed
    reported show showed shown shows suggest suggested suggests using
    """.split()
)

METHOD_PLAIN = "moore-penrose-backprojection"
METHOD_FILTERED = "moore-penrose-backprojection+filter"

_WORD_RE = re.compile(r"[^\W_]+")


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
        filtered: whether the spurious-token filter was on.
        query_text, document_text, document_id: what was explained, when known.
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

    @property
    def method(self) -> str:
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
        }
        if include_deltas:
            out["query_delta"] = self.query_delta.tolist()
            out["document_delta"] = self.document_delta.tolist()
        return out


# --------------------------------------------------------------------------- vocabulary


class _IdCache:
    """A cache keyed by object identity that forgets an entry when its key object dies.

    ``weakref.WeakKeyDictionary`` compares keys with ``==``, which tensors overload
    elementwise; identity is what is meant here (the same weight, table or tokenizer).
    """

    def __init__(self) -> None:
        self._data: dict[int, tuple[weakref.ref[Any], Any]] = {}

    def get(self, obj: Any) -> Any:
        entry = self._data.get(id(obj))
        if entry is not None and entry[0]() is obj:
            return entry[1]
        return None

    def put(self, obj: Any, value: Any) -> None:
        key = id(obj)
        data = self._data

        def forget(_: weakref.ref[Any], key: int = key) -> None:
            data.pop(key, None)

        try:
            ref = weakref.ref(obj, forget)
        except TypeError:  # not weak-referenceable: do not cache (ids could be reused)
            return
        data[key] = (ref, value)


@dataclass
class _TokenInfo:
    """Per-vocabulary facts derived once from a tokenizer."""

    tokens: list[str]  # display string of every id
    words: list[str | None]  # the word a whole-word token stands for, None for fragments
    special: torch.Tensor  # (V,) bool
    lexical: torch.Tensor  # (V,) bool: whole word, >= 2 chars, alnum with a letter, no stop word
    word_to_id: dict[str, int]  # word -> id of every whole-word, non-special token
    split: Callable[[str], list[str]]  # text -> normalised words, as the tokenizer splits them


_TOKEN_INFO: _IdCache = _IdCache()


def _splitter(tokenizer: Any) -> Callable[[str], list[str]]:
    """Text -> words, normalised as the tokenizer normalises (for BERT uncased: lowercase,
    accents stripped), split on whitespace and punctuation: "COVID-19" -> ["covid", "19"].

    The split is a regex rather than the tokenizer's pre-tokenizer: 15x faster (0.05 ms
    against 0.75 ms per SciFact abstract) and the same words for the alphanumeric tokens the
    filter keeps.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    norm = getattr(backend, "normalizer", None)
    if norm is not None:
        probe = norm.normalize_str("Ab")
        lower = probe == "ab"
        # ASCII text: BERT's normaliser only lowercases (or keeps) it, and str.lower is 10x
        # faster than a round trip into the tokenizers library.
        if probe in ("ab", "Ab"):

            def normalise(text: str) -> str:
                if text.isascii():
                    return text.lower() if lower else text
                return norm.normalize_str(text)

        else:
            normalise = norm.normalize_str
    else:
        lower = bool(getattr(tokenizer, "do_lower_case", True))

        def normalise(text: str) -> str:
            return _fold(text, lower)

    def split(text: str) -> list[str]:
        return _WORD_RE.findall(normalise(text))

    return split


def _fold(text: str, lower: bool = True) -> str:
    """Casefold (when the vocabulary is uncased) and strip accents, as BERT uncased does."""
    s = unicodedata.normalize("NFKD", text.lower() if lower else text)
    return "".join(c for c in s if not unicodedata.combining(c))


def _token_info(tokenizer: Any, vocab_size: int, stop_words: frozenset[str]) -> _TokenInfo:
    per_tok = _TOKEN_INFO.get(tokenizer)
    if per_tok is None:
        per_tok = {}
        _TOKEN_INFO.put(tokenizer, per_tok)
    key = (vocab_size, stop_words)
    info = per_tok.get(key)
    if info is not None:
        return info
    tokens = [
        t if isinstance(t, str) else f"[{i}]"
        for i, t in enumerate(tokenizer.convert_ids_to_tokens(list(range(vocab_size))))
    ]
    special_ids = [i for i in getattr(tokenizer, "all_special_ids", []) if 0 <= i < vocab_size]
    # WordPiece marks continuations with "##"; SentencePiece marks word starts with "▁".
    wordpiece = any(t.startswith("##") for t in tokens)
    sentencepiece = not wordpiece and sum(t.startswith("▁") for t in tokens) > vocab_size // 10
    words: list[str | None] = []
    for t in tokens:
        if wordpiece:
            words.append(None if t.startswith("##") else t)
        elif sentencepiece:
            words.append(t[1:] if t.startswith("▁") else None)
        else:
            words.append(t)
    special = torch.zeros(vocab_size, dtype=torch.bool)
    special[special_ids] = True
    lexical = torch.zeros(vocab_size, dtype=torch.bool)
    word_to_id: dict[str, int] = {}
    for i, w in enumerate(words):
        if w is None or special[i]:
            continue
        word_to_id.setdefault(w, i)  # every whole word: ``in_text`` must see stop words too
        if len(w) >= 2 and w.isalnum() and any(c.isalpha() for c in w):
            lexical[i] = w.lower() not in stop_words
    info = _TokenInfo(tokens, words, special, lexical, word_to_id, _splitter(tokenizer))
    per_tok[key] = info
    return info


def _vocab_size(tokenizer: Any) -> int:
    try:
        return len(tokenizer)
    except TypeError:
        return int(tokenizer.vocab_size)


@dataclass(frozen=True)
class CorpusVocabulary:
    """Document frequencies of the tokenizer's whole-word tokens over a corpus.

    Gives the filter its corpus support (``df > 0``) and its IDF weights,
    ``idf = ln((1 + N) / (1 + df)) + 1`` (smoothed: words the corpus lacks, such as a
    query's own rare terms, get the largest weight, and no weight is zero).

    Build it once per corpus with :meth:`from_texts` (about 1 s for SciFact's 5,183
    abstracts on one core).
    """

    df: torch.Tensor  # (V,) int64
    num_docs: int

    @classmethod
    def from_texts(
        cls, texts: Iterable[str], tokenizer: Any, *, stop_words: frozenset[str] = STOP_WORDS
    ) -> CorpusVocabulary:
        """Count, for every whole-word token, the documents of ``texts`` holding that word."""
        info = _token_info(tokenizer, _vocab_size(tokenizer), stop_words)
        counts = np.zeros(len(info.tokens), dtype=np.int64)
        n = 0
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"texts must hold strings, got {type(text).__name__}")
            n += 1
            ids = {info.word_to_id[w] for w in info.split(text) if w in info.word_to_id}
            if ids:
                counts[list(ids)] += 1
        return cls(torch.from_numpy(counts), n)

    @property
    def idf(self) -> torch.Tensor:
        """(V,) float32 smoothed IDF."""
        return (torch.log((1.0 + self.num_docs) / (1.0 + self.df.double())) + 1.0).float()

    @property
    def in_corpus(self) -> torch.Tensor:
        """(V,) bool: the token's word occurs in at least one document."""
        return self.df > 0


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

    Computed in float64 (SVD of a 256 x 384 matrix: about 20 ms, once), stored in the
    model's compute dtype on its device.
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
    # Checked here, once per table version, rather than on every call (11.7 M values for
    # MiniLM's table: about 10 ms).
    V.check_finite("token_table", table)
    normed = F.normalize(table.detach().to(device, dtype), dim=1)
    _TABLES.put(table, (key, normed))
    return normed


# --------------------------------------------------------------------------- explainer


def _as_tensor(name: str, x: Any, dim: int) -> torch.Tensor:
    """(B, dim) float tensor from (dim,) / (B, dim) numpy or torch."""
    if isinstance(x, np.ndarray):
        if not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"{name} must hold floats, got numpy dtype {x.dtype} {x.shape}")
        x = torch.from_numpy(np.ascontiguousarray(x))
    t = V.check_float(name, x, (1, 2))
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.shape[1] != dim:
        raise ValueError(
            f"{name} must have last dim {dim} (the model's input_dim), got {V.describe(t)}"
        )
    V.check_finite(name, t)
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
        from imrnns.model import IMRNN

        if not isinstance(model, IMRNN):
            raise TypeError(f"model must be an IMRNN, got {type(model).__name__}")
        if isinstance(token_table, np.ndarray):
            token_table = torch.from_numpy(token_table)
        table = V.check_float("token_table", token_table, 2)
        n = model.config.input_dim
        if table.shape[1] != n or table.shape[0] == 0:
            raise ValueError(
                f"token_table must have shape (vocab, {n}): the input embedding table of the "
                f"{n}-d encoder the adapter was trained on; got {V.describe(table)}. A table of "
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
            weights = V.check_float("idf", idf, 1).detach().float().cpu()
            if weights.shape != (vocab,):
                raise ValueError(f"idf must have shape ({vocab},), got {V.describe(weights)}")
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
        deltas = V.check_float("deltas", deltas)
        if deltas.shape[-1] != m:
            raise ValueError(
                f"deltas must have last dim {m} (the working dim), got {V.describe(deltas)}"
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
        deltas = V.check_float("deltas", deltas, 2)
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
            # pairs' own words (about 5,000 columns for 100 SciFact pairs instead of 30,522),
            # so the similarity GEMM, the masking and the top-k shrink with it.
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
            fb = V.check_float("feedback", fb, (2, 3))
            if fb.dim() == 2:
                fb = fb.unsqueeze(0).expand(q.shape[0], -1, -1)
            if fb.shape[0] != q.shape[0] or fb.shape[2] != q.shape[1] or fb.shape[1] == 0:
                raise ValueError(
                    f"feedback must have shape (B={q.shape[0]}, K, {q.shape[1]}) (base "
                    f"embeddings of each query's feedback documents), got {V.describe(fb)}"
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
        from imrnns.index import IMRNNIndex

        if not isinstance(index, IMRNNIndex):
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
                f"{V.describe(q)} vs {V.describe(d)}"
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


# --------------------------------------------------------------------------- output


def format_table(explanations: Sequence[Explanation], *, width: int = 72) -> str:
    """A ranked terminal table per explanation: query tokens beside document tokens."""
    lines: list[str] = []
    last_query: str | None = None
    for rank, ex in enumerate(explanations, 1):
        if ex.query_text is not None and ex.query_text != last_query:
            lines.append(f"query: {_clip(ex.query_text, width)}")
            last_query = ex.query_text
        name = ex.document_id or f"pair {rank}"
        lines.append(
            f"  [{name}] base {ex.base_score:+.4f}  IMRNN {ex.imrnn_score:+.4f}  "
            f"delta {ex.score_delta:+.4f}  ({ex.method})"
        )
        if ex.document_text:
            lines.append(f"    {_clip(ex.document_text, width)}")
        lines.append(
            f"    {'#':>3}  {'query token':<18}{'score':>8}{'idf':>6}   "
            f"{'document token':<18}{'score':>8}{'idf':>6}"
        )
        for i in range(max(len(ex.query_tokens), len(ex.document_tokens))):
            left = _cell(ex.query_tokens, i)
            right = _cell(ex.document_tokens, i)
            lines.append(f"    {i + 1:>3}  {left}   {right}")
        lines.append("")
    return "\n".join(lines).rstrip()


def _cell(tokens: list[TokenScore], i: int) -> str:
    if i >= len(tokens):
        return " " * 32
    t = tokens[i]
    return f"{_clip(t.token, 17):<18}{t.score:>+8.4f}{t.weight:>6.2f}"


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


_CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;
max-width:1100px;padding:0 1em;color:#1d2330}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ccd}
.meta{color:#556}.text{background:#f7f8fa;padding:.6em .8em;border-radius:6px}
.doc{border:1px solid #dde;border-radius:8px;padding:.8em 1em;margin:1em 0}
.scores span{display:inline-block;margin-right:1.2em}
.up{color:#11772e}.down{color:#b3261e}
mark{border-radius:3px;padding:0 .15em}mark.pos{background:#c9f0d3}mark.neg{background:#f8d0cc}
.tables{display:flex;gap:2em;flex-wrap:wrap}
table{border-collapse:collapse;font-size:.92em}td,th{padding:.15em .6em;text-align:left}
th{border-bottom:1px solid #ccd}td.num{text-align:right;font-variant-numeric:tabular-nums}
.bar{display:inline-block;height:.7em;background:#3c9a5a;border-radius:2px}
.bar.neg{background:#d67b6b}
"""


def render_html(
    explanations: Sequence[Explanation],
    path: str | os.PathLike[str] | None = None,
    *,
    title: str = "IMRNN explanations",
) -> str:
    """A self-contained HTML report (no scripts, no network): query, top documents, their
    scores, the explanation tokens highlighted in the texts and ranked with their scores.

    Returns the HTML; also writes it atomically to ``path`` when given.
    """
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        '<p class="meta">Tokens: cosine between each modulation delta, mapped back to the '
        "encoder's input space with the pseudo-inverse of the projection, and the token's "
        "input embedding. <mark class=pos>green</mark>: the modulation moves towards the "
        "token; <mark class=neg>red</mark>: away from it. Bars: |score| &times; IDF weight "
        "(the ranking key).</p>",
    ]
    groups: list[list[Explanation]] = []
    for ex in explanations:
        if groups and ex.query_text is not None and groups[-1][0].query_text == ex.query_text:
            groups[-1].append(ex)
        else:
            groups.append([ex])
    for g, group in enumerate(groups, 1):
        first = group[0]
        query_marks = {t.token.lower(): t for t in first.query_tokens}
        parts.append(f'<section class="query" id="q{g}"><h2>Query {g}</h2>')
        if first.query_text is not None:
            parts.append(f'<p class="text">{_highlight(first.query_text, query_marks)}</p>')
        for rank, ex in enumerate(group, 1):
            marks = {t.token.lower(): t for t in ex.document_tokens}
            delta_cls = "up" if ex.score_delta >= 0 else "down"
            name = html.escape(ex.document_id or f"document {rank}")
            parts += [
                f'<article class="doc"><h3>#{rank} &middot; {name}</h3>',
                '<p class="scores">'
                f"<span>base score <b>{ex.base_score:+.4f}</b></span>"
                f"<span>IMRNN score <b>{ex.imrnn_score:+.4f}</b></span>"
                f'<span class="{delta_cls}">modulation contribution '
                f"<b>{ex.score_delta:+.4f}</b></span>"
                f'<span class="meta">{html.escape(ex.method)}</span></p>',
            ]
            if ex.document_text is not None:
                parts.append(f'<p class="text">{_highlight(ex.document_text, marks)}</p>')
            parts += [
                '<div class="tables">',
                _token_table("Query tokens", ex.query_tokens),
                _token_table("Document tokens", ex.document_tokens),
                "</div></article>",
            ]
        parts.append("</section>")
    parts.append("</body></html>")
    text = "\n".join(parts) + "\n"
    if path is not None:
        from imrnns._atomic import atomic_file

        with atomic_file(path, "w") as fh:
            fh.write(text)
        # mkstemp creates 0600; a report is meant to be opened and shared like any file.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(path, 0o666 & ~umask)
    return text


def _token_table(caption: str, tokens: list[TokenScore]) -> str:
    top = max((t.relevance for t in tokens), default=0.0) or 1.0
    rows = [
        f"<table><caption><b>{html.escape(caption)}</b></caption>",
        "<tr><th>#</th><th>token</th><th>score</th><th>idf</th><th>relevance</th></tr>",
    ]
    for i, t in enumerate(tokens, 1):
        cls = "pos" if t.sign > 0 else "neg"
        width = max(1, round(80 * t.relevance / top))
        rows.append(
            f'<tr class="token" data-token="{html.escape(t.token)}"><td class="num">{i}</td>'
            f'<td><mark class="{cls}">{html.escape(t.token)}</mark></td>'
            f'<td class="num">{t.score:+.4f}</td><td class="num">{t.weight:.2f}</td>'
            f'<td><span class="bar {cls}" style="width:{width}px"></span> '
            f"{t.relevance:.4f}</td></tr>"
        )
    if not tokens:
        rows.append('<tr><td colspan="5" class="meta">no token passed the filter</td></tr>')
    rows.append("</table>")
    return "".join(rows)


def _highlight(text: str, marks: dict[str, TokenScore]) -> str:
    """Escape ``text`` and wrap the words that are explanation tokens in ``<mark>``."""
    out: list[str] = []
    pos = 0
    for m in _WORD_RE.finditer(text):
        out.append(html.escape(text[pos : m.start()]))
        word = m.group(0)
        tok = marks.get(_fold(word)) or marks.get(word)
        if tok is None:
            out.append(html.escape(word))
        else:
            cls = "pos" if tok.sign > 0 else "neg"
            out.append(
                f'<mark class="{cls}" title="{html.escape(tok.token)} {tok.score:+.4f}">'
                f"{html.escape(word)}</mark>"
            )
        pos = m.end()
    out.append(html.escape(text[pos:]))
    return "".join(out)
