"""The measured faithfulness of each explanation method, shown beside its explanations.

Figures of ``python -m benchmarks.explain_faithfulness`` (``benchmarks/RESULTS.md``,
"Faithfulness of explanations"; the full table in
``benchmarks/results/explain-faithfulness.json``): 100 SciFact test queries with their
top-ranked document, all-MiniLM-L6-v2 and the shipped adapter. Keys: the methods'
:attr:`~imrnns.explain.Explanation.method` names. ``added_drop_top5``: mean drop of the
adapter's added score ``A = IMRNN - base`` when the method's top-5 document words are
deleted and the document re-encoded; ``random_top5`` and ``idf_top5``: the same for 5 random
words and the 5 highest-IDF words; ``added_aopc``: the mean over k = 1, 3, 5, 10;
``query_*``: deletions from the query; ``promoted_*``: the relevant document the adapter
promoted most; ``ms``: median milliseconds per explanation (both sides, embeddings given)
on the benchmark's machine, under its load at the time (benchmarks/RESULTS.md).

Tested against the JSON in ``tests/explain/test_faithfulness.py``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FAITHFULNESS", "MEANING", "score_meaning"]

# What a word's score means, per word-attribution method (imrnns.explain.words).
MEANING: dict[str, str] = {
    "occlusion": "effect on the adapter's added score (IMRNN - base) of deleting the word, "
    "measured (re-encoded)",
    "integrated-gradients": "integrated-gradients attribution of the adapter's added score "
    "(IMRNN - base) to the word, from an empty text",
    "gradient-x-input": "gradient x input attribution of the adapter's added score "
    "(IMRNN - base) to the word",
    "word-gradient": "first-order estimate of the effect on the adapter's added score "
    "(IMRNN - base) of deleting the word",
}


def score_meaning(attribution: str | None) -> str:
    """What an explanation's token scores are, in words: back-projection cosines when
    ``attribution`` is None, else the word-attribution method's (reports, JSON)."""
    if attribution is None:
        return "cosine of the back-projected modulation with the token's input embedding"
    return MEANING.get(attribution, "signed effect of the word on the adapter's added score")


FAITHFULNESS: dict[str, dict[str, Any]] = {}
