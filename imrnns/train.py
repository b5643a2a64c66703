"""Compatibility module: the trainer lives in :mod:`imrnns.training`.

``imrnns.train.train_from_beir``, ``imrnns.train.TrainConfig`` and the other public names
keep working from here (the README documents them under this name); new code imports
:mod:`imrnns.training`. The command line is ``imrnns train`` (or
``python -m imrnns.cli.train``).
"""

from __future__ import annotations

from imrnns.training import (
    FREEZABLE,
    LOSSES,
    MAX_ANCHORS,
    PROJECTOR_INITS,
    PSEUDO_SOURCES,
    SELECTIONS,
    STATE_NAME,
    SUMMARY_NAME,
    PseudoQueries,
    TrainConfig,
    TrainingData,
    base_validation,
    build_pseudo_queries,
    parse_overrides,
    prepare_training_data,
    pseudo_query_texts,
    split_validation,
    train,
    train_from_beir,
    validate,
)

__all__ = [
    "FREEZABLE",
    "LOSSES",
    "MAX_ANCHORS",
    "PROJECTOR_INITS",
    "PSEUDO_SOURCES",
    "SELECTIONS",
    "STATE_NAME",
    "SUMMARY_NAME",
    "PseudoQueries",
    "TrainConfig",
    "TrainingData",
    "base_validation",
    "build_pseudo_queries",
    "parse_overrides",
    "prepare_training_data",
    "pseudo_query_texts",
    "split_validation",
    "train",
    "train_from_beir",
    "validate",
]

if __name__ == "__main__":
    # The old entry point: say where it went instead of exiting 0 having done nothing.
    raise SystemExit(
        "python -m imrnns.train has moved: run `imrnns train` or `python -m imrnns.cli.train` "
        "(same options)"
    )
