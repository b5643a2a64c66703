"""What a sweep measures: the known modes, forms, providers and dtypes, the physical ceilings
of the roofline columns, the correctness gate, and :class:`SweepConfig` (recorded in the JSON).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field

import torch

SCHEMA_VERSION = 1
MODES = ("exhaustive", "rerank")
MODULATIONS = ("diagonal", "affine")
PROVIDERS = (
    "fused",
    "reference",
    "compiled_reference",
    "naive",
    "faiss_flat",
    "torch_ip",
    "official",
)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SKIP_CODES = ("memory", "time", "not_applicable", "unavailable", "deadline", "error")

# Physical ceilings for the roofline columns (docs/design.md section 3), overridable with
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

# The providers a sweep runs unless told otherwise. torch_ip is the GPU floor without
# faiss-gpu; on the CPU faiss is the floor.
DEFAULT_PROVIDERS_CPU = (
    "fused",
    "reference",
    "compiled_reference",
    "naive",
    "faiss_flat",
    "official",
)
DEFAULT_PROVIDERS_GPU = PROVIDERS


class BenchAbort(RuntimeError):
    """The fused provider disagrees with the reference: timing wrong results is meaningless."""


class ProviderUnavailable(RuntimeError):
    """A provider cannot run on this machine (recorded as a skip with the reason)."""


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
    providers: list[str] = field(default_factory=lambda: list(DEFAULT_PROVIDERS_CPU))
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
        """Raise ValueError naming the first setting that cannot be run."""
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
        if self.plot and importlib.util.find_spec("matplotlib") is None:
            raise ValueError(
                "the plot needs matplotlib (the project's bench extra: "
                "pip install -e '.[bench]'); or pass --no-plot"
            )
        interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
        if self.fused_backend == "triton" and self.device == "cpu" and not interp:
            raise ValueError("fused_backend triton on the CPU needs TRITON_INTERPRET=1")
