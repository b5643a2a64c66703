"""``imrnns search --distributed``: sharded search under torchrun, on every rank.

The command (:func:`run_distributed_search`; its flags, :func:`add_distributed_arguments`, live
in :mod:`imrnns.cli._distributed_args` without torch and are re-exported here) over :class:`imrnns.index.distributed.DistributedIMRNNIndex`; tested by
tests/retriever/test_distributed.py (``test_cli_search_distributed_under_torchrun``) and
tests/bad_input/test_bad_input.py. Launch::

    torchrun --nproc-per-node 4 -m imrnns search --distributed --index DIR "query text"
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import numpy as np
import torch.distributed as dist

from imrnns._distributed_settings import DEFAULT_TIMEOUT_S
from imrnns.cli._distributed_args import add_distributed_arguments, timeout_seconds_arg
from imrnns.data import load_beir
from imrnns.evaluate import index_similarity
from imrnns.index.distributed import (
    DistributedIMRNNIndex,
    init_from_env,
    run_on_every_rank,
    shard_bounds,
)
from imrnns.model import IMRNN
from imrnns.pretrained import default_adapter

__all__ = ["add_distributed_arguments", "run_distributed_search", "timeout_seconds_arg"]


def run_distributed_search(
    args: argparse.Namespace,
    *,
    encoder: Callable[..., Any],
    emit: Callable[[dict[str, Any], bool, str], None],
) -> int:
    """``imrnns search --distributed``: every torchrun rank runs this; rank 0 prints.

    With ``--index`` each rank loads its block of a saved index; otherwise each rank encodes
    its block of the corpus (``--data``) and the shards are added in rank order.

    Args:
        args: the parsed ``imrnns search`` arguments (with :func:`add_distributed_arguments`).
        encoder: the command line's encoder factory, ``(name, cache, quiet=...) -> Encoder``.
        emit: the command line's printer, ``(payload, as_json, text)``. Both come from
            :mod:`imrnns.cli`, which imports this module: passed in, not imported back.
    """
    if getattr(args, "save_index", None):
        raise ValueError(
            "--save-index cannot be combined with --distributed: build and save the index with "
            "one process, then search it with --distributed --index DIR"
        )
    created = not (dist.is_available() and dist.is_initialized())
    timeout = timedelta(seconds=getattr(args, "dist_timeout", DEFAULT_TIMEOUT_S))
    rank, world, device = init_from_env(getattr(args, "dist_backend", "auto"), timeout=timeout)

    def everywhere(what: str, step: Callable[[], Any]) -> Any:
        # Rank-local work between collectives: a failure on one rank ends every rank.
        return run_on_every_rank(what, step, timeout=timeout)

    try:
        enc = everywhere(
            "loading the encoder",
            lambda: encoder(args.encoder, args.cache, quiet=bool(args.json) or rank != 0),
        )
        exchange = getattr(args, "exchange", "rows")
        if args.index:
            index = DistributedIMRNNIndex.load(
                args.index, device=device, exchange=exchange, timeout=timeout
            )
        else:
            data = everywhere("reading the corpus", lambda: load_beir(args.data, args.split))
            model = everywhere(
                "loading the adapter",
                lambda: IMRNN.from_pretrained(args.checkpoint or default_adapter()),
            )
            index = DistributedIMRNNIndex(
                model,
                feedback_k=args.feedback_k,
                first_stage=args.first_stage,
                storage_dtype=args.storage_dtype,
                encoder=enc.fingerprint,
                similarity=index_similarity(enc),
                device=device,
                exchange=exchange,
                timeout=timeout,
            )
            lo, hi = shard_bounds(len(data.corpus_ids), world, rank)
            rows = everywhere(
                "encoding the corpus",
                lambda: (
                    enc.encode_document(data.corpus_texts[lo:hi])
                    if hi > lo
                    else np.zeros((0, model.config.input_dim), dtype=np.float32)
                ),
            )
            index.add_shard(rows, doc_ids=data.corpus_ids[lo:hi])
        q = everywhere("encoding the queries", lambda: enc.encode_query(args.query, cache=False))
        t0 = time.perf_counter()
        scores, ids = index.search(
            q,
            k=args.k,
            mode=args.mode,
            encoder=enc.fingerprint,
            workspace_bytes=getattr(args, "workspace_mb", None),
        )
        ms = (time.perf_counter() - t0) * 1e3
        # A named index returns names (None padding), as one process's index does; "id"
        # stays the document's position (add order, the row of a single-process index),
        # as the single-process command prints it. Collective: every rank maps.
        rows = index.positions_of(ids) if index.id_kind == "str" else None
        if rank == 0:
            results, lines = [], []
            for b, (text, srow, irow) in enumerate(zip(args.query, scores, ids, strict=True)):
                hits = [
                    {
                        "rank": r + 1,
                        "id": int(rows[b][r]) if rows is not None else int(i),
                        "doc_id": i if rows is not None else None,
                        "score": float(s),
                    }
                    for r, (s, i) in enumerate(zip(srow, irow, strict=True))
                    if (i is not None if rows is not None else i >= 0)
                ]
                results.append({"query": text, "hits": hits})
                lines.append(f"query: {text}")
                lines += [
                    f"  {h['rank']:>3}  {h['score']:+.4f}  {h['doc_id'] or h['id']}" for h in hits
                ]
            payload = {
                "mode": args.mode,
                "k": args.k,
                "milliseconds": round(ms, 3),
                "world_size": world,
                "exchange": exchange,
                "results": results,
            }
            emit(payload, args.json, "\n".join(lines))
        return 0
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()
