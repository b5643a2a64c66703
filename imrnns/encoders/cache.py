"""The content-keyed embedding cache: one ``.npy`` per (encoder fingerprint, role, texts).

Entries are written whole or not at all: a temporary file in the cache folder, fsync'd,
renamed over the entry, then the folder fsync'd so that the rename survives a power cut.
A write killed half-way (SIGKILL, out of memory, a full disk) leaves its temporary behind;
for a corpus that is gigabytes, so every :class:`EmbeddingCache` removes the temporaries
of dead writers when it is opened. It recognises them by name only (the pattern below,
which nothing else produces) and never touches any other file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import stat
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from imrnns._atomic import fsync_dir

__all__ = ["TEMP_MAX_AGE_S", "EmbeddingCache", "default_cache_dir", "user_cache_root"]

# A live writer streams bytes into its temporary (np.save writes as it goes) and renames
# it right after the last one, so a temporary untouched for this long has no live writer.
TEMP_MAX_AGE_S = 60.0

# Temporaries: ".imrnns-emb.<pid>.<host tag>.<mkstemp's 8 random chars>.tmp". The pid and
# host say who wrote it: a pid that no longer runs on this host means a dead writer. The
# legacy form ".<16 hex of the key>.<8 random>.tmp" (versions before the pid was recorded)
# is recognised too, by age only.
_TEMP_PREFIX = ".imrnns-emb."
_TEMP = re.compile(r"\.imrnns-emb\.(\d{1,10})\.([0-9a-f]{8})\.[a-z0-9_]{8}\.tmp")
_LEGACY_TEMP = re.compile(r"\.[0-9a-f]{16}\.[a-z0-9_]{8}\.tmp")
# Keys name files: letters, digits, '_' and '-' only, so no key can leave the folder.
_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")


def _current_umask() -> int:
    # os.umask can only be read by setting it; done once at import, before any threads.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def _host_tag() -> str:
    """8 hex characters naming this host (a pid means nothing on another machine)."""
    return hashlib.sha256(socket.gethostname().encode("utf-8", "surrogatepass")).hexdigest()[:8]


def user_cache_root() -> Path:
    """``$XDG_CACHE_HOME/imrnns`` (default ``~/.cache/imrnns``): embeddings and models."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "imrnns"


def default_cache_dir() -> Path:
    """``$IMRNNS_CACHE`` if set, else ``$XDG_CACHE_HOME/imrnns/embeddings`` (``~/.cache``)."""
    env = os.environ.get("IMRNNS_CACHE")
    if env:
        return Path(env).expanduser()
    return user_cache_root() / "embeddings"


def _pid_is_dead(pid: int) -> bool:
    """True only when ``pid`` certainly runs no process on this host."""
    if os.name == "nt":
        # os.kill on Windows terminates the process whatever the signal: never probe there
        # (temporaries are then cleaned by age only).
        return False
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError, OSError):
        return False  # alive under another user, or not a pid we can ask about
    return False


class EmbeddingCache:
    """Embeddings on disk, one ``.npy`` per (encoder fingerprint, role, list of texts).

    The key covers the exact list of texts (order included), so a hit returns exactly
    the array an encode would have produced and a second run re-encodes nothing. Writes
    go to a temporary file in the same folder, are fsync'd and renamed into place with
    ``os.replace`` (atomic on POSIX and Windows), and the folder is fsync'd: a crash or a
    concurrent writer never leaves a half-written entry under the final name.

    Opening a cache removes the temporaries of writes that were killed (see
    :meth:`clean_temporaries`); ``removed`` lists them.
    """

    def __init__(self, cache_dir: str | Path | None = None) -> None:
        self.path = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        self.removed: list[Path] = self.clean_temporaries()

    def __repr__(self) -> str:
        return f"EmbeddingCache({str(self.path)!r})"

    @staticmethod
    def key(fingerprint: str, role: str, texts: Sequence[str]) -> str:
        """sha256 hex of (fingerprint, role, texts), unambiguous for any texts.

        Each part is length-prefixed so that, e.g., ``["ab", "c"]`` and ``["a", "bc"]``
        never collide.
        """
        h = hashlib.sha256()

        def part(b: bytes) -> None:
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)

        part(b"imrnns-embeddings-v1")
        part(fingerprint.encode("utf-8"))
        part(role.encode("utf-8"))
        h.update(len(texts).to_bytes(8, "little"))
        for t in texts:
            # surrogatepass: a lone surrogate from a badly decoded file must still hash.
            part(t.encode("utf-8", "surrogatepass"))
        return h.hexdigest()

    def file(self, key: str) -> Path:
        """Path of the entry for ``key`` (it may not exist).

        Raises:
            ValueError: ``key`` is not 1-128 letters, digits, '_' or '-' (a key such as
                ``../x`` would name a file outside the cache folder).
        """
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise ValueError(
                f"cache key must be 1-128 letters, digits, '_' or '-' (as EmbeddingCache.key "
                f"returns), got {key!r:.80}"
            )
        return self.path / f"{key}.npy"

    def __contains__(self, key: str) -> bool:
        return self.file(key).is_file()

    def get(self, key: str, shape: tuple[int, int | None]) -> np.ndarray | None:
        """The cached float32 array for ``key``, or None when absent or unusable.

        ``shape`` is the expected (rows, columns); columns None accepts any width (an
        encoder whose dimension is not known before its first call). A file that cannot be
        read or has the wrong shape or dtype (a damaged disk, an older version's entry) is
        reported with a warning and treated as a miss, so the caller re-encodes and
        overwrites it.
        """
        f = self.file(key)
        if not f.is_file():
            return None
        try:
            arr = np.load(f, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            warnings.warn(
                f"embedding cache entry {f} is unreadable ({e}); re-encoding", stacklevel=3
            )
            return None
        rows, cols = shape
        if (
            arr.ndim != 2
            or arr.shape[0] != rows
            or (cols is not None and arr.shape[1] != cols)
            or arr.dtype != np.float32
        ):
            want = f"({rows}, {'any' if cols is None else cols})"
            warnings.warn(
                f"embedding cache entry {f} has shape {arr.shape} dtype {arr.dtype}, expected "
                f"{want} float32; re-encoding",
                stacklevel=3,
            )
            return None
        return arr

    def put(self, key: str, array: np.ndarray) -> Path:
        """Store ``array`` (as float32) under ``key`` atomically and durably; return its path.

        Raises OSError when the entry cannot be written (a full disk, a read-only folder);
        nothing is left behind then.
        """
        final = self.file(key)
        self.path.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            dir=self.path, prefix=f"{_TEMP_PREFIX}{os.getpid()}.{_host_tag()}.", suffix=".tmp"
        )
        try:
            # mkstemp creates the file 0600; a shared cache folder (several users or
            # containers reading one set of embeddings) needs the usual umask mode.
            os.chmod(tmp, 0o666 & ~_UMASK)
            with os.fdopen(fd, "wb") as f:
                np.save(f, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        fsync_dir(self.path)
        return final

    def clean_temporaries(self, max_age_s: float = TEMP_MAX_AGE_S) -> list[Path]:
        """Remove temporaries of killed writes; return the paths removed.

        Removed: regular files named as :meth:`put` names its temporaries (or as earlier
        versions did) that were written by a process no longer running on this host, or
        that nobody has written to for ``max_age_s`` seconds. Nothing else in the folder is
        ever removed or opened (a FIFO, link or folder of a matching name is left alone).
        """
        try:
            entries = list(os.scandir(self.path))
        except OSError:
            return []  # no folder yet, or not readable: nothing of ours to clean
        host = _host_tag()
        now = time.time()
        removed = []
        for entry in entries:
            ours = _TEMP.fullmatch(entry.name)
            if ours is None and _LEGACY_TEMP.fullmatch(entry.name) is None:
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue  # renamed or removed meanwhile
            if not stat.S_ISREG(st.st_mode):
                continue
            dead_writer = (
                ours is not None and ours.group(2) == host and _pid_is_dead(int(ours.group(1)))
            )
            if not (dead_writer or now - st.st_mtime > max_age_s):
                continue
            try:
                os.unlink(entry.path)
            except OSError:
                continue  # removed by another cleaner, or not ours to remove
            removed.append(Path(entry.path))
        return removed
