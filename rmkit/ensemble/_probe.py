"""A linear Bradley-Terry reward head on frozen features (a cheap ensemble member)."""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.linear_model import LogisticRegression
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_array, check_is_fitted

__all__ = ["BradleyTerryProbe"]


class BradleyTerryProbe(RegressorMixin, BaseEstimator):
    """Linear reward ``r(x) = w · standardise(response features)`` fitted by Bradley-Terry.

    Put it after a :class:`~rmkit.BackboneFeaturizer` in a pipeline: ``fit``
    reads the pair layout ``[chosen | rejected | prompt]`` and fits a logistic
    regression without intercept on ``chosen - rejected`` (half of the pairs
    side-swapped at random, so both classes occur); ``predict`` reads the
    pointwise layout ``[response | prompt]`` and returns one reward per row,
    or, given the pair layout, P(chosen ≻ rejected). The prompt block is not
    used. Response features are standardised with the mean and standard
    deviation of the training responses.

    Parameters
    ----------
    C : float, default=1.0
        Inverse L2 penalty of the logistic regression.
    max_iter : int, default=1000
    random_state : int, RandomState or None, default=None
        Seeds which pairs are side-swapped.

    Attributes
    ----------
    coef_ : ndarray of shape (block_width_,)
        Weights on the standardised response features.
    mean_, scale_ : ndarray of shape (block_width_,)
    block_width_ : int
        Width of one feature block (the backbone's hidden size).
    n_features_in_ : int
        Columns of the pair features seen in ``fit`` (``3 * block_width_``).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.RandomState(0)
    >>> c, r, p = rng.normal(size=(3, 200, 4))
    >>> c[:, 0] += 1.0                       # chosen responses score higher on feature 0
    >>> probe = BradleyTerryProbe(random_state=0).fit(np.hstack([c, r, p]))
    >>> int(np.argmax(probe.coef_))
    0
    >>> probe.predict(np.hstack([c[:3], p[:3]])).shape
    (3,)
    """

    def __init__(self, C=1.0, *, max_iter=1000, random_state=None):
        self.C = C
        self.max_iter = max_iter
        self.random_state = random_state

    def fit(self, X, y=None):
        """Fit on pair features ``[chosen | rejected | prompt]``; ``y`` is ignored."""
        X = check_array(X, dtype=np.float64)
        if X.shape[1] % 3:
            raise ValueError(f"BradleyTerryProbe.fit needs pair features [chosen | rejected | prompt] (a multiple of "
                             f"3 columns); got {X.shape[1]} columns. Featurize preference pairs, not pointwise rows.")
        d = X.shape[1] // 3
        c, r = X[:, :d], X[:, d:2 * d]
        both = np.vstack([c, r])
        self.mean_ = both.mean(0)
        scale = both.std(0)
        self.scale_ = np.where(scale > 0, scale, 1.0)
        diff = (c - r) / self.scale_
        sign = np.where(check_random_state(self.random_state).rand(len(diff)) < 0.5, -1.0, 1.0)
        sign[0] = 1.0  # both classes present whenever there are two or more pairs
        if len(diff) > 1:
            sign[1] = -1.0
        lr = LogisticRegression(C=self.C, fit_intercept=False, max_iter=self.max_iter)
        lr.fit(diff * sign[:, None], (sign > 0).astype(int))
        self.coef_ = lr.coef_.ravel()
        self.block_width_ = d
        self.n_features_in_ = X.shape[1]
        return self

    def _reward(self, block):
        return ((block - self.mean_) / self.scale_) @ self.coef_

    def predict(self, X):
        """Pointwise features → reward per row; pair features → P(chosen ≻ rejected)."""
        check_is_fitted(self, "coef_")
        X = check_array(X, dtype=np.float64)
        d = self.block_width_
        if X.shape[1] == 2 * d:
            return self._reward(X[:, :d])
        if X.shape[1] == 3 * d:
            margin = self._reward(X[:, :d]) - self._reward(X[:, d:2 * d])
            return 1.0 / (1.0 + np.exp(-margin))
        raise ValueError(f"X has {X.shape[1]} columns; expected {2 * d} ([response | prompt]) or {3 * d} "
                         "([chosen | rejected | prompt]) for this probe.")
