"""Fixtures of the bad-input suite: a pristine workspace per module, a fresh copy per test."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.bad_input.harness import Workspace, workspace_data, workspace_model, write_beir


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pristine")
    model = workspace_model()
    corpus, _ = workspace_data()
    ws = Workspace(root, model, corpus, workspace_data()[1])
    ws.index().save(ws.index_dir)
    model.save_pretrained(ws.adapter_dir)
    state = {k.replace("projector.", "sbert_projector."): v for k, v in model.state_dict().items()}
    torch.save(
        {"model_state": state, "metadata": {"checkpoint_format": "imrnns-adapter-only-v1"}},
        ws.official,
    )
    write_beir(ws.beir)
    return root


@pytest.fixture
def workspace(pristine, tmp_path) -> Workspace:
    root = tmp_path / "ws"
    shutil.copytree(pristine, root)
    corpus, queries = workspace_data()
    return Workspace(root, workspace_model(), corpus, queries)
