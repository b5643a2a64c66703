"""Fused scoring (issue 3): exhaustive modulated top-k and candidate reranking.

Every ratio is measured in the same run, the contenders called in turn
(:func:`benchmarks._scoring_utils.interleaved_times`) so that load drifts hit them alike,
and lands in the benchmark JSON (``extra_info``). Targets (CPU, 2 threads):

- exhaustive, N=1e6, m=256, fp32, B=16, k=100, diagonal: <= 2x the time of faiss
  ``IndexFlatIP.search`` on the same matrix (plain inner product), >= 5x faster than the
  naive PyTorch baseline, extra peak memory <= 25% of the corpus bytes;
- rerank, B=256 queries x K=100 candidates, n=384: >= 20x the queries per second of the
  official ``imrnns`` 0.2.3 ``IMRNN.forward`` on the same candidates (projection and the
  per-document HyperNet outputs are computed once at index time). Two deployments of the
  same library calls are timed: one batched call (torch's intra-op threads) and the batch
  split into query blocks over worker threads; both ratios land in the JSON.

Set ``IMRNNS_BENCH_STRICT=1`` to turn the targets into assertions (off by default: a shared,
loaded runner can miss them for reasons that have nothing to do with the code).
Run: ``pytest benchmarks/test_bench_scoring.py --benchmark-only``.
"""

from __future__ import annotations

import os
import statistics
import time

import pytest
import torch

import imrnns_kernels as K
from benchmarks._common import cpu_model, peak_extra_memory
from benchmarks._scoring_utils import (
    interleaved_times,
    naive_topk,
    scoring_params,
    summary,
    unit_corpus,
)
from benchmarks.conftest import requires_cuda
from benchmarks.scaling import CompiledReference, ProviderUnavailable

STRICT = os.environ.get("IMRNNS_BENCH_STRICT", "0") == "1"
THREADS = 2


def _cpu_threads() -> int:
    torch.set_num_threads(THREADS)
    return torch.get_num_threads()


def _target(ok: bool, message: str) -> None:
    if STRICT:
        assert ok, message
    elif not ok:
        print(f"target missed (not asserted): {message}")


# --------------------------------------------------------------------------- CPU exhaustive


@pytest.mark.benchmark(group="scoring-exhaustive-cpu")
def test_exhaustive_cpu_vs_faiss_and_naive(benchmark):
    import faiss

    threads = _cpu_threads()
    faiss.omp_set_num_threads(THREADS)
    n, m, b, k = 1_000_000, 256, 16, 100
    corpus = unit_corpus(n, m)
    transform, ln_w, ln_b, queries = scoring_params(b, m)

    def ours():
        with K.use_backend("cpu"):
            return K.modulated_topk(corpus, transform, ln_w, ln_b, queries, k=k)

    (scores, ids), extra_bytes = peak_extra_memory(ours)

    index = faiss.IndexFlatIP(m)
    index.add(corpus.numpy())
    qn = queries.numpy()
    cpu: dict[str, list[float]] = {}
    times = interleaved_times(
        {"faiss": lambda: index.search(qn, k), "ours": ours}, rounds=3, cpu=cpu
    )

    t0 = time.perf_counter()
    naive_s, naive_i = naive_topk(corpus, transform, ln_w, ln_b, queries, k)
    naive_time = time.perf_counter() - t0
    torch.testing.assert_close(scores, naive_s, atol=1e-5, rtol=1e-5)
    id_agreement = float((ids == naive_i).float().mean())

    benchmark.pedantic(ours, rounds=3, warmup_rounds=0)
    ours_t = statistics.median(times["ours"])
    faiss_t = statistics.median(times["faiss"])
    gemm_flops = 2.0 * n * m * 8 * b  # 6 atoms on D, 2 on D*D per query
    corpus_bytes = corpus.numel() * corpus.element_size()
    info = {
        "cpu_model": cpu_model(),
        "torch_threads": threads,
        "n": n,
        "m": m,
        "queries": b,
        "k": k,
        "ours": summary(times["ours"]),
        "faiss_indexflatip": summary(times["faiss"]),
        "naive_s": naive_time,
        "ratio_vs_faiss": ours_t / faiss_t,
        "cpu_time_s": {name: statistics.median(v) for name, v in cpu.items()},
        "cpu_time_ratio_vs_faiss": statistics.median(cpu["ours"]) / statistics.median(cpu["faiss"]),
        "load_average": os.getloadavg(),
        "speedup_vs_naive": naive_time / ours_t,
        "gflops": gemm_flops / ours_t / 1e9,
        "peak_extra_bytes": extra_bytes,
        "peak_extra_fraction_of_corpus": None
        if extra_bytes is None
        else extra_bytes / corpus_bytes,
        "id_agreement_with_naive": id_agreement,
    }
    benchmark.extra_info.update(info)
    print(info)
    _target(info["ratio_vs_faiss"] <= 2.0, f"ratio vs faiss {info['ratio_vs_faiss']:.2f} > 2")
    _target(info["speedup_vs_naive"] >= 5.0, f"speedup vs naive {info['speedup_vs_naive']:.1f}")
    if extra_bytes is not None:
        _target(extra_bytes <= 0.25 * corpus_bytes, f"extra memory {extra_bytes / 2**20:.0f} MiB")


@pytest.mark.benchmark(group="scoring-exhaustive-cpu")
def test_exhaustive_affine_cpu_vs_naive(benchmark):
    """Affine exhaustive search: m^2 per (doc, query) either way; chunked vs materialising."""
    threads = _cpu_threads()
    n, m, b, k = 50_000, 256, 16, 100
    corpus = unit_corpus(n, m)
    transform, ln_w, ln_b, queries = scoring_params(b, m, "affine")

    def ours():
        with K.use_backend("cpu"):
            return K.modulated_topk(
                corpus, transform, ln_w, ln_b, queries, k=k, modulation="affine"
            )

    def naive():
        return naive_topk(corpus, transform, ln_w, ln_b, queries, k, "affine")

    times = interleaved_times({"naive": naive, "ours": ours}, rounds=2)
    torch.testing.assert_close(ours()[0], naive()[0], atol=1e-5, rtol=1e-5)
    benchmark.pedantic(ours, rounds=2, warmup_rounds=0)
    ours_t = statistics.median(times["ours"])
    info = {
        "cpu_model": cpu_model(),
        "torch_threads": threads,
        "n": n,
        "m": m,
        "queries": b,
        "ours": summary(times["ours"]),
        "naive": summary(times["naive"]),
        "speedup_vs_naive": statistics.median(times["naive"]) / ours_t,
        "gflops": 2.0 * n * m * m * b / ours_t / 1e9,
    }
    benchmark.extra_info.update(info)
    print(info)


# --------------------------------------------------------------------------- CPU rerank


def _perturbed(model: torch.nn.Module, scale: float = 0.05, seed: int = 3) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model.eval()


@pytest.mark.benchmark(group="scoring-rerank-cpu")
@pytest.mark.parametrize("m", [256, 384])
def test_rerank_cpu_vs_official(benchmark, m):
    """B=256 queries x K=100 candidates, n=384. m=256 is the configuration of the issue; the
    official 0.2.3 model only has m = n, so m=384 is also run with the official weights loaded
    into ours, where the scores must agree (same function)."""
    from imrnns import IMRNN, IMRNNConfig
    from imrnns._official import load_official_model_module

    threads = _cpu_threads()
    n_in, b, kc, n_docs = 384, 256, 100, 100_000
    docs = unit_corpus(n_docs, n_in, seed=4)
    queries = unit_corpus(b, n_in, seed=5)
    ids = torch.randint(0, n_docs, (b, kc), generator=torch.Generator().manual_seed(6))
    candidates = docs[ids]  # the official forward takes the (B, K, n) candidate embeddings

    mod = load_official_model_module()
    official = _perturbed(mod.IMRNN(mod.ModelConfig(input_dim=n_in)))
    if m == n_in:
        model = IMRNN(IMRNNConfig(input_dim=n_in)).eval()
        model.load_state_dict(official.state_dict())
    else:
        model = _perturbed(IMRNN(IMRNNConfig(input_dim=n_in, dim=m)))

    with torch.no_grad():
        # Index time: everything that depends only on the corpus.
        corpus = model.project(docs)
        cache = K.document_transforms(corpus, model.doc_hypernet.weights(), "diagonal")

    @torch.no_grad()
    def ours():
        pq = model.project(queries)
        tq, _, q_tilde = model.query_state(pq, corpus, ids, None, cache)
        return model.score_ids(corpus, ids, tq, q_tilde)

    @torch.no_grad()
    def theirs():
        return official(queries, candidates)[2]

    if m == n_in:
        torch.testing.assert_close(ours(), theirs(), atol=1e-5, rtol=1e-5)
    cpu: dict[str, list[float]] = {}
    # Bursts of 3 calls per turn: QPS is a steady-state rate (see interleaved_times).
    times = interleaved_times({"official": theirs, "ours": ours}, rounds=7, cpu=cpu, burst=3)
    benchmark.pedantic(ours, rounds=20, warmup_rounds=2)
    ours_t = statistics.median(times["ours"])
    official_t = statistics.median(times["official"])
    info = {
        "cpu_model": cpu_model(),
        "torch_threads": threads,
        "n": n_in,
        "m": m,
        "queries": b,
        "candidates": kc,
        "ours": summary(times["ours"]),
        "official_forward": summary(times["official"]),
        "ours_qps": b / ours_t,
        "official_qps": b / official_t,
        "qps_ratio": official_t / ours_t,
        "cpu_time_s": {name: statistics.median(v) for name, v in cpu.items()},
        "cpu_time_ratio": statistics.median(cpu["official"]) / statistics.median(cpu["ours"]),
        "load_average": os.getloadavg(),
    }
    benchmark.extra_info.update(info)
    print(info)
    _target(info["qps_ratio"] >= 20.0, f"rerank QPS ratio {info['qps_ratio']:.1f} < 20")


# --------------------------------------------------------------------------- GPU


def _cuda_time(fn, rounds: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@requires_cuda
@pytest.mark.benchmark(group="scoring-exhaustive-gpu")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("b", [16, 64])
def test_exhaustive_gpu(benchmark, dtype, b):
    n, m, k = 4_000_000, 256, 100
    corpus = unit_corpus(n, m, dtype).cuda()
    transform, ln_w, ln_b, queries = (t.cuda() for t in scoring_params(b, m))

    def ours():
        return K.modulated_topk(corpus, transform, ln_w, ln_b, queries, k=k)

    ours_t = _cuda_time(ours)
    naive_t = _cuda_time(lambda: naive_topk(corpus, transform, ln_w, ln_b, queries, k), rounds=2)
    torch.testing.assert_close(
        ours()[0], naive_topk(corpus, transform, ln_w, ln_b, queries, k)[0], atol=1e-4, rtol=1e-4
    )
    benchmark.pedantic(lambda: (ours(), torch.cuda.synchronize()), rounds=10, warmup_rounds=1)
    corpus_bytes = corpus.numel() * corpus.element_size()
    info = {
        "device": torch.cuda.get_device_name(0),
        "n": n,
        "m": m,
        "queries": b,
        "dtype": str(dtype),
        "ours_s": ours_t,
        "naive_s": naive_t,
        "speedup_vs_naive": naive_t / ours_t,
        "corpus_reads_gb_per_s": corpus_bytes * -(-b // 32) / ours_t / 1e9,
        "gflops": 2.0 * n * m * 8 * b / ours_t / 1e9,
    }
    benchmark.extra_info.update(info)
    print(info)


@requires_cuda
@pytest.mark.benchmark(group="scoring-rerank-gpu")
@pytest.mark.parametrize("modulation", ["diagonal", "affine"])
def test_rerank_gpu(benchmark, modulation):
    from imrnns_kernels import reference as R

    b, kc, n, m = 256, 100, 1_000_000, 256
    corpus = unit_corpus(n, m).cuda()
    transform, ln_w, ln_b, queries = (t.cuda() for t in scoring_params(b, m, modulation))
    ids = torch.randint(0, n, (b, kc), device="cuda")

    def ours():
        return K.modulated_score(corpus, ids, transform, ln_w, ln_b, queries, modulation)

    def ref():
        return R.modulated_score(corpus, ids, transform, ln_w, ln_b, queries, modulation)

    compiled = CompiledReference(R.modulated_score)

    def compiled_ref():
        return compiled(corpus, ids, transform, ln_w, ln_b, queries, modulation)

    torch.testing.assert_close(ours(), ref(), atol=1e-5, rtol=1e-5)
    ours_t, ref_t = _cuda_time(ours), _cuda_time(ref)
    # torch.compile of the reference (issue 18): compiled by this first call, outside timing.
    try:
        torch.testing.assert_close(compiled_ref(), ref(), atol=1e-5, rtol=1e-5)
        compiled_t, compiled_why = _cuda_time(compiled_ref), None
    except ProviderUnavailable as exc:
        compiled_t, compiled_why = None, str(exc)
    benchmark.pedantic(lambda: (ours(), torch.cuda.synchronize()), rounds=20, warmup_rounds=2)
    info = {
        "device": torch.cuda.get_device_name(0),
        "modulation": modulation,
        "ours_s": ours_t,
        "reference_s": ref_t,
        "speedup_vs_reference": ref_t / ours_t,
        "compiled_reference_s": compiled_t,
        "speedup_vs_compiled_reference": None if compiled_t is None else compiled_t / ours_t,
        "compiled_reference_unavailable": compiled_why,
    }
    benchmark.extra_info.update(info)
    print(info)
