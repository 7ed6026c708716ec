"""Stage 1 of ArmoRM: one linear probe per reward objective on frozen features."""

from __future__ import annotations

import numbers
import warnings

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegressionCV, RidgeCV
from sklearn.model_selection import KFold, StratifiedKFold
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_array, check_is_fitted, validate_data

__all__ = ["MultiObjectiveRegressor", "DEFAULT_ALPHAS"]

DEFAULT_ALPHAS = np.logspace(-4, 4, 9)  # the grid ArmoRM scans


def _pair_blocks(value, name, layout, width):
    """Return ``(chosen_rows, rejected_rows)`` of one pairwise objective."""
    if isinstance(value, tuple):
        if len(value) != 2:
            raise ValueError(f"pair_objectives[{name!r}] must be a (chosen, rejected) tuple or a pairs array.")
        c, r = (check_array(v, dtype=np.float64, input_name=f"pair_objectives[{name!r}]") for v in value)
        if c.shape != r.shape:
            raise ValueError(f"pair_objectives[{name!r}]: chosen {c.shape} and rejected {r.shape} rows differ in shape.")
        return c, r
    if layout != "pointwise":
        raise ValueError(f"pair_objectives[{name!r}] must be a (chosen_rows, rejected_rows) tuple when layout='flat'.")
    P = check_array(value, dtype=np.float64, input_name=f"pair_objectives[{name!r}]")
    if P.shape[1] % 3:
        raise ValueError(f"pair_objectives[{name!r}] has {P.shape[1]} columns; pair features are "
                         "[chosen | rejected | prompt], a multiple of 3.")
    d = P.shape[1] // 3
    if width is not None and d != width:
        raise ValueError(f"pair_objectives[{name!r}] has block width {d}, the pointwise rows {width}.")
    prompt = P[:, 2 * d:]
    return np.hstack([P[:, :d], prompt]), np.hstack([P[:, d:2 * d], prompt])


class MultiObjectiveRegressor(RegressorMixin, BaseEstimator):
    """One linear reward head per objective, from absolute ratings or preference pairs.

    Stage 1 of ArmoRM (Wang et al. 2024). Each *rated* objective (a column of
    ``y``) gets a ridge regression fitted only on the rows where it is
    labelled (NaN = missing), its penalty chosen by cross-validation over
    ``alphas``. Each *pairwise* objective (an entry of ``pair_objectives``:
    the preference pairs of one source) gets a Bradley–Terry linear probe,
    a logistic regression on feature differences with its penalty chosen the
    same way. Features are standardised before either fit.

    Parameters
    ----------
    alphas : array-like, default=None
        Penalty grid; ``None`` scans ``1e-4 .. 1e4`` (nine values), as the
        paper does. For pairwise objectives ``C = 1 / alpha``.
    cv : int or None, default=None
        Folds used to choose ``alpha``. ``None`` uses ridge's efficient
        leave-one-out for rated objectives and 5 folds (fewer below 10
        pairs) for pairwise ones.
    scale_labels : bool, default=True
        Standardise each rated objective's labels (mean and std over its
        labelled rows) before fitting, so every objective predicts on a
        comparable scale. ``predict(..., original_units=True)`` maps back.
        Pairwise objectives are always standardised over their training
        responses (their "original unit" is the Bradley–Terry logit).
    layout : {"pointwise", "flat"}, default="pointwise"
        ``"pointwise"``: ``X`` is :class:`~rmkit.BackboneFeaturizer` output
        ``[response | prompt]`` and only the response block is used (the
        prompt block is the gating input of stage 2); pairwise objectives are
        ``[chosen | rejected | prompt]`` arrays. ``"flat"``: every column of
        ``X`` is a feature; pairwise objectives are ``(chosen, rejected)``
        tuples of such rows.
    random_state : int, RandomState or None, default=None
        Seeds the fold shuffling and the random side-swap of pairs.

    Attributes
    ----------
    objective_names_ : ndarray of str
    objective_kinds_ : ndarray of {"rating", "pairwise"}
    coef_ : ndarray of shape (n_objectives, n_used_features)
        Weights on the raw (unstandardised) used features.
    intercept_ : ndarray of shape (n_objectives,)
    alpha_ : ndarray of shape (n_objectives,)
        Penalty chosen per objective.
    n_labelled_ : ndarray of shape (n_objectives,)
        Rows (rated) or pairs (pairwise) each objective was fitted on.
    label_mean_, label_scale_ : ndarray of shape (n_objectives,)
        ``original = standardised * label_scale_ + label_mean_``.
    n_features_in_ : int
    feature_names_in_ : ndarray, only when ``X`` was a DataFrame with string columns

    Notes
    -----
    ``predict`` returns standardised objective rewards of shape
    ``(n, n_objectives)`` (``(n,)`` when ``y`` was one-dimensional and there
    are no pairwise objectives, following scikit-learn's convention).
    ``score`` is the mean R² over objectives and is only defined for fully
    labelled ``y``. With ``layout="flat"`` the estimator passes
    :func:`sklearn.utils.estimator_checks.check_estimator`.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.RandomState(0)
    >>> X = rng.normal(size=(60, 4))
    >>> y = np.c_[X[:, 0], X[:, 1] - X[:, 2]]
    >>> y[:20, 1] = np.nan  # objective 1 unlabelled on 20 rows
    >>> mor = MultiObjectiveRegressor(layout="flat").fit(X, y)
    >>> mor.predict(X).shape, mor.n_labelled_.tolist()
    ((60, 2), [60, 40])
    """

    def __init__(self, alphas=None, *, cv=None, scale_labels=True, layout="pointwise", random_state=None):
        self.alphas = alphas
        self.cv = cv
        self.scale_labels = scale_labels
        self.layout = layout
        self.random_state = random_state

    # -- helpers -------------------------------------------------------------------------------
    def _alphas(self):
        a = DEFAULT_ALPHAS if self.alphas is None else np.asarray(self.alphas, dtype=float).reshape(-1)
        if a.size == 0 or (a <= 0).any() or not np.isfinite(a).all():
            raise ValueError(f"alphas must be a non-empty grid of positive numbers, got {self.alphas!r}.")
        return a

    def _used(self, X):
        """The columns the heads read: the response block in the pointwise layout."""
        if self.layout == "flat":
            return X
        if X.shape[1] % 2:
            raise ValueError(
                f"X has {X.shape[1]} columns, but layout='pointwise' expects [response | prompt] features "
                "(an even width). Pass layout='flat' for plain feature matrices."
            )
        return X[:, : X.shape[1] // 2]

    def _folds(self, default, stratified):
        n = default if self.cv is None else self.cv
        if not isinstance(n, numbers.Integral) or n < 2:
            raise ValueError(f"cv must be None or an integer >= 2, got {self.cv!r}.")
        cls = StratifiedKFold if stratified else KFold
        return cls(n_splits=int(n), shuffle=True, random_state=check_random_state(self.random_state).randint(2**31 - 1))

    # -- fitting -------------------------------------------------------------------------------
    def fit(self, X, y=None, *, pair_objectives=None):
        """Fit one head per objective.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features) or None
            Features of the rated rows (``None`` when all objectives are
            pairwise).
        y : array-like or DataFrame of shape (n_samples,) or (n_samples, n_rated)
            Absolute ratings; NaN marks a missing label. DataFrame columns
            name the objectives.
        pair_objectives : dict, optional
            ``{name: pairs}``: one Bradley–Terry objective per entry, fitted
            on that source's preference pairs (see ``layout``).

        Returns
        -------
        self
        """
        if self.layout not in ("pointwise", "flat"):
            raise ValueError(f"layout must be 'pointwise' or 'flat', got {self.layout!r}.")
        if not isinstance(self.scale_labels, (bool, np.bool_)):
            raise ValueError(f"scale_labels must be a bool, got {self.scale_labels!r}.")
        alphas = self._alphas()
        pair_objectives = dict(pair_objectives or {})
        if X is None and not pair_objectives:
            raise ValueError("Nothing to fit: give rated rows (X, y) and/or pair_objectives.")
        names, kinds, rated = [], [], None
        width = None
        if X is not None:
            if y is None:
                raise ValueError(f"{type(self).__name__} requires y to be passed, but the target y is None "
                                 "(y holds the ratings of the rows of X).")
            ynames = list(map(str, y.columns)) if isinstance(y, pd.DataFrame) else None
            if isinstance(y, pd.Series) and y.name is not None:
                ynames = [str(y.name)]
            X, Y = self._validate_rated(X, y)
            self._single_output = Y.ndim == 1 and not pair_objectives
            Y = Y.reshape(len(Y), -1)
            names += ynames if ynames is not None else [f"objective_{i}" for i in range(Y.shape[1])]
            kinds += ["rating"] * Y.shape[1]
            rated = (self._used(X), Y)
            width = X.shape[1] // 2 if self.layout == "pointwise" else X.shape[1]
        else:
            self._single_output = False
        pairs = []
        for name, value in pair_objectives.items():
            c, r = _pair_blocks(value, name, self.layout, width)
            if X is None and not pairs:
                self.n_features_in_ = c.shape[1]
            elif c.shape[1] != self.n_features_in_:
                raise ValueError(f"pair_objectives[{name!r}] rows have {c.shape[1]} features, expected "
                                 f"{self.n_features_in_}.")
            pairs.append((self._used(c), self._used(r)))
            names.append(str(name))
            kinds.append("pairwise")
        if len(set(names)) != len(names):
            raise ValueError(f"Objective names must be unique, got {names}.")
        # one feature standardisation shared by every head
        all_rows = [rated[0]] if rated is not None else []
        for c, r in pairs:
            all_rows += [c, r]
        stacked = np.vstack(all_rows)
        mu = stacked.mean(axis=0)
        sd = stacked.std(axis=0)
        sd[sd < 1e-12] = 1.0

        coef, intercept, alpha, n_lab, lmean, lscale = [], [], [], [], [], []
        if rated is not None:
            Xs = (rated[0] - mu) / sd
            for j in range(rated[1].shape[1]):
                out = self._fit_rated(Xs, rated[1][:, j], names[j], alphas)
                coef.append(out[0]); intercept.append(out[1]); alpha.append(out[2])
                n_lab.append(out[3]); lmean.append(out[4]); lscale.append(out[5])
        n_rated = len(coef)
        for (c, r), name in zip(pairs, names[n_rated:]):
            out = self._fit_pairwise((c - mu) / sd, (r - mu) / sd, name, alphas)
            coef.append(out[0]); intercept.append(out[1]); alpha.append(out[2])
            n_lab.append(out[3]); lmean.append(out[4]); lscale.append(out[5])
        coef = np.asarray(coef)
        # fold the standardisation into raw-feature weights
        self.coef_ = coef / sd
        self.intercept_ = np.asarray(intercept) - self.coef_ @ mu
        self.alpha_ = np.asarray(alpha, dtype=float)
        self.n_labelled_ = np.asarray(n_lab, dtype=int)
        self.label_mean_ = np.asarray(lmean, dtype=float)
        self.label_scale_ = np.asarray(lscale, dtype=float)
        self.objective_names_ = np.asarray(names, dtype=object)
        self.objective_kinds_ = np.asarray(kinds, dtype=object)
        return self

    def _validate_rated(self, X, y):
        X = validate_data(self, X, dtype=np.float64, ensure_min_samples=2)
        Y = check_array(y, ensure_2d=False, ensure_all_finite="allow-nan", dtype=np.float64, input_name="y")
        if Y.ndim > 2:
            raise ValueError(f"y must be 1- or 2-dimensional, got shape {Y.shape}.")
        if len(Y) != len(X):
            raise ValueError(f"X and y have different numbers of rows: {len(X)} vs {len(Y)}.")
        if np.isinf(Y).any():
            raise ValueError("y contains infinite ratings.")
        return X, Y

    def _fit_rated(self, Xs, yj, name, alphas):
        mask = ~np.isnan(yj)
        n = int(mask.sum())
        if n == 0:
            raise ValueError(f"Objective {name!r} has no labelled rows (all ratings are NaN).")
        folds = None if self.cv is None else int(self.cv)
        if n < max(3, folds or 0):
            raise ValueError(f"Objective {name!r} has only {n} labelled rows; at least {max(3, folds or 0)} are "
                             "needed to choose the penalty by cross-validation.")
        yv = yj[mask]
        m, s = (float(yv.mean()), float(yv.std())) if self.scale_labels else (0.0, 1.0)
        if s < 1e-12:
            s = 1.0  # constant labels: nothing to scale
        cv = None if self.cv is None else self._folds(5, stratified=False)
        ridge = RidgeCV(alphas=alphas, cv=cv).fit(Xs[mask], (yv - m) / s)
        return ridge.coef_, float(ridge.intercept_), float(ridge.alpha_), n, m, s

    def _fit_pairwise(self, Cs, Rs, name, alphas):
        n = len(Cs)
        need = 4 if self.cv is None else 2 * int(self.cv)
        if n < need:
            raise ValueError(f"Pairwise objective {name!r} has {n} pairs; at least {need} are needed.")
        folds = self._folds(min(5, n // 2), stratified=True)
        D = Cs - Rs
        if np.allclose(D, 0):
            raise ValueError(f"Pairwise objective {name!r}: chosen and rejected features are identical in every pair.")
        rng = check_random_state(self.random_state)
        # swap sides of a random half so both classes are present without duplicating pairs across folds
        swap = np.zeros(n, dtype=bool)
        swap[rng.permutation(n)[: n // 2]] = True
        D = np.where(swap[:, None], -D, D)
        target = (~swap).astype(int)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=FutureWarning)
            # weakly penalised fits of (nearly) separable pairs never converge: cap the iterations,
            # cross-validation rejects those penalties anyway
            warnings.simplefilter("ignore", category=ConvergenceWarning)
            lr = LogisticRegressionCV(Cs=1.0 / alphas, fit_intercept=False, cv=folds, scoring="neg_log_loss",
                                      max_iter=300).fit(D, target)
        w = lr.coef_.reshape(-1)
        s = np.concatenate([Cs @ w, Rs @ w])
        m, sc = float(s.mean()), float(s.std())
        if sc < 1e-12:
            sc = 1.0
        C = float(np.ravel(lr.C_)[0])
        return w / sc, -m / sc, 1.0 / C, n, m, sc

    # -- inference -----------------------------------------------------------------------------
    def predict(self, X, *, original_units=False):
        """Objective rewards, shape ``(n_samples, n_objectives)``.

        Standardised by default; ``original_units=True`` maps rated objectives
        back to their rating scale and pairwise ones to Bradley–Terry logits.
        """
        check_is_fitted(self, "coef_")
        X = validate_data(self, X, reset=False, dtype=np.float64)
        R = self._used(X) @ self.coef_.T + self.intercept_
        if original_units:
            R = R * self.label_scale_ + self.label_mean_
        return R[:, 0] if self._single_output else R

    def predict_frame(self, X, *, original_units=False):
        """:meth:`predict` as a DataFrame with one column per objective."""
        R = self.predict(X, original_units=original_units)
        return pd.DataFrame(R.reshape(len(R), -1), columns=list(self.objective_names_))

    def score(self, X, y, sample_weight=None):
        """Mean R² over objectives on fully labelled ``y`` (standardised targets)."""
        check_is_fitted(self, "coef_")
        from sklearn.metrics import r2_score

        Y = np.asarray(y, dtype=float)
        Y = Y.reshape(len(Y), -1)
        if np.isnan(Y).any():
            raise ValueError("score needs fully labelled y; NaN ratings found.")
        k = Y.shape[1]
        Y = (Y - self.label_mean_[:k]) / self.label_scale_[:k]
        P = self.predict(X).reshape(len(Y), -1)[:, :k]
        return r2_score(Y, P, sample_weight=sample_weight)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        tags.target_tags.single_output = True
        return tags
