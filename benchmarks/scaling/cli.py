"""The sweep's command line: ``python -m benchmarks.scaling [options]`` (``--help`` lists them).

Results go to ``benchmarks/results/<machine>.{json,md,png}`` (``--out`` elsewhere); the JSON
validates against ``benchmarks/schema/scaling.schema.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from benchmarks.scaling.config import (
    DEFAULT_PROVIDERS_CPU,
    DEFAULT_PROVIDERS_GPU,
    DTYPES,
    MODES,
    MODULATIONS,
    PROVIDERS,
    BenchAbort,
    SweepConfig,
)
from benchmarks.scaling.report import jsonable
from benchmarks.scaling.runner import Sweep

PROG = "python -m benchmarks.scaling"
DESCRIPTION = (
    "Latency scaling sweep: corpus size N from 10^4 to 10^7 (and beyond on a GPU), every provider."
)
RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"


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
    """``benchmarks/results`` of this checkout (the harness is not installed with the library:
    it always runs from a checkout)."""
    return str(RESULTS_DIR)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The sweep's options (``python -m benchmarks.scaling --help``)."""
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
    providers = args.providers or list(DEFAULT_PROVIDERS_GPU if gpu else DEFAULT_PROVIDERS_CPU)
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
        print(f"{PROG}: ABORTED, wrong results: {exc}", file=sys.stderr)
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
        print(json.dumps(summary, indent=2, default=jsonable))
    else:
        print(f"wrote {doc['files']['json']}, {doc['files']['markdown']}"
              + (f", {doc['files']['plot']}" if doc["files"]["plot"] else ""))  # fmt: skip
        g = doc["targets"].get("gpu_memory_floor", {})
        if g.get("status") == "ok":
            print(f"GPU one-query memory floor: {g['ratio']:.2f}x (target <= 1.5): "
                  f"{'met' if g['met'] else 'MISSED'}")  # fmt: skip
        print(f"wall time {doc['wall_time_s']:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the sweep from command-line arguments; 0 on success, 1 if aborted on wrong
    results, 2 on bad arguments."""
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_from_args(args)
    except ValueError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
