"""Bad training data and settings: qrels with only zero grades (in memory and streamed from
the BEIR files), more hard negatives than the pool they are drawn from, and the documented
skips (a query left without a positive, a pool short of negatives) with their counts."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from imrnns.data import load_beir
from imrnns.evaluate import EmbeddedSplit
from imrnns.training import (
    BeirQueryStream,
    TrainConfig,
    prepare_streaming_data,
    prepare_training_data,
)
from tests.bad_input.cases_cli import CliFailed, cli
from tests.bad_input.harness import N_IN, Workspace, case, defined


def _train_qrels(ws: Workspace, lines: list[str], extra_queries: tuple[str, ...] = ()) -> None:
    """Write ``qrels/train.tsv`` (and add queries to ``queries.jsonl``) before the hash."""
    with open(ws.beir / "queries.jsonl", "a") as fh:
        for q in extra_queries:
            fh.write(json.dumps({"_id": q, "text": f"query {q}"}) + "\n")
    body = "".join(line + "\n" for line in lines)
    (ws.beir / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + body)


def _embedded(ws: Workspace) -> EmbeddedSplit:
    ds = load_beir(ws.beir, "train")
    rng = np.random.default_rng(0)
    corpus = rng.standard_normal((len(ds.corpus_ids), N_IN)).astype(np.float32)
    queries = rng.standard_normal((len(ds.query_ids), N_IN)).astype(np.float32)
    return EmbeddedSplit(ds, corpus, queries, encoder="random")


@case("data", ValueError, r"train split of beir \(qrels/train\.tsv\) has 0 queries with a "
      r"relevant document \(qrel > 0\) of 1 judged \(1 with only grades <= 0 were skipped\)")  # fmt: skip
def training_qrels_only_zero_grades(ws: Workspace) -> Callable[[], Any]:
    _train_qrels(ws, ["q1\td1\t0", "q1\td2\t0"])
    return lambda: prepare_training_data(_embedded(ws), TrainConfig())


@case("data", ValueError, r"query stream \(.*qrels/train\.tsv\) has 0 training and 0 "
      r"validation queries with a relevant document \(qrel > 0; 1 without one were skipped\)")  # fmt: skip
def training_stream_qrels_only_zero_grades(ws: Workspace) -> Callable[[], Any]:
    _train_qrels(ws, ["q1\td1\t0", "q1\td3\t-1"])

    def action() -> Any:
        split = _embedded(ws)
        stream = BeirQueryStream(ws.beir, "train", split.queries, split.dataset.query_ids)
        return prepare_streaming_data(split.dataset.corpus_ids, split.corpus, stream,
                                      TrainConfig())  # fmt: skip

    return action


@case("data", ValueError, r"num_negatives \(40\) cannot exceed negative_pool \(30\)")
def training_more_negatives_than_the_pool(ws: Workspace) -> Callable[[], Any]:
    return lambda: TrainConfig(num_negatives=40, negative_pool=30)


@case("cli", CliFailed, r"(?s)exit 2: imrnns train: error: .*num_negatives \(40\) cannot "
      r"exceed negative_pool \(30\)")  # fmt: skip
def cli_train_more_negatives_than_the_pool(ws: Workspace) -> Callable[[], Any]:
    return cli(ws, "train", "--data", str(ws.beir), "--out", str(ws.root / "run"), "--cache",
               str(ws.root.parent / "c"), "--set", "num_negatives=40", "negative_pool=30")  # fmt: skip


@defined("data")
def training_query_without_a_positive_is_skipped_and_counted(ws: Workspace) -> Callable[[], Any]:
    # q2 is judged, but only with grades <= 0: left out of training, counted.
    _train_qrels(ws, ["q1\td1\t1", "q2\td2\t0", "q2\td3\t-1"], extra_queries=("q2",))

    def action() -> None:
        data = prepare_training_data(_embedded(ws), TrainConfig(), holdout=False)
        described = data.describe()
        assert described["skipped_queries_without_positive"] == 1
        assert described["num_train_queries"] == 1 and data.train.ids == ["q1"]

    return action


@defined("data")
def training_pool_short_of_negatives_is_padding_and_counted(ws: Workspace) -> Callable[[], Any]:
    # 4 documents, one of them the positive: 3 of the 8 negatives asked exist; the other 5
    # columns are padding, the query is counted, and the loss is finite.
    _train_qrels(ws, ["q1\td1\t1"])

    def action() -> None:
        from imrnns import IMRNN
        from imrnns.training.losses import _step_loss

        cfg = TrainConfig(feedback_k=4, negative_pool=8, num_negatives=8)
        data = prepare_training_data(_embedded(ws), cfg, holdout=False)
        assert data.describe()["queries_short_of_negatives"] == 1
        torch.manual_seed(0)
        model = IMRNN(cfg.model_config(N_IN))
        unit = torch.nn.functional.normalize(data.corpus, dim=1)
        loss = _step_loss(model, data, [0], cfg, torch.Generator().manual_seed(0), unit)
        assert bool(torch.isfinite(loss))

    return action
