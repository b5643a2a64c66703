"""Faithfulness of IMRNN explanations: do the named words drive the adapter's ranking?

ERASER-style comprehensiveness (DeYoung et al., 2020) on the real encoder. For the first
``--pairs`` SciFact test queries (default 100), each with its top-ranked document (IMRNN,
exhaustive; set ``top``) and, separately, the relevant document the adapter promoted most
(largest rise from its base-cosine rank to its IMRNN rank; set ``promoted``; queries without
a promoted relevant document are skipped), every method ranks the words of the document
(and, in a second run, of the query). Its top-k words (k = 1, 3, 5, 10; every occurrence of
each) are deleted from that text, the text is re-encoded with the same encoder, and the pair
re-scored. Reported, averaged over pairs, is the drop (before - after) of:

- ``imrnn``: the IMRNN score;
- ``added``: the adapter's added score ``A = IMRNN - cos`` (what the explanation explains);
- ``rr``: the reciprocal rank of the document among all documents (IMRNN, exhaustive).

and AOPC, the mean of a curve over the ks. Document deletions keep the query's search
state (``T_q``, ``q~``), so no other document's score changes; query deletions re-run the
search (first stage, feedback set, ``T_q``, ``q~``) and rank the whole corpus again.

Methods (top-k = the k words of largest signed effect, for the word methods; the tokens in
their order, for back-projection, where a token that is not a word of the text deletes
nothing):

- ``plain``: the paper's Moore-Penrose back-projection;
- ``filtered``: back-projection restricted to the pair's words, IDF-weighted;
- ``word-gradient``, ``gradient-x-input``, ``integrated-gradients``, ``occlusion``:
  :mod:`imrnns.explain.words` (occlusion = leave-one-word-out, the oracle of single-word
  effects);
- baselines ``random`` (a random order of the text's words, seeded per pair) and ``idf``
  (the text's words by corpus IDF, highest first).

Only the words the encoder sees (its ``max_length`` window) are candidates. Every method's
wall time per explanation (both sides of one pair, one pair per call) is recorded.

Run: ``python -m benchmarks.explain_faithfulness`` (``--pairs 10`` for a quick run). Writes
``benchmarks/results/explain-faithfulness.{json,md}``; per-pair records go to a work folder
as they finish (``--work``, default ``~/.cache/imrnns/explain-faithfulness``), so an
interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imrnns._atomic import atomic_file
from imrnns.explain import CorpusVocabulary, Explainer
from imrnns.explain.vocabulary import delete_words, word_spans
from imrnns.explain.words import WORD_METHODS, WordExplainer, _AddedScore

KS = (1, 3, 5, 10)
BACKPROJECTION = ("plain", "filtered")
BASELINES = ("random", "idf")
METHODS = (*BACKPROJECTION, *WORD_METHODS, *BASELINES)
SIDES = ("document", "query")
METRICS = ("imrnn", "added", "rr")
RESULTS = Path(__file__).resolve().parent / "results"
NAME = "explain-faithfulness"


# --------------------------------------------------------------------------- context


@dataclass
class Context:
    """Everything the benchmark scores with: the data, the encoder, the adapter's index."""

    query_texts: list[str]
    corpus_texts: list[str]
    relevant: list[set[int]]  # per query, the rows of its relevant documents
    encoder: Any
    index: Any
    query_embeddings: np.ndarray  # (Q, n) of query_texts
    corpus_embeddings: np.ndarray  # (N, n) of corpus_texts
    idf: dict[str, float] = field(default_factory=dict)
    vocabulary: CorpusVocabulary | None = None

    @property
    def model(self) -> Any:
        return self.index.model


def word_idf(texts: Sequence[str], tokenizer: Any) -> dict[str, float]:
    """Smoothed corpus IDF of every word, ``ln((1 + N) / (1 + df)) + 1``."""
    df: dict[str, int] = {}
    for text in texts:
        for w in {w for _, _, w in word_spans(text, tokenizer)}:
            df[w] = df.get(w, 0) + 1
    n = len(texts)
    return {w: math.log((1 + n) / (1 + c)) + 1.0 for w, c in df.items()}


def scifact_context(pairs: int) -> Context:
    """SciFact test, all-MiniLM-L6-v2 (embeddings from the disk cache), the shipped adapter."""
    from imrnns import IMRNN, IMRNNIndex
    from imrnns.data import load_beir, scifact_path
    from imrnns.encoders import Encoder, default_cache_dir
    from imrnns.pretrained import default_adapter

    data = load_beir(scifact_path(), "test")
    enc = Encoder("minilm", cache_dir=default_cache_dir(), show_progress=False)
    corpus = enc.encode_document(data.corpus_texts)
    queries = enc.encode_query(data.query_texts[:pairs])
    model = IMRNN.from_pretrained(default_adapter())
    index = IMRNNIndex(model, feedback_k=100, encoder=enc.fingerprint)
    index.add(corpus, doc_ids=data.corpus_ids)
    row = {d: i for i, d in enumerate(data.corpus_ids)}
    relevant = [
        {row[d] for d, s in data.qrels.get(q, {}).items() if s > 0 and d in row}
        for q in data.query_ids[:pairs]
    ]
    return Context(
        query_texts=data.query_texts[:pairs],
        corpus_texts=data.corpus_texts,
        relevant=relevant,
        encoder=enc,
        index=index,
        query_embeddings=queries,
        corpus_embeddings=corpus,
        idf=word_idf(data.corpus_texts, enc.tokenizer),
        vocabulary=CorpusVocabulary.from_texts(data.corpus_texts, enc.tokenizer),
    )


# --------------------------------------------------------------------------- scoring


def all_scores(index: Any, tq: torch.Tensor, q_tilde: torch.Tensor) -> torch.Tensor:
    """(B, N) IMRNN scores of every stored document under B query states (exhaustive)."""
    corpus = index.projected_corpus
    ids = torch.arange(corpus.shape[0], device=corpus.device).expand(tq.shape[0], -1)
    with torch.no_grad():
        return index.model.score_ids(corpus, ids, tq, q_tilde).double().cpu()


def rank_of(scores: torch.Tensor, doc: int, score: float | None = None) -> int:
    """1-based rank of ``doc`` among (N,) scores (ties: lower id first), its score replaced
    by ``score`` when given (a document edit leaves every other score as it is)."""
    s = float(scores[doc]) if score is None else score
    others = torch.cat([scores[:doc], scores[doc + 1 :]])
    ids = torch.cat([torch.arange(doc), torch.arange(doc + 1, scores.shape[0])])
    return 1 + int(((others > s) | ((others == s) & (ids < doc))).sum())


def corpus_scores_after_doc_edit(
    index: Any, tq: torch.Tensor, q_tilde: torch.Tensor, doc: int, new_embedding: torch.Tensor
) -> torch.Tensor:
    """(N,) scores of every document for one query state after document ``doc``'s embedding
    is replaced: the full re-scoring that :func:`rank_of`'s shortcut stands for."""
    model = index.model
    with torch.no_grad():
        corpus = index.projected_corpus.clone()
        corpus[doc] = model.project(new_embedding.reshape(1, -1).to(model.dtype))[0].to(
            corpus.dtype
        )
        ids = torch.arange(corpus.shape[0]).unsqueeze(0)
        return model.score_ids(corpus, ids, tq, q_tilde)[0].double().cpu()


def select_pairs(ctx: Context) -> dict[str, list[tuple[int, int]]]:
    """``{"top": [(query row, doc row)], "promoted": [...]}``."""
    index = ctx.index
    q = torch.from_numpy(ctx.query_embeddings)
    state = index.query_state(q)
    imrnn = all_scores(index, state.query_transform, state.modulated_queries)
    base = (q.double() @ torch.from_numpy(ctx.corpus_embeddings).double().T).cpu()
    top, promoted = [], []
    for r in range(q.shape[0]):
        top.append((r, int(torch.argmax(imrnn[r]))))  # argmax: the first of ties, lower id
        best, gain = None, 0
        for d in sorted(ctx.relevant[r]):
            g = rank_of(base[r], d) - rank_of(imrnn[r], d)
            if g > gain:
                best, gain = d, g
        if best is not None:
            promoted.append((r, best))
    return {"top": top, "promoted": promoted}


# --------------------------------------------------------------------------- one pair


class PairRun:
    """Rankings of every method and the deletion curves of one (query, document) pair."""

    def __init__(
        self,
        ctx: Context,
        qi: int,
        di: int,
        explainers: dict[str, Any],
        window: WordExplainer,
        seed: int,
    ) -> None:
        self.ctx, self.qi, self.di = ctx, qi, di
        self.explainers = explainers
        self.window_explainer = window
        self.seed = seed
        self.texts = {"query": ctx.query_texts[qi], "document": ctx.corpus_texts[di]}
        index, model = ctx.index, ctx.model
        q = torch.from_numpy(ctx.query_embeddings[qi])
        d = torch.from_numpy(ctx.corpus_embeddings[di])
        self.scorer = _AddedScore(model, q, d, index, None)
        self.scores = all_scores(index, self.scorer.tq, self.scorer.q_tilde)[0]
        with torch.no_grad():
            imrnn, base = self.scorer.document(self.scorer.d)
        self.imrnn, self.base = float(imrnn[0]), float(base[0])

    def rankings(self) -> tuple[dict[str, dict[str, list[str]]], dict[str, float], dict]:
        """Per method and side, the words in the method's order (the back-projection's
        tokens as strings); per method, the seconds of one explanation; IG completeness."""
        ctx = self.ctx
        out: dict[str, dict[str, list[str]]] = {}
        secs: dict[str, float] = {}
        extra: dict[str, Any] = {}
        window = {side: self._window(side) for side in SIDES}
        qt, dt = self.texts["query"], self.texts["document"]
        q, d = ctx.query_embeddings[self.qi], ctx.corpus_embeddings[self.di]
        for method, explainer in self.explainers.items():
            t0 = time.perf_counter()
            if method in BACKPROJECTION:
                (ex,) = explainer.explain(
                    q, d, top_k=10, filter=method == "filtered", query_texts=[qt],
                    doc_texts=[dt], feedback=ctx.index,
                )  # fmt: skip
                secs[method] = time.perf_counter() - t0
                out[method] = {
                    "query": [t.token for t in ex.query_tokens],
                    "document": [t.token for t in ex.document_tokens],
                }
            else:
                (pe,) = explainer.word_effects([qt], [dt], feedback=ctx.index)
                secs[method] = time.perf_counter() - t0
                out[method] = {"query": pe.query.ranked(), "document": pe.document.ranked()}
                if pe.query.completeness is not None:
                    extra["ig_completeness"] = {
                        "query": pe.query.completeness,
                        "document": pe.document.completeness,
                    }
                if method == "occlusion":
                    extra["occlusion"] = {
                        side: dict(zip(pe_side.words, pe_side.effects.tolist(), strict=True))
                        for side, pe_side in (("query", pe.query), ("document", pe.document))
                    }
        rng = np.random.default_rng([self.seed, self.qi, self.di])
        out["random"] = {side: [window[side][i] for i in rng.permutation(len(window[side]))]
                         for side in SIDES}  # fmt: skip
        # A word the corpus lacks (a query's own rare term) has the largest IDF.
        unseen = max(ctx.idf.values(), default=1.0)
        out["idf"] = {
            side: sorted(window[side], key=lambda w: -ctx.idf.get(w, unseen)) for side in SIDES
        }
        return out, secs, extra

    def _window(self, side: str) -> list[str]:
        """The text's distinct words that the encoder sees, in order of first occurrence."""
        role = "query" if side == "query" else "document"
        return self.window_explainer.path.pieces(self.texts[side], role).words

    def curves(
        self, rankings: dict[str, dict[str, list[str]]], ks: Sequence[int], batch_size: int
    ) -> dict[str, dict[str, dict[str, list[float]]]]:
        """``{side: {method: {metric: [drop at each k]}}}``, every variant text encoded once."""
        tok = self.ctx.encoder.tokenizer
        out: dict[str, dict[str, dict[str, list[float]]]] = {}
        for side in SIDES:
            text = self.texts[side]
            variants: dict[tuple[str, ...], str] = {}
            for method in rankings:
                for k in ks:
                    key = tuple(sorted(rankings[method][side][:k]))
                    variants.setdefault(key, delete_words(text, key, tok))
            unique = list(dict.fromkeys(variants.values()))
            metrics = self._rescore(side, unique, batch_size)
            by_text = dict(zip(unique, metrics, strict=True))
            out[side] = {}
            for method in rankings:
                rows = [by_text[variants[tuple(sorted(rankings[method][side][:k]))]] for k in ks]
                out[side][method] = {m: [row[m] for row in rows] for m in METRICS}
        return out

    def _rescore(self, side: str, texts: list[str], batch_size: int) -> list[dict[str, float]]:
        """Drops (before - after) of each metric for each edited text of ``side``."""
        ctx = self.ctx
        enc = ctx.encoder
        fn = enc.encode_query if side == "query" else enc.encode_document
        emb = torch.from_numpy(fn(texts, cache=False, batch_size=batch_size, show_progress=False))
        rr0 = 1.0 / rank_of(self.scores, self.di)
        with torch.no_grad():
            if side == "document":
                imrnn, base = self.scorer.document(emb)
                ranks = [rank_of(self.scores, self.di, float(s)) for s in imrnn.double()]
            else:
                imrnn, base = self.scorer.query(emb, exact=True)
                state = ctx.index.query_state(emb.float())
                full = all_scores(ctx.index, state.query_transform, state.modulated_queries)
                ranks = [rank_of(full[r], self.di) for r in range(len(texts))]
        out = []
        for i in range(len(texts)):
            s, b = float(imrnn[i]), float(base[i])
            out.append(
                {
                    "imrnn": self.imrnn - s,
                    "added": (self.imrnn - self.base) - (s - b),
                    "rr": rr0 - 1.0 / ranks[i],
                }
            )
        return out


# --------------------------------------------------------------------------- the run


def make_explainers(ctx: Context, methods: Sequence[str], ig_steps: int, batch_size: int) -> dict:
    model, enc = ctx.model, ctx.encoder
    out: dict[str, Any] = {}
    for method in methods:
        if method in BACKPROJECTION:
            out[method] = Explainer(
                model, enc.token_embeddings(), enc.tokenizer, idf=ctx.vocabulary
            )
        elif method in WORD_METHODS:
            out[method] = WordExplainer(
                model, enc, method=method, steps=ig_steps, batch_size=batch_size
            )
        elif method not in BASELINES:
            raise ValueError(f"unknown method {method!r}; choose from {list(METHODS)}")
    return out


def run(
    ctx: Context,
    *,
    methods: Sequence[str] = METHODS,
    ks: Sequence[int] = KS,
    ig_steps: int = 16,
    batch_size: int = 32,
    seed: int = 0,
    work: Path | None = None,
    log: Callable[[str], None] | None = None,
    aggregate_only: bool = False,
) -> dict[str, Any]:
    """The benchmark on ``ctx``: per-pair records and the aggregated table (JSON-ready).

    ``aggregate_only``: compute nothing, tabulate the pairs the work folder's journal holds
    (a partial run; ``complete`` is False in the result when pairs are missing).
    """
    t_start = time.perf_counter()
    sets = select_pairs(ctx)
    explainers = make_explainers(ctx, methods, ig_steps, batch_size)
    # The words the encoder sees (every method's candidates) come from its tokenisation.
    window = WordExplainer(ctx.model, ctx.encoder, method="word-gradient")
    config = {"methods": list(methods), "ks": list(ks), "ig_steps": ig_steps, "seed": seed}
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    done: dict[tuple[int, int], dict] = {}
    journal = None
    if work is not None:
        work.mkdir(parents=True, exist_ok=True)
        journal = work / f"pairs-{key}.jsonl"
        if journal.exists():
            for line in journal.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill: redo that pair
                    continue
                done[(rec["query"], rec["doc"])] = rec
    unique = list(dict.fromkeys(sets["top"] + sets["promoted"]))
    requested = {name: len(pairs) for name, pairs in sets.items()}
    if aggregate_only:
        sets = {name: [p for p in pairs if p in done] for name, pairs in sets.items()}
        unique = [p for p in unique if p in done]
    if unique and len(done) < len(unique):
        # One untimed explanation per method first: the caches every later call reuses (the
        # pseudo-inverse, the token tables, the encoder's first pass) are not per-call costs.
        PairRun(ctx, *unique[0], explainers, window, seed).rankings()
    for n, (qi, di) in enumerate(unique, 1):
        if (qi, di) in done:
            continue
        t0 = time.perf_counter()
        pair = PairRun(ctx, qi, di, explainers, window, seed)
        rankings, secs, extra = pair.rankings()
        rankings = {m: rankings[m] for m in methods}
        rec = {
            "query": qi,
            "doc": di,
            "imrnn": pair.imrnn,
            "base": pair.base,
            "rank": rank_of(pair.scores, di),
            "seconds": secs,
            "rankings": {m: {s: r[s][:10] for s in SIDES} for m, r in rankings.items()},
            "curves": pair.curves(rankings, ks, batch_size),
            "pair_seconds": time.perf_counter() - t0,
        }
        if "ig_completeness" in extra:
            rec["ig_completeness"] = extra["ig_completeness"]
        done[(qi, di)] = rec
        if journal is not None:
            with open(journal, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
        if log is not None:
            log(f"pair {n}/{len(unique)} (query {qi}, doc {di}): {time.perf_counter() - t0:.1f} s")
    table = {name: aggregate([done[p] for p in pairs], methods, ks) for name, pairs in sets.items()}
    return {
        "config": config,
        "pairs": {name: len(pairs) for name, pairs in sets.items()},
        "pairs_requested": requested,
        "complete": all(len(sets[name]) == requested[name] for name in sets),
        "unique_pairs": len(unique),
        "table": table,
        "seconds_per_explanation": timing([done[p] for p in unique], methods),
        "ig_completeness": completeness([done[p] for p in unique]),
        "wall_seconds": time.perf_counter() - t_start,
        # The pairs' own wall times, summed: the benchmark's cost also when it ran in several
        # (resumed) invocations or is tabulated by --aggregate-only.
        "pair_seconds": sum(done[p].get("pair_seconds", 0.0) for p in unique),
        "records": [done[p] for p in unique],
    }


def aggregate(records: list[dict], methods: Sequence[str], ks: Sequence[int]) -> dict:
    """``{side: {method: {metric: {"k": [mean drop per k], "aopc": mean over ks}}}}``."""
    out: dict[str, Any] = {}
    for side in SIDES:
        out[side] = {}
        for method in methods:
            row: dict[str, Any] = {}
            for metric in METRICS:
                per_k = [
                    statistics.fmean(r["curves"][side][method][metric][j] for r in records)
                    if records
                    else float("nan")
                    for j in range(len(ks))
                ]
                row[metric] = {"k": per_k, "aopc": statistics.fmean(per_k)}
            out[side][method] = row
    return out


def timing(records: list[dict], methods: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per method: median and quartiles of the seconds per explanation (both sides)."""
    out = {}
    for method in methods:
        xs = sorted(r["seconds"][method] for r in records if method in r["seconds"])
        if xs:
            q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
            out[method] = {"median": statistics.median(xs), "q1": q[0], "q3": q[2]}
    return out


def completeness(records: list[dict]) -> dict[str, float] | None:
    """Integrated gradients: median and 90th percentile of |sum - (A(x) - A(0))| / |A(x) - A(0)|."""
    errs = []
    for r in records:
        for side in SIDES:
            c = r.get("ig_completeness", {}).get(side)
            if c is not None and c[1] != 0:
                errs.append(abs(c[0] - c[1]) / abs(c[1]))
    if not errs:
        return None
    errs.sort()
    return {"median": statistics.median(errs), "p90": errs[int(0.9 * (len(errs) - 1))]}


def timing_run(
    ctx: Context,
    pairs: int,
    *,
    methods: Sequence[str] = (*BACKPROJECTION, *WORD_METHODS),
    ig_steps: int = 16,
    batch_size: int = 32,
    repeats: int = 3,
) -> dict[str, Any]:
    """Seconds per explanation (both sides of one pair, one pair per call, the pair's
    embeddings given as an index's cache would give them), per method: the first ``pairs``
    top-ranked pairs, each timed up to ``repeats`` times (once past 2 s) after one untimed
    warm-up call (the first call of an explainer builds its caches). ``word-gradient`` is
    also timed "cold": a fresh explainer per call, so the words' lone embeddings are encoded
    inside the call."""
    sets = select_pairs(ctx)
    chosen = sets["top"][:pairs]
    explainers = make_explainers(ctx, methods, ig_steps, batch_size)
    out: dict[str, Any] = {}

    def call(method: str, explainer: Any, qi: int, di: int) -> None:
        qt, dt = ctx.query_texts[qi], ctx.corpus_texts[di]
        q, d = ctx.query_embeddings[qi], ctx.corpus_embeddings[di]
        if method in BACKPROJECTION:
            explainer.explain(
                q, d, top_k=10, filter=method == "filtered", query_texts=[qt],
                doc_texts=[dt], feedback=ctx.index,
            )  # fmt: skip
        else:
            explainer.explain(
                [qt], [dt], top_k=10, feedback=ctx.index, query_embeddings=q, doc_embeddings=d
            )

    for method, explainer in explainers.items():
        call(method, explainer, *chosen[0])  # warm-up
        times = []
        for qi, di in chosen:
            spent = 0.0
            # Up to ``repeats`` calls per pair, fewer for the slow methods (several seconds
            # each): their spread over pairs is larger than over repeats.
            for _ in range(repeats):
                t0 = time.perf_counter()
                call(method, explainer, qi, di)
                times.append(time.perf_counter() - t0)
                spent += times[-1]
                if spent > 2.0:
                    break
        out[method] = _spread(times)
        if method == "word-gradient":
            cold = []
            for qi, di in chosen:
                fresh = WordExplainer(ctx.model, ctx.encoder, method=method, batch_size=batch_size)
                t0 = time.perf_counter()
                call(method, fresh, qi, di)
                cold.append(time.perf_counter() - t0)
            out["word-gradient (cold)"] = _spread(cold)
    return {"pairs": len(chosen), "repeats": repeats, "seconds": out}


def _spread(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return {"median": statistics.median(xs), "q1": q[0], "q3": q[2], "min": xs[0]}


# --------------------------------------------------------------------------- output


def markdown(result: dict[str, Any], machine: str) -> str:
    ks = result["config"]["ks"]
    lines = [
        "# Faithfulness of IMRNN explanations",
        "",
        f"`python -m benchmarks.explain_faithfulness --pairs {result['config'].get('pairs', '?')}`"
        f"; {machine}; {result['unique_pairs']} distinct pairs in "
        f"{result['pair_seconds'] / 60:.1f} min (sum of the pairs' wall times; this invocation "
        f"{result['wall_seconds'] / 60:.1f} min). Drops (before - "
        "after deletion of the method's top-k words, re-encoded), mean over pairs; AOPC = mean "
        "over k. `added` = IMRNN - base (what the adapter added); `rr` = reciprocal rank.",
        "",
    ]
    for name, table in result["table"].items():
        n = result["pairs"][name]
        for side in SIDES:
            lines += [
                f"## {name} documents ({n} pairs), deletions from the {side}",
                "",
                "| method | "
                + " | ".join(f"added k={k}" for k in ks)
                + " | added AOPC | imrnn k=5 | imrnn AOPC | rr k=5 | rr AOPC |",
                "|---" * (len(ks) + 6) + "|",
            ]
            k5 = ks.index(5) if 5 in ks else len(ks) - 1
            for method, row in table[side].items():
                cells = [f"{x:+.4f}" for x in row["added"]["k"]]
                cells += [
                    f"{row['added']['aopc']:+.4f}",
                    f"{row['imrnn']['k'][k5]:+.4f}",
                    f"{row['imrnn']['aopc']:+.4f}",
                    f"{row['rr']['k'][k5]:+.4f}",
                    f"{row['rr']['aopc']:+.4f}",
                ]
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
            lines.append("")
    lines += ["## Seconds per explanation (both sides, one pair per call)", ""]
    lines += ["| method | median | q1 | q3 |", "|---|---|---|---|"]
    for method, t in result["seconds_per_explanation"].items():
        lines.append(f"| {method} | {t['median']:.3f} | {t['q1']:.3f} | {t['q3']:.3f} |")
    t = result.get("timing")
    if t:
        lines += [
            "",
            f"## Seconds per explanation, embeddings given ({t['pairs']} pairs, up to "
            f"{t['repeats']} calls each after a warm-up)",
            "",
            "| method | median | q1 | q3 | min |",
            "|---|---|---|---|---|",
        ]
        for method, v in t["seconds"].items():
            lines.append(
                f"| {method} | {v['median']:.3f} | {v['q1']:.3f} | {v['q3']:.3f} | {v['min']:.3f} |"
            )
    if not result.get("complete", True):
        lines += [
            "",
            f"Partial run: {result['pairs']} of {result['pairs_requested']} pairs "
            "(rerun the same command to resume).",
        ]
    c = result.get("ig_completeness")
    if c:
        lines += [
            "",
            f"Integrated gradients ({result['config']['ig_steps']} Gauss-Legendre points): "
            f"|sum of attributions - (A(x) - A(0))| / |A(x) - A(0)|, median {c['median']:.3f}, "
            f"90th percentile {c['p90']:.3f}.",
        ]
    return "\n".join(lines) + "\n"


def write(result: dict[str, Any], out_dir: Path, name: str, machine: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / f"{name}.json", out_dir / f"{name}.md"
    with atomic_file(js, "w") as fh:
        json.dump(result, fh, indent=1, allow_nan=False)
        fh.write("\n")
    with atomic_file(md, "w") as fh:
        fh.write(markdown(result, machine))
    return js, md


def main(argv: list[str] | None = None) -> int:
    from benchmarks._common import cpu_device_name

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=100, help="SciFact test queries (default 100)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--ks", type=int, nargs="+", default=list(KS))
    p.add_argument("--ig-steps", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--name", default=NAME)
    p.add_argument("--work", type=Path, default=Path.home() / ".cache" / "imrnns" / NAME)
    p.add_argument(
        "--aggregate-only",
        action="store_true",
        help="compute nothing: tabulate the pairs an earlier (interrupted) run finished",
    )
    p.add_argument(
        "--timing",
        type=int,
        default=10,
        metavar="N",
        help="also time each method on N pairs, embeddings given (0: skip; default 10)",
    )
    args = p.parse_args(argv)
    if args.pairs <= 0 or any(k <= 0 for k in args.ks):
        raise SystemExit("--pairs and --ks must be positive")
    t0 = time.perf_counter()
    ctx = scifact_context(args.pairs)

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.0f} s] {msg}", file=sys.stderr, flush=True)

    result = run(
        ctx,
        methods=args.methods,
        ks=args.ks,
        ig_steps=args.ig_steps,
        batch_size=args.batch_size,
        seed=args.seed,
        work=args.work / f"pairs{args.pairs}",
        log=log,
        aggregate_only=args.aggregate_only,
    )
    result["config"]["pairs"] = args.pairs
    if args.timing > 0:
        log(f"timing {args.timing} pairs")
        result["timing"] = timing_run(
            ctx, args.timing, ig_steps=args.ig_steps, batch_size=args.batch_size
        )
    result["wall_seconds"] = time.perf_counter() - t0
    machine = f"{cpu_device_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    result["machine"] = machine
    result["python"] = platform.python_version()
    js, md = write(result, args.out, args.name, machine)
    print(markdown(result, machine))
    print(f"wrote {js} and {md}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
