"""The kernel package's layout promises: triton is imported only when its backend is chosen,
everything works without it on CPU, and an explicit backend choice never falls back silently."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import imrnns_kernels as K
from imrnns_kernels import dispatch

ROOT = Path(__file__).resolve().parents[2]

# Installed first in the child: any import of triton (or a submodule) fails as if it were
# not installed.
BLOCK_TRITON = """
import importlib.abc
import sys


class _NoTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError(f"No module named {name!r} (blocked by the test)", name=name)
        return None


sys.meta_path.insert(0, _NoTriton())
"""

WITHOUT_TRITON = """
import os

import torch

import imrnns_kernels as K
from imrnns_kernels import dispatch, reference

torch.manual_seed(0)
n, m, b, k = 13, 6, 3, 4
corpus = torch.nn.functional.normalize(torch.randn(n, m), dim=1)
ids = torch.randint(0, n, (b, k))
g, beta, queries = 1 + 0.3 * torch.randn(m), 0.1 * torch.randn(m), torch.randn(b, m)
w = K.HyperNetWeights(
    torch.randn(16, m) / 4, torch.randn(16) / 4, torch.randn(8, 16) / 4, torch.randn(8) / 4,
    torch.randn(2 * m, 8) / 4, torch.randn(2 * m) / 4,
)
transform = torch.cat([torch.sigmoid(torch.randn(b, m)), torch.tanh(torch.randn(b, m))], 1)
x, p, p0 = torch.randn(b, 9), torch.randn(m, 9), torch.randn(m)
calls = {
    "project": (x, p, p0),
    "modulate_layernorm": (queries, transform, g, beta, "diagonal"),
    "adapter_reduce": (corpus, ids, w),
    "document_transforms": (corpus, w),
    "corpus_transform": (corpus, w),
    "modulated_score": (corpus, ids, transform, g, beta, queries),
    "modulated_topk": (corpus, transform, g, beta, queries, k),
}
assert set(calls) == set(dispatch._REGISTRY), sorted(dispatch._REGISTRY)
with K.use_backend("cpu"):
    for op, args in calls.items():
        got, want = getattr(K, op)(*args), getattr(reference, op)(*args)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=op)
    leaf = transform.clone().requires_grad_(True)
    K.modulated_score(corpus, ids, leaf, g, beta, queries).sum().backward()
    assert leaf.grad is not None and bool(torch.isfinite(leaf.grad).all())

# Automatic selection under TRITON_INTERPRET=1 would pick triton: without it, the CPU path.
os.environ["TRITON_INTERPRET"] = "1"
choice = dispatch.implementation("modulated_score", torch.device("cpu"))
assert choice.backend == "cpu" and "triton does not import" in choice.reason, choice
assert K.select_backend(torch.device("cpu")) == "cpu"
torch.testing.assert_close(K.modulated_score(*calls["modulated_score"]),
                           reference.modulated_score(*calls["modulated_score"]))

# Choosing it explicitly says how to get it.
try:
    with K.use_backend("triton"):
        raise AssertionError("use_backend('triton') did not raise")
except dispatch.BackendError as exc:
    assert "pip install triton" in str(exc), exc
os.environ["IMRNNS_BACKEND"] = "triton"
try:
    K.modulated_score(*calls["modulated_score"])
    raise AssertionError("IMRNNS_BACKEND=triton did not raise")
except dispatch.BackendError as exc:
    assert "pip install triton" in str(exc), exc
del os.environ["IMRNNS_BACKEND"]

import sys

assert "triton" not in sys.modules
print("without triton: ok")
"""


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "IMRNNS_BACKEND")}
    env["PYTHONPATH"] = str(ROOT)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(code: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=_child_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_every_op_runs_on_cpu_without_triton():
    out = _run(BLOCK_TRITON + textwrap.dedent(WITHOUT_TRITON))
    assert "without triton: ok" in out


def test_importing_the_package_does_not_import_triton():
    code = """
import sys

import imrnns_kernels
import imrnns_kernels.adapter.cpu
import imrnns_kernels.reference
import imrnns_kernels.scoring.cpu
import imrnns_kernels.testing
import imrnns_kernels.topk

loaded = sorted(m for m in sys.modules if m == "triton" or m.startswith("triton."))
assert not loaded, loaded
print("no triton")
"""
    assert "no triton" in _run(code)


# ----------------------------------------------------------------------------- explicit choices


def test_the_registry_states_each_ops_backends():
    for op in ("adapter_reduce", "corpus_transform", "document_transforms"):
        assert dispatch.backends(op) == ("triton", "cpu", "reference")
    for op in ("modulated_score", "modulated_topk"):
        assert dispatch.backends(op) == ("triton", "cpu", "reference")
    for op in sorted(dispatch.PLAIN_OPS):
        assert dispatch.backends(op) == ("reference",)
    with pytest.raises(ValueError, match="unknown op"):
        dispatch.backends("score")


def test_automatic_choice_is_inspectable(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("IMRNNS_BACKEND", raising=False)
    choice = dispatch.implementation("modulated_score", cpu)
    assert (choice.backend, choice.reason) == ("cpu", "automatic: tensors on cpu")
    assert choice.function.__module__ == "imrnns_kernels.scoring.cpu"
    # No backward in the CPU search: a call needing gradients runs the reference, and says so.
    choice = dispatch.implementation("modulated_topk", cpu, needs_grad=True)
    assert choice.backend == "reference" and "no backward" in choice.reason
    choice = dispatch.implementation("project", cpu)
    assert choice.backend == "reference" and "no cpu implementation" in choice.reason
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    choice = dispatch.implementation("adapter_reduce", cpu, needs_grad=True)
    assert choice.backend == "triton" and choice.function.__module__.endswith("adapter.triton")


def test_an_explicit_backend_never_falls_back_silently(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("IMRNNS_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with K.use_backend("cpu"), pytest.raises(dispatch.BackendError, match="modulated_topk.*no"):
        dispatch.implementation("modulated_topk", cpu, needs_grad=True)
    with K.use_backend("triton"):
        # A plain op has no fused kernel: its one implementation serves every backend.
        choice = dispatch.implementation("modulate_layernorm", cpu)
        assert choice.backend == "reference" and "no fused kernel" in choice.reason
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(dispatch.BackendError, match="modulated_score.*CUDA tensors"):
            dispatch.implementation("modulated_score", cpu)
    monkeypatch.setenv("IMRNNS_BACKEND", "cpu")
    choice = dispatch.implementation("modulated_score", cpu)
    assert (choice.backend, choice.reason) == ("cpu", "chosen by IMRNNS_BACKEND=cpu")


def test_a_forced_backend_without_the_op_raises(monkeypatch):
    monkeypatch.delenv("IMRNNS_BACKEND", raising=False)
    saved = dict(dispatch._REGISTRY["modulated_score"])
    del dispatch._REGISTRY["modulated_score"]["cpu"]
    try:
        with K.use_backend("cpu"), pytest.raises(dispatch.BackendError, match="no cpu impl"):
            dispatch.implementation("modulated_score", torch.device("cpu"))
    finally:
        dispatch._REGISTRY["modulated_score"].clear()
        dispatch._REGISTRY["modulated_score"].update(saved)
