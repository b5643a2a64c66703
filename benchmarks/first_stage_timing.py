"""First-stage timing: the exact flat search in PyTorch vs faiss, and the tie cases.

Run: ``OMP_NUM_THREADS=2 python -m benchmarks.first_stage_timing [--repeats 5] [--ties]``.

Part 1 (the rule of ``imrnns.index.first_stage.flat_backend``): the flat first stage's search
(:class:`imrnns.index.first_stage.FlatStage`, ties by the lower id included) with each backend
forced, side by side in one process: SciFact (N = 5,183 MiniLM document embeddings, its 300
test queries) and N = 200,000 random unit vectors with the same queries, at k = 10 and 101 and
batches of 1 to 300 queries. faiss's side is ``faiss.knn`` (the code ``IndexFlatIP.search``
runs) plus the tie resolution; raw ``IndexFlatIP.search`` without it is printed beside it.

Part 2 (``--ties``): one all-zero query among 256 and one query over 5,000 identical
documents, N = 200,000, d = 384, k = 100: calls, GEMM rows, time and peak RSS, each case in a
fresh subprocess (peak RSS is per process).

Prints one line per measurement: median and (min-max) over ``--repeats`` runs, in ms.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from imrnns.index import first_stage


def _time(fn: Callable[[], object], repeats: int) -> tuple[float, float, float]:
    fn()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - start) * 1e3)
    return statistics.median(runs), min(runs), max(runs)


def _unit(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=np.float32)


def _scifact() -> tuple[np.ndarray, np.ndarray]:
    from imrnns.data import scifact_path
    from imrnns.evaluate import embed_beir

    split = embed_beir(scifact_path(), "test", show_progress=False)
    return _unit(split.corpus), _unit(split.queries)


def _scifact_or_cache() -> tuple[np.ndarray, np.ndarray]:
    try:
        return _scifact()
    except Exception as exc:  # the benchmark says what it fell back to
        print(f"# SciFact embeddings unavailable ({exc}); using random N=5183 vectors")
        rng = np.random.default_rng(1)
        return _unit(rng.standard_normal((5183, 384))), _unit(rng.standard_normal((300, 384)))


def backends(repeats: int) -> None:
    import faiss

    corpus, queries = _scifact_or_cache()
    rng = np.random.default_rng(0)
    big = _unit(rng.standard_normal((200_000, corpus.shape[1]), dtype=np.float32))
    print(
        f"# torch {torch.__version__}, {torch.get_num_threads()} threads; faiss "
        f"{faiss.__version__}, {faiss.omp_get_max_threads()} threads"
    )
    for name, docs in (("scifact N=5183", corpus), ("random N=200000", big)):
        stage = first_stage.FlatStage(docs.shape[1])
        stage.add(docs)
        raw = faiss.IndexFlatIP(docs.shape[1])
        raw.add(docs)
        for k in (10, 101):
            for b in (1, 2, 4, 8, 32, 300):
                q = queries[:b]
                qt = torch.from_numpy(q)
                row = {}
                for backend in ("torch", "faiss"):
                    os.environ[first_stage.BACKEND_ENV] = backend
                    row[backend] = _time(lambda: stage.search(qt, k), repeats)  # noqa: B023
                row["faiss raw"] = _time(lambda: raw.search(q, k), repeats)  # noqa: B023
                os.environ.pop(first_stage.BACKEND_ENV)
                cells = "  ".join(
                    f"{key} {m:8.2f} ({lo:.2f}-{hi:.2f})" for key, (m, lo, hi) in row.items()
                )
                print(
                    f"{name} k={k:3d} B={b:3d}: {cells}  torch/faiss "
                    f"{row['torch'][0] / row['faiss'][0]:.2f}"
                )


def tie_case(case: str, backend: str) -> dict[str, object]:
    os.environ[first_stage.BACKEND_ENV] = backend
    rng = np.random.default_rng(0)
    n, d, b, k = 200_000, 384, 256, 100
    docs = rng.standard_normal((n, d), dtype=np.float32)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    queries = rng.standard_normal((b, d), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    if case == "zero-query":
        queries[17] = 0
    elif case == "identical-docs":
        docs[:5000] = docs[0]
        queries[3] = docs[0]
    stage = first_stage.FlatStage(d)
    stage.add(docs)
    counts = {"faiss_calls": [], "gemm_calls": 0, "pairs": 0}
    knn, block = first_stage.faiss_knn, first_stage.score_block

    def counted_knn(x: np.ndarray, v: np.ndarray, depth: int):  # type: ignore[no-untyped-def]
        counts["faiss_calls"].append([len(x), depth])  # type: ignore[union-attr]
        return knn(x, v, depth)

    def counted_block(q: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        counts["gemm_calls"] += 1  # type: ignore[operator]
        counts["pairs"] += q.shape[0] * rows.shape[0]  # type: ignore[operator]
        return block(q, rows)

    first_stage.faiss_knn, first_stage.score_block = counted_knn, counted_block
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    stage.search(torch.from_numpy(queries), k)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "case": case,
        "backend": backend,
        "seconds": round(seconds, 3),
        "faiss_calls": counts["faiss_calls"],
        "gemm_calls": counts["gemm_calls"],
        "pairs_over_BN": round(counts["pairs"] / (b * n), 4),  # type: ignore[operator]
        "peak_rss_growth_mib": round((after - before) / 1024),
    }


def ties() -> None:
    for case in ("none", "zero-query", "identical-docs"):
        for backend in ("torch", "faiss"):
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.first_stage_timing",
                    "--tie-case",
                    case,
                    backend,
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            print(out.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ties", action="store_true", help="part 2 only")
    parser.add_argument("--tie-case", nargs=2, metavar=("CASE", "BACKEND"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tie_case:
        print(json.dumps(tie_case(*args.tie_case)))
        return
    if args.ties:
        ties()
        return
    backends(args.repeats)


if __name__ == "__main__":
    main()
