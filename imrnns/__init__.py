"""IMRNNs: interpretable dense retrieval by embedding modulation, fast.

Public API (README.md, docs/architecture.md)::

    from imrnns import IMRNN, IMRNNConfig, IMRNNIndex, Encoder, load_beir

Every name loads on first use (PEP 562), so ``import imrnns`` and ``imrnns --help`` import no
torch, transformers or faiss; type checkers see the real names through the ``TYPE_CHECKING``
imports below.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from imrnns.checkpoints import CheckpointError, load_pretrained, save_pretrained
    from imrnns.config import IMRNNConfig
    from imrnns.data import load_beir
    from imrnns.encoders import Encoder
    from imrnns.index import IMRNNIndex
    from imrnns.model import IMRNN, IMRNNOutput

__version__ = "0.1.0"

_LAZY = {
    "IMRNN": "imrnns.model",
    "IMRNNOutput": "imrnns.model",
    "IMRNNConfig": "imrnns.config",
    "CheckpointError": "imrnns.checkpoints",
    "load_pretrained": "imrnns.checkpoints",
    "save_pretrained": "imrnns.checkpoints",
    "Encoder": "imrnns.encoders",
    "load_beir": "imrnns.data",
    "IMRNNIndex": "imrnns.index",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'imrnns' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


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
