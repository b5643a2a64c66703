"""The bad-input harness: the workspace every case runs in, the case registry, and the
tree hash that proves a failed call changed nothing on disk.

A case is a function ``setup(ws) -> action`` registered with :func:`case` (``action()`` must
raise the named exception with a message matching the pattern) or :func:`defined` (a
behaviour the API defines for an input some libraries reject; the action checks it). The case
files ``cases_*.py`` register one area each when imported; ``test_bad_input.py`` imports them
all and runs every case in a fresh copy of the workspace (fixtures in ``conftest.py``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imrnns import IMRNN, IMRNNConfig, IMRNNIndex
from tests.helpers import randomised

N_IN, M = 16, 8  # tiny model: input dim n, working dim m
N_DOCS = 40
ENCODER = "enc-A@0123"


# --------------------------------------------------------------------------- the workspace
@dataclass
class Workspace:
    """A fresh copy of the on-disk state, plus in-memory objects built from the same seeds."""

    root: Path
    model: IMRNN
    corpus: np.ndarray
    queries: np.ndarray
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def index_dir(self) -> Path:
        return self.root / "index"

    @property
    def adapter_dir(self) -> Path:
        return self.root / "adapter"

    @property
    def official(self) -> Path:
        return self.root / "official.pt"

    @property
    def beir(self) -> Path:
        return self.root / "beir"

    def index(self, named: bool = True, **kwargs: Any) -> IMRNNIndex:
        index = IMRNNIndex(self.model, feedback_k=5, encoder=ENCODER, **kwargs)
        index.add(self.corpus, doc_ids=[f"d{i}" for i in range(N_DOCS)] if named else None)
        return index


def workspace_model() -> IMRNN:
    torch.manual_seed(7)
    return randomised(IMRNNConfig(input_dim=N_IN, dim=M))


def workspace_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    return (
        rng.standard_normal((N_DOCS, N_IN)).astype(np.float32),
        rng.standard_normal((3, N_IN)).astype(np.float32),
    )


def write_beir(root: Path) -> None:
    (root / "qrels").mkdir(parents=True)
    with open(root / "corpus.jsonl", "w") as fh:
        for i in range(4):
            fh.write(json.dumps({"_id": f"d{i}", "title": "", "text": f"document {i}"}) + "\n")
    with open(root / "queries.jsonl", "w") as fh:
        fh.write(json.dumps({"_id": "q1", "text": "a query"}) + "\n")
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")


def tree_hash(root: Path) -> str:
    """sha256 over every path under ``root`` (files and folders, hidden ones too) and bytes."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        h.update(path.relative_to(root).as_posix().encode())
        if path.is_file():
            h.update(b"F")
            h.update(path.read_bytes())
        elif path.is_dir():
            h.update(b"D")
    return h.hexdigest()


# --------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Case:
    name: str
    area: str
    exc: type[BaseException] | None  # None: a defined behaviour, checked by the case
    match: str
    setup: Callable[[Workspace], Callable[[], Any]]


ERROR_CASES: dict[str, Case] = {}
DEFINED_CASES: dict[str, Case] = {}


def register(name: str, area: str, exc: type[BaseException], match: str, setup: Any) -> None:
    key = f"{area}:{name}"
    assert key not in ERROR_CASES, f"duplicate case {key}"
    ERROR_CASES[key] = Case(key, area, exc, match, setup)


def case(area: str, exc: type[BaseException], match: str) -> Callable[..., Any]:
    def deco(fn: Callable[[Workspace], Callable[[], Any]]) -> Callable[..., Any]:
        register(fn.__name__, area, exc, match, fn)
        return fn

    return deco


def defined(area: str) -> Callable[..., Any]:
    def deco(fn: Callable[[Workspace], Callable[[], Any]]) -> Callable[..., Any]:
        DEFINED_CASES[f"{area}:{fn.__name__}"] = Case(fn.__name__, area, None, "", fn)
        return fn

    return deco


def target_of(result: Any, default: Path) -> Path:
    """A tamper step may return the path to load (``write_text`` returns an int: ignored)."""
    return result if isinstance(result, Path) else default


def flip_byte(path: Path, where: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def append_to_beir(rel: str, text: str) -> Callable[[Workspace], None]:
    def tamper(ws: Workspace) -> None:
        with open(ws.beir / rel, "a") as fh:
            fh.write(text)

    return tamper
