"""IMRNNs: interpretable dense retrieval by embedding modulation, fast.

Public API (README.md, docs/architecture.md)::

    from imrnns import IMRNN, IMRNNConfig, IMRNNIndex, Encoder, load_beir
"""

from __future__ import annotations

from typing import Any

from imrnns.checkpoints import CheckpointError, load_pretrained, save_pretrained
from imrnns.config import IMRNNConfig
from imrnns.model import IMRNN, IMRNNOutput

__version__ = "0.1.0"

# Heavier parts (transformers, faiss) load on first use, so `import imrnns` stays fast.
_LAZY = {
    "Encoder": ("imrnns.encoders", "Encoder"),
    "load_beir": ("imrnns.data", "load_beir"),
    "IMRNNIndex": ("imrnns.index", "IMRNNIndex"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'imrnns' has no attribute {name!r}")


__all__ = [
    "IMRNN",
    "CheckpointError",
    "Encoder",
    "IMRNNConfig",
    "IMRNNIndex",
    "IMRNNOutput",
    "load_beir",
    "load_pretrained",
    "save_pretrained",
]
