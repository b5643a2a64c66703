"""Atomic writes: nothing half-written is ever left where a reader looks.

Files go to a temporary name in the same folder and are renamed over the target
(``os.replace`` is atomic on POSIX). Directories are built under a temporary name and
swapped in; the previous directory is kept until the new one is in place, so a crash at any
point leaves either the old or the new content loadable.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary sibling of ``path`` for writing; rename it over ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``path`` as a whole.

    On any error the temporary directory is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a directory")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        for child in tmp.iterdir():
            if child.is_file():
                with open(child, "rb") as fh:
                    os.fsync(fh.fileno())
        fsync_dir(tmp)
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            old.rmdir()
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_directory(path: str | Path) -> Path:
    """The directory to read for ``path``, recovering from a swap interrupted mid-way.

    :func:`atomic_directory` moves the old directory aside for an instant before the new one
    takes its name; a process killed in that instant leaves ``path`` missing and the old
    content in ``.<name>.*.old``. Readers call this to find that content.
    """
    path = Path(path)
    if path.exists():
        return path
    # Exactly mkdtemp's names for this path (8 random characters): a bare glob would also
    # match a sibling's debris (".idx.v2.<random>.old" for "idx.v2" when reading "idx").
    own = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.old")
    olds = sorted(
        (p for p in path.parent.glob(f".{path.name}.*.old") if own.fullmatch(p.name)),
        key=lambda p: p.stat().st_mtime,
    )
    if olds:
        return olds[-1]
    raise FileNotFoundError(f"no such directory: {path}")
