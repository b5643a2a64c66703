"""The official ``imrnns`` 0.2.3 package, installed in isolation for parity tests and benchmarks.

It imports as ``imrnns`` too, and its ``__init__`` pulls sentence-transformers and
huggingface_hub. We install it with ``pip --no-deps --target`` into its own folder and load
only the torch-only modules (``model.py``, ``checkpoints.py``, ``encoders.py``), either by
file path under a private module name (in-process) or in a subprocess whose ``imrnns`` is
the official one (:data:`SUBPROCESS_PRELUDE`).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

OFFICIAL_VERSION = "0.2.3"
MODULE_NAME = "imrnns_official_model"
# Written by install_official into the directory it creates: the proof that a directory
# lacking the package is ours to replace.
MARKER = ".imrnns-official-install"

# Python source that makes `import imrnns.model` resolve to the official package without
# running its __init__ (which needs sentence-transformers). Prepend to a subprocess script;
# it expects the official folder in the environment variable IMRNNS_OFFICIAL_DIR.
SUBPROCESS_PRELUDE = """
import os, sys, types
_pkg = types.ModuleType("imrnns")
_pkg.__path__ = [os.path.join(os.environ["IMRNNS_OFFICIAL_DIR"], "imrnns")]
sys.modules["imrnns"] = _pkg
"""


def official_dir() -> Path:
    """Where the official package lives: ``$IMRNNS_OFFICIAL_DIR`` or the user cache."""
    env = os.environ.get("IMRNNS_OFFICIAL_DIR")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "imrnns" / f"official-{OFFICIAL_VERSION}"


def _refusal(target: Path) -> str | None:
    """Why ``target`` may not be replaced by an install (None: missing, empty, or ours).

    Ours means it holds :data:`MARKER`, which only :func:`install_official` writes, inside
    the directory it creates; anything else may be someone's files.
    """
    try:
        mode = os.lstat(target).st_mode
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(mode):
        return "it exists and is not a directory"
    if (target / MARKER).is_file():
        return None
    names = sorted(p.name for p in target.iterdir())
    if not names:
        return None
    shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
    return f"it is a non-empty directory without {MARKER} (it holds {shown})"


def install_official(target: Path | None = None) -> Path:
    """Install ``imrnns==0.2.3`` (no dependencies) into ``target`` once; return ``target``.

    The install goes to a fresh temporary sibling, renamed into place, so an interrupted
    install never leaves a half-populated target. An existing ``target`` is replaced only
    when it is empty or an earlier install of ours (it holds :data:`MARKER`); a directory
    this function did not create is never deleted.

    Raises:
        ValueError: ``target`` lacks the official package and is not ours to replace
            (``$IMRNNS_OFFICIAL_DIR`` pointing at another folder, say); nothing is touched.
        RuntimeError: pip failed.
    """
    target = Path(target) if target is not None else official_dir()
    if (target / "imrnns" / "model.py").is_file():
        return target
    why = _refusal(target)
    if why is not None:
        raise ValueError(
            f"{target}: cannot install the official imrnns=={OFFICIAL_VERSION} there: {why}; "
            "point IMRNNS_OFFICIAL_DIR at a new or empty directory"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".installing", dir=target.parent))
    try:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-compile",
            "--disable-pip-version-check",
            "--target",
            str(tmp),
            f"imrnns=={OFFICIAL_VERSION}",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(
                f"could not install the official imrnns=={OFFICIAL_VERSION}: {proc.stderr[-2000:]}"
            )
        (tmp / MARKER).write_text(f"imrnns=={OFFICIAL_VERSION}\n")
        _swap_in(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _swap_in(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``; an empty or marked ``target`` is moved aside and removed.

    What is moved aside is checked again first (another process may have created it since);
    a concurrent install that got there first wins, and ours is dropped.
    """
    if os.path.lexists(target):
        why = _refusal(target)
        if why is not None:
            if (target / "imrnns" / "model.py").is_file():
                return  # a concurrent install finished first
            raise ValueError(f"{target}: not replacing it: {why}")
        aside = Path(
            tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".replaced", dir=target.parent)
        )
        aside.rmdir()
        os.replace(target, aside)
        try:
            os.replace(tmp, target)
        except OSError:
            os.replace(aside, target)
            raise
        shutil.rmtree(aside, ignore_errors=True)  # empty, or an install of ours
        return
    try:
        os.replace(tmp, target)
    except OSError:
        if not (target / "imrnns" / "model.py").is_file():
            raise  # a concurrent install finished first otherwise


def load_official_model_module(target: Path | None = None) -> ModuleType:
    """The official ``imrnns/model.py`` as a module named ``imrnns_official_model``."""
    if MODULE_NAME in sys.modules:
        return sys.modules[MODULE_NAME]
    path = install_official(target) / "imrnns" / "model.py"
    spec = importlib.util.spec_from_file_location(MODULE_NAME, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    # Its dataclasses look their module up in sys.modules while the class body runs.
    sys.modules[MODULE_NAME] = module
    spec.loader.exec_module(module)
    return module
