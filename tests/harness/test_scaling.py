"""The scaling sweep (``python -m benchmarks.scaling``): end to end on a tiny size, its JSON
against the schema, and the pieces that decide what it measures and skips."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import scaling as bench
from benchmarks.scaling import cli as scaling_cli
from benchmarks.scaling import providers as scaling_providers
from benchmarks.scaling import report as scaling_report
from benchmarks.scaling import runner as scaling_runner

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT / "benchmarks" / "schema" / "scaling.schema.json"

TINY = [
    "--device", "cpu",
    "--sizes", "700,2100",  # non-round sizes, 3x apart
    "--batches", "1,3",
    "--dim", "24",
    "--k", "10",
    "--feedback-k", "20",
    "--target-n", "1500",
    "--budget-s", "5",
    "--repeats", "1",
    "--no-install-official",  # uses the official package when installed, never downloads
    # The fused provider on the chunked CPU path: tests/conftest.py sets TRITON_INTERPRET=1.
    "--fused-backend", "cpu",
    "--machine", "tiny",
]  # fmt: skip


def _validator():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())


@pytest.mark.slow
def test_sweep_end_to_end_tiny(tmp_path, capsys):
    rc = bench.main([*TINY, "--out", str(tmp_path), "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    doc = json.loads((tmp_path / "tiny.json").read_text())
    errors = sorted(_validator().iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors[:5]]
    assert summary["files"]["json"] == str(tmp_path / "tiny.json")
    assert (tmp_path / "tiny.png").stat().st_size > 10_000
    md = (tmp_path / "tiny.md").read_text()
    assert "## exhaustive, diagonal" in md and "## rerank, affine" in md and "slope" in md

    # Every provider was checked against the reference before timing, and agreed.
    assert doc["checks"] and all(c["passed"] for c in doc["checks"]), doc["checks"]
    assert {c["provider"] for c in doc["checks"]} >= {"fused", "naive"}

    # One record per (mode, modulation, N, B, provider); every skip says why.
    pts = doc["points"]
    keys = [(p["mode"], p["modulation"], p["n"], p["batch"], p["provider"]) for p in pts]
    assert len(keys) == len(set(keys)) == 2 * 2 * 2 * 2 * len(doc["config"]["providers"])
    for p in pts:
        if p["status"] == "skipped":
            assert p["reason"] and p["skip_code"] in bench.SKIP_CODES
    ok = {(p["mode"], p["provider"]) for p in pts if p["status"] == "ok"}
    for mode in ("exhaustive", "rerank"):
        assert {(mode, "fused"), (mode, "reference"), (mode, "naive"), (mode, "faiss_flat")} <= ok
    # The official package has no exhaustive mode and only diagonal modulation.
    for p in pts:
        if p["provider"] == "official" and (
            p["mode"] == "exhaustive" or p["modulation"] == "affine"
        ):
            assert p["status"] == "skipped"
    # torch.compile of the reference: timed, or unavailable with the reason (no C++ compiler).
    for p in pts:
        if p["provider"] == "compiled_reference":
            assert p["status"] == "ok" or p["skip_code"] == "unavailable", p
            if p["status"] == "ok":
                assert p["warmup_s"] > 0  # the compilation, outside every timed call
    for p in pts:
        if p["status"] == "ok":
            assert p["latency_s"] > 0 and math.isclose(p["qps"], p["batch"] / p["latency_s"])
            if p["mode"] == "rerank":
                assert math.isclose(p["latency_s"], p["first_stage_s"] + p["stage_s"])

    # Slopes for every provider measured at both sizes; the kernel-ratio targets were measured.
    assert any(s["provider"] == "fused" for s in doc["slopes"])
    t = doc["targets"]
    assert t["status"] == "ok" and t["n"] == 1500 and t["fused_matches_naive"]["passed"]
    assert t["gpu_memory_floor"]["status"] == "not_measured"


def test_schema_rejects_a_skip_without_reason():
    validator = _validator()
    doc = _minimal_doc()
    assert not list(validator.iter_errors(doc))
    doc["points"].append(
        {"mode": "exhaustive", "modulation": "affine", "n": 10, "batch": 1,
         "provider": "naive", "status": "skipped"}
    )  # fmt: skip
    assert list(validator.iter_errors(doc))


def _minimal_doc() -> dict:
    return {
        "schema_version": 1,
        "tool": "python -m benchmarks.scaling",
        "created": "2026-01-01T00:00:00+00:00",
        "machine_name": "x",
        "machine": {
            "cpu_model": "c", "cpu_cores": 2, "python": "3.11", "torch": "2", "triton": "3",
            "device": "cpu", "device_name": "c", "torch_threads": 2, "peak_gbps": 19.0,
            "peak_flops": 1.4e11, "measured_copy_gbps": 10.0,
        },
        "config": {
            "device": "cpu", "sizes": [10], "batches": [1], "k": 1, "dim": 4, "feedback_k": 1,
            "modulations": ["diagonal"], "modes": ["exhaustive"], "providers": ["fused"],
            "dtype": "float16", "budget_s": 1.0, "repeats": 1,
        },
        "checks": [],
        "targets": {"gpu_memory_floor": {"status": "not_measured"}},
        "points": [],
        "slopes": [],
        "wall_time_s": 1.0,
    }  # fmt: skip


def test_loglog_fit_and_superlinear_flag():
    ns = [1e4, 1e5, 1e6, 1e7]
    slope, _, r2 = bench.loglog_fit(ns, [3e-9 * n for n in ns])
    assert slope == pytest.approx(1.0) and r2 == pytest.approx(1.0)

    def pts(provider, f):
        return [
            {"mode": "exhaustive", "modulation": "diagonal", "batch": 1, "provider": provider,
             "n": int(n), "status": "ok", "latency_s": f(n)}
            for n in ns
        ]  # fmt: skip

    # Fixed cost at small N, linear beyond: the all-N slope is < 1, the large-N slope ~1.
    rows = bench.fit_slopes(
        pts("fused", lambda n: 1e-4 + 1e-8 * n) + pts("naive", lambda n: 1e-14 * n**2)
    )
    by = {r["provider"]: r for r in rows}
    assert by["fused"]["slope"] < by["fused"]["slope_large_n"]
    assert by["fused"]["slope_large_n"] == pytest.approx(1.0, abs=0.05)
    assert not by["fused"]["superlinear"]
    assert by["naive"]["superlinear"] and by["naive"]["slope"] == pytest.approx(2.0)


def test_planner_skips_by_predicted_time():
    planner = bench.Planner(budget_s=5.0)
    key = ("exhaustive", "diagonal", "naive")
    planner.record(key, 1000, 1, 1.0)
    pred, why = planner.check(key, 3000, 1, n_exponent=1.0)
    assert pred == pytest.approx(3.0) and why is None
    pred, why = planner.check(key, 10_000, 1, n_exponent=1.0)
    assert pred == pytest.approx(10.0) and "budget" in why and "N=1000" in why
    # Once over budget, larger sizes and batches are skipped without a new prediction.
    assert "already over" in planner.check(key, 100_000, 4, 1.0)[1]
    # A larger batch at a measured size is predicted linearly in B.
    pred, why = planner.check(key, 1000, 8, 1.0)
    assert pred == pytest.approx(8.0) and why is not None
    # A rerank second stage does not grow with N.
    rkey = ("rerank", "diagonal", "naive")
    planner.record(rkey, 1000, 1, 1.0)
    assert planner.check(rkey, 10**7, 1, n_exponent=0.0) == (pytest.approx(1.0), None)


def test_memory_estimates_skip_the_materialising_reference():
    # The reference materialises (B, N, m) fp32 several times: at N=1e7, B=256, m=256 that is
    # terabytes; the fused path needs a bounded workspace whatever N is.
    ref = bench.estimate_bytes(
        "reference", "exhaustive", "diagonal", 10**7, 256, 256, 100, 2, "cpu"
    )
    fused = bench.estimate_bytes("fused", "exhaustive", "diagonal", 10**7, 256, 256, 100, 2, "cpu")
    assert ref > 1e13 and fused < 1 << 30


def test_verify_aborts_on_wrong_fused_results(tmp_path, monkeypatch):
    real = bench.exhaustive_providers

    def broken(p, k, device):
        fns = real(p, k, device)
        good = fns["fused"]

        def wrong():
            s, i = good()
            return s + 1e-2, i

        fns["fused"] = wrong
        return fns

    monkeypatch.setattr(scaling_runner, "exhaustive_providers", broken)
    cfg = bench.SweepConfig(
        sizes=[500], batches=[1], k=5, dim=16, feedback_k=10, modulations=["diagonal"],
        modes=["exhaustive"], providers=["fused", "reference"], targets=False, plot=False,
        fused_backend="cpu", out=str(tmp_path), machine="broken",
    )  # fmt: skip
    with pytest.raises(bench.BenchAbort, match="disagree"):
        bench.Sweep(cfg, log=lambda msg: None).run()
    assert not (tmp_path / "broken.json").exists()  # nothing was timed or written


def test_compare_tolerates_tie_order_not_wrong_scores():
    s = torch.tensor([[0.9, 0.5, 0.5]])
    ok = bench.compare((s, torch.tensor([[3, 1, 2]])), (s, torch.tensor([[3, 2, 1]])))
    assert ok["passed"] and ok["id_agreement"] == 1.0
    bad = bench.compare((s + 1e-3, torch.tensor([[3, 1, 2]])), (s, torch.tensor([[3, 1, 2]])))
    assert not bad["passed"]


def test_sweep_command_has_help():
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.scaling", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "--sizes" in out and "--budget-s" in out


def test_compiled_reference_reports_itself_unavailable(monkeypatch):
    """Where torch.compile cannot run, the provider is a recorded skip with the reason."""
    reason = "torch.compile on the CPU needs a C++ compiler (none of $CXX, g++, c++, clang++)"
    monkeypatch.setattr(scaling_providers, "compile_unavailable_reason", lambda device: reason)
    model = bench.make_model(8, "diagonal", 0, "cpu")
    corpus = bench.build_corpus(40, 8, torch.float32, "cpu", 0, False, 1 << 30)
    q = bench.unit_rows(2, 8, torch.float32, "cpu", 1)
    tq, qt = bench.query_state(model, corpus.data, q, 5, 0, "cpu")
    prob = bench.Problem(corpus, model, None, None, q, tq, qt, torch.zeros(2, 5, dtype=torch.long))
    for table in (
        bench.exhaustive_providers(prob, 3, "cpu"),
        bench.rerank_providers(prob, 3, "cpu"),
    ):
        assert table["compiled_reference"] == ("unavailable", reason)
    with pytest.raises(bench.ProviderUnavailable, match="C\\+\\+ compiler"):
        bench.CompiledReference(torch.add)(torch.ones(2), torch.ones(2))


def test_number_formats():
    assert scaling_cli._ints("1e4, 3e6,256") == [10_000, 3_000_000, 256]
    assert [scaling_report._fmt_n(n) for n in (500, 10_000, 30_000, 2017)] == [
        "500", "1e4", "3e4", "2.02e3"
    ]  # fmt: skip
