"""A process that used a DistributedIMRNNIndex exits cleanly.

gloo's worker threads release a finished collective's tensors just after ``wait`` returns,
which takes the GIL; a process that reached interpreter shutdown first aborted with
"terminate called without an active exception" (SIGABRT) after a successful run, about one
run in two for a build-and-exit job. ``imrnns.index.distributed`` releases the GIL for a
moment at exit (``_let_backend_threads_finish``), and the first fused op imports
``torch._dynamo`` off the caller's stack, so the index is not kept alive by import frames
until the final garbage collection.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import imrnns_kernels as K
from imrnns.distributed import DistributedIMRNNIndex
from tests.helpers import make_data, make_model

ROUNDS = 6


def _worker(rank: int, store: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    corpus, _ = make_data(seed=11)
    with K.use_backend("cpu"):
        index = DistributedIMRNNIndex(make_model("diag-v02-sw"), feedback_k=20)
        lo, hi = (0, 130) if rank == 0 else (130, corpus.shape[0])
        index.add_shard(corpus[lo:hi], doc_ids=[f"d{i}" for i in range(lo, hi)])
    dist.destroy_process_group()


def test_processes_exit_cleanly_after_collectives(tmp_path) -> None:
    # Regression: each round's children aborted at exit about half of the time.
    for i in range(ROUNDS):
        mp.spawn(_worker, args=(os.path.join(tmp_path, f"store{i}"),), nprocs=2)
