"""BEIR loading: the vendored SciFact, gzip handling, and errors that name file and line."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from imrnns.data import BeirDataset, load_beir, scifact_path, seen_doc_split

# ---------------------------------------------------------------------------- helpers

CORPUS = [
    {"_id": "d1", "title": "Title one", "text": "Text one."},
    {"_id": "d2", "title": "", "text": "  Text two.  "},
    {"_id": "d3", "text": "No title key."},
    {"_id": "d4", "title": "Only title", "text": ""},
]
QUERIES = [
    {"_id": "q1", "text": "first query"},
    {"_id": "q2", "text": "second query"},
    {"_id": "q3", "text": "third query, judged only in train"},
    {"_id": "q4", "text": "never judged"},
]
TEST_QRELS = "query-id\tcorpus-id\tscore\nq2\td1\t1\nq1\td2\t1\nq2\td3\t0\nq1\td4\t1\n"
TRAIN_QRELS = "query-id\tcorpus-id\tscore\nq3\td1\t1\n"


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def _write(path: Path, text: str, gz: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(path.with_name(path.name + ".gz"), "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")


def make_beir(
    root: Path,
    *,
    corpus: str | None = None,
    queries: str | None = None,
    test: str | None = None,
    train: str | None = TRAIN_QRELS,
    gz: bool = False,
) -> Path:
    _write(root / "corpus.jsonl", _jsonl(CORPUS) if corpus is None else corpus, gz)
    _write(root / "queries.jsonl", _jsonl(QUERIES) if queries is None else queries, gz)
    _write(root / "qrels" / "test.tsv", TEST_QRELS if test is None else test, gz)
    if train is not None:
        _write(root / "qrels" / "train.tsv", train, gz)
    return root


# ---------------------------------------------------------------------------- vendored SciFact


@pytest.fixture(scope="module")
def scifact_test() -> BeirDataset:
    return load_beir(scifact_path(), "test")


@pytest.fixture(scope="module")
def scifact_train() -> BeirDataset:
    return load_beir(scifact_path(), "train")


def test_scifact_is_vendored_gzipped() -> None:
    root = scifact_path()
    for rel in ("corpus.jsonl.gz", "queries.jsonl.gz", "qrels/train.tsv.gz", "qrels/test.tsv.gz"):
        assert (root / rel).is_file(), rel
    assert "CC BY-NC 2.0" in (root / "SOURCE.md").read_text(encoding="utf-8")


def test_scifact_counts(scifact_test: BeirDataset, scifact_train: BeirDataset) -> None:
    assert scifact_test.name == "scifact" and scifact_test.split == "test"
    assert scifact_test.num_docs == len(scifact_test.corpus_texts) == 5183
    assert scifact_test.num_queries == len(scifact_test.query_texts) == 300
    assert scifact_train.num_queries == 809
    assert len(set(scifact_test.corpus_ids)) == 5183
    assert list(scifact_test.qrels) == scifact_test.query_ids
    # Every judged document exists, every test query has a relevant document.
    ids = set(scifact_test.corpus_ids)
    for judged in scifact_test.qrels.values():
        assert set(judged) <= ids
        assert any(s > 0 for s in judged.values())
    # The repr summarises instead of printing 5,183 abstracts.
    assert repr(scifact_test) == (
        "BeirDataset(name='scifact', split='test', num_docs=5183, num_queries=300)"
    )


def test_scifact_text_join(scifact_test: BeirDataset) -> None:
    with gzip.open(scifact_path() / "corpus.jsonl.gz", "rt", encoding="utf-8") as f:
        first = json.loads(f.readline())
    assert scifact_test.corpus_ids[0] == first["_id"]
    assert scifact_test.corpus_texts[0] == (first["title"] + " " + first["text"]).strip()


def test_seen_doc_split_scifact(scifact_train: BeirDataset, scifact_test: BeirDataset) -> None:
    seen, unseen = seen_doc_split(scifact_train.qrels, scifact_test.qrels)
    # docs/design.md section 9: 196 of SciFact's 300 test queries share a relevant document with train.
    assert (len(seen), len(unseen)) == (196, 104)
    assert sorted(seen + unseen) == sorted(scifact_test.query_ids)
    order = {q: i for i, q in enumerate(scifact_test.query_ids)}
    assert seen == sorted(seen, key=order.__getitem__)


# ---------------------------------------------------------------------------- loading


def test_load_small(tmp_path: Path) -> None:
    ds = load_beir(make_beir(tmp_path / "tiny"), "test")
    assert ds.name == "tiny" and ds.split == "test"
    assert ds.corpus_ids == ["d1", "d2", "d3", "d4"]
    # BEIR's join: title + " " + text when there is a title; stripped either way.
    assert ds.corpus_texts == ["Title one Text one.", "Text two.", "No title key.", "Only title"]
    assert ds.query_ids == ["q2", "q1"]  # qrels order of first appearance, q3/q4 dropped
    assert ds.query_texts == ["second query", "first query"]
    assert ds.qrels == {"q2": {"d1": 1, "d3": 0}, "q1": {"d2": 1, "d4": 1}}  # score 0 kept


def test_dataset_is_frozen(tmp_path: Path) -> None:
    ds = load_beir(make_beir(tmp_path), "test")
    with pytest.raises(AttributeError):
        ds.split = "train"  # type: ignore[misc]


def test_gzip_reading(tmp_path: Path) -> None:
    plain = load_beir(make_beir(tmp_path / "plain"), "test")
    packed = load_beir(make_beir(tmp_path / "packed", gz=True), "test")
    assert packed.corpus_texts == plain.corpus_texts
    assert packed.query_ids == plain.query_ids and packed.qrels == plain.qrels
    assert load_beir(tmp_path / "packed", "train").query_ids == ["q3"]


def test_plain_file_wins_over_gzip(tmp_path: Path) -> None:
    root = make_beir(tmp_path, gz=True)
    edited = [dict(r, text=r["text"] + " edited") for r in CORPUS]
    _write(root / "corpus.jsonl", _jsonl(edited))
    ds = load_beir(root, "test")
    assert ds.corpus_texts[0] == "Title one Text one. edited"


def test_qrels_without_header_and_crlf(tmp_path: Path) -> None:
    root = make_beir(tmp_path, test="q1\td2\t1\r\nq1\td4\t2\r\n\r\n")
    assert load_beir(root, "test").qrels == {"q1": {"d2": 1, "d4": 2}}


def test_numeric_ids_become_strings(tmp_path: Path) -> None:
    corpus = _jsonl([{"_id": 7, "title": "", "text": "seven"}])
    queries = _jsonl([{"_id": 1, "text": "one"}])
    root = make_beir(tmp_path, corpus=corpus, queries=queries, test="1\t7\t1\n", train=None)
    ds = load_beir(root, "test")
    assert ds.corpus_ids == ["7"] and ds.query_ids == ["1"] and ds.qrels == {"1": {"7": 1}}


# ---------------------------------------------------------------------------- errors


def _expect_error(root: Path, match: str, exc: type[Exception] = ValueError) -> None:
    with pytest.raises(exc, match=match):
        load_beir(root, "test")


def test_malformed_json_names_file_and_line(tmp_path: Path) -> None:
    lines = _jsonl(CORPUS).splitlines(keepends=True)
    lines[2] = '{"_id": "d3", "text": \n'
    _expect_error(make_beir(tmp_path, corpus="".join(lines)), r"corpus\.jsonl:3: malformed JSON")


def test_malformed_json_in_gzip_names_line(tmp_path: Path) -> None:
    queries = _jsonl(QUERIES) + "\n" + "not json\n"  # blank line 5 is skipped but counted
    root = make_beir(tmp_path, queries=queries, gz=True)
    _expect_error(root, r"queries\.jsonl\.gz:6: malformed JSON")


def test_non_object_line(tmp_path: Path) -> None:
    _expect_error(
        make_beir(tmp_path, corpus='["d1"]\n'), r"corpus\.jsonl:1: expected a JSON object"
    )


def test_missing_id(tmp_path: Path) -> None:
    corpus = _jsonl([*CORPUS, {"title": "t", "text": "no id"}])
    _expect_error(make_beir(tmp_path, corpus=corpus), r"corpus\.jsonl:5: missing '_id'")


def test_duplicate_doc_id(tmp_path: Path) -> None:
    corpus = _jsonl([*CORPUS, CORPUS[1]])
    _expect_error(
        make_beir(tmp_path, corpus=corpus), r"corpus\.jsonl:5: duplicate document _id 'd2'"
    )


def test_duplicate_query_id(tmp_path: Path) -> None:
    queries = _jsonl([QUERIES[0], *QUERIES])
    _expect_error(
        make_beir(tmp_path, queries=queries), r"queries\.jsonl:2: duplicate query _id 'q1'"
    )


def test_non_string_text(tmp_path: Path) -> None:
    corpus = _jsonl([{"_id": "d1", "title": "t", "text": 5}])
    _expect_error(make_beir(tmp_path, corpus=corpus), r"corpus\.jsonl:1: 'text' must be a string")


@pytest.mark.parametrize(
    ("qrels", "match"),
    [
        ("query-id\tcorpus-id\tscore\nq1\td2\n", r"test\.tsv:2: expected 3 tab-separated columns"),
        ("query-id\tcorpus-id\tscore\nq1\td2\t1\t0\n", r"test\.tsv:2: expected 3 .* got 4"),
        (
            "query-id\tcorpus-id\tscore\nq1\td2\t1\nq1\td4\thigh\n",
            r"test\.tsv:3: score must be an integer",
        ),
        ("query-id\tcorpus-id\tscore\nq1\td2\t1.5\n", r"test\.tsv:2: score must be an integer"),
        ("query-id\tcorpus-id\tscore\nqX\td2\t1\n", r"test\.tsv:2: unknown query id 'qX'"),
        ("query-id\tcorpus-id\tscore\nq1\tdX\t1\n", r"test\.tsv:2: unknown document id 'dX'"),
        ("query-id\tcorpus-id\tscore\nq1\td2\t1\nq1\td2\t0\n", r"test\.tsv:3: conflicting score"),
    ],
)
def test_bad_qrels(tmp_path: Path, qrels: str, match: str) -> None:
    _expect_error(make_beir(tmp_path, test=qrels), match)


def test_bad_qrels_gzip(tmp_path: Path) -> None:
    root = make_beir(tmp_path, test="query-id\tcorpus-id\tscore\nq1 d2 1\n", gz=True)
    _expect_error(root, r"test\.tsv\.gz:2: expected 3 tab-separated columns")


def test_missing_split_lists_available(tmp_path: Path) -> None:
    root = make_beir(tmp_path)
    with pytest.raises(
        FileNotFoundError, match=r"split 'dev' not found.*available splits: test, train"
    ):
        load_beir(root, "dev")


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="folder not found"):
        load_beir(tmp_path / "nope", "test")
    root = make_beir(tmp_path / "a")
    (root / "queries.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match=r"queries\.jsonl"):
        load_beir(root, "test")


def test_corrupt_gzip(tmp_path: Path) -> None:
    root = make_beir(tmp_path, gz=True)
    blob = (root / "corpus.jsonl.gz").read_bytes()
    (root / "corpus.jsonl.gz").write_bytes(blob[: len(blob) // 2])
    _expect_error(root, r"corpus\.jsonl\.gz:\d+: cannot read file")


# ---------------------------------------------------------------------------- seen/unseen


def test_seen_doc_split_rules() -> None:
    train = {"t1": {"a": 1, "z": 0}, "t2": {"b": 2}}
    test = {
        "x": {"a": 1},  # relevant doc also relevant in train: seen
        "y": {"c": 1, "b": 1},  # one of them is enough: seen
        "w": {"z": 1},  # z is judged in train but not relevant there: unseen
        "v": {"a": 0, "c": 1},  # a is not relevant to this query: unseen
        "u": {},  # nothing relevant: unseen
    }
    assert seen_doc_split(train, test) == (["x", "y"], ["w", "v", "u"])


@pytest.mark.parametrize(
    ("score", "match"),
    [
        # int() would read these as 10 and 1: a malformed grade must not load as another.
        ("1_0", r"test\.tsv:2: score must be an integer, got '1_0'"),
        ("\u0661", r"test\.tsv:2: score must be an integer"),
        # pytrec_eval wraps 2^32 to 0, allocates per grade level (2^31 - 1: 17 GB) and
        # segfaults on 2^40; graded training's 2^g gains overflow float32 past 127.
        ("4294967296", r"test\.tsv:2: score 4294967296 out of range"),
        ("-200", r"test\.tsv:2: score -200 out of range"),
    ],
)
def test_qrels_score_strict_integer_in_range(tmp_path: Path, score: str, match: str) -> None:
    _expect_error(make_beir(tmp_path, test=f"query-id\tcorpus-id\tscore\nq1\td2\t{score}\n"), match)


def test_qrels_negative_and_signed_grades_load(tmp_path: Path) -> None:
    ds = load_beir(make_beir(tmp_path, test="query-id\tcorpus-id\tscore\nq1\td2\t-1\nq1\td4\t+2\n"))
    assert ds.qrels == {"q1": {"d2": -1, "d4": 2}}
