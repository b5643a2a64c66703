"""Official checkpoint import, our safetensors format, and their failure modes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from imrnns import IMRNN, CheckpointError, IMRNNConfig
from imrnns import _checkpoint_io as ckpt
from imrnns.checkpoints import load_pretrained, save_pretrained
from tests.helpers import randomised
from tests.restate import restate_scores

OFFICIAL = Path(__file__).resolve().parents[2].parent / "shared" / "checkpoints" / "official-v0.1"
OFFICIAL_FILES = sorted(OFFICIAL.glob("*.pt"))


def test_official_checkpoints_are_present():
    # ../shared is beside the checkout on every developer machine and in CI.
    assert len(OFFICIAL_FILES) == 8, f"expected the 8 official v0.1 checkpoints in {OFFICIAL}"


@pytest.mark.parametrize("path", OFFICIAL_FILES, ids=lambda p: p.stem)
def test_official_v01_loads_and_matches_restatement(path: Path):
    model = IMRNN.from_pretrained(path)
    cfg = model.config
    n = 1024 if "-e5-" in path.name else 384
    assert (cfg.input_dim, cfg.working_dim, cfg.modulation) == (n, 256, "diagonal")
    assert cfg.aggregation == "transform_of_mean"
    raw = torch.load(path, weights_only=True)["model_state"]
    q, c = torch.randn(2, n), torch.randn(2, 100, n)
    got = model.score(q, c)
    assert got.shape == (2, 100) and got.dtype == torch.float32
    for i in range(2):
        want = restate_scores(raw, q[i], c[i], aggregation="transform_of_mean")
        torch.testing.assert_close(got[i].double(), want, atol=2e-5, rtol=0)


@pytest.mark.parametrize("modulation", ["diagonal", "affine"])
@pytest.mark.parametrize("aggregation", ["mean_of_transforms", "transform_of_mean"])
def test_save_load_round_trip(tmp_path, modulation, aggregation):
    cfg = IMRNNConfig(
        input_dim=30, dim=13, modulation=modulation, aggregation=aggregation, hidden_dims=(32, 16)
    )
    model = randomised(cfg)
    out = model.save_pretrained(tmp_path / "adapter")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    again = IMRNN.from_pretrained(out)
    assert again.config == cfg
    q, c = torch.randn(3, 30), torch.randn(3, 4, 30)
    assert torch.equal(again.score(q, c), model.score(q, c))
    assert not list(tmp_path.glob(".*")), "temporary files left behind"


def test_save_overwrites_and_failed_save_keeps_previous(tmp_path, monkeypatch):
    first, second = randomised(IMRNNConfig(input_dim=8)), randomised(IMRNNConfig(input_dim=8))
    target = tmp_path / "adapter"
    first.save_pretrained(target)
    q, c = torch.randn(1, 8), torch.randn(1, 3, 8)
    expected = first.score(q, c)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        second.save_pretrained(target)
    monkeypatch.undo()
    assert torch.equal(IMRNN.from_pretrained(target).score(q, c), expected)
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
    second.save_pretrained(target)
    assert torch.equal(IMRNN.from_pretrained(target).score(q, c), second.score(q, c))


def test_official_v02_state_dict_semantics(tmp_path):
    model = randomised(IMRNNConfig(input_dim=24, dim=24))
    path = tmp_path / "v02.pt"
    meta = {"checkpoint_format": "imrnns-final-v1", "model_config": {"input_dim": 24}}
    torch.save({"model_state": model.state_dict(), "metadata": meta}, path)
    loaded = IMRNN.from_pretrained(path)
    assert loaded.config.aggregation == "mean_of_transforms"
    q, c = torch.randn(2, 24), torch.randn(2, 5, 24)
    torch.testing.assert_close(loaded.score(q, c), model.score(q, c))
    # bare state dict, semantics forced
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    forced = IMRNN.from_pretrained(tmp_path / "bare.pt", semantics="v0.1")
    assert forced.config.aggregation == "transform_of_mean"


def test_legacy_projector_prefix(tmp_path):
    raw = torch.load(OFFICIAL_FILES[0], weights_only=True)
    state = {
        (k.replace("projector.", "e5_projector.") if k.startswith("projector.") else k): v
        for k, v in raw["model_state"].items()
    }
    torch.save({"model_state": state, "metadata": raw["metadata"]}, tmp_path / "legacy.pt")
    a, b = IMRNN.from_pretrained(tmp_path / "legacy.pt"), IMRNN.from_pretrained(OFFICIAL_FILES[0])
    assert torch.equal(a.projector.weight, b.projector.weight)


def test_affine_state_dict_is_detected(tmp_path):
    model = randomised(IMRNNConfig(input_dim=10, dim=6, modulation="affine"))
    torch.save(model.state_dict(), tmp_path / "affine.pt")
    assert IMRNN.from_pretrained(tmp_path / "affine.pt").config.modulation == "affine"


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        IMRNN.from_pretrained(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        IMRNN.from_pretrained(tmp_path / "nodir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        IMRNN.from_pretrained(tmp_path / "empty")


def test_truncated_official_checkpoint(tmp_path):
    data = OFFICIAL_FILES[0].read_bytes()
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.pt: cannot read checkpoint"):
        IMRNN.from_pretrained(bad)


def test_truncated_safetensors(tmp_path):
    randomised(IMRNNConfig(input_dim=8)).save_pretrained(tmp_path / "a")
    weights = tmp_path / "a" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model.safetensors: unreadable or truncated"):
        IMRNN.from_pretrained(tmp_path / "a")


def test_bad_config_json(tmp_path):
    randomised(IMRNNConfig(input_dim=8)).save_pretrained(tmp_path / "a")
    cfg = tmp_path / "a" / "config.json"
    cfg.write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        IMRNN.from_pretrained(tmp_path / "a")
    cfg.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError, match="not an imrnns-kernels-adapter config"):
        IMRNN.from_pretrained(tmp_path / "a")


def test_mismatched_shapes_name_the_key(tmp_path):
    randomised(IMRNNConfig(input_dim=8, dim=8)).save_pretrained(tmp_path / "a")
    payload = json.loads((tmp_path / "a" / "config.json").read_text())
    payload["config"]["dim"] = 6
    (tmp_path / "a" / "config.json").write_text(json.dumps(payload))
    with pytest.raises(
        CheckpointError, match=r"'projector.weight' has shape \(8, 8\), expected \(6, 8\)"
    ):
        IMRNN.from_pretrained(tmp_path / "a")


def test_missing_and_unexpected_keys(tmp_path):
    raw = torch.load(OFFICIAL_FILES[0], weights_only=True)
    state = dict(raw["model_state"])
    del state["doc_norm.bias"]
    state["extra.weight"] = torch.zeros(1)
    torch.save({"model_state": state, "metadata": raw["metadata"]}, tmp_path / "keys.pt")
    with pytest.raises(
        CheckpointError, match=r"missing keys \['doc_norm.bias'\].*\['extra.weight'\]"
    ):
        IMRNN.from_pretrained(tmp_path / "keys.pt")


def test_wrong_output_width(tmp_path):
    state = randomised(IMRNNConfig(input_dim=8, dim=4)).state_dict()
    state["query_hypernet.hypernet.6.weight"] = torch.zeros(9, 64)
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match="output width 9 fits neither"):
        IMRNN.from_pretrained(tmp_path / "w.pt")


def test_non_finite_weights_rejected(tmp_path):
    state = randomised(IMRNNConfig(input_dim=8, dim=4)).state_dict()
    state["doc_norm.weight"][0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match="'doc_norm.weight' contains NaN"):
        IMRNN.from_pretrained(tmp_path / "nan.pt")


def test_pickled_code_is_not_executed(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model_state": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        IMRNN.from_pretrained(tmp_path / "evil.pt")


def test_saving_the_same_model_twice_gives_identical_bytes(tmp_path):
    """safetensors writes its metadata map in hash order; save_pretrained sorts it."""
    model = IMRNN(IMRNNConfig(input_dim=24, dim=16))
    blobs = set()
    for i in range(8):  # two metadata keys: each order about half the time before the fix
        save_pretrained(model, tmp_path / f"ck{i}")
        blobs.add((tmp_path / f"ck{i}" / "model.safetensors").read_bytes())
        assert (tmp_path / f"ck{i}" / "config.json").read_bytes() == (
            tmp_path / "ck0" / "config.json"
        ).read_bytes()
    assert len(blobs) == 1
    loaded = load_pretrained(tmp_path / "ck3")
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


def test_save_refuses_to_replace_a_directory_of_other_files(tmp_path):
    # Regression: the atomic swap replaced the directory as a whole, deleting unrelated files.
    model = randomised(IMRNNConfig(input_dim=8))
    target = tmp_path / "work"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    refused = r"work is not an earlier adapter checkpoint save \(it has no config.json; .*notes"
    with pytest.raises(ValueError, match=refused):
        model.save_pretrained(target)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    model.save_pretrained(empty)  # an empty directory, or an earlier checkpoint, is fine
    model.save_pretrained(empty)
    assert sorted(p.name for p in empty.iterdir()) == ["config.json", "model.safetensors"]


def test_non_int_format_version_is_a_checkpoint_error(tmp_path):
    out = randomised(IMRNNConfig(input_dim=8)).save_pretrained(tmp_path / "adapter")
    payload = json.loads((out / "config.json").read_text())
    payload["format_version"] = "1"
    (out / "config.json").write_text(json.dumps(payload))
    with pytest.raises(CheckpointError, match="config.json: format_version must be an int"):
        IMRNN.from_pretrained(out)
