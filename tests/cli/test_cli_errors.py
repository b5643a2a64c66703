"""Errors end a command in one line on stderr and exit status 2, not a traceback.

Before, only ValueError, TypeError and OSError were reported that way: a RuntimeError (faiss,
torch, an out-of-memory, a failed rank), an AssertionError (faiss's argument checks) or a
SafetensorError ended in a traceback and exit status 1. ``--debug`` / ``IMRNNS_DEBUG=1``
keep the traceback; programming errors (AttributeError, ...) always do.
"""

from __future__ import annotations

import runpy
import sys
import warnings

import pytest
import torch
from safetensors import SafetensorError

import imrnns.cli as cli
from imrnns.cli import guarded, main

LIBRARY_ERRORS = {
    "runtime": RuntimeError("Error in faiss::write_index: fwrite failed: No space left on device"),
    "out-of-memory": torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    "assertion": AssertionError(),  # faiss: `assert d == self.d`, no message
    "safetensors": SafetensorError("Error while deserializing header: HeaderTooLarge"),
    "memory": MemoryError(),
    "permission": PermissionError(13, "Permission denied", "/data/index"),
    "timeout": TimeoutError("rank 0: search(): not every rank of the group joined within 300 s"),
    "multi-line": RuntimeError("first line\n  second line\n"),
}
WANT = {
    "runtime": "RuntimeError: Error in faiss::write_index: fwrite failed: No space left on device",
    "out-of-memory": "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
    "assertion": "AssertionError",
    "safetensors": "SafetensorError: Error while deserializing header: HeaderTooLarge",
    "memory": "MemoryError",
    "permission": "[Errno 13] Permission denied: '/data/index'",
    "timeout": "rank 0: search(): not every rank of the group joined within 300 s",
    "multi-line": "RuntimeError: first line second line",
}


@pytest.fixture
def failing_demo(monkeypatch):
    """``imrnns demo`` raising the exception ``raise_(exc)`` sets (no model is loaded)."""
    monkeypatch.delenv("IMRNNS_DEBUG", raising=False)
    box: list[BaseException] = []

    def cmd(_args):
        raise box[0]

    monkeypatch.setattr(cli, "cmd_demo", cmd)
    return box.append


@pytest.mark.parametrize("name", list(LIBRARY_ERRORS))
def test_library_errors_are_one_line_and_exit_2(name, failing_demo, capsys):
    failing_demo(LIBRARY_ERRORS[name])
    assert main(["demo"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"imrnns demo: error: {WANT[name]}"), err
    if not isinstance(LIBRARY_ERRORS[name], ValueError | TypeError | OSError):
        assert err.rstrip().endswith("(--debug or IMRNNS_DEBUG=1 shows the traceback)")


@pytest.mark.parametrize("name", ["runtime", "assertion", "safetensors"])
def test_debug_flag_and_env_keep_the_traceback(name, failing_demo, monkeypatch):
    exc = LIBRARY_ERRORS[name]
    failing_demo(exc)
    with pytest.raises(type(exc)) as raised:
        main(["demo", "--debug"])
    assert raised.value is exc
    monkeypatch.setenv("IMRNNS_DEBUG", "1")
    with pytest.raises(type(exc)):
        main(["demo"])


def test_programming_errors_keep_their_traceback(failing_demo):
    failing_demo(AttributeError("'NoneType' object has no attribute 'shape'"))
    with pytest.raises(AttributeError):
        main(["demo"])


def test_guarded_reads_debug_from_argv_for_the_module_entry_points(monkeypatch):
    monkeypatch.delenv("IMRNNS_DEBUG", raising=False)

    def boom() -> int:
        raise RuntimeError("disk full")

    monkeypatch.setattr(sys, "argv", ["prog", "--data", "d"])
    assert guarded(boom, "prog") == 2
    monkeypatch.setattr(sys, "argv", ["prog", "--data", "d", "--debug"])
    with pytest.raises(RuntimeError, match="disk full"):
        guarded(boom, "prog")


@pytest.mark.parametrize("module", ["imrnns.cli.train", "imrnns.cli.evaluate"])
@pytest.mark.parametrize("debug", [False, True])
def test_module_entry_points_report_runtime_errors(module, debug, monkeypatch, capsys, tmp_path):
    import imrnns.evaluate
    import imrnns.training

    monkeypatch.delenv("IMRNNS_DEBUG", raising=False)

    def full_disk(*args, **kwargs):
        raise RuntimeError("fwrite failed: No space left on device")

    target = imrnns.training if module == "imrnns.cli.train" else imrnns.evaluate
    name = "train_from_beir" if module == "imrnns.cli.train" else "evaluate_beir"
    monkeypatch.setattr(target, name, full_disk)
    argv = [module, "--data", str(tmp_path)] + ["--out", str(tmp_path / "o")] * (
        module == "imrnns.cli.train"
    )
    monkeypatch.setattr(sys, "argv", argv + ["--debug"] * debug)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "found in sys.modules" of runpy
        if debug:
            with pytest.raises(RuntimeError, match="No space left"):
                runpy.run_module(module, run_name="__main__")
            return
        with pytest.raises(SystemExit) as exc:
            runpy.run_module(module, run_name="__main__")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"python -m {module}: error: RuntimeError: fwrite failed")
    assert err.count("\n") == 1


@pytest.mark.parametrize("bad", ["0", "-5", "nan", "inf", "soon"])
def test_dist_timeout_must_be_positive_seconds(bad, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["search", "q", "--distributed", "--dist-timeout", bad])
    assert exc.value.code == 2
    assert "--dist-timeout" in capsys.readouterr().err


def test_dist_timeout_reaches_the_process_group(monkeypatch, capsys):
    from datetime import timedelta

    import imrnns.cli.distributed as cli_distributed

    seen = {}

    def init_from_env(backend, timeout=None):
        seen["timeout"] = timeout
        raise RuntimeError("no rendezvous")

    monkeypatch.setattr(cli_distributed, "init_from_env", init_from_env)
    assert main(["search", "q", "--distributed", "--dist-timeout", "42"]) == 2
    assert seen["timeout"] == timedelta(seconds=42)
    assert capsys.readouterr().err.startswith("imrnns search: error: RuntimeError: no rendezvous")
