"""SciFact MiniLM embeddings for benchmarks (encoded once, then read from the disk cache)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imrnns.data import BeirDataset, load_beir, scifact_path


@dataclass(frozen=True)
class SciFactEmbeddings:
    data: BeirDataset
    corpus: np.ndarray  # (5183, 384) float32, unit rows
    queries: np.ndarray  # (300, 384) float32, unit rows


@functools.lru_cache(maxsize=1)
def scifact_minilm(split: str = "test") -> SciFactEmbeddings:
    from imrnns.encoders import Encoder, default_cache_dir

    data = load_beir(scifact_path(), split)
    enc = Encoder("minilm", cache_dir=default_cache_dir(), show_progress=False)
    return SciFactEmbeddings(
        data, enc.encode_document(data.corpus_texts), enc.encode_query(data.query_texts)
    )


def shipped_adapter() -> Path | None:
    """The shipped SciFact adapter directory, if the package has one."""
    from imrnns.pretrained import default_adapter

    try:
        return default_adapter()
    except FileNotFoundError:
        return None
