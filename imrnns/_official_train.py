"""Train the official ``imrnns`` 0.2.3 adapter with its own trainer, on our embeddings.

For side-by-side numbers: the official package's trainer (``training.train_model``:
improvement-margin objective, Adam, 63 mined negatives, selection on the mean of its own
validation NDCG@10 / Recall@10 / MRR@10, patience 7) runs unchanged in a child process whose
``imrnns`` is the official folder (:data:`imrnns._official.SUBPROCESS_PRELUDE`). Only the
inputs are ours:

- Embeddings: the same frozen-encoder embeddings our trainer uses (passed as ``.npy``), so
  the comparison is between trainers, not encoders. The official cache would encode
  ``title + "\\n" + text`` with sentence-transformers; BEIR (and we) encode
  ``title + " " + text``.
- ``sentence_transformers`` is not installed here; the child registers a stub module of that
  name so that the official ``data.py``/``caching.py`` import unchanged (their encoders are
  never called: embeddings are given).
- Splits come from the official ``beir_data.load_beir_splits`` (85/15 of ``train``, seed 42,
  official ``test`` intact) on a plain-text copy of the BEIR folder; the child checks they
  equal ours.

The child writes the official ``.pt`` checkpoint (``imrnns-final-v1``), which
:meth:`imrnns.IMRNN.from_pretrained` loads with v0.2 semantics for our evaluation.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np

from imrnns._official import SUBPROCESS_PRELUDE, install_official
from imrnns.evaluate import EmbeddedSplit

CHILD = SUBPROCESS_PRELUDE + textwrap.dedent(
    """
    import json, time, types
    from pathlib import Path
    import numpy as np
    import torch

    # The official data.py / caching.py import SentenceTransformer at module level; the
    # trainer never calls it here (embeddings are given).
    _st = types.ModuleType("sentence_transformers")
    class SentenceTransformer:  # noqa: D401
        def __init__(self, *a, **k):
            raise RuntimeError("encoding is not available in this driver")
    _st.SentenceTransformer = SentenceTransformer
    sys.modules["sentence_transformers"] = _st

    from imrnns.beir_data import load_beir_splits
    from imrnns.caching import mine_dense_negatives
    from imrnns.checkpoints import save_checkpoint
    from imrnns.data import CachedSplit, ContrastiveCachedDataset
    from imrnns.evaluation import evaluate_model, evaluate_model_with_baseline
    from imrnns.model import IMRNN, ModelConfig
    from imrnns.training import TrainingConfig, initialize_projector, set_seed, train_model

    work = Path(sys.argv[1])
    args = json.loads((work / "args.json").read_text())
    corpus = np.load(work / "corpus.npy")
    docs = {d: torch.from_numpy(corpus[i]) for i, d in enumerate(args["corpus_ids"])}
    queries = np.load(work / "queries.npy")
    qemb = {q: torch.from_numpy(queries[i]) for i, q in enumerate(args["query_ids"])}
    test_q = np.load(work / "test_queries.npy") if args["test_query_ids"] else None
    test_emb = {q: torch.from_numpy(test_q[i]) for i, q in enumerate(args["test_query_ids"])}

    seed = args["seed"]
    splits = load_beir_splits(args["name"], datasets_dir=work / "beir", seed=seed)
    if sorted(splits["validation"].queries) != sorted(args["expected_val_ids"]):
        raise SystemExit("the official validation split differs from ours")

    def cached(name, emb):
        split = splits[name]
        negatives = mine_dense_negatives(
            emb, docs, split.qrels, num_negatives=args["num_negatives"],
            top_k=args["negative_pool"], device="cpu",
        )
        return CachedSplit(split=split, document_embeddings=docs,
                           query_embeddings={q: emb[q] for q in split.queries if q in emb},
                           negatives=negatives)

    train_split, val_split = cached("train", qemb), cached("validation", qemb)
    set_seed(seed)
    model = IMRNN(ModelConfig(input_dim=corpus.shape[1]))
    initialize_projector(model)
    cfg = TrainingConfig(seed=seed, **args["training"])
    k = 10
    t0 = time.perf_counter()
    metrics = train_model(
        model=model,
        train_dataset=ContrastiveCachedDataset(train_split, cfg.num_negatives),
        val_dataset=ContrastiveCachedDataset(val_split, cfg.num_negatives),
        config=cfg,
        device="cpu",
        validation_metric_fn=lambda m: sum(evaluate_model(
            model=m, cached_split=val_split, device="cpu", feedback_k=100, ranking_k=k,
            k_values=[k]).values()) / 3.0,
        validation_metric_name=f"mean(NDCG@{k},Recall@{k},MRR@{k})",
    )
    seconds = time.perf_counter() - t0
    out = {"training": metrics, "train_seconds": seconds}
    if args["test_query_ids"]:
        test_split = cached("test", test_emb)
        adapted, base = evaluate_model_with_baseline(
            model=model, cached_split=test_split, device="cpu", feedback_k=100, ranking_k=k,
            k_values=[k])
        out["official_test_evaluation"] = {"imrnn": adapted, "base": base}
    save_checkpoint(work / "official.pt", model, {"encoder": args["encoder"],
                                                  "dataset": args["name"]})
    (work / "result.json").write_text(json.dumps(out, default=float))
    """
)


def _write_beir_copy(root: Path, train: EmbeddedSplit, test: EmbeddedSplit | None) -> None:
    """Plain-text BEIR files the official loader reads (ids matter; texts are not used)."""
    root.mkdir(parents=True)
    ds = train.dataset
    with open(root / "corpus.jsonl", "w", encoding="utf-8") as fh:
        for d, t in zip(ds.corpus_ids, ds.corpus_texts, strict=True):
            fh.write(json.dumps({"_id": d, "title": "", "text": t}) + "\n")
    queries = dict(zip(ds.query_ids, ds.query_texts, strict=True))
    if test is not None:
        queries.update(zip(test.dataset.query_ids, test.dataset.query_texts, strict=True))
    with open(root / "queries.jsonl", "w", encoding="utf-8") as fh:
        for q, t in queries.items():
            fh.write(json.dumps({"_id": q, "text": t}) + "\n")
    (root / "qrels").mkdir()
    splits = [("train", ds.qrels)] + ([("test", test.dataset.qrels)] if test is not None else [])
    for name, qrels in splits:
        with open(root / "qrels" / f"{name}.tsv", "w", encoding="utf-8") as fh:
            fh.write("query-id\tcorpus-id\tscore\n")
            for q, judged in qrels.items():
                for d, g in judged.items():
                    fh.write(f"{q}\t{d}\t{g}\n")


def train_official(
    train: EmbeddedSplit,
    out_path: str | Path,
    *,
    test: EmbeddedSplit | None = None,
    seed: int = 42,
    expected_val_ids: list[str] | None = None,
    training: dict[str, Any] | None = None,
    num_negatives: int = 63,
    negative_pool: int = 100,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """Train the official 0.2.3 adapter on ``train`` with its own trainer; save the ``.pt``.

    Args:
        train: the embedded training split (validation is carved from it by the official
            85/15 partition with ``seed``).
        out_path: where to copy the official checkpoint (``.pt``).
        test: optionally the embedded test split, for the official evaluation's own numbers.
        seed: the official seed (42 by default, as its CLI).
        expected_val_ids: our validation query ids; the child fails if the official split
            differs.
        training: overrides of the official ``TrainingConfig`` (defaults: batch 32, 30
            epochs, lr 1e-4, weight decay 1e-5, patience 7, improvement margin 0.05).
        num_negatives, negative_pool: the official negative mining (63 of the top 100).

    Returns:
        ``{"checkpoint", "training" (the official history), "train_seconds",
        "official_test_evaluation" (its own metrics, when ``test`` is given),
        "wall_seconds"}``.
    """
    official = install_official()
    out_path = Path(out_path)
    with tempfile.TemporaryDirectory(prefix="imrnns-official-") as tmp:
        work = Path(tmp)
        name = train.dataset.name
        _write_beir_copy(work / "beir" / name, train, test)
        np.save(work / "corpus.npy", np.ascontiguousarray(train.corpus, dtype=np.float32))
        np.save(work / "queries.npy", np.ascontiguousarray(train.queries, dtype=np.float32))
        if test is not None:
            np.save(work / "test_queries.npy", np.ascontiguousarray(test.queries, np.float32))
        args = {
            "name": name,
            "seed": seed,
            "encoder": train.encoder or "unknown",
            "corpus_ids": train.dataset.corpus_ids,
            "query_ids": train.dataset.query_ids,
            "test_query_ids": [] if test is None else test.dataset.query_ids,
            "expected_val_ids": expected_val_ids
            if expected_val_ids is not None
            else _official_val_ids(train, seed),
            "training": training or {},
            "num_negatives": num_negatives,
            "negative_pool": negative_pool,
        }
        (work / "args.json").write_text(json.dumps(args))
        env = {**os.environ, "IMRNNS_OFFICIAL_DIR": str(official)}
        env.pop("PYTHONPATH", None)
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, str(work)],
            env=env, cwd=work, capture_output=True, text=True, check=False, timeout=timeout_s,
        )  # fmt: skip
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"official trainer failed:\n{proc.stderr[-4000:]}")
        result = json.loads((work / "result.json").read_text())
        out_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(work / "official.pt"), out_path)
    result["checkpoint"] = str(out_path)
    result["wall_seconds"] = wall
    return result


def _official_val_ids(train: EmbeddedSplit, seed: int) -> list[str]:
    from imrnns.training.data import split_validation

    return split_validation(train.dataset.query_ids, 0.15, seed)[1]
