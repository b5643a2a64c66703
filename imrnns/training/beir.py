"""Training from a BEIR folder in one call: embed (cached), prepare, train, optionally refit.

The library entry behind ``imrnns train``. Tested in tests/test_train.py and
tests/test_pseudo_queries.py (on synthetic embeddings and the vendored SciFact).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from imrnns.evaluate import EmbeddedSplit, embed_beir
from imrnns.training.config import TrainConfig
from imrnns.training.data import prepare_training_data
from imrnns.training.loop import train
from imrnns.training.pseudo_queries import PseudoQueries, build_pseudo_queries

__all__ = ["train_from_beir"]


def train_from_beir(
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    split: str = "train",
    config: TrainConfig | None = None,
    encoder: Any = "minilm",
    cache_dir: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
    refit: bool = False,
    refit_epochs: int | None = None,
    embedded: EmbeddedSplit | None = None,
    pseudo: PseudoQueries | None = None,
    show_progress: bool | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Train an adapter on one split of a BEIR folder (the CLI's ``imrnns train``).

    Args:
        data_dir: the BEIR folder (``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``).
        out_dir: where ``best/``, ``last/`` and ``training.json`` go.
        split: the training split; the validation slice is carved from it.
        config: a :class:`TrainConfig`; keyword ``overrides`` replace its fields
            (``modulation="affine"``, ``epochs=5``, ...); an override of None keeps the
            config's value (so a CLI can pass unset options through).
        encoder, cache_dir: the frozen encoder and its embedding cache.
        resume: continue an interrupted run in ``out_dir``.
        progress: progress bars (``show_progress`` is an alias; when given it wins).
        refit: after the validated run, train again on *all* queries of the split (no
            holdout) for the number of epochs validation selected, into ``out_dir/refit``
            (its ``best/`` is the refit adapter). Nothing is selected on the refit itself.
        refit_epochs: refit for this many epochs instead (implies ``refit``): an epoch count
            chosen on validation outside this run, e.g. by cross-validation over several
            validation slices. The schedule still spans ``config.epochs``.
        embedded: precomputed embeddings of the split (skips the encoder).
        pseudo: precomputed corpus pseudo-queries; by default, when
            ``config.pseudo_queries`` is set, :func:`build_pseudo_queries` reads them from
            ``data_dir``'s corpus and encodes them with ``encoder`` (cached).

    Returns:
        :func:`train`'s dict plus ``"dataset"``, ``"split"``, ``"encoder"``, and with
        ``refit`` a ``"refit"`` entry (the refit run's dict, None when epoch 0 won).
    """
    if show_progress is not None:
        progress = show_progress
    if refit_epochs is not None:
        if isinstance(refit_epochs, bool) or not isinstance(refit_epochs, int) or refit_epochs <= 0:
            raise ValueError(f"refit_epochs must be a positive int or None, got {refit_epochs!r}")
        refit = True
    config = config or TrainConfig()
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown training options {unknown}; TrainConfig fields: {sorted(known)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides:
        config = dataclasses.replace(config, **overrides)
    needs_encoder = embedded is None or (config.pseudo_queries and pseudo is None)
    if needs_encoder:
        from imrnns.encoders import resolve_encoder

        # One Encoder for the split and the pseudo-queries: its model loads at most once.
        encoder = resolve_encoder(encoder, cache_dir, progress)
    if embedded is None:
        embedded = embed_beir(
            data_dir, split, encoder=encoder, cache_dir=cache_dir, show_progress=progress
        )
    if config.pseudo_queries and pseudo is None:
        pseudo = build_pseudo_queries(data_dir, config.pseudo_queries, encoder=encoder,
                                      cache_dir=cache_dir, show_progress=progress)  # fmt: skip
    data = prepare_training_data(embedded, config, pseudo=pseudo)
    result = train(data, out_dir, config, resume=resume, progress=progress)
    result.update(dataset=embedded.dataset.name, split=embedded.dataset.split,
                  encoder=embedded.encoder)  # fmt: skip
    if refit:
        result["refit"] = None
        epochs = result["best_epoch"] if refit_epochs is None else refit_epochs
        if epochs > 0:
            all_data = prepare_training_data(embedded, config, holdout=False, pseudo=pseudo)
            result["refit"] = train(all_data, Path(out_dir) / "refit", config, resume=resume,
                                    progress=progress, stop_after=epochs)  # fmt: skip
    return result
