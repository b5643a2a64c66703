"""Fast CPU implementations (chunked BLAS), used when no GPU is present.

``IMPLEMENTATIONS`` maps op names to entry points with the reference's signature.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

IMPLEMENTATIONS: dict[str, Callable[..., Any]] = {}
