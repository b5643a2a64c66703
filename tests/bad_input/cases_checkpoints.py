"""Bad checkpoints: adapter folders and official ``.pt`` files, truncated or tampered."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from imrnns import CheckpointError
from imrnns.checkpoints import load_pretrained, save_pretrained
from tests.bad_input.harness import (
    Workspace,
    case,
    target_of,
    truncate,
)


# --------------------------------------------------------------------------- checkpoints
def _ckpt_case(
    name: str,
    exc: type[BaseException],
    match: str,
    tamper: Callable[[Workspace], Path | None],
    **kw: Any,
) -> None:
    def setup(ws: Workspace) -> Callable[[], Any]:
        target = target_of(tamper(ws), ws.adapter_dir)
        return lambda: load_pretrained(target, **kw)

    setup.__name__ = name
    case("checkpoint", exc, match)(setup)


def _rewrite_weights(
    change: Callable[[dict[str, torch.Tensor]], None],
) -> Callable[[Workspace], None]:
    def tamper(ws: Workspace) -> None:
        path = ws.adapter_dir / "model.safetensors"
        state = load_file(str(path))
        change(state)
        save_file(
            state, str(path), metadata={"format": "imrnns-kernels-adapter", "format_version": "1"}
        )

    return tamper


def _rewrite_config(change: Callable[[dict[str, Any]], None]) -> Callable[[Workspace], None]:
    def tamper(ws: Workspace) -> None:
        path = ws.adapter_dir / "config.json"
        payload = json.loads(path.read_text())
        change(payload)
        path.write_text(json.dumps(payload))

    return tamper


def _official(payload: Any) -> Callable[[Workspace], Path]:
    def tamper(ws: Workspace) -> Path:
        path = ws.root / "bad.pt"
        torch.save(payload, path)
        return path

    return tamper


class _Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("touch pwned",))


def _pickled_code(ws: Workspace) -> Path:
    path = ws.root / "evil.pt"
    torch.save({"model_state": {"x": _Evil()}}, path)
    return path


def _state(ws: Workspace) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in ws.model.state_dict().items()}


_ckpt_case(
    "missing_path",
    FileNotFoundError,
    r"no such directory: .*nowhere",
    lambda ws: ws.root / "nowhere",
)
_ckpt_case(
    "missing_pt_file",
    FileNotFoundError,
    r"checkpoint not found: .*nowhere.pt",
    lambda ws: ws.root / "nowhere.pt",
)
_ckpt_case(
    "no_config_json",
    FileNotFoundError,
    r"has no config.json",
    lambda ws: (ws.adapter_dir / "config.json").unlink(),
)
_ckpt_case(
    "no_weights",
    FileNotFoundError,
    r"has no model.safetensors",
    lambda ws: (ws.adapter_dir / "model.safetensors").unlink(),
)
_ckpt_case(
    "config_not_json",
    CheckpointError,
    r"config.json: not valid JSON",
    lambda ws: (ws.adapter_dir / "config.json").write_text("{'a':"),
)
_ckpt_case(
    "config_wrong_format",
    CheckpointError,
    r"not an imrnns-kernels-adapter config",
    _rewrite_config(lambda p: p.update(format="x")),
)
_ckpt_case(
    "config_newer_version",
    CheckpointError,
    r"format_version 7 is newer than this library reads",
    _rewrite_config(lambda p: p.update(format_version=7)),
)
_ckpt_case(
    "config_invalid_field",
    CheckpointError,
    r"invalid config \(dim must be a positive int, got -1\)",
    _rewrite_config(lambda p: p["config"].update(dim=-1)),
)
_ckpt_case(
    "config_unknown_field",
    CheckpointError,
    r"invalid config \(unknown IMRNNConfig fields \['colour'\]",
    _rewrite_config(lambda p: p["config"].update(colour="red")),
)
_ckpt_case(
    "weights_truncated",
    CheckpointError,
    r"model.safetensors: unreadable or truncated safetensors",
    lambda ws: truncate(ws.adapter_dir / "model.safetensors"),
)
_ckpt_case(
    "weights_garbage",
    CheckpointError,
    r"model.safetensors: unreadable or truncated safetensors",
    lambda ws: (ws.adapter_dir / "model.safetensors").write_bytes(b"\x00" * 64),
)
_ckpt_case(
    "weights_missing_key",
    CheckpointError,
    r"missing keys \['doc_norm.bias'\], unexpected keys \[\]",
    _rewrite_weights(lambda s: s.pop("doc_norm.bias")),
)
_ckpt_case(
    "weights_unexpected_key",
    CheckpointError,
    r"unexpected keys \['extra'\]",
    _rewrite_weights(lambda s: s.update(extra=torch.zeros(1))),
)
_ckpt_case(
    "weights_wrong_shape",
    CheckpointError,
    r"tensor 'query_norm.weight' has shape \(7,\), expected \(8,\)",
    _rewrite_weights(lambda s: s.update({"query_norm.weight": torch.ones(7)})),
)
_ckpt_case(
    "weights_nan",
    CheckpointError,
    r"tensor 'doc_norm.weight' contains NaN/Inf",
    _rewrite_weights(lambda s: s["doc_norm.weight"].__setitem__(0, float("nan"))),
)
_ckpt_case(
    "weights_int",
    CheckpointError,
    r"tensor 'doc_norm.bias' has non-float dtype torch.int64",
    _rewrite_weights(lambda s: s.update({"doc_norm.bias": torch.zeros(8, dtype=torch.int64)})),
)
_ckpt_case(
    "official_truncated",
    CheckpointError,
    r"official.pt: cannot read checkpoint",
    lambda ws: truncate(ws.official) or ws.official,
)
_ckpt_case(
    "official_garbage",
    CheckpointError,
    r"bad.pt: cannot read checkpoint",
    lambda ws: (ws.root / "bad.pt").write_bytes(b"not a zip file") and ws.root / "bad.pt",
)
_ckpt_case(
    "official_list_payload",
    CheckpointError,
    r"expected a state dict of tensors under 'model_state'",
    _official([1, 2, 3]),
)
_ckpt_case(
    "official_no_projector",
    CheckpointError,
    r"missing 2-D tensor 'projector.weight'",
    lambda ws: _official(
        {"model_state": {k: v for k, v in _state(ws).items() if not k.startswith("projector")}}
    )(ws),
)
_ckpt_case(
    "official_bad_width",
    CheckpointError,
    r"HyperNet output width 15 fits neither diagonal \(2m = 16\) nor affine",
    lambda ws: _official(
        {"model_state": {**_state(ws), "query_hypernet.hypernet.6.weight": torch.zeros(15, 64)}}
    )(ws),
)
_ckpt_case(
    "official_pickled_code",
    CheckpointError,
    r"evil.pt: cannot read checkpoint \(UnpicklingError",
    _pickled_code,
)
_ckpt_case(
    "bad_semantics",
    ValueError,
    r"semantics must be one of \('v0.1', 'v0.2'\), got 'v0.3'",
    lambda ws: ws.official,
    semantics="v0.3",
)


@case("checkpoint", ValueError, r"exists and is not a directory")
def save_over_a_file(ws):
    return lambda: save_pretrained(ws.model, ws.beir / "corpus.jsonl")


# Issue 17: saves never replace a folder that is not ours; a config cannot make the loader
# build a huge model before the shapes are checked.
_ckpt_case(
    "config_huge_dimensions",
    CheckpointError,
    r"model.safetensors: tensor 'projector.weight' has shape \(8, 16\), expected "
    r"\(8, 1000000000\)",
    _rewrite_config(lambda p: p["config"].update(input_dim=10**9)),
)


@case("checkpoint", ValueError, r"minilm is not an earlier adapter checkpoint save .*tokenizer")
def save_over_a_hugging_face_folder(ws):
    folder = ws.root / "minilm"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "tokenizer.json").write_text("{}")
    return lambda: save_pretrained(ws.model, folder)


@case("checkpoint", ValueError, r"adapter is not an earlier adapter checkpoint .*README.md")
def save_over_a_checkpoint_with_a_foreign_file(ws):
    (ws.adapter_dir / "README.md").write_text("my notes")
    return lambda: save_pretrained(ws.model, ws.adapter_dir)
