"""The names of the word-attribution methods and the default, without importing torch: the
command line builds its ``--method`` choices from them at ``imrnns --help``."""

from __future__ import annotations

METHOD_OCCLUSION = "occlusion"
METHOD_INTEGRATED_GRADIENTS = "integrated-gradients"
METHOD_GRADIENT_X_INPUT = "gradient-x-input"
METHOD_WORD_GRADIENT = "word-gradient"
WORD_METHODS = (
    METHOD_OCCLUSION,
    METHOD_INTEGRATED_GRADIENTS,
    METHOD_GRADIENT_X_INPUT,
    METHOD_WORD_GRADIENT,
)
# Chosen by benchmarks/explain_faithfulness.py (benchmarks/RESULTS.md, "Faithfulness of
# explanations"): its top-5 document words lower the added score over 2x as much as 5 random
# words and more than the 5 highest-IDF words, at milliseconds per explanation; occlusion
# (exact, about twice as faithful) costs one encoder pass per word.
DEFAULT_METHOD = METHOD_WORD_GRADIENT
