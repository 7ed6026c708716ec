"""ArmoRM's reward transform: remove verbosity from every other objective."""

from __future__ import annotations

import numbers
import warnings

import numpy as np
from scipy.stats import rankdata
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted, validate_data

__all__ = ["VerbosityDecorrelator", "spearman_to"]

DEFAULT_LAMBDAS = np.round(np.arange(0.0, 5.0 + 1e-9, 0.01), 2)


def spearman_to(R, v):
    """Spearman correlation of every column of ``R`` with the vector ``v``.

    Examples
    --------
    >>> import numpy as np
    >>> spearman_to(np.array([[1., 3.], [2., 2.], [3., 1.]]), np.array([1., 2., 3.])).tolist()
    [1.0, -1.0]
    """
    R = np.asarray(R, dtype=float).reshape(len(v), -1)
    a = rankdata(R, axis=0)
    b = rankdata(v)
    a = a - a.mean(axis=0)
    b = b - b.mean()
    denom = np.sqrt((a**2).sum(axis=0) * (b**2).sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (a * b[:, None]).sum(axis=0) / denom
    return np.where(denom > 0, out, 0.0)


class VerbosityDecorrelator(TransformerMixin, BaseEstimator):
    """Decorrelate reward objectives from a verbosity objective (ArmoRM's reward transform).

    For every objective ``i`` other than the verbosity objective ``v``,
    ``λ_i`` is the smallest value of ``lambdas`` for which the Spearman
    correlation of ``r_i - λ_i r_v`` with ``r_v`` on the reference rewards
    passed to ``fit`` is at most ``threshold``. With ``T`` the identity whose
    row ``v`` holds ``-λ``, the transform is ``r' = r T``.

    The verbosity objective may be a rated one, or be derived from response
    length (e.g. the standardised log token count, as
    :class:`~rmkit.ArmoRM` does when the data has no verbosity rating):
    append it as a column of ``R`` and point ``verbosity`` at it.

    Parameters
    ----------
    verbosity : int or str, default=-1
        Column of the verbosity objective: an index, or a name when ``R`` is
        a DataFrame.
    threshold : float, default=0.03
        Largest Spearman correlation with verbosity allowed after the
        transform.
    lambdas : array-like, default=None
        Non-negative, increasing grid; ``None`` is ``0, 0.01, ..., 5``.
    drop_verbosity : bool, default=False
        Leave the verbosity objective out of the output (``T`` then has one
        column fewer), so nothing downstream can reward length directly.

    Attributes
    ----------
    lambdas_ : ndarray of shape (n_objectives,)
        ``λ`` per objective (0 for the verbosity objective).
    transform_matrix_ : ndarray of shape (n_objectives, n_outputs)
        ``T``; ``transform(R) == R @ T``.
    verbosity_index_ : int
    spearman_before_, spearman_after_ : ndarray of shape (n_objectives,)
        Spearman correlation of each objective with verbosity on the
        reference data, before and after the transform.
    n_features_in_ : int
    feature_names_in_ : ndarray, only when ``R`` was a DataFrame

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.RandomState(0)
    >>> length = rng.normal(size=500)
    >>> quality = rng.normal(size=500) + 0.8 * length  # correlated with verbosity
    >>> dec = VerbosityDecorrelator(threshold=0.03).fit(np.c_[quality, length])
    >>> bool(dec.spearman_after_[0] <= 0.03), dec.lambdas_[0] > 0
    (True, np.True_)
    """

    def __init__(self, verbosity=-1, *, threshold=0.03, lambdas=None, drop_verbosity=False):
        self.verbosity = verbosity
        self.threshold = threshold
        self.lambdas = lambdas
        self.drop_verbosity = drop_verbosity

    def _verbosity_index(self, k):
        v = self.verbosity
        if isinstance(v, str):
            names = list(getattr(self, "feature_names_in_", []))
            if v not in names:
                raise ValueError(f"verbosity={v!r} is not a column of the rewards (columns: {names}).")
            return names.index(v)
        if not isinstance(v, numbers.Integral) or not -k <= v < k:
            raise ValueError(f"verbosity must be a column name or an index in [-{k}, {k}), got {v!r}.")
        return int(v) % k

    def fit(self, R, y=None):
        """Choose ``λ`` per objective on reference rewards ``R`` of shape (n, n_objectives)."""
        R = validate_data(self, R, dtype=np.float64, ensure_min_samples=3)
        k = R.shape[1]
        if k < 2:
            raise ValueError(f"Verbosity decorrelation needs at least two objectives (one of them verbosity); "
                             f"got {k} feature(s) (1 feature(s) cannot be decorrelated).")
        lambdas = DEFAULT_LAMBDAS if self.lambdas is None else np.asarray(self.lambdas, dtype=float).reshape(-1)
        if lambdas.size == 0 or (lambdas < 0).any() or (np.diff(lambdas) <= 0).any():
            raise ValueError("lambdas must be a non-empty, increasing grid of non-negative numbers.")
        if not isinstance(self.threshold, numbers.Real) or not -1 <= self.threshold <= 1:
            raise ValueError(f"threshold must be a number in [-1, 1], got {self.threshold!r}.")
        v = self._verbosity_index(k)
        rv = R[:, v]
        if np.ptp(rv) == 0:
            raise ValueError("The verbosity objective is constant on the reference data; nothing to decorrelate.")
        lam = np.zeros(k)
        for i in range(k):
            if i == v:
                continue
            corr = spearman_to(R[:, [i]] - lambdas[None, :] * rv[:, None], rv)
            ok = np.flatnonzero(corr <= self.threshold)
            if ok.size:
                lam[i] = lambdas[ok[0]]
            else:
                lam[i] = lambdas[int(np.argmin(corr))]
                warnings.warn(f"No λ on the grid brings objective {i} under the Spearman threshold "
                              f"{self.threshold} (best {corr.min():.3f} at λ={lam[i]}); extend `lambdas`.",
                              stacklevel=2)
        T = np.eye(k)
        T[v] -= lam  # r'_i = r_i - λ_i r_v  (λ_v = 0 keeps r_v)
        self.lambdas_ = lam
        self.verbosity_index_ = v
        self.spearman_before_ = spearman_to(R, rv)
        self.spearman_after_ = spearman_to(R @ T, rv)
        self.transform_matrix_ = np.delete(T, v, axis=1) if self.drop_verbosity else T
        return self

    def transform(self, R):
        """Apply ``r' = r T``."""
        check_is_fitted(self, "transform_matrix_")
        R = validate_data(self, R, reset=False, dtype=np.float64)
        return R @ self.transform_matrix_

    def get_feature_names_out(self, input_features=None):
        """Objective names of the output (the verbosity column left out when ``drop_verbosity``)."""
        check_is_fitted(self, "transform_matrix_")
        from sklearn.utils.validation import _check_feature_names_in

        names = list(_check_feature_names_in(self, input_features))
        if self.drop_verbosity:
            del names[self.verbosity_index_]
        return np.asarray(names, dtype=object)
