"""Latency scaling sweep: corpus size N from 10^4 to 10^7 (and beyond on a GPU), every provider.

``python -m benchmarks.scaling`` runs :func:`main` (from a checkout: the harness is not part of
the installed library). For each corpus size N, batch size B, modulation form and mode it
times every provider on the same inputs and writes ``<out>/<machine>.json`` (validated by
``benchmarks/schema/scaling.schema.json``), a log-log plot ``<machine>.png`` (latency vs N,
one line per provider; needs matplotlib) and a Markdown table ``<machine>.md``.

Modes (k results per query, working dim m, feedback set of ``feedback_k``):

- ``exhaustive``: the op :func:`imrnns_kernels.modulated_topk` over the whole corpus. The query
  state (query transform, refined query) is computed once, outside the timing.
- ``rerank``: a first stage (faiss ``IndexFlatIP`` top-``feedback_k`` over the projected
  corpus; a chunked PyTorch inner product where faiss is missing, e.g. on a GPU machine
  without faiss-gpu), then projection + :func:`adapter_reduce` + LayerNorm +
  :func:`modulated_score` on the candidates + the final top-k. The first stage is the same for
  every provider: it is timed once per (N, B) and added to each provider's second stage
  (``latency_s = first_stage_s + stage_s``; both are recorded).

Providers (:mod:`benchmarks.scaling.providers`): ``fused`` (Triton kernels on a GPU, the
chunked CPU path otherwise), ``reference`` (:mod:`imrnns_kernels.reference`, materialising),
``compiled_reference`` (``torch.compile`` of that reference, compiled once per shape outside
the timing; unavailable, with the reason, where torch.compile cannot run), ``naive`` (the
straightforward PyTorch a user would write: per-query loop for exhaustive, (B, K, OUT)
hypernet outputs for rerank), ``faiss_flat`` (unmodulated inner product: the floor; in rerank,
the first stage alone), ``torch_ip`` (the same floor in PyTorch; the GPU floor when faiss-gpu
is missing) and ``official`` (the ``imrnns`` 0.2.3 package's ``IMRNN.forward`` on the
candidates; rerank and diagonal only, since that is all it implements).

Skips are recorded, never crashed into: a provider whose estimated peak memory exceeds what
is available, or whose predicted time for one call (extrapolated from the smaller sizes)
exceeds the per-point budget, gets ``status="skipped"`` with a ``skip_code`` and a reason.
Before any timing the providers are checked against the reference on a small problem; a
wrong ``fused`` result aborts the run (:class:`BenchAbort`).

Modules: ``config`` (constants, :class:`SweepConfig`), ``machine`` (machine facts, timers,
peak memory), ``inputs`` (corpus, model, queries), ``providers`` (naive baselines and every
provider), ``planner`` (cost models, time predictions), ``runner`` (:class:`Sweep`),
``analysis`` (checks, slopes), ``report`` (Markdown, plot), ``cli`` (options, :func:`main`).
"""

from benchmarks.scaling.analysis import compare, fit_slopes, gpu_floor_target, loglog_fit
from benchmarks.scaling.cli import add_arguments, config_from_args, main, run_from_args
from benchmarks.scaling.config import (
    MEMORY_HEADROOM,
    MODES,
    MODULATIONS,
    PROVIDERS,
    SKIP_CODES,
    BenchAbort,
    ProviderUnavailable,
    SweepConfig,
)
from benchmarks.scaling.inputs import Corpus, build_corpus, make_model, unit_rows
from benchmarks.scaling.machine import (
    available_bytes,
    machine_info,
    measure_copy_gbps,
    peak_memory,
    time_call,
)
from benchmarks.scaling.planner import Planner, estimate_bytes, useful_work
from benchmarks.scaling.providers import (
    CompiledReference,
    Problem,
    WarmedProvider,
    compile_unavailable_reason,
    exhaustive_providers,
    fused_backend,
    load_official,
    naive_exhaustive,
    naive_rerank,
    official_rerank,
    query_state,
    rerank_providers,
    torch_ip_topk,
)
from benchmarks.scaling.report import markdown, plot
from benchmarks.scaling.runner import Sweep, time_providers

__all__ = [
    "MEMORY_HEADROOM",
    "MODES",
    "MODULATIONS",
    "PROVIDERS",
    "SKIP_CODES",
    "BenchAbort",
    "CompiledReference",
    "Corpus",
    "Planner",
    "Problem",
    "ProviderUnavailable",
    "Sweep",
    "SweepConfig",
    "WarmedProvider",
    "add_arguments",
    "available_bytes",
    "build_corpus",
    "compare",
    "compile_unavailable_reason",
    "config_from_args",
    "estimate_bytes",
    "exhaustive_providers",
    "fit_slopes",
    "fused_backend",
    "gpu_floor_target",
    "load_official",
    "loglog_fit",
    "machine_info",
    "main",
    "make_model",
    "markdown",
    "measure_copy_gbps",
    "naive_exhaustive",
    "naive_rerank",
    "official_rerank",
    "peak_memory",
    "plot",
    "query_state",
    "rerank_providers",
    "run_from_args",
    "time_call",
    "time_providers",
    "torch_ip_topk",
    "unit_rows",
    "useful_work",
]
