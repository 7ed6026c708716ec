"""Behaviour shared by rmkit's text-level reward models."""

from __future__ import annotations

import numpy as np

__all__ = ["TextRewardModelMixin"]


class TextRewardModelMixin:
    """For estimators whose ``predict`` on pairs returns P(chosen ≻ rejected).

    ``score`` is pairwise accuracy (ties, P = 0.5, count as wrong), and the
    sklearn tags say the input is text, not a numeric array.
    """

    def score(self, X, y=None):
        """Pairwise accuracy on preference pairs."""
        return float(np.mean(self.predict(X) > 0.5))

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.string = True
        return tags
