"""The main job: SciFact end to end with all-MiniLM-L6-v2 and an IMRNN adapter.

Encodes the vendored SciFact corpus and test queries (cached on disk), loads the shipped
adapter (or the one given), builds an :class:`~imrnns.index.IMRNNIndex`, runs the 300 test
queries in both modes, and reports base vs IMRNN nDCG@10 / Recall@100 / MRR@10 overall and on
the seen-doc / unseen-doc subsets, queries per second, and one example query.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imrnns.data import load_beir, scifact_path, seen_doc_split
from imrnns.metrics import (
    METRICS,
    bootstrap_ci,
    evaluate_run,
    holm,
    mean_metrics,
    paired_tests,
    run_from_results,
)


def _timed_search(index: Any, q: np.ndarray, k: int, mode: str) -> tuple[Any, float]:
    index.search(q[:8], k, mode)  # warm-up: first-call allocations and thread start-up
    t0 = time.perf_counter()
    out = index.search(q, k, mode)
    return out, time.perf_counter() - t0


def run_demo(
    checkpoint: str | Path | None = None,
    encoder: Any = "minilm",
    cache_dir: str | Path | None = None,
    feedback_k: int = 100,
    show_progress: bool = True,
) -> tuple[dict[str, Any], str]:
    """Run the demo; return (JSON-ready payload, human-readable report)."""
    from imrnns import IMRNN, IMRNNIndex
    from imrnns.encoders import resolve_encoder
    from imrnns.evaluate import index_similarity
    from imrnns.pretrained import default_adapter

    test = load_beir(scifact_path(), "test")
    train = load_beir(scifact_path(), "train")
    seen, unseen = seen_doc_split(train.qrels, test.qrels)
    enc = resolve_encoder(encoder, cache_dir or None, show_progress)
    t0 = time.perf_counter()
    docs = enc.encode_document(test.corpus_texts)
    queries = enc.encode_query(test.query_texts)
    encode_s = time.perf_counter() - t0

    ckpt = Path(checkpoint) if checkpoint else default_adapter()
    model = IMRNN.from_pretrained(ckpt)
    t0 = time.perf_counter()
    index = IMRNNIndex(
        model, feedback_k=feedback_k, encoder=enc.fingerprint, similarity=index_similarity(enc)
    )
    index.add(docs)  # default ids are rows: runs map them through test.corpus_ids
    build_s = time.perf_counter() - t0

    k = 100  # Recall@100 needs 100 results
    rows: dict[str, dict[str, Any]] = {}
    per_query: dict[str, dict[str, dict[str, float]]] = {}
    t0 = time.perf_counter()
    base_s, base_i = index.first_stage_search(queries, k)
    base_secs = time.perf_counter() - t0
    runs = {"base": ((base_s, base_i), base_secs)}
    for mode in ("rerank", "exhaustive"):
        runs[f"imrnn_{mode}"] = _timed_search(index, queries, k, mode)
    for name, ((s, i), secs) in runs.items():
        pq = evaluate_run(test.qrels, run_from_results(test.query_ids, test.corpus_ids, s, i))
        per_query[name] = pq
        rows[name] = {
            "all": mean_metrics(pq),
            "seen_doc": mean_metrics(pq, seen),
            "unseen_doc": mean_metrics(pq, unseen),
            "seconds": secs,
            "queries_per_second": len(test.query_ids) / secs,
        }
    family = []  # the four tests printed form one family: Holm-adjusted together
    for name in ("imrnn_rerank", "imrnn_exhaustive"):
        rows[name]["vs_base_nDCG@10"] = {}
        for subset, qids in (("all", test.query_ids), ("unseen_doc", unseen)):
            a = [per_query["base"][q]["nDCG@10"] for q in qids]
            b = [per_query[name][q]["nDCG@10"] for q in qids]
            t = paired_tests(a, b)
            t["ci_low"], t["ci_high"] = bootstrap_ci(a, b)
            rows[name]["vs_base_nDCG@10"][subset] = t
            family.append(t)
    for t, adjusted in zip(family, holm([t["p_randomisation"] for t in family]), strict=True):
        t["p_randomisation_holm"] = adjusted

    example = _example(test, per_query, runs, unseen)
    example["explanation"] = _explain_example(enc, index, test, queries, docs, example)
    payload = {
        "dataset": {
            "name": "scifact",
            "split": "test",
            "documents": test.num_docs,
            "queries": test.num_queries,
            "seen_doc_queries": len(seen),
            "unseen_doc_queries": len(unseen),
        },
        "encoder": {"name": enc.name, "fingerprint": enc.fingerprint, "seconds": encode_s},
        "adapter": {"path": str(ckpt), "config": model.config.to_dict()},
        "index": {"feedback_k": feedback_k, "first_stage": "flat", "build_seconds": build_s},
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(),
        },
        "results": rows,
        "example": example,
    }
    return payload, _report(payload)


def _example(test: Any, per_query: dict, runs: dict, unseen: list[str]) -> dict[str, Any]:
    """The unseen-doc query that IMRNN (rerank) improves most, with both top-3 lists."""
    gains = {
        q: per_query["imrnn_rerank"][q]["nDCG@10"] - per_query["base"][q]["nDCG@10"] for q in unseen
    }
    qid = max(gains, key=lambda q: (gains[q], q)) if gains else test.query_ids[0]
    row = test.query_ids.index(qid)
    texts = dict(zip(test.corpus_ids, test.corpus_texts, strict=True))

    def top(name: str) -> list[dict[str, Any]]:
        (s, i), _ = runs[name]
        return [
            {
                "doc_id": test.corpus_ids[j],
                "score": float(v),
                "relevant": test.qrels[qid].get(test.corpus_ids[j], 0) > 0,
                "text": texts[test.corpus_ids[j]][:120],
            }
            for v, j in zip(s[row][:3], i[row][:3], strict=True)
        ]

    return {
        "query_id": qid,
        "query": test.query_texts[row],
        "base_top3": top("base"),
        "imrnn_top3": top("imrnn_rerank"),
        "nDCG@10_gain": gains.get(qid),
    }


def _report(p: dict[str, Any]) -> str:
    d, r = p["dataset"], p["results"]
    lines = [
        f"IMRNNs demo: SciFact test ({d['documents']:,} documents, {d['queries']} queries: "
        f"{d['seen_doc_queries']} seen-doc, {d['unseen_doc_queries']} unseen-doc), "
        f"encoder {p['encoder']['name']}",
        f"adapter: {p['adapter']['path']} ({p['adapter']['config']['modulation']}, "
        f"m={p['adapter']['config']['dim']})",
        f"encode {p['encoder']['seconds']:.1f} s (cached after the first run), "
        f"index build {p['index']['build_seconds']:.2f} s",
        "",
        f"{'':22}"
        + "".join(f"{m:>12}" for m in METRICS)
        + f"{'seen nDCG':>12}{'unseen nDCG':>13}{'q/s':>10}",
    ]
    names = {
        "base": "base (first stage)",
        "imrnn_rerank": "IMRNN rerank",
        "imrnn_exhaustive": "IMRNN exhaustive",
    }
    for key, label in names.items():
        row = r[key]
        lines.append(
            f"{label:22}"
            + "".join(f"{row['all'][m]:>12.4f}" for m in METRICS)
            + f"{row['seen_doc']['nDCG@10']:>12.4f}{row['unseen_doc']['nDCG@10']:>13.4f}"
            + f"{row['queries_per_second']:>10.0f}"
        )
    for key in ("imrnn_rerank", "imrnn_exhaustive"):
        t = r[key]["vs_base_nDCG@10"]
        lines.append(
            f"  {names[key]} vs base, nDCG@10: "
            + "; ".join(
                f"{label} {t[s]['delta']:+.4f} [{t[s]['ci_low']:+.4f}, {t[s]['ci_high']:+.4f}] "
                f"p={t[s]['p_randomisation']:.3g} (Holm {t[s]['p_randomisation_holm']:.3g})"
                for label, s in (("all", "all"), ("unseen-doc", "unseen_doc"))
            )
        )
    lines.append(
        "  (paired randomisation test, p raw and Holm-adjusted over these 4 tests; "
        "95% paired bootstrap interval)"
    )
    ex = p["example"]
    lines += ["", f"example (unseen-doc query {ex['query_id']}): {ex['query']}"]
    for label, key in (("base ", "base_top3"), ("IMRNN", "imrnn_top3")):
        for h in ex[key]:
            mark = "*" if h["relevant"] else " "
            lines.append(f"  {label} {mark} {h['score']:+.3f} [{h['doc_id']}] {h['text']}")
    lines.append("  (* = relevant)")
    lines += _explanation_lines(ex.get("explanation"))
    return "\n".join(lines)


def _explain_example(
    enc: Any, index: Any, test: Any, queries: np.ndarray, docs: np.ndarray, example: dict
) -> dict[str, Any]:
    """Which words of the example query and of its IMRNN top-1 document drive the adapter's
    added score (the default word attribution, the query's feedback set from the index)."""
    from imrnns.explain import WordExplainer

    row = test.query_ids.index(example["query_id"])
    doc_id = example["imrnn_top3"][0]["doc_id"]
    col = test.corpus_ids.index(doc_id)
    t0 = time.perf_counter()
    (ex,) = WordExplainer(index.model, enc).explain(
        [test.query_texts[row]],
        [test.corpus_texts[col]],
        top_k=5,
        doc_ids=[doc_id],
        feedback=index,
        query_embeddings=queries[row],
        doc_embeddings=docs[col],
    )
    return {**ex.to_dict(), "document": None, "seconds": time.perf_counter() - t0}


def _explanation_lines(e: dict[str, Any] | None) -> list[str]:
    if not e:
        return []

    def toks(items: list[dict[str, Any]]) -> str:
        return ", ".join(f"{t['token']} {t['score']:+.3f}" for t in items) or "(none)"

    lines = [
        f"  why IMRNN ranks [{e['document_id']}] first ({e['method']}; base "
        f"{e['base_score']:+.3f} -> IMRNN {e['imrnn_score']:+.3f}; "
        f"{e['seconds'] * 1e3:.0f} ms):",
        f"    query words:    {toks(e['query_tokens'])}",
        f"    document words: {toks(e['document_tokens'])}",
        f"    ({e['token_scores']}; + raises it, - lowers it)",
    ]
    f = e.get("faithfulness")
    if f:
        lines.append(
            f"    (faithfulness: deleting the method's top-5 document words lowers the added "
            f"score by {f['added_drop_top5']:+.4f} on average; 5 random words "
            f"{f['random_top5']:+.4f}, 5 highest-IDF words {f['idf_top5']:+.4f})"
        )
    return lines
