"""Checkpoint file formats: read and write without building a model.

:mod:`imrnns.model` (``IMRNN.from_pretrained`` / ``save_pretrained``) and the public
:mod:`imrnns.checkpoints` sit on top of this module. Formats read by :func:`read_checkpoint`:

- Our own: a directory with ``model.safetensors`` and ``config.json`` (written atomically by
  :func:`write_checkpoint`).
- Official v0.1 ``.pt`` files (``checkpoint_format == "imrnns-adapter-only-v1"``, projector
  256 x n): v0.1 semantics, ``aggregation="transform_of_mean"``. Legacy key prefixes
  ``e5_projector.`` / ``sbert_projector.`` map to ``projector.``.
- Official v0.2 ``.pt`` files (``checkpoint_format == "imrnns-final-v1"``, square
  projector): ``aggregation="mean_of_transforms"``.
- A bare state dict with the same keys (semantics from the projector's shape, or given).

``.pt`` files are read with ``torch.load(..., weights_only=True)``: no pickled code runs.
A directory's ``config.json`` is checked against its safetensors header (every key and shape,
:func:`state_shapes`; no tensor read) before anything is loaded or built, so a config claiming
huge dimensions allocates nothing. A save replaces a directory only when it is an earlier
save of this format (:data:`CHECKPOINT_LAYOUT`, :func:`imrnns._atomic.check_replaceable`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from imrnns._atomic import (
    SaveLayout,
    atomic_directory,
    read_directory,
    read_format_json,
    resolve_directory,
)
from imrnns.config import IMRNNConfig

if TYPE_CHECKING:
    from torch import nn

FORMAT = "imrnns-kernels-adapter"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
OFFICIAL_V01_FORMAT = "imrnns-adapter-only-v1"
OFFICIAL_V02_FORMAT = "imrnns-final-v1"
LEGACY_PREFIXES = ("e5_projector.", "sbert_projector.")
SEMANTICS = ("v0.1", "v0.2")
CHECKPOINT_LAYOUT = SaveLayout(
    kind="adapter checkpoint",
    header=CONFIG_NAME,
    format=FORMAT,
    max_version=FORMAT_VERSION,
    files=frozenset({CONFIG_NAME, WEIGHTS_NAME}),
)


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, or does not match the architecture."""


def write_checkpoint(model: nn.Module, directory: str | Path) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``directory`` atomically.

    The files are written to a temporary sibling directory that replaces ``directory`` only
    once both are complete: a crash mid-way leaves the previous checkpoint intact.
    ``directory`` must be new, empty, or an earlier checkpoint save (it is replaced as a
    whole), recognised by content (:data:`CHECKPOINT_LAYOUT`: our ``config.json`` and
    nothing but the two files): anything else, such as a Hugging Face model folder, raises
    ValueError naming the files that would be lost, and nothing is written.
    """
    directory = Path(directory)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION)}
    with atomic_directory(directory, CHECKPOINT_LAYOUT) as tmp:
        save_file(state, str(tmp / WEIGHTS_NAME), metadata=meta)
        canonicalize_safetensors_header(tmp / WEIGHTS_NAME)
        payload = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "config": model.config.to_dict(),
        }
        (tmp / CONFIG_NAME).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return directory


def canonicalize_safetensors_header(path: str | Path) -> None:
    """Rewrite a safetensors file's header with its ``__metadata__`` keys sorted.

    safetensors (0.8) serialises the metadata map in hash order, which changes from call to
    call (two keys: either order, about half the time each), so saving the same model twice
    gave different bytes. The tensor entries are kept in the order written (sorted by
    safetensors) and the data section is untouched; the header keeps its length (the same
    keys and values reordered), so it is rewritten in place.
    """
    path = Path(path)
    with open(path, "r+b") as fh:
        size = int.from_bytes(fh.read(8), "little")
        raw = fh.read(size)
        header = json.loads(raw, object_pairs_hook=dict)
        meta = header.get("__metadata__")
        if not isinstance(meta, dict) or len(meta) < 2:
            return
        ordered = {"__metadata__": dict(sorted(meta.items()))}
        ordered.update((k, v) for k, v in header.items() if k != "__metadata__")
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
        # safetensors pads the header with spaces to a multiple of 8 bytes.
        text += b" " * (size - len(text))
        if len(text) != size:
            raise CheckpointError(f"{path}: unexpected safetensors header layout")
        fh.seek(8)
        fh.write(text)


def read_checkpoint(
    path: str | Path, semantics: str | None = None
) -> tuple[IMRNNConfig, dict[str, torch.Tensor], Path]:
    """Read a checkpoint without building a model: ``(config, state dict, file read)``.

    ``path`` is a directory written by :func:`write_checkpoint` (an interrupted save is
    recovered first, and a save swapping in a new version meanwhile makes the read start
    again: :func:`imrnns._atomic.read_directory`) or an official ``.pt`` file; see the
    module docstring for the formats.
    """
    path = Path(path)
    if semantics is not None and semantics not in SEMANTICS:
        raise ValueError(f"semantics must be one of {SEMANTICS}, got {semantics!r}")
    # A file first: a directory save may be mid-swap (its name missing for an instant), and
    # read_directory resolves that under the swap lock; a file is never swapped that way.
    if path.is_file():
        return _read_official(path, semantics)
    if path.suffix == ".pt":
        try:
            resolve_directory(path)  # a directory save named *.pt, or nothing at all
        except FileNotFoundError:
            raise FileNotFoundError(f"checkpoint not found: {path}") from None
    return read_directory(path, _read_directory)


def _read_directory(directory: Path) -> tuple[IMRNNConfig, dict[str, torch.Tensor], Path]:
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for p in (config_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"checkpoint directory {directory} has no {p.name}")
    payload = read_format_json(config_path, FORMAT, FORMAT_VERSION, CheckpointError, "config")
    try:
        config = IMRNNConfig.from_dict(payload["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{config_path}: invalid config ({exc})") from exc
    try:
        # The config's dimensions decide what building the model allocates: check them
        # against the file's header (no tensor read) before anything is built or loaded.
        with safe_open(str(weights_path), framework="pt") as fh:
            shapes = {key: tuple(fh.get_slice(key).get_shape()) for key in fh.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{weights_path}: unreadable or truncated safetensors ({exc})"
        ) from exc
    check_shapes(shapes, state_shapes(config), weights_path)
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{weights_path}: unreadable or truncated safetensors ({exc})"
        ) from exc
    return config, state, weights_path


def _read_official(
    path: Path, semantics: str | None
) -> tuple[IMRNNConfig, dict[str, torch.Tensor], Path]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated/corrupt zip files
        raise CheckpointError(
            f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc})"
        ) from exc
    metadata: dict[str, Any] = {}
    if isinstance(payload, dict) and "model_state" in payload:
        state = payload["model_state"]
        metadata = payload.get("metadata") or {}
    else:
        state = payload
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors under 'model_state'")
    state = {_rename_legacy(k): v for k, v in state.items()}
    proj = state.get("projector.weight")
    if proj is None or proj.dim() != 2:
        raise CheckpointError(f"{path}: missing 2-D tensor 'projector.weight'")
    m, n = (int(s) for s in proj.shape)
    if semantics is None:
        fmt = metadata.get("checkpoint_format") if isinstance(metadata, dict) else None
        if fmt == OFFICIAL_V01_FORMAT:
            semantics = "v0.1"
        elif fmt == OFFICIAL_V02_FORMAT:
            semantics = "v0.2"
        else:
            semantics = "v0.2" if m == n else "v0.1"
    return _infer_config(state, path, n, m, semantics), state, path


def _rename_legacy(key: str) -> str:
    for prefix in LEGACY_PREFIXES:
        if key.startswith(prefix):
            return "projector." + key[len(prefix) :]
    return key


def _infer_config(
    state: dict[str, torch.Tensor], path: Path, n: int, m: int, semantics: str
) -> IMRNNConfig:
    def shape(key: str) -> tuple[int, ...]:
        t = state.get(key)
        if t is None:
            raise CheckpointError(f"{path}: missing tensor {key!r}")
        return tuple(t.shape)

    h1 = shape("query_hypernet.hypernet.0.weight")[0]
    h2 = shape("query_hypernet.hypernet.3.weight")[0]
    out = shape("query_hypernet.hypernet.6.weight")[0]
    if out == 2 * m:
        modulation = "diagonal"
    elif out == m * m + m:
        modulation = "affine"
    else:
        raise CheckpointError(
            f"{path}: HyperNet output width {out} fits neither diagonal (2m = {2 * m}) nor "
            f"affine (m*m + m = {m * m + m}) modulation at m = {m}"
        )
    base = IMRNNConfig.official_v01(n, m) if semantics == "v0.1" else IMRNNConfig.official_v02(n)
    return IMRNNConfig.from_dict(
        {**base.to_dict(), "dim": m, "hidden_dims": [h1, h2], "modulation": modulation}
    )


def state_shapes(config: IMRNNConfig) -> dict[str, tuple[int, ...]]:
    """The state-dict key and shape of every tensor of ``IMRNN(config)``, without building it.

    With n = input_dim, m = working_dim, (h1, h2) = hidden_dims, OUT = transform_dim:
    projector (m, n) + (m,); each HyperNet (h1, m) + (h1,), (h2, h1) + (h2,), (OUT, h2) +
    (OUT,); each LayerNorm (m,) + (m,). tests/model/test_checkpoints.py checks it against
    the model's own state dict.
    """
    n, m = config.input_dim, config.working_dim
    (h1, h2), out = config.hidden_dims, config.transform_dim
    shapes: dict[str, tuple[int, ...]] = {"projector.weight": (m, n), "projector.bias": (m,)}
    for side in ("query", "doc"):
        for layer, (rows, cols) in zip((0, 3, 6), ((h1, m), (h2, h1), (out, h2)), strict=True):
            shapes[f"{side}_hypernet.hypernet.{layer}.weight"] = (rows, cols)
            shapes[f"{side}_hypernet.hypernet.{layer}.bias"] = (rows,)
        shapes[f"{side}_norm.weight"] = (m,)
        shapes[f"{side}_norm.bias"] = (m,)
    return shapes


def check_shapes(
    got: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], path: Path
) -> None:
    """Raise CheckpointError naming ``path`` unless ``got`` has exactly ``expected``'s keys
    and shapes (``expected``: :func:`state_shapes` of the config, or the model's own)."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path}: missing keys {missing}, unexpected keys {unexpected}")
    for key, want in expected.items():
        if tuple(got[key]) != tuple(want):
            raise CheckpointError(
                f"{path}: tensor {key!r} has shape {tuple(got[key])}, expected {tuple(want)}"
            )


def load_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Copy ``state`` into ``model`` after checking keys, shapes, float dtypes and finiteness."""
    expected = model.state_dict()
    check_shapes(
        {k: tuple(v.shape) for k, v in state.items()},
        {k: tuple(v.shape) for k, v in expected.items()},
        path,
    )
    for key in expected:
        got = state[key]
        if not got.is_floating_point():
            raise CheckpointError(f"{path}: tensor {key!r} has non-float dtype {got.dtype}")
        if not bool(torch.isfinite(got).all()):
            raise CheckpointError(f"{path}: tensor {key!r} contains NaN/Inf")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)
