"""The options of ``imrnns search --distributed``, built without importing torch (so
``imrnns --help`` stays fast); the command itself is :mod:`imrnns.cli.distributed`."""

from __future__ import annotations

import argparse
import math

from imrnns._distributed_settings import DEFAULT_TIMEOUT_S, EXCHANGES, MAX_TIMEOUT_S

__all__ = ["add_distributed_arguments", "timeout_seconds_arg"]


def add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``imrnns search`` flags for sharded search under torchrun."""
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="shard the index over the processes of a torchrun launch (torch.distributed)",
    )
    parser.add_argument(
        "--dist-backend",
        choices=("auto", "nccl", "gloo"),
        default="auto",
        help="process-group backend (auto: NCCL with GPUs, else gloo)",
    )
    parser.add_argument(
        "--exchange",
        choices=EXCHANGES,
        default="rows",
        help="feedback exchange: rows (bit-exact, default) or partial (less traffic)",
    )
    parser.add_argument(
        "--dist-timeout",
        type=timeout_seconds_arg,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help="bound on every wait for the other ranks (process group and index; default "
        f"{DEFAULT_TIMEOUT_S:g}): a rank that hangs ends the job after this",
    )


def timeout_seconds_arg(value: str) -> float:
    """``--dist-timeout``: a positive, finite number of seconds."""
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {value!r}") from None
    if not 0 < seconds <= MAX_TIMEOUT_S or math.isnan(seconds):
        raise argparse.ArgumentTypeError(
            f"must be a positive number of seconds up to {MAX_TIMEOUT_S}, got {value!r}"
        )
    return seconds
