"""Atomic writes: nothing half-written is ever left where a reader looks.

Files go to a temporary name in the same folder and are renamed over the target
(``os.replace`` is atomic on POSIX). Directories are built under a temporary name and
swapped in; the previous directory is kept until the new one is in place, so a crash at any
point leaves either the old or the new content loadable.

Three rules keep this safe around other people's files and other processes:

- A save replaces an existing directory only if it is one of ours: :class:`SaveLayout`
  describes what each of our formats writes, and :func:`check_replaceable` recognises it by
  content (its header JSON carries our ``format``, and it holds no file the format does not
  write). Anything else (a Hugging Face model folder, a web folder) is refused and left
  untouched.
- Debris of killed saves is removed only when it is named exactly as our temporaries, is a
  regular file or a directory (never followed through a link, never a FIFO, socket or
  device, which could block or be someone else's), and no live process holds its lock.
- Readers (:func:`read_directory`) pin the directory they read and start again if a
  concurrent save swapped it while they read, so a load sees one complete version.
- Swaps are ordered by one advisory lock on the target's parent directory
  (:func:`_swap_lock`): a commit holds it exclusively for its check-and-swap (two renames,
  never the writing or the deletion of the old version), and the replace check and the
  resolution of a path to a directory hold it shared. So a check never scans a directory
  another save is moving aside, and a reader never finds the target missing mid-swap. The
  lock lives on a directory that exists anyway: no lock file is created beside the user's.

Locks are ``fcntl.flock`` advisory locks (POSIX). Where ``fcntl`` does not exist (Windows),
or the file system refuses locks, nothing is locked: commits and reads then fall back on
their bounded retry loops (a concurrent save or load can fail with a clear OSError), and
since a live temporary cannot then be told from a stale one, debris
is never removed automatically: stale ``.<name>.<8 characters>.tmp`` / ``.old`` siblings can
be deleted by hand when no save runs. Everything else (atomic saves, the replace check,
recovery of an interrupted swap, consistent reads) works the same.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

try:
    import fcntl
except ImportError:  # Windows: no advisory locks (see the module docstring)
    fcntl = None  # type: ignore[assignment]

T = TypeVar("T")

# Bounds of the retry loops: a commit racing other saves of the same target, a read racing
# saves that swap the directory it reads.
COMMIT_ATTEMPTS = 64
READ_ATTEMPTS = 50
# How long a save or a read waits for the swap lock (held for two renames at a time) before
# giving up with an OSError: a stopped process holding it must not hang every other one.
LOCK_WAIT_SECONDS = 30.0
# A header JSON larger than this is not one of ours (ours are a few kB): never read it whole.
MAX_HEADER_BYTES = 1 << 24
# How many foreign entries a refusal lists (and how many are looked for: a refused directory
# may be huge, e.g. a home folder).
MAX_FOREIGN_LISTED = 10


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


# The name of any save's temporary directory (see :func:`_own_debris`).
_TEMPORARY = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


@contextlib.contextmanager
def _swap_lock(path: Path, exclusive: bool) -> Iterator[None]:
    """Hold the lock that orders swaps of ``path`` (a flock on its parent directory).

    Exclusive for a commit's check-and-swap, shared for anything that must not see ``path``
    half-swapped (the replace check, resolving ``path`` for a read). Waits at most
    :data:`LOCK_WAIT_SECONDS`, polling (a blocking flock could wait forever on a stopped
    process). Where locks do not exist (Windows) or the parent cannot be opened or locked
    (some network file systems), nothing is held and the callers' retry loops apply; nor
    inside a save's own temporary directory, which only that save writes.

    Raises:
        OSError: (EBUSY) another process held the lock for :data:`LOCK_WAIT_SECONDS`.
    """
    fd = None
    # Inside a save's own temporary (an index writing its adapter) nothing else writes, and
    # that temporary is flock-ed by its writer already (the debris lock): no swap lock there.
    if fcntl is not None and not _TEMPORARY.fullmatch(path.parent.name):
        with contextlib.suppress(OSError):
            fd = os.open(path.parent, os.O_RDONLY)
    try:
        if fd is not None:
            operation = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
            deadline = time.monotonic() + LOCK_WAIT_SECONDS
            delay = 0.0002
            while True:
                try:
                    fcntl.flock(fd, operation)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise OSError(
                            errno.EBUSY,
                            f"{path}: another process held the save lock of {path.parent} for "
                            f"{LOCK_WAIT_SECONDS:.0f} s; nothing was changed, try again",
                        ) from None
                    time.sleep(delay)
                    delay = min(2 * delay, 0.02)
                except OSError:
                    break  # this file system has no locks: the retry loops cover it
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


# --------------------------------------------------------------------------- our formats
@dataclass(frozen=True)
class SaveLayout:
    """What one of our directory formats writes, to recognise an earlier save by content.

    Attributes:
        kind: what the format is called in messages ("adapter checkpoint", "index", ...).
        header: relative path of the JSON file whose ``format`` names the format.
        format: that ``format`` value.
        max_version: the newest ``format_version`` this library writes.
        files: every file a save may write (relative POSIX paths, the header included);
            the directories are their parents.
    """

    kind: str
    header: str
    format: str
    max_version: int
    files: frozenset[str]

    def __post_init__(self) -> None:
        if self.header not in self.files:
            raise ValueError(f"layout {self.kind!r}: its header {self.header} is not a file")
        _LAYOUTS.setdefault(self.header, self)

    @property
    def directories(self) -> frozenset[str]:
        """Every directory a save writes, relative POSIX paths ("adapter", ...)."""
        out = set()
        for rel in self.files:
            parts = rel.split("/")[:-1]
            out.update("/".join(parts[: i + 1]) for i in range(len(parts)))
        return frozenset(out)

    def nested(self, prefix: str) -> frozenset[str]:
        """This layout's files as they appear inside another save, under ``prefix/``."""
        return frozenset(f"{prefix}/{rel}" for rel in self.files)


# The layouts by header name: lets older callers name a layout by its header file.
_LAYOUTS: dict[str, SaveLayout] = {}


def _entry_kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    return "symlink" if stat.S_ISLNK(mode) else "special file"


def _foreign_entries(path: Path, layout: SaveLayout) -> tuple[list[str], bool]:
    """(entries under ``path`` that ``layout`` never writes, whether ``path`` is empty).

    Walks only the directories the layout writes, never follows links, and stops after
    :data:`MAX_FOREIGN_LISTED` foreign entries (each listed as ``name`` or ``name/``, with
    what it is when it is neither a file nor a directory).
    """
    foreign: list[str] = []
    empty = True
    todo = [""]
    while todo and len(foreign) < MAX_FOREIGN_LISTED:
        rel_dir = todo.pop()
        with os.scandir(path / rel_dir if rel_dir else path) as it:
            for entry in it:
                empty = False
                rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                try:
                    kind = _entry_kind(entry.stat(follow_symlinks=False).st_mode)
                except OSError:
                    kind = "unreadable entry"
                if kind == "file" and rel in layout.files:
                    continue
                if kind == "dir" and rel in layout.directories:
                    todo.append(rel)
                    continue
                suffix = "/" if kind == "dir" else "" if kind == "file" else f" ({kind})"
                foreign.append(rel + suffix)
                if len(foreign) >= MAX_FOREIGN_LISTED:
                    break
    return sorted(foreign), empty


def _header_problem(path: Path, layout: SaveLayout) -> str | None:
    """Why ``path / layout.header`` is not our header (None when it is)."""
    header = path / layout.header
    try:
        st = os.lstat(header)
    except FileNotFoundError:
        return f"it has no {layout.header}"
    except OSError as exc:
        return f"cannot read {layout.header} ({exc.strerror})"
    if not stat.S_ISREG(st.st_mode):
        return f"its {layout.header} is a {_entry_kind(st.st_mode)}"
    if st.st_size > MAX_HEADER_BYTES:
        return f"its {layout.header} is {st.st_size} bytes, not an {layout.format} header"
    try:
        read_format_json(header, layout.format, layout.max_version, ValueError, "file")
    except (ValueError, OSError) as exc:
        return f"its {layout.header} is not ours ({str(exc).removeprefix(str(header) + ': ')})"
    return None


def check_replaceable(path: str | Path, layout: SaveLayout | str) -> None:
    """Raise ValueError unless a save of ``layout`` may replace ``path`` as a whole.

    A save swaps in a new directory and deletes the old one, so ``path`` must be missing, an
    empty directory, or an earlier save of the same format, recognised by content: its
    header JSON (``layout.header``) parses and carries ``layout.format`` (at a
    ``format_version`` this library reads), and it holds no file or directory the format
    does not write (no links, FIFOs or devices either). A subset of the format's files (an
    earlier save damaged by hand) is replaceable: it holds nothing we did not write.
    Anything else (a file, a link, a Hugging Face model folder whose ``config.json`` is not
    ours, a web folder with a ``manifest.json`` and an ``index.html``) is refused, naming
    the directory and what would be lost, and nothing is touched.

    Args:
        path: the directory a save will replace.
        layout: the format about to be written, or (older callers) its header's file name,
            e.g. ``"manifest.json"`` for an index.

    Raises:
        ValueError: ``path`` may not be replaced (the message says why).
    """
    if isinstance(layout, str):
        if layout not in _LAYOUTS:
            raise TypeError(f"unknown save layout {layout!r}; known: {sorted(_LAYOUTS)}")
        layout = _LAYOUTS[layout]
    path = Path(path)
    with _swap_lock(path, exclusive=False):  # no commit moves ``path`` while it is scanned
        _check_replaceable(path, layout)


def _check_replaceable(path: Path, layout: SaveLayout) -> None:
    """:func:`check_replaceable` for a caller that holds the swap lock."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise ValueError(
            f"{path} is a symbolic link: a save would replace the link, not what it points "
            f"to; save to {os.path.realpath(path)} instead"
        )
    if not stat.S_ISDIR(st.st_mode):
        raise ValueError(f"{path} exists and is not a directory ({_entry_kind(st.st_mode)})")
    foreign, empty = _foreign_entries(path, layout)
    if empty:
        return
    header = _header_problem(path, layout)
    if header is None and not foreign:
        return
    reasons = [] if header is None else [header]
    if foreign:
        more = " (and maybe more)" if len(foreign) >= MAX_FOREIGN_LISTED else ""
        reasons.append(
            f"it holds what an {layout.kind} save never writes: {', '.join(foreign)}{more}"
        )
    raise ValueError(
        f"{path} is not an earlier {layout.kind} save ({'; '.join(reasons)}): saving would "
        "replace the directory and delete its files, so nothing was written; choose a new "
        "or empty directory"
    )


def read_format_json(
    path: Path, fmt: str, max_version: int, error: type[ValueError], kind: str
) -> dict[str, Any]:
    """The JSON object in ``path`` (an index manifest, a checkpoint config), its header checked.

    Raises ``error`` naming ``path`` unless it is at most :data:`MAX_HEADER_BYTES` of valid
    JSON, an object whose ``format`` is ``fmt``, and whose ``format_version`` (default 0)
    is an int <= ``max_version``; ``kind`` names the file in the messages ("manifest",
    "config").
    """
    size = path.stat().st_size
    if size > MAX_HEADER_BYTES:
        raise error(f"{path}: {size} bytes, more than an {fmt} {kind} ever holds")
    try:
        payload = json.loads(path.read_bytes())
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


# --------------------------------------------------------------------------- locks, debris
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
    debris. Where locks are unsupported (some network file systems, Windows) nothing is
    locked and the caller must not treat the file as stale: raises OSError then.
    """
    if fcntl is None:
        raise OSError(errno.ENOTSUP, "advisory locks are not available on this platform")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _hold(path: Path) -> tuple[int | None, bool]:
    """(an fd of ``path`` (a directory we write) or None without locks, whether it is locked).

    Not locked: another process holds the lock (a cleaner about to remove ``path``, or the
    save that wrote it), or the file system has no locks. Without ``fcntl`` nothing is
    opened: Windows cannot open a directory as a file.
    """
    if fcntl is None:
        return None, False
    fd = os.open(path, os.O_RDONLY)
    try:
        return fd, _lock(fd)
    except OSError:
        return fd, True  # no locks on this file system: nobody can take it either


def _new_temporary(path: Path, make: Callable[[], tuple[int | None, str]]) -> tuple[int, str]:
    """``make()`` a locked temporary for ``path``: (fd, or -1 without locks; name).

    Between creating a temporary and locking it, another save's :func:`clean_debris` can
    take its lock and remove it as debris: then our lock fails, or succeeds only after the
    name is gone (the name no longer names our fd), and we make another one.
    """
    for _ in range(COMMIT_ATTEMPTS):
        fd, name = make()
        if fd is None:  # a directory: open it to lock it
            try:
                fd, locked = _hold(Path(name))
            except FileNotFoundError:
                continue  # removed by a cleaner already
            if fd is None:
                return -1, name  # no locks on this platform
        else:
            try:
                locked = _lock(fd)
            except OSError:
                locked = True  # no locks on this file system
        if locked and _names(name, fd):
            return fd, name
        os.close(fd)
    raise OSError(errno.EBUSY, f"{path}: could not lock a temporary ({COMMIT_ATTEMPTS} tries)")


def _names(name: str, fd: int) -> bool:
    """Whether ``name`` still names the file or directory open as ``fd``."""
    try:
        st = os.lstat(name)
    except OSError:
        return False
    ours = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (ours.st_dev, ours.st_ino)


def _open_debris(p: Path) -> tuple[int, bool] | None:
    """(fd, is a directory) of a debris candidate, or None when it is not ours to touch.

    Only a regular file or a real directory qualifies, checked with ``lstat`` before it is
    opened (a FIFO would block ``open`` for reading until a writer appears; a device or a
    link may be anyone's) and with ``fstat`` after (the name could have been replaced in
    between: the open never blocks or follows a link, and the two must be the same object).
    """
    try:
        before = os.lstat(p)
    except OSError:
        return None
    if not (stat.S_ISREG(before.st_mode) or stat.S_ISDIR(before.st_mode)):
        return None
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(p, flags)
    except OSError:
        return None  # gone already, or not ours to open
    after = os.fstat(fd)
    if (after.st_dev, after.st_ino, stat.S_IFMT(after.st_mode)) != (
        before.st_dev,
        before.st_ino,
        stat.S_IFMT(before.st_mode),
    ):
        os.close(fd)
        return None
    return fd, stat.S_ISDIR(after.st_mode)


def clean_debris(path: str | Path) -> list[Path]:
    """Remove temporaries that killed saves to ``path`` left behind; return what was removed.

    Only siblings named exactly as this module names ``path``'s temporaries
    (``.<name>.<8 random>.tmp`` / ``.old``), only regular files and real directories (see
    :func:`_open_debris`), and only those no live process holds (see :func:`_lock`). An
    ``.old`` directory is the previous content while ``path`` itself is missing (a swap
    killed half-way, read by :func:`resolve_directory`): it is kept until ``path`` exists
    again. Called by every atomic save before it starts and after it ends. Without advisory
    locks (Windows) nothing is removed.
    """
    path = Path(path)
    removed: list[Path] = []
    if fcntl is None:
        return removed
    own = _own_debris(path)
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return removed
    for p in siblings:
        m = own.fullmatch(p.name)
        if m is None or (m.group(1) == "old" and not os.path.lexists(path)):
            continue
        opened = _open_debris(p)
        if opened is None:
            continue
        fd, is_dir = opened
        try:
            if not _lock(fd):
                continue  # a live save owns it
            if is_dir:
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
        except OSError:
            continue  # no locks here: cannot tell stale from live, leave it
        finally:
            os.close(fd)
    return removed


# --------------------------------------------------------------------------- writing
@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary sibling of ``path`` for writing; rename it over ``path`` on success.

    The file gets the permissions a plain ``open`` would (0o666 less the umask; mkstemp's
    are 0o600), and stale temporaries of earlier killed writes to ``path`` are removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_debris(path)
    fd, tmp = _new_temporary(
        path, lambda: tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    )
    try:
        mode_bits = 0o666 & ~_umask()
        if hasattr(os, "fchmod"):
            os.fchmod(fd, mode_bits)
        else:  # Windows before Python 3.13
            os.chmod(tmp, mode_bits)
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


def new_temp_directory(path: str | Path) -> tuple[Path, int | None]:
    """Create the temporary sibling directory a save of ``path`` writes into.

    Returns (the directory, an fd holding its lock, or None where there are no locks: close
    it after :func:`commit_directory` has run). Stale temporaries of killed saves to
    ``path`` are removed first. The directory has ``mkdir``'s permissions (umask applied).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(path) and not path.is_dir():
        raise ValueError(f"{path} exists and is not a directory")
    clean_debris(path)

    def make() -> tuple[None, str]:
        return None, tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)

    fd, name = _new_temporary(path, make)
    tmp = Path(name)
    os.chmod(tmp, _mkdir_mode())
    return tmp, None if fd < 0 else fd


def _aside_name(path: Path) -> Path:
    """A fresh ``.<name>.<8 random>.old`` sibling name, free when returned, not created.

    Not reserved with mkdtemp: an empty directory under a debris name is what another
    save's :func:`clean_debris` removes, so reserving it would race with that save.
    """
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789_"  # mkdtemp's, so _own_debris matches
    while True:
        token = "".join(random.choices(alphabet, k=8))  # a name, not a secret
        old = path.parent / f".{path.name}.{token}.old"
        if not os.path.lexists(old):
            return old


def commit_directory(tmp: Path, path: str | Path, layout: SaveLayout | None = None) -> None:
    """Swap the finished ``tmp`` in as ``path`` (fsync, move the old aside, rename, delete).

    The old directory is locked while it is aside, so a concurrent clean-up never mistakes
    it for debris; a crash at any point leaves ``path`` or its ``.old`` loadable. With
    ``layout``, what is about to be moved aside is checked again (:func:`check_replaceable`)
    right before the move: another process may have put something there since the save
    began. Concurrent saves of the same ``path`` each swap in turn (a save that finds the
    name taken again moves that directory aside too and retries): the last one wins, every
    one of them succeeds, and each removes its own temporaries.

    Raises:
        ValueError: ``path`` became something a save of ``layout`` may not replace.
        OSError: the swap failed (``path`` keeps its previous content), or other saves kept
            taking the name for :data:`COMMIT_ATTEMPTS` tries.
    """
    path = Path(path)
    for child in tmp.iterdir():
        if child.is_file():
            with open(child, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(tmp)
    for _ in range(COMMIT_ATTEMPTS):
        aside: list[tuple[Path, int | None]] = []
        try:
            with _swap_lock(path, exclusive=True):
                done = _swap_once(tmp, path, layout, aside)
        finally:
            # The previous version is deleted after the lock is released: deleting a large
            # index takes long, and nobody reads it any more (it is no longer ``path``).
            for old, old_fd in aside:
                shutil.rmtree(old, ignore_errors=True)
                if old_fd is not None:
                    os.close(old_fd)
        if done:
            break
    else:
        raise OSError(
            errno.EBUSY,
            f"{path}: other saves kept replacing it ({COMMIT_ATTEMPTS} tries); nothing of this "
            "save was committed",
        )
    clean_debris(path)


def _swap_once(
    tmp: Path, path: Path, layout: SaveLayout | None, aside: list[tuple[Path, int | None]]
) -> bool:
    """Check ``path`` and swap ``tmp`` in; True when done, False to try again.

    Called under the exclusive swap lock, so no other save of ours moves ``path`` meanwhile
    (the retries serve file systems without locks). What is moved aside goes to ``aside``
    as (its name, an fd locking it or None) for the caller to delete after the lock.
    """
    if os.path.lexists(path):
        if layout is not None:
            _check_replaceable(path, layout)
        try:
            # Locked while aside (unless its writer still holds it: then that lock protects
            # it), so no cleaner takes it for debris.
            old_fd, _ = _hold(path)
        except FileNotFoundError:
            return False  # another save moved it aside first
        old = _aside_name(path)
        try:
            os.replace(path, old)
        except FileNotFoundError:
            if old_fd is not None:
                os.close(old_fd)
            return False  # another save moved it aside first
        aside.append((old, old_fd))
    try:
        os.replace(tmp, path)
    except OSError:
        if os.path.lexists(path):
            return False  # another save put its directory there: ours replaces it
        if aside:  # a real failure: put the previous content back
            with contextlib.suppress(OSError):
                os.replace(aside[-1][0], path)
                old_fd = aside.pop()[1]
                if old_fd is not None:
                    os.close(old_fd)
        raise
    fsync_dir(path.parent)
    return True


@contextlib.contextmanager
def atomic_directory(path: str | Path, layout: SaveLayout | None = None) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``path`` as a whole.

    With ``layout``, ``path`` must be replaceable by a save of that format
    (:func:`check_replaceable`), checked before anything is written and again right before
    the swap. On any error the temporary directory is removed and ``path`` is left
    untouched. New directories get ``mkdir``'s permissions (umask applied), and stale
    temporaries of earlier killed saves to ``path`` are removed (:func:`clean_debris`).
    """
    if layout is not None:
        check_replaceable(path, layout)
    tmp, fd = new_temp_directory(path)
    try:
        yield tmp
        commit_directory(tmp, path, layout)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if fd is not None:
            os.close(fd)


# --------------------------------------------------------------------------- reading
def resolve_directory(path: str | Path) -> Path:
    """The directory to read for ``path``, recovering from a swap interrupted mid-way.

    :func:`atomic_directory` moves the old directory aside for an instant before the new one
    takes its name; a process killed in that instant leaves ``path`` missing and the old
    content in ``.<name>.*.old``. Readers call this to find that content (a real directory
    of exactly that name: never a link, FIFO or another path's debris).
    """
    path = Path(path)
    with _swap_lock(path, exclusive=False):  # never between a commit's two renames
        return _resolve_directory(path)


def _resolve_directory(path: Path) -> Path:
    """:func:`resolve_directory` for a caller that holds the swap lock."""
    if path.exists():
        return path
    # Exactly our names for this path's debris (_own_debris): a bare glob would also match a
    # sibling's (".idx.v2.<random>.old" for "idx.v2" when reading "idx").
    own = _own_debris(path)
    olds = []
    for p in path.parent.glob(f".{path.name}.*.old"):
        m = own.fullmatch(p.name)
        if m is None or m.group(1) != "old":
            continue
        with contextlib.suppress(OSError):
            st = os.lstat(p)
            if stat.S_ISDIR(st.st_mode):
                olds.append((st.st_mtime, p))
    if olds:
        return max(olds)[1]
    if path.exists():  # a save swapped it in (and removed its .old) while we looked
        return path
    raise FileNotFoundError(f"no such directory: {path}")


def _pin(directory: Path) -> tuple[int | None, tuple[int, ...]]:
    """(an fd keeping ``directory`` allocated, or None; its identity).

    While the fd is open the directory's inode cannot be freed and reused by a new save, so
    (device, inode) names this very directory. Without fds on directories (Windows, or a
    directory we may traverse but not list) the identity adds the change and modification
    times.
    """
    if fcntl is not None:
        try:
            fd = os.open(directory, os.O_RDONLY)
        except PermissionError:
            fd = None
        if fd is not None:
            st = os.fstat(fd)
            return fd, (st.st_dev, st.st_ino)
    st = os.stat(directory)
    return None, (st.st_dev, st.st_ino, st.st_ctime_ns, st.st_mtime_ns)


def _identity_now(path: Path, pinned: bool) -> tuple[int, ...] | None:
    """The identity of what ``path`` resolves to now (None: nothing, or unreadable)."""
    try:
        st = os.stat(resolve_directory(path))
    except OSError:
        return None
    if pinned:
        return st.st_dev, st.st_ino
    return st.st_dev, st.st_ino, st.st_ctime_ns, st.st_mtime_ns


def read_directory(path: str | Path, read: Callable[[Path], T]) -> T:
    """``read(directory)`` on one complete version of the saved directory ``path``.

    ``path`` is resolved (:func:`resolve_directory`) and pinned, then read; if ``path``
    names another directory afterwards (a concurrent save swapped a new version in while
    ``read`` ran, so it may have seen files of two versions), the result (or the error) is
    dropped and the read starts again, up to :data:`READ_ATTEMPTS` times with a short random
    wait. An error raised while ``path`` did not change is the reader's own and propagates.

    Raises:
        FileNotFoundError: nothing is saved at ``path``.
        OSError: saves kept swapping ``path`` during every attempt.
        whatever ``read`` raises for a directory that stayed in place.
    """
    path = Path(path)
    for attempt in range(READ_ATTEMPTS):
        with _swap_lock(path, exclusive=False):
            directory = _resolve_directory(path)
            try:
                fd, identity = _pin(directory)
            except FileNotFoundError:
                continue  # swapped between resolving and pinning (only without locks)
        try:
            try:
                result = read(directory)
            except Exception:
                if _identity_now(path, fd is not None) == identity:
                    raise
            else:
                if _identity_now(path, fd is not None) == identity:
                    return result
        finally:
            if fd is not None:
                os.close(fd)
        time.sleep(random.uniform(0.0, 0.002 * (attempt + 1)))  # jitter, not security
    raise OSError(
        errno.EAGAIN,
        f"{path}: other saves replaced it while it was read, {READ_ATTEMPTS} times; try again",
    )
