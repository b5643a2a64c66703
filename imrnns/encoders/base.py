"""What the library takes as an encoder: texts in, ``(N, n)`` float32 rows out.

:class:`BaseEncoder` holds what every encoder shares: input checks, output checks (one
finite row per text, one width) and the embedding cache. Subclasses only embed:
:class:`imrnns.encoders.encoder.Encoder` (sentence-transformers) and
:class:`imrnns.encoders.function.FunctionEncoder` (any callable).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from imrnns.encoders.cache import EmbeddingCache

__all__ = [
    "SIMILARITIES",
    "BaseEncoder",
    "as_embeddings",
    "check_batch_size",
    "check_prefixes",
    "check_texts",
    "first_str",
]

# sentence-transformers' similarity functions, named as its ``similarity_fn_name``.
SIMILARITIES = ("cosine", "dot", "euclidean", "manhattan")


class BaseEncoder:
    """What the library takes as an encoder: texts in, ``(N, n)`` float32 rows out.

    Subclasses implement ``_embed``; this class validates inputs and outputs (finite, one
    row per text, a fixed width) and reads and writes the embedding cache.

    Attributes:
        name: a readable name (reports, progress bars).
        query_prefix, passage_prefix: prepended to queries / documents.
        batch_size: texts per forward pass (None: all at once).
        show_progress: show a progress bar while encoding.
        cache: the embedding cache, or None.
    """

    name: str = "encoder"
    query_prefix: str = ""
    passage_prefix: str = ""
    batch_size: int | None = None
    show_progress: bool = False
    cache: EmbeddingCache | None = None

    @property
    def fingerprint(self) -> str | None:
        """sha256 hex naming everything that determines the vectors; None when unknown
        (then nothing is cached and indexes cannot check which encoder made a query)."""
        return None

    @property
    def dim(self) -> int | None:
        """Embedding width n (None while unknown: a callable before its first call)."""
        return None

    @property
    def similarity(self) -> str:
        """The similarity the model was trained for: one of :data:`SIMILARITIES`."""
        return "cosine"

    @property
    def normalized(self) -> bool:
        """True when every output row has unit L2 norm (cosine equals the dot product)."""
        return False

    @property
    def tokenizer(self) -> Any:
        raise TypeError(
            f"{type(self).__name__} {self.name!r} has no tokenizer: explanations need a "
            "transformer encoder (Encoder from a folder or a SentenceTransformer)"
        )

    def token_embeddings(self) -> torch.Tensor:
        """The input token-embedding table; only transformer encoders have one."""
        raise TypeError(
            f"{type(self).__name__} {self.name!r} has no token-embedding table: explanations "
            "need a transformer encoder (Encoder from a folder or a SentenceTransformer)"
        )

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

    def _embed(
        self, texts: list[str], role: str, batch_size: int | None, show_progress: bool
    ) -> Any:
        raise NotImplementedError

    def _width(self) -> int | None:
        """The width the output must have, if known without encoding anything."""
        return self.dim

    def _encode(
        self,
        texts: Sequence[str],
        role: str,
        batch_size: int | None,
        cache: bool,
        show_progress: bool | None,
    ) -> np.ndarray:
        texts = check_texts(texts)
        bs = self.batch_size if batch_size is None else batch_size
        if bs is not None and (not isinstance(bs, int) or isinstance(bs, bool) or bs < 1):
            raise ValueError(f"batch_size must be a positive int, got {bs!r}")
        if not texts:
            dim = self.dim
            if dim is None:
                raise ValueError(
                    f"{self.name!r}: the width of an empty batch is unknown before the first "
                    "encode; pass dim= when wrapping the callable"
                )
            return np.zeros((0, dim), dtype=np.float32)

        fingerprint = self.fingerprint if cache and self.cache is not None else None
        store = self.cache if fingerprint is not None else None
        key = None
        if store is not None and fingerprint is not None:
            key = store.key(fingerprint, role, texts)
            hit = store.get(key, (len(texts), self._width()))
            if hit is not None:
                return hit

        progress = self.show_progress if show_progress is None else bool(show_progress)
        out = self._embed(texts, role, bs, progress)
        out = as_embeddings(out, len(texts), self._width(), self.name)
        self._seen_width(out.shape[1])
        if store is not None and key is not None:
            try:
                store.put(key, out)
            except OSError as e:
                # The vectors are right; only the cache could not keep them. Minutes of
                # encoding are not thrown away for that.
                warnings.warn(
                    f"could not write embedding cache entry {store.file(key)} ({e}); the "
                    "embeddings are returned but not cached",
                    stacklevel=3,
                )
        return out

    def _seen_width(self, width: int) -> None:
        """Record the width of an output (encoders that learn it on the first call)."""


def check_batch_size(batch_size: Any) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def check_prefixes(query_prefix: Any, passage_prefix: Any) -> None:
    for arg, value in (("query_prefix", query_prefix), ("passage_prefix", passage_prefix)):
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{arg} must be a str or None, got {type(value).__name__}")


def first_str(*values: str | None) -> str:
    for v in values:
        if v is not None:
            return v
    return ""


def as_embeddings(out: Any, rows: int, width: int | None, name: str) -> np.ndarray:
    """``out`` as a C-contiguous ``(rows, width)`` float32 array, or a ValueError/TypeError."""
    if isinstance(out, torch.Tensor):
        out = out.detach().to("cpu", torch.float32).numpy()
    elif isinstance(out, (list, tuple)) and out and isinstance(out[0], torch.Tensor):
        out = torch.stack([t.detach().to("cpu", torch.float32) for t in out]).numpy()
    try:
        arr = np.asarray(out)
    except (TypeError, ValueError) as e:
        raise TypeError(f"encoder {name!r} returned {type(out).__name__}, not an array: {e}") from e
    if arr.dtype.kind not in "fiu":
        raise TypeError(
            f"encoder {name!r} returned an array of dtype {arr.dtype}; expected real numbers"
        )
    if arr.ndim != 2 or arr.shape[0] != rows or arr.shape[1] < 1:
        raise ValueError(
            f"encoder {name!r} returned shape {arr.shape} for {rows} texts; expected "
            f"({rows}, {'n' if width is None else width})"
        )
    if width is not None and arr.shape[1] != width:
        raise ValueError(
            f"encoder {name!r} returned width {arr.shape[1]}; its embeddings are {width}-d"
        )
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise ValueError(
            f"encoder {name!r} returned NaN or Inf in {bad.size} of {rows} rows (first: row "
            f"{int(bad[0])}); a float16 model overflowing, or a broken callable"
        )
    return arr


def check_texts(texts: Sequence[str]) -> list[str]:
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
