"""Bad input to the index: the API (construction, add, search, save) and its files on disk."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from imrnns import IMRNNIndex
from imrnns.distributed import DistributedIMRNNIndex
from imrnns.index import IndexError_
from tests.bad_input.harness import (
    N_DOCS,
    N_IN,
    Workspace,
    case,
    defined,
    flip_byte,
    target_of,
    truncate,
)


# --------------------------------------------------------------------------- the index (API)
@case("index", TypeError, r"model must be an IMRNN, got str")
def index_not_a_model(ws):
    return lambda: IMRNNIndex("model")


@case("index", ValueError, r"feedback_k must be a positive int, got 0")
def index_feedback_zero(ws):
    return lambda: IMRNNIndex(ws.model, feedback_k=0)


@case("index", ValueError, r"feedback_k must be a positive int, got True")
def index_feedback_bool(ws):
    return lambda: IMRNNIndex(ws.model, feedback_k=True)


@case("index", ValueError, r"first_stage must be one of")
def index_first_stage(ws):
    return lambda: IMRNNIndex(ws.model, first_stage="lsh")


@case("index", ValueError, r"storage_dtype must be one of")
def index_storage_dtype(ws):
    return lambda: IMRNNIndex(ws.model, storage_dtype="int8")


@case("index", ValueError, r"first_stage_space must be one of")
def index_space(ws):
    return lambda: IMRNNIndex(ws.model, first_stage_space="raw")


@case("index", ValueError, r"the index is empty: add\(\) documents before searching")
def search_empty_index(ws):
    return lambda: IMRNNIndex(ws.model).search(ws.queries, 3)


@case("index", ValueError, r"the index is empty: nothing to save")
def save_empty_index(ws):
    return lambda: IMRNNIndex(ws.model).save(ws.root / "new-index")


def _add_case(
    name: str, exc: type[BaseException], match: str, make: Callable[[Workspace], Any], **kw: Any
) -> None:
    def setup(ws: Workspace) -> Callable[[], Any]:
        index = ws.index(named="doc_ids" in kw)
        arg = make(ws)

        def run() -> None:
            try:
                index.add(arg, **kw)
            finally:
                assert index.ntotal == N_DOCS, "a rejected add() changed the index"

        return run

    setup.__name__ = name
    case("index", exc, match)(setup)


def _with(value: float) -> Callable[[Workspace], np.ndarray]:
    def make(ws: Workspace) -> np.ndarray:
        x = ws.corpus[:4].copy()
        x[2, 3] = value
        return x

    return make


_add_case(
    "add_wrong_dim",
    ValueError,
    r"embeddings must have shape \(N, 16\), got \(4, 15\)",
    lambda ws: ws.corpus[:4, :15],
)
_add_case(
    "add_1d",
    ValueError,
    r"embeddings must have shape \(N, 16\), got \(16,\)",
    lambda ws: ws.corpus[0],
)
_add_case(
    "add_int",
    TypeError,
    r"embeddings must hold floats, got numpy dtype int64",
    lambda ws: np.zeros((4, N_IN), np.int64),
)
_add_case("add_nan", ValueError, r"embeddings contains 1 NaN/Inf", _with(float("nan")))
_add_case("add_inf", ValueError, r"embeddings contains 1 NaN/Inf", _with(float("inf")))
_add_case("add_empty", ValueError, r"embeddings is empty: nothing to add", lambda ws: ws.corpus[:0])
_add_case(
    "add_list",
    TypeError,
    r"embeddings must be a numpy array or torch tensor, got list",
    lambda ws: ws.corpus[:2].tolist(),
)
_add_case(
    "add_doc_ids_count",
    ValueError,
    r"doc_ids must be 4 strings",
    lambda ws: ws.corpus[:4],
    doc_ids=["a", "b"],
)
_add_case(
    "add_doc_ids_type",
    ValueError,
    r"doc_ids must be 4 strings",
    lambda ws: ws.corpus[:4],
    doc_ids=[1, 2, 3, 4],
)
_add_case(
    "add_doc_ids_dropped",
    ValueError,
    r"doc_ids must be given on every add\(\) or on none",
    lambda ws: ws.corpus[:4],
    doc_ids=None,
)


def _search_case(
    name: str, exc: type[BaseException], match: str, make: Callable[[Workspace], Any], **kw: Any
) -> None:
    def setup(ws: Workspace) -> Callable[[], Any]:
        index = ws.index()
        arg = make(ws)
        return lambda: index.search(arg, **kw)

    setup.__name__ = name
    case("index", exc, match)(setup)


def _queries_with(value: float) -> Callable[[Workspace], np.ndarray]:
    def make(ws: Workspace) -> np.ndarray:
        q = ws.queries.copy()
        q[0, 0] = value
        return q

    return make


_search_case(
    "search_wrong_dim",
    ValueError,
    r"queries must have shape \(B, 16\), got \(3, 12\)",
    lambda ws: ws.queries[:, :12],
    k=3,
)
_search_case(
    "search_1d",
    ValueError,
    r"queries must have shape \(B, 16\), got \(16,\)",
    lambda ws: ws.queries[0],
    k=3,
)
_search_case(
    "search_int",
    TypeError,
    r"queries must hold floats",
    lambda ws: np.ones((2, N_IN), np.int32),
    k=3,
)
_search_case(
    "search_nan", ValueError, r"queries contains 1 NaN/Inf", _queries_with(float("nan")), k=3
)
_search_case(
    "search_inf", ValueError, r"queries contains 1 NaN/Inf", _queries_with(float("inf")), k=3
)
_search_case(
    "search_list",
    TypeError,
    r"numpy array or torch tensor, got list",
    lambda ws: ws.queries.tolist(),
    k=3,
)
_search_case(
    "search_mode",
    ValueError,
    r"mode must be one of \('rerank', 'exhaustive'\), got 'fast'",
    lambda ws: ws.queries,
    k=3,
    mode="fast",
)
_search_case("search_k_zero", ValueError, r"k must be positive, got 0", lambda ws: ws.queries, k=0)
_search_case(
    "search_k_negative", ValueError, r"k must be positive, got -2", lambda ws: ws.queries, k=-2
)
_search_case(
    "search_k_float", TypeError, r"k must be an int, got float", lambda ws: ws.queries, k=2.5
)
_search_case(
    "search_feedback_zero",
    ValueError,
    r"feedback_k must be a positive int, got 0",
    lambda ws: ws.queries,
    k=3,
    feedback_k=0,
)
_search_case(
    "search_wrong_encoder",
    ValueError,
    r"encoder 'enc-B@9999' but this index was built with 'enc-A@0123'",
    lambda ws: ws.queries,
    k=3,
    encoder="enc-B@9999",
)


@defined("index")
def search_k_larger_than_the_corpus(ws):
    index, named = ws.index(named=False), ws.index()

    def run() -> None:
        for mode in ("rerank", "exhaustive"):
            s, i = index.search(ws.queries, k=N_DOCS + 5, mode=mode)
            real = 5 if mode == "rerank" else N_DOCS  # rerank returns the feedback set only
            assert (i[:, real:] == -1).all() and np.isneginf(s[:, real:]).all()
            assert (i[:, :real] >= 0).all() and np.isfinite(s[:, :real]).all()
            # string ids: None pads (a numpy object array for numpy queries)
            s, i = named.search(ws.queries, k=N_DOCS + 5, mode=mode)
            assert all(d is None for d in i[:, real:].ravel()) and np.isneginf(s[:, real:]).all()
            assert all(isinstance(d, str) for d in i[:, :real].ravel())

    return run


@defined("index")
def search_no_queries(ws):
    index, named = ws.index(named=False), ws.index()

    def run() -> None:
        s, i = index.search(ws.queries[:0], k=4)
        assert s.shape == (0, 4) and i.shape == (0, 4)
        s, i = named.search(ws.queries[:0], k=4)
        assert s.shape == (0, 4) and i.shape == (0, 4) and i.dtype == object

    return run


@case("index", ValueError, r"an IVF first stage with nlist=8 needs at least 8 documents")
def ivf_too_few_documents(ws):
    index = IMRNNIndex(ws.model, first_stage="ivf", nlist=8)
    return lambda: index.add(ws.corpus[:5])


@case("index", ValueError, r"exists and is not a directory")
def index_save_over_a_file(ws):
    index = ws.index()
    return lambda: index.save(ws.beir / "corpus.jsonl")


# --------------------------------------------------------------------------- index files
def _load_case(
    name: str,
    exc: type[BaseException],
    match: str,
    tamper: Callable[[Workspace], Path | None],
    loader: str = "plain",
) -> None:
    def setup(ws: Workspace) -> Callable[[], Any]:
        target = target_of(tamper(ws), ws.index_dir)
        if loader == "distributed":
            return lambda: DistributedIMRNNIndex.load(target)
        if loader == "noverify":
            return lambda: IMRNNIndex.load(target, verify=False)
        return lambda: IMRNNIndex.load(target)

    setup.__name__ = name
    case("index-files", exc, match)(setup)


def _edit_manifest(change: Callable[[dict[str, Any]], None]) -> Callable[[Workspace], None]:
    def tamper(ws: Workspace) -> None:
        path = ws.index_dir / "manifest.json"
        manifest = json.loads(path.read_text())
        change(manifest)
        path.write_text(json.dumps(manifest))

    return tamper


_load_case(
    "missing_directory",
    FileNotFoundError,
    r"no such directory: .*nowhere",
    lambda ws: ws.root / "nowhere",
)
_load_case(
    "not_an_index",
    FileNotFoundError,
    r"is not an IMRNN index: no manifest.json",
    lambda ws: ws.beir,
)
_load_case(
    "manifest_not_json",
    IndexError_,
    r"manifest.json: not valid JSON",
    lambda ws: (ws.index_dir / "manifest.json").write_text("{"),
)
_load_case(
    "manifest_wrong_format",
    IndexError_,
    r"manifest.json: not an imrnns-index manifest",
    _edit_manifest(lambda m: m.update(format="other")),
)
_load_case(
    "manifest_newer_version",
    IndexError_,
    r"format_version 99 is newer than this library reads \(\d+\); upgrade",
    _edit_manifest(lambda m: m.update(format_version=99)),
)
_load_case(
    "manifest_wrong_count",
    IndexError_,
    r"projected corpus shape \(40, 8\) does not match the manifest \(41, 8\)",
    _edit_manifest(lambda m: m.update(ntotal=41)),
)
_load_case(
    "corpus_truncated",
    IndexError_,
    r"corpus.safetensors: \d+ bytes, the manifest says \d+: the file is truncated",
    lambda ws: truncate(ws.index_dir / "corpus.safetensors"),
)
_load_case(
    "corpus_byte_flipped",
    IndexError_,
    r"corpus.safetensors: SHA-256 differs from the manifest",
    lambda ws: flip_byte(ws.index_dir / "corpus.safetensors"),
)
_load_case(
    "corpus_missing",
    FileNotFoundError,
    r"index file missing: .*corpus.safetensors",
    lambda ws: (ws.index_dir / "corpus.safetensors").unlink(),
)
_load_case(
    "faiss_byte_flipped",
    IndexError_,
    r"first_stage.faiss: SHA-256 differs",
    lambda ws: flip_byte(ws.index_dir / "first_stage.faiss", 0.9),
)
_load_case(
    "faiss_truncated",
    IndexError_,
    r"first_stage.faiss: \d+ bytes, the manifest says",
    lambda ws: truncate(ws.index_dir / "first_stage.faiss", 0.7),
)
_load_case(
    "adapter_weights_tampered",
    IndexError_,
    r"adapter/model.safetensors: SHA-256 differs",
    lambda ws: flip_byte(ws.index_dir / "adapter" / "model.safetensors", 0.8),
)
_load_case(
    "adapter_config_tampered",
    IndexError_,
    r"adapter/config.json: SHA-256 differs",
    lambda ws: (ws.index_dir / "adapter" / "config.json").write_text(
        (ws.index_dir / "adapter" / "config.json").read_text().replace('"dim": 8', '"dim": 9')
    ),
)
_load_case(
    "doc_ids_tampered",
    IndexError_,
    r"doc_ids.json: SHA-256 differs",
    lambda ws: flip_byte(ws.index_dir / "doc_ids.json", 0.3),
)
_load_case(
    "truncated_without_verify",
    IndexError_,
    r"corpus.safetensors: \d+ bytes, the manifest says",
    lambda ws: truncate(ws.index_dir / "corpus.safetensors", 0.9),
    loader="noverify",
)
_load_case(
    "distributed_load_tampered",
    IndexError_,
    r"corpus.safetensors: SHA-256 differs",
    lambda ws: flip_byte(ws.index_dir / "corpus.safetensors"),
    loader="distributed",
)
_load_case(
    "distributed_load_missing",
    FileNotFoundError,
    r"no such directory",
    lambda ws: ws.root / "nowhere",
    loader="distributed",
)


# Issue 17: a loaded index is checked for what it claims, and saves never replace foreign
# folders. The rewrites below keep the manifest consistent (sizes and SHA-256 updated), as a
# tamperer or a buggy tool would: the manifest alone cannot catch them.
def _consistent(rel: str, data: Callable[[Workspace], bytes]) -> Callable[[Workspace], None]:
    def tamper(ws: Workspace) -> None:
        import hashlib

        blob = data(ws)
        (ws.index_dir / rel).write_bytes(blob)
        path = ws.index_dir / "manifest.json"
        manifest = json.loads(path.read_text())
        manifest["files"][rel] = {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
        path.write_text(json.dumps(manifest))

    return tamper


def _list_outside(entry: str) -> Callable[[Workspace], None]:
    def tamper(ws: Workspace) -> None:
        import hashlib

        outside = ws.root / "outside.bin"
        outside.write_bytes(b"not the index's")
        data = outside.read_bytes()
        path = ws.index_dir / "manifest.json"
        manifest = json.loads(path.read_text())
        name = str(outside) if entry == "absolute" else entry
        manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        path.write_text(json.dumps(manifest))

    return tamper


def _corpus_bytes(change: Callable[[dict[str, Any]], None]) -> Callable[[Workspace], bytes]:
    def data(ws: Workspace) -> bytes:
        from safetensors.torch import load_file, save

        tensors = load_file(str(ws.index_dir / "corpus.safetensors"))
        change(tensors)
        return save(tensors)

    return data


def _faiss_bytes(make: Callable[[np.ndarray], Any]) -> Callable[[Workspace], bytes]:
    def data(ws: Workspace) -> bytes:
        import faiss

        vectors = IMRNNIndex.load(ws.index_dir).first_stage_vectors()
        return faiss.serialize_index(make(vectors)).tobytes()

    return data


def _flat(vectors: np.ndarray, metric: str = "ip") -> Any:
    import faiss

    kind = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    index = faiss.IndexFlat(vectors.shape[1], kind)
    index.add(vectors)
    return index


def _junk_fourcc(ws: Workspace) -> None:
    path = ws.index_dir / "first_stage.faiss"
    data = bytearray(path.read_bytes())
    data[0:4] = b"JUNK"
    path.write_bytes(bytes(data))


_load_case(
    "manifest_entry_outside_the_directory",
    IndexError_,
    r"manifest.json: lists \['../outside.bin'\], not files of an index",
    _list_outside("../outside.bin"),
)
_load_case(
    "manifest_entry_absolute_path",
    IndexError_,
    r"manifest.json: lists \['/.*outside.bin'\], not files of an index",
    _list_outside("absolute"),
)
_load_case(
    "corpus_nan_row",
    IndexError_,
    r"corpus.safetensors: projected corpus: row 23 holds NaN or Inf",
    _consistent(
        "corpus.safetensors",
        _corpus_bytes(lambda t: t["projected"].__setitem__((23, 1), float("nan"))),
    ),
)
_load_case(
    "doc_cache_inf_row_without_verify",
    IndexError_,
    r"corpus.safetensors: doc_cache: row 39 holds NaN or Inf",
    _consistent(
        "corpus.safetensors",
        _corpus_bytes(lambda t: t["doc_cache"].__setitem__((39, 0), float("inf"))),
    ),
    loader="noverify",
)
_load_case(
    "corpus_other_dtype",
    IndexError_,
    r"projected corpus is F16, the manifest's storage_dtype is torch.float32",
    _consistent(
        "corpus.safetensors", _corpus_bytes(lambda t: t.update(projected=t["projected"].half()))
    ),
)
_load_case(
    "faiss_l2_metric",
    IndexError_,
    r"first_stage.faiss: a faiss b'IxF2' index, the manifest's first_stage='flat'",
    _consistent("first_stage.faiss", _faiss_bytes(lambda v: _flat(v, "l2"))),
)
_load_case(
    "faiss_other_dimension",
    IndexError_,
    rf"faiss index of dimension {N_IN + 1}, {N_DOCS} vectors, .* promises dimension {N_IN}",
    _consistent("first_stage.faiss", _faiss_bytes(lambda v: _flat(np.pad(v, ((0, 0), (0, 1)))))),
)
_load_case(
    "faiss_damaged_without_verify",
    IndexError_,
    r"first_stage.faiss: a faiss b'JUNK' index",
    _junk_fourcc,
    loader="noverify",
)


@case("index", ValueError, r"site is not an earlier index save .*index\.html.*nothing was written")
def index_save_over_a_web_folder(ws):
    site = ws.root / "site"
    site.mkdir()
    (site / "manifest.json").write_text(json.dumps({"name": "app", "start_url": "/"}))
    (site / "index.html").write_text("<html></html>")
    index = ws.index()
    return lambda: index.save(site)


@case("index", ValueError, r"index is not an earlier index save .*never writes: notes.txt")
def index_save_over_an_index_with_a_foreign_file(ws):
    (ws.index_dir / "notes.txt").write_text("mine")
    index = ws.index()
    return lambda: index.save(ws.index_dir)


@case("index", ValueError, r"projected: row 3 holds NaN or Inf")
def from_parts_nan_row(ws):
    index = ws.index()
    projected = index.projected_corpus.clone()
    projected[3, 0] = float("nan")
    vectors = index.first_stage_vectors()
    cache = index.document_cache
    return lambda: IMRNNIndex.from_parts(
        index.model, projected, vectors, document_cache=cache, **index.settings()
    )


# Issue 19: documents by id, removal and filters. Every rejected call leaves the index as it
# was (the add cases check ntotal; the remove cases check the ids).
_add_case(
    "add_ids_repeated",
    ValueError,
    r"ids must be unique: 50 appear more than once in this add\(\)",
    lambda ws: ws.corpus[:4],
    ids=[50, 50, 51, 52],
)
_add_case(
    "add_ids_taken",
    ValueError,
    r"ids must be new: 3 already in the index",
    lambda ws: ws.corpus[:4],
    ids=[3, 100, 101, 102],
)
_add_case(
    "add_ids_negative",
    ValueError,
    r"ids must be ints in \[0, 2\*\*63 - 1\] \(-1 pads results\), got -1",
    lambda ws: ws.corpus[:4],
    ids=[-1, 100, 101, 102],
)
_add_case(
    "add_ids_other_kind",
    ValueError,
    r"this index holds int ids, this add\(\) gives str ids \(one kind of id per index\)",
    lambda ws: ws.corpus[:4],
    ids=["a", "b", "c", "d"],
)
_add_case(
    "add_ids_bools",
    TypeError,
    r"ids must be all ints or all strings \(one kind per index\), got \['bool', 'int'\]",
    lambda ws: ws.corpus[:4],
    ids=[True, False, 1, 2],
)
_add_case(
    "add_ids_and_doc_ids",
    ValueError,
    r"give ids= or doc_ids= \(the string-id spelling\), not both",
    lambda ws: ws.corpus[:4],
    ids=["a", "b", "c", "d"],
    doc_ids=["a", "b", "c", "d"],
)


def _remove_case(name: str, exc: type[BaseException], match: str, ids: Any) -> None:
    def setup(ws: Workspace) -> Callable[[], Any]:
        index = ws.index()
        before = list(index.ids)

        def run() -> None:
            try:
                index.remove(ids)
            finally:
                assert list(index.ids) == before, "a rejected remove() changed the index"

        return run

    setup.__name__ = name
    case("index", exc, match)(setup)


_remove_case(
    "remove_unknown", ValueError, r"remove\(\): ids not in the index: 'nope'", ["d1", "nope"]
)
_remove_case("remove_other_kind", TypeError, r"this index holds str ids, got 1", ["d1", 1])
_remove_case("remove_one_string", TypeError, r"must be a collection of ids .*got str", "d1")
_search_case(
    "search_allow_unknown",
    ValueError,
    r"allow: ids not in the index: 'd99'",
    lambda ws: ws.queries,
    k=3,
    allow={"d1", "d99"},
)
_search_case(
    "search_allow_mask_shape",
    ValueError,
    r"allow as a boolean mask must have shape \(40,\) .*got \(39,\)",
    lambda ws: ws.queries,
    k=3,
    allow=np.ones(N_DOCS - 1, dtype=bool),
)
_search_case(
    "search_allow_scalar",
    TypeError,
    r"allow must be a collection of ids \(set, list, array\), got int",
    lambda ws: ws.queries,
    k=3,
    allow=7,
)


def _ids_file(change: Callable[[dict[str, Any], dict[str, Any]], None]) -> Callable[..., Any]:
    """Save an index with int ids and a removal next to the workspace's, then rewrite its
    ids.safetensors and manifest entry consistently (sizes and SHA-256 updated)."""

    def tamper(ws: Workspace) -> Path:
        import hashlib

        import torch
        from safetensors.torch import load_file, save

        index = IMRNNIndex(ws.model, feedback_k=5)
        index.add(ws.corpus, ids=np.arange(N_DOCS) * 2 + 1)
        index.remove([1])
        target = ws.root / "with-ids"
        index.save(target)
        tensors = load_file(str(target / "ids.safetensors"))
        manifest_path = target / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        change(tensors, manifest)
        blob = save({k: torch.as_tensor(v) for k, v in tensors.items()})
        (target / "ids.safetensors").write_bytes(blob)
        manifest["files"]["ids.safetensors"] = {
            "bytes": len(blob),
            "sha256": hashlib.sha256(blob).hexdigest(),
        }
        manifest_path.write_text(json.dumps(manifest))
        return target

    return tamper


def _set(key: str, value: Any) -> Callable[[dict[str, Any], dict[str, Any]], None]:
    def change(tensors: dict[str, Any], manifest: dict[str, Any]) -> None:
        tensors[key] = value

    return change


_load_case(
    "ids_repeated",
    IndexError_,
    r"ids.safetensors: ids repeat",
    _ids_file(_set("ids", np.ones(N_DOCS, dtype=np.int64))),
)
_load_case(
    "ids_negative",
    IndexError_,
    r"ids.safetensors: ids must be >= 0 \(-1 pads results\), got -1",
    _ids_file(_set("ids", np.arange(N_DOCS, dtype=np.int64) - 1)),
)
_load_case(
    "ids_wrong_count",
    IndexError_,
    r"ids.safetensors: ids is I64 \(39,\), expected int64 \(40,\)",
    _ids_file(_set("ids", np.arange(N_DOCS - 1, dtype=np.int64))),
)
_load_case(
    "ids_removed_out_of_range",
    IndexError_,
    r"ids.safetensors: removed must be increasing rows in \[0, 40\)",
    _ids_file(_set("removed", np.array([N_DOCS], dtype=np.int64))),
)
_load_case(
    "ids_entry_missing",
    IndexError_,
    r"manifest.json: 'ids' must be .* exactly when ids.safetensors is listed, got None",
    _ids_file(lambda tensors, manifest: manifest.pop("ids")),
)
