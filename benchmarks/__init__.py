"""Benchmarks: pytest-benchmark suites (``pytest benchmarks/ --benchmark-only``) and the
scaling sweep (``python -m benchmarks.scaling``). See benchmarks/RESULTS.md."""
