"""Bad BEIR data (malformed JSONL/TSV, missing files, corrupt gzip) and bad encoder input."""

from __future__ import annotations

import gzip
import shutil
from collections.abc import Callable
from typing import Any

import pytest

from imrnns.data import load_beir
from tests.bad_input.harness import (
    Workspace,
    append_to_beir,
    case,
)


# --------------------------------------------------------------------------- BEIR data
def _data_case(
    name: str,
    exc: type[BaseException],
    match: str,
    tamper: Callable[[Workspace], Any],
    split: str = "test",
) -> None:
    def setup(ws: Workspace) -> Callable[[], Any]:
        tamper(ws)
        return lambda: load_beir(ws.beir, split)

    setup.__name__ = name
    case("data", exc, match)(setup)


_data_case(
    "missing_folder",
    FileNotFoundError,
    r"BEIR dataset folder not found",
    lambda ws: shutil.rmtree(ws.beir),
)
_data_case(
    "missing_corpus",
    FileNotFoundError,
    r"missing BEIR file: .*corpus.jsonl",
    lambda ws: (ws.beir / "corpus.jsonl").unlink(),
)
_data_case("missing_split", FileNotFoundError, r"dev", lambda ws: None, split="dev")
_data_case(
    "malformed_json",
    ValueError,
    r"corpus.jsonl:5: malformed JSON",
    append_to_beir("corpus.jsonl", '{"_id": "d9", "text": \n'),
)
_data_case(
    "non_object_line",
    ValueError,
    r"corpus.jsonl:5: expected a JSON object, got list",
    append_to_beir("corpus.jsonl", "[1, 2]\n"),
)
_data_case(
    "missing_id",
    ValueError,
    r"queries.jsonl:2: missing '_id'",
    append_to_beir("queries.jsonl", '{"text": "x"}\n'),
)
_data_case(
    "duplicate_doc_id",
    ValueError,
    r"corpus.jsonl:5: duplicate document _id 'd1'",
    append_to_beir("corpus.jsonl", '{"_id": "d1", "text": "again"}\n'),
)
_data_case(
    "non_string_text",
    ValueError,
    r"corpus.jsonl:5: 'text' must be a string, got int",
    append_to_beir("corpus.jsonl", '{"_id": "d9", "text": 5}\n'),
)
_data_case(
    "qrels_columns",
    ValueError,
    r"test.tsv:3: expected 3 tab-separated columns",
    append_to_beir("qrels/test.tsv", "q1 d2 1\n"),
)
_data_case(
    "qrels_score",
    ValueError,
    r"test.tsv:3: score must be an integer, got 'high'",
    append_to_beir("qrels/test.tsv", "q1\td2\thigh\n"),
)
_data_case(
    "qrels_unknown_query",
    ValueError,
    r"test.tsv:3: unknown query id 'q7'",
    append_to_beir("qrels/test.tsv", "q7\td2\t1\n"),
)
_data_case(
    "qrels_unknown_doc",
    ValueError,
    r"test.tsv:3: unknown document id 'd99'",
    append_to_beir("qrels/test.tsv", "q1\td99\t1\n"),
)
_data_case(
    "qrels_conflict",
    ValueError,
    r"test.tsv:3: conflicting score 0",
    append_to_beir("qrels/test.tsv", "q1\td1\t0\n"),
)
_data_case(
    "invalid_utf8",
    ValueError,
    r"corpus.jsonl:\d+: not valid UTF-8",
    lambda ws: (ws.beir / "corpus.jsonl").write_bytes(
        (ws.beir / "corpus.jsonl").read_bytes() + b'{"_id": "\xff"}\n'
    ),
)


def _corrupt_gzip(ws: Workspace) -> None:
    path = ws.beir / "corpus.jsonl"
    packed = gzip.compress(path.read_bytes())
    path.unlink()
    (ws.beir / "corpus.jsonl.gz").write_bytes(packed[: len(packed) // 2])


_data_case("corrupt_gzip", ValueError, r"corpus.jsonl.gz", _corrupt_gzip)


# --------------------------------------------------------------------------- encoders
@case("encoder", FileNotFoundError, r"neither a known encoder name .* nor a local model folder")
def encoder_unknown(ws):
    from imrnns.encoders import Encoder

    return lambda: Encoder(str(ws.root / "no-model"))


@case("encoder", ValueError, r"batch_size must be a positive int, got 0")
def encoder_batch_size(ws):
    from imrnns.encoders import Encoder

    return lambda: Encoder("minilm", batch_size=0)


@case("encoder", TypeError, r"texts must be a sequence of strings, got a single str")
def encoder_bare_string(ws):
    try:
        from imrnns.encoders import Encoder

        enc = Encoder("minilm", cache_dir=ws.root.parent / "c", show_progress=False)
    except FileNotFoundError:
        pytest.skip("needs the all-MiniLM-L6-v2 package")
    return lambda: enc.encode_query("a query")


@case("encoder", TypeError, r"texts\[1\] must be a str, got int")
def encoder_non_str(ws):
    try:
        from imrnns.encoders import Encoder

        enc = Encoder("minilm", cache_dir=ws.root.parent / "c", show_progress=False)
    except FileNotFoundError:
        pytest.skip("needs the all-MiniLM-L6-v2 package")
    return lambda: enc.encode_document(["a", 3])
