"""Random inputs for the scoring ops: re-exported from :mod:`imrnns_kernels.testing`."""

from imrnns_kernels.testing import ScoringInputs, scoring_inputs

__all__ = ["ScoringInputs", "scoring_inputs"]
