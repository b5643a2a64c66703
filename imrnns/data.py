"""BEIR-format datasets: loading, validation, and the seen/unseen split of test queries.

A BEIR folder holds ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl``
(``_id``, ``text``) and ``qrels/<split>.tsv`` (header ``query-id corpus-id score``).
Every file may instead be gzip-compressed (``corpus.jsonl.gz``, ``qrels/test.tsv.gz``);
the plain file wins when both exist, so that a user who unpacked and edited a file gets
what they edited.

Errors name the file and the 1-based line number: a dataset that fails to load three
steps later (a KeyError in evaluation, a silently wrong nDCG) is far harder to fix than
one that fails here.
"""

from __future__ import annotations

import gzip
import io
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

__all__ = ["BeirDataset", "load_beir", "load_corpus_fields", "scifact_path", "seen_doc_split"]

_QRELS_HEADER = ("query-id", "corpus-id", "score")
# Largest |relevance grade| accepted. Real scales use -2..4; past this, graded training's
# 2^g gains overflow float32 (g >= 128) and trec_eval allocates per grade level (a grade of
# 2^31 - 1 took 17 GB) or wraps the value to a C int (2^32 scores as 0).
MAX_GRADE = 100
_INT_RE = re.compile(r"[+-]?[0-9]+")


@dataclass(frozen=True)
class BeirDataset:
    """One split of a BEIR dataset, as parallel lists plus the relevance judgements.

    Attributes:
        name: the dataset folder's name (``"scifact"``).
        split: the qrels split loaded (``"test"``).
        corpus_ids: every document id, in file order.
        corpus_texts: ``title + " " + text`` when the title is non-empty, else ``text``,
            stripped: the string BEIR and sentence-transformers feed the encoder, so that
            embeddings (and nDCG) match the published numbers.
        query_ids: the queries judged in this split, in qrels order of first appearance
            (queries.jsonl usually holds every split's queries; the others are dropped).
        query_texts: their texts, parallel to ``query_ids``.
        qrels: ``{query_id: {doc_id: score}}``, every judgement of the split, score-0
            judgements included (pytrec_eval treats them as judged non-relevant).
    """

    name: str
    split: str
    # repr=False: the default repr would print the whole corpus.
    corpus_ids: list[str] = field(repr=False)
    corpus_texts: list[str] = field(repr=False)
    query_ids: list[str] = field(repr=False)
    query_texts: list[str] = field(repr=False)
    qrels: dict[str, dict[str, int]] = field(repr=False)

    @property
    def num_docs(self) -> int:
        """Number of documents in the corpus."""
        return len(self.corpus_ids)

    @property
    def num_queries(self) -> int:
        """Number of queries judged in this split."""
        return len(self.query_ids)

    def __repr__(self) -> str:
        return (
            f"BeirDataset(name={self.name!r}, split={self.split!r}, "
            f"num_docs={self.num_docs}, num_queries={self.num_queries})"
        )


def scifact_path() -> Path:
    """Return the folder of the SciFact copy shipped inside the package (BEIR layout, gzip).

    SciFact (Wadden et al., 2020; CC BY-NC 2.0): 5,183 abstracts, 809 train and 300 test
    queries. See ``datasets/scifact/SOURCE.md`` next to the data.
    """
    return Path(__file__).resolve().parent / "datasets" / "scifact"


def load_beir(data_dir: str | Path, split: str = "test") -> BeirDataset:
    """Load one split of a BEIR-format dataset folder.

    Args:
        data_dir: folder holding ``corpus.jsonl[.gz]``, ``queries.jsonl[.gz]`` and
            ``qrels/<split>.tsv[.gz]``.
        split: the qrels file to load (``"train"``, ``"dev"``, ``"test"``, ...).

    Returns:
        A :class:`BeirDataset`.

    Raises:
        FileNotFoundError: the folder, a file, or the split is missing (the message lists
            the splits that exist).
        ValueError: a malformed line (bad JSON, missing ``_id``, wrong column count,
            non-integer score, or one beyond ``MAX_GRADE`` in magnitude), a duplicate id,
            or a judgement naming an unknown query or document; the message names the
            file and the 1-based line number.
    """
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"BEIR dataset folder not found: {root}")
    if not isinstance(split, str) or not split:
        raise ValueError(f"split must be a non-empty string, got {split!r}")

    corpus_path = _find_file(root, "corpus.jsonl")
    queries_path = _find_file(root, "queries.jsonl")
    qrels_path = _find_qrels(root, split)

    corpus_ids, titles, texts = _read_corpus(corpus_path)
    doc_seen = set(corpus_ids)
    # The exact string beir.retrieval.models.SentenceBERT encodes: title, one space, text,
    # stripped; an empty title must not leave a leading space.
    corpus_texts = [
        (title + " " + text).strip() if title else text.strip()
        for title, text in zip(titles, texts, strict=True)
    ]

    all_queries: dict[str, str] = {}
    for lineno, obj in _read_jsonl(queries_path):
        qid = _get_id(obj, queries_path, lineno)
        if qid in all_queries:
            raise ValueError(f"{queries_path}:{lineno}: duplicate query _id {qid!r}")
        all_queries[qid] = _get_str(obj, "text", queries_path, lineno)

    qrels = _read_qrels(qrels_path, all_queries, doc_seen)
    query_ids = list(qrels)  # dicts keep insertion order: qrels order of first appearance
    query_texts = [all_queries[qid] for qid in query_ids]

    return BeirDataset(
        name=root.resolve().name,
        split=split,
        corpus_ids=corpus_ids,
        corpus_texts=corpus_texts,
        query_ids=query_ids,
        query_texts=query_texts,
        qrels=qrels,
    )


def load_corpus_fields(data_dir: str | Path) -> tuple[list[str], list[str], list[str]]:
    """Read a BEIR corpus keeping ``title`` and ``text`` apart.

    :func:`load_beir` joins them (the string the encoder sees); label-free training signals
    such as title pseudo-queries (:class:`imrnns.training.TrainConfig`'s ``pseudo_queries``)
    need the fields separately.

    Args:
        data_dir: folder holding ``corpus.jsonl[.gz]``.

    Returns:
        ``(doc_ids, titles, texts)``, parallel lists in file order (the order of
        ``BeirDataset.corpus_ids``); absent or null fields read as ``""``.

    Raises:
        FileNotFoundError: the folder or the corpus file is missing.
        ValueError: a malformed line or a duplicate id (the message names file and line).
    """
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"BEIR dataset folder not found: {root}")
    return _read_corpus(_find_file(root, "corpus.jsonl"))


def _read_corpus(corpus_path: Path) -> tuple[list[str], list[str], list[str]]:
    """(ids, titles, texts) of a corpus file; duplicate ids raise naming file and line."""
    ids: list[str] = []
    titles: list[str] = []
    texts: list[str] = []
    seen: set[str] = set()
    for lineno, obj in _read_jsonl(corpus_path):
        doc_id = _get_id(obj, corpus_path, lineno)
        if doc_id in seen:
            raise ValueError(f"{corpus_path}:{lineno}: duplicate document _id {doc_id!r}")
        seen.add(doc_id)
        ids.append(doc_id)
        titles.append(_get_str(obj, "title", corpus_path, lineno))
        texts.append(_get_str(obj, "text", corpus_path, lineno))
    return ids, titles, texts


def seen_doc_split(
    qrels_train: Mapping[str, Mapping[str, int]],
    qrels_test: Mapping[str, Mapping[str, int]],
) -> tuple[list[str], list[str]]:
    """Split test queries by whether training could have seen one of their answers.

    A test query is *seen-doc* when any of its relevant documents (score > 0) is also
    relevant to some training query: a model trained on ``train`` may then have learnt
    that document's embedding, so gains on these queries measure memorisation as much as
    generalisation. Reporting the two groups apart keeps that visible.

    Args:
        qrels_train: ``{query_id: {doc_id: score}}`` of the training split.
        qrels_test: the same for the test split.

    Returns:
        ``(seen_doc_query_ids, unseen_doc_query_ids)``, each in ``qrels_test`` order. A
        test query with no relevant document is unseen-doc.
    """
    train_relevant = {
        doc_id for judged in qrels_train.values() for doc_id, s in judged.items() if s > 0
    }
    seen: list[str] = []
    unseen: list[str] = []
    for qid, judged in qrels_test.items():
        if any(s > 0 and doc_id in train_relevant for doc_id, s in judged.items()):
            seen.append(qid)
        else:
            unseen.append(qid)
    return seen, unseen


# --------------------------------------------------------------------------- helpers


def _find_file(folder: Path, name: str) -> Path:
    """``folder/name`` if it exists, else ``folder/name.gz``, else FileNotFoundError."""
    plain = folder / name
    if plain.is_file():
        return plain
    packed = folder / (name + ".gz")
    if packed.is_file():
        return packed
    raise FileNotFoundError(f"missing BEIR file: {plain} (or {packed.name})")


def _available_splits(qrels_dir: Path) -> list[str]:
    if not qrels_dir.is_dir():
        return []
    splits = set()
    for p in qrels_dir.iterdir():
        for suffix in (".tsv", ".tsv.gz"):
            if p.is_file() and p.name.endswith(suffix):
                splits.add(p.name[: -len(suffix)])
    return sorted(splits)


def _find_qrels(root: Path, split: str) -> Path:
    qrels_dir = root / "qrels"
    try:
        return _find_file(qrels_dir, f"{split}.tsv")
    except FileNotFoundError:
        available = _available_splits(qrels_dir)
        listed = ", ".join(available) if available else "none"
        raise FileNotFoundError(
            f"split {split!r} not found: no {qrels_dir / (split + '.tsv')} "
            f"(or .tsv.gz); available splits: {listed}"
        ) from None


def _open_binary(path: Path) -> IO[bytes]:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield ``(1-based line number, line)`` with decode errors reported by line.

    Lines are read as bytes and decoded one at a time: a text-mode reader decodes 8 KB
    blocks, so a bad byte was reported on the first line of its block, not its own. Line
    endings follow universal newlines, as text mode did (``\r\n`` and a lone ``\r`` end
    a line and read as ``\n``).
    """
    with _open_binary(path) as f:
        lineno = 0
        while True:
            try:
                raw = f.readline()
            except (OSError, EOFError) as e:  # truncated or corrupt gzip stream
                raise ValueError(f"{path}:{lineno + 1}: cannot read file: {e}") from e
            if not raw:
                return
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno + 1}: not valid UTF-8 ({e.reason})") from e
            if "\r" not in text:
                lineno += 1
                yield lineno, text
                continue
            for line in io.StringIO(text, newline=None):  # universal newlines
                lineno += 1
                yield lineno, line


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    for lineno, line in _lines(path):
        if not line.strip():  # blank lines (a trailing newline, say) carry nothing
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: malformed JSON: {e.msg} (column {e.colno})") from e
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def _get_id(obj: dict, path: Path, lineno: int) -> str:
    if "_id" not in obj:
        raise ValueError(f"{path}:{lineno}: missing '_id'")
    value = obj["_id"]
    # Some BEIR exports write numeric ids as JSON numbers; qrels always hold strings, so
    # normalise to str here or every lookup would miss. bool is an int subclass: refuse it.
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{path}:{lineno}: '_id' must be a non-empty string, got {value!r}")
    return value


def _get_str(obj: dict, key: str, path: Path, lineno: int) -> str:
    value = obj.get(key)
    if value is None:  # absent or null: BEIR treats both as empty
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{path}:{lineno}: {key!r} must be a string, got {type(value).__name__}")
    return value


def _read_qrels(
    path: Path, queries: Mapping[str, str], doc_ids: set[str]
) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    first = True
    for lineno, line in _lines(path):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        cols = line.split("\t")
        if first:
            first = False
            if tuple(c.strip() for c in cols) == _QRELS_HEADER:
                continue
        if len(cols) != 3:
            raise ValueError(
                f"{path}:{lineno}: expected 3 tab-separated columns "
                f"(query-id, corpus-id, score), got {len(cols)}: {line!r}"
            )
        qid, doc_id, score_str = (c.strip() for c in cols)
        # ASCII digits only: int() would also take "1_0" (10) and non-ASCII digits.
        if not _INT_RE.fullmatch(score_str):
            raise ValueError(f"{path}:{lineno}: score must be an integer, got {score_str!r}")
        score = int(score_str)
        if abs(score) > MAX_GRADE:
            raise ValueError(
                f"{path}:{lineno}: score {score} out of range [-{MAX_GRADE}, {MAX_GRADE}]"
            )
        if qid not in queries:
            raise ValueError(f"{path}:{lineno}: unknown query id {qid!r} (not in queries)")
        if doc_id not in doc_ids:
            raise ValueError(f"{path}:{lineno}: unknown document id {doc_id!r} (not in corpus)")
        judged = qrels.setdefault(qid, {})
        # A repeated identical judgement is harmless; a conflicting one has no right answer.
        if doc_id in judged and judged[doc_id] != score:
            raise ValueError(
                f"{path}:{lineno}: conflicting score {score} for ({qid!r}, {doc_id!r}); "
                f"an earlier line gave {judged[doc_id]}"
            )
        judged[doc_id] = score
    return qrels
