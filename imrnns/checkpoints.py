"""Checkpoint import/export: the public functions over :mod:`imrnns._checkpoint_io`.

Formats read by :func:`load_pretrained`:

- Our own: a directory with ``model.safetensors`` and ``config.json`` (written atomically by
  :func:`save_pretrained`).
- Official v0.1 ``.pt`` files (``checkpoint_format == "imrnns-adapter-only-v1"``, projector
  256 x n): v0.1 semantics, ``aggregation="transform_of_mean"``. Legacy key prefixes
  ``e5_projector.`` / ``sbert_projector.`` map to ``projector.``.
- Official v0.2 ``.pt`` files (``checkpoint_format == "imrnns-final-v1"``, square
  projector): ``aggregation="mean_of_transforms"``.
- A bare state dict with the same keys (semantics from the projector's shape, or given).

``.pt`` files are read with ``torch.load(..., weights_only=True)``: no pickled code runs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from imrnns._checkpoint_io import (
    CONFIG_NAME,
    FORMAT,
    FORMAT_VERSION,
    LEGACY_PREFIXES,
    OFFICIAL_V01_FORMAT,
    OFFICIAL_V02_FORMAT,
    SEMANTICS,
    WEIGHTS_NAME,
    CheckpointError,
    canonicalize_safetensors_header,
    write_checkpoint,
)
from imrnns.model import IMRNN

__all__ = [
    "CONFIG_NAME",
    "FORMAT",
    "FORMAT_VERSION",
    "LEGACY_PREFIXES",
    "OFFICIAL_V01_FORMAT",
    "OFFICIAL_V02_FORMAT",
    "SEMANTICS",
    "WEIGHTS_NAME",
    "CheckpointError",
    "canonicalize_safetensors_header",
    "load_pretrained",
    "save_pretrained",
]


def save_pretrained(model: IMRNN, directory: str | Path) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``directory`` atomically.

    The files are written to a temporary sibling directory that replaces ``directory`` only
    once both are complete: a crash mid-way leaves the previous checkpoint intact.
    ``directory`` must be new, empty, or a checkpoint saved before (it is replaced as a
    whole): a directory of other files raises ValueError.
    """
    return write_checkpoint(model, directory)


def load_pretrained(
    path: str | Path,
    *,
    semantics: str | None = None,
    map_location: str | torch.device = "cpu",
) -> IMRNN:
    """Load a model from our directory format or an official ``.pt`` checkpoint.

    Same as :meth:`imrnns.IMRNN.from_pretrained` (arguments and errors documented there).
    """
    return IMRNN.from_pretrained(path, semantics=semantics, map_location=map_location)
