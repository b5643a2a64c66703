"""Explanations of IMRNN scores: words that drive the adapter (through the encoder), and the
paper's Moore-Penrose back-projection of the modulation (plain and filtered).

Word attributions (:class:`WordExplainer`, :mod:`imrnns.explain.words`; the default of
``imrnns explain``): the signed effect of each word of the query and of the document on the
adapter's added score ``IMRNN - base``, by occlusion, integrated gradients, gradient x input
through the encoder, or a first-order word-gradient estimate. Which of them names the words
that really move the score is measured by ``python -m benchmarks.explain_faithfulness``
(deleting each method's top words and re-encoding); :data:`FAITHFULNESS` holds its figures,
which the explanations carry and the reports print.

Back-projection (:class:`Explainer`, :func:`explain`):

The paper's method (arXiv 2601.20084, section "Interpretability"; official ``adapter.py``):
for a query q and a document d the adapter moves ``p(q)`` to ``q~`` and ``p(d)`` to ``d~``.
Each modulation delta (``q~ - p(q)``, ``d~ - p(d)``, in the m-dim projected space) is mapped
back to the encoder's n-dim space with the pseudo-inverse of the projection matrix,
``x = P^+ delta`` (exact inversion when P is square and invertible, the least-squares
preimage otherwise: ``P x = delta`` whenever P has full row rank, as v0.1's 256 x 384 does),
then compared by cosine with every row of the encoder's input token-embedding table
(special tokens excluded). The tokens of largest ``|cosine|`` are the explanation; the sign
says whether the modulation moves towards (+) or away from (-) the token.

The back-projected deltas are close to chance level in cosine against the pair's own words
(``python -m experiments.explanation_token_overlap``; ``benchmarks/RESULTS.md``, "Explanations"), so
the plain method's top tokens are rarely words of the query or the document: the paper's
open question 1 (noisy tokens such as "Ridges") is this effect. The filter (``filter=True``,
the default) therefore keeps only tokens that can be read as evidence:

- whole words: WordPiece ``##`` fragments (and SentencePiece pieces without ``▁``) dropped;
- at least two characters, alphanumeric with a letter, not an English stop word;
- supported: a word of the query or document text when texts are given (so every token is
  a word of the pair, by construction), else a word of the corpus vocabulary when a
  :class:`CorpusVocabulary` is given;
- ranked by ``|cosine| * idf`` (smoothed IDF over the corpus), so that rare, content-bearing
  words outrank frequent ones at equal cosine.

``filter=False`` reproduces the plain method exactly (the official ranking by ``|cosine|``
with only special tokens excluded). Everything is batched: B pairs cost one (2B, m) x
(m, n) back-projection and one (2B, n) x (n, V) similarity GEMM, over only the columns of
the pairs' words when the filter has texts; the pseudo-inverse, the normalised token table
and the tokenizer's word tables are computed once and cached (keyed weakly by the projector
weight, the table and the tokenizer, and invalidated when the weight is updated in place).

Modules:

- :mod:`imrnns.explain.vocabulary`: stop words, word splitting, the tokenizer's token
  tables, :class:`CorpusVocabulary` (document frequencies, IDF);
- :mod:`imrnns.explain.attribution`: :func:`projection_pinv`, :class:`Explainer`,
  :func:`explain` and their results, :class:`Explanation` and :class:`TokenScore`;
- :mod:`imrnns.explain.rendering`: :func:`format_table` (terminal) and :func:`render_html`;
- :mod:`imrnns.explain.words`: :class:`WordExplainer` (word attributions through the encoder);
- :mod:`imrnns.explain.faithfulness`: :data:`FAITHFULNESS`, the benchmark's figures.

The package imports neither :mod:`imrnns.model` nor :mod:`imrnns.index` (``IMRNN.explain``
imports it); it checks their types without importing them.
"""

from __future__ import annotations

# The same names as the single module had in ``__all__``; the ``X as X`` imports are public
# too (importable from here, as before) but were never part of ``import *``.
import importlib
from typing import TYPE_CHECKING, Any

from imrnns.explain.methods import DEFAULT_METHOD, WORD_METHODS

if TYPE_CHECKING:
    from imrnns.explain.attribution import METHOD_FILTERED as METHOD_FILTERED
    from imrnns.explain.attribution import METHOD_PLAIN as METHOD_PLAIN
    from imrnns.explain.attribution import Explainer, Explanation, TokenScore, explain
    from imrnns.explain.attribution import projection_pinv as projection_pinv
    from imrnns.explain.faithfulness import FAITHFULNESS
    from imrnns.explain.rendering import format_table, render_html
    from imrnns.explain.vocabulary import STOP_WORDS, CorpusVocabulary, delete_words, word_spans
    from imrnns.explain.words import DEFAULT_METHOD, WORD_METHODS, WordEffects, WordExplainer

# Loaded on first use (PEP 562): the command line imports the method names above without
# torch, and ``imrnns --help`` stays fast.
_LAZY = {
    "METHOD_FILTERED": "imrnns.explain.attribution",
    "METHOD_PLAIN": "imrnns.explain.attribution",
    "Explainer": "imrnns.explain.attribution",
    "Explanation": "imrnns.explain.attribution",
    "TokenScore": "imrnns.explain.attribution",
    "explain": "imrnns.explain.attribution",
    "projection_pinv": "imrnns.explain.attribution",
    "FAITHFULNESS": "imrnns.explain.faithfulness",
    "format_table": "imrnns.explain.rendering",
    "render_html": "imrnns.explain.rendering",
    "STOP_WORDS": "imrnns.explain.vocabulary",
    "CorpusVocabulary": "imrnns.explain.vocabulary",
    "delete_words": "imrnns.explain.vocabulary",
    "word_spans": "imrnns.explain.vocabulary",
    "WordEffects": "imrnns.explain.words",
    "WordExplainer": "imrnns.explain.words",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'imrnns.explain' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "DEFAULT_METHOD",
    "FAITHFULNESS",
    "STOP_WORDS",
    "WORD_METHODS",
    "CorpusVocabulary",
    "Explainer",
    "Explanation",
    "TokenScore",
    "WordEffects",
    "WordExplainer",
    "delete_words",
    "explain",
    "format_table",
    "render_html",
    "word_spans",
]
