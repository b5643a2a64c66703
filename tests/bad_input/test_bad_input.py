"""Bad input across the public API and the CLI: a clear error, and nothing on disk changes.

Every case is one distinct bad input: wrong shapes, dtypes, NaN/Inf, empty corpora, k > N,
missing files, malformed JSONL/TSV, truncated or tampered checkpoints and indexes, the wrong
encoder for an index. Each runs in a fresh copy of a workspace holding a saved index, a saved
adapter, an official-format ``.pt`` checkpoint and a BEIR folder; the test hashes every file
and folder name under the workspace before and after the call and requires both to match,
so a failed call never half-writes, "repairs", deletes or leaves temporary files.

``ERROR_CASES`` raise the exception type named with a message matching the pattern (the
pattern names the argument, file, shape or dtype at fault). ``DEFINED_CASES`` are inputs
some libraries reject but this API defines (k larger than the corpus pads with ``-inf`` /
``-1``, as faiss does); they are counted too. ``NUM_CASES`` is the number the README quotes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from imrnns.data import load_beir

# Importing a case file registers its cases.
from tests.bad_input import (  # noqa: F401
    cases_checkpoints,
    cases_cli,
    cases_data,
    cases_distributed,
    cases_index,
    cases_model,
    cases_ops,
    cases_training,
)
from tests.bad_input.harness import DEFINED_CASES, ERROR_CASES, Case, Workspace, tree_hash

# --------------------------------------------------------------------------- the tests
NUM_ERROR_CASES = len(ERROR_CASES)
NUM_DEFINED_CASES = len(DEFINED_CASES)
NUM_CASES = NUM_ERROR_CASES + NUM_DEFINED_CASES
SLOW = {"cli:cli_wrong_encoder_for_the_index"}
# Cases that fail because of a reported bug elsewhere: xfail (never skipped), so a fix shows up
# as XPASS. Empty now: cli.py's evaluate/train argument mismatch found by this suite is fixed.
KNOWN_BUGS: dict[str, str] = {}


def _params(cases: dict[str, Case]) -> list[Any]:
    out = []
    for name in cases:
        marks: list[Any] = [pytest.mark.slow] if name in SLOW else []
        if name in KNOWN_BUGS:
            marks.append(pytest.mark.xfail(reason=KNOWN_BUGS[name], strict=False))
        out.append(pytest.param(name, marks=marks, id=name))
    return out


@pytest.mark.parametrize("name", _params(ERROR_CASES))
def test_bad_input_fails_clearly_and_changes_nothing(name: str, workspace: Workspace) -> None:
    c = ERROR_CASES[name]
    action = c.setup(workspace)
    before = tree_hash(workspace.root)
    assert c.exc is not None
    with pytest.raises(c.exc, match=c.match):
        action()
    assert tree_hash(workspace.root) == before, f"{name}: the failed call changed files on disk"
    assert not Path("pwned").exists(), "a checkpoint ran pickled code"


@pytest.mark.parametrize("name", _params(DEFINED_CASES))
def test_defined_behaviour_and_nothing_changes(name: str, workspace: Workspace) -> None:
    action = DEFINED_CASES[name].setup(workspace)
    before = tree_hash(workspace.root)
    action()
    assert tree_hash(workspace.root) == before


def test_utf8_error_names_the_right_line(workspace: Workspace) -> None:
    """A bad byte on line 5 must be reported on line 5 (found by the suite, reported)."""
    path = workspace.beir / "corpus.jsonl"
    path.write_bytes(path.read_bytes() + b'{"_id": "\xff"}\n')
    with pytest.raises(ValueError, match=r"corpus.jsonl:5: not valid UTF-8"):
        load_beir(workspace.beir, "test")


def test_case_count() -> None:
    # The README quotes NUM_CASES; every area of the public surface is covered.
    areas = {c.area for c in ERROR_CASES.values()} | {c.area for c in DEFINED_CASES.values()}
    assert areas == {
        "ops",
        "model",
        "index",
        "index-files",
        "checkpoint",
        "data",
        "distributed",
        "cli",
        "encoder",
    }
    assert NUM_CASES == len(set(ERROR_CASES) | set(DEFINED_CASES)) >= 100
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert f"{NUM_CASES} bad-input" in " ".join(readme.split()), "README quotes another count"
