"""Atomic writes: nothing half-written is ever left where a reader looks.

Files go to a temporary name in the same folder and are renamed over the target
(``os.replace`` is atomic on POSIX). Directories are built under a temporary name and
swapped in; the previous directory is kept until the new one is in place, so a crash at any
point leaves either the old or the new content loadable.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
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


def _umask() -> int:
    """The process umask, read without changing it where the kernel reports it."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)  # no /proc: the classic read-and-restore (not thread-safe)
    os.umask(mask)
    return mask


def _mkdir_mode() -> int:
    """What ``mkdir`` would give a new directory: 0o777 less the umask (mkdtemp gives 0o700)."""
    return 0o777 & ~_umask()


def _own_debris(path: Path) -> re.Pattern[str]:
    """Exactly the names :func:`atomic_file` / :func:`atomic_directory` use for ``path``.

    mkstemp/mkdtemp's 8 random characters: a bare glob would also match a sibling's debris
    (``.idx.v2.<random>.old`` for ``idx.v2`` when cleaning ``idx``).
    """
    return re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.(tmp|old)")


def _lock(fd: int) -> bool:
    """Take an exclusive advisory lock on ``fd`` without waiting; False if another holds it.

    Every temporary of a live save is locked by its writer for its whole life; the kernel
    drops the lock when the writer dies (SIGKILL included), so an unlocked temporary is
    debris. Where locks are unsupported (some network file systems) nothing is locked and
    the caller must not treat the file as stale: raises OSError then.
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def clean_debris(path: str | Path) -> list[Path]:
    """Remove temporaries that killed saves to ``path`` left behind; return what was removed.

    Only siblings named exactly as this module names ``path``'s temporaries
    (``.<name>.<8 random>.tmp`` / ``.old``), and only those no live process holds (see
    :func:`_lock`). An ``.old`` directory is the previous content while ``path`` itself is
    missing (a swap killed half-way, read by :func:`resolve_directory`): it is kept until
    ``path`` exists again. Called by every atomic save before it starts and after it ends.
    """
    path = Path(path)
    own = _own_debris(path)
    removed = []
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return removed
    for p in siblings:
        m = own.fullmatch(p.name)
        if m is None or (m.group(1) == "old" and not path.exists()):
            continue
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue  # gone already, or not ours to open
        try:
            if not _lock(fd):
                continue  # a live save owns it
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
        except OSError:
            continue  # no locks here: cannot tell stale from live, leave it
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary sibling of ``path`` for writing; rename it over ``path`` on success.

    The file gets the permissions a plain ``open`` would (0o666 less the umask; mkstemp's
    are 0o600), and stale temporaries of earlier killed writes to ``path`` are removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_debris(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with contextlib.suppress(OSError):
            _lock(fd)
        os.fchmod(fd, 0o666 & ~_umask())
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


def check_replaceable(path: str | Path, marker: str) -> None:
    """Raise ValueError unless ``path`` may be replaced as a whole by a save.

    A save swaps in a new directory and deletes the old one, so ``path`` must be missing, an
    empty directory, or a directory an earlier save wrote (it holds ``marker``). Anything
    else (a file, or a directory of unrelated files) would be lost: refuse it.
    """
    path = Path(path)
    if not path.exists():
        return
    if not path.is_dir():
        raise ValueError(f"{path} exists and is not a directory")
    if (path / marker).is_file():
        return
    with contextlib.suppress(StopIteration):
        next(path.iterdir())
        raise ValueError(
            f"{path} is a non-empty directory without {marker}: saving would replace it and "
            "delete its files; choose a new or empty directory"
        )


def read_format_json(
    path: Path, fmt: str, max_version: int, error: type[ValueError], kind: str
) -> dict[str, Any]:
    """The JSON object in ``path`` (an index manifest, a checkpoint config), its header checked.

    Raises ``error`` naming ``path`` unless it is valid JSON, an object whose ``format`` is
    ``fmt``, and whose ``format_version`` (default 0) is an int <= ``max_version``; ``kind``
    names the file in the messages ("manifest", "config").
    """
    try:
        payload = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        raise error(f"{path}: not an {fmt} {kind} (format key missing or different)")
    version = payload.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise error(f"{path}: format_version must be an int, got {version!r}")
    if version > max_version:
        raise error(
            f"{path}: format_version {version} is newer than this library reads "
            f"({max_version}); upgrade imrnns-kernels"
        )
    return payload


def new_temp_directory(path: str | Path) -> tuple[Path, int]:
    """Create the temporary sibling directory a save of ``path`` writes into.

    Returns (the directory, an fd holding its lock: keep it open until
    :func:`commit_directory` has run, then close it). Stale temporaries of killed saves to
    ``path`` are removed first. The directory has ``mkdir``'s permissions (umask applied).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a directory")
    clean_debris(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    fd = os.open(tmp, os.O_RDONLY)
    with contextlib.suppress(OSError):
        _lock(fd)
    os.chmod(tmp, _mkdir_mode())
    return tmp, fd


def commit_directory(tmp: Path, path: str | Path) -> None:
    """Swap the finished ``tmp`` in as ``path`` (fsync, move the old aside, rename, delete).

    The old directory is locked while it is aside, so a concurrent clean-up never mistakes
    it for debris; a crash at any point leaves ``path`` or its ``.old`` loadable.
    """
    path = Path(path)
    for child in tmp.iterdir():
        if child.is_file():
            with open(child, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(tmp)
    old, old_fd = None, None
    try:
        if path.exists():
            old_fd = os.open(path, os.O_RDONLY)
            with contextlib.suppress(OSError):
                _lock(old_fd)
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            old.rmdir()
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if old_fd is not None:
            os.close(old_fd)
    clean_debris(path)


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``path`` as a whole.

    On any error the temporary directory is removed and ``path`` is left untouched. New
    directories get ``mkdir``'s permissions (umask applied), and stale temporaries of
    earlier killed saves to ``path`` are removed (:func:`clean_debris`).
    """
    tmp, fd = new_temp_directory(path)
    try:
        yield tmp
        commit_directory(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(fd)


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
