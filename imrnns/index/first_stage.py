"""The first stage of an index: a faiss inner-product search over unit vectors.

It picks each query's feedback set F(q), the ``feedback_k`` documents with the highest cosine
in the base-encoder space (``"base"``) or the projected one (``"projected"``); see
:class:`imrnns.index.IMRNNIndex`. Three faiss structures: ``"flat"`` (exact),
``"ivf"`` (``IndexIVFFlat``, ``nlist`` lists, ``nprobe`` probed) and ``"hnsw"``
(``IndexHNSWFlat``, ``hnsw_m`` links, ``ef_search``). Ties are broken by the lower id
(:func:`search_ties_by_lower_id`), as every ranking of this package. When faiss-gpu is
installed and the corpus lives on a GPU, the index moves there (:func:`to_gpu`).

Tested through tests/test_index.py, tests/test_distributed.py and tests/test_bad_input.py.
"""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np
import torch

FIRST_STAGES = ("flat", "ivf", "hnsw")
SPACES = ("base", "projected", "auto")


def check_parameters(nlist: Any, nprobe: Any, hnsw_m: Any, ef_search: Any) -> None:
    """Raise ValueError unless the IVF/HNSW parameters are ints in range (``nlist`` may be None).

    faiss does not check them: hnsw_m < 2 crashes the process (abort, segfault) or hangs,
    nprobe or ef_search < 1 fail or silently return too few hits at search time.
    """
    for name, value, least in (
        ("nlist", nlist, 1),
        ("nprobe", nprobe, 1),
        ("hnsw_m", hnsw_m, 2),
        ("ef_search", ef_search, 1),
    ):
        if value is None and name == "nlist":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")


def auto_nlist(rows: int) -> int:
    """The default IVF nlist for a first add of ``rows`` documents: about 4 sqrt(N), <= N."""
    return max(1, min(rows, int(4 * np.sqrt(rows))))


def settings_for_rows(settings: dict[str, Any], rows: int) -> dict[str, Any]:
    """A copy of index ``settings`` for an index of ``rows`` documents (a shard, a slice).

    An IVF ``nlist`` larger than ``rows`` was sized for a whole corpus: it becomes None, so
    the first add picks the default for the rows it gets (:func:`auto_nlist`).
    """
    settings = dict(settings)
    if settings.get("first_stage") == "ivf" and (settings.get("nlist") or 0) > rows:
        settings["nlist"] = None
    return settings


def build(
    kind: str, train: np.ndarray, *, nlist: int | None, nprobe: int, hnsw_m: int, ef_search: int
) -> Any:
    """An empty faiss inner-product index of ``kind`` for vectors like ``train`` ((N, d) float32).

    IVF trains its ``nlist`` coarse centroids on ``train`` (it needs ``nlist <= N``); flat
    and HNSW use only its width. Vectors are added by the caller.
    """
    dim = train.shape[1]
    metric = faiss.METRIC_INNER_PRODUCT
    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m, metric)
        index.hnsw.efSearch = ef_search
        return index
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, metric)
    index.train(train)
    index.nprobe = nprobe
    return index


def set_nprobe(index: Any, nprobe: int) -> None:
    """Set the number of lists an IVF index (possibly wrapped) probes per query."""
    faiss.extract_index_ivf(index).nprobe = nprobe


def search_ties_by_lower_id(
    index: Any, x: np.ndarray, k: int, ntotal: int
) -> tuple[np.ndarray, np.ndarray]:
    """faiss search whose top-k breaks exact score ties by the lower id, as every ranking here.

    faiss's heap keeps whichever of equal scores its scan order and heap history favour, and
    orders ties higher id first. With duplicate documents that made the feedback set, and so
    which duplicate rerank returns, depend on faiss internals (and differ between one index
    and a sharded one). So: ask for one more than k; while the k-th and the last score tie,
    ask for twice as many; then sort by (score descending, id ascending). Costs one extra row
    per query when nothing ties.

    Args:
        index: a faiss index holding ``ntotal`` vectors.
        x: (B, d) float32 queries.
        k: results per query, ``1 <= k <= ntotal``.

    Returns:
        (scores (B, k) float32, ids (B, k) int64), faiss's ``-1`` padding last.
    """
    kk = k + 1 if k < ntotal else k
    while True:
        scores, ids = index.search(x, kk)
        if kk >= ntotal or kk <= k:
            break
        tied = (scores[:, k - 1] == scores[:, kk - 1]) & (ids[:, kk - 1] >= 0)
        if not bool(tied.any()):
            break
        kk = min(ntotal, 2 * kk)
    key = np.where(ids < 0, np.iinfo(np.int64).max, ids)
    order = np.lexsort((key, -scores.astype(np.float64)), axis=-1)[:, :k]
    return (
        np.ascontiguousarray(np.take_along_axis(scores, order, axis=1)),
        np.ascontiguousarray(np.take_along_axis(ids, order, axis=1)),
    )


def reconstruct(index: Any, lo: int, hi: int) -> np.ndarray:
    """Rows [lo, hi) of a faiss index's stored vectors as a (hi - lo, d) float32 array.

    ``index`` may be None (nothing added yet): an empty (0, 0) array.
    """
    if hi <= lo or index is None:
        d = 0 if index is None else index.d
        return np.zeros((0, d), dtype=np.float32)
    index = to_cpu(index)
    try:
        ivf = faiss.extract_index_ivf(index)
    except (RuntimeError, TypeError, ValueError):
        ivf = None
    if ivf is not None:
        ivf.make_direct_map()  # IVF stores vectors by list: reconstruct needs id -> slot
    return np.ascontiguousarray(index.reconstruct_n(lo, hi - lo), dtype=np.float32)


def to_gpu(index: Any, device: torch.device) -> Any:
    """Move a faiss index to the GPU when faiss-gpu is installed and the corpus lives there."""
    if device.type == "cuda" and hasattr(faiss, "StandardGpuResources"):
        res = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(res, device.index or 0, index)
    return index


def to_cpu(index: Any) -> Any:
    """A CPU copy of a faiss GPU index (to save or reconstruct it); a CPU index as it is."""
    if hasattr(faiss, "index_gpu_to_cpu") and "Gpu" in type(index).__name__:
        return faiss.index_gpu_to_cpu(index)
    return index


def to_all_gpus(index: Any | None) -> Any:
    """``index`` sharded over all local GPUs (faiss-gpu ``index_cpu_to_all_gpus``, ``shard=True``).

    Raises:
        RuntimeError: faiss-gpu is not installed or sees fewer than two GPUs.
        ValueError: ``index`` is None (nothing added yet).
    """
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if not hasattr(faiss, "index_cpu_to_all_gpus") or gpus < 2:
        raise RuntimeError(
            f"sharding the first stage over GPUs needs faiss-gpu and at least 2 GPUs "
            f"(faiss sees {gpus}); install the 'gpu' extra"
        )
    if index is None:
        raise ValueError("the index is empty: add() documents first")
    options = faiss.GpuMultipleClonerOptions()
    options.shard = True
    return faiss.index_cpu_to_all_gpus(to_cpu(index), co=options)
