"""Index directories on disk: the files, the SHA-256 manifest, and checked reads.

A saved index is one directory, written atomically (:func:`imrnns._atomic.atomic_directory`):

- ``manifest.json``: ``format``/``format_version``, ``ntotal``, the index settings
  (:meth:`imrnns.index.IMRNNIndex.settings`) and, for every other file, its size and SHA-256;
- ``adapter/``: the model (:func:`imrnns.checkpoints.save_pretrained`);
- ``corpus.safetensors``: ``projected`` (N, m) in the storage dtype and, when the index keeps
  it, ``doc_cache`` (N, width);
- ``first_stage.faiss``: the faiss index (written from a CPU copy);
- ``doc_ids.json``: the N document names, only when the index holds string ids;
- ``ids.safetensors`` (format version 2): ``ids`` (N,) int64, only when the index holds int
  ids other than the defaults 0 .. N - 1, and ``removed`` (R,) int64, the sorted rows of
  removed documents not yet compacted away, only when there are some. The manifest's
  ``"ids"`` entry says which it holds (``{"int": bool, "removed": R}``). An index without
  this file (every version-1 save) has default or string ids and no removed rows.
- ``"next_id"`` in the manifest (format version 2): the id the next default ``add`` gives, only
  when it is not the one a load infers (the largest stored int id + 1, i.e. ``ntotal`` for
  default ids): after the last documents were removed and compacted away, it keeps their ids
  from being handed out again. Saves without it (every earlier one) load as before.

``ntotal`` counts stored rows (removed ones included): the files' shapes follow it.

:data:`INDEX_LAYOUT` lists exactly these files: a save replaces an existing directory only
when it is an earlier index save (:func:`imrnns._atomic.check_replaceable`).

Loading checks what it reads, in one place (:class:`Expected` says what the manifest and the
adapter promise; every reader here checks against it): the manifest lists only the index's
own file names (nothing outside the directory is ever opened), every file has the listed size
(and, with ``verify``, SHA-256), the corpus tensors have the promised names, shapes and dtypes
and only finite rows, and the faiss file is the promised structure (type, dimension, inner
product metric, ``ntotal``), checked from its header before faiss reads it. The SHA-256
manifest detects corruption (truncation, flipped bytes, a file from another save), not
tampering: whoever can rewrite a file can rewrite the manifest too. The content checks bound
what a rewritten index can do (no file outside the directory, no NaN ranked first, no first
stage of another shape or metric); an index from an untrusted source is still untrusted.
Failures raise :class:`IndexError_` (a ValueError) naming the file. Tested in
tests/retriever/ (test_index.py, test_storage_safety.py, test_faults.py,
test_distributed_save.py) and tests/bad_input/cases_index.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from imrnns._atomic import SaveLayout, atomic_directory, read_format_json
from imrnns._checkpoint_io import CHECKPOINT_LAYOUT
from imrnns.checkpoints import save_pretrained
from imrnns.index import first_stage

if TYPE_CHECKING:
    from imrnns.model import IMRNN

FORMAT = "imrnns-index"
FORMAT_VERSION = 2
# Saves without ids.safetensors are written as version 1, readable by older releases.
FORMAT_VERSION_PLAIN = 1
IDS_FILE = "ids.safetensors"
MANIFEST_NAME = "manifest.json"
# Largest "next_id": one past the largest int id (ids are int64 >= 0; -1 pads results).
MAX_NEXT_ID = 2**63
# Files every index directory holds (doc_ids.json only when the documents are named).
REQUIRED_FILES = (
    "adapter/config.json",
    "adapter/model.safetensors",
    "corpus.safetensors",
    "first_stage.faiss",
)
INDEX_LAYOUT = SaveLayout(
    kind="index",
    header=MANIFEST_NAME,
    format=FORMAT,
    max_version=FORMAT_VERSION,
    files=frozenset(
        {MANIFEST_NAME, "corpus.safetensors", "first_stage.faiss", "doc_ids.json", IDS_FILE}
    )
    | CHECKPOINT_LAYOUT.nested("adapter"),
)
# The only names a manifest may list: an entry is never a path of the reader's choosing.
LISTED_FILES = INDEX_LAYOUT.files - {MANIFEST_NAME}
# Rows checked for NaN/Inf per step (bounds the temporary boolean mask).
FINITE_CHUNK = 65536
# faiss's file header: fourcc, d (int32), ntotal (int64), two dummies (int64), is_trained
# (bool), metric (int32); a flat index follows with its float count (uint64) and the vectors.
_FAISS_HEADER = struct.Struct("<4siqqq?i")
_FAISS_FOURCC = {"flat": b"IxFI", "ivf": b"IwFl", "hnsw": b"IHNf"}
_FAISS_TYPES = {"flat": "IndexFlat", "ivf": "IndexIVFFlat", "hnsw": "IndexHNSWFlat"}
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


class IndexError_(ValueError):
    """An index directory is missing, truncated, tampered with, or inconsistent."""


class Expected(NamedTuple):
    """What an index directory's files must hold, from its manifest and its adapter.

    Attributes:
        ntotal: N, the documents.
        working_dim: m, the projected corpus's width.
        storage_dtype: the projected corpus's dtype.
        cache_width: the per-document cache's width, or None when the index keeps none.
        first_stage: ``"flat"``, ``"ivf"`` or ``"hnsw"``.
        first_stage_dim: the faiss vectors' width (n for the base space, m for projected).
    """

    ntotal: int
    working_dim: int
    storage_dtype: torch.dtype
    cache_width: int | None
    first_stage: str
    first_stage_dim: int


def sha256_file(path: Path) -> str:
    """The hex SHA-256 of a file's bytes (read in 4 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def check_rows_finite(
    name: str, x: torch.Tensor, error: type[ValueError] = ValueError, first_row: int = 0
) -> None:
    """Raise ``error`` naming the first row of (N, d) ``x`` that holds NaN or Inf.

    Every row is checked, ``FINITE_CHUNK`` rows at a time, so where a bad row lies never
    decides whether it is found. Per chunk, one reduction: a row's sum (accumulated in at
    least float32) is finite unless the row holds NaN or Inf, or its finite values overflow;
    only rows whose sum is not finite are checked element by element, so an overflow is not
    mistaken for NaN. ``first_row`` numbers the rows in the message (a slice of a corpus).
    """
    if not x.is_floating_point():
        raise TypeError(f"{name} must hold floats, got {x.dtype}")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    for lo in range(0, x.shape[0], FINITE_CHUNK):
        chunk = x[lo : lo + FINITE_CHUNK]
        sums = chunk.reshape(chunk.shape[0], -1).sum(dim=1, dtype=acc)
        suspects = torch.nonzero(~torch.isfinite(sums)).flatten()
        if suspects.numel() == 0:
            continue
        rows = chunk[suspects].reshape(suspects.numel(), -1)
        bad = torch.nonzero(~torch.isfinite(rows).all(dim=1)).flatten()
        if bad.numel():
            row = lo + int(suspects[bad[0]])
            raise error(f"{name}: row {first_row + row} holds NaN or Inf")


def write_index(
    directory: Path,
    model: IMRNN,
    projected: torch.Tensor,
    document_cache: torch.Tensor | None,
    first_stage_index: Any,
    doc_ids: list[str] | None,
    settings: dict[str, Any],
    *,
    int_ids: torch.Tensor | None = None,
    removed: torch.Tensor | None = None,
    next_id: int | None = None,
) -> None:
    """Write an index directory atomically (the layout in the module docstring).

    Args:
        directory: new, empty, or an earlier index save (replaced as a whole): anything else
            is refused before a byte is written (:func:`imrnns._atomic.check_replaceable`);
            a failure at any point leaves its previous content intact.
        model: the adapter.
        projected: (N, m) projected corpus, any device.
        document_cache: (N, width) per-document cache, or None.
        first_stage_index: the first stage over the N documents (:mod:`imrnns.index.first_stage`;
            a flat one is written in faiss's ``IndexFlatIP`` format without faiss).
        doc_ids: N names, or None.
        settings: the index's constructor settings, recorded in the manifest.
        int_ids: (N,) int64 ids when they are not the defaults 0 .. N - 1, or None.
        removed: (R,) int64 sorted rows of removed documents, or None (none removed).
        next_id: the next default id, when a load could not infer it (module docstring), or
            None. Written as the manifest's ``"next_id"`` (format version 2).

    Raises:
        ValueError: ``directory`` is not an earlier index save (the message names it and the
            files that would be lost).
    """
    with atomic_directory(directory, INDEX_LAYOUT) as tmp:
        save_pretrained(model, tmp / "adapter")
        tensors = {"projected": projected.detach().cpu().contiguous()}
        if document_cache is not None:
            tensors["doc_cache"] = document_cache.detach().cpu().contiguous()
        save_file(tensors, str(tmp / "corpus.safetensors"))
        first_stage.write(first_stage_index, tmp / "first_stage.faiss")
        if doc_ids is not None:
            (tmp / "doc_ids.json").write_text(json.dumps(doc_ids))
        extra: dict[str, Any] = {}
        if int_ids is not None or removed is not None:
            id_tensors = {}
            if int_ids is not None:
                id_tensors["ids"] = int_ids.detach().cpu().to(torch.int64).contiguous()
            if removed is not None:
                id_tensors["removed"] = removed.detach().cpu().to(torch.int64).contiguous()
            save_file(id_tensors, str(tmp / IDS_FILE))
            extra["ids"] = {
                "int": int_ids is not None,
                "removed": 0 if removed is None else int(removed.numel()),
            }
        if next_id is not None:
            extra["next_id"] = int(next_id)
        files = {}
        for path in sorted(tmp.rglob("*")):
            if path.is_file():
                rel = path.relative_to(tmp).as_posix()
                files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION if extra else FORMAT_VERSION_PLAIN,
            "ntotal": int(projected.shape[0]),
            "index": settings,
            "files": files,
            **extra,
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _check_entry(directory: Path, rel: str) -> Path:
    """``directory / rel`` after checking it is a regular file reached through real folders.

    ``rel`` is one of :data:`LISTED_FILES`; a link at any step could lead outside the
    directory, so none is followed.
    """
    parts = rel.split("/")
    for i in range(1, len(parts) + 1):
        step = directory.joinpath(*parts[:i])
        try:
            mode = os.lstat(step).st_mode
        except FileNotFoundError:
            raise FileNotFoundError(f"index file missing: {directory / rel}") from None
        last = i == len(parts)
        if not (stat.S_ISREG(mode) if last else stat.S_ISDIR(mode)):
            what = "regular file" if last else "folder"
            raise IndexError_(f"{step}: not a {what} (links and special files are refused)")
    return directory / rel


def read_manifest(directory: Path, verify: bool = True) -> dict[str, Any]:
    """The manifest of an index directory, checked, with every file it lists checked.

    The entries are checked before any file is opened: each must be one of the index's own
    file names (:data:`LISTED_FILES`: no ``..``, no absolute path, nothing outside the
    directory) and a regular file reached without following a link.

    Raises:
        FileNotFoundError: no manifest, or a file it lists is missing.
        IndexError_: (a ValueError) the manifest is malformed or lists a name an index never
            holds (the message names it), or a file's size (and, with ``verify``, SHA-256)
            differs from the manifest's.
    """
    manifest_path = directory / MANIFEST_NAME
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{directory} is not an IMRNN index: no manifest.json")
    manifest = read_format_json(manifest_path, FORMAT, FORMAT_VERSION, IndexError_, "manifest")
    n, cfg, files = manifest.get("ntotal"), manifest.get("index"), manifest.get("files")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise IndexError_(f"{manifest_path}: 'ntotal' must be an int >= 0, got {n!r}")
    if not isinstance(cfg, dict):
        raise IndexError_(f"{manifest_path}: missing or invalid 'index' settings")
    if not isinstance(files, dict) or not all(
        isinstance(meta, dict)
        and isinstance(meta.get("bytes"), int)
        and not isinstance(meta.get("bytes"), bool)
        and meta["bytes"] >= 0
        and isinstance(meta.get("sha256"), str)
        for meta in files.values()
    ):
        raise IndexError_(f"{manifest_path}: 'files' must map names to their bytes and sha256")
    foreign = sorted(rel for rel in files if rel not in LISTED_FILES)
    if foreign:
        raise IndexError_(
            f"{manifest_path}: lists {foreign}, not files of an index (it holds only "
            f"{sorted(LISTED_FILES)}); nothing was opened"
        )
    missing = [rel for rel in REQUIRED_FILES if rel not in files]
    if missing:
        raise IndexError_(f"{manifest_path}: does not list the index files {missing}")
    ids_entry = manifest.get("ids")
    if (ids_entry is not None) != (IDS_FILE in files) or (
        ids_entry is not None
        and not (
            isinstance(ids_entry, dict)
            and isinstance(ids_entry.get("int"), bool)
            and isinstance(ids_entry.get("removed"), int)
            and not isinstance(ids_entry.get("removed"), bool)
            and 0 <= ids_entry["removed"] <= n
            and (ids_entry["int"] or ids_entry["removed"] > 0)
        )
    ):
        raise IndexError_(
            f"{manifest_path}: 'ids' must be {{'int': bool, 'removed': 0 .. ntotal}} exactly "
            f"when {IDS_FILE} is listed, got {ids_entry!r}"
        )
    next_id = manifest.get("next_id")
    if next_id is not None and (
        isinstance(next_id, bool) or not isinstance(next_id, int) or not 0 <= next_id <= MAX_NEXT_ID
    ):
        raise IndexError_(
            f"{manifest_path}: 'next_id' must be an int in [0, 2**63], got {next_id!r}"
        )
    paths = {rel: _check_entry(directory, rel) for rel in sorted(files)}
    for rel, path in paths.items():
        size = path.stat().st_size
        if size != files[rel]["bytes"]:
            raise IndexError_(
                f"{path}: {size} bytes, the manifest says {files[rel]['bytes']}: "
                "the file is truncated or was modified"
            )
        if verify and sha256_file(path) != files[rel]["sha256"]:
            raise IndexError_(f"{path}: SHA-256 differs from the manifest: the file was modified")
    return manifest


def _check_corpus_header(path: Path, fh: Any, expected: Expected) -> bool:
    """Check the safetensors header (names, shapes, dtypes; no tensor read); True if cached."""
    n, m = expected.ntotal, expected.working_dim
    keys = set(fh.keys())
    want = {"projected"} | ({"doc_cache"} if expected.cache_width is not None else set())
    if keys != want:
        raise IndexError_(
            f"{path}: holds tensors {sorted(keys)}, the manifest's settings promise {sorted(want)}"
        )
    projected = fh.get_slice("projected")
    shape, dtype = tuple(projected.get_shape()), projected.get_dtype()
    if shape != (n, m):
        raise IndexError_(
            f"{path}: projected corpus shape {shape} does not match the manifest ({n}, {m})"
        )
    if dtype != _SAFETENSORS_DTYPES[expected.storage_dtype]:
        raise IndexError_(
            f"{path}: projected corpus is {dtype}, the manifest's storage_dtype is "
            f"{expected.storage_dtype}"
        )
    if expected.cache_width is None:
        return False
    cache = fh.get_slice("doc_cache")
    shape, dtype = tuple(cache.get_shape()), cache.get_dtype()
    if shape != (n, expected.cache_width) or dtype not in ("F32", "F64"):
        raise IndexError_(
            f"{path}: doc_cache is {dtype} {shape}, expected float32 ({n}, {expected.cache_width})"
        )
    return True


def read_corpus(
    directory: Path, expected: Expected, rows: tuple[int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(projected corpus, document cache or None) of an index directory, on the CPU, checked.

    The header is checked against ``expected`` before any tensor is read, then every row
    read is checked finite (:func:`check_rows_finite`). ``rows=(lo, hi)`` reads only those
    rows (by slice: the others are never held).

    Returns:
        ((hi - lo, m) corpus in the storage dtype, (hi - lo, width) cache or None).

    Raises:
        IndexError_: the file is unreadable, or its names, shapes, dtypes or values are not
            what ``expected`` promises (the message names the file, and the row for NaN/Inf).
    """
    path = directory / "corpus.safetensors"
    lo, hi = (0, expected.ntotal) if rows is None else rows
    try:
        with safe_open(str(path), framework="pt") as fh:
            cached = _check_corpus_header(path, fh, expected)
            whole = (lo, hi) == (0, expected.ntotal)

            def read(name: str) -> torch.Tensor:
                return fh.get_tensor(name) if whole else fh.get_slice(name)[lo:hi]

            corpus = read("projected")
            cache = read("doc_cache") if cached else None
    except (SafetensorError, OSError) as exc:
        raise IndexError_(f"{path}: unreadable ({exc})") from exc
    check_rows_finite(f"{path}: projected corpus", corpus, IndexError_, lo)
    if cache is not None:
        check_rows_finite(f"{path}: doc_cache", cache, IndexError_, lo)
    return corpus, cache


def _check_faiss_header(path: Path, expected: Expected) -> None:
    """Check the faiss file's header (type, dimension, ntotal, metric) before faiss reads it.

    faiss sizes its buffers from what the file claims: a file claiming another structure or
    size is refused here, before any allocation. A flat index's size is exact.
    """
    kind, d, n = expected.first_stage, expected.first_stage_dim, expected.ntotal
    with open(path, "rb") as fh:
        head = fh.read(_FAISS_HEADER.size + 8)
    if len(head) < _FAISS_HEADER.size:
        raise IndexError_(f"{path}: {len(head)} bytes, too short for a faiss index")
    fourcc, dim, ntotal, _, _, _, metric = _FAISS_HEADER.unpack_from(head)
    if fourcc != _FAISS_FOURCC[kind]:
        raise IndexError_(
            f"{path}: a faiss {fourcc!r} index, the manifest's first_stage={kind!r} is "
            f"{_FAISS_FOURCC[kind]!r} ({_FAISS_TYPES[kind]}, inner product)"
        )
    if (dim, ntotal, metric) != (d, n, first_stage.METRIC_INNER_PRODUCT):
        raise IndexError_(
            f"{path}: faiss index of dimension {dim}, {ntotal} vectors, metric {metric}; the "
            f"manifest promises dimension {d}, {n} vectors, inner product "
            f"({first_stage.METRIC_INNER_PRODUCT})"
        )
    if kind == "flat":
        want = _FAISS_HEADER.size + 8 + 4 * n * d
        size = path.stat().st_size
        (count,) = struct.unpack_from("<Q", head, _FAISS_HEADER.size)
        if size != want or count != n * d:
            raise IndexError_(
                f"{path}: {size} bytes holding {count} floats, a flat index of {n} x {d} is "
                f"{want} bytes holding {n * d}"
            )


def read_first_stage(directory: Path, expected: Expected, *, mmap: bool = False) -> Any:
    """The saved first stage (on the CPU), checked; memory-mapped with ``mmap`` (flat only).

    The header is checked first (:func:`_check_faiss_header`), then what was read: its kind,
    dimension, metric (inner product) and ``ntotal``. A flat stage is read without faiss
    (:func:`imrnns.index.first_stage.read`).

    Raises:
        IndexError_: the file is unreadable (faiss's own error, with the file named) or is
            not the first stage ``expected`` promises.
    """
    path = directory / "first_stage.faiss"
    _check_faiss_header(path, expected)
    try:
        # Flat: read here without faiss (memory-mapped with mmap); IVF/HNSW: faiss.read_index.
        saved = first_stage.read(path, mmap=mmap)
    except (RuntimeError, MemoryError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise IndexError_(f"{path}: unreadable faiss index ({first_line})") from exc
    kind = expected.first_stage
    got = (saved.kind, saved.d, saved.ntotal)
    want = (kind, expected.first_stage_dim, expected.ntotal)
    if got != want:
        raise IndexError_(
            f"{path}: a {got[0]} first stage of dimension {got[1]}, {got[2]} vectors; "
            f"expected {_FAISS_TYPES[kind]} of dimension {want[1]}, inner product, "
            f"{want[2]} vectors"
        )
    return saved


def read_doc_ids(directory: Path, n: int) -> list[str]:
    """The ``n`` unique document names in ``directory / "doc_ids.json"``, or IndexError_
    naming it."""
    path = directory / "doc_ids.json"
    try:
        names = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IndexError_(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(names, list) or not all(isinstance(d, str) for d in names):
        raise IndexError_(f"{path}: expected a JSON list of strings")
    if len(names) != n:
        raise IndexError_(f"{path}: {len(names)} ids for {n} documents")
    if len(set(names)) != n:
        seen: set[str] = set()
        repeated = sorted({d for d in names if d in seen or seen.add(d)})
        raise IndexError_(f"{path}: ids repeat ({', '.join(map(repr, repeated[:5]))})")
    return names


def read_ids(directory: Path, manifest: dict[str, Any]) -> tuple[Any, Any]:
    """(int ids (N,) int64 tensor or None, removed rows (R,) int64 tensor or None), checked.

    Reads ``ids.safetensors`` when the manifest lists it (else (None, None): default or
    string ids, nothing removed). Checks: the tensors the manifest's ``"ids"`` entry
    promises and no others, int64, ``ids`` of N unique values in ``[0, 2**63 - 1]``,
    ``removed`` R strictly increasing rows in ``[0, N)``.

    Raises:
        IndexError_: anything else; the message names the file.
    """
    entry = manifest.get("ids")
    if entry is None:
        return None, None
    n = int(manifest["ntotal"])
    path = directory / IDS_FILE
    want = ({"ids"} if entry["int"] else set()) | ({"removed"} if entry["removed"] else set())
    try:
        with safe_open(str(path), framework="pt") as fh:
            keys = set(fh.keys())
            if keys != want:
                raise IndexError_(
                    f"{path}: holds tensors {sorted(keys)}, the manifest promises {sorted(want)}"
                )
            shapes = {
                k: (tuple(fh.get_slice(k).get_shape()), fh.get_slice(k).get_dtype()) for k in keys
            }
            for key, rows in (("ids", n), ("removed", entry["removed"])):
                if key in keys and shapes[key] != ((rows,), "I64"):
                    raise IndexError_(
                        f"{path}: {key} is {shapes[key][1]} {shapes[key][0]}, expected int64 "
                        f"({rows},)"
                    )
            ids = fh.get_tensor("ids") if "ids" in keys else None
            removed = fh.get_tensor("removed") if "removed" in keys else None
    except (SafetensorError, OSError) as exc:
        raise IndexError_(f"{path}: unreadable ({exc})") from exc
    if ids is not None:
        if n and int(ids.min()) < 0:
            raise IndexError_(f"{path}: ids must be >= 0 (-1 pads results), got {int(ids.min())}")
        if int(torch.unique(ids).numel()) != n:
            raise IndexError_(f"{path}: ids repeat")
    if (
        removed is not None
        and removed.numel()
        and (
            int(removed[0]) < 0
            or int(removed[-1]) >= n
            or (removed.numel() > 1 and not bool((removed[1:] > removed[:-1]).all()))
        )
    ):
        raise IndexError_(f"{path}: removed must be increasing rows in [0, {n})")
    return ids, removed
