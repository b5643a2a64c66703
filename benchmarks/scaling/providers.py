"""Every provider the sweep times, and the per-point problem they share.

- ``fused``: :func:`imrnns_kernels.modulated_topk` / the library's rerank pipeline on the
  Triton kernels (GPU) or the chunked CPU path;
- ``reference``: the same calls on :mod:`imrnns_kernels.reference` (materialising);
- ``compiled_reference``: ``torch.compile`` of that reference (the op itself: exhaustive
  :func:`imrnns_kernels.reference.modulated_topk`, rerank
  :func:`imrnns_kernels.reference.modulated_score`), compiled once per input signature, the
  compilation in a warm-up that no timing includes;
- ``naive``: the straightforward PyTorch a user would write (:func:`naive_exhaustive`,
  :func:`naive_rerank`);
- ``faiss_flat`` / ``torch_ip``: the unmodulated inner-product floor;
- ``official``: the ``imrnns`` 0.2.3 package's ``IMRNN.forward`` on the candidates.

A provider table maps each name to a zero-argument callable, or to ``(skip_code, reason)``.
"""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import imrnns_kernels
from benchmarks._kernel_internals import StreamingTopK, topk_by_id
from benchmarks.scaling.config import ProviderUnavailable
from benchmarks.scaling.inputs import Corpus
from imrnns import IMRNN
from imrnns_kernels import reference

# provider name -> zero-argument callable, or (skip_code, reason)
ProviderTable = dict[str, Callable[[], Any] | tuple[str, str]]


# ----------------------------------------------------------------------------- naive baselines
def naive_exhaustive(
    corpus: torch.Tensor,
    transform: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    modulation: str,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What a user writes: per query, modulate the whole corpus, LayerNorm, normalise,
    matmul, top-k (the batched form would hold (B, N, m): that is the reference).

    Shapes: corpus (N, m), transform (B, OUT), ln_* (m,), queries (B, m) ->
    ((B, min(k, N)) float32 scores, (B, min(k, N)) int64 ids)."""
    m = corpus.shape[1]
    d = corpus.float()
    out_s, out_i = [], []
    for b in range(queries.shape[0]):
        if modulation == "diagonal":
            y = d * transform[b, :m] + transform[b, m:]
        else:
            y = torch.addmm(transform[b, m * m :], d, transform[b, : m * m].view(m, m).t())
        z = F.normalize(F.layer_norm(y, (m,), ln_weight, ln_bias, eps), dim=1)
        del y
        s = z @ F.normalize(queries[b], dim=0)
        del z
        v, i = torch.topk(s, min(k, s.shape[0]))
        out_s.append(v)
        out_i.append(i)
    return torch.stack(out_s), torch.stack(out_i)


def naive_rerank(
    model: IMRNN, queries: torch.Tensor, corpus: torch.Tensor, ids: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The IMRNN stage written with plain torch modules: every candidate's HyperNet output is
    materialised ((B, K, OUT): 26 MB per query for affine at m=256), then averaged.

    Shapes: queries (B, n), corpus (N, m), ids (B, K) -> ((B, min(k, K)) scores, corpus ids)."""
    cfg = model.config
    m = cfg.working_dim
    pq = F.normalize(model.projector(queries), dim=-1)
    cand = corpus[ids].float()  # (B, K, m)
    oq = model.query_hypernet.hypernet(pq)  # (B, OUT)
    od = model.doc_hypernet.hypernet(cand)  # (B, K, OUT)
    if cfg.modulation == "diagonal":
        d_mod = cand * torch.sigmoid(oq[:, None, :m]) + torch.tanh(oq[:, None, m:])
        scale = torch.sigmoid(od[..., :m]).mean(dim=1)
        shift = torch.tanh(od[..., m:]).mean(dim=1)
        q_mod = pq * scale + shift
    else:
        w_q = oq[:, : m * m].reshape(-1, m, m)
        d_mod = torch.einsum("bij,bkj->bki", w_q, cand) + oq[:, None, m * m :]
        mean = od.mean(dim=1)
        w_d = mean[:, : m * m].reshape(-1, m, m)
        q_mod = torch.einsum("bij,bj->bi", w_d, pq) + mean[:, m * m :]
    d_hat = F.normalize(model.doc_norm(d_mod), dim=-1)
    q_hat = F.normalize(model.query_norm(q_mod), dim=-1)
    scores = torch.einsum("bm,bkm->bk", q_hat, d_hat)
    top_s, top_j = torch.topk(scores, min(k, scores.shape[1]), dim=1)
    return top_s, ids.gather(1, top_j)


def torch_ip_topk(
    corpus: torch.Tensor, queries: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unmodulated inner-product top-k in PyTorch, chunked (the GPU floor without faiss-gpu).

    GPU: the matmul runs in the storage dtype (bf16/fp16 tensor cores, fp32 accumulate).
    CPU: chunks are upcast to fp32 (no fast half-precision BLAS)."""
    n = corpus.shape[0]
    on_gpu = corpus.device.type == "cuda"
    chunk = min(n, (1 << 20) if on_gpu else (1 << 15))
    q = queries.to(corpus.dtype if on_gpu else torch.float32)
    top = StreamingTopK(queries.shape[0], k, corpus.device)
    for r0 in range(0, n, chunk):
        d = corpus[r0 : r0 + chunk]
        s = (d @ q.t()) if on_gpu else (d.float() @ q.t())
        top.add(s.t().float(), r0)
    return top.result()


# ----------------------------------------------------------------------------- official
def load_official(model: IMRNN, install: bool) -> tuple[torch.nn.Module | None, str | None]:
    """The official 0.2.3 ``IMRNN`` with ``model``'s weights, or (None, why not)."""
    if model.config.modulation != "diagonal":
        return None, "the official imrnns 0.2.3 implements diagonal modulation only"
    from imrnns import _official

    folder = _official.official_dir() / "imrnns" / "model.py"
    if not folder.is_file() and not install:
        return None, (
            f"official imrnns {_official.OFFICIAL_VERSION} is not installed ({folder}); "
            "installation disabled (no network?)"
        )
    try:
        mod = _official.load_official_model_module()
        official = mod.IMRNN(mod.ModelConfig(input_dim=model.config.input_dim)).eval()
        official.load_state_dict(model.state_dict())
    except Exception as exc:  # any failure: record it, do not crash the sweep
        return None, f"official imrnns could not be loaded: {type(exc).__name__}: {exc}"
    return official.to(model.device), None


def official_rerank(
    official: torch.nn.Module,
    queries: torch.Tensor,
    corpus: torch.Tensor,
    ids: torch.Tensor,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The official model's batched forward on the gathered candidates, then top-k."""
    cand = corpus[ids].float()
    scores = official(queries, cand)[2]
    top_s, top_j = torch.topk(scores, min(k, scores.shape[1]), dim=1)
    return top_s, ids.gather(1, top_j)


# ----------------------------------------------------------------------------- torch.compile
@functools.cache
def compile_unavailable_reason(device: str) -> str | None:
    """Why ``torch.compile`` cannot run on ``device`` here, or None. Cheap checks only: a
    compilation that still fails is reported by :class:`CompiledReference` on first use."""
    try:
        import torch._dynamo
    except ImportError as exc:  # pragma: no cover - every supported torch has dynamo
        return f"torch.compile is not available: {exc}"
    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile (dynamo) does not support this Python or platform"
    if device == "cpu":
        # Inductor writes C++ for the CPU and builds it with the system compiler.
        names = [os.environ.get("CXX"), "g++", "c++", "clang++"]
        if not any(shutil.which(name) for name in names if name):
            return "torch.compile on the CPU needs a C++ compiler (none of $CXX, g++, c++, clang++)"
    return None


def _signature(args: tuple[Any, ...]) -> tuple[Any, ...]:
    parts: list[Any] = [torch.is_grad_enabled()]
    for a in args:
        if isinstance(a, torch.Tensor):
            parts.append((tuple(a.shape), a.dtype, a.device, a.requires_grad))
        else:
            parts.append(a)
    return tuple(parts)


class CompiledReference:
    """``torch.compile`` of one reference op, compiled once per input signature.

    Dynamo keeps a bounded number of compiled variants of one function (its recompile limit,
    8) and then runs it eagerly without an error, which would time eager PyTorch under this
    provider's name. So a new signature (shapes, dtypes, device, Python constants, grad mode)
    resets the compiler state and compiles afresh (``dynamic=False``: specialised to the
    shapes): one compiled variant lives at a time, and the sweep visits one shape at a time.
    """

    _generation = 0  # bumped by every torch.compiler.reset(): earlier compilations are gone

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self._key: tuple[Any, ...] | None = None
        self._compiled: Callable[..., Any] | None = None
        self._compiled_generation = -1

    def __call__(self, *args: Any) -> Any:
        key = _signature(args)
        if (
            self._compiled is None
            or key != self._key
            or self._compiled_generation != CompiledReference._generation
        ):
            return self._compile_and_run(key, args)
        return self._compiled(*args)

    def _compile_and_run(self, key: tuple[Any, ...], args: tuple[Any, ...]) -> Any:
        device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        reason = compile_unavailable_reason(device)
        if reason is not None:
            raise ProviderUnavailable(reason)
        torch.compiler.reset()
        CompiledReference._generation += 1
        self._compiled = torch.compile(self.fn, dynamic=False)
        self._key, self._compiled_generation = key, CompiledReference._generation
        try:
            return self._compiled(*args)
        except Exception as exc:
            self._compiled = None
            if type(exc).__module__.startswith(("torch._dynamo", "torch._inductor")):
                raise ProviderUnavailable(
                    f"torch.compile failed here: {type(exc).__name__}: {str(exc)[:300]}"
                ) from None
            raise


COMPILED_TOPK = CompiledReference(reference.modulated_topk)
COMPILED_SCORE = CompiledReference(reference.modulated_score)


class WarmedProvider:
    """A provider callable whose first call does work that no timing may include (a
    compilation): the timer calls :meth:`warmup` first, outside every measurement."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn

    def __call__(self) -> Any:
        return self.fn()

    def warmup(self) -> None:
        self.fn()


# ----------------------------------------------------------------------------- problem
@dataclass
class Problem:
    """Inputs of one (N, B, modulation) point, computed outside the timing."""

    corpus: Corpus
    model: IMRNN
    official: torch.nn.Module | None
    official_reason: str | None
    queries: torch.Tensor  # (B, m) base-encoder queries (unit rows)
    transform: torch.Tensor  # (B, OUT) query transform act(A_q(p(q)))
    q_tilde: torch.Tensor  # (B, m) refined queries
    fs_ids: torch.Tensor | None = None  # (B, feedback_k) first-stage ids (rerank)


# Set from SweepConfig.fused_backend: "triton" on CPU tensors runs the kernels through
# Triton's interpreter (TRITON_INTERPRET=1): slow, a smoke test of the GPU code path.
_FUSED_OVERRIDE: list[str] = []


def set_fused_backend(name: str) -> None:
    """``"auto"``: Triton on a GPU, the chunked CPU path otherwise; else force ``name``."""
    _FUSED_OVERRIDE.clear()
    if name != "auto":
        _FUSED_OVERRIDE.append(name)


def fused_backend(device: str) -> str:
    """The dispatch backend of the ``fused`` provider: Triton on a GPU, the chunked CPU path
    otherwise (unless overridden by ``--fused-backend``)."""
    if _FUSED_OVERRIDE:
        return _FUSED_OVERRIDE[-1]
    return "triton" if device == "cuda" else "cpu"


def query_state(
    model: IMRNN,
    corpus: torch.Tensor,
    queries: torch.Tensor,
    feedback_k: int,
    seed: int,
    device: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(transform, q~) for exhaustive scoring, from a random feedback set (inputs only)."""
    gen = torch.Generator().manual_seed(seed + 5)
    ids = torch.randint(0, corpus.shape[0], (queries.shape[0], feedback_k), generator=gen)
    with torch.no_grad(), imrnns_kernels.use_backend(fused_backend(device)):
        pq = model.project(queries)
        tq, _, q_tilde = model.query_state(pq, corpus, ids.to(device))
    return tq, q_tilde


def first_stage_fn(
    corpus: Corpus, queries: torch.Tensor, k: int
) -> tuple[str, Callable[[], tuple[Any, Any]]]:
    """(engine name, callable) of the unmodulated top-k over the corpus."""
    if corpus.faiss_index is not None:
        index = corpus.faiss_index
        qn = np.ascontiguousarray(F.normalize(queries.float(), dim=1).cpu().numpy())
        return "faiss_flat", lambda: index.search(qn, k)
    return "torch_ip", lambda: torch_ip_topk(corpus.data, F.normalize(queries.float(), dim=1), k)


def first_stage_ids(corpus: Corpus, queries: torch.Tensor, k: int) -> torch.Tensor:
    """(B, k) int64 first-stage ids on the corpus's device."""
    _, fn = first_stage_fn(corpus, queries, k)
    ids = fn()[1]
    ids = torch.from_numpy(ids) if isinstance(ids, np.ndarray) else ids
    return ids.to(corpus.data.device, torch.int64)


# ----------------------------------------------------------------------------- provider tables
def _compiled_provider(device: str, fn: Callable[[], Any]) -> Callable[[], Any] | tuple[str, str]:
    reason = compile_unavailable_reason(device)
    return ("unavailable", reason) if reason is not None else WarmedProvider(fn)


def exhaustive_providers(p: Problem, k: int, device: str) -> ProviderTable:
    """provider -> callable, or (skip_code, reason)."""
    model, corpus = p.model, p.corpus.data
    cfg = model.config
    lnw, lnb = model.doc_norm.weight.detach(), model.doc_norm.bias.detach()
    args = (corpus, p.transform, lnw, lnb, p.q_tilde)
    backend = fused_backend(device)

    def run(name: str) -> Any:
        with imrnns_kernels.use_backend(name):
            return imrnns_kernels.modulated_topk(*args, k, cfg.modulation, cfg.layer_norm_eps)

    out: ProviderTable = {
        "fused": lambda: run(backend),
        "reference": lambda: run("reference"),
        "compiled_reference": _compiled_provider(
            device, lambda: COMPILED_TOPK(*args, k, cfg.modulation, cfg.layer_norm_eps)
        ),
        "naive": lambda: naive_exhaustive(*args, k, cfg.modulation, cfg.layer_norm_eps),
        "torch_ip": lambda: torch_ip_topk(corpus, p.q_tilde, k),
        "official": (
            "not_applicable",
            "the official imrnns 0.2.3 scores given candidates only (no exhaustive mode)",
        ),
    }
    if p.corpus.faiss_index is not None:
        index = p.corpus.faiss_index
        qn = np.ascontiguousarray(p.q_tilde.float().cpu().numpy())
        out["faiss_flat"] = lambda: index.search(qn, k)
    else:
        out["faiss_flat"] = ("unavailable", p.corpus.faiss_reason or "no faiss index")
    return out


def rerank_providers(p: Problem, k: int, device: str) -> ProviderTable:
    """provider -> callable of the second stage (first stage excluded), or a skip."""
    model, corpus, ids, q = p.model, p.corpus.data, p.fs_ids, p.queries
    if ids is None:
        raise ValueError("rerank providers need the first-stage ids (Problem.fs_ids)")
    backend = fused_backend(device)
    cfg = model.config
    lnw, lnb = model.doc_norm.weight.detach(), model.doc_norm.bias.detach()

    def pipeline(name: str) -> Any:
        with imrnns_kernels.use_backend(name):
            pq = model.project(q)
            tq, _, q_tilde = model.query_state(pq, corpus, ids)
            scores = model.score_ids(corpus, ids, tq, q_tilde)
            return topk_by_id(scores, ids, k)

    def compiled_pipeline() -> Any:
        # The query side as the reference pipeline computes it; the candidate scoring (the
        # op the fused kernels replace) compiled.
        with imrnns_kernels.use_backend("reference"):
            pq = model.project(q)
            tq, _, q_tilde = model.query_state(pq, corpus, ids)
        scores = COMPILED_SCORE(
            corpus, ids, tq, lnw, lnb, q_tilde, cfg.modulation, cfg.layer_norm_eps
        )
        return topk_by_id(scores, ids, k)

    out: ProviderTable = {
        "fused": lambda: pipeline(backend),
        "reference": lambda: pipeline("reference"),
        "compiled_reference": _compiled_provider(device, compiled_pipeline),
        "naive": lambda: naive_rerank(model, q, corpus, ids, k),
    }
    if p.official is not None:
        official = p.official
        out["official"] = lambda: official_rerank(official, q, corpus, ids, k)
    else:
        out["official"] = ("unavailable", p.official_reason or "official model unavailable")
    # The floors, in rerank, are the first stage alone: a zero-cost second stage.
    engine = "faiss_flat" if p.corpus.faiss_index is not None else "torch_ip"
    out[engine] = lambda: None
    other = "torch_ip" if engine == "faiss_flat" else "faiss_flat"
    out[other] = (
        "not_applicable",
        f"the first stage here is {engine}; {other} as a floor applies where it is the first stage",
    )
    if engine == "torch_ip" and p.corpus.faiss_reason:
        out["faiss_flat"] = ("unavailable", p.corpus.faiss_reason)
    return out
