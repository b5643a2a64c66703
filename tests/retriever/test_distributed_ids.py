"""DistributedIMRNNIndex ids: ``search(allow=...)`` and ``remove``.

Two gloo ranks equal one process given the same allow, in both modes, both exchanges and
both first-stage spaces (v0.2 base, v0.1 projected): global ids, names (looked up per shard,
unknown names refused on every rank), masks, sets smaller than k and feedback_k, the empty
set. After removals (tombstones, then enough that a shard compacts) searches equal one
process's index with the same removals; later adds continue the global ids; a save holds
the surviving documents under their global ids.
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

WORLD, FK, K_ = 2, 20, 10
MODELS = ("diag-v02", "diag-v01")
# Removed in two calls: a few (tombstones; duplicates of rows 0, 1, 14 stay, rows 300, 301
# go) then a block that makes rank 0 (rows 0 .. 158) compact.
REMOVALS = ([0, 1, 14, 300, 301, 200], list(range(20, 120)))
MODES = ("rerank", "exhaustive")
EXCHANGES = ("rows", "partial")


def _allows(n: int) -> dict[str, Any]:
    """Named selections of global ids: both shards, one shard, fewer than k, none."""
    rng = np.random.default_rng(4)
    some = sorted(rng.choice(n, size=n // 3, replace=False).tolist())
    return {
        "third": some,
        "rank0-only": list(range(0, 40, 3)),
        "tiny": [5, n - 3, n - 2],  # 3 < k < feedback_k; n - 3: a duplicate of row 14
        "empty": [],
    }


def _names(ids: list[int]) -> list[str]:
    return [f"doc-{i}" for i in ids]


def _single(name: str) -> IMRNNIndex:
    corpus, _ = make_data()
    index = IMRNNIndex(make_model(name), feedback_k=FK)
    index.add(corpus, doc_ids=_names(list(range(len(corpus)))))
    return index


def _worker(rank: int, store: str, root: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    out: dict[str, Any] = {}
    try:
        corpus, queries = make_data()
        q = torch.from_numpy(queries)
        n = len(corpus)
        with K.use_backend("cpu"):
            for name in MODELS:
                for exchange in EXCHANGES:
                    index = DistributedIMRNNIndex(
                        make_model(name), feedback_k=FK, exchange=exchange
                    )
                    named = DistributedIMRNNIndex(
                        make_model(name), feedback_k=FK, exchange=exchange
                    )
                    index.add(corpus)
                    named.add(corpus, doc_ids=_names(list(range(n))))
                    for key, ids in _allows(n).items():
                        for mode in MODES:
                            tag = f"{name}/{exchange}/{key}/{mode}"
                            out[f"ids/{tag}"] = index.search(q, K_, mode, allow=set(ids))
                            mask = np.zeros(n, dtype=bool)
                            mask[ids] = True
                            out[f"mask/{tag}"] = index.search(q, K_, mode, allow=mask)
                            s, i = named.search(q, K_, mode, allow=set(_names(ids)))
                            out[f"names/{tag}"] = (s, named.doc_names(i))
            _removals(out, q, root, rank)
            try:
                named.search(q, K_, allow={"doc-1", "doc-nope"})
            except ValueError as exc:
                out["unknown-name"] = str(exc)
            try:
                index.search(q, K_, allow={1, n + 5})
            except ValueError as exc:
                out["unknown-id"] = str(exc)
            # still usable after the refusals (the ranks stayed in step)
            out["after"] = index.search(q, K_, allow=set(range(50)))
    except Exception:
        out["crash"] = traceback.format_exc()
    torch.save(out, os.path.join(root, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _removals(out: dict[str, Any], q: torch.Tensor, root: str, rank: int) -> None:
    corpus, _ = make_data()
    n = len(corpus)
    for exchange in EXCHANGES:
        index = DistributedIMRNNIndex(make_model("diag-v02"), feedback_k=FK, exchange=exchange)
        named = DistributedIMRNNIndex(make_model("diag-v02"), feedback_k=FK, exchange=exchange)
        index.add(corpus)
        named.add(corpus, doc_ids=_names(list(range(n))))
        for step, gone in enumerate(REMOVALS):
            assert index.remove(gone) == len(gone) and named.remove(_names(gone)) == len(gone)
            allow = set(range(100, 200)) - _removed(step)
            for mode in MODES:
                out[f"rm{step}/{exchange}/{mode}"] = index.search(q, K_, mode)
                s, i = named.search(q, K_, mode)
                out[f"rm{step}-names/{exchange}/{mode}"] = (s, named.doc_names(i))
                out[f"rm{step}-allow/{exchange}/{mode}"] = index.search(q, K_, mode, allow=allow)
        out[f"local-rows/{exchange}"] = index.local.projected_corpus.shape[0]
        try:
            index.remove([2, 0])
        except ValueError as exc:
            out["remove-again"] = str(exc)
        out[f"added/{exchange}"] = index.add(corpus[:4]).tolist()
        out[f"after-add/{exchange}"] = index.search(q, K_, "exhaustive")
        if exchange == "rows":
            index.save(Path(root) / "saved")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("dids")
    mp.spawn(_worker, args=(str(root / "store"), str(root)), nprocs=WORLD)
    ranks = [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for r in ranks:
        assert "crash" not in r, r["crash"]
    return {"ranks": ranks, "root": root}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("exchange", EXCHANGES)
@pytest.mark.parametrize("key", ["third", "rank0-only", "tiny", "empty"])
@pytest.mark.parametrize("mode", MODES)
def test_allow_on_two_ranks_equals_one_process(runs, name, exchange, key, mode) -> None:
    corpus, queries = make_data()
    ids = _allows(len(corpus))[key]
    single = _single(name)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with K.use_backend("cpu"):
            want_s, want = single.search(torch.from_numpy(queries), K_, mode, allow=_names(ids))
    finally:
        torch.set_num_threads(threads)
    want_ids = [[int(d[4:]) if d is not None else -1 for d in row] for row in want]
    tag = f"{name}/{exchange}/{key}/{mode}"
    for r in runs["ranks"]:
        for kind in ("ids", "mask"):
            s, i = r[f"{kind}/{tag}"]
            assert i.tolist() == want_ids
            torch.testing.assert_close(s, want_s, atol=1e-5, rtol=0)
        s, names = r[f"names/{tag}"]
        assert names == want
        torch.testing.assert_close(s, want_s, atol=1e-5, rtol=0)
    if key == "empty":
        assert (torch.tensor(want_ids) == -1).all() and torch.isneginf(want_s).all()


def test_unknown_allowed_ids_fail_on_every_rank(runs) -> None:
    for r in runs["ranks"]:
        assert r["unknown-name"] == "allow: ids not in the index: 'doc-nope'"
        assert "allow: ids not in the index: 322" in r["unknown-id"]
    _, i0 = runs["ranks"][0]["after"]
    _, i1 = runs["ranks"][1]["after"]
    assert torch.equal(i0, i1) and bool((i0 < 50).all())


def test_from_index_and_load_refuse_what_shards_cannot_hold(tmp_path: Path) -> None:
    corpus, _ = make_data()
    index = IMRNNIndex(make_model("diag-v02"), feedback_k=FK)
    index.add(corpus)
    index.remove([3])
    with pytest.raises(ValueError, match="numbers documents by position"):
        DistributedIMRNNIndex.from_index(index)
    index.save(tmp_path / "ix")
    with pytest.raises(ValueError, match="the sharded index numbers documents by position"):
        DistributedIMRNNIndex.load(tmp_path / "ix")


def _removed(step: int) -> set[int]:
    """The global ids removed by the first ``step + 1`` calls."""
    return {i for gone in REMOVALS[: step + 1] for i in gone}


def _single_after(step: int, exchange: str) -> IMRNNIndex:
    corpus, _ = make_data()
    single = IMRNNIndex(make_model("diag-v02"), feedback_k=FK)
    single.add(corpus)
    for gone in REMOVALS[: step + 1]:
        single.remove(gone)
    return single


@pytest.mark.parametrize("exchange", EXCHANGES)
@pytest.mark.parametrize("step", [0, 1])
@pytest.mark.parametrize("mode", MODES)
def test_removals_on_two_ranks_equal_one_process(runs, exchange, step, mode) -> None:
    _, queries = make_data()
    q = torch.from_numpy(queries)
    single = _single_after(step, exchange)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with K.use_backend("cpu"):
            want_s, want = single.search(q, K_, mode)
            allow_s, allow = single.search(q, K_, mode, allow=set(range(100, 200)) - _removed(step))
    finally:
        torch.set_num_threads(threads)
    for r in runs["ranks"]:
        s, i = r[f"rm{step}/{exchange}/{mode}"]
        assert torch.equal(i, want)
        torch.testing.assert_close(s, want_s, atol=1e-5, rtol=0)
        s, names = r[f"rm{step}-names/{exchange}/{mode}"]
        assert names == [[f"doc-{int(d)}" if d >= 0 else None for d in row] for row in want]
        s, i = r[f"rm{step}-allow/{exchange}/{mode}"]
        assert torch.equal(i, allow)
        torch.testing.assert_close(s, allow_s, atol=1e-5, rtol=0)


def test_removal_compacts_keeps_ids_and_saves_them(runs, tmp_path: Path) -> None:
    corpus, queries = make_data()
    n = len(corpus)
    r0, r1 = runs["ranks"]
    # rank 0 held rows 0 .. 158 and lost 103 of them: it compacted; rank 1 kept tombstones
    assert r0["local-rows/rows"] == 159 - 103 and r1["local-rows/rows"] == 158
    for r in runs["ranks"]:
        assert r["remove-again"] == "remove(): ids not in the index: 0"
        assert r["added/rows"] == list(range(n, n + 4))
    # a save holds the surviving documents under their global ids
    saved = IMRNNIndex.load(runs["root"] / "saved")
    gone = _removed(1)
    assert saved.ids.tolist() == [i for i in range(n) if i not in gone] + list(range(n, n + 4))
    single = _single_after(1, "rows")
    single.add(corpus[:4])
    with K.use_backend("cpu"):
        want_s, want = single.search(torch.from_numpy(queries), K_, "exhaustive")
    s, i = r0["after-add/rows"]
    assert torch.equal(i, want)
    torch.testing.assert_close(s, want_s, atol=1e-5, rtol=0)
