"""Strict JSON output: ``json.dumps`` writes NaN and infinities as the bare tokens ``NaN`` /
``Infinity``, which are not JSON and which strict parsers reject."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np


def finite(x: Any) -> Any:
    """A copy of ``x`` with every NaN/inf float (a diverged loss, an empty subset's mean, the
    t statistic of a constant shift) replaced by None; mapping keys become strings. Dump the
    result with ``allow_nan=False``."""
    if isinstance(x, Mapping):
        return {str(k): finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    if isinstance(x, (float, np.floating)) and not math.isfinite(x):
        return None
    return x
