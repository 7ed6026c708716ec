"""A linear Bradley–Terry reward head on a feature frame: the simplest reward model."""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from rmkit.base import RewardModelMixin
from rmkit.layout import read_layout
from rmkit.objectives._multiobjective import MultiObjectiveRegressor

__all__ = ["BradleyTerryProbe"]


class BradleyTerryProbe(RewardModelMixin, BaseEstimator):
    """A linear reward ``r = w · h`` on the response features, fitted Bradley–Terry on pairs.

    The final step of a reward-model pipeline after a
    :class:`~rmkit.BackboneFeaturizer`: it is a
    :class:`~rmkit.MultiObjectiveRegressor` with one pairwise objective
    (penalty chosen by prompt-grouped cross-validation), exposed as a reward
    model with rmkit's contract (a reward per response; margin, preference
    and accuracy per pair). A cheap ensemble member and the "BT probe"
    baseline of the benchmarks.

    Parameters
    ----------
    alphas : array-like, default=None
        Penalty grid (``C = 1 / alpha``); ``None`` scans ``1e-4 .. 1e4``.
    cv : int or splitter, default=5
        Prompt-grouped folds for choosing the penalty.
    random_state : int, RandomState or None, default=None

    Attributes
    ----------
    probe_ : MultiObjectiveRegressor
    coef_ : ndarray of shape (n_features,)
        Weights on the raw response features.

    Examples
    --------
    >>> from sklearn.pipeline import make_pipeline
    >>> from rmkit import BackboneFeaturizer
    >>> from rmkit.datasets import make_preference_pairs
    >>> from rmkit.ensemble import BradleyTerryProbe
    >>> from rmkit.testing import tiny_backbone
    >>> pairs = make_preference_pairs(30, random_state=0)
    >>> rm = make_pipeline(BackboneFeaturizer(tiny_backbone(), cache=False, verbose=0),
    ...                    BradleyTerryProbe(random_state=0)).fit(pairs)
    >>> rm.predict(pairs[["prompt", "chosen"]].rename(columns={"chosen": "response"})).shape
    (30,)
    """

    def __init__(self, alphas=None, *, cv=5, random_state=None):
        self.alphas = alphas
        self.cv = cv
        self.random_state = random_state

    def fit(self, X, y=None, *, sample_weight=None, groups=None):
        """Fit on a feature frame of preference pairs (``y``: 1/0 which side is preferred, optional)."""
        read_layout(X, step="BradleyTerryProbe", need=[("side", "h")], kind="pairs")
        self.probe_ = MultiObjectiveRegressor(self.alphas, cv=self.cv, random_state=self.random_state).fit(
            X, y, sample_weight=sample_weight, groups=groups)
        self.coef_ = self.probe_.coef_[0]
        return self

    def _scores(self, X):
        check_is_fitted(self, "probe_")
        R = self.probe_.transform(X)
        lay = read_layout(R, step="BradleyTerryProbe")
        s = np.column_stack([lay.block(R, side, "r", np.float64)[:, 0] for side in lay.sides])
        return lay.kind, (s[:, 0] if lay.kind == "pointwise" else s)
