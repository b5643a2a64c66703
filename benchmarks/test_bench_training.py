"""Training at collection scale: seconds per epoch, queries per second and peak memory.

Synthetic collections (384-d embeddings, relevance by cosine in a hidden space, as the
training tests draw them) of three shapes:

- ``scifact``: 5,183 documents, 688 training queries, 1-2 positives each (SciFact's train
  split after the validation slice);
- ``nfcorpus``: 3,600 documents, 2,200 training queries, 20-56 graded positives each (mean
  38; a quarter of grade 2, the rest grade 1), NFCorpus's shape;
- ``clicks-100k``: 5,183 documents, 100,000 training queries, 1-4 positives each (a click
  log), trained from a stream (``prepare_streaming_data``, ``mining_chunk`` queries mined at
  a time); the stream regenerates its records on every pass, so nothing of it is stored.

One epoch with :class:`imrnns.training.TrainConfig`'s defaults (no validation slice:
``holdout=False``), torch on 2 threads. Each measurement runs in a fresh subprocess, and its
peak memory is ``benchmarks._common.peak_extra_memory`` around building the data, preparing
it and training the epoch: the resident memory the whole job adds to a process that has only
imported the libraries.

Run:

- ``python -m pytest benchmarks/test_bench_training.py --benchmark-only -s``: the two small
  shapes (``IMRNNS_BENCH_TRAINING_100K=1`` adds the 100,000-query stream, about 10-30 min).
- ``python -m benchmarks.test_bench_training --before /path/to/old/checkout``: before and
  after side by side, interleaved, each shape ``--repeats`` times, the old code importing
  ``imrnns`` from the other checkout (``git archive HEAD | tar -x -C /tmp/head``); a JSON
  record with ``--out``; ``--queries N`` trains N queries of the shape instead (peak memory
  against the number of queries), ``--mining-chunk`` sets the streamed chunk; each row
  records the 1-minute load average before and after it. ``measure(shape, ...)`` is the
  function a sweep can call.

Goals (asserted with ``IMRNNS_BENCH_STRICT=1``): per query, the ``nfcorpus`` epoch within 3x
the ``scifact`` one; the streamed 100,000-query epoch's peak memory within
``STREAM_MEMORY_BOUND_MB`` at the default ``mining_chunk``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
STRICT = os.environ.get("IMRNNS_BENCH_STRICT", "0") == "1"
RUN_100K = os.environ.get("IMRNNS_BENCH_TRAINING_100K", "0") == "1"
THREADS = 2
DIM = 384
# The streamed 100k epoch holds the corpus, its projection with gradients, the model and one
# mined chunk: a few hundred MB whatever the number of queries.
STREAM_MEMORY_BOUND_MB = 1024.0


@dataclasses.dataclass(frozen=True)
class Shape:
    docs: int
    queries: int
    positives: tuple[int, int]  # inclusive range per query
    grade2: float  # fraction of a query's positives with grade 2
    streamed: bool = False


SHAPES = {
    "scifact": Shape(5183, 688, (1, 2), 0.0),
    "nfcorpus": Shape(3600, 2200, (20, 56), 0.25),
    "clicks-100k": Shape(5183, 100_000, (1, 4), 0.0, streamed=True),
}
# Queries generated per block: each block draws from its own seeded generator, so a stream
# regenerates the same records on every pass without storing them.
BLOCK = 2048


class Collection:
    """A synthetic collection: the corpus in memory, queries generated block by block."""

    def __init__(self, shape: Shape, seed: int = 0) -> None:
        self.shape, self.seed = shape, seed
        rng = np.random.default_rng(seed)
        truth = rng.standard_normal((shape.docs, DIM)).astype(np.float32)
        self.truth = truth / np.linalg.norm(truth, axis=1, keepdims=True)
        # The base encoder shrinks half the dimensions: what an adapter can learn to undo.
        self.scale = np.where(np.arange(DIM) < DIM // 2, 1.0, 0.3).astype(np.float32)
        self.corpus = self._observe(self.truth, rng)
        self.doc_ids = [f"d{i}" for i in range(shape.docs)]
        # Each query's positives: the nearest documents (hidden space) of a centre document.
        k = shape.positives[1]
        self.neighbours = np.empty((shape.docs, k), dtype=np.int64)
        for lo in range(0, shape.docs, 1024):
            sims = self.truth[lo : lo + 1024] @ self.truth.T
            top = np.argpartition(-sims, k, axis=1)[:, :k]
            order = np.take_along_axis(sims, top, axis=1).argsort(axis=1)[:, ::-1]
            self.neighbours[lo : lo + 1024] = np.take_along_axis(top, order, axis=1)

    def _observe(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        y = x * self.scale + 0.01 * rng.standard_normal(x.shape).astype(np.float32)
        return (y / np.linalg.norm(y, axis=1, keepdims=True)).astype(np.float32)

    def blocks(self) -> Iterator[tuple[list[str], np.ndarray, list[dict[str, int]]]]:
        """(ids, (b, n) embeddings, qrels) per block of queries, the same on every call."""
        shape = self.shape
        for start in range(0, shape.queries, BLOCK):
            rng = np.random.default_rng([self.seed, start])
            b = min(BLOCK, shape.queries - start)
            centres = rng.integers(0, shape.docs, b)
            noise = rng.standard_normal((b, DIM)).astype(np.float32)
            qt = self.truth[centres] + 0.5 * noise / math.sqrt(DIM)
            qt /= np.linalg.norm(qt, axis=1, keepdims=True)
            counts = rng.integers(shape.positives[0], shape.positives[1] + 1, b)
            qrels = []
            for c, k in zip(centres.tolist(), counts.tolist(), strict=True):
                top = round(shape.grade2 * k) if shape.grade2 > 0 else 0
                docs = self.neighbours[c, :k].tolist()
                qrels.append({f"d{d}": 2 if r < top else 1 for r, d in enumerate(docs)})
            ids = [f"q{start + i}" for i in range(b)]
            yield ids, self._observe(qt, rng), qrels

    def records(self) -> Iterator[Any]:
        from imrnns.training import QueryRecord

        for ids, emb, qrels in self.blocks():
            for i, qid in enumerate(ids):
                yield QueryRecord(qid, emb[i], qrels[i])

    def split(self) -> Any:
        """The whole collection in memory: an EmbeddedSplit (the in-memory path)."""
        from imrnns.data import BeirDataset
        from imrnns.evaluate import EmbeddedSplit

        ids: list[str] = []
        embs: list[np.ndarray] = []
        qrels: dict[str, dict[str, int]] = {}
        for block_ids, emb, block_qrels in self.blocks():
            ids += block_ids
            embs.append(emb)
            qrels.update(zip(block_ids, block_qrels, strict=True))
        ds = BeirDataset("synthetic", "train", self.doc_ids, self.doc_ids, ids, ids, qrels)
        return EmbeddedSplit(ds, self.corpus, np.concatenate(embs), encoder="synthetic")


def _epoch(
    shape_name: str, streamed: bool, mining_chunk: int | None, queries: int | None = None
) -> dict[str, Any]:
    """Build, prepare and train one epoch in this process; seconds of each part.
    ``queries``: another number of training queries than the shape's."""
    import torch

    from imrnns.training import TrainConfig, prepare_training_data, train

    shape = SHAPES[shape_name]
    if queries is not None:
        shape = dataclasses.replace(shape, queries=queries)
    config = TrainConfig(epochs=1)
    if mining_chunk is not None:
        config = dataclasses.replace(config, mining_chunk=mining_chunk)
    t0 = time.perf_counter()
    coll = Collection(shape)
    if streamed:
        from imrnns.training import prepare_streaming_data

        data = prepare_streaming_data(coll.doc_ids, coll.corpus, coll.records, config,
                                      holdout=False)  # fmt: skip
    else:
        data = prepare_training_data(coll.split(), config, holdout=False)
    t1 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        result = train(data, out, config, progress=False)
    epoch_s = result["history"][-1]["seconds"]
    queries = result["data"]["num_train_queries"]
    # (the old code has no steps_per_epoch: its batches are ceil(queries / batch_size))
    per_epoch = getattr(data, "steps_per_epoch", None)
    steps = per_epoch(config.batch_size) if per_epoch else math.ceil(queries / config.batch_size)
    return {
        "shape": shape_name,
        "streamed": streamed,
        "mining_chunk": config.mining_chunk if streamed else None,
        "queries": queries,
        "steps": steps,
        "prepare_s": t1 - t0,
        "epoch_s": epoch_s,
        "queries_per_s": queries / epoch_s,
        "ms_per_query": 1000.0 * epoch_s / queries,
        "torch_threads": torch.get_num_threads(),
    }


def _child(args: argparse.Namespace) -> None:
    """Subprocess body: one measurement, one JSON line on stdout."""
    if args.imrnns_root:
        # Ahead of this checkout (the child runs with -m from it, so it is sys.path[0]).
        sys.path.insert(0, str(Path(args.imrnns_root).resolve()))
    import torch

    torch.set_num_threads(args.threads)
    # Imported before the memory baseline: the libraries are not the job's memory.
    import imrnns.training
    from benchmarks._common import peak_extra_memory

    out, peak = peak_extra_memory(
        lambda: _epoch(args.shape, args.streamed, args.mining_chunk, args.queries)
    )
    out["peak_extra_mb"] = None if peak is None else peak / 2**20
    out["imrnns"] = str(Path(imrnns.training.__file__).resolve().parents[1])
    print("RESULT " + json.dumps(out), flush=True)


def measure(
    shape: str,
    *,
    streamed: bool | None = None,
    mining_chunk: int | None = None,
    imrnns_root: str | Path | None = None,
    threads: int = THREADS,
    timeout: float = 7200.0,
    queries: int | None = None,
) -> dict[str, Any]:
    """One epoch of ``shape`` in a fresh subprocess: the dict of :func:`_epoch` plus
    ``peak_extra_mb`` and the machine's 1-minute load average before and after (other
    processes share the cores). ``imrnns_root``: a checkout whose ``imrnns`` the child
    imports instead of this one (the before side of a comparison; streaming needs the new
    code). ``queries``: another number of training queries than the shape's."""
    streamed = SHAPES[shape].streamed if streamed is None else streamed
    cmd = [sys.executable, "-m", "benchmarks.test_bench_training", "--child", "--shape", shape,
           "--threads", str(threads)]  # fmt: skip
    if streamed:
        cmd.append("--streamed")
    if mining_chunk is not None:
        cmd += ["--mining-chunk", str(mining_chunk)]
    if imrnns_root is not None:
        cmd += ["--imrnns-root", str(imrnns_root)]
    if queries is not None:
        cmd += ["--queries", str(queries)]
    load_before = os.getloadavg()[0]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)  # fmt: skip
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT ") :])
            result["load_before"], result["load_after"] = load_before, os.getloadavg()[0]
            return result
    raise RuntimeError(f"benchmark child failed ({proc.returncode}): {proc.stderr[-3000:]}")


# ----------------------------------------------------------------------------- pytest
def _report(benchmark: Any, result: dict[str, Any]) -> None:
    benchmark.extra_info.update(result)
    print(
        f"\n{result['shape']}: {result['epoch_s']:.1f} s/epoch, "
        f"{result['queries_per_s']:.0f} queries/s, {result['ms_per_query']:.2f} ms/query, "
        f"peak +{result['peak_extra_mb']:.0f} MB"
    )


@pytest.fixture(scope="module")
def small_shapes() -> dict[str, dict[str, Any]]:
    return {}


@pytest.mark.parametrize("shape", ["scifact", "nfcorpus"])
def test_epoch(benchmark: Any, shape: str, small_shapes: dict[str, dict[str, Any]]) -> None:
    result = benchmark.pedantic(measure, args=(shape,), rounds=1, iterations=1)
    small_shapes[shape] = result
    _report(benchmark, result)
    if shape == "nfcorpus" and "scifact" in small_shapes:
        ratio = result["ms_per_query"] / small_shapes["scifact"]["ms_per_query"]
        benchmark.extra_info["per_query_vs_scifact"] = ratio
        print(f"nfcorpus / scifact per-query cost: {ratio:.2f}x (goal <= 3x)")
        if STRICT:
            assert ratio <= 3.0


@pytest.mark.skipif(not RUN_100K, reason="set IMRNNS_BENCH_TRAINING_100K=1 (10-30 min)")
def test_streamed_100k_epoch(benchmark: Any) -> None:
    result = benchmark.pedantic(measure, args=("clicks-100k",), rounds=1, iterations=1)
    _report(benchmark, result)
    if STRICT:
        assert result["peak_extra_mb"] <= STREAM_MEMORY_BOUND_MB


# ----------------------------------------------------------------------------- script
def _table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| shape | queries | code | s/epoch | queries/s | ms/query | peak extra MB | load |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']}{' (streamed)' if r['streamed'] else ''} | {r['queries']} | "
            f"{r['code']} | {r['epoch_s']:.1f} | {r['queries_per_s']:.0f} | "
            f"{r['ms_per_query']:.2f} | {r['peak_extra_mb']:.0f} | "
            f"{r['load_before']:.1f}-{r['load_after']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shape", default=None, choices=sorted(SHAPES))
    parser.add_argument("--shapes", default="scifact,nfcorpus")
    parser.add_argument("--streamed", action="store_true")
    parser.add_argument("--mining-chunk", type=int, default=None)
    parser.add_argument("--queries", type=int, default=None,
                        help="training queries (default: the shape's)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--imrnns-root", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--before", default=None, help="checkout of the old code (its root)")
    parser.add_argument("--before-in-memory", action="store_true",
                        help="the old code trains streamed shapes in memory (it cannot stream)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.child:
        _child(args)
        return 0
    from benchmarks._common import cpu_device_name

    rows: list[dict[str, Any]] = []
    for _ in range(args.repeats):
        for shape in args.shapes.split(","):
            sides = [("after", None)] + ([("before", args.before)] if args.before else [])
            for code, root in sides:
                streamed = SHAPES[shape].streamed and code == "after"
                if SHAPES[shape].streamed and code == "before" and not args.before_in_memory:
                    continue
                r = measure(shape, streamed=streamed, mining_chunk=args.mining_chunk,
                            imrnns_root=root, threads=args.threads,
                            queries=args.queries)  # fmt: skip
                r["code"] = code
                rows.append(r)
                print(json.dumps(r), flush=True)
    print(_table(rows))
    if args.out:
        record = {"machine": cpu_device_name(), "threads": args.threads, "rows": rows}
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
