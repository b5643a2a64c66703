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
