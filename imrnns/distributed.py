"""Compatibility module: the sharded index lives in :mod:`imrnns.index.distributed`.

``imrnns.distributed.DistributedIMRNNIndex`` (the README and ``docs/distributed.md`` name it so)
and the helpers below stay importable from here. The command-line parts of sharded search
(``imrnns search --distributed``) are in :mod:`imrnns.cli.distributed`.
"""

from imrnns.index.core import shard_first_stage_over_gpus
from imrnns.index.distributed import (
    EXCHANGES,
    MAX_MESSAGE_BYTES,
    DistributedIMRNNIndex,
    init_from_env,
    memory_per_rank,
    search_memory,
    shard_bounds,
)

__all__ = [
    "EXCHANGES",
    "MAX_MESSAGE_BYTES",
    "DistributedIMRNNIndex",
    "init_from_env",
    "memory_per_rank",
    "search_memory",
    "shard_bounds",
    "shard_first_stage_over_gpus",
]
