"""Saving never deletes what is not ours; a loaded index is checked for what it claims.

Issue 17's storage cases, each a regression test of the old behaviour:

- The replace check (``imrnns._atomic.check_replaceable``) recognises our formats by
  content: a Hugging Face model folder, a web folder, one of our saves with a foreign file
  added, a link or a FIFO are refused and left byte for byte as they were; ``out/last`` and
  ``out/best`` of a training run and the official package's folder are guarded too.
- Debris cleanup never opens a FIFO (a save used to block forever on one) and never follows
  a link; ``import imrnns`` works without ``fcntl`` (Windows).
- Loading checks manifest names (nothing outside the directory is opened), corpus names,
  shapes, dtypes and finiteness (every row, whatever chunk it falls in), and the faiss first
  stage's type, dimension, metric and size; ``from_parts`` refuses NaN/Inf; a checkpoint
  config with huge dimensions is refused before the model is built.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import imrnns.index.storage as storage
from imrnns import IMRNN, CheckpointError, IMRNNConfig, IMRNNIndex
from imrnns._atomic import check_replaceable, clean_debris, resolve_directory
from imrnns._checkpoint_io import CHECKPOINT_LAYOUT, state_shapes
from imrnns.checkpoints import load_pretrained, save_pretrained
from imrnns.index import IndexError_
from tests.helpers import randomised, weights_equal

N_IN, M, N_DOCS = 12, 8, 50
REPO = Path(__file__).resolve().parents[2]


def _model(seed: int = 0, **kwargs) -> IMRNN:
    torch.manual_seed(seed)
    return randomised(IMRNNConfig(input_dim=N_IN, dim=M, **kwargs))


def _corpus(n: int = N_DOCS) -> np.ndarray:
    return np.random.default_rng(5).standard_normal((n, N_IN)).astype(np.float32)


def _index(**kwargs) -> IMRNNIndex:
    index = IMRNNIndex(_model(), feedback_k=5, **kwargs)
    index.add(_corpus(), doc_ids=[f"d{i}" for i in range(N_DOCS)])
    return index


def _snapshot(root: Path) -> dict[str, bytes | str]:
    """Every entry under ``root`` (links and FIFOs by kind, files by content)."""
    out: dict[str, bytes | str] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = f"link -> {os.readlink(p)}"
        elif p.is_fifo():
            out[rel] = "fifo"
        elif p.is_file():
            out[rel] = p.read_bytes()
        else:
            out[rel] = "dir"
    return out


@pytest.fixture(scope="module")
def saved_index(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("saved") / "index"
    _index().save(path)
    return path


@pytest.fixture
def index_dir(saved_index: Path, tmp_path: Path) -> Path:
    """A fresh copy of a saved flat index (named documents, document cache)."""
    import shutil

    target = tmp_path / "index"
    shutil.copytree(saved_index, target)
    return target


def _rewrite(directory: Path, rel: str, data: bytes) -> None:
    """Replace a file of an index and its manifest entry: a consistent rewrite, as a
    tamperer (or a buggy tool) would leave it; the SHA-256 check cannot see it."""
    (directory / rel).write_bytes(data)
    manifest_path = directory / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][rel] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest_path.write_text(json.dumps(manifest))


def _rewrite_corpus(directory: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(str(directory / "corpus.safetensors"))
    change(tensors)
    tmp = directory.parent / "corpus.tmp"
    save_file(tensors, str(tmp))
    data = tmp.read_bytes()
    tmp.unlink()
    _rewrite(directory, "corpus.safetensors", data)


def _rewrite_faiss(directory: Path, index: faiss.Index) -> None:
    tmp = directory.parent / "fs.tmp"
    faiss.write_index(index, str(tmp))
    data = tmp.read_bytes()
    tmp.unlink()
    _rewrite(directory, "first_stage.faiss", data)


# --------------------------------------------------------------------------- replace check
def _hugging_face_folder(path: Path) -> None:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 384}))
    (path / "model.safetensors").write_bytes(b"weights")
    (path / "tokenizer.json").write_text("{}")
    (path / "vocab.txt").write_text("[PAD]\n")


def _web_folder(path: Path) -> None:
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({"name": "app", "start_url": "/"}))
    (path / "index.html").write_text("<html></html>")


def test_adapter_save_refuses_a_hugging_face_model_folder(tmp_path: Path) -> None:
    # Regression: config.json alone made the folder "ours"; the save deleted the tokenizer.
    target = tmp_path / "minilm"
    _hugging_face_folder(target)
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"minilm is not an earlier adapter checkpoint save") as e:
        save_pretrained(_model(), target)
    assert "tokenizer.json" in str(e.value) and "vocab.txt" in str(e.value)
    assert "config.json is not ours" in str(e.value)
    assert _snapshot(tmp_path) == before


def test_index_save_refuses_a_web_folder(tmp_path: Path) -> None:
    # Regression: manifest.json alone made the folder "ours"; the save deleted index.html.
    target = tmp_path / "site"
    _web_folder(target)
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"site is not an earlier index save .*index\.html"):
        _index().save(target)
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("kind", ["adapter", "index"])
def test_our_save_with_a_file_added_is_refused(tmp_path: Path, kind: str) -> None:
    # Regression: our header was enough; a README added beside our files was deleted.
    target = tmp_path / "ours"
    index = _index()

    def save() -> None:
        if kind == "adapter":
            save_pretrained(_model(), target)
        else:
            index.save(target)

    save()
    (target / "README.md").write_text("notes")
    nested = target / ("adapter" if kind == "index" else "")
    (nested / "extra.bin").write_bytes(b"x")
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"never writes: .*README\.md"):
        save()
    assert _snapshot(tmp_path) == before
    (target / "README.md").unlink()
    (nested / "extra.bin").unlink()
    save()  # an earlier save of ours, and only that, is replaced


def test_a_damaged_save_of_ours_is_replaced(tmp_path: Path) -> None:
    """A subset of our files (one deleted by hand) holds nothing we did not write."""
    target = tmp_path / "idx"
    _index().save(target)
    (target / "first_stage.faiss").unlink()
    _index().save(target)
    assert IMRNNIndex.load(target).ntotal == N_DOCS


@pytest.mark.parametrize("what", ["symlink", "fifo", "nested-dir", "newer-version"])
def test_other_things_are_refused(tmp_path: Path, what: str) -> None:
    target = tmp_path / "ck"
    save_pretrained(_model(), target)
    if what == "symlink":
        (tmp_path / "ck2").symlink_to(target, target_is_directory=True)
        target, match = tmp_path / "ck2", r"ck2 is a symbolic link"
    elif what == "fifo":
        os.mkfifo(target / "model.bin")
        match = r"model\.bin \(special file\)"
    elif what == "nested-dir":
        (target / "cache").mkdir()
        (target / "cache" / "x").write_text("x")
        match = r"never writes: cache/"
    else:
        config = json.loads((target / "config.json").read_text())
        (target / "config.json").write_text(json.dumps({**config, "format_version": 99}))
        match = r"format_version 99 is newer"
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match=match):
        save_pretrained(_model(1), target)
    assert _snapshot(tmp_path) == before


def test_layouts_name_every_file_a_save_writes(tmp_path: Path) -> None:
    """The layouts must match the writers, or our own saves would be refused next time."""
    from imrnns.training.loop import LAST_LAYOUT, _save_last

    _index().save(tmp_path / "idx")
    save_pretrained(_model(), tmp_path / "ck")
    _save_last(tmp_path, _model(), {"epoch": 1})
    for directory, layout in (
        (tmp_path / "idx", storage.INDEX_LAYOUT),
        (tmp_path / "ck", CHECKPOINT_LAYOUT),
        (tmp_path / "last", LAST_LAYOUT),
    ):
        files = {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}
        assert files <= layout.files, files - layout.files
        check_replaceable(directory, layout)
    check_replaceable(tmp_path / "idx", "manifest.json")  # the older calling form


def test_training_refuses_foreign_last_and_best_before_any_work(tmp_path: Path) -> None:
    # Regression: out/last was replaced without any check (after an epoch of training).
    from imrnns.training import train
    from imrnns.training.loop import _save_last

    class Untouchable:
        def __getattr__(self, name: str):
            raise AssertionError(f"train() read data.{name} before checking out_dir")

    for sub in ("last", "best"):
        out = tmp_path / sub / "out"
        _hugging_face_folder(out / sub)
        before = _snapshot(out)
        with pytest.raises(ValueError, match=rf"{sub} is not an earlier"):
            train(Untouchable(), out, progress=False)
        assert _snapshot(out) == before
    out = tmp_path / "direct"
    _web_folder(out / "last")
    before = _snapshot(out)
    with pytest.raises(ValueError, match=r"last is not an earlier training checkpoint save"):
        _save_last(out, _model(), {"epoch": 1})
    assert _snapshot(out) == before


# --------------------------------------------------------------------------- official install
def _fake_pip(calls: list[list[str]]):
    def run(cmd, **kwargs):
        calls.append(cmd)
        target = Path(cmd[cmd.index("--target") + 1])
        (target / "imrnns").mkdir()
        (target / "imrnns" / "model.py").write_text("# official\n")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    return run


def test_official_install_never_deletes_a_folder_it_did_not_create(tmp_path, monkeypatch):
    # Regression: a $IMRNNS_OFFICIAL_DIR without imrnns/model.py was removed with rmtree.
    import imrnns._official as official

    calls: list[list[str]] = []
    monkeypatch.setattr(official.subprocess, "run", _fake_pip(calls))
    target = tmp_path / "mine"
    target.mkdir()
    (target / "thesis.tex").write_text("years of work")
    monkeypatch.setenv("IMRNNS_OFFICIAL_DIR", str(target))
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"mine: cannot install .* without .*thesis\.tex"):
        official.install_official()
    assert _snapshot(tmp_path) == before and calls == []
    # New, empty, and an earlier (damaged) install of ours are fine; nothing is left beside.
    for name in ("new", "empty", "ours"):
        path = tmp_path / name
        if name == "empty":
            path.mkdir()
        if name == "ours":
            official.install_official(path)
            (path / "imrnns" / "model.py").unlink()
        assert official.install_official(path) == path
        assert (path / "imrnns" / "model.py").is_file() and (path / official.MARKER).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "mine", "new", "ours"]


# --------------------------------------------------------------------------- FIFOs, links
def _finishes(fn: Callable[[], object], fifos: list[Path], timeout: float = 10.0) -> None:
    """Run ``fn`` in a thread; fail if it does not finish in ``timeout`` s (a blocked
    ``open`` of a FIFO is then released by opening its write end, so the test ends)."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as exc:  # re-raised in the caller
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    blocked = thread.is_alive()
    if blocked:
        for fifo in fifos:
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        thread.join(5.0)
    assert not blocked, "the save blocked on a FIFO named like one of its temporaries"
    if errors:
        raise errors[0]


@pytest.mark.parametrize("kind", ["index", "adapter", "file"])
def test_a_fifo_named_like_a_temporary_does_not_block_a_save(tmp_path: Path, kind: str) -> None:
    # Regression: debris cleanup opened the FIFO for reading, which blocks until a writer.
    from imrnns._atomic import atomic_file

    name = {"index": "idx", "adapter": "ck", "file": "out.json"}[kind]
    target = tmp_path / name
    index = _index()

    def save() -> None:
        if kind == "index":
            index.save(target)
        elif kind == "adapter":
            save_pretrained(_model(), target)
        else:
            with atomic_file(target, "w") as fh:
                fh.write("{}")

    save()
    fifos = [tmp_path / f".{name}.abcdefgh.tmp", tmp_path / f".{name}.zzzzzzzz.old"]
    for fifo in fifos:
        os.mkfifo(fifo)
    _finishes(save, fifos)
    _finishes(lambda: clean_debris(target), fifos)
    assert all(f.is_fifo() for f in fifos), "not ours: a FIFO is never removed"


def test_debris_cleanup_never_follows_a_link(tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "data").write_text("keep")
    target = tmp_path / "ck"
    link = tmp_path / ".ck.abcdefgh.tmp"
    link.symlink_to(precious, target_is_directory=True)
    save_pretrained(_model(), target)
    save_pretrained(_model(), target)
    assert (precious / "data").read_text() == "keep" and link.is_symlink()


def test_resolve_directory_ignores_a_fifo_named_like_an_old_directory(tmp_path: Path) -> None:
    save_pretrained(_model(), tmp_path / "real")
    os.mkfifo(tmp_path / ".ck.abcdefgh.old")
    with pytest.raises(FileNotFoundError, match=r"no such directory"):
        resolve_directory(tmp_path / "ck")


# --------------------------------------------------------------------------- Windows
WITHOUT_FCNTL = r"""
import os, sys

class NoFcntl:  # what Windows has: no fcntl module
    def find_spec(self, name, path=None, target=None):
        if name == "fcntl":
            raise ModuleNotFoundError("No module named 'fcntl' (simulated Windows)")

sys.meta_path.insert(0, NoFcntl())
sys.modules.pop("fcntl", None)
real_open = os.open

def windows_open(path, flags, *args, **kwargs):  # Windows cannot open a directory
    if os.path.isdir(path):
        raise PermissionError(13, "Permission denied", str(path))
    return real_open(path, flags, *args, **kwargs)

os.open = windows_open
del os.fchmod

import numpy as np, torch
import imrnns, imrnns.index, imrnns.checkpoints, imrnns.training
from imrnns import IMRNN, IMRNNConfig, IMRNNIndex
from imrnns._atomic import clean_debris
from imrnns.checkpoints import load_pretrained, save_pretrained

assert "fcntl" not in sys.modules, "something imported fcntl"
root = sys.argv[1]
torch.manual_seed(0)
model = IMRNN(IMRNNConfig(input_dim=8, dim=4))
for _ in range(2):  # the second save replaces the first
    save_pretrained(model, os.path.join(root, "ck"))
    index = IMRNNIndex(model, feedback_k=3)
    index.add(np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32))
    index.save(os.path.join(root, "idx"))
loaded = load_pretrained(os.path.join(root, "ck"))
assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(),
                                             model.state_dict().values()))
again = IMRNNIndex.load(os.path.join(root, "idx"))
q = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)
assert np.array_equal(again.search(q, 3)[1], index.search(q, 3)[1])
assert clean_debris(os.path.join(root, "idx")) == []
print("OK", sorted(os.listdir(root)))
"""


def test_imports_saves_and_loads_without_fcntl(tmp_path: Path) -> None:
    # Regression: `import fcntl` at the top of imrnns._atomic made imrnns unimportable there.
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(WITHOUT_FCNTL), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK ['ck', 'idx']" in proc.stdout


# --------------------------------------------------------------------------- loaded index
@pytest.mark.parametrize("entry", ["../outside.bin", "/etc/hostname", "adapter/../../x.bin"])
def test_manifest_entries_outside_the_directory_are_refused_unopened(
    index_dir: Path, entry: str, monkeypatch
) -> None:
    # Regression: such entries were opened and hashed (and, matching, accepted).
    outside = index_dir.parent / "outside.bin"
    outside.write_bytes(b"secret")
    real = Path(entry) if entry.startswith("/") else outside
    manifest = json.loads((index_dir / "manifest.json").read_text())
    data = real.read_bytes()
    manifest["files"][entry] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (index_dir / "manifest.json").write_text(json.dumps(manifest))
    opened: list[Path] = []
    real_sha = storage.sha256_file
    monkeypatch.setattr(storage, "sha256_file", lambda p: opened.append(p) or real_sha(p))
    with pytest.raises(IndexError_, match=r"manifest.json: lists \[.*\], not files of an index"):
        IMRNNIndex.load(index_dir)
    assert opened == []


def test_a_linked_index_file_is_refused(index_dir: Path) -> None:
    outside = index_dir.parent / "corpus-elsewhere.safetensors"
    (index_dir / "corpus.safetensors").rename(outside)
    (index_dir / "corpus.safetensors").symlink_to(outside)
    with pytest.raises(IndexError_, match=r"corpus.safetensors: not a regular file"):
        IMRNNIndex.load(index_dir)


@pytest.mark.parametrize("row", [0, 17, 31, 32, N_DOCS - 1])
@pytest.mark.parametrize("tensor", ["projected", "doc_cache"])
def test_a_nan_row_is_refused_wherever_it_lies(
    index_dir: Path, row: int, tensor: str, monkeypatch
) -> None:
    # Regression: a NaN row loaded and ranked first for every query.
    # Rows 0, 17, 31, 32, 49: first, middle and last of a chunk, across a boundary.
    monkeypatch.setattr(storage, "FINITE_CHUNK", 16, raising=False)

    def poison(t: dict[str, torch.Tensor]) -> None:
        t[tensor][row, 3] = float("nan") if row % 2 else float("inf")

    _rewrite_corpus(index_dir, poison)
    name = "projected corpus" if tensor == "projected" else "doc_cache"
    pattern = rf"corpus.safetensors: {name}: row {row} holds NaN or Inf"
    for kwargs in ({}, {"verify": False}, {"rows": (0, N_DOCS)}):
        with pytest.raises(IndexError_, match=pattern):
            IMRNNIndex.load(index_dir, **kwargs)
    # A slice without the row loads; its rows are named by their place in the whole corpus.
    lo = row + 1 if row < N_DOCS - 1 else 0
    hi = N_DOCS if row < N_DOCS - 1 else row
    assert IMRNNIndex.load(index_dir, rows=(lo, hi)).ntotal == hi - lo


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_the_row_check_finds_every_bad_row_and_no_overflow(dtype: torch.dtype, monkeypatch) -> None:
    """Rows are screened by their sum: an overflowing sum of finite values is not an error."""
    monkeypatch.setattr(storage, "FINITE_CHUNK", 64, raising=False)
    x = torch.full((300, 9), torch.finfo(dtype).max / 2, dtype=dtype)  # every row sum overflows
    storage.check_rows_finite("x", x)
    for row, value in ((0, float("nan")), (63, float("inf")), (64, -float("inf")), (299, 0.0)):
        y = torch.randn(300, 9).to(dtype)
        y[row, 4] = value
        y[299, 8] = float("nan")  # a later bad row: the first one is named
        with pytest.raises(ValueError, match=rf"x: row {row} holds NaN or Inf"):
            storage.check_rows_finite("x", y)


@pytest.mark.parametrize(
    "change, pattern",
    [
        (
            lambda t: t.update(projected=t["projected"].half()),
            r"projected corpus is F16, the manifest's storage_dtype is torch.float32",
        ),
        (lambda t: t.pop("doc_cache"), r"holds tensors \['projected'\], .* promise"),
        (
            lambda t: t.update(extra=torch.zeros(1)),
            r"holds tensors \['doc_cache', 'extra', 'projected'\]",
        ),
        (
            lambda t: t.update(doc_cache=t["doc_cache"][:, :5].contiguous()),
            r"doc_cache is F32 \(50, 5\), expected float32 \(50, 16\)",
        ),
    ],
)
def test_corpus_tensors_must_be_what_the_manifest_promises(index_dir, change, pattern) -> None:
    # Regression: a float16 corpus under a float32 manifest was silently converted.
    _rewrite_corpus(index_dir, change)
    with pytest.raises(IndexError_, match=pattern):
        IMRNNIndex.load(index_dir)


def _flat(vectors: np.ndarray, metric: int = faiss.METRIC_INNER_PRODUCT) -> faiss.Index:
    index = faiss.IndexFlat(vectors.shape[1], metric)
    index.add(vectors)
    return index


@pytest.mark.parametrize(
    "make, pattern",
    [
        (
            lambda v: _flat(v, faiss.METRIC_L2),
            r"a faiss b'IxF2' index, the manifest's first_stage='flat' is b'IxFI'",
        ),
        (
            lambda v: _flat(np.pad(v, ((0, 0), (0, 1)))),
            r"faiss index of dimension 13, 50 vectors, metric 0; the manifest promises "
            r"dimension 12, 50 vectors",
        ),
        (lambda v: _flat(v[:-1]), r"dimension 12, 49 vectors, .* promises dimension 12, 50"),
        (
            lambda v: _hnsw(v),
            r"a faiss b'IHNf' index, the manifest's first_stage='flat'",
        ),
    ],
)
def test_the_first_stage_must_be_what_the_manifest_promises(index_dir, make, pattern) -> None:
    # Regression: an L2 or wider first stage loaded silently and changed the rankings.
    vectors = IMRNNIndex.load(index_dir).first_stage_vectors()
    _rewrite_faiss(index_dir, make(vectors))
    with pytest.raises(IndexError_, match=pattern):
        IMRNNIndex.load(index_dir)


def _hnsw(vectors: np.ndarray) -> faiss.Index:
    index = faiss.IndexHNSWFlat(vectors.shape[1], 8, faiss.METRIC_INNER_PRODUCT)
    index.add(vectors)
    return index


def test_a_damaged_first_stage_read_without_verify_names_the_file(index_dir, monkeypatch):
    # Regression: faiss's own RuntimeError came through (verify=False skips the SHA-256).
    path = index_dir / "first_stage.faiss"
    data = bytearray(path.read_bytes())
    data[0:4] = b"JUNK"
    path.write_bytes(bytes(data))
    with pytest.raises(IndexError_, match=r"first_stage.faiss: a faiss b'JUNK' index"):
        IMRNNIndex.load(index_dir, verify=False)
    data[0:4] = b"IxFI"
    path.write_bytes(bytes(data))

    def broken(*args, **kwargs):
        raise RuntimeError("Error in faiss::read_index: unexpected end of file\nstack...")

    monkeypatch.setattr(storage.first_stage, "read", broken)
    with pytest.raises(IndexError_, match=r"first_stage.faiss: unreadable faiss index \(Error"):
        IMRNNIndex.load(index_dir, verify=False)


def test_a_flat_first_stage_claiming_more_vectors_than_it_holds_is_refused(index_dir):
    """faiss would size its buffer from the file's count: refused from the header first."""
    data = bytearray((index_dir / "first_stage.faiss").read_bytes())
    data[37:45] = (1 << 39).to_bytes(8, "little")
    _rewrite(index_dir, "first_stage.faiss", bytes(data))
    with pytest.raises(IndexError_, match=r"holding 549755813888 floats, a flat index of 50 x"):
        IMRNNIndex.load(index_dir)


@pytest.mark.parametrize("first_stage", ["ivf", "hnsw"])
def test_ivf_and_hnsw_round_trip_through_the_checks(tmp_path: Path, first_stage: str) -> None:
    index = _index(first_stage=first_stage, first_stage_space="projected")
    index.save(tmp_path / "idx")
    q = _corpus(3)
    loaded = IMRNNIndex.load(tmp_path / "idx")
    for got, want in zip(loaded.search(q, 4), index.search(q, 4), strict=True):
        np.testing.assert_array_equal(got, want)
    assert IMRNNIndex.load(tmp_path / "idx", rows=(10, 30)).ntotal == 20


@pytest.mark.parametrize("piece", ["projected", "vectors", "cache"])
def test_from_parts_refuses_nan_and_inf(piece: str) -> None:
    # Regression: from_parts accepted NaN/Inf pieces.
    index = _index()
    parts = {
        "projected": index.projected_corpus.clone(),
        "vectors": index.first_stage_vectors(),
        "cache": index.document_cache.clone(),
    }
    bad = float("nan") if piece != "vectors" else float("inf")
    parts[piece][7, 2] = bad
    name = {"projected": "projected", "vectors": "first_stage_vectors", "cache": "document_cache"}
    with pytest.raises(ValueError, match=rf"{name[piece]}: row 7 holds NaN or Inf"):
        IMRNNIndex.from_parts(
            index.model,
            parts["projected"],
            parts["vectors"],
            document_cache=parts["cache"],
            **index.settings(),
        )


def test_from_parts_checks_widths_and_types() -> None:
    index = _index()
    kw = index.settings()
    vectors = index.first_stage_vectors()
    with pytest.raises(
        ValueError, match=r"first_stage_vectors must be \(50, 12\) .*got \(50, 13\)"
    ):
        IMRNNIndex.from_parts(
            index.model, index.projected_corpus, np.pad(vectors, ((0, 0), (0, 1))), **kw
        )
    with pytest.raises(ValueError, match=r"document_cache must be \(50, 16\), got \(50, 3\)"):
        IMRNNIndex.from_parts(
            index.model,
            index.projected_corpus,
            vectors,
            document_cache=index.document_cache[:, :3],
            **kw,
        )
    with pytest.raises(TypeError, match=r"projected must be a float tensor, got numpy"):
        IMRNNIndex.from_parts(index.model, index.projected_corpus.numpy(), vectors, **kw)


# --------------------------------------------------------------------------- checkpoints
def test_state_shapes_match_the_model() -> None:
    for cfg in (
        IMRNNConfig(input_dim=12, dim=8),
        IMRNNConfig(input_dim=12, dim=6, modulation="affine", hidden_dims=(5, 7)),
        IMRNNConfig.official_v01(20, 16),
        IMRNNConfig.official_v02(10),
    ):
        assert state_shapes(cfg) == {k: tuple(v.shape) for k, v in IMRNN(cfg).state_dict().items()}


@pytest.mark.parametrize("field", ["input_dim", "dim", "hidden_dims"])
def test_a_config_with_huge_dimensions_is_refused_before_the_model_is_built(
    tmp_path: Path, field: str, monkeypatch
) -> None:
    # Regression: IMRNN(config) was built (allocating tens of GB) before any shape check.
    target = tmp_path / "ck"
    save_pretrained(_model(), target)
    payload = json.loads((target / "config.json").read_text())
    payload["config"][field] = [10**9, 64] if field == "hidden_dims" else 10**9
    (target / "config.json").write_text(json.dumps(payload))
    built: list[IMRNNConfig] = []
    real_init = IMRNN.__init__

    def init(self, config=None):
        built.append(config)
        assert config is None or config.working_dim < 10**6 > config.input_dim, "huge model"
        assert config is None or max(config.hidden_dims) < 10**6, "huge model"
        real_init(self, config)

    monkeypatch.setattr(IMRNN, "__init__", init)
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor '.*' has shape .*"):
        load_pretrained(target)
    assert built == []


def test_checkpoints_still_load(tmp_path: Path) -> None:
    model = _model(modulation="affine")
    save_pretrained(model, tmp_path / "ck")
    assert weights_equal(load_pretrained(tmp_path / "ck"), model)
