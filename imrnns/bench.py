"""Latency scaling sweep: corpus size N from 10^4 to 10^7 (and beyond on a GPU), every provider.

``imrnns bench`` and ``python -m benchmarks.scaling`` run :func:`main`. For each corpus size N,
batch size B, modulation form and mode it times every provider on the same inputs and writes
``<out>/<machine>.json`` (validated by ``benchmarks/schema/scaling.schema.json``), a log-log
plot ``<machine>.png`` (latency vs N, one line per provider) and a Markdown table
``<machine>.md``.

Modes (k results per query, working dim m, feedback set of ``feedback_k``):

- ``exhaustive``: the op :func:`imrnns_kernels.modulated_topk` over the whole corpus. The query
  state (query transform, refined query) is computed once, outside the timing.
- ``rerank``: a first stage (faiss ``IndexFlatIP`` top-``feedback_k`` over the projected
  corpus; a chunked PyTorch inner product where faiss is missing, e.g. on a GPU machine
  without faiss-gpu), then projection + :func:`adapter_reduce` + LayerNorm +
  :func:`modulated_score` on the candidates + the final top-k. The first stage is the same for
  every provider: it is timed once per (N, B) and added to each provider's second stage
  (``latency_s = first_stage_s + stage_s``; both are recorded).

Providers: ``fused`` (Triton kernels on a GPU, the chunked CPU path otherwise),
``reference`` (:mod:`imrnns_kernels.reference`, materialising), ``naive`` (the straightforward
PyTorch a user would write: per-query loop for exhaustive, (B, K, OUT) hypernet outputs for
rerank), ``faiss_flat`` (unmodulated inner product: the floor; in rerank, the first stage
alone), ``torch_ip`` (the same floor in PyTorch; the GPU floor when faiss-gpu is missing) and
``official`` (the ``imrnns`` 0.2.3 package's ``IMRNN.forward`` on the candidates; rerank and
diagonal only, since that is all it implements).

Skips are recorded, never crashed into: a provider whose estimated peak memory exceeds what
is available, or whose predicted time for one call (extrapolated from the smaller sizes)
exceeds the per-point budget, gets ``status="skipped"`` with a ``skip_code`` and a reason.
Before any timing the providers are checked against the reference on a small problem; a
wrong ``fused`` result aborts the run (:class:`BenchAbort`).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import imrnns_kernels as K
from imrnns.model import IMRNN, IMRNNConfig
from imrnns_kernels.ops import _scoring_common as C

SCHEMA_VERSION = 1
MODES = ("exhaustive", "rerank")
MODULATIONS = ("diagonal", "affine")
PROVIDERS = ("fused", "reference", "naive", "faiss_flat", "torch_ip", "official")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SKIP_CODES = ("memory", "time", "not_applicable", "unavailable", "deadline", "error")

# Physical ceilings for the roofline columns (DESIGN.md section 2), overridable with
# IMRNNS_PEAK_GBPS / IMRNNS_PEAK_FLOPS. CPU: the 2-core CI machines (about 19 GB/s, about
# 140 GFLOP/s fp32 GEMM). GPU: bandwidth is measured on the spot (device-to-device copy,
# bytes read + written); FLOP/s is the card's fp32 FMA peak, because the kernels accumulate
# with fp32-accurate dots after upcasting bf16 tiles ("tf32x3": three TF32 tensor-core
# products per dot in the scoring kernels, "ieee" FMA in the adapter kernels), not on the
# bf16 tensor cores; the fp32 peak is the conventional yardstick for that accuracy.
CPU_PEAK_GBPS = 19.0
CPU_PEAK_FLOPS = 140e9
GPU_FP32_PEAK_FLOPS = {"H100": 67e12, "H200": 67e12, "A100": 19.5e12, "L40S": 91.6e12}
GPU_BF16_TC_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}
# Memory estimates must stay under this share of what is available (allocator slack,
# other processes on a shared machine).
MEMORY_HEADROOM = 0.8
# A correctness gate, not a tolerance fitted to pass: every path computes in fp32 from the
# same stored values; top-k scores are cosines in [-1, 1].
CHECK_ATOL = 1e-4
CHECK_MIN_ID_AGREEMENT = 0.99
# Slopes above this (log-log, N >= LARGE_N) are flagged as worse than linear.
SUPERLINEAR = 1.15
LARGE_N = 100_000


class BenchAbort(RuntimeError):
    """The fused provider disagrees with the reference: timing wrong results is meaningless."""


# ----------------------------------------------------------------------------- configuration
@dataclass
class SweepConfig:
    """Everything that decides what a sweep measures (recorded in the JSON)."""

    device: str = "cpu"
    sizes: list[int] = field(default_factory=lambda: [10_000, 100_000, 1_000_000, 10_000_000])
    batches: list[int] = field(default_factory=lambda: [1, 32, 256])
    k: int = 100
    dim: int = 256
    feedback_k: int = 100
    modulations: list[str] = field(default_factory=lambda: list(MODULATIONS))
    modes: list[str] = field(default_factory=lambda: list(MODES))
    providers: list[str] = field(
        default_factory=lambda: ["fused", "reference", "naive", "faiss_flat", "official"]
    )
    dtype: str = "float16"
    budget_s: float = 60.0
    repeats: int = 5
    deadline_s: float | None = None
    threads: int = 0
    seed: int = 0
    verify: bool = True
    targets: bool = True
    target_n: int = 1_000_000
    target_batch: int = 16
    max_memory_gb: float | None = None
    install_official: bool = True
    fused_backend: str = "auto"
    plot: bool = True
    out: str = "benchmarks/results"
    machine: str | None = None

    def validate(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device cuda requested but torch.cuda.is_available() is False")
        for name, values, known in (
            ("modes", self.modes, MODES),
            ("modulations", self.modulations, MODULATIONS),
            ("providers", self.providers, PROVIDERS),
        ):
            bad = [v for v in values if v not in known]
            if bad or not values:
                raise ValueError(f"{name} must be a non-empty subset of {known}, got {values}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        for name in ("k", "dim", "feedback_k", "repeats", "target_n", "target_batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not self.sizes or any(n <= 0 for n in self.sizes):
            raise ValueError(f"sizes must be positive, got {self.sizes}")
        if not self.batches or any(b <= 0 for b in self.batches):
            raise ValueError(f"batches must be positive, got {self.batches}")
        if self.budget_s <= 0:
            raise ValueError(f"budget_s must be positive, got {self.budget_s}")
        if self.fused_backend not in ("auto", "cpu", "triton"):
            raise ValueError(
                f"fused_backend must be auto, cpu or triton, got {self.fused_backend!r}"
            )
        if self.fused_backend == "cpu" and self.device == "cuda":
            raise ValueError("fused_backend cpu runs on CPU tensors only")
        interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
        if self.fused_backend == "triton" and self.device == "cpu" and not interp:
            raise ValueError("fused_backend triton on the CPU needs TRITON_INTERPRET=1")


# ----------------------------------------------------------------------------- machine facts
def cpu_model() -> str:
    """The CPU's model name (``lscpu``), for every figure we quote."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _gpu_family(name: str) -> str | None:
    for family in GPU_FP32_PEAK_FLOPS:
        if family.lower() in name.lower():
            return family
    return None


def measure_copy_gbps(device: str, nbytes: int = 1 << 30) -> float:
    """Device memory bandwidth of a large copy, bytes read + written per second (median)."""
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(6 if device == "cuda" else 3):
        t = _time_call(lambda: dst.copy_(src), device)
        if i > 0:  # the first copy pays page faults / lazy init
            times.append(t)
    return 2 * n * 4 / statistics.median(times) / 1e9


def machine_info(cfg: SweepConfig) -> dict[str, Any]:
    """Hardware and software facts of this run, and the roofline ceilings it uses."""
    import triton

    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count() or 1,
        "memory_total_bytes": _meminfo().get("MemTotal"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "numpy": np.__version__,
        "faiss": _faiss_version(),
        "torch_threads": torch.get_num_threads(),
        "device": cfg.device,
        # Other processes share the machine: the load when the run started (and, in
        # Sweep.document, when it ended) says how far to trust small differences.
        "load_average_start": _loadavg(),
    }
    env_gbps = os.environ.get("IMRNNS_PEAK_GBPS")
    env_flops = os.environ.get("IMRNNS_PEAK_FLOPS")
    if cfg.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        family = _gpu_family(props.name)
        copy = measure_copy_gbps("cuda")
        info.update(
            device_name=props.name,
            gpu_memory_bytes=int(props.total_memory),
            gpu_multiprocessors=int(props.multi_processor_count),
            cuda=torch.version.cuda,
            measured_copy_gbps=copy,
            peak_gbps=float(env_gbps) if env_gbps else copy,
            peak_gbps_source="IMRNNS_PEAK_GBPS" if env_gbps else "measured device copy",
            peak_flops=float(env_flops)
            if env_flops
            else GPU_FP32_PEAK_FLOPS.get(family or "", None),
            peak_flops_source="IMRNNS_PEAK_FLOPS"
            if env_flops
            else "fp32 FMA peak of the card (the kernels' dots are fp32-accurate)",
            bf16_tensor_core_peak_flops=GPU_BF16_TC_PEAK_FLOPS.get(family or "", None),
        )
    else:
        info.update(
            device_name=f"{info['cpu_model']} ({info['cpu_cores']} cores, CPU)",
            measured_copy_gbps=measure_copy_gbps("cpu", 1 << 28),
            peak_gbps=float(env_gbps) if env_gbps else CPU_PEAK_GBPS,
            peak_gbps_source="IMRNNS_PEAK_GBPS" if env_gbps else "DESIGN.md section 2",
            peak_flops=float(env_flops) if env_flops else CPU_PEAK_FLOPS,
            peak_flops_source="IMRNNS_PEAK_FLOPS" if env_flops else "DESIGN.md section 2",
        )
    return info


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_slug(info: dict[str, Any]) -> str:
    if info["device"] == "cuda":
        return "gpu-" + _slug(info["device_name"])
    return f"cpu-{_slug(info['cpu_model'])}-{info['cpu_cores']}c"


def _faiss_version() -> str | None:
    try:
        import faiss
    except ImportError:
        return None
    return getattr(faiss, "__version__", "unknown")


def _meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                key, rest = line.split(":", 1)
                out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


def available_bytes(device: str, cap_gb: float | None = None) -> int:
    """Memory a new allocation can use now: free GPU memory, or the kernel's MemAvailable."""
    if device == "cuda":
        free = int(torch.cuda.mem_get_info()[0])
    else:
        info = _meminfo()
        free = info.get("MemAvailable", 8 << 30)
    if cap_gb is not None:
        free = min(free, int(cap_gb * 2**30))
    return free


# ----------------------------------------------------------------------------- measuring
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time_call(fn: Callable[[], Any], device: str) -> float:
    """Seconds for one call. CUDA: events around the call (they include host-side gaps, so
    host work inside the call, e.g. a CPU faiss search, is counted)."""
    if device == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _proc_status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) * 1024
    return out


@contextlib.contextmanager
def peak_memory(device: str) -> Iterator[dict[str, int | None]]:
    """Peak extra memory of the body: GPU ``max_memory_allocated`` above the allocation before,
    or (Linux) resident high-water mark above the resident size before (``clear_refs`` = 5
    resets the mark). ``result["bytes"]`` is None where neither is available."""
    result: dict[str, int | None] = {"bytes": None}
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        yield result
        torch.cuda.synchronize()
        result["bytes"] = int(torch.cuda.max_memory_allocated() - before)
        return
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        before = _proc_status()["VmRSS"]
    except OSError:
        yield result
        return
    yield result
    result["bytes"] = max(0, _proc_status()["VmHWM"] - before)


# ----------------------------------------------------------------------------- inputs
def unit_rows(
    n: int, m: int, dtype: torch.dtype, device: str, seed: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """(n, m) random unit rows (projected embeddings), generated in slabs to bound memory."""
    gen = torch.Generator(device=device).manual_seed(seed)
    out = torch.empty(n, m, dtype=dtype, device=device) if out is None else out
    slab = 1 << (20 if device == "cuda" else 16)
    for r0 in range(0, n, slab):
        rows = min(slab, n - r0)
        x = torch.randn(rows, m, generator=gen, device=device)
        out[r0 : r0 + rows] = F.normalize(x, dim=1)
    return out


def make_model(m: int, modulation: str, seed: int, device: str) -> IMRNN:
    """An IMRNN with n = m, an identity projector (so the stored unit rows are their own
    projection and the official model, loading the same weights, sees the same function) and
    perturbed HyperNets and LayerNorms, so nothing reduces to an identity shortcut."""
    model = IMRNN(IMRNNConfig(input_dim=m, modulation=modulation)).eval()
    gen = torch.Generator().manual_seed(seed + 17)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("projector"):
                continue
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.to(device)


@dataclass
class Corpus:
    """The projected corpus in its storage dtype, and the first-stage index over it."""

    data: torch.Tensor
    faiss_index: Any = None
    faiss_reason: str | None = None

    @property
    def n(self) -> int:
        return int(self.data.shape[0])

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


def build_corpus(
    n: int, m: int, dtype: torch.dtype, device: str, seed: int, want_faiss: bool, budget: int
) -> Corpus:
    """Generate the corpus; on request build a faiss ``IndexFlatIP`` over its fp32 values.

    The faiss index is filled in place (``codes.resize`` then a numpy view), so building it
    costs its N x m x 4 bytes and nothing transient; with fp32 storage on the CPU the torch
    corpus *is* a view of the faiss codes (one copy in memory).
    """
    faiss_mod = _faiss()
    item = torch.finfo(dtype).bits // 8
    need_faiss = want_faiss and faiss_mod is not None
    reason = None if faiss_mod is not None else "faiss is not installed"
    fs_bytes = n * m * 4
    if need_faiss and device == "cuda" and not hasattr(faiss_mod, "StandardGpuResources"):
        need_faiss, reason = False, "faiss-gpu is not installed (a CPU faiss scan is no GPU floor)"
    if need_faiss and device == "cpu" and dtype != torch.float32:
        corpus_bytes = n * m * item
        if corpus_bytes + fs_bytes > MEMORY_HEADROOM * budget:
            need_faiss = False
            reason = (
                f"faiss IndexFlatIP needs {fs_bytes / 2**30:.1f} GiB fp32 beside the "
                f"{corpus_bytes / 2**30:.1f} GiB corpus; {budget / 2**30:.1f} GiB available"
            )
    if not need_faiss:
        return Corpus(unit_rows(n, m, dtype, device, seed), None, reason)
    index = faiss_mod.IndexFlatIP(m)
    index.codes.resize(fs_bytes)
    index.ntotal = n
    view = faiss_mod.rev_swig_ptr(index.codes.data(), fs_bytes).view(np.float32).reshape(n, m)
    fp32 = torch.from_numpy(view)
    if device == "cpu" and dtype == torch.float32:
        unit_rows(n, m, dtype, device, seed, out=fp32)
        return Corpus(fp32, index)
    data = unit_rows(n, m, dtype, device, seed)
    step = 1 << 18
    for r0 in range(0, n, step):
        fp32[r0 : r0 + step].copy_(data[r0 : r0 + step].float().cpu())
    if device == "cuda":
        res = faiss_mod.StandardGpuResources()
        gpu_index = faiss_mod.index_cpu_to_gpu(res, 0, index)
        gpu_index._imrnns_res = res  # keep the resources alive with the index
        return Corpus(data, gpu_index)
    return Corpus(data, index)


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        return None
    return faiss


# ----------------------------------------------------------------------------- providers
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
    matmul, top-k (the batched form would hold (B, N, m): that is the reference)."""
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
    materialised ((B, K, OUT): 26 MB per query for affine at m=256), then averaged."""
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
    top = C.StreamingTopK(queries.shape[0], k, corpus.device)
    for r0 in range(0, n, chunk):
        d = corpus[r0 : r0 + chunk]
        s = (d @ q.t()) if on_gpu else (d.float() @ q.t())
        top.add(s.t().float(), r0)
    return top.result()


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
    with torch.no_grad(), K.use_backend(fused_backend(device)):
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
    _, fn = first_stage_fn(corpus, queries, k)
    ids = fn()[1]
    ids = torch.from_numpy(ids) if isinstance(ids, np.ndarray) else ids
    return ids.to(corpus.data.device, torch.int64)


def exhaustive_providers(
    p: Problem, k: int, device: str
) -> dict[str, Callable[[], Any] | tuple[str, str]]:
    """provider -> callable, or (skip_code, reason)."""
    model, corpus = p.model, p.corpus.data
    cfg = model.config
    lnw, lnb = model.doc_norm.weight.detach(), model.doc_norm.bias.detach()
    args = (corpus, p.transform, lnw, lnb, p.q_tilde)
    backend = fused_backend(device)

    def run(name: str) -> Any:
        with K.use_backend(name):
            return K.modulated_topk(*args, k, cfg.modulation, cfg.layer_norm_eps)

    out: dict[str, Callable[[], Any] | tuple[str, str]] = {
        "fused": lambda: run(backend),
        "reference": lambda: run("reference"),
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


def rerank_providers(
    p: Problem, k: int, device: str
) -> dict[str, Callable[[], Any] | tuple[str, str]]:
    """provider -> callable of the second stage (first stage excluded), or a skip."""
    model, corpus, ids, q = p.model, p.corpus.data, p.fs_ids, p.queries
    if ids is None:
        raise ValueError("rerank providers need the first-stage ids (Problem.fs_ids)")
    backend = fused_backend(device)

    def pipeline(name: str) -> Any:
        with K.use_backend(name):
            pq = model.project(q)
            tq, _, q_tilde = model.query_state(pq, corpus, ids)
            scores = model.score_ids(corpus, ids, tq, q_tilde)
            return C.topk_by_id(scores, ids, k)

    out: dict[str, Callable[[], Any] | tuple[str, str]] = {
        "fused": lambda: pipeline(backend),
        "reference": lambda: pipeline("reference"),
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


# ----------------------------------------------------------------------------- cost models
def transform_width(m: int, modulation: str) -> int:
    return 2 * m if modulation == "diagonal" else m * m + m


def estimate_bytes(
    provider: str,
    mode: str,
    modulation: str,
    n: int,
    b: int,
    m: int,
    kf: int,
    item: int,
    device: str,
) -> int:
    """Peak extra memory of one call, from the shapes each provider materialises."""
    out = transform_width(m, modulation)
    f4 = 4
    small = 64 << 20
    if mode == "exhaustive":
        if provider == "fused":
            # Chunked: a few chunk-sized buffers per worker (GPU: a 64 MiB score buffer).
            return int(min(0.3 * n * m * item, 256 << 20)) + small
        if provider == "reference":
            # (B, N, m): gathered rows, fp32 copy, transformed, LayerNormed, normalised.
            return b * n * (m * (4 * f4 + item) + 32) + small
        if provider == "naive":
            return n * m * f4 * (3 + (item != 4)) + 8 * n + small
        if provider == "torch_ip":
            return 4 * b * min(n, 1 << 20) * f4 + (1 << 15) * m * f4 + small
        return small
    rows = b * kf
    if provider == "fused":
        return rows * m * f4 * 4 + b * out * f4 * 4 + small
    if provider in ("reference", "naive"):
        return rows * out * f4 * 2 + rows * m * f4 * 6 + rows * 192 * f4 * 2 + small
    if provider == "official":
        return rows * out * f4 * 3 + rows * m * f4 * 10 + small
    return small


def useful_work(
    provider: str, mode: str, modulation: str, n: int, b: int, m: int, item: int, fs_item: int
) -> tuple[float | None, float | None]:
    """(bytes that must be read, FLOPs) of the computation, for the roofline columns.

    Exhaustive: the corpus is read once (one pass per block of queries is the ideal); the
    diagonal algebra is 8 m multiply-adds per (document, query) (6 atoms dotted with d, 2 with
    d*d), affine m^2 + 6 m. Floors: 2 m per (document, query). Rerank: the first-stage scan
    (2 m per document and query); the candidate stage is negligible beside it at large N."""
    if mode == "exhaustive":
        if provider in ("faiss_flat", "torch_ip"):
            bytes_ = n * m * (4 if provider == "faiss_flat" else item)
            return float(bytes_), 2.0 * n * m * b
        per = 8 * m if modulation == "diagonal" else m * m + 6 * m
        return float(n * m * item), 2.0 * n * b * per
    return float(n * m * fs_item), 2.0 * n * m * b


# ----------------------------------------------------------------------------- planning
@dataclass
class Planner:
    """Predicts one call's time from the smaller sizes and decides what to skip.

    Exhaustive cost and the first stage grow linearly with N (and at most linearly with B);
    a rerank second stage touches B x feedback_k rows whatever N is, so it is carried over
    unchanged. Every prediction names its basis in the skip reason."""

    budget_s: float
    history: dict[tuple[str, ...], list[tuple[int, int, float]]] = field(default_factory=dict)
    too_slow: dict[tuple[str, ...], list[tuple[int, int, str]]] = field(default_factory=dict)

    def record(self, key: tuple[str, ...], n: int, b: int, seconds: float) -> None:
        self.history.setdefault(key, []).append((n, b, seconds))

    def mark_slow(self, key: tuple[str, ...], n: int, b: int, why: str) -> None:
        self.too_slow.setdefault(key, []).append((n, b, why))

    def predict(
        self, key: tuple[str, ...], n: int, b: int, n_exponent: float
    ) -> tuple[float, str] | None:
        hist = self.history.get(key, [])
        same_b = [(n0, b0, t) for n0, b0, t in hist if b0 == b and n0 <= n]
        if same_b:
            n0, b0, t = max(same_b)
            return t * (n / n0) ** n_exponent, f"{t:.3g} s measured at N={n0}, B={b0}"
        smaller = [(n0 * b0, n0, b0, t) for n0, b0, t in hist if n0 <= n and b0 <= b]
        if smaller:
            _, n0, b0, t = max(smaller)
            pred = t * (n / n0) ** n_exponent * (b / b0)
            return pred, f"{t:.3g} s measured at N={n0}, B={b0}"
        return None

    def check(
        self, key: tuple[str, ...], n: int, b: int, n_exponent: float
    ) -> tuple[float | None, str | None]:
        """(predicted seconds or None, skip reason or None)."""
        for n0, b0, why in self.too_slow.get(key, []):
            if n0 <= n and b0 <= b:
                return None, f"already over the time budget at N={n0}, B={b0} ({why})"
        pred = self.predict(key, n, b, n_exponent)
        if pred is None:
            return None, None
        seconds, basis = pred
        if seconds > self.budget_s:
            why = (
                f"predicted {seconds:.3g} s per call > per-point budget {self.budget_s:g} s "
                f"(linear extrapolation from {basis})"
            )
            self.mark_slow(key, n, b, why)
            return seconds, why
        return seconds, None


def time_providers(
    fns: dict[str, Callable[[], Any]],
    predicted: dict[str, float | None],
    device: str,
    budget_s: float,
    repeats: int,
) -> dict[str, dict[str, Any]]:
    """Interleaved timing. Each provider's first call warms up (lazy inits, compilation) and
    gives its peak memory; it also counts as a timed call when it is long (predicted or measured
    over a tenth of the budget: warm-up effects are then negligible, and a second call would
    double the cost of the point). Then rounds of one call per provider, so load drifts on a
    shared machine hit every provider alike; a provider stops after ``repeats`` timed calls, or
    when one more call would take its total past ``budget_s`` (it always gets one)."""
    res: dict[str, dict[str, Any]] = {
        name: {"times": [], "peak": None, "error": None} for name in fns
    }
    for name, fn in fns.items():
        try:
            with peak_memory(device) as peak:
                t = _time_call(fn, device)
            res[name]["peak"] = peak["bytes"]
            pred = predicted.get(name)
            if max(t, pred or 0.0) > budget_s / 10:
                res[name]["times"].append(t)
        except Exception as exc:  # record, go on: one provider must not sink the sweep
            # Drop the traceback: its frames would keep the failed call's tensors alive.
            res[name]["error"] = exc.with_traceback(None)
        if res[name]["error"] is not None:
            _free(device)
    for _ in range(repeats):
        for name, fn in fns.items():
            r = res[name]
            if r["error"] is not None or len(r["times"]) >= repeats:
                continue
            if r["times"] and sum(r["times"]) + r["times"][-1] > budget_s:
                continue
            try:
                r["times"].append(_time_call(fn, device))
            except Exception as exc:  # as above
                r["error"] = exc.with_traceback(None)
            if r["error"] is not None:
                _free(device)
    return res


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- the sweep
class Sweep:
    """Runs verification, targets and the sweep; accumulates the result document."""

    def __init__(self, cfg: SweepConfig, log: Callable[[str], None] | None = None) -> None:
        cfg.validate()
        self.cfg = cfg
        self.device = cfg.device
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.dtype = DTYPES[cfg.dtype]
        self.item = torch.finfo(self.dtype).bits // 8
        self.planner = Planner(cfg.budget_s)
        self.points: list[dict[str, Any]] = []
        self.started = time.perf_counter()
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        _FUSED_OVERRIDE.clear()
        if cfg.fused_backend != "auto":
            _FUSED_OVERRIDE.append(cfg.fused_backend)
        faiss_mod = _faiss()
        if faiss_mod is not None and hasattr(faiss_mod, "omp_set_num_threads"):
            faiss_mod.omp_set_num_threads(torch.get_num_threads())
        self.machine = machine_info(cfg)
        self.name = cfg.machine or machine_slug(self.machine)
        self.out_dir = Path(cfg.out)
        self.models: dict[str, IMRNN] = {}
        self.officials: dict[str, tuple[torch.nn.Module | None, str | None]] = {}
        self.checks: list[dict[str, Any]] = []
        self.targets: dict[str, Any] = {}

    # ------------------------------------------------------------------ helpers
    def model(self, modulation: str) -> IMRNN:
        if modulation not in self.models:
            self.models[modulation] = make_model(
                self.cfg.dim, modulation, self.cfg.seed, self.device
            )
            if "official" in self.cfg.providers:
                self.officials[modulation] = load_official(
                    self.models[modulation], self.cfg.install_official
                )
            else:
                self.officials[modulation] = (None, "not requested")
        return self.models[modulation]

    def queries(self, b: int) -> torch.Tensor:
        return unit_rows(b, self.cfg.dim, torch.float32, self.device, self.cfg.seed + 1000 + b)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def past_deadline(self) -> bool:
        return self.cfg.deadline_s is not None and self.elapsed() > self.cfg.deadline_s

    def budget(self) -> int:
        return available_bytes(self.device, self.cfg.max_memory_gb)

    # ------------------------------------------------------------------ verification
    def verify(self) -> list[dict[str, Any]]:
        """Every provider against the reference on a small problem (non-power-of-two N).

        Raises:
            BenchAbort: the fused provider's results are wrong.
        """
        cfg, dev = self.cfg, self.device
        n, b = 2000 + 17, 5
        k = min(cfg.k, 50)
        for modulation in cfg.modulations:
            model = self.model(modulation)
            corpus = build_corpus(n, cfg.dim, self.dtype, dev, cfg.seed + 7, True, self.budget())
            q = self.queries(b)
            tq, qt = query_state(model, corpus.data, q, cfg.feedback_k, cfg.seed, dev)
            official, why = self.officials[modulation]
            prob = Problem(corpus, model, official, why, q, tq, qt)
            for mode in cfg.modes:
                if mode == "rerank":
                    prob.fs_ids = first_stage_ids(corpus, q, min(cfg.feedback_k, n))
                    fns = rerank_providers(prob, k, dev)
                else:
                    fns = exhaustive_providers(prob, k, dev)
                with torch.no_grad():
                    ref = fns["reference"]()
                for name in ("fused", "naive", "official"):
                    if name not in cfg.providers or not callable(fns.get(name)):
                        continue
                    if name == "official":
                        # The official model re-normalises its inputs: compare on fp32 rows,
                        # exactly unit, with the reference on the same rows.
                        c32 = Corpus(corpus.data.float())
                        p32 = Problem(c32, model, official, why, q, tq, qt, prob.fs_ids)
                        f32 = rerank_providers(p32, k, dev)
                        with torch.no_grad():
                            got, want = f32["official"](), f32["reference"]()
                    else:
                        with torch.no_grad():
                            got, want = fns[name](), ref
                    check = compare(got, want)
                    check.update(mode=mode, modulation=modulation, provider=name, n=n, batch=b)
                    self.checks.append(check)
                    status = "ok" if check["passed"] else "FAILED"
                    self.log(
                        f"check {mode:10s} {modulation:8s} {name:9s} vs reference: {status} "
                        f"(max |d score| {check['max_abs_score_diff']:.2e}, "
                        f"id agreement {check['id_agreement']:.4f})"
                    )
            del corpus
            _free(dev)
        bad = [c for c in self.checks if c["provider"] == "fused" and not c["passed"]]
        if bad:
            raise BenchAbort(f"fused results disagree with the reference: {bad}")
        return self.checks

    # ------------------------------------------------------------------ targets
    def run_targets(self) -> dict[str, Any]:
        """The kernel issues' ratios, measured in this run: exhaustive, N=target_n, fp32
        storage, B=target_batch, diagonal, k: fused vs the unmodulated floor (<= 2x) and
        fused vs naive (>= 5x). Calls are interleaved so load drifts hit all alike."""
        cfg, dev = self.cfg, self.device
        n, b, m = cfg.target_n, cfg.target_batch, cfg.dim
        need = n * m * 4 * 5  # corpus + the naive provider's (N, m) fp32 temporaries
        if need > MEMORY_HEADROOM * self.budget():
            self.targets = {"status": "skipped", "reason": f"needs ~{need / 2**30:.1f} GiB"}
            return self.targets
        model = self.model("diagonal")
        corpus = build_corpus(n, m, torch.float32, dev, cfg.seed + 3, True, self.budget())
        q = self.queries(b)
        tq, qt = query_state(model, corpus.data, q, cfg.feedback_k, cfg.seed, dev)
        fns = exhaustive_providers(Problem(corpus, model, None, None, q, tq, qt), cfg.k, dev)
        floor = "faiss_flat" if callable(fns["faiss_flat"]) else "torch_ip"
        chosen = {"fused": fns["fused"], floor: fns[floor], "naive": fns["naive"]}
        with torch.no_grad():
            with peak_memory(dev) as peak:
                fused_out = chosen["fused"]()
            naive_out = chosen["naive"]()
            chosen[floor]()
            _sync(dev)
            times: dict[str, list[float]] = {name: [] for name in chosen}
            for r in range(3):
                for name, fn in chosen.items():
                    if name == "naive" and r >= 2:
                        continue  # the slowest: two calls are enough for its median
                    times[name].append(_time_call(fn, dev))
        med = {name: statistics.median(ts) for name, ts in times.items()}
        check = compare(fused_out, naive_out)
        corpus_bytes = corpus.nbytes
        self.targets = {
            "status": "ok",
            "n": n,
            "dim": m,
            "batch": b,
            "k": cfg.k,
            "dtype": "float32",
            "modulation": "diagonal",
            "floor_provider": floor,
            "seconds": {name: {"median": med[name], "all": times[name]} for name in chosen},
            "fused_vs_floor": med["fused"] / med[floor],
            "fused_vs_floor_target": 2.0,
            "fused_vs_floor_met": med["fused"] / med[floor] <= 2.0,
            "naive_vs_fused": med["naive"] / med["fused"],
            "naive_vs_fused_target": 5.0,
            "naive_vs_fused_met": med["naive"] / med["fused"] >= 5.0,
            "fused_peak_extra_bytes": peak["bytes"],
            "fused_peak_extra_fraction_of_corpus": None
            if peak["bytes"] is None
            else peak["bytes"] / corpus_bytes,
            "fused_matches_naive": check,
        }
        self.log(
            f"targets (N={n}, m={m}, fp32, B={b}, diagonal): fused {med['fused'] * 1e3:.1f} ms, "
            f"{floor} {med[floor] * 1e3:.1f} ms (ratio {self.targets['fused_vs_floor']:.2f}, "
            f"target <= 2), naive {med['naive'] * 1e3:.1f} ms "
            f"(speed-up {self.targets['naive_vs_fused']:.1f}x, target >= 5)"
        )
        del corpus, fns, chosen
        _free(dev)
        return self.targets

    # ------------------------------------------------------------------ sweep
    def _skip(self, base: dict[str, Any], provider: str, code: str, reason: str) -> None:
        self.points.append(
            {**base, "provider": provider, "status": "skipped", "skip_code": code, "reason": reason}
        )

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        if cfg.verify:
            self.verify()
        if cfg.targets:
            self.run_targets()
        for n in cfg.sizes:
            self._run_size(n)
            self.write(with_plot=True)
        return self.write(with_plot=True)

    def _run_size(self, n: int) -> None:
        cfg, dev = self.cfg, self.device
        combos = [
            (b, mod, mode) for b in cfg.batches for mod in cfg.modulations for mode in cfg.modes
        ]
        corpus_bytes = n * cfg.dim * self.item
        reason = None
        if self.past_deadline():
            code, reason = "deadline", f"sweep deadline of {cfg.deadline_s:g} s reached"
        elif corpus_bytes > MEMORY_HEADROOM * self.budget():
            code = "memory"
            reason = (
                f"the corpus alone needs {corpus_bytes / 2**30:.1f} GiB, "
                f"{self.budget() / 2**30:.1f} GiB available"
            )
        if reason is not None:
            for b, mod, mode in combos:
                for prov in cfg.providers:
                    self._skip(self._base(n, b, mod, mode), prov, code, reason)
            self.log(f"N={n}: skipped ({reason})")
            return
        t0 = time.perf_counter()
        want_faiss = "faiss_flat" in cfg.providers or "rerank" in cfg.modes
        corpus = build_corpus(n, cfg.dim, self.dtype, dev, cfg.seed, want_faiss, self.budget())
        self.log(
            f"N={n}: corpus {corpus_bytes / 2**20:.0f} MiB {cfg.dtype} built in "
            f"{time.perf_counter() - t0:.1f} s"
            + ("" if corpus.faiss_index is not None else f" (no faiss: {corpus.faiss_reason})")
        )
        for b in cfg.batches:
            q = self.queries(b)
            fs = self._first_stage(corpus, q, n, b) if "rerank" in cfg.modes else None
            for mod in cfg.modulations:
                model = self.model(mod)
                for mode in cfg.modes:
                    base = self._base(n, b, mod, mode)
                    if self.past_deadline():
                        for prov in cfg.providers:
                            self._skip(
                                base,
                                prov,
                                "deadline",
                                f"sweep deadline of {cfg.deadline_s:g} s reached",
                            )
                        continue
                    self._run_group(base, corpus, model, q, fs)
                    self.write()  # a run killed at its time limit keeps what it measured
            del q
        del corpus
        _free(dev)

    def _base(self, n: int, b: int, modulation: str, mode: str) -> dict[str, Any]:
        return {"mode": mode, "modulation": modulation, "n": n, "batch": b}

    def _first_stage(self, corpus: Corpus, q: torch.Tensor, n: int, b: int) -> dict[str, Any]:
        """Time the shared first stage once per (N, B); its ids feed every rerank provider."""
        cfg, dev = self.cfg, self.device
        kf = min(cfg.feedback_k, n)
        engine, fn = first_stage_fn(corpus, q, kf)
        key = ("rerank", "first_stage", engine)
        pred, why = self.planner.check(key, n, b, 1.0)
        if why is not None:
            return {"engine": engine, "skip": ("time", f"first stage {engine}: {why}")}
        res = time_providers({engine: fn}, {engine: pred}, dev, cfg.budget_s, cfg.repeats)[engine]
        if res["error"] is not None:
            return {"engine": engine, "skip": ("error", f"first stage failed: {res['error']!r}")}
        med = statistics.median(res["times"])
        self.planner.record(key, n, b, med)
        ids = first_stage_ids(corpus, q, kf)
        self.log(f"  N={n} B={b}: first stage {engine} {med * 1e3:.2f} ms")
        return {
            "engine": engine,
            "seconds": med,
            "times": res["times"],
            "peak": res["peak"],
            "ids": ids,
        }

    def _run_group(
        self,
        base: dict[str, Any],
        corpus: Corpus,
        model: IMRNN,
        q: torch.Tensor,
        fs: dict[str, Any] | None,
    ) -> None:
        cfg, dev = self.cfg, self.device
        mode, mod, n, b = base["mode"], base["modulation"], base["n"], base["batch"]
        if mode == "rerank":
            assert fs is not None
            if "skip" in fs:
                for prov in cfg.providers:
                    self._skip(base, prov, *fs["skip"])
                self.log(f"  N={n} B={b} {mod} {mode}: all skipped ({fs['skip'][1]})")
                return
        official, official_why = self.officials[mod]
        if mode == "exhaustive":
            tq, qt = query_state(model, corpus.data, q, cfg.feedback_k, cfg.seed, dev)
            prob = Problem(corpus, model, official, official_why, q, tq, qt)
            fns = exhaustive_providers(prob, cfg.k, dev)
        else:
            prob = Problem(corpus, model, official, official_why, q, q, q, fs["ids"])
            fns = rerank_providers(prob, cfg.k, dev)
        kf = min(cfg.feedback_k, n)
        budget = self.budget()
        runnable: dict[str, Callable[[], Any]] = {}
        predicted: dict[str, float | None] = {}
        n_exp = 1.0 if mode == "exhaustive" else 0.0
        for prov in cfg.providers:
            fn = fns.get(prov)
            if not callable(fn):
                code, reason = fn if fn is not None else ("not_applicable", "no such provider here")
                self._skip(base, prov, code, reason)
                continue
            need = estimate_bytes(prov, mode, mod, n, b, cfg.dim, kf, self.item, dev)
            if need > MEMORY_HEADROOM * budget:
                self._skip(
                    base,
                    prov,
                    "memory",
                    f"needs ~{need / 2**30:.1f} GiB (estimated), {budget / 2**30:.1f} GiB available",
                )
                continue
            pred, why = self.planner.check((mode, mod, prov), n, b, n_exp)
            if why is not None:
                self._skip(base, prov, "time", why)
                continue
            runnable[prov], predicted[prov] = fn, pred
        with torch.no_grad():
            results = time_providers(runnable, predicted, dev, cfg.budget_s, cfg.repeats)
        for prov, res in results.items():
            point = {**base, "provider": prov}
            err = res["error"]
            if err is not None:
                oom = isinstance(
                    err, (MemoryError, torch.OutOfMemoryError)
                ) or "out of memory" in str(err)
                code = "memory" if oom else "error"
                self._skip(base, prov, code, f"{type(err).__name__}: {str(err)[:300]}")
                if not oom:
                    self.log(f"  {prov} failed: {err!r}")
                continue
            times = res["times"]
            stage = statistics.median(times)
            self.planner.record((mode, mod, prov), n, b, stage)
            latency = stage
            if mode == "rerank":
                latency = stage + fs["seconds"]
                point.update(first_stage=fs["engine"], first_stage_s=fs["seconds"], stage_s=stage)
            point.update(
                status="ok",
                latency_s=latency,
                min_s=min(times) + (fs["seconds"] if mode == "rerank" else 0.0),
                times_s=times,
                repeats=len(times),
                qps=b / latency,
                peak_memory_bytes=res["peak"],
            )
            if mode == "rerank" and prov == fs["engine"]:
                point["peak_memory_bytes"] = fs["peak"]
            point.update(self._roofline(prov, mode, mod, n, b, latency, corpus))
            self.points.append(point)
        summary = ", ".join(
            f"{p['provider']} {p['latency_s'] * 1e3:.3g} ms"
            if p["status"] == "ok"
            else f"{p['provider']} skip({p['skip_code']})"
            for p in self.points
            if all(p[key] == base[key] for key in base)
        )
        self.log(f"  N={n} B={b} {mod} {mode}: {summary}")

    def _roofline(
        self, prov: str, mode: str, mod: str, n: int, b: int, latency: float, corpus: Corpus
    ) -> dict[str, Any]:
        fs_item = 4 if corpus.faiss_index is not None else self.item
        bytes_, flops = useful_work(prov, mode, mod, n, b, self.cfg.dim, self.item, fs_item)
        peak_bw = self.machine.get("peak_gbps")
        peak_flops = self.machine.get("peak_flops")
        out: dict[str, Any] = {"bytes": bytes_, "flops": flops}
        if mode == "exhaustive" and prov in ("reference", "naive"):
            out["flops"] = None  # they do other (more) work: their FLOP/s would mislead
        mem_floor = bytes_ / (peak_bw * 1e9) if bytes_ and peak_bw else None
        comp_floor = flops / peak_flops if flops and peak_flops else None
        floors = [f for f in (mem_floor, comp_floor) if f is not None]
        out.update(
            achieved_gbps=bytes_ / latency / 1e9 if bytes_ else None,
            achieved_flops=out["flops"] / latency if out["flops"] else None,
            memory_floor_s=mem_floor,
            compute_floor_s=comp_floor,
            roofline_fraction=max(floors) / latency if floors else None,
            memory_floor_ratio=latency / mem_floor if mem_floor else None,
        )
        return out

    # ------------------------------------------------------------------ outputs
    def document(self) -> dict[str, Any]:
        cfg = asdict(self.cfg)
        slopes = fit_slopes(self.points)
        targets = dict(self.targets)
        targets["gpu_memory_floor"] = gpu_floor_target(self.points, self.device)
        self.machine["load_average_end"] = _loadavg()
        return {
            "schema_version": SCHEMA_VERSION,
            "tool": "imrnns bench",
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "machine_name": self.name,
            "machine": self.machine,
            "config": cfg,
            "checks": self.checks,
            "targets": targets,
            "points": self.points,
            "slopes": slopes,
            "wall_time_s": self.elapsed(),
        }

    def write(self, with_plot: bool = False) -> dict[str, Any]:
        """Write JSON and Markdown (and the plot when ``with_plot``); return the document."""
        doc = self.document()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        stem = self.out_dir / self.name
        _atomic_write(
            stem.with_suffix(".json"), json.dumps(doc, indent=1, default=_jsonable) + "\n"
        )
        _atomic_write(stem.with_suffix(".md"), markdown(doc))
        if self.cfg.plot and with_plot:
            plot(doc, stem.with_suffix(".png"))
        doc["files"] = {
            "json": str(stem.with_suffix(".json")),
            "markdown": str(stem.with_suffix(".md")),
            "plot": str(stem.with_suffix(".png")) if self.cfg.plot else None,
        }
        return doc


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _jsonable(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    return repr(x)


# ----------------------------------------------------------------------------- checks
def _as_torch(x: Any) -> torch.Tensor:
    return torch.from_numpy(x) if isinstance(x, np.ndarray) else x


def compare(got: tuple[Any, Any], want: tuple[Any, Any]) -> dict[str, Any]:
    """Top-k results against the reference: sorted scores must agree within ``CHECK_ATOL``
    (they do not depend on how ties are broken) and ids on >= ``CHECK_MIN_ID_AGREEMENT`` of
    each row's set (a near-tie at the cut may swap one document)."""
    gs, gi = (_as_torch(t).detach().cpu() for t in got)
    ws, wi = (_as_torch(t).detach().cpu() for t in want)
    if gs.shape != ws.shape:
        return {"passed": False, "max_abs_score_diff": float("inf"), "id_agreement": 0.0,
                "detail": f"shapes {tuple(gs.shape)} vs {tuple(ws.shape)}"}  # fmt: skip
    diff = float((gs.float() - ws.float()).abs().max()) if gs.numel() else 0.0
    agree = []
    for a, b in zip(gi.tolist(), wi.tolist(), strict=True):
        sa, sb = set(a) - {-1}, set(b) - {-1}
        agree.append(len(sa & sb) / max(1, len(sb)))
    agreement = float(np.mean(agree)) if agree else 1.0
    ok = diff <= CHECK_ATOL and agreement >= CHECK_MIN_ID_AGREEMENT
    return {"passed": bool(ok), "max_abs_score_diff": diff, "id_agreement": agreement,
            "atol": CHECK_ATOL}  # fmt: skip


# ----------------------------------------------------------------------------- analysis
def loglog_fit(ns: list[float], ts: list[float]) -> tuple[float, float, float]:
    """(slope, intercept, r^2) of log10(t) = slope * log10(N) + intercept, least squares."""
    x = np.log10(np.asarray(ns, dtype=np.float64))
    y = np.log10(np.asarray(ts, dtype=np.float64))
    slope, intercept = np.polyfit(x, y, 1)
    pred = slope * x + intercept
    ss_res = float(((y - pred) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return float(slope), float(intercept), r2


def fit_slopes(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Slope of latency vs N per (mode, modulation, batch, provider), log-log least squares.

    ``slope`` uses every measured size; ``slope_large_n`` only N >= 1e5, where fixed per-call
    costs no longer dominate: the asymptotic growth. Linear cost gives 1 (exhaustive, and a
    rerank's first stage at large N); the rerank second stage alone (``stage_slope``) should
    be about 0. Above 1.15 is flagged ``superlinear``."""
    groups: dict[tuple[str, str, int, str], list[dict[str, Any]]] = {}
    for p in points:
        if p["status"] == "ok":
            groups.setdefault((p["mode"], p["modulation"], p["batch"], p["provider"]), []).append(p)
    out = []
    for (mode, mod, b, prov), pts in sorted(groups.items()):
        pts = sorted(pts, key=lambda p: p["n"])
        ns = [p["n"] for p in pts]
        if len(set(ns)) < 2:
            continue
        slope, _, r2 = loglog_fit(ns, [p["latency_s"] for p in pts])
        row: dict[str, Any] = {
            "mode": mode,
            "modulation": mod,
            "batch": b,
            "provider": prov,
            "n_points": len(pts),
            "n_min": ns[0],
            "n_max": ns[-1],
            "slope": slope,
            "r2": r2,
            "slope_large_n": None,
            "stage_slope": None,
        }
        large = [p for p in pts if p["n"] >= LARGE_N]
        if len({p["n"] for p in large}) >= 2:
            row["slope_large_n"] = loglog_fit(
                [p["n"] for p in large], [p["latency_s"] for p in large]
            )[0]
        if mode == "rerank" and all("stage_s" in p for p in pts):
            stages = [max(p["stage_s"], 1e-9) for p in pts]
            row["stage_slope"] = loglog_fit(ns, stages)[0]
        asym = row["slope_large_n"] if row["slope_large_n"] is not None else slope
        row["superlinear"] = bool(asym > SUPERLINEAR)
        out.append(row)
    return out


def gpu_floor_target(points: list[dict[str, Any]], device: str) -> dict[str, Any]:
    """One query (B=1), exhaustive, diagonal, fused, the smallest N >= 1e7: latency within 1.5x
    of the memory floor (corpus bytes / device bandwidth)."""
    if device != "cuda":
        return {"status": "not_measured", "reason": "needs a CUDA GPU"}
    cand = [
        p
        for p in points
        if p["status"] == "ok"
        and p["mode"] == "exhaustive"
        and p["modulation"] == "diagonal"
        and p["provider"] == "fused"
        and p["batch"] == 1
        and p["n"] >= 10_000_000
    ]
    if not cand:
        return {"status": "not_measured", "reason": "no fused exhaustive B=1 point at N >= 1e7"}
    p = min(cand, key=lambda p: p["n"])
    ratio = p.get("memory_floor_ratio")
    return {
        "status": "ok",
        "n": p["n"],
        "latency_s": p["latency_s"],
        "memory_floor_s": p.get("memory_floor_s"),
        "ratio": ratio,
        "target": 1.5,
        "met": bool(ratio is not None and ratio <= 1.5),
    }


# ----------------------------------------------------------------------------- reports
def _fmt_s(seconds: float) -> str:
    if seconds >= 10:
        return f"{seconds:.1f} s"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:.0f} ms"
    if ms >= 1:
        return f"{ms:.3g} ms"
    return f"{ms:.3f} ms"


def _fmt_n(n: int) -> str:
    """10000 -> "1e4", 30000 -> "3e4", 2017 -> "2.02e3", 500 -> "500"."""
    if n < 1000:
        return str(n)
    exp = math.floor(math.log10(n))
    mant = n / 10**exp
    return f"1e{exp}" if abs(mant - 1) < 1e-9 else f"{mant:.3g}e{exp}"


SKIP_SHORT = {
    "memory": "mem",
    "time": "time",
    "not_applicable": "n/a",
    "unavailable": "unavail.",
    "deadline": "deadline",
    "error": "error",
}


def markdown(doc: dict[str, Any]) -> str:
    """Tables: latency per (mode, modulation) with one column per provider; fused details
    (QPS, peak memory, bandwidth, FLOP/s, roofline); slopes; targets; correctness checks."""
    cfg, mach = doc["config"], doc["machine"]
    provs = [p for p in cfg["providers"] if any(q["provider"] == p for q in doc["points"])]
    lines = [
        f"# Scaling sweep: {doc['machine_name']}",
        "",
        f"Device: {mach['device_name']}; torch {mach['torch']}, triton {mach['triton']}, "
        f"faiss {mach['faiss']}; {mach['torch_threads']} torch threads. "
        f"Storage {cfg['dtype']}, m={cfg['dim']}, k={cfg['k']}, feedback_k={cfg['feedback_k']}, "
        f"per-point budget {cfg['budget_s']:g} s, up to {cfg['repeats']} timed calls "
        f"(median). Wall time {doc['wall_time_s'] / 60:.1f} min. Created {doc['created']}.",
        "",
        "Latency per call of B queries (median). Rerank = first stage (shared, "
        "top-feedback_k) + the provider's second stage. Skips: mem = estimated memory over "
        "what is available, time = predicted over the per-point budget, n/a = not applicable, "
        "unavail. = not installed here (reasons in the JSON).",
        "",
    ]
    for mode in cfg["modes"]:
        for mod in cfg["modulations"]:
            pts = [p for p in doc["points"] if p["mode"] == mode and p["modulation"] == mod]
            if not pts:
                continue
            lines += [f"## {mode}, {mod}", ""]
            lines.append("| N | B | " + " | ".join(provs) + " |")
            lines.append("|---:|---:|" + "---:|" * len(provs))
            keys = sorted({(p["n"], p["batch"]) for p in pts})
            for n, b in keys:
                cells = []
                for prov in provs:
                    p = next(
                        (q for q in pts if (q["n"], q["batch"], q["provider"]) == (n, b, prov)),
                        None,
                    )
                    if p is None:
                        cells.append("")
                    elif p["status"] == "ok":
                        cells.append(_fmt_s(p["latency_s"]))
                    else:
                        cells.append(SKIP_SHORT.get(p.get("skip_code", ""), "skip"))
                lines.append(f"| {_fmt_n(n)} | {b} | " + " | ".join(cells) + " |")
            lines.append("")
    fused = [p for p in doc["points"] if p["provider"] == "fused" and p["status"] == "ok"]
    if fused:
        lines += [
            "## fused: throughput, memory, roofline",
            "",
            "| mode | modulation | N | B | latency | QPS | peak extra MiB | GB/s | GFLOP/s | roofline |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for p in fused:
            peak = p.get("peak_memory_bytes")
            gbps, fl, rf = (
                p.get("achieved_gbps"),
                p.get("achieved_flops"),
                p.get("roofline_fraction"),
            )
            lines.append(
                f"| {p['mode']} | {p['modulation']} | {_fmt_n(p['n'])} | {p['batch']} | "
                f"{_fmt_s(p['latency_s'])} | {p['qps']:.3g} | "
                f"{'' if peak is None else f'{peak / 2**20:.0f}'} | "
                f"{'' if gbps is None else f'{gbps:.3g}'} | "
                f"{'' if fl is None else f'{fl / 1e9:.3g}'} | "
                f"{'' if rf is None else f'{rf:.0%}'} |"
            )
        lines.append("")
    if doc["slopes"]:
        lines += [
            "## cost growth: slope of log latency vs log N",
            "",
            "| mode | modulation | B | provider | sizes | slope (all N) | slope (N >= 1e5) | rerank stage slope |",
            "|---|---|---:|---|---|---:|---:|---:|",
        ]
        for s in doc["slopes"]:
            large = "" if s["slope_large_n"] is None else f"{s['slope_large_n']:.2f}"
            stage = "" if s["stage_slope"] is None else f"{s['stage_slope']:.2f}"
            flag = " (superlinear)" if s["superlinear"] else ""
            lines.append(
                f"| {s['mode']} | {s['modulation']} | {s['batch']} | {s['provider']} | "
                f"{_fmt_n(s['n_min'])}..{_fmt_n(s['n_max'])} ({s['n_points']}) | "
                f"{s['slope']:.2f} | {large}{flag} | {stage} |"
            )
        lines.append("")
    t = doc.get("targets") or {}
    lines += ["## targets (measured in this run)", ""]
    if t.get("status") == "ok":
        sec = t["seconds"]
        lines += [
            f"Exhaustive, N={_fmt_n(t['n'])}, m={t['dim']}, fp32, B={t['batch']}, diagonal, "
            f"k={t['k']}: fused {_fmt_s(sec['fused']['median'])}, {t['floor_provider']} "
            f"{_fmt_s(sec[t['floor_provider']]['median'])}, naive {_fmt_s(sec['naive']['median'])}.",
            "",
            f"- fused / {t['floor_provider']}: {t['fused_vs_floor']:.2f} (target <= 2): "
            f"{'met' if t['fused_vs_floor_met'] else 'MISSED'}",
            f"- naive / fused: {t['naive_vs_fused']:.1f}x (target >= 5x): "
            f"{'met' if t['naive_vs_fused_met'] else 'MISSED'}",
        ]
        if t.get("fused_peak_extra_fraction_of_corpus") is not None:
            lines.append(
                f"- fused peak extra memory: {t['fused_peak_extra_fraction_of_corpus']:.1%} of the corpus"
            )
    else:
        lines.append(f"- kernel ratios: {t.get('status', 'not run')} {t.get('reason', '')}")
    g = t.get("gpu_memory_floor", {})
    if g.get("status") == "ok":
        lines.append(
            f"- one query at N={_fmt_n(g['n'])} (fused, exhaustive, diagonal): {_fmt_s(g['latency_s'])} "
            f"= {g['ratio']:.2f}x the memory floor {_fmt_s(g['memory_floor_s'])} (target <= 1.5): "
            f"{'met' if g['met'] else 'MISSED'}"
        )
    else:
        lines.append(f"- GPU memory floor at N=1e7: {g.get('status')} ({g.get('reason', '')})")
    lines.append("")
    if doc["checks"]:
        failed = [c for c in doc["checks"] if not c["passed"]]
        lines += [
            "## correctness checks (vs reference, before timing)",
            "",
            f"{len(doc['checks']) - len(failed)} of {len(doc['checks'])} passed"
            + (
                ": failed "
                + ", ".join(f"{c['mode']}/{c['modulation']}/{c['provider']}" for c in failed)
                if failed
                else "."
            ),
            "",
        ]
    return "\n".join(lines)


COLORS = {
    "fused": "tab:red",
    "reference": "tab:blue",
    "naive": "tab:orange",
    "faiss_flat": "tab:green",
    "torch_ip": "tab:olive",
    "official": "tab:purple",
}


def plot(doc: dict[str, Any], path: Path) -> None:
    """Log-log latency vs N, one line per provider; one panel per (mode, modulation, B)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = doc["config"]
    rows = [(mode, mod) for mode in cfg["modes"] for mod in cfg["modulations"]]
    cols = cfg["batches"]
    fig, axes = plt.subplots(
        len(rows), len(cols), figsize=(4.2 * len(cols), 3.3 * len(rows)), squeeze=False
    )
    for r, (mode, mod) in enumerate(rows):
        for c, b in enumerate(cols):
            ax = axes[r][c]
            for prov in cfg["providers"]:
                pts = sorted(
                    (p["n"], p["latency_s"])
                    for p in doc["points"]
                    if p["status"] == "ok"
                    and (p["mode"], p["modulation"], p["batch"], p["provider"])
                    == (mode, mod, b, prov)
                )
                if pts:
                    xs, ys = zip(*pts, strict=True)
                    ax.plot(xs, ys, "o-", color=COLORS.get(prov), label=prov, ms=4, lw=1.5)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{mode} / {mod} / B={b}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            if r == len(rows) - 1:
                ax.set_xlabel("corpus size N")
            if c == 0:
                ax.set_ylabel("latency per call (s)")
    handles: dict[str, Any] = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=len(handles))
    fig.suptitle(
        f"{doc['machine']['device_name']}: {cfg['dtype']} corpus, m={cfg['dim']}, "
        f"k={cfg['k']}, feedback_k={cfg['feedback_k']}",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0.035, 1, 0.98))
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- command line
def _ints(text: str) -> list[int]:
    """ "1e4,1e5,3e6" -> [10000, 100000, 3000000]."""
    out = []
    for part in text.split(","):
        part = part.strip()
        if part:
            value = float(part)
            if value != int(value) or value <= 0:
                raise argparse.ArgumentTypeError(f"not a positive integer: {part!r}")
            out.append(int(value))
    if not out:
        raise argparse.ArgumentTypeError("empty list")
    return out


def _names(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def default_out_dir() -> str:
    """``benchmarks/results`` under the working directory when it is this repository's root,
    else ``./imrnns-bench-results``."""
    return "benchmarks/results" if Path("benchmarks").is_dir() else "imrnns-bench-results"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The sweep's options (shared by ``imrnns bench`` and ``python -m benchmarks.scaling``)."""
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda when available")  # fmt: skip
    p.add_argument("--sizes", type=_ints, default=None,
                   help="corpus sizes, e.g. 1e4,1e5,1e6,1e7 (default; GPU adds 3e7,1e8)")  # fmt: skip
    p.add_argument("--batches", type=_ints, default=[1, 32, 256], help="default 1,32,256")
    p.add_argument("--k", type=int, default=100, help="results per query (default 100)")
    p.add_argument("--dim", type=int, default=256, help="working dim m (default 256)")
    p.add_argument("--feedback-k", type=int, default=100, help="first-stage depth (default 100)")
    p.add_argument("--modulations", type=_names, default=list(MODULATIONS))
    p.add_argument("--modes", type=_names, default=list(MODES))
    p.add_argument("--providers", type=_names, default=None,
                   help=f"subset of {','.join(PROVIDERS)} (default: all but torch_ip on CPU)")  # fmt: skip
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="corpus storage dtype (default float16 on CPU, bfloat16 on GPU)")  # fmt: skip
    p.add_argument("--budget-s", type=float, default=None,
                   help="per-point time budget; sizes predicted to exceed it are skipped "
                   "(default 60 on CPU, 10 on GPU)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=5, help="timed calls per point (default 5)")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="skip what remains after this many seconds (recorded)")  # fmt: skip
    p.add_argument("--threads", type=int, default=0, help="torch/faiss threads (0: all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target-n", type=_ints, default=[1_000_000],
                   help="corpus size of the target ratios (default 1e6)")  # fmt: skip
    p.add_argument("--no-targets", action="store_true", help="skip the target-ratio phase")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the correctness checks against the reference")  # fmt: skip
    p.add_argument("--max-memory-gb", type=float, default=None,
                   help="cap on the memory the sweep may plan to use")  # fmt: skip
    p.add_argument("--no-install-official", action="store_true",
                   help="do not pip-install the official imrnns 0.2.3 when missing "
                   "(also IMRNNS_BENCH_NO_INSTALL=1)")  # fmt: skip
    p.add_argument(
        "--fused-backend",
        choices=("auto", "cpu", "triton"),
        default="auto",
        help="auto: triton on a GPU, cpu otherwise; triton on CPU tensors needs "
        "TRITON_INTERPRET=1 (an interpreted smoke test of the GPU path)",
    )
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results)")
    p.add_argument("--machine", default=None, help="name of the result files (default: derived)")
    p.add_argument("--json", action="store_true",
                   help="print a JSON summary (files, targets, slopes) on stdout")  # fmt: skip


def config_from_args(args: argparse.Namespace) -> SweepConfig:
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = device == "cuda"
    sizes = args.sizes or (
        [10**4, 10**5, 10**6, 10**7, 3 * 10**7, 10**8] if gpu else [10**4, 10**5, 10**6, 10**7]
    )
    providers = args.providers or (
        ["fused", "reference", "naive", "faiss_flat", "torch_ip", "official"]
        if gpu
        else ["fused", "reference", "naive", "faiss_flat", "official"]
    )
    no_install = args.no_install_official or os.environ.get("IMRNNS_BENCH_NO_INSTALL") == "1"
    return SweepConfig(
        device=device,
        sizes=sizes,
        batches=args.batches,
        k=args.k,
        dim=args.dim,
        feedback_k=args.feedback_k,
        modulations=args.modulations,
        modes=args.modes,
        providers=providers,
        dtype=args.dtype or ("bfloat16" if gpu else "float16"),
        budget_s=args.budget_s or (10.0 if gpu else 60.0),
        repeats=args.repeats,
        deadline_s=args.deadline_s,
        threads=args.threads,
        seed=args.seed,
        verify=not args.no_verify,
        targets=not args.no_targets,
        target_n=args.target_n[0],
        install_official=not no_install,
        fused_backend=args.fused_backend,
        plot=not args.no_plot,
        out=args.out or default_out_dir(),
        machine=args.machine,
        max_memory_gb=args.max_memory_gb,
    )


def run_from_args(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    try:
        doc = Sweep(cfg).run()
    except BenchAbort as exc:
        print(f"imrnns bench: ABORTED, wrong results: {exc}", file=sys.stderr)
        return 1
    summary = {
        "files": doc["files"],
        "machine": doc["machine_name"],
        "device": doc["machine"]["device_name"],
        "wall_time_s": doc["wall_time_s"],
        "targets": doc["targets"],
        "slopes": doc["slopes"],
        "checks_failed": [c for c in doc["checks"] if not c["passed"]],
    }
    if args.json:
        print(json.dumps(summary, indent=2, default=_jsonable))
    else:
        print(f"wrote {doc['files']['json']}, {doc['files']['markdown']}"
              + (f", {doc['files']['plot']}" if doc["files"]["plot"] else ""))  # fmt: skip
        g = doc["targets"].get("gpu_memory_floor", {})
        if g.get("status") == "ok":
            print(f"GPU one-query memory floor: {g['ratio']:.2f}x (target <= 1.5): "
                  f"{'met' if g['met'] else 'MISSED'}")  # fmt: skip
        print(f"wall time {doc['wall_time_s']:.0f} s")
    return 0


def main(argv: list[str] | None = None, default_out: str | None = None) -> int:
    """Run the sweep from command-line arguments; 0 on success, 1 if aborted on wrong
    results, 2 on bad arguments."""
    parser = argparse.ArgumentParser(
        prog="imrnns bench", description=__doc__.splitlines()[0] if __doc__ else None
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.out is None and default_out is not None:
        args.out = default_out
    try:
        return run_from_args(args)
    except ValueError as exc:
        print(f"imrnns bench: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
