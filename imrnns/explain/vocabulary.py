"""The tokenizer's vocabulary as the filter sees it: stop words, word splitting, token tables,
and document frequencies over a corpus (:class:`CorpusVocabulary`).

Tested in ``tests/explain/test_explain.py``.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from imrnns.explain._cache import _IdCache

__all__ = ["STOP_WORDS", "CorpusVocabulary", "delete_words", "word_spans"]

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

# A word: a run of letters and digits (Unicode-aware), split on whitespace, punctuation and "_".
_WORD_RE = re.compile(r"[^\W_]+")


@dataclass
class _TokenInfo:
    """Per-vocabulary facts derived once from a tokenizer."""

    tokens: list[str]  # display string of every id
    special: torch.Tensor  # (V,) bool
    lexical: torch.Tensor  # (V,) bool: whole word, >= 2 chars, alnum with a letter, no stop word
    word_to_id: dict[str, int]  # word -> id of every whole-word, non-special token
    split: Callable[[str], list[str]]  # text -> normalised words, as the tokenizer splits them


_TOKEN_INFO: _IdCache = _IdCache()


def _normaliser(tokenizer: Any) -> Callable[[str], str]:
    """Text -> text normalised as the tokenizer normalises it (for BERT uncased: lowercase,
    accents stripped); cached per tokenizer."""
    hit = _NORMALISERS.get(tokenizer)
    if hit is not None:
        return hit
    backend = getattr(tokenizer, "backend_tokenizer", None)
    norm = getattr(backend, "normalizer", None)
    if norm is not None:
        probe = norm.normalize_str("Ab")
        lower = probe == "ab"
        # ASCII text: BERT's normaliser only lowercases (or keeps) its letters, so str.lower
        # gives the same words without a round trip into the tokenizers library.
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

    _NORMALISERS.put(tokenizer, normalise)
    return normalise


_NORMALISERS: _IdCache = _IdCache()


def _splitter(tokenizer: Any) -> Callable[[str], list[str]]:
    """Text -> words, normalised as the tokenizer normalises (for BERT uncased: lowercase,
    accents stripped), split on whitespace and punctuation: "COVID-19" -> ["covid", "19"].

    The split is a regex rather than the tokenizer's pre-tokenizer: it is much cheaper per
    text and gives the same words for the alphanumeric tokens the filter keeps.
    """
    normalise = _normaliser(tokenizer)

    def split(text: str) -> list[str]:
        return _WORD_RE.findall(normalise(text))

    return split


def word_spans(text: str, tokenizer: Any) -> list[tuple[int, int, str]]:
    """Every word of ``text`` as ``(start, end, word)``: ``text[start:end]`` is the word as
    written, ``word`` its normalised form (the words :func:`_splitter` gives, with their
    character spans in the original text, so that they can be deleted from it).

    A written word whose normalised form is not one word (a rare compatibility character)
    keeps the letters and digits of that form, joined.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    normalise = _normaliser(tokenizer)
    out: list[tuple[int, int, str]] = []
    for m in _WORD_RE.finditer(text):
        word = "".join(_WORD_RE.findall(normalise(m.group(0))))
        if word:
            out.append((m.start(), m.end(), word))
    return out


def delete_words(text: str, words: Collection[str], tokenizer: Any) -> str:
    """``text`` with every occurrence of the given (normalised) words removed.

    The characters around a removed word (spaces, punctuation) stay, so the other words keep
    their spelling and their word boundaries; the tokenizer ignores the doubled spaces.
    """
    drop = set(words)
    if not drop:
        return text
    parts: list[str] = []
    pos = 0
    for start, end, word in word_spans(text, tokenizer):
        if word in drop:
            parts.append(text[pos:start])
            pos = end
    parts.append(text[pos:])
    return "".join(parts)


def _fold(text: str, lower: bool = True) -> str:
    """Casefold (when the vocabulary is uncased) and strip accents, as BERT uncased does."""
    s = unicodedata.normalize("NFKD", text.lower() if lower else text)
    return "".join(c for c in s if not unicodedata.combining(c))


def _token_info(tokenizer: Any, vocab_size: int, stop_words: frozenset[str]) -> _TokenInfo:
    """The :class:`_TokenInfo` of ``tokenizer``'s first ``vocab_size`` ids (cached per
    tokenizer, vocabulary size and stop-word set)."""
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
    words: list[str | None] = []  # the word a whole-word token stands for, None for fragments
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
    info = _TokenInfo(tokens, special, lexical, word_to_id, _splitter(tokenizer))
    per_tok[key] = info
    return info


def _vocab_size(tokenizer: Any) -> int:
    """Number of ids, added tokens included (``len``), else the base ``vocab_size``."""
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

    Build it once per corpus with :meth:`from_texts` (one pass that splits every text) and
    reuse it across explanations.
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
