"""The experiment scripts behind RESULTS figures, checked on their cheap parts.

experiments/rerank_unseen_doc_variants.py (two issue-6 tables): its folds and score variants
(the grids themselves need trained fold models: minutes). experiments/explanation_token_overlap.py
(the issue-7 table): the word-overlap share it reports (the run itself encodes SciFact)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from experiments import explanation_token_overlap as X
from experiments import rerank_unseen_doc_variants as V
from imrnns.data import load_beir, scifact_path


def test_folds_are_the_documented_disjoint_slices() -> None:
    ds = load_beir(scifact_path(), "train")
    folds = V._folds(list(ds.query_ids), ds.qrels)
    assert [len(f) for f in folds] == [121, 121, 121]
    assert len(set().union(*folds)) == 363  # disjoint
    # The first fold is the trainer's own seed-42 validation slice.
    from imrnns.training import split_validation

    usable = [q for q in ds.query_ids if any(g > 0 for g in ds.qrels[q].values())]
    assert sorted(folds[0]) == sorted(split_validation(usable, 0.15, 42)[1])


def test_variants_end_at_the_imrnn_and_at_the_base() -> None:
    rng = np.random.default_rng(0)
    s_im, s_base = rng.standard_normal((2, 5, 7)).astype(np.float32)
    novelty = rng.uniform(0, 1, 5)
    grid = V.GRIDS["gate"]
    assert np.array_equal(V._variant("gate", grid[0], s_im, s_base, novelty), s_im)
    assert np.array_equal(V._variant("gate", grid[-1], s_im, s_base, novelty), s_base)
    mixed = V._variant("gate", 0.5, s_im, s_base, novelty)
    assert np.array_equal(mixed[novelty >= 0.5], s_im[novelty >= 0.5])
    assert np.array_equal(mixed[novelty < 0.5], s_base[novelty < 0.5])
    assert np.array_equal(V._variant("interpolation", 0.0, s_im, s_base, novelty), s_im)
    lam = V.GRIDS["interpolation"][-1]
    assert np.allclose(V._variant("interpolation", lam, s_im, s_base, novelty), s_base)


def test_rerank_orders_rows_by_score_then_lower_id() -> None:
    scores = np.array([[0.1, 0.3, 0.3, 0.2]], np.float32)
    ids = np.array([[4, 9, 2, 7]])
    s, i = V._rerank(scores, ids)
    assert i.tolist() == [[2, 9, 7, 4]] and s[0].tolist() == pytest.approx([0.3, 0.3, 0.2, 0.1])


def test_explanation_share_counts_tokens_that_are_words_of_the_pair() -> None:
    assert X.text_words("Caf\u00e9-au-lait: 2 CUPS!") == {"cafe", "au", "lait", "2", "cups"}
    assert X.token_word("##Lait") == "lait"

    def tokens(*names: str) -> list[SimpleNamespace]:
        return [SimpleNamespace(token=name) for name in names]

    pair = SimpleNamespace(
        query_text="Vitamin D levels",
        document_text="Serum vitamin was measured",
        query_tokens=tokens("vitamin", "##d", "zinc"),  # 2 of 3 are words of the pair
        document_tokens=tokens("serum", "iron"),  # 1 of 2
    )
    share = X.grounded_share([pair])
    assert share["share"] == pytest.approx(3 / 5)
    assert share["share_query_side"] == pytest.approx(2 / 3)
    assert share["share_document_side"] == pytest.approx(1 / 2)
    assert share["tokens_per_side"] == pytest.approx(5 / 2)
