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


FAITHFULNESS: dict[str, dict[str, Any]] = {
    "moore-penrose-backprojection": {
        "pairs": 100,
        "added_drop_top5": -0.0001,
        "random_top5": 0.0015,
        "idf_top5": 0.0049,
        "added_aopc": -0.0001,
        "query_added_drop_top5": 0.0004,
        "query_random_top5": -0.0107,
        "query_idf_top5": 0.0029,
        "promoted_pairs": 39,
        "promoted_added_drop_top5": 0.0013,
        "ms": 31.8,
    },
    "moore-penrose-backprojection+filter": {
        "pairs": 100,
        "added_drop_top5": 0.0036,
        "random_top5": 0.0015,
        "idf_top5": 0.0049,
        "added_aopc": 0.0032,
        "query_added_drop_top5": 0.0014,
        "query_random_top5": -0.0107,
        "query_idf_top5": 0.0029,
        "promoted_pairs": 39,
        "promoted_added_drop_top5": 0.0085,
        "ms": 10.0,
    },
    "occlusion": {
        "pairs": 100,
        "added_drop_top5": 0.0399,
        "random_top5": 0.0015,
        "idf_top5": 0.0049,
        "added_aopc": 0.0357,
        "query_added_drop_top5": 0.0525,
        "query_random_top5": -0.0107,
        "query_idf_top5": 0.0029,
        "promoted_pairs": 39,
        "promoted_added_drop_top5": 0.0603,
        "ms": 8855.4,
    },
    "integrated-gradients": {
        "pairs": 100,
        "added_drop_top5": 0.0156,
        "random_top5": 0.0015,
        "idf_top5": 0.0049,
        "added_aopc": 0.0141,
        "query_added_drop_top5": 0.0225,
        "query_random_top5": -0.0107,
        "query_idf_top5": 0.0029,
        "promoted_pairs": 39,
        "promoted_added_drop_top5": 0.0297,
        "ms": 2388.7,
    },
    "gradient-x-input": {
        "pairs": 100,
        "added_drop_top5": -0.0004,
        "random_top5": 0.0015,
        "idf_top5": 0.0049,
        "added_aopc": -0.0006,
        "query_added_drop_top5": -0.0238,
        "query_random_top5": -0.0107,
        "query_idf_top5": 0.0029,
        "promoted_pairs": 39,
        "promoted_added_drop_top5": 0.0075,
        "ms": 223.1,
    },
    "word-gradient": {
        "pairs": 100,
        "added_drop_top5": 0.0187,
        "random_top5": 0.0015,
        "idf_top5": 0.0049,
        "added_aopc": 0.0167,
        "query_added_drop_top5": 0.0401,
        "query_random_top5": -0.0107,
        "query_idf_top5": 0.0029,
        "promoted_pairs": 39,
        "promoted_added_drop_top5": 0.0304,
        "ms": 16.2,
    },
}
