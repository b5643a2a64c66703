"""Machine facts (hardware, software, roofline ceilings), memory available now, and the two
measurements every timing uses: the wall time of one call and the peak extra memory of a body.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from benchmarks._common import cpu_model, proc_memory, reset_peak_rss
from benchmarks.scaling.config import (
    CPU_PEAK_FLOPS,
    CPU_PEAK_GBPS,
    GPU_BF16_TC_PEAK_FLOPS,
    GPU_FP32_PEAK_FLOPS,
    SweepConfig,
)


# ----------------------------------------------------------------------------- measuring
def sync(device: str) -> None:
    """Wait for queued GPU work (a no-op on the CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(fn: Callable[[], Any], device: str) -> float:
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
        if not reset_peak_rss():
            raise OSError("cannot reset the resident high-water mark")
        before = proc_memory()["VmRSS"]
    except OSError:
        yield result
        return
    yield result
    result["bytes"] = max(0, proc_memory()["VmHWM"] - before)


def measure_copy_gbps(device: str, nbytes: int = 1 << 30) -> float:
    """Device memory bandwidth of a large copy, bytes read + written per second (median)."""
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(6 if device == "cuda" else 3):
        t = time_call(lambda: dst.copy_(src), device)
        if i > 0:  # the first copy pays page faults / lazy init
            times.append(t)
    return 2 * n * 4 / statistics.median(times) / 1e9


# ----------------------------------------------------------------------------- machine facts
def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _gpu_family(name: str) -> str | None:
    for family in GPU_FP32_PEAK_FLOPS:
        if family.lower() in name.lower():
            return family
    return None


def machine_info(cfg: SweepConfig) -> dict[str, Any]:
    """Hardware and software facts of this run, and the roofline ceilings it uses."""
    import triton

    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count() or 1,
        "memory_total_bytes": meminfo().get("MemTotal"),
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
        "load_average_start": loadavg(),
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
            peak_gbps_source="IMRNNS_PEAK_GBPS" if env_gbps else "docs/design.md section 3",
            peak_flops=float(env_flops) if env_flops else CPU_PEAK_FLOPS,
            peak_flops_source="IMRNNS_PEAK_FLOPS" if env_flops else "docs/design.md section 3",
        )
    return info


def loadavg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, or None where the OS has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_slug(info: dict[str, Any]) -> str:
    """The default name of the result files: ``gpu-<card>`` or ``cpu-<model>-<cores>c``."""
    if info["device"] == "cuda":
        return "gpu-" + _slug(info["device_name"])
    return f"cpu-{_slug(info['cpu_model'])}-{info['cpu_cores']}c"


def _faiss_version() -> str | None:
    try:
        import faiss
    except ImportError:
        return None
    return getattr(faiss, "__version__", "unknown")


def meminfo() -> dict[str, int]:
    """``/proc/meminfo`` in bytes (empty where there is none)."""
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
        info = meminfo()
        free = info.get("MemAvailable", 8 << 30)
    if cap_gb is not None:
        free = min(free, int(cap_gb * 2**30))
    return free
