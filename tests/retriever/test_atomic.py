"""imrnns._atomic: debris of killed saves is cleaned, permissions follow the umask."""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path

import pytest

from imrnns._atomic import atomic_directory, atomic_file, clean_debris, resolve_directory
from imrnns.checkpoints import load_pretrained, save_pretrained
from tests.helpers import child_save, kill_at, model_v, weights_equal


def _debris(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.endswith((".tmp", ".old")))


@pytest.mark.parametrize("point", ["writing", "before-swap", "mid-swap"])
def test_next_save_cleans_debris_of_a_killed_save(tmp_path: Path, point: str) -> None:
    target, ready = tmp_path / "ck", tmp_path / "ready"
    save_pretrained(model_v(1), target)
    kill_at(child_save, ("model", point, target, ready, model_v(2)), ready)
    assert _debris(tmp_path), "the killed save should have left a temporary behind"
    # Files of other names, a sibling path's debris and look-alikes must survive.
    foreign = [
        tmp_path / ".ck.v2.abcdefgh.tmp",  # debris of "ck.v2", not of "ck"
        tmp_path / ".ck.abcdefgh.tmp.keep",
        tmp_path / "ck.tmp",
        tmp_path / ".ck.ABCDEFGH.tmp",  # upper case: never a mkdtemp name
        tmp_path / ".ckx.abcdefgh.old",
    ]
    for f in foreign:
        f.write_text("not ours")
    save_pretrained(model_v(3), target)
    assert weights_equal(load_pretrained(target), model_v(3))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == sorted(
        f.name for f in foreign if f.name.startswith(".")
    )
    assert all(f.read_text() == "not ours" for f in foreign)


def test_an_old_directory_is_kept_while_it_is_the_only_content(tmp_path: Path) -> None:
    """A swap killed half-way leaves only ``.ck.*.old``: cleaning must not delete it."""
    target, ready = tmp_path / "ck", tmp_path / "ready"
    save_pretrained(model_v(1), target)
    kill_at(child_save, ("model", "mid-swap", target, ready, model_v(2)), ready)
    assert not target.exists()
    assert all(p.name.endswith(".tmp") for p in clean_debris(target))
    assert weights_equal(load_pretrained(resolve_directory(target)), model_v(1))
    assert any(n.endswith(".old") for n in _debris(tmp_path))


def test_a_live_save_is_not_debris(tmp_path: Path) -> None:
    """A temporary whose writer is alive (it holds its lock) is left alone."""
    target = tmp_path / "idx"
    with atomic_directory(target) as tmp:
        (tmp / "a").write_text("1")
        assert clean_debris(target) == []
        assert tmp.exists()
    # A temporary nobody holds is stale.
    stale = tmp_path / ".idx.abcd_123.tmp"
    stale.mkdir()
    assert clean_debris(target) == [stale]
    assert not stale.exists() and (target / "a").read_text() == "1"


def test_a_locked_foreign_lookalike_is_left(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    held = tmp_path / ".out.json.zzzzzzzz.tmp"
    held.write_text("{}")
    fd = os.open(held, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with atomic_file(target, "w") as fh:
            fh.write("{}")
        assert held.exists()
    finally:
        os.close(fd)
    with atomic_file(target, "w") as fh:
        fh.write("[]")
    assert not held.exists() and target.read_text() == "[]"


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077, 0o002])
def test_new_directories_and_files_follow_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        with atomic_directory(tmp_path / "d") as tmp:
            (tmp / "f").write_text("x")
        with atomic_file(tmp_path / "f.json", "w") as fh:
            fh.write("{}")
        plain = tmp_path / "plain"
        plain.mkdir()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)
    assert stat.S_IMODE((tmp_path / "f.json").stat().st_mode) == 0o666 & ~umask
