"""One pytest-benchmark row per (op, case, provider): the provider matrix.

Run: ``pytest benchmarks/test_bench_ops.py --benchmark-only --benchmark-json ops.json``
(``--benchmark-group-by=group`` is the default: each op/case is one comparison table).

Providers (the same callables as the scaling sweep, :mod:`benchmarks.scaling.providers`):

- ``fused``: the Triton kernels on a CUDA GPU, the chunked CPU path otherwise;
- ``reference``: :mod:`imrnns_kernels.reference` (materialises every intermediate);
- ``compiled_reference``: ``torch.compile`` of that reference op, compiled for the case's
  shapes before the timing (skipped, with the reason, where torch.compile cannot run);
- ``naive``: the straightforward PyTorch a user would write;
- ``faiss_flat`` / ``torch_ip``: the unmodulated inner-product floor (faiss ``IndexFlatIP``;
  the PyTorch equivalent on a GPU without faiss-gpu);
- ``official``: the ``imrnns`` 0.2.3 package's ``IMRNN.forward`` (candidates only, diagonal).

Covered here: ``modulated_topk``, ``modulated_score``, ``document_transforms`` and
``IMRNNIndex.search`` (both modes) on synthetic corpora. ``adapter_reduce`` has its provider
matrix in ``test_bench_adapter.py`` (naive = reference, fused, cached); ``project`` and
``modulate_layernorm`` have no fused implementation (one GEMM + normalise; one elementwise
pass) and are not benchmarked separately. The issue's targets are measured (with ratios) in
``test_bench_scoring.py`` and in the scaling sweep (``python -m benchmarks.scaling``).

Providers that would need more memory than available are skipped with the estimate.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import imrnns_kernels as K
from benchmarks import scaling
from benchmarks.scaling.providers import COMPILED_SCORE
from imrnns_kernels import reference as R

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GPU = DEVICE == "cuda"
M, K_TOP, FEEDBACK_K = 256, 100, 100
THREADS = int(os.environ.get("BENCH_THREADS", "0")) or None
if THREADS:
    torch.set_num_threads(THREADS)

# Sizes: big enough that per-call overheads do not dominate, small enough that the materialising
# providers fit a 2-core, 24 GiB CI machine.
TOPK_CASES = {  # name -> (modulation, N, B)
    "diagonal": ("diagonal", 4_000_000 if GPU else 100_000, 8),
    "affine": ("affine", 1_000_000 if GPU else 20_000, 8),
}
SCORE_CASES = {"diagonal": ("diagonal", 256), "affine": ("affine", 32)}  # (modulation, B)
DOC_ROWS = 1_000_000 if GPU else 100_000
INDEX_N = 1_000_000 if GPU else 50_000
INDEX_B = {"rerank": 32, "exhaustive": 8}


def _run(benchmark: Any, fn: Callable[[], Any], rounds: int = 5) -> None:
    with torch.no_grad():
        benchmark.pedantic(
            (lambda: (fn(), torch.cuda.synchronize())) if GPU else fn,
            rounds=rounds,
            iterations=1,
            warmup_rounds=1,
        )


def _fits(provider: str, mode: str, modulation: str, n: int, b: int, item: int = 4) -> None:
    need = scaling.estimate_bytes(provider, mode, modulation, n, b, M, FEEDBACK_K, item, DEVICE)
    have = scaling.available_bytes(DEVICE)
    if need > scaling.MEMORY_HEADROOM * have:
        pytest.skip(f"{provider} needs ~{need / 2**30:.1f} GiB, {have / 2**30:.1f} GiB available")


def _warmed(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Run a provider's untimed warm-up (the compilation of ``compiled_reference``) now, so
    no timed round pays for it; skip when it finds the provider cannot run here."""
    warmup = getattr(fn, "warmup", None)
    if warmup is not None:
        try:
            with torch.no_grad():
                warmup()
        except scaling.ProviderUnavailable as exc:
            pytest.skip(str(exc))
    return fn


@functools.lru_cache(maxsize=2)
def _corpus(n: int) -> scaling.Corpus:
    return scaling.build_corpus(
        n, M, torch.float32, DEVICE, 0, True, scaling.available_bytes(DEVICE)
    )


@functools.lru_cache(maxsize=2)
def _model(modulation: str) -> Any:
    return scaling.make_model(M, modulation, 0, DEVICE)


@functools.lru_cache(maxsize=4)
def _problem(modulation: str, n: int, b: int) -> scaling.Problem:
    corpus, model = _corpus(n), _model(modulation)
    q = scaling.unit_rows(b, M, torch.float32, DEVICE, 1)
    tq, qt = scaling.query_state(model, corpus.data, q, FEEDBACK_K, 0, DEVICE)
    return scaling.Problem(corpus, model, None, None, q, tq, qt)


# ----------------------------------------------------------------------------- modulated_topk
@pytest.mark.parametrize(
    "provider", ["fused", "reference", "compiled_reference", "naive", "faiss_flat", "torch_ip"]
)
@pytest.mark.parametrize("case", list(TOPK_CASES))
def test_modulated_topk(benchmark, case, provider):
    modulation, n, b = TOPK_CASES[case]
    benchmark.group = f"modulated_topk {case} N={n} B={b} m={M} k={K_TOP}"
    _fits(provider, "exhaustive", modulation, n, b)
    fn = scaling.exhaustive_providers(_problem(modulation, n, b), K_TOP, DEVICE)[provider]
    if not callable(fn):
        pytest.skip(fn[1])
    fn = _warmed(fn)
    benchmark.extra_info.update(provider=provider, n=n, batch=b, device=DEVICE)
    _run(benchmark, fn, rounds=3)


# ----------------------------------------------------------------------------- modulated_score
def naive_score(
    corpus: torch.Tensor,
    ids: torch.Tensor,
    transform: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    queries: torch.Tensor,
    modulation: str,
) -> torch.Tensor:
    """Gather, modulate, LayerNorm, normalise, dot: five passes, each (B, K, m) in memory."""
    m = corpus.shape[1]
    d = corpus[ids].float()
    if modulation == "diagonal":
        y = d * transform[:, None, :m] + transform[:, None, m:]
    else:
        w = transform[:, : m * m].reshape(-1, m, m)
        y = torch.bmm(d, w.transpose(1, 2)) + transform[:, None, m * m :]
    z = F.normalize(F.layer_norm(y, (m,), ln_weight, ln_bias), dim=-1)
    return torch.einsum("bkm,bm->bk", z, F.normalize(queries, dim=-1))


@pytest.mark.parametrize("provider", ["fused", "reference", "compiled_reference", "naive"])
@pytest.mark.parametrize("case", list(SCORE_CASES))
def test_modulated_score(benchmark, case, provider):
    modulation, b = SCORE_CASES[case]
    n = 100_000
    p = _problem(modulation, n, b)
    ids = torch.randint(0, n, (b, FEEDBACK_K), generator=torch.Generator().manual_seed(2))
    ids = ids.to(DEVICE)
    lnw, lnb = p.model.doc_norm.weight.detach(), p.model.doc_norm.bias.detach()
    args = (p.corpus.data, ids, p.transform, lnw, lnb, p.q_tilde)
    backend = scaling.fused_backend(DEVICE)
    fns = {
        "fused": lambda: _with(backend, K.modulated_score, *args, modulation),
        "reference": lambda: R.modulated_score(*args, modulation),
        "compiled_reference": scaling.WarmedProvider(lambda: COMPILED_SCORE(*args, modulation)),
        "naive": lambda: naive_score(*args, modulation),
    }
    benchmark.group = f"modulated_score {case} B={b} K={FEEDBACK_K} m={M}"
    benchmark.extra_info.update(provider=provider, batch=b, device=DEVICE)
    _run(benchmark, _warmed(fns[provider]), rounds=10)


def _with(backend: str, fn: Callable[..., Any], *args: Any) -> Any:
    with K.use_backend(backend):
        return fn(*args)


# ----------------------------------------------------------------------------- document_transforms
@pytest.mark.parametrize("provider", ["fused", "reference", "naive"])
@pytest.mark.parametrize("modulation", ["diagonal", "affine"])
def test_document_transforms(benchmark, modulation, provider):
    corpus = _corpus(DOC_ROWS).data
    model = _model(modulation)
    w = K.HyperNetWeights(*(t.detach() for t in model.doc_hypernet.weights()))
    net = (
        model.doc_hypernet.hypernet
    )  # nn.Sequential: Linear ReLU Dropout Linear ReLU Dropout Linear
    backend = scaling.fused_backend(DEVICE)
    fns = {
        "fused": lambda: _with(backend, K.document_transforms, corpus, w, modulation),
        "reference": lambda: R.document_transforms(corpus, w, modulation),
        # What a user writes: the module over every row (affine: the hidden state, whose mean
        # the output layer maps exactly).
        "naive": (lambda: model.doc_hypernet(corpus))
        if modulation == "diagonal"
        else (lambda: net[:5](corpus)),
    }
    benchmark.group = f"document_transforms {modulation} N={DOC_ROWS} m={M}"
    benchmark.extra_info.update(provider=provider, n=DOC_ROWS, device=DEVICE)
    _run(benchmark, fns[provider], rounds=3)


# ----------------------------------------------------------------------------- IMRNNIndex.search
@functools.lru_cache(maxsize=2)
def _index(modulation: str) -> Any:
    pytest.importorskip("faiss")
    from imrnns import IMRNNIndex

    index = IMRNNIndex(_model(modulation), feedback_k=FEEDBACK_K, device=DEVICE)
    index.add(_corpus(INDEX_N).data)
    return index


@pytest.mark.parametrize("provider", ["fused", "reference", "naive", "faiss_flat", "official"])
@pytest.mark.parametrize("mode", ["rerank", "exhaustive"])
@pytest.mark.parametrize("modulation", ["diagonal", "affine"])
def test_index_search(benchmark, modulation, mode, provider):
    """End to end ``IMRNNIndex.search`` (first stage included) against the alternatives on the
    same first stage: the naive pipeline, the first stage alone, the official model."""
    b = INDEX_B[mode]
    _fits(provider, mode, modulation, INDEX_N, b)
    index = _index(modulation)
    model = index.model
    q = scaling.unit_rows(b, M, torch.float32, DEVICE, 3)
    backend = scaling.fused_backend(DEVICE)

    def ours(name: str) -> Any:
        with K.use_backend(name):
            return index.search(q, k=K_TOP, mode=mode)

    def naive() -> Any:
        _, ids = index.first_stage_search(q, FEEDBACK_K)
        if mode == "rerank":
            return scaling.naive_rerank(model, q, index.projected_corpus, ids, K_TOP)
        # The query state through the library (its cost does not grow with N); the scoring of
        # every document written plainly.
        pq = model.project(q)
        tq, _, qt = model.query_state(pq, index.projected_corpus, ids)
        lnw, lnb = model.doc_norm.weight, model.doc_norm.bias
        eps = model.config.layer_norm_eps
        return scaling.naive_exhaustive(
            index.projected_corpus, tq, lnw, lnb, qt, K_TOP, modulation, eps
        )

    fns: dict[str, Callable[[], Any]] = {
        "fused": lambda: ours(backend),
        "reference": lambda: ours("reference"),
        "naive": naive,
        "faiss_flat": lambda: index.first_stage_search(q, K_TOP),
    }
    if provider == "official":
        if mode != "rerank":
            pytest.skip(
                "the official imrnns 0.2.3 scores given candidates only (no exhaustive mode)"
            )
        official, why = scaling.load_official(model, install=False)
        if official is None:
            pytest.skip(why)

        def run_official() -> Any:
            _, ids = index.first_stage_search(q, FEEDBACK_K)
            return scaling.official_rerank(official, q, index.projected_corpus, ids, K_TOP)

        fns["official"] = run_official
    benchmark.group = f"IMRNNIndex.search {mode} {modulation} N={INDEX_N} B={b} k={K_TOP}"
    benchmark.extra_info.update(provider=provider, n=INDEX_N, batch=b, device=DEVICE)
    _run(benchmark, fns[provider], rounds=3)
