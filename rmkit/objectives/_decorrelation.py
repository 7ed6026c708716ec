"""ArmoRM's reward transform: remove verbosity from every other objective."""

from __future__ import annotations

import numbers
import warnings

import numpy as np
from scipy.stats import rankdata
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted, validate_data

from rmkit.layout import is_layout_frame, make_frame, read_layout

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

    As a pipeline step it reads the objective blocks ``{side}:r:*`` of a
    feature frame (the responses of pairs are pooled for ``fit``) and emits
    the transformed objectives with the prompt block and metadata carried
    through. The verbosity objective may be a rated one (``verbosity`` names
    it) or, with ``verbosity="length"``, be derived from response length: the
    standardised log token count from the frame's ``{side}:m:tokens``
    columns, appended as the objective ``"verbosity"``. On plain arrays
    ``verbosity`` is a column index or name.

    Parameters
    ----------
    verbosity : "length", int or str, default="length"
        ``"length"`` (feature frames only): derive it from token counts.
        Otherwise the verbosity objective: a column index, or a name (an
        objective of the frame, or a column when ``R`` is a DataFrame).
    threshold : float, default=0.03
        Largest Spearman correlation with verbosity allowed after the
        transform.
    lambdas : array-like, default=None
        Non-negative, increasing grid; ``None`` is ``0, 0.01, ..., 5``.
    drop_verbosity : bool, default=True
        Leave the verbosity objective out of the output (``T`` then has one
        column fewer), so nothing downstream can reward length directly.
        ``False`` hands the gate a pure length signal: on length-biased
        training pairs it then puts much of its weight there (0.45 of it in
        ``benchmarks/results/quality.md``), paying for length on the pairs
        where the shorter answer is the better one.

    Attributes
    ----------
    lambdas_ : ndarray of shape (n_objectives,)
        ``λ`` per objective (0 for the verbosity objective).
    transform_matrix_ : ndarray of shape (n_objectives, n_outputs)
        ``T``; ``transform(R) == R @ T``.
    verbosity_index_ : int
    objective_names_, output_names_ : ndarray of str
        Objectives in (verbosity included) and out (frames only).
    length_mean_, length_scale_ : float
        Standardisation of log token counts (``verbosity="length"``).
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
    >>> dec = VerbosityDecorrelator(verbosity=-1, threshold=0.03).fit(np.c_[quality, length])
    >>> bool(dec.spearman_after_[0] <= 0.03), dec.lambdas_[0] > 0
    (True, np.True_)
    """

    def __init__(self, verbosity="length", *, threshold=0.03, lambdas=None, drop_verbosity=True):
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

    # -- feature frames ------------------------------------------------------------------------
    def _frame_rewards(self, X, lay, fitting):
        """Objective rewards per side, verbosity appended when derived from length."""
        names = lay.names(lay.sides[0], "r")
        per_side = [lay.block(X, side, "r", np.float64) for side in lay.sides]
        if self.verbosity != "length":
            return names, per_side
        if "verbosity" in names:
            raise ValueError("An objective is already named 'verbosity'; pass verbosity='verbosity' to use it "
                             "instead of the length-derived one.")
        if not all(lay.has(side, "m") and f"{side}:m:tokens" in X.columns for side in lay.sides):
            raise ValueError("verbosity='length' needs the token counts ('{side}:m:tokens') that "
                             "BackboneFeaturizer writes; keep them in the frame or name a verbosity objective.")
        logs = [np.log1p(X[f"{side}:m:tokens"].to_numpy(np.float64)) for side in lay.sides]
        if fitting:
            pooled = np.concatenate(logs)
            self.length_mean_, self.length_scale_ = float(pooled.mean()), float(pooled.std() or 1.0)
        per_side = [np.c_[R, (lg - self.length_mean_) / self.length_scale_] for R, lg in zip(per_side, logs)]
        return names + ["verbosity"], per_side

    def _fit_frame(self, X):
        lay = read_layout(X, step="VerbosityDecorrelator", need=[("side", "r")])
        names, per_side = self._frame_rewards(X, lay, fitting=True)
        v = self.verbosity
        if v == "length":
            v = "verbosity"
        if isinstance(v, str):
            if v not in names:
                raise ValueError(f"verbosity={self.verbosity!r} is not an objective of X (objectives: {names}).")
            v = names.index(v)
        self._fit_matrix(np.vstack(per_side), v)
        self.objective_names_ = np.asarray(names, dtype=object)
        kept = [n for i, n in enumerate(names) if not (self.drop_verbosity and i == self.verbosity_index_)]
        self.output_names_ = np.asarray(kept, dtype=object)
        self.frame_input_ = True
        return self

    def _transform_frame(self, X):
        lay = read_layout(X, step="VerbosityDecorrelator", need=[("side", "r")])
        names, per_side = self._frame_rewards(X, lay, fitting=False)
        if names != list(self.objective_names_):
            raise ValueError(f"VerbosityDecorrelator was fitted on the objectives {list(self.objective_names_)}; "
                             f"X has {names}.")
        blocks = {(side, "r", tuple(self.output_names_)): R @ self.transform_matrix_
                  for side, R in zip(lay.sides, per_side)}
        keep = [c for c in X.columns if ":r:" not in c]
        blocks["passthrough"] = X[keep]
        return make_frame(blocks, index=X.index)

    def fit(self, R, y=None):
        """Choose ``λ`` per objective on reference rewards: a feature frame, or an array (n, n_objectives)."""
        if is_layout_frame(R):
            return self._fit_frame(R)
        if self.verbosity == "length":
            raise ValueError("verbosity='length' needs a feature frame with token counts; for a plain reward "
                             "matrix pass the verbosity column's index or name.")
        R = validate_data(self, R, dtype=np.float64, ensure_min_samples=3)
        self.frame_input_ = False
        return self._fit_matrix(R, self._verbosity_index(R.shape[1]))

    def _fit_matrix(self, R, v):
        if len(R) < 3:
            raise ValueError(f"Verbosity decorrelation needs at least 3 responses, got {len(R)}.")
        k = R.shape[1]
        if k < 2:
            raise ValueError(f"Verbosity decorrelation needs at least two objectives (one of them verbosity); "
                             f"got {k} feature(s) (1 feature(s) cannot be decorrelated).")
        lambdas = DEFAULT_LAMBDAS if self.lambdas is None else np.asarray(self.lambdas, dtype=float).reshape(-1)
        if lambdas.size == 0 or (lambdas < 0).any() or (np.diff(lambdas) <= 0).any():
            raise ValueError("lambdas must be a non-empty, increasing grid of non-negative numbers.")
        if not isinstance(self.threshold, numbers.Real) or not -1 <= self.threshold <= 1:
            raise ValueError(f"threshold must be a number in [-1, 1], got {self.threshold!r}.")
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
        """Apply ``r' = r T`` (to every response side of a feature frame)."""
        check_is_fitted(self, "transform_matrix_")
        if self.frame_input_:
            return self._transform_frame(R)
        R = validate_data(self, R, reset=False, dtype=np.float64)
        return R @ self.transform_matrix_

    def get_feature_names_out(self, input_features=None):
        """Objective names of the output (the verbosity column left out when ``drop_verbosity``)."""
        check_is_fitted(self, "transform_matrix_")
        if self.frame_input_:
            return np.asarray(self.output_names_, dtype=object)
        from sklearn.utils.validation import _check_feature_names_in

        names = list(_check_feature_names_in(self, input_features))
        if self.drop_verbosity:
            del names[self.verbosity_index_]
        return np.asarray(names, dtype=object)
