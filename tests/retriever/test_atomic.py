"""imrnns._atomic: debris of killed saves is cleaned, permissions follow the umask."""

from __future__ import annotations

import fcntl
import os
import stat
import subprocess
import sys
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


def _hold_swap_lock(parent: Path) -> subprocess.Popen[str]:
    """Take the swap lock of saves into ``parent`` as another process would (exclusive)."""

    code = (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(parent)!r}, os.O_RDONLY)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('held', flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_held_swap_lock_makes_saves_and_loads_fail_after_a_bounded_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stopped process holding the lock must not hang every save and load: they give up
    with EBUSY after LOCK_WAIT_SECONDS and nothing on disk changes."""
    import errno

    import imrnns._atomic as atomic

    target = tmp_path / "ck"
    save_pretrained(model_v(1), target)
    before = sorted(p.name for p in tmp_path.iterdir())
    monkeypatch.setattr(atomic, "LOCK_WAIT_SECONDS", 0.3)
    holder = _hold_swap_lock(tmp_path)
    try:
        with pytest.raises(OSError) as saving:
            save_pretrained(model_v(2), target)
        assert saving.value.errno == errno.EBUSY and str(tmp_path) in str(saving.value)
        with pytest.raises(OSError) as resolving:
            resolve_directory(target)
        assert resolving.value.errno == errno.EBUSY
    finally:
        holder.communicate("", timeout=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert weights_equal(load_pretrained(target), model_v(1))
    save_pretrained(model_v(2), target)  # the lock released: saves go on
    assert weights_equal(load_pretrained(target), model_v(2))


def test_a_save_inside_a_save_temporary_takes_no_swap_lock(tmp_path: Path) -> None:
    """An index writes its adapter inside its own locked temporary: the nested save must not
    wait for the lock its outer save holds (it would wait LOCK_WAIT_SECONDS, then fail)."""
    import imrnns._atomic as atomic

    with atomic_directory(tmp_path / "idx") as tmp:
        assert atomic._TEMPORARY.fullmatch(tmp.name)
        save_pretrained(model_v(1), tmp / "adapter")
        (tmp / "manifest.json").write_text("{}")
    assert weights_equal(load_pretrained(tmp_path / "idx" / "adapter"), model_v(1))
