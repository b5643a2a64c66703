"""Helpers shared by the test modules: test modules import this module (and
:mod:`tests.restate`, the float64 oracle), never each other.

Functions run in forked or spawned children live at module level so the children can find
them.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from imrnns import IMRNN, IMRNNConfig
from imrnns.checkpoints import save_pretrained
from imrnns.data import BeirDataset
from imrnns.evaluate import EmbeddedSplit
from imrnns.training import TrainConfig, train

# The one tolerance table and the scoring-op inputs, shared with the benchmarks and the GPU
# check.
from imrnns_kernels.testing import (
    DTYPES,
    TOLERANCES,
    ScoringInputs,
    assert_close,
    scoring_inputs,
    unit_rows,
)

__all__ = [
    "DIST_B",
    "DIST_DIM",
    "DIST_MODELS",
    "DIST_N",
    "DTYPES",
    "FAULT_DIM",
    "READY_TIMEOUT",
    "SMALL",
    "TOLERANCES",
    "ScoringInputs",
    "assert_close",
    "check_resume",
    "child_save",
    "child_save_loop",
    "hang",
    "install_save_hook",
    "kill_at",
    "load_weights",
    "make_data",
    "make_model",
    "model_v",
    "randomised",
    "scoring_inputs",
    "synthetic_graded",
    "unit_rows",
    "weights_equal",
]


# --------------------------------------------------------------------------- models
def randomised(config: IMRNNConfig, scale: float = 0.3) -> IMRNN:
    """A model whose every parameter is random: zero biases would hide mistakes."""
    model = IMRNN(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * scale)
        if config.modulation == "affine":
            m = config.working_dim
            # Keep W near the identity so LayerNorm sees a well-conditioned input.
            model.doc_hypernet.hypernet[6].bias[: m * m] += torch.eye(m).flatten()
            model.query_hypernet.hypernet[6].bias[: m * m] += torch.eye(m).flatten()
    return model


def weights_equal(a: IMRNN, b: IMRNN) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------- kill machinery
# Used by tests/retriever/test_faults.py and tests/retriever/test_atomic.py.
FAULT_DIM = 24
READY_TIMEOUT = 30.0


def model_v(version: int) -> IMRNN:
    torch.manual_seed(1000 + version)
    return randomised(IMRNNConfig(input_dim=FAULT_DIM, dim=16))


def hang(ready: Path) -> None:
    ready.write_text("ready")
    time.sleep(600)  # the parent kills us here
    os._exit(3)


def install_save_hook(point: str, target: Path, ready: Path, module: str) -> None:
    """Patch the child so it stops (and signals) at ``point`` of saving ``target``."""
    import imrnns._atomic as atomic

    if point == "writing":
        mod = __import__(module, fromlist=["save_file"])
        real_save = mod.save_file

        def half_written(tensors: Any, filename: str, *a: Any, **kw: Any) -> None:
            real_save(tensors, filename, *a, **kw)
            data_ = Path(filename).read_bytes()
            Path(filename).write_bytes(data_[: len(data_) // 2])
            hang(ready)

        mod.save_file = half_written
        return
    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        src, dst = Path(src), Path(dst)
        if point == "before-swap" and src == target:
            hang(ready)
        real_replace(src, dst)
        if (point == "mid-swap" and src == target) or (point == "after-swap" and dst == target):
            hang(ready)

    atomic.os.replace = replace  # type: ignore[attr-defined]


def child_save(kind: str, point: str, target: Path, ready: Path, thing: Any) -> None:
    # ``thing`` was built by the parent: after fork, the child must not run OpenMP work
    # (libgomp's pool does not survive fork: projecting a corpus here hangs).
    module = "imrnns.index.storage" if kind == "index" else "imrnns._checkpoint_io"
    install_save_hook(point, target, ready, module)
    if kind == "index":
        thing.save(target)
    else:
        save_pretrained(thing, target)
    os._exit(4)  # the hook must have fired


def child_save_loop(kind: str, target: Path, ready: Path, versions: list[Any]) -> None:
    ready.write_text("ready")
    while True:
        for v in versions:
            if kind == "index":
                v.save(target)
            else:
                save_pretrained(v, target)


def kill_at(
    fn: Callable[..., None], args: tuple[Any, ...], ready: Path, delay: float = 0.0
) -> None:
    """Fork ``fn(*args)``, wait for it to create ``ready``, wait ``delay`` s, SIGKILL it."""
    proc = mp.get_context("fork").Process(target=fn, args=args)
    proc.start()
    deadline = time.monotonic() + READY_TIMEOUT
    while not ready.exists():
        assert proc.is_alive(), f"child exited early with code {proc.exitcode}"
        assert time.monotonic() < deadline, "child never reached its kill point"
        time.sleep(0.005)
    time.sleep(delay)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert proc.exitcode == -signal.SIGKILL, proc.exitcode
    ready.unlink()


# --------------------------------------------------------------------------- training
# Used by tests/training/test_train.py and tests/training/test_pseudo_queries.py.
def synthetic_graded(
    seed: int = 0, n_docs: int = 300, dim: int = 24, n_train: int = 300, n_test: int = 60
) -> tuple[EmbeddedSplit, EmbeddedSplit]:
    """A collection with graded qrels (2 documents of grade 2, 3 of grade 1 per query).

    Relevance is cosine in a hidden "true" space; the base encoder sees every embedding with
    half of its dimensions shrunk to 0.3 (plus a little noise), so base cosine underweights
    them. An adapter can learn to undo that, and what it learns carries over to test queries
    whose relevant documents are drawn independently (no memorisation to exploit).
    """
    rng = np.random.default_rng(seed)
    truth = rng.standard_normal((n_docs, dim))
    truth /= np.linalg.norm(truth, axis=1, keepdims=True)
    scale = np.where(np.arange(dim) < dim // 2, 1.0, 0.3)

    def observe(x: np.ndarray) -> np.ndarray:
        y = x * scale + 0.01 * rng.standard_normal(x.shape)
        return (y / np.linalg.norm(y, axis=1, keepdims=True)).astype(np.float32)

    corpus = observe(truth)
    doc_ids = [f"d{i}" for i in range(n_docs)]
    splits = []
    for split, n, prefix in (("train", n_train, "tr"), ("test", n_test, "te")):
        centres = rng.integers(0, n_docs, n)
        qt = truth[centres] + 0.5 * rng.standard_normal((n, dim)) / math.sqrt(dim)
        qt /= np.linalg.norm(qt, axis=1, keepdims=True)
        order = np.argsort(-(qt @ truth.T), axis=1)
        qids = [f"{prefix}{i}" for i in range(n)]
        qrels = {
            q: {**{doc_ids[j]: 2 for j in order[i, :2]}, **{doc_ids[j]: 1 for j in order[i, 2:5]}}
            for i, q in enumerate(qids)
        }
        ds = BeirDataset("synthetic", split, doc_ids, doc_ids, qids, qids, qrels)
        splits.append(EmbeddedSplit(ds, corpus, observe(qt), encoder="synthetic"))
    return splits[0], splits[1]


SMALL = TrainConfig(
    epochs=3, batch_size=16, feedback_k=20, negative_pool=30, num_negatives=8, lr=3e-3,
    patience=0, seed=0, distill_weight=0.5,
)  # fmt: skip


def load_weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def check_resume(data, cfg: TrainConfig, root: Path, kill_at: int, before_resume=None) -> dict:
    """Train ``cfg`` once straight through (``root/full``) and once killed after epoch
    ``kill_at`` and resumed (``root/run``; ``before_resume(run_dir)`` runs in between); assert
    identical ``best`` and ``last`` weights and losses. Returns the resumed run's dict."""
    full = train(data, root / "full", cfg, progress=False)

    class Killed(Exception):
        pass

    def kill(epoch: int, record: dict) -> None:
        if epoch == kill_at:
            raise Killed

    with pytest.raises(Killed):
        train(data, root / "run", cfg, progress=False, callback=kill)
    if before_resume is not None:
        before_resume(root / "run")
    resumed = train(data, root / "run", cfg, progress=False)
    assert resumed["resumed_from_epoch"] == kill_at
    assert resumed["epochs_completed"] == full["epochs_completed"]
    for name in ("best", "last/model"):
        wa, wb = load_weights(root / "full" / name), load_weights(root / "run" / name)
        assert wa.keys() == wb.keys()
        for key in wa:
            assert torch.equal(wa[key], wb[key]), (name, key)
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"]]
    return resumed


# --------------------------------------------------------------------------- distributed
# Used by tests/retriever/test_distributed.py and tests/retriever/test_distributed_save.py.
DIST_N, DIST_DIM, DIST_B = 317, 48, 7
# name -> IMRNNConfig fields; "v01" is the official v0.1 "transform_of_mean" aggregation.
DIST_MODELS: dict[str, dict[str, Any]] = {
    "diag-v02": {"modulation": "diagonal", "aggregation": "mean_of_transforms"},
    "diag-v02-sw": {
        "modulation": "diagonal",
        "aggregation": "mean_of_transforms",
        "feedback_weighting": "score_weighted",
    },
    "diag-v01": {"modulation": "diagonal", "aggregation": "transform_of_mean"},
    "diag-v01-sw": {
        "modulation": "diagonal",
        "aggregation": "transform_of_mean",
        "feedback_weighting": "score_weighted",
    },
    "affine-v02": {"modulation": "affine", "aggregation": "mean_of_transforms"},
    "affine-v02-sw": {
        "modulation": "affine",
        "aggregation": "mean_of_transforms",
        "feedback_weighting": "score_weighted",
    },
    "affine-v01": {"modulation": "affine", "aggregation": "transform_of_mean"},
}


def make_model(name: str) -> IMRNN:
    torch.manual_seed(sorted(DIST_MODELS).index(name) + 100)
    cfg = DIST_MODELS[name]
    m = DIST_DIM if cfg["modulation"] == "diagonal" else 12
    return randomised(IMRNNConfig(input_dim=DIST_DIM, dim=m, **cfg))


def make_data(n: int = DIST_N, b: int = DIST_B, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    corpus = rng.standard_normal((n, DIST_DIM)).astype(np.float32)
    if n > 40:
        # Exact duplicates on the other shard: equal first-stage and IMRNN scores across ranks.
        corpus[n - 17 :] = corpus[:17]
    return corpus, rng.standard_normal((b, DIST_DIM)).astype(np.float32)


def rebuilt_index(index: Any, keep: np.ndarray, ids: Any) -> Any:
    """The index of only rows ``keep`` (in order) of ``index``, from the very rows it stores
    (projected corpus, first-stage vectors, document cache), with ``ids``: what an index built
    from those documents alone holds. Used by the id and filter tests."""
    from imrnns import IMRNNIndex

    slots = torch.from_numpy(keep)
    cache = index.document_cache
    return IMRNNIndex.from_parts(
        index.model,
        index.projected_corpus[slots],
        index.first_stage_vectors()[keep],
        document_cache=None if cache is None else cache[slots],
        ids=ids,
        **index.settings(),
    )
