"""Training queries streamed in chunks (prepare_streaming_data, BeirQueryStream) and the bad
inputs of training data: only zero grades, queries left without a positive, negative pools
smaller than asked. Synthetic collections, CPU backend on one thread."""

from __future__ import annotations

import dataclasses
import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from imrnns.data import BeirDataset, load_beir
from imrnns.evaluate import EmbeddedSplit
from imrnns.training import (
    BeirQueryStream,
    QueryRecord,
    TrainConfig,
    prepare_streaming_data,
    prepare_training_data,
    train,
)
from imrnns.training.batches import _epoch_batches, _epoch_generator
from imrnns.training.data import _QueryStream
from imrnns.training.losses import _step_loss
from tests.helpers import SMALL, TOLERANCES, check_resume, load_weights, synthetic_graded

pytestmark = pytest.mark.usefixtures("cpu_backend_one_thread")

CFG = dataclasses.replace(SMALL, epochs=2)
FP32 = TOLERANCES[torch.float32]


@pytest.fixture(scope="module")
def split() -> EmbeddedSplit:
    return synthetic_graded(n_docs=120, dim=16, n_train=80, n_test=10)[0]


def records(split: EmbeddedSplit) -> list[QueryRecord]:
    ds = split.dataset
    return [QueryRecord(q, split.queries[i], ds.qrels[q]) for i, q in enumerate(ds.query_ids)]


def streamed(split: EmbeddedSplit, cfg: TrainConfig, source=None, **kw):
    ds = split.dataset
    return prepare_streaming_data(
        ds.corpus_ids, split.corpus, records(split) if source is None else source, cfg, **kw
    )


# ----------------------------------------------------------------------------- streaming
def test_one_chunk_stream_trains_exactly_as_in_memory(tmp_path: Path, split) -> None:
    # Same queries, same order, one chunk: the same batches and draws, so the same weights.
    cfg = dataclasses.replace(CFG, mining_chunk=1000)
    memory = prepare_training_data(split, cfg, holdout=False)
    stream = streamed(split, cfg, holdout=False)
    assert stream.steps_per_epoch(cfg.batch_size) == memory.steps_per_epoch(cfg.batch_size)
    a = train(memory, tmp_path / "a", cfg, progress=False)
    b = train(stream, tmp_path / "b", cfg, progress=False)
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    wa, wb = load_weights(tmp_path / "a/best"), load_weights(tmp_path / "b/best")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert b["data"]["streamed"] and not a["data"]["streamed"]


def test_chunks_bound_what_is_mined_at_once(split, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = dataclasses.replace(CFG, mining_chunk=24, batch_size=10)
    data = streamed(split, cfg)
    sizes: list[int] = []
    real = _QueryStream._mine

    def spy(self, ids, embs, qrels):
        sizes.append(len(ids))
        return real(self, ids, embs, qrels)

    monkeypatch.setattr(_QueryStream, "_mine", spy)
    batches = list(_epoch_batches(data, cfg, _epoch_generator(0, 1)))
    n = data.num_train_queries
    assert sizes == data.stream.chunk_sizes() and max(sizes) == 24 and sum(sizes) == n
    assert len(batches) == data.steps_per_epoch(cfg.batch_size)
    assert all(len(rows) <= 10 and max(rows) < len(qs.ids) for qs, rows in batches)
    seen = [qs.ids[r] for qs, rows in batches for r in rows]
    assert len(seen) == len(set(seen)) == n
    assert not set(seen) & set(data.val.ids)


@pytest.mark.parametrize("chunk", [1, 7, 24, 1000])
def test_chunked_mining_gives_the_negatives_of_unchunked_mining(split, chunk: int) -> None:
    # Every query's feedback set and its negative pool are the same whether its first stage
    # is mined with 0, 6 or 999 other queries: the chunk changes when, not what.
    cfg = dataclasses.replace(CFG, mining_chunk=chunk)
    memory = prepare_training_data(split, cfg, holdout=False).train
    data = streamed(split, cfg, holdout=False)
    got: dict[str, tuple] = {}
    for qs in data.stream.chunks():
        assert len(qs.ids) <= chunk
        for i, q in enumerate(qs.ids):
            got[q] = (qs.fb_ids[i], qs.fb_scores[i], qs.pool_ids[i], qs.positives[i])
    assert sorted(got) == sorted(memory.ids)
    for i, q in enumerate(memory.ids):
        fb_ids, fb_scores, pool_ids, positives = got[q]
        assert torch.equal(fb_ids, memory.fb_ids[i]), q
        assert torch.equal(pool_ids, memory.pool_ids[i]), q
        # One query mined alone is a matrix-vector product, whose float32 sums may round
        # differently: the same ids (no near-tie here), scores to the float32 tolerance.
        torch.testing.assert_close(fb_scores, memory.fb_scores[i], **FP32)
        assert positives == memory.positives[i], q


def test_an_epoch_holds_one_mined_chunk_at_a_time(
    tmp_path: Path, split, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The memory bound: while training, a chunk's mined query set is dropped before the next
    # is mined, and the stream's records are consumed as they come (the source is a generator
    # function that builds each record on demand).
    import gc
    import weakref

    cfg = dataclasses.replace(CFG, mining_chunk=16, batch_size=8, epochs=1)
    recs = records(split)
    data = streamed(split, cfg, source=lambda: (dataclasses.replace(r) for r in recs))
    alive: list[weakref.ref] = []
    most = 0
    real = _QueryStream._mine

    def spy(self, ids, embs, qrels):
        nonlocal most
        gc.collect()
        most = max(most, sum(ref() is not None for ref in alive))
        qs = real(self, ids, embs, qrels)
        alive.append(weakref.ref(qs))
        return qs

    monkeypatch.setattr(_QueryStream, "_mine", spy)
    train(data, tmp_path / "run", cfg, progress=False)
    assert len(alive) == len(data.stream.chunk_sizes()) >= 4
    assert most == 0  # no earlier chunk was alive when the next one was mined
    assert data.train.ids == [] and data.train.emb.shape[0] == 0  # nothing of the stream kept


def test_stream_holds_out_validation_by_id_whatever_the_order(split) -> None:
    cfg = dataclasses.replace(CFG, val_fraction=0.25)
    a = streamed(split, cfg)
    b = streamed(split, cfg, source=list(reversed(records(split))))
    assert sorted(a.val.ids) == sorted(b.val.ids)
    assert 0 < len(a.val.ids) < 40 and a.num_train_queries + len(a.val.ids) == 80
    assert len(a.val_subsets["seen_doc"]) + len(a.val_subsets["unseen_doc"]) == len(a.val.ids)


def test_streamed_run_resumes_to_the_same_weights(tmp_path: Path, split) -> None:
    cfg = dataclasses.replace(CFG, epochs=3, mining_chunk=32)
    check_resume(streamed(split, cfg), cfg, tmp_path, kill_at=1)


def test_one_shot_iterators_are_refused(split) -> None:
    with pytest.raises(TypeError, match="one-shot iterator"):
        streamed(split, CFG, source=iter(records(split)))
    # A function returning a fresh iterator is fine.
    data = streamed(split, CFG, source=lambda: iter(records(split)))
    assert data.num_train_queries > 0


def test_a_stream_that_changes_between_epochs_is_an_error(split) -> None:
    recs = records(split)
    data = streamed(split, CFG, source=recs)
    recs[3] = dataclasses.replace(recs[3], embedding=recs[3].embedding * 0.5)
    with pytest.raises(ValueError, match="query stream changed"):
        list(_epoch_batches(data, CFG, _epoch_generator(0, 1)))


@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        (lambda r: dataclasses.replace(r, embedding=r.embedding[:5]), ValueError, r"\(16,\)"),
        (
            lambda r: dataclasses.replace(r, embedding=r.embedding * np.nan),
            ValueError,
            "NaN",
        ),
        (lambda r: dataclasses.replace(r, qrels={"nope": 1}), ValueError, "not in the corpus"),
        (lambda r: dataclasses.replace(r, qrels={"d0": 1.5}), ValueError, "must be an int"),
        (lambda r: dataclasses.replace(r, query_id=""), ValueError, "non-empty string"),
        (lambda r: (r.query_id, r.embedding), TypeError, "not a QueryRecord"),
    ],
)
def test_bad_records_name_the_query(split, bad, error, match: str) -> None:
    recs = records(split)
    recs[5] = bad(recs[5])
    with pytest.raises(error, match=match):
        streamed(split, CFG, source=recs)


def test_repeated_query_ids_are_refused(split) -> None:
    recs = records(split)
    with pytest.raises(ValueError, match="appears twice"):
        streamed(split, CFG, source=[*recs, recs[0]])


# ----------------------------------------------------------------------------- BEIR files
def write_beir(root: Path, split: EmbeddedSplit, qrels_lines: list[str] | None = None) -> Path:
    ds = split.dataset
    root.mkdir(parents=True, exist_ok=True)
    with gzip.open(root / "corpus.jsonl.gz", "wt") as fh:
        for d in ds.corpus_ids:
            fh.write(f'{{"_id": "{d}", "title": "", "text": "doc {d}"}}\n')
    (root / "queries.jsonl").write_text(
        "".join(f'{{"_id": "{q}", "text": "query {q}"}}\n' for q in ds.query_ids)
    )
    (root / "qrels").mkdir(exist_ok=True)
    if qrels_lines is None:
        qrels_lines = [f"{q}\t{d}\t{g}" for q in ds.query_ids for d, g in ds.qrels[q].items()]
    (root / "qrels" / "train.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "\n".join(qrels_lines) + "\n"
    )
    return root


def test_beir_stream_reads_the_files_as_load_beir(tmp_path: Path, split) -> None:
    root = write_beir(tmp_path / "beir", split)
    np.save(tmp_path / "q.npy", split.queries)
    emb = np.load(tmp_path / "q.npy", mmap_mode="r")  # stays on disk
    stream = BeirQueryStream(root, "train", emb)
    got = list(stream)
    ds = load_beir(root, "train")
    assert [r.query_id for r in got] == ds.query_ids
    assert [r.qrels for r in got] == [ds.qrels[q] for q in ds.query_ids]
    np.testing.assert_array_equal(np.stack([r.embedding for r in got]), split.queries)
    assert [r.query_id for r in stream] == ds.query_ids  # re-iterable
    data = prepare_streaming_data(ds.corpus_ids, split.corpus, stream, CFG)
    reference = streamed(split, CFG)
    assert data.fingerprint == reference.fingerprint


@pytest.mark.parametrize(
    ("lines", "match"),
    [
        (["tr0\td0\t1", "tr1\td1\t1", "tr0\td2\t1"], "not consecutive"),
        (["tr0\td0\t1", "tr0\td0\t2"], "conflicting score"),
        (["zz\td0\t1"], "unknown query id 'zz'"),
        (["tr0\td0\tx"], "score must be an integer"),
        (["tr0\td0"], "expected 3 tab-separated columns"),
    ],
)
def test_beir_stream_errors_name_the_line(tmp_path: Path, split, lines, match: str) -> None:
    root = write_beir(tmp_path / "beir", split, lines)
    with pytest.raises(ValueError, match=match):
        list(BeirQueryStream(root, "train", split.queries))


def test_beir_stream_checks_the_embeddings_shape(tmp_path: Path, split) -> None:
    root = write_beir(tmp_path / "beir", split)
    with pytest.raises(ValueError, match="query_embeddings must be"):
        BeirQueryStream(root, "train", split.queries[:5])


# ----------------------------------------------------------------------------- bad input
def _with_qrels(split: EmbeddedSplit, qrels: dict[str, dict[str, int]]) -> EmbeddedSplit:
    ds = split.dataset
    new = BeirDataset(ds.name, ds.split, ds.corpus_ids, ds.corpus_texts, ds.query_ids,
                      ds.query_texts, qrels)  # fmt: skip
    return EmbeddedSplit(new, split.corpus, split.queries, split.encoder)


def test_only_zero_grades_is_a_clear_error_in_memory_and_streamed(tmp_path: Path, split) -> None:
    zero = {q: {d: 0 for d in j} for q, j in split.dataset.qrels.items()}
    # The message names the qrels file and counts the queries skipped for it.
    with pytest.raises(
        ValueError,
        match=r"qrels/train\.tsv\) has 0 queries with a relevant document \(qrel > 0\) of 80 "
        r"judged \(80 with only grades <= 0 were skipped\)",
    ):
        prepare_training_data(_with_qrels(split, zero), CFG)
    lines = [f"{q}\t{d}\t0" for q, j in zero.items() for d in j]
    stream = BeirQueryStream(write_beir(tmp_path / "b", split, lines), "train", split.queries)
    with pytest.raises(ValueError, match=r"train\.tsv\) has 0 training .*80 without one were"):
        prepare_streaming_data(split.dataset.corpus_ids, split.corpus, stream, CFG)


def test_queries_without_a_positive_are_skipped_and_counted(split) -> None:
    qrels = dict(split.dataset.qrels)
    for q in split.dataset.query_ids[:7]:
        qrels[q] = {d: 0 for d in qrels[q]}  # judged, none relevant
    memory = prepare_training_data(_with_qrels(split, qrels), CFG)
    assert memory.describe()["skipped_queries_without_positive"] == 7
    assert len(memory.train.ids) + len(memory.val.ids) == 73
    stream = streamed(_with_qrels(split, qrels), CFG)
    assert stream.describe()["skipped_queries_without_positive"] == 7
    assert stream.num_train_queries + len(stream.val.ids) == 73


def test_skips_are_counted_in_the_training_summary(tmp_path: Path, split) -> None:
    # Grades 0 and negative are both "not relevant": such queries are left out, counted in
    # train_from_beir's result and in out/training.json (what `imrnns train` prints).
    import json

    from imrnns.training import train_from_beir

    qrels = dict(split.dataset.qrels)
    for i, q in enumerate(split.dataset.query_ids[:6]):
        qrels[q] = {d: (0, -1, -2)[i % 3] for d in qrels[q]}
    cfg = dataclasses.replace(CFG, epochs=1)
    result = train_from_beir("unused", tmp_path / "run", config=cfg, progress=False,
                             embedded=_with_qrels(split, qrels))  # fmt: skip
    summary = json.loads((tmp_path / "run" / "training.json").read_text())
    for data in (result["data"], summary["data"]):
        assert data["skipped_queries_without_positive"] == 6
        assert data["queries_short_of_negatives"] == 0
        assert data["num_train_queries"] + data["num_val_queries"] == 74
    assert all(np.isfinite(h["loss"]) for h in result["history"][1:])


def test_asking_more_negatives_than_the_pool_holds_is_a_config_error() -> None:
    with pytest.raises(ValueError, match=r"num_negatives \(40\) cannot exceed negative_pool"):
        TrainConfig(num_negatives=40, negative_pool=30)


def test_short_negative_pools_are_counted_and_train_without_nan(tmp_path: Path) -> None:
    # 12 documents, 5 relevant per query: at most 7 pool documents are left for 8 negatives.
    split = synthetic_graded(n_docs=12, dim=8, n_train=20, n_test=2)[0]
    cfg = dataclasses.replace(CFG, feedback_k=10, negative_pool=12, num_negatives=8,
                              in_batch_negatives=False)  # fmt: skip
    data = prepare_training_data(split, cfg)
    assert data.describe()["queries_short_of_negatives"] == len(data.train.ids)
    out = train(data, tmp_path / "run", cfg, progress=False)
    assert all(np.isfinite(h["loss"]) for h in out["history"][1:])


def test_a_batch_without_any_competitor_gives_a_zero_loss_not_nan(split) -> None:
    # Every query's pool is its own positives only and its positives are one grade: no
    # negative of any kind, no pair.
    from imrnns import IMRNN

    cfg = dataclasses.replace(CFG, in_batch_negatives=False, num_negatives=1, negative_pool=1,
                              distill_weight=0.0, loss="ce+margin", graded=False)  # fmt: skip
    data = prepare_training_data(split, cfg)
    for r in range(len(data.train.ids)):
        data.train.pool_ids[r] = data.train.positives[r][0][0]
    model = IMRNN(cfg.model_config(16))
    unit = torch.nn.functional.normalize(data.corpus, dim=1)
    loss = _step_loss(model, data, [0, 1, 2], cfg, torch.Generator().manual_seed(0), unit)
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in model.parameters())


def test_a_diverged_loss_raises_instead_of_training_on_nan(
    split, monkeypatch: pytest.MonkeyPatch
) -> None:
    import imrnns.training.losses as losses
    from imrnns import IMRNN

    data = prepare_training_data(split, CFG)
    model = IMRNN(CFG.model_config(16))
    unit = torch.nn.functional.normalize(data.corpus, dim=1)
    monkeypatch.setattr(losses, "_loss", lambda scores, *a: scores.sum() * float("nan"))
    with pytest.raises(FloatingPointError, match="training loss is nan"):
        _step_loss(model, data, [0, 1, 2], CFG, torch.Generator().manual_seed(0), unit)


def test_a_dot_product_split_warns_that_training_mines_by_cosine(split) -> None:
    # Training's feedback sets come from cosine; a dot-similarity index would draw others.
    dot = dataclasses.replace(split, similarity="dot")
    with pytest.warns(UserWarning, match="mines feedback sets.*by cosine"):
        prepare_training_data(dot, CFG)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare_training_data(split, CFG)  # cosine: no warning
