"""Stage 1 of ArmoRM: one linear probe per reward objective on frozen features."""

from __future__ import annotations

import numbers
import warnings

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, RegressorMixin, TransformerMixin, clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV, RidgeCV
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.utils import check_random_state
from sklearn.utils.validation import (
    _check_sample_weight,
    check_array,
    check_is_fitted,
    validate_data,
)

from rmkit.layout import is_layout_frame, make_frame, read_layout
from rmkit.model_selection import (
    PromptGroupKFold,
    check_prompt_cv,
    pair_target,
    resolve_groups,
)

__all__ = ["MultiObjectiveRegressor", "DEFAULT_ALPHAS"]

DEFAULT_ALPHAS = np.logspace(-4, 4, 9)  # the grid ArmoRM scans
_STEP = "MultiObjectiveRegressor"


class _NothingToFit(ValueError):
    """A cross-fitting fold too small for every objective."""


def _subset(value, idx):
    return None if value is None else np.asarray(value)[idx] if not isinstance(value, pd.DataFrame) \
        else value.iloc[idx]


class MultiObjectiveRegressor(TransformerMixin, RegressorMixin, BaseEstimator):
    """One linear reward head per objective, from absolute ratings or preference pairs.

    Stage 1 of ArmoRM (Wang et al. 2024), as a transformer: it maps the
    hidden-state blocks of a feature frame to one reward per objective and
    carries the prompt block and the metadata through for the gate.

    * **Rated objectives**: ``fit(features_of_rated_rows, ratings)`` with
      pointwise features and one column of ``ratings`` per objective fits a
      ridge regression per objective on the rows where it is labelled (NaN =
      missing), its penalty chosen by prompt-grouped cross-validation over
      ``alphas``.
    * **Pairwise objectives**: ``fit(features_of_pairs, sources=...)`` fits
      one Bradley–Terry probe (a logistic regression on chosen − rejected
      features, penalty chosen the same way) per distinct value of
      ``sources`` (e.g. the dataset each pair came from; ``None`` entries
      belong to no objective). Without ``sources`` there is one objective,
      ``"preference"``. ``y`` (optional) is 1 where the ``chosen`` side is
      preferred and 0 where ``rejected`` is.

    Features are standardised before either fit. Rated and pairwise
    objectives come from different rows; combine them with
    :class:`~rmkit.ObjectiveUnion` (e.g. a prefit rated regressor under
    ``FrozenEstimator`` beside a pairwise one).

    Plain arrays are accepted too (every column a feature, ``y`` ratings):
    then ``transform`` and ``predict`` return arrays.

    Parameters
    ----------
    alphas : array-like, default=None
        Penalty grid; ``None`` scans ``1e-4 .. 1e4`` (nine values), as the
        paper does. For pairwise objectives ``C = 1 / alpha``.
    cv : int or splitter, default=5
        Folds used to choose ``alpha``, grouped by prompt.
    cross_fit : int, splitter or None, default=None
        With a value, ``fit_transform`` returns *out-of-fold* rewards for the
        rows it was fitted on (each row scored by probes that never saw its
        prompt; folds grouped by prompt), while the fitted probes use all
        rows, as scikit-learn's ``TargetEncoder`` does. Use it when a later
        step (the gate) trains on the same pairs.
    scale_labels : bool, default=True
        Standardise each rated objective's labels before fitting, so every
        objective predicts on a comparable scale
        (``predict(..., original_units=True)`` maps back). Pairwise
        objectives are always standardised over their training responses.
    random_state : int, RandomState or None, default=None
        Seeds the fold shuffling and the random side-swap of pairs.

    Attributes
    ----------
    objective_names_ : ndarray of str
    objective_kinds_ : ndarray of {"rating", "pairwise"}
    coef_ : ndarray of shape (n_objectives, n_features)
        Weights on the raw (unstandardised) hidden-state features.
    intercept_ : ndarray of shape (n_objectives,)
    alpha_ : ndarray of shape (n_objectives,)
    n_labelled_ : ndarray of shape (n_objectives,)
        Rows (rated) or pairs (pairwise) each objective was fitted on.
    label_mean_, label_scale_ : ndarray of shape (n_objectives,)
        ``original = standardised * label_scale_ + label_mean_``.
    n_features_in_ : int
        Width of one hidden-state block (frames) or of ``X`` (arrays).
    feature_names_in_ : ndarray, only when fitted on a DataFrame of plain features

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.RandomState(0)
    >>> X = rng.normal(size=(60, 4))
    >>> y = np.c_[X[:, 0], X[:, 1] - X[:, 2]]
    >>> y[:20, 1] = np.nan  # objective 1 unlabelled on 20 rows
    >>> mor = MultiObjectiveRegressor().fit(X, y)
    >>> mor.predict(X).shape, mor.n_labelled_.tolist()
    ((60, 2), [60, 40])

    On a feature frame it is a pipeline step:

    >>> from sklearn.pipeline import make_pipeline
    >>> from rmkit import BackboneFeaturizer
    >>> from rmkit.datasets import make_preference_pairs
    >>> from rmkit.testing import tiny_backbone
    >>> pairs = make_preference_pairs(40, random_state=0)
    >>> probes = make_pipeline(BackboneFeaturizer(tiny_backbone(), cache=False, verbose=0),
    ...                        MultiObjectiveRegressor(random_state=0))
    >>> R = probes.fit_transform(pairs, multiobjectiveregressor__sources=pairs["category"])
    >>> [c for c in R.columns if ":r:" in c]
    ['chosen:r:math', 'chosen:r:safety', 'chosen:r:relevance', 'rejected:r:math', 'rejected:r:safety', 'rejected:r:relevance']
    """

    def __init__(self, alphas=None, *, cv=5, cross_fit=None, scale_labels=True, random_state=None):
        self.alphas = alphas
        self.cv = cv
        self.cross_fit = cross_fit
        self.scale_labels = scale_labels
        self.random_state = random_state

    # -- helpers -------------------------------------------------------------------------------
    def _alphas(self):
        a = DEFAULT_ALPHAS if self.alphas is None else np.asarray(self.alphas, dtype=float).reshape(-1)
        if a.size == 0 or (a <= 0).any() or not np.isfinite(a).all():
            raise ValueError(f"alphas must be a non-empty grid of positive numbers, got {self.alphas!r}.")
        return a

    def _splits(self, n_rows, groups, n_max):
        """Prompt-grouped folds for choosing the penalty (fewer when there are few prompts)."""
        cv = check_prompt_cv(self.cv, random_state=check_random_state(self.random_state).randint(2**31 - 1))
        n_groups = len(np.unique(groups))
        if isinstance(cv, PromptGroupKFold) and cv.n_splits > min(n_groups, n_max):
            cv = PromptGroupKFold(max(2, min(n_groups, n_max)), shuffle=cv.shuffle, random_state=cv.random_state)
        return list(cv.split(np.zeros((n_rows, 1)), groups=groups))

    # -- fitting -------------------------------------------------------------------------------
    def fit(self, X, y=None, *, sources=None, sample_weight=None, groups=None):
        """Fit one head per objective.

        Parameters
        ----------
        X : feature frame or array-like of shape (n_samples, n_features)
            Pointwise features of rated rows, or preference-pair features.
        y : array-like or DataFrame, optional
            Ratings of pointwise rows (NaN = missing; DataFrame columns name
            the objectives), or for pairs 1/0 per pair (which side is
            preferred; default all 1).
        sources : array-like of shape (n_pairs,), optional
            For pairs: the objective each pair trains.
        sample_weight : array-like of shape (n_samples,), optional
        groups : array-like of shape (n_samples,), optional
            Prompt groups for the penalty folds; default: the frame's
            ``prompt:m:group`` column (each row its own group for arrays).

        Returns
        -------
        self
        """
        return self._fit(X, y, sources=sources, sample_weight=sample_weight, groups=groups)

    def _fit(self, X, y=None, *, sources=None, sample_weight=None, groups=None, lenient=False):
        """``fit``; with ``lenient`` (cross-fitting folds) a pairwise objective too small to fit is left out."""
        self._lenient = lenient
        if not isinstance(self.scale_labels, (bool, np.bool_)):
            raise ValueError(f"scale_labels must be a bool, got {self.scale_labels!r}.")
        alphas = self._alphas()
        if is_layout_frame(X):
            lay = read_layout(X, step=_STEP, need=[("side", "h")])
            self.feature_layout_ = True
            self.hidden_names_ = np.asarray(lay.names(lay.sides[0], "h"), dtype=object)
            self.n_features_in_ = len(self.hidden_names_)
            groups = resolve_groups(X, groups)
            if lay.kind == "pairs":
                if sources is not None and len(sources) != len(X):
                    raise ValueError(f"sources has {len(sources)} entries for {len(X)} pairs.")
                C, R = lay.block(X, "chosen", "h", np.float64), lay.block(X, "rejected", "h", np.float64)
                self._fit_pairs(C, R, pair_target(y, len(X)), sources, sample_weight, groups, alphas)
                return self
            if y is None:
                raise ValueError(f"{_STEP} on pointwise rows needs their ratings as y (one column per objective; "
                                 "NaN = missing). For preference pairs, featurize pairs instead.")
            if sources is not None:
                raise ValueError("sources= names the objective of each preference pair; X holds pointwise rows.")
            self._fit_rated(lay.block(X, "response", "h", np.float64), y, sample_weight, groups, alphas)
            return self
        if sources is not None:
            raise ValueError("sources= needs a feature frame of preference pairs (the output of BackboneFeaturizer "
                             "on pairs), not a plain array.")
        self.feature_layout_ = False
        if y is None:
            raise ValueError(f"{_STEP} requires y to be passed, but the target y is None "
                             "(y holds the ratings of the rows of X).")
        X = validate_data(self, X, dtype=np.float64, ensure_min_samples=2)
        groups = resolve_groups(X, groups)
        self._fit_rated(X, y, sample_weight, groups, alphas)
        return self

    def _finish(self, names, kinds, heads, mu, sd):
        coef = np.asarray([h[0] for h in heads])
        self.coef_ = coef / sd  # the standardisation folded into raw-feature weights
        self.intercept_ = np.asarray([h[1] for h in heads]) - self.coef_ @ mu
        self.alpha_ = np.asarray([h[2] for h in heads], dtype=float)
        self.n_labelled_ = np.asarray([h[3] for h in heads], dtype=int)
        self.label_mean_ = np.asarray([h[4] for h in heads], dtype=float)
        self.label_scale_ = np.asarray([h[5] for h in heads], dtype=float)
        if len(set(names)) != len(names):
            raise ValueError(f"Objective names must be unique, got {names}.")
        self.objective_names_ = np.asarray(names, dtype=object)
        self.objective_kinds_ = np.asarray(kinds, dtype=object)

    @staticmethod
    def _standardise(rows):
        mu, sd = rows.mean(axis=0), rows.std(axis=0)
        sd[sd < 1e-12] = 1.0
        return mu, sd

    def _fit_rated(self, X, y, sample_weight, groups, alphas):
        names = list(map(str, y.columns)) if isinstance(y, pd.DataFrame) else None
        if isinstance(y, pd.Series) and y.name is not None:
            names = [str(y.name)]
        Y = check_array(y, ensure_2d=False, ensure_all_finite="allow-nan", dtype=np.float64, input_name="y")
        if Y.ndim > 2:
            raise ValueError(f"y must be 1- or 2-dimensional, got shape {Y.shape}.")
        if len(Y) != len(X):
            raise ValueError(f"X and y have different numbers of rows: {len(X)} vs {len(Y)}.")
        if np.isinf(Y).any():
            raise ValueError("y contains infinite ratings.")
        self._single_output = Y.ndim == 1 and not self.feature_layout_
        Y = Y.reshape(len(Y), -1)
        names = names or [f"objective_{i}" for i in range(Y.shape[1])]
        w = None if sample_weight is None else _check_sample_weight(sample_weight, X)
        mu, sd = self._standardise(X)
        Xs = (X - mu) / sd
        heads = [self._fit_rated_one(Xs, Y[:, j], names[j], w, groups, alphas) for j in range(Y.shape[1])]
        self._finish(names, ["rating"] * len(names), heads, mu, sd)

    def _fit_rated_one(self, Xs, yj, name, w, groups, alphas):
        mask = ~np.isnan(yj)
        n = int(mask.sum())
        if n < 3:
            raise ValueError(f"Objective {name!r} has {n} labelled rows; at least 3 are needed to choose the "
                             "penalty by cross-validation.")
        yv = yj[mask]
        m, s = (float(yv.mean()), float(yv.std())) if self.scale_labels else (0.0, 1.0)
        s = s if s >= 1e-12 else 1.0  # constant labels: nothing to scale
        g = groups[mask]
        if len(np.unique(g)) < 2:
            raise ValueError(f"Objective {name!r}: all labelled rows share one prompt; the penalty cannot be chosen "
                             "by prompt-grouped cross-validation.")
        splits = self._splits(n, g, 5)
        ridge = RidgeCV(alphas=alphas, cv=splits).fit(Xs[mask], (yv - m) / s,
                                                      sample_weight=None if w is None else w[mask])
        return ridge.coef_, float(ridge.intercept_), float(ridge.alpha_), n, m, s

    def _fit_pairs(self, C, R, target, sources, sample_weight, groups, alphas):
        # orient every pair preferred-first
        swap = target == 0
        C, R = np.where(swap[:, None], R, C), np.where(swap[:, None], C, R)
        self._single_output = False
        if sources is None:
            labels = np.full(len(C), "preference", dtype=object)
        else:
            labels = np.asarray(pd.Series(sources).astype(object).where(pd.notna(pd.Series(sources)), None))
        names = [str(v) for v in pd.unique(pd.Series(labels).dropna())]
        if not names:
            raise ValueError("sources names no objective (all values are missing).")
        w = None if sample_weight is None else _check_sample_weight(sample_weight, C)
        mu, sd = self._standardise(np.vstack([C, R]))
        Cs, Rs = (C - mu) / sd, (R - mu) / sd
        str_labels = np.asarray([None if v is None else str(v) for v in labels], dtype=object)
        heads, kept = [], []
        for name in names:
            idx = np.flatnonzero(str_labels == name)
            if getattr(self, "_lenient", False) and (len(idx) < 4 or len(np.unique(groups[idx])) < 2):
                continue
            heads.append(self._fit_pairwise_one(Cs[idx], Rs[idx], name, None if w is None else w[idx], groups[idx],
                                                alphas))
            kept.append(name)
        if not kept:
            raise _NothingToFit("No pairwise objective has enough pairs in this fold.")
        self._finish(kept, ["pairwise"] * len(kept), heads, mu, sd)

    def _fit_pairwise_one(self, Cs, Rs, name, w, groups, alphas):
        n = len(Cs)
        if n < 4 or len(np.unique(groups)) < 2:
            raise ValueError(f"Pairwise objective {name!r} has {n} pairs from {len(np.unique(groups))} prompt(s); "
                             "at least 4 pairs from 2 prompts are needed.")
        D = Cs - Rs
        if np.allclose(D, 0):
            raise ValueError(f"Pairwise objective {name!r}: chosen and rejected features are identical in every pair.")
        rng = check_random_state(self.random_state)
        # swap sides of a random half so both classes are present without duplicating pairs across folds
        swap = np.zeros(n, dtype=bool)
        swap[rng.permutation(n)[: n // 2]] = True
        D = np.where(swap[:, None], -D, D)
        target = (~swap).astype(int)
        splits = [(tr, te) for tr, te in self._splits(n, groups, min(5, n // 2))
                  if len(np.unique(target[tr])) == 2]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=FutureWarning)
            # weakly penalised fits of (nearly) separable pairs never converge: cap the iterations,
            # cross-validation rejects those penalties anyway
            warnings.simplefilter("ignore", category=ConvergenceWarning)
            if splits:
                lr = LogisticRegressionCV(Cs=1.0 / alphas, fit_intercept=False, cv=splits, scoring="neg_log_loss",
                                          max_iter=300).fit(D, target, sample_weight=w)
            else:  # too few prompts for a fold with both sides: the middle of the grid, without a search
                lr = LogisticRegression(C=1.0 / alphas[len(alphas) // 2], fit_intercept=False, max_iter=300)
                lr.fit(D, target, sample_weight=w)
                lr.C_ = np.asarray([lr.C])
        wv = lr.coef_.reshape(-1)
        s = np.concatenate([Cs @ wv, Rs @ wv])
        m, sc = float(s.mean()), float(s.std())
        sc = sc if sc >= 1e-12 else 1.0
        C = float(np.ravel(lr.C_)[0])
        return wv / sc, -m / sc, 1.0 / C, n, m, sc

    def fit_transform(self, X, y=None, **fit_params):
        """Fit, then transform ``X``: out-of-fold rewards when ``cross_fit`` is set (see Parameters)."""
        if self.cross_fit is None:
            return self.fit(X, y, **fit_params).transform(X)
        groups = resolve_groups(X, fit_params.get("groups"))
        seed = check_random_state(self.random_state).randint(2**31 - 1)
        self.fit(X, y, **fit_params)
        sources = fit_params.get("sources")
        if isinstance(self.cross_fit, numbers.Integral) and sources is not None:
            # folds by prompt that keep every source in every training fold where the prompts allow it
            cv = StratifiedGroupKFold(int(self.cross_fit), shuffle=True, random_state=seed)
            # one stratum per source, pairs without one (None/NaN) together: plain strings sort (pandas 3 keeps NaN)
            strata = np.asarray(["" if pd.isna(v) else f"s:{v}" for v in pd.Series(sources, dtype=object)])
        else:
            cv, strata = check_prompt_cv(self.cross_fit, random_state=seed), None
        parts, order, filled = [], [], {}
        for train, test in cv.split(np.zeros((len(X), 1)), strata, groups=groups):
            sub = {k: (_subset(v, train) if k in ("sources", "sample_weight", "groups") else v)
                   for k, v in fit_params.items()}
            fold = clone(self).set_params(cross_fit=None)
            Xt = _subset(X, test) if isinstance(X, pd.DataFrame) else np.asarray(X)[test]
            try:
                fold._fit(_subset(X, train) if isinstance(X, pd.DataFrame) else np.asarray(X)[train],
                          _subset(y, train), lenient=True, **sub)
                out = fold.transform(Xt)
            except _NothingToFit:
                full = self.transform(Xt)
                out = full[[c for c in full.columns if ":r:" not in c]]
            lacking = [n for n in self.objective_names_ if not any(c.endswith(f":r:{n}") for c in out.columns)] \
                if self.feature_layout_ else []
            if lacking:  # objectives too small for this fold: its rows keep the full fit's (in-sample) rewards
                full = self.transform(Xt)
                out = pd.concat([out, full[[c for c in full.columns if c not in out.columns]]], axis=1)[full.columns]
                for name in lacking:
                    filled[name] = filled.get(name, 0) + len(test)
            elif self.feature_layout_:
                out = out[self._output_columns(out)]
            parts.append(out)
            order.append(test)
        if filled:
            warnings.warn(f"Cross-fitting: objective(s) {sorted(filled)} had too few prompts in some training folds "
                          "(at least 4 pairs from 2 prompts are needed); their in-sample rewards were used for "
                          f"those folds' rows ({filled}). Use fewer folds or more pairs per source.", stacklevel=2)
        order = np.concatenate(order)
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        if self.feature_layout_:
            return pd.concat(parts).iloc[inverse]
        return np.concatenate(parts)[inverse]

    def _output_columns(self, out):
        """``out``'s columns in the order of the full fit: objectives per side, then the pass-through."""
        sides = read_layout(out, step=_STEP).sides
        return [f"{side}:r:{name}" for side in sides for name in self.objective_names_] + \
            [c for c in out.columns if ":r:" not in c]

    # -- inference -----------------------------------------------------------------------------
    def _rewards(self, H, original_units):
        R = H @ self.coef_.T + self.intercept_
        return R * self.label_scale_ + self.label_mean_ if original_units else R

    def _check_frame(self, X):
        lay = read_layout(X, step=_STEP, need=[("side", "h")])
        got = lay.names(lay.sides[0], "h")
        if len(got) != len(self.hidden_names_) or got != list(self.hidden_names_):
            raise ValueError(f"{_STEP} was fitted on {len(self.hidden_names_)} hidden-state features per "
                             f"response; X has {len(got)} (another backbone or layer?).")
        return lay

    def transform(self, X):
        """Objective rewards: a feature frame with ``{side}:r:{objective}`` blocks (prompt block and
        metadata carried through), or an array of shape (n, n_objectives) for array input."""
        check_is_fitted(self, "coef_")
        if not self.feature_layout_:
            R = self.predict(X)
            return R.reshape(R.shape[0], -1)
        lay = self._check_frame(X)
        names = list(self.objective_names_)
        blocks = {(side, "r", tuple(names)): self._rewards(lay.block(X, side, "h", np.float64), False)
                  for side in lay.sides}
        blocks["passthrough"] = lay.passthrough(X)
        return make_frame(blocks, index=X.index)

    def predict(self, X, *, original_units=False):
        """Objective rewards, shape ``(n_samples, n_objectives)`` (pointwise rows or arrays).

        Standardised by default; ``original_units=True`` maps rated objectives
        back to their rating scale and pairwise ones to Bradley–Terry logits.
        """
        check_is_fitted(self, "coef_")
        if self.feature_layout_:
            lay = self._check_frame(X)
            if lay.kind != "pointwise":
                raise ValueError(f"{_STEP}.predict takes pointwise rows; use transform for pairs.")
            return self._rewards(lay.block(X, "response", "h", np.float64), original_units)
        X = validate_data(self, X, reset=False, dtype=np.float64)
        R = self._rewards(X, original_units)
        return R[:, 0] if self._single_output else R

    def predict_frame(self, X, *, original_units=False):
        """:meth:`predict` as a DataFrame with one column per objective."""
        R = self.predict(X, original_units=original_units)
        return pd.DataFrame(R.reshape(len(R), -1), columns=list(self.objective_names_))

    def score(self, X, y=None, sample_weight=None):
        """Pairs: mean pairwise accuracy over objectives. Rated rows: mean R² over objectives
        (fully labelled ``y``, standardised targets)."""
        check_is_fitted(self, "coef_")
        if self.feature_layout_ and read_layout(X, step=_STEP).kind == "pairs":
            lay = self._check_frame(X)
            Rc, Rr = (self._rewards(lay.block(X, s, "h", np.float64), False) for s in lay.sides)
            right = (Rc > Rr) == (pair_target(y, len(X)) == 1)[:, None]
            return float(np.average(right.mean(axis=1), weights=sample_weight))
        from sklearn.metrics import r2_score

        Y = np.asarray(y, dtype=float)
        Y = Y.reshape(len(Y), -1)
        if np.isnan(Y).any():
            raise ValueError("score needs fully labelled y; NaN ratings found.")
        k = Y.shape[1]
        Y = (Y - self.label_mean_[:k]) / self.label_scale_[:k]
        P = self.predict(X).reshape(len(Y), -1)[:, :k]
        return r2_score(Y, P, sample_weight=sample_weight)

    def get_feature_names_out(self, input_features=None):
        """Objective names (array input) — frames carry their own column names."""
        check_is_fitted(self, "coef_")
        return np.asarray(self.objective_names_, dtype=object)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        tags.target_tags.single_output = True
        tags.input_tags.allow_nan = False
        return tags
