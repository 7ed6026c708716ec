"""The reward-model contract shared by rmkit's estimators.

One contract for every reward model, array-level step or text recipe:

============================  =====================================  ==============================
method                        pointwise rows (a response each)       preference pairs
============================  =====================================  ==============================
``decision_function(X)``      reward, shape (n,)                     reward margin r_chosen − r_rejected
``predict(X)``                reward, shape (n,)                     1 if the ``chosen`` side wins, else 0
``predict_proba(X)``          — (refused)                            (n, 2): [P(rejected ≻ chosen), P(chosen ≻ rejected)]
``score(X, y=None)``          — (refused)                            pairwise accuracy
============================  =====================================  ==============================

``y`` for pairs is optional: 1 where the ``chosen`` column holds the
preferred response, 0 where ``rejected`` does (all 1 when omitted; see
:func:`rmkit.model_selection.shuffle_pair_sides`). With it, scikit-learn's
stock scorers (``"accuracy"``, ``"roc_auc"``, ``"neg_log_loss"``) apply. The
models declare themselves regressors (a reward per response), so
``VotingRegressor`` and ``StackingRegressor`` accept them.
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit

from rmkit.metrics import pairwise_accuracy

__all__ = ["RewardModelMixin", "TextInputMixin", "TextRewardModelMixin"]


class RewardModelMixin:
    """Mixin giving the pair contract above from one method, ``_scores(X) -> (kind, scores)``.

    ``scores`` is shape (n,) for pointwise rows and (n, 2) ``[chosen, rejected]`` for pairs.
    """

    def _scores(self, X):  # pragma: no cover - implemented by each model
        raise NotImplementedError

    def decision_function(self, X):
        """Rewards for pointwise rows; the margin ``r_chosen − r_rejected`` for pairs."""
        kind, s = self._scores(X)
        return s if kind == "pointwise" else s[:, 0] - s[:, 1]

    def reward_pairs(self, X):
        """Rewards of both sides of preference pairs, shape (n, 2) ``[chosen, rejected]``."""
        kind, s = self._scores(X)
        if kind != "pairs":
            raise ValueError("reward_pairs needs preference pairs ('chosen' and 'rejected').")
        return s

    def predict(self, X):
        """Rewards for pointwise rows; for pairs 1 where the ``chosen`` side wins, else 0."""
        kind, s = self._scores(X)
        return s if kind == "pointwise" else (s[:, 0] > s[:, 1]).astype(int)

    def predict_proba(self, X):
        """For pairs: ``[P(rejected ≻ chosen), P(chosen ≻ rejected)]`` per pair (Bradley–Terry)."""
        kind, s = self._scores(X)
        if kind != "pairs":
            raise ValueError("predict_proba needs preference pairs ('chosen' and 'rejected'); for single "
                             "responses use predict or decision_function (the reward).")
        p = expit(s[:, 0] - s[:, 1])
        return np.column_stack([1.0 - p, p])

    def score(self, X, y=None, sample_weight=None):
        """Pairwise accuracy: the share of pairs whose preferred side gets the higher reward (ties are wrong)."""
        kind, s = self._scores(X)
        if kind != "pairs":
            raise ValueError("score needs preference pairs ('chosen' and 'rejected'): it is pairwise accuracy.")
        return pairwise_accuracy(s[:, 0], s[:, 1], y=y, sample_weight=sample_weight)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.estimator_type = "regressor"
        tags.target_tags.required = False
        return tags


class TextInputMixin:
    """Tags of an estimator whose input is text (DataFrames or lists of prompts and responses)."""

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.string = True
        return tags


class TextRewardModelMixin(TextInputMixin, RewardModelMixin):
    """A :class:`RewardModelMixin` whose input is text (DataFrames of prompts and responses)."""
