"""Fused Triton kernels, one op per module: ``_<op>_kernel`` -> launcher -> autograd Function.

``IMPLEMENTATIONS`` maps op names (see :mod:`imrnns_kernels.dispatch`) to the Triton-backed
entry point with the reference's signature. An entry that supports autograd carries
``fn.supports_autograd = True``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

IMPLEMENTATIONS: dict[str, Callable[..., Any]] = {}
