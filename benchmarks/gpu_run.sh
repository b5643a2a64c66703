#!/usr/bin/env bash
# The whole GPU benchmark in one command, within 10 minutes:
#
#   bash benchmarks/gpu_run.sh [extra options for the sweep, e.g. --sizes 1e4,1e6,1e7]
#
# 1. compiles the Triton kernels for real (TRITON_INTERPRET unset) and checks every op
#    against the reference on the GPU (benchmarks/gpu_check.py); wrong results stop here,
#    before any timing (exit 1);
# 2. runs the scaling sweep (python -m benchmarks.scaling --device cuda): N = 1e4 .. 1e8
#    as memory allows, B = 1/32/256, k = 100, both modulations, exhaustive and rerank, every
#    provider, bf16 storage; the sweep re-checks each provider against the reference first
#    and aborts on a wrong fused result; it stops starting new points at a deadline that
#    leaves the later steps their time (skipped points are recorded as such);
# 3. benchmarks/gpu_tune.py: the floors (copy, plain read), the scoring kernels alone under a
#    few block shapes and whole exhaustive calls at N = 1e7, m = 256, bf16 (prints only);
# 4. the GPU pytest-benchmarks (exhaustive and rerank scoring, adapter FLOP/s against the
#    card's peak, the exhaustive search's device-memory budget), JSON saved;
# 5. the CUDA-only unit tests (compiled kernels vs the float64 reference,
#    tests/test_adapter_reduce.py -k compiled);
# 6. prints the Markdown table, the target ratios and the one-query memory-floor ratio at
#    N = 1e7 (target <= 1.5x), and validates the JSON against the schema when jsonschema is
#    installed.
#
# Results: $OUT (set by the device runner) or benchmarks/results, as
# gpu-<card>.{json,md,png}, bench-gpu.json and the logs gpu_check.log, pytest.log, tune.log,
# sweep.log (8 files: the device runner brings back at most 8).
# Environment: PYTHON (default python3), TOTAL_S (default 570: seconds for the whole script).
set -uo pipefail

cd "$(dirname "$0")/.."
unset TRITON_INTERPRET # the kernels must be compiled, not interpreted
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export IMRNNS_BENCH_NO_INSTALL=1 # no network on the GPU machines: never pip-install
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-benchmarks/results}"
TOTAL_S="${TOTAL_S:-570}"
mkdir -p "$OUT_DIR"

echo "== machine"
nvidia-smi -L 2>/dev/null || echo "(nvidia-smi not found)"
"$PY" - <<'EOF' || exit 2
import importlib, sys
import torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda {torch.version.cuda}, "
      f"gpu {torch.cuda.is_available() and torch.cuda.get_device_name(0)}")
missing = []
for name in ("triton", "numpy", "safetensors", "matplotlib", "faiss", "jsonschema"):
    try:
        mod = importlib.import_module(name)
        print(f"  {name} {getattr(mod, '__version__', '?')}")
    except ImportError:
        missing.append(name)
print("  not installed:", ", ".join(missing) or "none",
      "(faiss: the GPU floor and first stage use PyTorch instead; jsonschema: no validation)")
if not torch.cuda.is_available():
    sys.exit("no CUDA GPU visible to torch")
for name in ("triton", "numpy", "safetensors", "matplotlib"):
    if name in missing:
        sys.exit(f"{name} is required")
EOF

echo "== 1 compile + check the kernels against the reference"
timeout 200 "$PY" benchmarks/gpu_check.py 2>&1 | tee "$OUT_DIR/gpu_check.log"
rc=${PIPESTATUS[0]}
if [ "$rc" -eq 1 ]; then
    echo "ABORT: the kernels disagree with the reference; no timing was run"
    exit 1
elif [ "$rc" -eq 124 ]; then
    echo "WARNING: gpu_check ran out of time; the sweep still checks every provider first"
elif [ "$rc" -ne 0 ]; then
    echo "ABORT: gpu_check failed to run (exit $rc)"
    exit "$rc"
fi

# What runs after the sweep, in seconds: gpu_tune, the pytest-benchmarks, the unit tests.
TUNE_S=120
BENCH_S=90
UNIT_S=80
left=$((TOTAL_S - SECONDS - TUNE_S - BENCH_S - UNIT_S))
# A point in progress can outlast the deadline by about one per-point budget per provider.
deadline=$((left - 100))
if [ "$deadline" -lt 60 ]; then
    echo "ABORT: only ${left} s left for the sweep (TOTAL_S=${TOTAL_S})"
    exit 3
fi
echo "== 2 sweep (deadline ${deadline} s, hard limit $((left - 15)) s)"
timeout "$((left - 15))" "$PY" -m benchmarks.scaling --device cuda --deadline-s "$deadline" \
    --out "$OUT_DIR" "$@" 2>&1 | tee "$OUT_DIR/sweep.log"
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ]; then
    echo "sweep exited with $rc (1: wrong results, aborted; 124: killed at the time limit)"
fi

echo "== 3 where the time goes, block shapes (N=1e7, bf16)"
timeout "$TUNE_S" "$PY" benchmarks/gpu_tune.py 2>&1 | tee "$OUT_DIR/tune.log"
echo "(gpu_tune exit ${PIPESTATUS[0]})"

echo "== 4 GPU pytest-benchmarks"
timeout "$BENCH_S" "$PY" -m pytest -q -s -p no:cacheprovider --benchmark-only \
    --benchmark-json="$OUT_DIR/bench-gpu.json" -k "gpu or cuda" \
    benchmarks/test_bench_scoring.py benchmarks/test_bench_adapter.py \
    benchmarks/test_bench_memory.py 2>&1 | tee "$OUT_DIR/pytest.log"
echo "(pytest-benchmark exit ${PIPESTATUS[0]})"

echo "== 5 compiled-kernel unit tests"
TRITON_INTERPRET=0 timeout "$UNIT_S" "$PY" -m pytest -q -p no:cacheprovider \
    tests/test_adapter_reduce.py -k compiled 2>&1 | tee -a "$OUT_DIR/pytest.log"
echo "(unit tests exit ${PIPESTATUS[0]})"

echo "== 6 results"
"$PY" - "$OUT_DIR" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
files = sorted(out.glob("gpu-*.json"))
if not files:
    sys.exit("no sweep JSON written")
doc = json.loads(files[-1].read_text())
print(files[-1].with_suffix(".md").read_text())
t = doc["targets"]
g = t.get("gpu_memory_floor", {})
if g.get("status") == "ok":
    print(f"ONE QUERY, N={g['n']:.0e}: {g['latency_s'] * 1e3:.3f} ms = {g['ratio']:.2f}x the memory "
          f"floor {g['memory_floor_s'] * 1e3:.3f} ms (target <= 1.5): "
          f"{'MET' if g['met'] else 'MISSED'}")
else:
    print("one-query memory floor:", g)
if t.get("status") == "ok":
    print(f"fused / {t['floor_provider']} = {t['fused_vs_floor']:.2f} (<= 2), "
          f"naive / fused = {t['naive_vs_fused']:.1f}x (>= 5)")
bad = [s for s in doc["slopes"] if s["superlinear"]]
print("superlinear slopes:", [(s["mode"], s["modulation"], s["batch"], s["provider"],
                               round(s["slope_large_n"] or s["slope"], 2)) for s in bad] or "none")
try:
    import jsonschema
except ImportError:
    print("jsonschema not installed: schema validation skipped")
else:
    schema = json.loads(pathlib.Path("benchmarks/schema/scaling.schema.json").read_text())
    jsonschema.validate(doc, schema)
    print("JSON validates against benchmarks/schema/scaling.schema.json")
EOF
echo "total ${SECONDS} s"
exit "$rc"
