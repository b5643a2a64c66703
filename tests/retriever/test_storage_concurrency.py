"""Saves and loads of one directory at once: one complete result, never a mix, no debris.

Issue 17: two processes saving to the same target at once must both succeed and leave one
complete version and nothing beside it; a process loading (and searching) an index while
another saves new versions over it must get one whole version each time, never files of two
(``imrnns._atomic.read_directory`` pins the directory and reads again after a swap).

The writers are forked children that only write (no OpenMP work after fork); each test is
bounded by its own clock (a few seconds) and by a join timeout.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from imrnns import IMRNN, IMRNNConfig, IMRNNIndex
from imrnns.checkpoints import load_pretrained, save_pretrained
from tests.helpers import randomised, weights_equal

DIM, N = 16, 60
SECONDS = 2.0  # how long each writer keeps saving
JOIN_TIMEOUT = 30.0


def _model(version: int) -> IMRNN:
    torch.manual_seed(100 + version)
    return randomised(IMRNNConfig(input_dim=DIM, dim=8))


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return (
        rng.standard_normal((N, DIM)).astype(np.float32),
        rng.standard_normal((4, DIM)).astype(np.float32),
    )


def _index(version: int) -> IMRNNIndex:
    corpus, _ = _data()
    index = IMRNNIndex(_model(version), feedback_k=8)
    index.add(corpus[: N - 10 * version])  # versions differ in size: a mix cannot hide
    return index


def _fingerprint(index: IMRNNIndex) -> tuple[int, np.ndarray, np.ndarray]:
    _, queries = _data()
    scores, ids = index.search(queries, 5, mode="exhaustive")
    return index.ntotal, scores, ids


def _same(a: Any, b: Any) -> bool:
    return a[0] == b[0] and np.array_equal(a[1], b[1]) and np.array_equal(a[2], b[2])


def _is(loaded: IMRNNIndex, index: IMRNNIndex) -> bool:
    """Every piece of ``loaded`` is ``index``'s (cheap: no search)."""
    return (
        loaded.ntotal == index.ntotal
        and loaded._faiss.ntotal == index.ntotal
        and torch.equal(loaded.projected_corpus, index.projected_corpus)
        and torch.equal(loaded.document_cache, index.document_cache)
        and weights_equal(loaded.model, index.model)
    )


@pytest.fixture(scope="module")
def versions() -> dict[str, Any]:
    indexes = {v: _index(v) for v in (1, 2)}
    return {
        "index": indexes,
        "fp": {v: _fingerprint(i) for v, i in indexes.items()},
        "model": {v: _model(v) for v in (1, 2)},
    }


def _save_loop(
    kind: str, things: list[Any], target: Path, start: Path, seconds: float, out: Path
) -> None:
    """Child: wait for ``start``, then save ``things`` in turn to ``target`` for ``seconds``;
    write [saves made, first error] to the JSON file ``out``; exit 0 only if every save
    succeeded."""
    while not start.exists():
        time.sleep(0.001)
    count, error = 0, None
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            thing = things[count % len(things)]
            if kind == "index":
                thing.save(target)
            else:
                save_pretrained(thing, target)
            count += 1
    except BaseException as exc:  # reported to the parent
        error = f"{type(exc).__name__}: {exc}"
    out.write_text(json.dumps([count, error]))
    os._exit(0 if error is None else 1)


def _start_writers(
    kind: str, writers: list[list[Any]], target: Path, start: Path
) -> tuple[list[Any], Any]:
    """One forked writer per entry of ``writers`` (the versions it saves in turn)."""
    ctx = mp.get_context("fork")
    outs = [start.parent / f"writer-{i}.json" for i in range(len(writers))]
    procs = [
        ctx.Process(target=_save_loop, args=(kind, things, target, start, SECONDS, out))
        for things, out in zip(writers, outs, strict=True)
    ]
    for p in procs:
        p.start()
    return procs, outs


def _join(procs: list[Any], outs: list[Path]) -> list[tuple[int, str | None]]:
    for p in procs:
        p.join(JOIN_TIMEOUT)
        if p.is_alive():
            p.kill()
            pytest.fail("a writer did not finish")
    results = [tuple(json.loads(out.read_text())) for out in outs]
    for out in outs:
        out.unlink()
    return results


def _debris(root: Path, name: str) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(f".{name}."))


@pytest.mark.parametrize("kind", ["index", "adapter"])
def test_two_processes_saving_at_once_leave_one_complete_result(
    tmp_path: Path, versions: dict[str, Any], kind: str
) -> None:
    # Regression: a save that found the name taken again (or gone) failed with an OSError.
    name = "idx" if kind == "index" else "ck"
    target, start = tmp_path / name, tmp_path / "start"
    things = versions["index" if kind == "index" else "model"]
    procs, outs = _start_writers(kind, [[things[1]], [things[2]]], target, start)
    start.touch()
    results = _join(procs, outs)
    assert [error for _, error in results] == [None, None], results
    assert all(count > 0 for count, _ in results), results
    if kind == "index":
        got = _fingerprint(IMRNNIndex.load(target))
        assert any(_same(got, versions["fp"][v]) for v in (1, 2))
    else:
        loaded = load_pretrained(target)
        assert any(weights_equal(loaded, versions["model"][v]) for v in (1, 2))
    assert _debris(tmp_path, name) == [], "a save left a temporary behind"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, "start"])


@pytest.mark.parametrize("verify", [True, False])
def test_a_load_during_saves_reads_one_whole_version(
    tmp_path: Path, versions: dict[str, Any], verify: bool
) -> None:
    # Regression: a load reading while a save swapped the directory mixed the manifest of one
    # version with files of the other (a SHA-256 error, or with verify=False a silent mix).
    target, start = tmp_path / "idx", tmp_path / "start"
    versions["index"][1].save(target)
    # One writer alternating the versions: every save changes what the target holds.
    writers = [[versions["index"][2], versions["index"][1]]]
    procs, outs = _start_writers("index", writers, target, start)
    start.touch()
    loads, seen = 0, set()  # which versions the loads saw
    deadline = time.monotonic() + SECONDS
    try:
        while time.monotonic() < deadline:
            loaded = IMRNNIndex.load(target, verify=verify)
            match = [v for v in (1, 2) if _is(loaded, versions["index"][v])]
            assert match, f"load {loads} returned neither version: a mix"
            if loads % 10 == 0:  # and it searches as that version does
                assert _same(_fingerprint(loaded), versions["fp"][match[0]])
            seen.add(match[0])
            loads += 1
    finally:
        results = _join(procs, outs)
    assert [error for _, error in results] == [None], results
    assert loads >= 5 and results[0][0] >= 5, (loads, results)
    assert _debris(tmp_path, "idx") == []
    print(f"verify={verify}: {loads} loads saw versions {sorted(seen)}; {results[0][0]} saves")


def test_a_checkpoint_load_during_saves_reads_one_whole_version(tmp_path: Path) -> None:
    """Two files only, so the window is small; the configs differ, so a mix cannot load."""
    target, start = tmp_path / "ck", tmp_path / "start"
    models = []
    for version, hidden in ((1, (32, 16)), (2, (24, 12))):
        torch.manual_seed(version)
        models.append(randomised(IMRNNConfig(input_dim=DIM, dim=8, hidden_dims=hidden)))
    save_pretrained(models[0], target)
    procs, outs = _start_writers("adapter", [models[::-1]], target, start)
    start.touch()
    loads = 0
    deadline = time.monotonic() + SECONDS
    try:
        while time.monotonic() < deadline:
            loaded = load_pretrained(target)
            assert any(weights_equal(loaded, m) for m in models), "a mixed checkpoint"
            loads += 1
    finally:
        results = _join(procs, outs)
    assert [error for _, error in results] == [None], results
    assert loads >= 5
