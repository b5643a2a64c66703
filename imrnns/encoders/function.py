"""Any callable from a list of texts to an ``(N, n)`` array, as an encoder."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from imrnns.encoders.base import (
    SIMILARITIES,
    BaseEncoder,
    as_embeddings,
    check_batch_size,
    check_prefixes,
)
from imrnns.encoders.cache import EmbeddingCache

__all__ = ["FunctionEncoder"]


class FunctionEncoder(BaseEncoder):
    """Any callable from a list of texts to an ``(N, n)`` array, used as an encoder.

    The callable gets the texts with the prefix of their role prepended and returns one row
    per text (numpy, torch or anything ``np.asarray`` takes); rows are checked (count,
    width, finite) and returned as float32.

    Its embeddings are cached only under a ``fingerprint`` the caller gives: a string that
    must change whenever the callable's output would (the model name and version, say).
    Without it nothing is cached and an index cannot check which encoder made its queries.

    Args:
        function: ``f(list[str]) -> (N, n)`` array.
        name: a readable name (default: the callable's ``__name__``).
        fingerprint: see above.
        dim: the width n, if known before the first call (needed to encode an empty list).
        query_prefix, passage_prefix: prepended to queries / documents.
        similarity: the similarity the embeddings are meant for (:data:`SIMILARITIES`).
        batch_size: texts per call (None: all in one call).
        cache_dir: embedding cache folder (requires ``fingerprint``).
        show_progress: show a progress bar over the calls.
    """

    def __init__(
        self,
        function: Callable[[list[str]], Any],
        *,
        name: str | None = None,
        fingerprint: str | None = None,
        dim: int | None = None,
        query_prefix: str = "",
        passage_prefix: str = "",
        similarity: str = "cosine",
        batch_size: int | None = None,
        cache_dir: str | Path | None = None,
        show_progress: bool = False,
    ) -> None:
        if not callable(function):
            raise TypeError(f"function must be callable, got {type(function).__name__}")
        if fingerprint is not None and (not isinstance(fingerprint, str) or not fingerprint):
            raise TypeError(f"fingerprint must be a non-empty str or None, got {fingerprint!r}")
        if dim is not None and (not isinstance(dim, int) or isinstance(dim, bool) or dim < 1):
            raise ValueError(f"dim must be a positive int or None, got {dim!r}")
        if batch_size is not None:
            check_batch_size(batch_size)
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {list(SIMILARITIES)}, got {similarity!r}")
        check_prefixes(query_prefix, passage_prefix)
        if cache_dir is not None and fingerprint is None:
            raise ValueError(
                "cache_dir needs fingerprint=: a callable's embeddings are cached only under a "
                "name that changes whenever its output would"
            )
        self.function = function
        self.name = name or getattr(function, "__name__", None) or type(function).__name__
        self.query_prefix = query_prefix
        self.passage_prefix = passage_prefix
        self.batch_size = batch_size
        self.show_progress = bool(show_progress)
        self._dim = dim
        self._similarity = similarity
        self._user_fingerprint = fingerprint
        self.cache = None
        if fingerprint is not None:
            if cache_dir is not None:
                self.cache = EmbeddingCache(cache_dir)
            elif os.environ.get("IMRNNS_CACHE"):
                self.cache = EmbeddingCache()

    def __repr__(self) -> str:
        return f"FunctionEncoder({self.name!r}, dim={self._dim}, fingerprint={self.fingerprint})"

    @property
    def fingerprint(self) -> str | None:
        if self._user_fingerprint is None:
            return None
        settings = {
            "function": self._user_fingerprint,
            "query_prefix": self.query_prefix,
            "passage_prefix": self.passage_prefix,
        }
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()

    @property
    def dim(self) -> int | None:
        return self._dim

    @property
    def similarity(self) -> str:
        return self._similarity

    def _seen_width(self, width: int) -> None:
        if self._dim is None:
            self._dim = width

    def _embed(
        self, texts: list[str], role: str, batch_size: int | None, show_progress: bool
    ) -> Any:
        prefix = self.query_prefix if role == "query" else self.passage_prefix
        texts = [prefix + t for t in texts]
        if batch_size is None or batch_size >= len(texts):
            return self.function(texts)
        starts = range(0, len(texts), batch_size)
        parts = []
        for start in tqdm(starts, desc=f"Encoding ({self.name})", disable=not show_progress):
            chunk = texts[start : start + batch_size]
            parts.append(as_embeddings(self.function(chunk), len(chunk), self._width(), self.name))
            self._seen_width(parts[-1].shape[1])
        return np.concatenate(parts)
