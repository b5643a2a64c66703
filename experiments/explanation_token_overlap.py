"""How grounded are IMRNN token explanations? Plain back-projection vs the filtered method.

Reproduces the table of ``benchmarks/RESULTS.md`` section "Explanations (issue 7)" (share of
top-10 explanation tokens that are words of the query or document, shipped adapter and
official v0.1 checkpoint) and the figures below it (signal check, time of 100 explanations).

For the first ``--queries`` SciFact test queries (default 100), the top-1 document of an
IMRNNIndex search (rerank, feedback_k=100) is explained with the query's own feedback set
(the index's), and we count the share of the top-10 explanation tokens (query side and
document side) that occur as words in the query or the document text. Words: lowercase,
accents stripped, runs of letters and digits; a token counts after dropping a WordPiece
``##`` marker. The definition is independent of the filter's own word splitting.

Variants:
    plain          the paper's method (``filter=False``)
    filtered       the default filter with the pair's texts (support = the pair's words)
    corpus_only    the filter without texts (support = the corpus vocabulary, IDF-weighted)

It also times 100 batched explanations after a warm-up call, and reports the "signal"
check: mean |cosine| of the back-projected deltas with the pair's own word tokens against
all other word tokens (equal means the cosines carry no information about the text).

Run: ``python -m experiments.explanation_token_overlap [--json] [--checkpoint PATH]``. The
adapter is the shipped one (``imrnns/pretrained/scifact-minilm-*``) when present, else the
official v0.1 SciFact MiniLM checkpoint from ``../shared/checkpoints/official-v0.1/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import statistics
import sys
import time
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks._common import cpu_model

OFFICIAL_V01 = (
    Path(__file__).resolve().parents[2]
    / "shared"
    / "checkpoints"
    / "official-v0.1"
    / "imrnns-minilm-scifact.pt"
)
_WORDS = re.compile(r"[a-z0-9]+")


def text_words(text: str) -> set[str]:
    """Lowercase, accent-stripped runs of ASCII letters and digits."""
    s = unicodedata.normalize("NFKD", text.lower())
    return set(_WORDS.findall("".join(c for c in s if not unicodedata.combining(c))))


def token_word(token: str) -> str:
    return token.removeprefix("##").lower()


def grounded_share(explanations: list[Any]) -> dict[str, float]:
    """Share of explanation tokens that are words of the pair's query or document text."""
    hits = {"query": 0, "document": 0}
    total = {"query": 0, "document": 0}
    for ex in explanations:
        words = text_words(ex.query_text) | text_words(ex.document_text)
        for side, toks in (("query", ex.query_tokens), ("document", ex.document_tokens)):
            total[side] += len(toks)
            hits[side] += sum(token_word(t.token) in words for t in toks)
    n = len(explanations)
    all_total = total["query"] + total["document"]
    return {
        "share": (hits["query"] + hits["document"]) / max(all_total, 1),
        "share_query_side": hits["query"] / max(total["query"], 1),
        "share_document_side": hits["document"] / max(total["document"], 1),
        "tokens_per_side": all_total / max(2 * n, 1),
    }


def resolve_adapter(checkpoint: str | None) -> tuple[Path, str]:
    if checkpoint:
        return Path(checkpoint), "given"
    from imrnns.pretrained import default_adapter

    try:
        return default_adapter(), "shipped"
    except FileNotFoundError:
        pass
    if OFFICIAL_V01.is_file():
        return OFFICIAL_V01, "official-v0.1 (no shipped adapter yet)"
    raise FileNotFoundError(
        f"no shipped adapter under imrnns/pretrained/ and no official checkpoint at "
        f"{OFFICIAL_V01}: pass --checkpoint"
    )


def _timed(fn: Any, repeats: int) -> dict[str, float]:
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {
        "first_call_s": round(first, 4),
        "median_s": round(statistics.median(times), 4),
        "min_s": round(min(times), 4),
    }


def signal_check(explainer: Any, explanations: list[Any]) -> dict[str, float]:
    """Mean |cos| of back-projected deltas with the pair's own words vs other word tokens."""
    info = explainer._info()
    deltas = torch.stack(
        [e.query_delta for e in explanations] + [e.document_delta for e in explanations]
    )
    sims = explainer.similarities(deltas).abs().float().cpu()
    texts = [f"{e.query_text}\n{e.document_text}" for e in explanations] * 2
    rows, support = explainer._text_support(info, texts)
    own = support[rows] & info.lexical
    other = ~support[rows] & info.lexical
    return {
        "mean_abs_cos_own_words": float(sims[own].mean()),
        "mean_abs_cos_other_words": float(sims[other].mean()),
        # Two random directions in R^n: E|cos| = sqrt(2 / (pi n)), 0.041 for n = 384.
        "chance_level": float(np.sqrt(2.0 / (np.pi * explainer.token_table.shape[1]))),
    }


def idf_only_overlap(explainer: Any, explanations: list[Any], top_k: int) -> dict[str, float]:
    """Share of the filtered tokens that an IDF-only ranking of the pair's words also picks.

    1.0 would mean the deltas add nothing to the ranking beyond "rarest words of the pair".
    """
    info = explainer._info()
    texts = [f"{e.query_text}\n{e.document_text}" for e in explanations]
    rows, support = explainer._text_support(info, texts)
    idf = explainer._weights
    out = {}
    for side in ("query", "document"):
        hit = total = 0
        for r, e in enumerate(explanations):
            cand = (support[rows[r]] & info.lexical).nonzero().squeeze(1)
            order = torch.argsort(idf[cand], descending=True, stable=True)
            idf_top = set(cand[order[:top_k]].tolist())
            toks = getattr(e, f"{side}_tokens")
            hit += sum(t.token_id in idf_top for t in toks)
            total += len(toks)
        out[f"{side}_side"] = hit / max(total, 1)
    return out


def run(
    checkpoint: str | None = None,
    queries: int = 100,
    top_k: int = 10,
    repeats: int = 5,
    feedback: str = "index",
    threads: int | None = None,
) -> dict[str, Any]:
    from benchmarks._scifact import scifact_minilm
    from imrnns import IMRNN, IMRNNIndex
    from imrnns.encoders import Encoder, default_cache_dir
    from imrnns.explain import CorpusVocabulary, Explainer

    if threads:
        torch.set_num_threads(threads)
    emb = scifact_minilm("test")
    data = emb.data
    path, origin = resolve_adapter(checkpoint)
    model = IMRNN.from_pretrained(path).eval()
    index = IMRNNIndex(model, feedback_k=100)
    index.add(emb.corpus)
    q = emb.queries[:queries]
    scores, ids = index.search(q, k=1, mode="rerank")
    top = ids[:, 0]
    d = emb.corpus[top]
    qt = data.query_texts[:queries]
    dt = [data.corpus_texts[i] for i in top]
    doc_ids = [data.corpus_ids[i] for i in top]

    enc = Encoder("minilm", cache_dir=default_cache_dir(), show_progress=False)
    tokenizer, table = enc.tokenizer, enc.token_embeddings()
    t0 = time.perf_counter()
    vocab = CorpusVocabulary.from_texts(data.corpus_texts, tokenizer)
    vocab_s = time.perf_counter() - t0
    explainer = Explainer(model, table, tokenizer, idf=vocab)
    fb = index if feedback == "index" else None

    def go(filter: bool, texts: bool = True, fb_: Any = fb) -> list[Any]:
        return explainer.explain(
            q,
            d,
            top_k=top_k,
            filter=filter,
            query_texts=qt if texts else None,
            doc_texts=dt if texts else None,
            doc_ids=doc_ids,
            feedback=fb_,
        )

    t0 = time.perf_counter()
    cold = go(True)  # first call: pseudo-inverse, normalised table and word tables built here
    cold_s = time.perf_counter() - t0
    variants = {
        "plain": go(False),
        "filtered": cold,
        "corpus_only": go(True, texts=False),
    }
    # corpus_only explanations carry no texts: attach them for the share computation.
    variants["corpus_only"] = [
        dataclasses.replace(e, query_text=a, document_text=b)
        for e, a, b in zip(variants["corpus_only"], qt, dt, strict=True)
    ]
    shares = {name: grounded_share(ex) for name, ex in variants.items()}
    plain, filtered = shares["plain"]["share"], shares["filtered"]["share"]
    score_gap = max(
        abs(e.imrnn_score - float(s)) for e, s in zip(variants["plain"], scores[:, 0], strict=True)
    )
    timing = {
        f"{name}_feedback_{fname}": _timed(lambda f=flt, b=fbv: go(f, fb_=b), repeats)
        for name, flt in (("plain", False), ("filtered", True))
        for fname, fbv in (("index", index), ("pair", None))
    }
    first = {name: ex[0] for name, ex in variants.items()}
    return {
        "benchmark": "explain_quality",
        "dataset": f"scifact test, first {queries} queries, top-1 document (IMRNN rerank)",
        "adapter": {"path": str(path), "origin": origin, "config": model.config.to_dict()},
        "feedback": feedback,
        "top_k": top_k,
        "shares": shares,
        "ratio_filtered_over_plain": (filtered / plain) if plain > 0 else None,
        "targets": {
            "filtered_at_least_2x_plain": filtered >= 2 * plain,
            "filtered_at_least_0.6": filtered >= 0.6,
        },
        "signal": signal_check(explainer, variants["plain"]),
        "filtered_overlap_with_idf_only_ranking": idf_only_overlap(
            explainer, variants["filtered"], top_k
        ),
        "max_abs_gap_explained_vs_search_score": score_gap,
        "timing_100_pairs": {"cold_first_call_filtered_s": round(cold_s, 4), **timing},
        "corpus_vocabulary_seconds": round(vocab_s, 3),
        "example": {
            "query": qt[0],
            "document_id": doc_ids[0],
            **{
                f"{name}_{side}_tokens": [t.token for t in getattr(ex, f"{side}_tokens")]
                for name, ex in first.items()
                for side in ("query", "document")
            },
        },
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--checkpoint", default=None, help="adapter (default: shipped, else v0.1)")
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5, help="timed calls after the warm-up")
    p.add_argument(
        "--feedback",
        choices=("index", "pair"),
        default="index",
        help="query feedback set: the index's (as search) or the document alone (official)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's); 1 gives stable timings on a shared machine",
    )
    args = p.parse_args(argv)
    out = run(args.checkpoint, args.queries, args.top_k, args.repeats, args.feedback, args.threads)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    s = out["shares"]
    print(f"adapter: {out['adapter']['path']} ({out['adapter']['origin']})")
    print(f"{out['dataset']}; feedback: {out['feedback']}; top-{out['top_k']} tokens per side")
    for name in ("plain", "filtered", "corpus_only"):
        v = s[name]
        print(
            f"  {name:12} grounded share {v['share']:.3f} (query side "
            f"{v['share_query_side']:.3f}, document side {v['share_document_side']:.3f}, "
            f"{v['tokens_per_side']:.1f} tokens/side)"
        )
    print(f"  filtered / plain: {out['ratio_filtered_over_plain']}")
    print(f"  signal: {out['signal']}")
    print(f"  filtered overlap with IDF-only: {out['filtered_overlap_with_idf_only_ranking']}")
    timing = dict(out["timing_100_pairs"])
    print(f"  cold first call (filtered): {timing.pop('cold_first_call_filtered_s'):.3f} s")
    for name, t in timing.items():
        print(f"  {name:28} first {t['first_call_s']:.3f} s, then median {t['median_s']:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
