"""The one-command GPU scripts, run where there is no GPU: their --interpret-smoke modes take
the same steps on CPU tensors through Triton's interpreter at small sizes, so a broken script
is caught here rather than on a lent GPU's limited time."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _smoke(script: str) -> str:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--interpret-smoke"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_gpu_check_smoke():
    out = _smoke("gpu_check.py")
    assert "all kernels agree with the reference" in out
    assert "FAIL" not in out


@pytest.mark.slow
def test_gpu_tune_smoke():
    out = _smoke("gpu_tune.py")
    assert "FAILED" not in out and "MISMATCH" not in out
    # every section ran: floors, both kernels' shapes (the shipped one first), whole calls
    for needle in ("copy:", "(shipped)", "ill-conditioned pairs flagged: 0", "B=256", "B=  8 dot"):
        assert needle in out, needle


def test_scripts_refuse_the_wrong_mode():
    """Without --interpret-smoke under TRITON_INTERPRET=1 they would time the interpreter."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    for script in ("gpu_check.py", "gpu_tune.py"):
        proc = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / script)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2, script
