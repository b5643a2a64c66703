"""A failure on one rank ends every rank promptly, naming the failed rank.

Two gloo processes (one ``mp.spawn`` for the whole module) meet a failure on one rank in each
scenario below and record, per rank, what was raised and how long it took. Before one error
path served every collective, only ValueError/TypeError/FileNotFoundError were passed between
ranks: in each scenario here the healthy rank waited in the next collective until the process
group's timeout, and ranks that had resolved different versions of an index directory loaded
a mix of both silently.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import imrnns.index.distributed as distributed_module
import imrnns.index.storage as storage
import imrnns_kernels as K
from imrnns import IMRNNIndex
from imrnns.distributed import DistributedIMRNNIndex
from tests.helpers import make_data, make_model

WORLD = 2
# Each failure must end both ranks well within this; the process group's own timeout is
# longer, so a rank left waiting for it (the old behaviour) fails the test.
PROMPT_S = 15.0
GROUP_TIMEOUT_S = 25.0
INDEX_TIMEOUT_S = 3.0  # the timeout scenario's bound on each wait
SLEEP_S = 6.0  # how long rank 1 hangs there
SPAWN_DEADLINE_S = 240.0
MODEL = "diag-v02"
N, FK, K_ = 120, 10, 5
SCENARIOS = (
    "permission-on-load",
    "out-of-memory-in-search",
    "search-after-a-failure",
    "write-index-fails",
    "manifest-mismatch",
    "add-fails-on-one-rank",
    "use-after-failed-add",
    "rank-hangs",
    "use-after-timeout",
)


# --------------------------------------------------------------------------- the workers
def _attempt(fn: Callable[[], Any]) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        value = fn()
    except Exception as exc:
        return {
            "type": type(exc).__name__,
            "message": str(exc),
            "failed_rank": getattr(exc, "failed_rank", None),
            "seconds": time.perf_counter() - start,
        }
    return {"type": None, "value": value, "seconds": time.perf_counter() - start}


def _ids(index: DistributedIMRNNIndex, mode: str = "rerank", **kwargs: Any) -> list[list[int]]:
    _, queries = make_data(n=N, seed=1)
    return index.search(torch.from_numpy(queries), k=K_, mode=mode, **kwargs)[1].tolist()


class Injected(Exception):
    """A failure with no built-in base: the other ranks raise it as RuntimeError."""


# Each rank-local step of a search, per exchange, and the modes that reach it: a failure
# there on rank 1 must reach rank 0 through the next collective's flags (or the step's own
# exchange when none follows).
INJECTION_POINTS = {
    "rows": {
        "_merge_first_stage": ("rerank",),
        "_owned_rows": ("rerank", "exhaustive"),
        "_local_topk": ("exhaustive",),
        "_best": ("rerank",),
    },
    "partial": {
        "_partial_sum": ("rerank", "exhaustive"),
        "_partial_owned_scores": ("rerank",),
        "_local_topk": ("exhaustive",),
        "_best": ("rerank",),
    },
}
INJECTIONS = [
    f"{exchange}/{point}/{mode}"
    for exchange, points in INJECTION_POINTS.items()
    for point, modes in points.items()
    for mode in modes
]


def _scenarios(rank: int, root: Path, record: Callable[[str, dict[str, Any]], None]) -> None:
    v1 = root / "v1"

    # 1. PermissionError on rank 1 only, while it reads its block of a saved index.
    original_load = IMRNNIndex.__dict__["load"]
    if rank == 1:

        def denied(cls: type, directory: Path, **kwargs: Any) -> Any:
            raise PermissionError(13, "Permission denied", str(directory / "corpus.safetensors"))

        IMRNNIndex.load = classmethod(denied)
    record("permission-on-load", _attempt(lambda: DistributedIMRNNIndex.load(v1) and None))
    IMRNNIndex.load = original_load

    # 2. Out of memory in rank 1's first stage; the index stays usable afterwards.
    index = DistributedIMRNNIndex.load(v1)
    if rank == 1:

        def out_of_memory(*args: Any, **kwargs: Any) -> Any:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

        index.local.first_stage_topk = out_of_memory
    record("out-of-memory-in-search", _attempt(lambda: _ids(index)))
    if rank == 1:
        del index.local.first_stage_topk
    record("search-after-a-failure", _attempt(lambda: _ids(index)))

    # 2b. A failure at each step of a search on rank 1 only; the index searches afterwards.
    for exchange, points in INJECTION_POINTS.items():
        injected = DistributedIMRNNIndex.load(v1, exchange=exchange)
        for point, modes in points.items():
            for mode in modes:
                key = f"{exchange}/{point}/{mode}"
                if rank == 1:

                    def fail(*args: Any, _point: str = point, **kwargs: Any) -> Any:
                        raise Injected(f"injected at {_point}")

                    setattr(injected, point, fail)  # shadows the method on this instance
                record(f"inject/{key}", _attempt(lambda: _ids(injected, mode)))  # noqa: B023
                if rank == 1:
                    delattr(injected, point)
                record(f"after/{key}", _attempt(lambda: _ids(injected, mode)))  # noqa: B023
        # a real one: a workspace budget too small for rank 1's shard only
        budget = 1 if rank == 1 else None
        record(
            f"workspace/{exchange}",
            _attempt(lambda: _ids(injected, "exhaustive", workspace_bytes=budget)),  # noqa: B023
        )

    # 3. A full disk in faiss's write_index on rank 0, the rank that writes.
    write_index = storage.first_stage.write
    if rank == 0:

        def full_disk(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError(
                "Error in faiss::write_index: fwrite failed: No space left on device"
            )

        storage.first_stage.write = full_disk
    record("write-index-fails", _attempt(lambda: index.save(root / "out") and None))
    storage.first_stage.write = write_index

    # 4. Rank 1 resolves another version of the directory (as if caught mid-swap).
    resolve = distributed_module.resolve_directory
    if rank == 1:
        distributed_module.resolve_directory = lambda _path: root / "v2"
    record("manifest-mismatch", _attempt(lambda: DistributedIMRNNIndex.load(v1) and None))
    distributed_module.resolve_directory = resolve

    # 5. A local add that fails on rank 1 after rank 0 added its block: shards now differ.
    fresh = DistributedIMRNNIndex(make_model(MODEL), feedback_k=FK)
    if rank == 1:

        def add_fails(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("faiss add failed: std::bad_alloc")

        fresh.local.add = add_fails
    corpus, _ = make_data(n=N, seed=1)
    record("add-fails-on-one-rank", _attempt(lambda: fresh.add(corpus) and None))
    record("use-after-failed-add", _attempt(lambda: _ids(fresh)))

    # 6. Rank 1 hangs longer than the index's timeout (last: the group is out of step after).
    slow = DistributedIMRNNIndex.load(v1, timeout=INDEX_TIMEOUT_S)
    if rank == 1:
        first_stage = slow.local.first_stage_topk

        def hang(*args: Any, **kwargs: Any) -> Any:
            time.sleep(SLEEP_S)
            return first_stage(*args, **kwargs)

        slow.local.first_stage_topk = hang
    record("rank-hangs", _attempt(lambda: _ids(slow)))
    record("use-after-timeout", _attempt(lambda: _ids(slow)))


def _worker(rank: int, store: str, root: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=GROUP_TIMEOUT_S),
    )
    results: dict[str, Any] = {}
    out = Path(root) / f"rank{rank}.json"

    def record(name: str, result: dict[str, Any]) -> None:
        results[name] = result
        out.write_text(json.dumps(results))  # kept even if a later scenario hangs

    try:
        with K.use_backend("cpu"):
            _scenarios(rank, Path(root), record)
    except Exception:
        results["crash"] = traceback.format_exc()
        out.write_text(json.dumps(results))
    (Path(root) / f"done{rank}").touch()
    # Wait for the other rank before exiting (a rank that exits early would turn the other's
    # timeout into a lost connection), then skip the process group's teardown: after the
    # timeout scenario a collective is still pending and would hold it until the group timeout.
    deadline = time.monotonic() + SPAWN_DEADLINE_S
    while not all((Path(root) / f"done{r}").exists() for r in range(WORLD)):
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    os._exit(0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[dict[str, Any]]:
    root = tmp_path_factory.mktemp("dfail")
    for version, seed in (("v1", 1), ("v2", 2)):
        index = IMRNNIndex(make_model(MODEL), feedback_k=FK)
        index.add(make_data(n=N, seed=seed)[0])
        index.save(root / version)
    context = mp.spawn(_worker, args=(str(root / "store"), str(root)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + SPAWN_DEADLINE_S
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"the ranks did not finish within {SPAWN_DEADLINE_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    ranks = [json.loads((root / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for r in ranks:
        assert "crash" not in r, r["crash"]
    return [{**r, "root": str(root)} for r in ranks]


def _failures(runs: list[dict[str, Any]], name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    r0, r1 = (r[name] for r in runs)
    for rank, got in enumerate((r0, r1)):
        assert got["type"] is not None, f"{name}: rank {rank} did not raise: {got}"
        assert got["seconds"] < PROMPT_S, f"{name}: rank {rank} took {got['seconds']:.1f} s"
    return r0, r1


# --------------------------------------------------------------------------- the checks
def test_a_permission_error_on_rank_1_ends_both_ranks(runs):
    r0, r1 = _failures(runs, "permission-on-load")
    assert r1["type"] == "PermissionError" and "Permission denied" in r1["message"]
    assert r0["type"] == "PermissionError"
    assert r0["message"].startswith("rank 1: PermissionError: [Errno 13] Permission denied")
    assert r0["failed_rank"] == r1["failed_rank"] == 1


def test_out_of_memory_on_one_rank_ends_both_and_the_index_stays_usable(runs):
    r0, r1 = _failures(runs, "out-of-memory-in-search")
    assert r1["type"] == "OutOfMemoryError"
    assert r0["type"] == "RuntimeError"  # the nearest built-in base
    assert r0["message"].startswith("rank 1: torch.OutOfMemoryError: CUDA out of memory")
    after = [r["search-after-a-failure"] for r in runs]
    assert after[0]["type"] is None and after[1]["type"] is None, after
    assert after[0]["value"] == after[1]["value"]


@pytest.mark.parametrize("key", INJECTIONS)
def test_a_failure_at_any_step_of_a_search_ends_both_ranks(runs, key):
    r0, r1 = _failures(runs, f"inject/{key}")
    point = key.split("/")[1]
    assert r1["type"] == "Injected" and r1["message"] == f"injected at {point}"
    assert r0["type"] == "RuntimeError", r0
    assert (
        r0["message"].startswith("rank 1: ") and f"Injected: injected at {point}" in r0["message"]
    )
    after = [r[f"after/{key}"] for r in runs]
    assert after[0]["type"] is None and after[1]["type"] is None, after
    assert after[0]["value"] == after[1]["value"]


@pytest.mark.parametrize("exchange", INJECTION_POINTS)
def test_a_workspace_too_small_on_one_rank_fails_on_both(runs, exchange):
    r0, r1 = _failures(runs, f"workspace/{exchange}")
    assert r1["type"] == r0["type"] == "ValueError"
    assert "is too small for this search" in r1["message"]
    assert r0["message"].startswith("rank 1: ValueError: workspace_bytes=1 is too small")


def test_a_full_disk_in_write_index_on_rank_0_ends_both_and_writes_nothing(runs):
    r0, r1 = _failures(runs, "write-index-fails")
    assert r0["type"] == "RuntimeError" and "No space left on device" in r0["message"]
    assert r1["type"] == "RuntimeError"
    assert r1["message"].startswith("rank 0: RuntimeError: Error in faiss::write_index")
    assert "save() of" in r1["message"]
    root = Path(runs[0]["root"])
    assert not [p.name for p in root.iterdir() if "out" in p.name], "a save left files behind"


def test_ranks_that_read_different_versions_of_an_index_refuse_to_load(runs):
    r0, r1 = _failures(runs, "manifest-mismatch")
    for got in (r0, r1):
        assert got["type"] == "IndexError_", got
        assert "ranks [1] read another version of the index than rank 0" in got["message"]


def test_a_failed_add_on_one_rank_ends_both_and_retires_the_index(runs):
    r0, r1 = _failures(runs, "add-fails-on-one-rank")
    assert r1["type"] == "RuntimeError" and r1["message"] == "faiss add failed: std::bad_alloc"
    assert r0["message"].startswith("rank 1: RuntimeError: faiss add failed")
    for got in _failures(runs, "use-after-failed-add"):
        assert got["type"] == "RuntimeError"
        assert "can no longer be used" in got["message"] and "add() failed" in got["message"]


def test_a_hung_rank_times_out_on_every_rank(runs):
    r0, r1 = (r["rank-hangs"] for r in runs)
    assert r0["type"] == r1["type"] == "TimeoutError", (r0, r1)
    assert "not every rank of the group joined within 3 s" in r0["message"]
    # rank 0 waits one timeout; rank 1 hangs, then finds rank 0 gone from the next collective
    assert INDEX_TIMEOUT_S <= r0["seconds"] < INDEX_TIMEOUT_S + 5
    assert r1["seconds"] < SLEEP_S + INDEX_TIMEOUT_S + 10
    for got in (r["use-after-timeout"] for r in runs):
        assert got["type"] == "RuntimeError" and "timed out" in got["message"], got
        assert got["seconds"] < 1.0


# --------------------------------------------------------------------------- in-process units
def test_a_directory_replaced_while_a_rank_reads_it_is_refused(tmp_path, monkeypatch):
    # One process (world size 1): the manifest changes between the manifest read and the
    # block read, as when a save swaps the directory mid-load.
    for version, seed in (("v1", 1), ("v2", 2)):
        index = IMRNNIndex(make_model(MODEL), feedback_k=FK)
        index.add(make_data(n=N, seed=seed)[0])
        index.save(tmp_path / version)
    load_rows = IMRNNIndex.load.__func__

    def swap_then_load(cls: type, directory: Path, **kwargs: Any) -> IMRNNIndex:
        (tmp_path / "v1" / "manifest.json").write_bytes(
            (tmp_path / "v2" / "manifest.json").read_bytes()
        )
        return load_rows(cls, tmp_path / "v2", **kwargs)

    monkeypatch.setattr(IMRNNIndex, "load", classmethod(swap_then_load))
    with pytest.raises(ValueError, match=r"v1: the index was replaced while rank 0 read it"):
        DistributedIMRNNIndex.load(tmp_path / "v1")


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), float("nan"), "300", True])
def test_timeout_is_checked(bad):
    with pytest.raises((ValueError, TypeError), match="timeout must be"):
        DistributedIMRNNIndex(make_model(MODEL), timeout=bad)


def test_run_on_every_rank_without_a_group_runs_the_step():
    assert distributed_module.run_on_every_rank("x", lambda: 3) == 3
    with pytest.raises(PermissionError):
        distributed_module.run_on_every_rank("x", _raise_permission)


def _raise_permission() -> None:
    raise PermissionError("no")
