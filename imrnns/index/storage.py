"""Index directories on disk: the files, the SHA-256 manifest, and checked reads.

A saved index is one directory, written atomically (:func:`imrnns._atomic.atomic_directory`):

- ``manifest.json``: ``format``/``format_version``, ``ntotal``, the index settings
  (:meth:`imrnns.index.IMRNNIndex.settings`) and, for every other file, its size and SHA-256;
- ``adapter/``: the model (:func:`imrnns.checkpoints.save_pretrained`);
- ``corpus.safetensors``: ``projected`` (N, m) in the storage dtype and, when the index keeps
  it, ``doc_cache`` (N, width);
- ``first_stage.faiss``: the faiss index (written from a CPU copy);
- ``doc_ids.json``: the N document names, only when the documents are named.

Every read checks what it reads against the manifest, so a truncated or tampered index fails
to load loudly (:class:`IndexError_`, a ValueError). Tested through tests/test_index.py,
tests/test_bad_input.py, tests/test_faults.py and tests/test_distributed_save.py.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from imrnns._atomic import atomic_directory, check_replaceable, read_format_json
from imrnns.checkpoints import save_pretrained
from imrnns.index.first_stage import to_cpu

if TYPE_CHECKING:
    from imrnns.model import IMRNN

FORMAT = "imrnns-index"
FORMAT_VERSION = 1
# Files every index directory holds (doc_ids.json only when the documents are named).
REQUIRED_FILES = (
    "adapter/config.json",
    "adapter/model.safetensors",
    "corpus.safetensors",
    "first_stage.faiss",
)


class IndexError_(ValueError):
    """An index directory is missing, truncated, tampered with, or inconsistent."""


def sha256_file(path: Path) -> str:
    """The hex SHA-256 of a file's bytes (read in 4 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_index(
    directory: Path,
    model: IMRNN,
    projected: torch.Tensor,
    document_cache: torch.Tensor | None,
    first_stage_index: Any,
    doc_ids: list[str] | None,
    settings: dict[str, Any],
) -> None:
    """Write an index directory atomically (the layout in the module docstring).

    Args:
        directory: new, empty, or an index saved before (replaced as a whole); a failure at
            any point leaves its previous content intact.
        model: the adapter.
        projected: (N, m) projected corpus, any device.
        document_cache: (N, width) per-document cache, or None.
        first_stage_index: the faiss index over the N documents (CPU or GPU).
        doc_ids: N names, or None.
        settings: the index's constructor settings, recorded in the manifest.

    Raises:
        ValueError: ``directory`` holds other files than an index.
    """
    check_replaceable(directory, "manifest.json")
    with atomic_directory(directory) as tmp:
        save_pretrained(model, tmp / "adapter")
        tensors = {"projected": projected.detach().cpu().contiguous()}
        if document_cache is not None:
            tensors["doc_cache"] = document_cache.detach().cpu().contiguous()
        save_file(tensors, str(tmp / "corpus.safetensors"))
        faiss.write_index(to_cpu(first_stage_index), str(tmp / "first_stage.faiss"))
        if doc_ids is not None:
            (tmp / "doc_ids.json").write_text(json.dumps(doc_ids))
        files = {}
        for path in sorted(tmp.rglob("*")):
            if path.is_file():
                rel = path.relative_to(tmp).as_posix()
                files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "ntotal": int(projected.shape[0]),
            "index": settings,
            "files": files,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def read_manifest(directory: Path, verify: bool = True) -> dict[str, Any]:
    """The manifest of an index directory, checked, with every file it lists checked.

    Raises:
        FileNotFoundError: no manifest, or a file it lists is missing.
        IndexError_: (a ValueError) the manifest is malformed (the message names it), or a
            file's size (and, with ``verify``, SHA-256) differs from the manifest's.
    """
    manifest_path = directory / "manifest.json"
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
        and isinstance(meta.get("sha256"), str)
        for meta in files.values()
    ):
        raise IndexError_(f"{manifest_path}: 'files' must map names to their bytes and sha256")
    missing = [rel for rel in REQUIRED_FILES if rel not in files]
    if missing:
        raise IndexError_(f"{manifest_path}: does not list the index files {missing}")
    for rel, meta in files.items():
        path = directory / rel
        if not path.is_file():
            raise FileNotFoundError(f"index file missing: {path}")
        if path.stat().st_size != meta["bytes"]:
            raise IndexError_(
                f"{path}: {path.stat().st_size} bytes, the manifest says {meta['bytes']}: "
                "the file is truncated or was modified"
            )
        if verify and sha256_file(path) != meta["sha256"]:
            raise IndexError_(f"{path}: SHA-256 differs from the manifest: the file was modified")
    return manifest


def read_corpus(
    directory: Path, n: int, working_dim: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(projected (n, m) corpus, document cache or None) of an index directory, on the CPU.

    Raises:
        IndexError_: the file is unreadable or the corpus is not (n, working_dim).
    """
    path = directory / "corpus.safetensors"
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise IndexError_(f"{path}: unreadable ({exc})") from exc
    corpus = tensors.get("projected")
    if corpus is None or tuple(corpus.shape) != (n, working_dim):
        raise IndexError_(
            f"{path}: projected corpus shape "
            f"{None if corpus is None else tuple(corpus.shape)} does not match the manifest "
            f"({n}, {working_dim})"
        )
    return corpus, tensors.get("doc_cache")


def read_corpus_rows(
    directory: Path, lo: int, hi: int, working_dim: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows ``[lo, hi)`` of :func:`read_corpus`, read by slice (the other rows are never held).

    Raises:
        IndexError_: the file is unreadable or the slice is not (hi - lo, working_dim).
    """
    path = directory / "corpus.safetensors"
    try:
        with safe_open(str(path), framework="pt") as fh:
            keys = set(fh.keys())
            corpus = fh.get_slice("projected")[lo:hi]
            cache = fh.get_slice("doc_cache")[lo:hi] if "doc_cache" in keys else None
    except (SafetensorError, OSError, ValueError) as exc:
        raise IndexError_(f"{path}: unreadable ({exc})") from exc
    if tuple(corpus.shape) != (hi - lo, working_dim):
        raise IndexError_(
            f"{path}: projected slice {tuple(corpus.shape)}, expected ({hi - lo}, {working_dim})"
        )
    return corpus, cache


def read_first_stage(directory: Path, n: int, *, mmap: bool = False) -> Any:
    """The saved faiss index (on the CPU), memory-mapped with ``mmap`` (flat indexes only).

    Raises:
        IndexError_: it does not hold ``n`` vectors.
    """
    flags = faiss.IO_FLAG_MMAP if mmap else 0
    saved = faiss.read_index(str(directory / "first_stage.faiss"), flags)
    if saved.ntotal != n:
        raise IndexError_(f"{directory}: first stage holds {saved.ntotal} rows, corpus {n}")
    return saved


def read_doc_ids(directory: Path, n: int) -> list[str]:
    """The ``n`` document names in ``directory / "doc_ids.json"``, or IndexError_ naming it."""
    path = directory / "doc_ids.json"
    try:
        names = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IndexError_(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(names, list) or not all(isinstance(d, str) for d in names):
        raise IndexError_(f"{path}: expected a JSON list of strings")
    if len(names) != n:
        raise IndexError_(f"{path}: {len(names)} ids for {n} documents")
    return names
