"""Machine facts and peak-memory readings shared by every benchmark and the scaling sweep.

One reader of ``/proc/self/status`` (Linux) serves them all: the resident set ``VmRSS`` and
its high-water mark ``VmHWM``, which ``reset_peak_rss`` lowers to the current resident set
(``echo 5 > /proc/self/clear_refs``, Linux >= 4.0). The peak extra resident memory of a call
is then ``VmHWM`` after it minus ``VmRSS`` before it.
"""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Callable
from typing import TypeVar

_T = TypeVar("_T")
_STATUS_FIELDS = ("VmRSS", "VmHWM")


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


def cpu_device_name() -> str:
    """``"<cpu model> (<cores> cores, CPU)"``: how results name a CPU machine."""
    return f"{cpu_model()} ({os.cpu_count() or 1} cores, CPU)"


def proc_memory() -> dict[str, int]:
    """``{"VmRSS": bytes, "VmHWM": bytes}`` of this process, from ``/proc/self/status``.

    Raises:
        OSError: no ``/proc/self/status`` (not Linux).
    """
    out: dict[str, int] = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in _STATUS_FIELDS:
                out[key] = int(rest.split()[0]) * 1024  # the file gives kB
    missing = [key for key in _STATUS_FIELDS if key not in out]
    if missing:
        raise OSError(f"no {', '.join(missing)} in /proc/self/status")
    return out


def reset_peak_rss() -> bool:
    """Lower ``VmHWM`` to the current ``VmRSS``; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def peak_extra_memory(fn: Callable[[], _T]) -> tuple[_T, int | None]:
    """(fn(), bytes of resident memory at its peak above the resident size before the call).

    Resets the kernel's high-water mark first; returns None for the bytes where that is not
    available.
    """
    if not reset_peak_rss():
        return fn(), None
    before = proc_memory()["VmRSS"]
    out = fn()
    return out, proc_memory()["VmHWM"] - before


__all__ = [
    "cpu_device_name",
    "cpu_model",
    "peak_extra_memory",
    "proc_memory",
    "reset_peak_rss",
]
