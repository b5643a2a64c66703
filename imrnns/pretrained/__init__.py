"""Adapters shipped with the package, and the one the command line uses by default."""

from __future__ import annotations

from pathlib import Path


def pretrained_dir() -> Path:
    """Folder of the adapters shipped with the package."""
    return Path(__file__).resolve().parent


def default_adapter() -> Path:
    """The shipped SciFact MiniLM adapter (trained on SciFact train; see its README)."""
    root = pretrained_dir()
    found = sorted(p for p in root.glob("scifact-minilm-*") if (p / "config.json").is_file())
    if not found:
        raise FileNotFoundError(
            f"no shipped adapter under {root}; pass --checkpoint or run `imrnns train` first"
        )
    return found[0]
