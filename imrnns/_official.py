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
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

OFFICIAL_VERSION = "0.2.3"
MODULE_NAME = "imrnns_official_model"

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


def install_official(target: Path | None = None) -> Path:
    """Install ``imrnns==0.2.3`` (no dependencies) into ``target`` once; return ``target``.

    The install goes to a temporary folder renamed into place, so an interrupted install
    never leaves a half-populated target.
    """
    target = Path(target) if target is not None else official_dir()
    if (target / "imrnns" / "model.py").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".official-", dir=target.parent))
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
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


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
