"""Bad input to the distributed index and its helpers."""

from __future__ import annotations

from imrnns.distributed import DistributedIMRNNIndex, memory_per_rank, shard_bounds
from tests.bad_input.harness import (
    case,
)


# --------------------------------------------------------------------------- distributed
@case("distributed", ValueError, r"exchange must be one of \('rows', 'partial'\)")
def distributed_exchange(ws):
    return lambda: DistributedIMRNNIndex(ws.model, exchange="scatter")


@case("distributed", ValueError, r"rank 3 is not in a world of size 2")
def distributed_rank(ws):
    return lambda: shard_bounds(10, 2, 3)


@case("distributed", ValueError, r"storage_dtype must be one of")
def distributed_memory_dtype(ws):
    return lambda: memory_per_rank(10, storage_dtype="fp8")


@case("distributed", ValueError, r"embeddings contains 1 NaN/Inf")
def distributed_add_nan(ws):
    index = DistributedIMRNNIndex(ws.model, feedback_k=5)
    x = ws.corpus.copy()
    x[7, 1] = float("nan")

    def run() -> None:
        try:
            index.add(x)
        finally:
            assert index.ntotal == 0 and index.local_ntotal == 0

    return run


@case("distributed", ValueError, r"built with 'enc-A@0123'")
def distributed_wrong_encoder(ws):
    index = DistributedIMRNNIndex.from_index(ws.index())
    return lambda: index.search(ws.queries, 3, encoder="enc-B@1")


# Issue 19: removal and filters by id on the sharded index (one process: world size 1).
@case("distributed", ValueError, r"remove\(\): ids not in the index: 'nope'")
def distributed_remove_unknown(ws):
    index = DistributedIMRNNIndex.from_index(ws.index())

    def run() -> None:
        try:
            index.remove(["d1", "nope"])
        finally:
            assert index.ntotal == 40 and index.local.ntotal == 40

    return run


@case("distributed", ValueError, r"allow: ids not in the index: 40, 41")
def distributed_allow_unknown(ws):
    index = DistributedIMRNNIndex.from_index(ws.index(named=False))
    return lambda: index.search(ws.queries, 3, allow=[1, 40, 41])


# A boolean allow mask after removals is aligned with the live documents (IMRNNIndex.ids):
# one of the length before the removal is refused, naming the shape it must have.
@case("distributed", ValueError, r"allow as a boolean mask must have shape \(39,\)")
def distributed_mask_after_removal(ws):
    import numpy as np

    index = DistributedIMRNNIndex.from_index(ws.index(named=False))
    index.remove([3])
    return lambda: index.search(ws.queries, 3, allow=np.ones(40, dtype=bool))
