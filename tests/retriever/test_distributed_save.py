"""DistributedIMRNNIndex.save: one ordinary index directory, written atomically by rank 0.

Two gloo processes build a sharded index (``add_shard``: rank 0 holds 130 rows, rank 1 the
rest), save it, and also try a save that fails on rank 1 (nothing may be written, every rank
raises). The parent checks that ``IMRNNIndex.load`` of the saved directory searches exactly
like a single-process index over the same rows, that ``IMRNNIndex.load(rows=...)`` and
``DistributedIMRNNIndex.load`` at world size 1 read it, and that no temporary is left.
"""

from __future__ import annotations

import os
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import imrnns_kernels as K
from imrnns import IMRNNIndex
from imrnns.distributed import DistributedIMRNNIndex
from tests.helpers import make_data, make_model

WORLD, N, SPLIT, FK, K_ = 2, 317, 130, 20, 10


def _rows(rank: int) -> tuple[np.ndarray, list[str]]:
    corpus, _ = make_data(seed=11)
    lo, hi = (0, SPLIT) if rank == 0 else (SPLIT, N)
    return corpus[lo:hi], [f"d{i}" for i in range(lo, hi)]


def _worker(rank: int, store: str, root: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    out: dict[str, Any] = {}
    try:
        with K.use_backend("cpu"):
            index = DistributedIMRNNIndex(make_model("diag-v02-sw"), feedback_k=FK)
            rows, names = _rows(rank)
            index.add_shard(rows, doc_ids=names)
            _, queries = make_data(seed=11)
            out["search"] = index.search(torch.from_numpy(queries), k=K_, mode="exhaustive")
            out["path"] = str(index.save(Path(root) / "saved"))
            # A save whose target is a file: refused on every rank, nothing written.
            (Path(root) / "a-file").write_text("x")
            try:
                index.save(Path(root) / "a-file")
            except ValueError as exc:
                out["refused"] = str(exc)
    except Exception:
        out["crash"] = traceback.format_exc()
    torch.save(out, os.path.join(root, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("dsave")
    mp.spawn(_worker, args=(str(root / "store"), str(root)), nprocs=WORLD)
    ranks = [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for r in ranks:
        assert "crash" not in r, r["crash"]
    return {"root": root, "ranks": ranks}


def _single() -> IMRNNIndex:
    """The same rows in one process, with the workers' kernels and thread count (the
    per-document cache is bit-identical only then: tests/retriever/test_distributed.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with K.use_backend("cpu"):
            index = IMRNNIndex(make_model("diag-v02-sw"), feedback_k=FK)
            for rank in range(WORLD):
                rows, names = _rows(rank)
                index.add(rows, doc_ids=names)
    finally:
        torch.set_num_threads(threads)
    return index


def test_saved_directory_loads_as_one_index(saved) -> None:
    root = saved["root"]
    assert [r["path"] for r in saved["ranks"]] == [str(root / "saved")] * WORLD
    loaded = IMRNNIndex.load(root / "saved")
    single = _single()
    assert loaded.ntotal == N and loaded.doc_ids == single.doc_ids
    assert torch.equal(loaded.projected_corpus, single.projected_corpus)
    assert torch.equal(loaded.document_cache, single.document_cache)
    np.testing.assert_array_equal(loaded.first_stage_vectors(), single.first_stage_vectors())
    _, queries = make_data(seed=11)
    q = torch.from_numpy(queries)
    with K.use_backend("cpu"):
        for mode in ("rerank", "exhaustive"):
            got, want = loaded.search(q, k=K_, mode=mode), single.search(q, k=K_, mode=mode)
            assert got[1] == want[1]  # named documents: string ids (lists for torch queries)
            torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=0)
        # and the sharded search the ranks ran before saving (the names, as one index)
        s, i = saved["ranks"][0]["search"]
        want_s, want_names = loaded.search(q, k=K_, mode="exhaustive")
    assert i == want_names
    torch.testing.assert_close(s, want_s, atol=1e-6, rtol=0)


def test_saved_directory_loads_by_rows_and_sharded(saved) -> None:
    root = saved["root"] / "saved"
    full = IMRNNIndex.load(root)
    part = IMRNNIndex.load(root, rows=(100, 200))
    assert part.ntotal == 100 and part.doc_ids == full.doc_ids[100:200]
    assert torch.equal(part.projected_corpus, full.projected_corpus[100:200])
    assert torch.equal(part.document_cache, full.document_cache[100:200])
    empty = IMRNNIndex.load(root, rows=(N, N))
    assert empty.ntotal == 0
    with pytest.raises(ValueError, match="rows must be"):
        IMRNNIndex.load(root, rows=(5, N + 1))
    one = DistributedIMRNNIndex.load(root)  # no process group: world size 1
    assert one.ntotal == N and one.local_ntotal == N


def test_failed_save_raises_everywhere_and_leaves_nothing(saved) -> None:
    root = saved["root"]
    for r in saved["ranks"]:
        assert "not a directory" in r["refused"]
    assert (root / "a-file").read_text() == "x"
    assert not [p.name for p in root.iterdir() if p.name.endswith((".tmp", ".old"))]
