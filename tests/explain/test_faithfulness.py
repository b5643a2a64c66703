"""Word attributions through the encoder (imrnns.explain.words) and the faithfulness
benchmark's code path, on a tiny random BERT built here (no MiniLM, no download).

Properties: occlusion equals re-scoring the edited text, by an independent path; integrated
gradients are complete (sum of attributions = A(x) - A(baseline)); gradient x input is the
directional derivative; document deletions never change another document's score; the
benchmark runs end to end on 3 pairs and its occlusion top-1 is the best single deletion.
Also the HTML report's robustness to NaN/Inf scores and lone surrogates.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from imrnns import IMRNN, IMRNNConfig, IMRNNIndex
from imrnns.explain import (
    DEFAULT_METHOD,
    FAITHFULNESS,
    METHOD_FILTERED,
    METHOD_PLAIN,
    WORD_METHODS,
    Explanation,
    TokenScore,
    WordExplainer,
    delete_words,
    format_table,
    render_html,
    word_spans,
)
from imrnns.explain.faithfulness import MEANING
from imrnns.explain.words import _AddedScore

transformers = pytest.importorskip("transformers")
pytest.importorskip("sentence_transformers")
from sentence_transformers import SentenceTransformer  # noqa: E402
from sentence_transformers.base.modules import Normalize  # noqa: E402
from sentence_transformers.sentence_transformer.modules import Pooling  # noqa: E402

WIDTH = 16
WORDS = (
    "protein cell gene dna study cancer mouse human results tumour growth patients "
    "expression binding receptor vitamin risk infection"
).split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CORPUS = [
    "protein binding in human cells",
    "the gene expression study of cancer",
    "mouse tumour growth and dna damage",
    "vitamin d and infection risk in patients",
    "receptor binding protein, cell growth",
    "human cancer patients: results of a study",
    "dna repair genes in mouse cells",
    "infection risk and tumour expression",
]
QUERIES = ["protein binding cells", "cancer gene study", "infection risk of patients"]


def _bert_folder(root: Path) -> Path:
    """A 2-layer, 16-wide BERT with mean pooling and normalisation, as sentence-transformers
    saves it."""
    base = root / "bert"
    base.mkdir()
    vocab = [*SPECIALS, "the", "of", "in", "and", "a", "d", ",", ":", ".", *WORDS]
    vocab = list(dict.fromkeys([*vocab, "##s", "##ing", *"abcdefghijklmnopqrstuvwxyz"]))
    tok = transformers.BertTokenizerFast(
        vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True, model_max_length=512
    )
    tok.save_pretrained(base)
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=WIDTH,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    transformers.BertModel(config).eval().save_pretrained(base)
    transformer = SentenceTransformer(str(base), device="cpu", local_files_only=True)[0]
    transformer.max_seq_length = 24
    model = SentenceTransformer(
        modules=[transformer, Pooling(WIDTH, "mean"), Normalize()], device="cpu"
    )
    path = root / "st"
    model.save(str(path), create_model_card=False)
    return path


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory):
    from imrnns.encoders import Encoder

    path = _bert_folder(tmp_path_factory.mktemp("tiny-encoder"))
    return Encoder(path, device="cpu", batch_size=8, show_progress=False)


@pytest.fixture(scope="module")
def model() -> IMRNN:
    torch.manual_seed(1)
    model = IMRNN(IMRNNConfig(input_dim=WIDTH, dim=8)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return model


@pytest.fixture(scope="module")
def index(model: IMRNN, encoder) -> IMRNNIndex:
    index = IMRNNIndex(model, feedback_k=4)
    index.add(encoder.encode_document(CORPUS, cache=False))
    return index


def _added_pair_alone(model: IMRNN, q: np.ndarray, d: np.ndarray) -> float:
    """A = IMRNN - cos with the document as its own feedback set, via IMRNN.score."""
    qt, dt = torch.from_numpy(q).reshape(1, -1), torch.from_numpy(d).reshape(1, 1, -1)
    imrnn = float(model.score(qt, dt)[0, 0])
    return imrnn - float(torch.nn.functional.cosine_similarity(qt, dt[:, 0])[0])


# --------------------------------------------------------------------------- words


def test_word_spans_and_deletion(encoder):
    tok = encoder.tokenizer
    text = "Café PROTEIN-binding; protein (COVID_19) café."
    spans = word_spans(text, tok)
    assert [w for _, _, w in spans] == [
        "cafe",
        "protein",
        "binding",
        "protein",
        "covid",
        "19",
        "cafe",
    ]
    assert all(text[a:b].lower().startswith(w[:2]) for a, b, w in spans if w != "cafe")
    assert delete_words(text, {"protein"}, tok) == "Café -binding;  (COVID_19) café."
    assert delete_words(text, {"cafe", "19"}, tok) == " PROTEIN-binding; protein (COVID_) ."
    assert delete_words(text, set(), tok) == text


def test_only_words_the_encoder_sees_are_candidates(model, encoder):
    # max_seq_length 24: [CLS] + 22 pieces + [SEP]; "vitamin" occurs only after the cut.
    text = " ".join(["protein cell"] * 11) + " gene vitamin"
    ex = WordExplainer(model, encoder, method="word-gradient")
    (pe,) = ex.word_effects(["cancer"], [text])
    assert pe.document.words == ["protein", "cell"]
    assert pe.document.pieces.tolist() == [11, 11]


# --------------------------------------------------------------------------- methods


@pytest.mark.parametrize("feedback", ["pair", "index"])
def test_occlusion_equals_rescoring_by_construction(model, encoder, index, feedback):
    qt, dt = QUERIES[0], CORPUS[4]
    ex = WordExplainer(model, encoder, method="occlusion")
    fb = None if feedback == "pair" else index
    (pe,) = ex.word_effects([qt], [dt], feedback=fb)
    q0 = encoder.encode_query([qt], cache=False)[0]
    d0 = encoder.encode_document([dt], cache=False)[0]
    assert pe.document.words and pe.query.words
    tok = encoder.tokenizer
    if feedback == "pair":
        a0 = _added_pair_alone(model, q0, d0)
        assert pe.added_score == pytest.approx(a0, abs=1e-6)
        for w, e in zip(pe.document.words, pe.document.effects, strict=True):
            d1 = encoder.encode_document([delete_words(dt, {w}, tok)], cache=False)[0]
            assert e == pytest.approx(a0 - _added_pair_alone(model, q0, d1), abs=1e-6)
        for w, e in zip(pe.query.words, pe.query.effects, strict=True):
            q1 = encoder.encode_query([delete_words(qt, {w}, tok)], cache=False)[0]
            assert e == pytest.approx(a0 - _added_pair_alone(model, q1, d0), abs=1e-6)
        return
    # Index feedback: the query side is a real search of the edited query (its own first
    # stage and feedback set), read back from index.search over the whole corpus.
    doc = 4
    n = index.ntotal

    def searched(q: np.ndarray) -> float:
        scores, ids = index.search(q.reshape(1, -1), k=n, mode="exhaustive")
        imrnn = float(scores[0][list(ids[0]).index(doc)])
        return imrnn - float(np.dot(q, d0) / (np.linalg.norm(q) * np.linalg.norm(d0)))

    a0 = searched(q0)
    assert pe.added_score == pytest.approx(a0, abs=1e-5)
    for w, e in zip(pe.query.words, pe.query.effects, strict=True):
        q1 = encoder.encode_query([delete_words(qt, {w}, tok)], cache=False)[0]
        assert e == pytest.approx(a0 - searched(q1), abs=1e-5)


# The document side is smooth in the input embeddings (the query state is held): Gauss-Legendre
# converges fast, to float32 noise. The query side passes the query HyperNet's ReLUs, whose
# kinks leave a piecewise-smooth integrand: the quadrature error falls only as about 1/steps^2
# (measured here: 0.2-1.2 % at 64 points, 0.02-0.08 % at 256). A mistake in the path, the
# weights or the scaling shows as tens of percent.
@pytest.mark.parametrize(("side", "steps", "rel"), [("document", 32, 1e-3), ("query", 128, 2e-2)])
def test_integrated_gradients_are_complete(model, encoder, index, side, steps, rel):
    ex = WordExplainer(model, encoder, method="integrated-gradients", steps=steps)
    for q, d in zip(QUERIES, CORPUS[:3], strict=True):
        (pe,) = ex.word_effects([q], [d], feedback=index)
        effects = getattr(pe, side)
        total, diff = effects.completeness
        assert abs(diff) > 1e-3  # a meaningful difference to be complete about
        assert total == pytest.approx(diff, rel=rel)
        # Words hold all of it when the text has no punctuation pieces.
        if not any(c in (q if side == "query" else d) for c in ",:."):
            assert effects.effects.sum() == pytest.approx(total, rel=1e-9, abs=1e-12)


def test_gradient_x_input_is_the_directional_derivative(model, encoder):
    """sum_t e_t . dA/de_t = d/da A(a e) at a = 1 (central difference)."""
    ex = WordExplainer(model, encoder, method="gradient-x-input")
    q, d = QUERIES[1], CORPUS[1]
    (pe,) = ex.word_effects([q], [d])
    pieces = ex.path.pieces(d, "document")
    scorer = _AddedScore(model, *(
        torch.from_numpy(x[0]) for x in (encoder.encode_query([q], cache=False),
                                         encoder.encode_document([d], cache=False))
    ), None, None)  # fmt: skip
    h = 1e-3
    emb, _ = ex.path.attribution_pass([d, d], [pieces, pieces], "document", [1 + h, 1 - h], None)
    with torch.no_grad():
        a = scorer.added("document", emb).double()
    numeric = float(a[0] - a[1]) / (2 * h)
    assert pe.document.effects.sum() == pytest.approx(numeric, rel=2e-2, abs=1e-4)


def test_document_deletions_never_change_other_documents_scores(model, encoder, index):
    from benchmarks.explain_faithfulness import corpus_scores_after_doc_edit, rank_of

    q = encoder.encode_query([QUERIES[2]], cache=False)
    state = index.query_state(q)
    tq, qt = state.query_transform, state.modulated_queries
    ids = torch.arange(index.ntotal).unsqueeze(0)
    with torch.no_grad():
        before = model.score_ids(index.projected_corpus, ids, tq, qt)[0].double()
    doc = 3
    tok = encoder.tokenizer
    for words in ({"vitamin"}, {"infection", "risk"}, {"vitamin", "d", "and", "patients"}):
        edited = encoder.encode_document([delete_words(CORPUS[doc], words, tok)], cache=False)
        emb = torch.from_numpy(edited[0])
        after = corpus_scores_after_doc_edit(index, tq, qt, doc, emb)
        others = torch.arange(index.ntotal) != doc
        assert torch.equal(after[others], before[others])
        # ... and the benchmark's shortcut (one score, the others held) agrees with it.
        scorer = _AddedScore(model, torch.from_numpy(q[0]), emb, index, None)
        with torch.no_grad():
            imrnn, _ = scorer.document(emb.reshape(1, -1))
        assert float(imrnn[0]) == pytest.approx(float(after[doc]), abs=1e-6)
        order = sorted(range(index.ntotal), key=lambda j: (-float(after[j]), j))
        assert rank_of(before, doc, float(after[doc])) == order.index(doc) + 1


def test_explain_gives_words_with_signed_effects(model, encoder, index):
    assert DEFAULT_METHOD in WORD_METHODS
    ex = WordExplainer(model, encoder)
    exps = ex.explain(QUERIES[:2], CORPUS[:2], top_k=3, doc_ids=["a", "b"], feedback=index)
    assert [e.document_id for e in exps] == ["a", "b"]
    for e, q, d in zip(exps, QUERIES[:2], CORPUS[:2], strict=True):
        assert e.method == DEFAULT_METHOD and e.attribution == DEFAULT_METHOD
        assert e.score_delta == pytest.approx(e.imrnn_score - e.base_score)
        for toks, text in ((e.query_tokens, q), (e.document_tokens, d)):
            assert 1 <= len(toks) <= 3
            assert {t.token for t in toks} <= {w for _, _, w in word_spans(text, encoder.tokenizer)}
            mags = [abs(t.score) for t in toks]
            assert mags == sorted(mags, reverse=True)
            assert all(t.sign == (1 if t.score >= 0 else -1) for t in toks)
        d = e.to_dict()
        assert d["method"] == DEFAULT_METHOD and "added score" in d["token_scores"]
        assert e.faithfulness == FAITHFULNESS.get(DEFAULT_METHOD)
    table = format_table(exps)
    assert f"scores: {MEANING[DEFAULT_METHOD]} ({DEFAULT_METHOD})" in table
    assert set(MEANING) == set(WORD_METHODS)
    assert "Word scores: the signed effect" in render_html(exps)


def test_demo_prints_the_word_explanation(model, encoder):
    from imrnns import demo
    from imrnns.explain import words

    (ex,) = WordExplainer(model, encoder).explain(QUERIES[0], CORPUS[0], top_k=3, doc_ids=["d0"])
    payload = {**ex.to_dict(), "document": None, "seconds": 0.25}
    lines = "\n".join(demo._explanation_lines(payload))
    assert "why IMRNN ranks [d0] first" in lines and "250 ms" in lines
    assert f"({words.DEFAULT_METHOD};" in lines and "added score" in lines
    for t in ex.document_tokens:
        assert f"{t.token} {t.score:+.3f}" in lines
    figures = {"added_drop_top5": 0.04, "random_top5": 0.007, "idf_top5": 0.0066, "pairs": 100}
    lines = "\n".join(demo._explanation_lines({**payload, "faithfulness": figures}))
    assert "faithfulness: deleting the method's top-5 document words" in lines
    assert "+0.0400" in lines and "+0.0070" in lines and "+0.0066" in lines


def test_bad_input_is_a_clear_error(model, encoder, index):
    from imrnns.encoders import FunctionEncoder

    with pytest.raises(ValueError, match="method must be one of"):
        WordExplainer(model, encoder, method="lime")
    with pytest.raises(ValueError, match="steps must be a positive int"):
        WordExplainer(model, encoder, steps=0)
    with pytest.raises(TypeError, match="transformer encoder"):
        WordExplainer(model, FunctionEncoder(lambda t: np.ones((len(t), WIDTH)), dim=WIDTH))
    with pytest.raises(TypeError, match="model must be an IMRNN"):
        WordExplainer(object(), encoder)  # type: ignore[arg-type]
    wide = IMRNN(IMRNNConfig(input_dim=WIDTH * 2, dim=8))
    with pytest.raises(ValueError, match="gives 16-d embeddings but the adapter takes 32-d"):
        WordExplainer(wide, encoder)
    ex = WordExplainer(model, encoder, method="word-gradient")
    with pytest.raises(ValueError, match="equally many"):
        ex.explain(QUERIES[:2], CORPUS[:1])
    with pytest.raises(TypeError, match="must hold strings"):
        ex.explain([1], ["x"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="feedback must be None"):
        ex.explain(QUERIES[0], CORPUS[0], feedback="index")
    with pytest.raises(ValueError, match=r"feedback must have shape \(B=1, K, 16\)"):
        ex.explain(QUERIES[0], CORPUS[0], feedback=torch.ones(1, 3, 8))
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        ex.explain(QUERIES[0], CORPUS[0], top_k=0)


# --------------------------------------------------------------------------- benchmark


def test_benchmark_smoke_on_three_pairs(model, encoder, index, tmp_path: Path):
    from benchmarks import explain_faithfulness as bench
    from imrnns.explain import CorpusVocabulary

    ctx = bench.Context(
        query_texts=QUERIES,
        corpus_texts=CORPUS,
        relevant=[{0, 4}, {1, 5}, {3, 7}],
        encoder=encoder,
        index=index,
        query_embeddings=encoder.encode_query(QUERIES, cache=False),
        corpus_embeddings=encoder.encode_document(CORPUS, cache=False),
        idf=bench.word_idf(CORPUS, encoder.tokenizer),
        vocabulary=CorpusVocabulary.from_texts(CORPUS, encoder.tokenizer),
    )
    ks = (1, 2)
    result = bench.run(ctx, ks=ks, ig_steps=4, batch_size=8, work=tmp_path / "work")
    assert result["pairs"]["top"] == 3
    records = result["records"]
    for rec in records:
        assert rec["rank"] >= 1
        for side in bench.SIDES:
            curves = rec["curves"][side]
            assert set(curves) == set(bench.METHODS)
            # Occlusion's top word is, by construction, the best single deletion of any
            # method whose top word is a word of the text.
            best = curves["occlusion"]["added"][0]
            for method in (
                "integrated-gradients",
                "gradient-x-input",
                "word-gradient",
                "random",
                "idf",
            ):
                assert curves[method]["added"][0] <= best + 1e-6, (side, method)
    table = result["table"]["top"]["document"]
    for method in bench.METHODS:
        row = table[method]["added"]
        assert len(row["k"]) == len(ks) and all(math.isfinite(x) for x in row["k"])
        assert row["aopc"] == pytest.approx(sum(row["k"]) / len(ks))
    # The journal lets an interrupted run resume: a second run recomputes nothing.
    (journal,) = (tmp_path / "work").iterdir()
    lines = journal.read_text()
    again = bench.run(ctx, ks=ks, ig_steps=4, batch_size=8, work=tmp_path / "work")
    assert journal.read_text() == lines
    assert again["records"] == json.loads(json.dumps(records))
    js, md = bench.write(result, tmp_path / "out", "smoke", "test machine")
    assert json.loads(js.read_text())["table"] == json.loads(json.dumps(result["table"]))
    assert "| occlusion |" in md.read_text()


def test_faithfulness_figures_match_the_benchmark_json():
    path = (
        Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "explain-faithfulness.json"
    )
    if not path.exists():
        pytest.skip("no benchmark result in benchmarks/results")
    result = json.loads(path.read_text())
    ks = result["config"]["ks"]
    k5 = ks.index(5)
    table = result["table"]["top"]
    assert FAITHFULNESS, "benchmark ran but imrnns.explain.faithfulness holds no figures"
    names = {METHOD_PLAIN: "plain", METHOD_FILTERED: "filtered"}  # the benchmark's names
    assert set(FAITHFULNESS) == {*WORD_METHODS, *names}
    for name, fig in FAITHFULNESS.items():
        method = names.get(name, name)
        doc, query = table["document"], table["query"]
        assert fig["pairs"] == result["pairs"]["top"]
        assert fig["added_drop_top5"] == pytest.approx(doc[method]["added"]["k"][k5], abs=5e-5)
        assert fig["random_top5"] == pytest.approx(doc["random"]["added"]["k"][k5], abs=5e-5)
        assert fig["idf_top5"] == pytest.approx(doc["idf"]["added"]["k"][k5], abs=5e-5)
        assert fig["query_added_drop_top5"] == pytest.approx(
            query[method]["added"]["k"][k5], abs=5e-5
        )


# --------------------------------------------------------------------------- HTML robustness


def _explanation(score: float, text: str = "cell growth", token: str = "cell") -> Explanation:
    t = TokenScore(token, score, 1 if not score < 0 else -1)
    m = torch.zeros(3)
    return Explanation([t], [t], 0.1, 0.2, 0.1, m, m, query_text="q " + text, document_text=text)


@pytest.mark.parametrize("score", [float("nan"), float("inf"), float("-inf")])
def test_html_report_shows_non_finite_scores(tmp_path: Path, score: float):
    # Regression: round(NaN) raised "cannot convert float NaN to integer" (Inf: NaN / Inf).
    out = tmp_path / "r.html"
    text = render_html([_explanation(score)], out)
    shown = "nan" if math.isnan(score) else ("+inf" if score > 0 else "-inf")
    assert f'<td class="num">{shown}</td>' in text and out.read_text() == text
    assert 'style="width:0px"' in text
    assert shown in format_table([_explanation(score)])


def test_html_report_replaces_lone_surrogates(tmp_path: Path):
    # Regression: writing the report raised UnicodeEncodeError ("surrogates not allowed").
    out = tmp_path / "r.html"
    ex = _explanation(0.5, text="bad \ud800 cell <b>", token="cell\udfff")
    text = render_html([ex], out, title="t \udc80")
    assert "\ufffd" in out.read_text(encoding="utf-8") and out.read_text() == text
    assert "bad \ufffd cell &lt;b&gt;" in text.replace("<mark", "|").split("|")[0] + text
    assert "&lt;b&gt;" in text and "t \ufffd" in text
