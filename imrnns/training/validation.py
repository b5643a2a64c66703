"""Validation metrics and the model-selection criterion (``TrainConfig.selection``).

Validation reranks the held-out training queries' feedback sets exactly as inference does
and reports nDCG@10 / Recall@100 / MRR@10 overall and on the seen-doc / unseen-doc subsets.

Tested in tests/training/test_train.py.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from imrnns.evaluate import base_search, imrnn_search
from imrnns.metrics import evaluate_run, mean_metrics, run_from_results
from imrnns.model import IMRNN
from imrnns.training.data import TrainingData

__all__ = ["base_validation", "validate"]


def _metrics_dict(
    data: TrainingData, scores: np.ndarray, ids: np.ndarray
) -> dict[str, float | None]:
    """Overall and per-subset means; None (not NaN: training.json stays valid JSON) for an
    empty subset."""
    vs = data.val
    per_query = evaluate_run(vs.qrels, run_from_results(vs.ids, data.corpus_ids, scores, ids))
    out: dict[str, float | None] = {f"overall_{m}": v for m, v in mean_metrics(per_query).items()}
    for name, qids in data.val_subsets.items():
        for m, v in mean_metrics(per_query, qids).items():
            out[f"{name}_{m}"] = None if math.isnan(v) else v
    return out


def validate(model: IMRNN, data: TrainingData, feedback_k: int) -> dict[str, float | None]:
    """Validation nDCG@10 / Recall@100 / MRR@10 in rerank mode, overall and per subset."""
    with torch.no_grad():
        scores, ids = imrnn_search(
            model, data.val_corpus_np, data.val.emb.numpy(), mode="rerank", feedback_k=feedback_k
        )
    return _metrics_dict(data, scores, ids)


def _selection_value(
    metrics: Mapping[str, float | None],
    selection: str,
    base: Mapping[str, float | None] | None = None,
) -> float:
    overall = float(metrics["overall_nDCG@10"])  # type: ignore[arg-type]
    seen, unseen = metrics["seen_doc_nDCG@10"], metrics["unseen_doc_nDCG@10"]
    if selection == "overall":
        return overall
    if selection == "overall_if_unseen":
        floor = None if base is None else base.get("unseen_doc_nDCG@10")
        if unseen is None or floor is None:
            return overall
        # Qualifying epochs score in [0, 1]; the others below -1, closest to the floor first.
        return overall if unseen >= floor else float(unseen) - float(floor) - 1.0
    if selection == "seen":
        return overall if seen is None else float(seen)
    if selection == "unseen":
        return overall if unseen is None else float(unseen)
    vals = [float(v) for v in (seen, unseen) if v is not None]
    return float(np.mean(vals)) if vals else overall


def base_validation(data: TrainingData) -> dict[str, float | None]:
    """The base encoder's validation metrics (exact cosine search), for reference."""
    scores, ids = base_search(data.val_corpus_np, data.val.emb.numpy())
    return _metrics_dict(data, scores, ids)
