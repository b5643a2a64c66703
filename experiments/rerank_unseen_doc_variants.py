"""Can a post-hoc variant of the rerank score help unseen-document queries? (issue 6, 3-fold CV)

Reproduces, in ``benchmarks/RESULTS.md`` section "Training and evaluation on SciFact (issue
6)": the lambda grid of "Fourth attempt: interpolation with the base score" and the tau grid
and the test table of "Fifth attempt: novelty gate, per-query fallback to the base". Both
variants re-order the same 100 first-stage candidates of each query:

- ``interpolation``: ``(1 - lambda) s_IMRNN + lambda cos_base``, lambda in 0, 0.1, .., 1;
- ``gate`` (novelty gate): a query whose highest base cosine to any training query is at
  least ``tau`` keeps the IMRNN ranking, the others get the base ranking (exhaustive mode:
  the exact base top-k). ``tau`` in 0.30, 0.35, .., 0.95, plus never / always.

Protocol (fixed before either attempt ran): usable train queries sorted, shuffled with
``random.Random(42)``, three disjoint 121-query validation folds (the official seed-42
slice and the two blocks before it); each fold's model is trained on the other 688 queries
for 16 epochs with the TrainConfig defaults (reference backend: deterministic). The rule
picks the smallest grid value from which every larger one (towards the base) keeps the
query-weighted unseen-doc validation nDCG@10 at or above the base's.

    IMRNNS_BACKEND=reference python -m experiments.rerank_unseen_doc_variants cv --variant interpolation
    IMRNNS_BACKEND=reference python -m experiments.rerank_unseen_doc_variants cv --variant gate
    python -m experiments.rerank_unseen_doc_variants test --tau 0.85 --checkpoint runs/refit16/refit/best

(the checkpoint: ``imrnns train --out runs/refit16 --refit-epochs 16``). Fold models are
kept in ``--folds-dir`` (default ``runs/issue6-folds``) and reused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import imrnns.training as training  # noqa: E402
from imrnns.checkpoints import load_pretrained  # noqa: E402
from imrnns.data import scifact_path  # noqa: E402
from imrnns.evaluate import (  # noqa: E402
    _base_space,
    _significance,
    _subsets,
    _summary,
    base_search,
    embed_beir,
    evaluate_run,
    imrnn_search,
    run_from_results,
)
from imrnns.training.validation import _metrics_dict  # noqa: E402


def _unit(x: np.ndarray) -> np.ndarray:
    """Unit rows, as the cosine base retriever compares them."""
    return _base_space(x, "cosine")


EPOCHS = 16
GRIDS = {
    "interpolation": [round(0.1 * i, 1) for i in range(11)],  # 1.0 is the base
    "gate": [-np.inf] + [round(0.30 + 0.05 * i, 2) for i in range(14)] + [np.inf],  # inf: base
}


def _folds(query_ids: list[str], qrels: dict[str, dict[str, int]]) -> list[list[str]]:
    usable = sorted(q for q in query_ids if any(g > 0 for g in qrels.get(q, {}).values()))
    random.Random(42).shuffle(usable)
    n = len(usable)
    cut = round(n * 0.85)
    w = n - cut
    return [usable[cut:], usable[cut - w : cut], usable[cut - 2 * w : cut - w]]


def _rerank(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows re-sorted by score (ties by lower id): runs are ranked by position."""
    order = np.lexsort((ids, -scores), axis=1)
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def _variant(kind: str, value: float, s_im, s_base, novelty) -> np.ndarray:
    if kind == "interpolation":
        return ((1 - value) * s_im + value * s_base).astype(np.float32)
    return np.where((novelty >= value)[:, None], s_im, s_base).astype(np.float32)


def cross_validate(kind: str, folds_dir: Path) -> dict:
    emb = embed_beir(scifact_path(), "train", show_progress=False)
    ds = emb.dataset
    cfg = dataclasses.replace(training.TrainConfig(), patience=0, epochs=EPOCHS)
    grid = GRIDS[kind]
    records = []
    for f, val in enumerate(_folds(list(ds.query_ids), ds.qrels)):
        data = training.prepare_training_data(emb, cfg, val_query_ids=val)
        out = folds_dir / f"f{f}"
        if not (out / "training.json").exists():
            training.train(data, out, cfg, progress=False, resume=False)
        model = load_pretrained(out / "last" / "model").eval()
        qe, ce = data.val.emb.numpy(), data.val_corpus_np
        with torch.no_grad():
            s_im, ids = imrnn_search(model, ce, qe, mode="rerank", feedback_k=100)
        qu, cu = _unit(qe), _unit(ce)
        s_base = np.einsum("qm,qkm->qk", qu, cu[ids])
        novelty = (qu @ _unit(data.train.emb.numpy()).T).max(1)
        rec = {"fold": f, "unseen": len(data.val_subsets["unseen_doc"]), "grid": {}}
        for value in grid:
            m = _metrics_dict(data, *_rerank(_variant(kind, value, s_im, s_base, novelty), ids))
            rec["grid"][str(value)] = [
                m["overall_nDCG@10"],
                m["seen_doc_nDCG@10"],
                m["unseen_doc_nDCG@10"],
            ]
        records.append(rec)
    nu = sum(r["unseen"] for r in records)
    rows = {}
    for value in grid:
        vals = [r["grid"][str(value)] for r in records]
        rows[str(value)] = {
            "overall": float(np.mean([v[0] for v in vals])),
            "seen": float(np.mean([v[1] for v in vals])),
            "unseen": sum(v[2] * r["unseen"] for v, r in zip(vals, records, strict=True)) / nu,
        }
    base_u = rows[str(grid[-1])]["unseen"]  # the last grid value is the base ranking
    chosen = next(
        v for v in grid if all(rows[str(w)]["unseen"] >= base_u - 1e-9 for w in grid if w >= v)
    )
    for value in grid:
        r = rows[str(value)]
        print(
            f"{kind} {value:>6}: overall {r['overall']:.4f}  seen {r['seen']:.4f}  "
            f"unseen {r['unseen']:.4f} ({r['unseen'] - base_u:+.4f})"
        )
    print(f"rule's choice: {chosen}")
    return {"variant": kind, "folds": records, "rows": rows, "chosen": chosen}


def look_at_test(tau: float, checkpoint: Path) -> dict:
    """The gate on SciFact test: the memory is every usable train query."""
    te = embed_beir(scifact_path(), "test", show_progress=False)
    tr = embed_beir(scifact_path(), "train", show_progress=False)
    ds, trq = te.dataset, tr.dataset
    usable = [
        i for i, q in enumerate(trq.query_ids) if any(g > 0 for g in trq.qrels.get(q, {}).values())
    ]
    novelty = (_unit(te.queries) @ _unit(tr.queries[usable]).T).max(1)
    use = novelty >= tau
    qids = list(ds.query_ids)
    subsets = _subsets(qids, ds.qrels, trq.qrels)
    model = load_pretrained(checkpoint).eval()
    per_query = {}
    bs, bi = base_search(te.corpus, te.queries)
    per_query["base"] = evaluate_run(ds.qrels, run_from_results(qids, ds.corpus_ids, bs, bi))
    result = {"tau": tau, "imrnn_share": float(use.mean())}
    for mode in ("rerank", "exhaustive"):
        s, i = imrnn_search(model, te.corpus, te.queries, mode=mode, feedback_k=100)
        if mode == "rerank":
            s_base = np.einsum("qm,qkm->qk", _unit(te.queries), _unit(te.corpus)[i])
            s, i = _rerank(_variant("gate", tau, s, s_base, novelty), i)
        else:
            s, i = np.where(use[:, None], s, bs), np.where(use[:, None], i, bi)
        per_query[mode] = evaluate_run(ds.qrels, run_from_results(qids, ds.corpus_ids, s, i))
        summary = _summary(per_query[mode], subsets)
        summary["significance"] = _significance(
            per_query["base"], per_query[mode], subsets, 10000, 0
        )
        result[mode] = summary
        sig = summary["significance"]
        print(
            f"{mode}: nDCG@10 {summary['nDCG@10']:.4f} seen {summary['seen_doc']['nDCG@10']:.4f} "
            f"unseen {summary['unseen_doc']['nDCG@10']:.4f} "
            f"(p {sig['unseen_doc']['nDCG@10']['p_randomisation']:.3g}) "
            f"Recall@100 {summary['Recall@100']:.4f} MRR@10 {summary['MRR@10']:.4f}"
        )
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    cv = sub.add_parser("cv", help="the 3-fold validation grid and the rule's choice")
    cv.add_argument("--variant", choices=sorted(GRIDS), required=True)
    cv.add_argument("--folds-dir", type=Path, default=ROOT / "runs" / "issue6-folds")
    te = sub.add_parser("test", help="the gate's single look at SciFact test")
    te.add_argument("--tau", type=float, required=True)
    te.add_argument("--checkpoint", type=Path, required=True)
    for s in (cv, te):
        s.add_argument("--out", type=Path, help="write the numbers as JSON here")
    args = p.parse_args(argv)
    # The reference backend: training on it is deterministic (read at each call, not import).
    os.environ.setdefault("IMRNNS_BACKEND", "reference")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    if args.cmd == "cv":
        result = cross_validate(args.variant, args.folds_dir)
    else:
        result = look_at_test(args.tau, args.checkpoint)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
