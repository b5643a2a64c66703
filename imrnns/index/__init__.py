"""Searchable IMRNN corpora: :class:`IMRNNIndex`, its first stage, its files, and its shards.

Modules (each imports only those above it in this list, and the library below the package):

- :mod:`imrnns.index.first_stage`: the faiss first stage (flat / IVF / HNSW construction and
  parameters, ties by the lower id, GPU moves).
- :mod:`imrnns.index.storage`: index directories (save/load files, the SHA-256 manifest and
  its checked reader, sliced reads for ``rows=`` loads).
- :mod:`imrnns.index.core`: :class:`IMRNNIndex` (add, search modes, ``query_state``, save and
  load) and the search checks the sharded index shares.
- :mod:`imrnns.index.distributed`: :class:`~imrnns.index.distributed.DistributedIMRNNIndex`
  over ``torch.distributed`` (not imported here; also importable as ``imrnns.distributed``).
"""

from imrnns.index.core import (
    ADD_CHUNK,
    MODES,
    SEARCH_CHUNK,
    STORAGE_DTYPES,
    IMRNNIndex,
    QueryState,
    as_float_tensor,
    check_queries,
    check_search_args,
    feedback_set,
    shard_first_stage_over_gpus,
    topk_by_score_then_id,
)
from imrnns.index.first_stage import FIRST_STAGES, SPACES, search_ties_by_lower_id
from imrnns.index.storage import (
    FORMAT,
    FORMAT_VERSION,
    REQUIRED_FILES,
    IndexError_,
    read_manifest,
)

__all__ = [
    "ADD_CHUNK",
    "FIRST_STAGES",
    "FORMAT",
    "FORMAT_VERSION",
    "MODES",
    "REQUIRED_FILES",
    "SEARCH_CHUNK",
    "SPACES",
    "STORAGE_DTYPES",
    "IMRNNIndex",
    "IndexError_",
    "QueryState",
    "as_float_tensor",
    "check_queries",
    "check_search_args",
    "feedback_set",
    "read_manifest",
    "search_ties_by_lower_id",
    "shard_first_stage_over_gpus",
    "topk_by_score_then_id",
]
