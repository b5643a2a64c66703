"""Shared test helpers: re-exported from :mod:`imrnns_kernels.testing` (the one tolerance
table, shared with the benchmarks and the GPU check)."""

from imrnns_kernels.testing import DTYPES, TOLERANCES, assert_close, unit_rows

__all__ = ["DTYPES", "TOLERANCES", "assert_close", "unit_rows"]
