"""The end-to-end ArmoRM recipe: text in, interpretable rewards out."""

from __future__ import annotations

import numbers

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, clone
from sklearn.frozen import FrozenEstimator
from sklearn.model_selection import StratifiedKFold
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted

from ._backbones import load_tokenizer
from ._data import as_frame, read_pairs, read_pointwise, read_texts
from ._decorrelation import VerbosityDecorrelator
from ._featurizer import BackboneFeaturizer
from ._gating import GatedScalarizer
from ._multiobjective import MultiObjectiveRegressor

__all__ = ["ArmoRM", "response_token_lengths"]

_TEXT_COLUMNS = {"prompt", "messages", "response", "chosen", "rejected"}


def response_token_lengths(responses, backbone):
    """Number of tokens of each response text under ``backbone``'s tokenizer.

    Examples
    --------
    >>> from rmkit.testing import tiny_backbone
    >>> response_token_lengths(["ab", "abcd"], tiny_backbone()).tolist()  # byte-level tokenizer
    [2, 4]
    """
    tok = load_tokenizer(backbone)
    ids = tok(list(responses), add_special_tokens=False)["input_ids"]
    return np.asarray([len(i) for i in ids], dtype=int)


class ArmoRM(BaseEstimator):
    """ArmoRM (Wang et al. 2024) from text: multi-objective probes, verbosity decorrelation, gating.

    ``fit`` featurizes the training pairs once with ``featurizer`` (cached on
    disk), obtains stage-1 objective rewards for every response, appends a
    verbosity objective, fits the :class:`VerbosityDecorrelator` on the
    training responses and trains the :class:`GatedScalarizer` on the pairs.

    **Two training sets.** Stage 1 and stage 2 learn from different data
    (absolute ratings vs preference pairs). ``X`` is always the pairs of
    stage 2; stage 1 comes from one of:

    * ``objectives=FrozenEstimator(fitted_regressor)``: a
      :class:`MultiObjectiveRegressor` fitted beforehand on
      ``featurizer.transform(ratings)`` (scikit-learn's pattern for prefit
      components; ``clone`` keeps it fitted, so this is the form to use in
      ``cross_val_score`` / ``GridSearchCV``);
    * ``fit(X, ratings=df)``: a DataFrame of pointwise rows with one numeric
      column per rated objective (NaN = missing), and/or
      ``pair_objective_column``: a column of ``X`` naming, per pair, the
      source whose Bradley–Terry probe it trains (empty = stage 2 only).

    Pairwise objectives fitted on the training pairs would look better on
    those pairs than on new data; with ``cv`` the gating is trained on
    out-of-fold rewards (cross-fitting, folds stratified by source), and the
    final probes use all pairs.

    Parameters
    ----------
    featurizer : BackboneFeaturizer, default=None
        ``None`` uses ``BackboneFeaturizer()`` (the embedded backbone).
    objectives : MultiObjectiveRegressor or FrozenEstimator, default=None
        Stage-1 estimator (``None``: ``MultiObjectiveRegressor()``).
    rating_columns : list of str, default=None
        Objective columns of ``ratings``; ``None`` takes every numeric column.
    pair_objective_column : str, default=None
    verbosity : str, default="length"
        ``"length"`` derives the verbosity objective from the standardised
        log token count of the response; otherwise the name of a stage-1
        objective that rates verbosity.
    decorrelator : VerbosityDecorrelator, default=None
        Its ``threshold``, ``lambdas`` and ``drop_verbosity`` are used; its
        ``verbosity`` is set by ArmoRM.
    gating : GatedScalarizer, default=None
        Stage-2 hyperparameters (pass an instance to tune ``gating__...`` in
        ``GridSearchCV``); its ``transform`` is set by ArmoRM.
    cv : int or None, default=5
        Folds of the cross-fitting described above; ``None`` trains the
        gating on in-sample rewards.
    random_state : int or None, default=None
        Seeds stage 1, the folds and stage 2 where they have no seed of their own.

    Attributes
    ----------
    featurizer_, objectives_, decorrelator_, gating_ : fitted components
    objective_names_ : ndarray of str
        Stage-1 objectives plus the verbosity objective (``"verbosity"``
        when derived from length).
    gated_names_ : ndarray of str
        Objectives after the transform (what the gating weights).
    length_mean_, length_scale_ : float
        Standardisation of log token counts (derived verbosity only).

    Notes
    -----
    ``predict`` on pointwise rows returns scores; on pairs it returns
    P(chosen ≻ rejected), so :data:`rmkit.metrics.pairwise_scorer` and the
    default ``score`` (pairwise accuracy) work in model selection.
    ``check_estimator`` does not apply: the input is text, not arrays (the
    array-level components are checked instead).

    Examples
    --------
    >>> import numpy as np
    >>> from rmkit import ArmoRM, BackboneFeaturizer, GatedScalarizer
    >>> from rmkit.datasets import make_preference_pairs
    >>> from rmkit.testing import tiny_backbone
    >>> pairs = make_preference_pairs(30, random_state=0)
    >>> model = ArmoRM(BackboneFeaturizer(tiny_backbone(), cache=False, verbose=0),
    ...                pair_objective_column="category", gating=GatedScalarizer(max_epochs=2), cv=None,
    ...                random_state=0).fit(pairs)
    >>> list(model.objective_names_)
    ['math', 'safety', 'relevance', 'verbosity']
    >>> p = model.predict(pairs.head(3)); bool(((p >= 0) & (p <= 1)).all())
    True
    """

    def __init__(self, featurizer=None, *, objectives=None, rating_columns=None, pair_objective_column=None,
                 verbosity="length", decorrelator=None, gating=None, cv=5, random_state=None):
        self.featurizer = featurizer
        self.objectives = objectives
        self.rating_columns = rating_columns
        self.pair_objective_column = pair_objective_column
        self.verbosity = verbosity
        self.decorrelator = decorrelator
        self.gating = gating
        self.cv = cv
        self.random_state = random_state

    # -- helpers -------------------------------------------------------------------------------
    def _seed(self, rng):
        return int(rng.randint(2**31 - 1))

    def _derived_verbosity(self):
        return self.verbosity == "length"

    def _rating_data(self, ratings):
        df = as_frame(ratings, name="ratings")
        read_pointwise(df, name="ratings")
        if self.rating_columns is not None:
            missing = [c for c in self.rating_columns if c not in df.columns]
            if missing:
                raise ValueError(f"ratings is missing the rating column(s) {missing}.")
            cols = list(self.rating_columns)
        else:
            cols = [c for c in df.select_dtypes("number").columns if c not in _TEXT_COLUMNS]
        if not cols:
            raise ValueError("ratings has no numeric rating columns (set rating_columns).")
        return df, df[cols].astype(float)

    def _pair_groups(self, df):
        col = self.pair_objective_column
        if col is None:
            return {}
        if col not in df.columns:
            raise ValueError(f"X is missing the column {col!r} named by pair_objective_column.")
        labels = df[col]
        groups = {}
        for name in pd.unique(labels.dropna()):
            groups[str(name)] = np.flatnonzero((labels == name).to_numpy())
        if not groups:
            raise ValueError(f"Column {col!r} names no objective (all values are missing).")
        return groups

    def _fit_stage1(self, feats_pairs, groups, rating_feats, rating_y, rows, seed):
        """Fit a fresh stage-1 regressor on the ratings and the pair groups restricted to ``rows``."""
        mor = clone(self.objectives) if self.objectives is not None else MultiObjectiveRegressor()
        if isinstance(mor, MultiObjectiveRegressor) and mor.random_state is None:
            mor.set_params(random_state=seed)
        keep = np.zeros(len(feats_pairs), dtype=bool)
        keep[rows] = True
        pair_objs = {name: feats_pairs[idx[keep[idx]]] for name, idx in groups.items()}
        return mor.fit(rating_feats, rating_y, pair_objectives=pair_objs or None)

    def _stage1_rewards(self, mor, response_feats, lengths):
        R = np.asarray(mor.predict(response_feats), dtype=float).reshape(len(response_feats), -1)
        if self._derived_verbosity():
            v = (np.log1p(lengths) - self.length_mean_) / self.length_scale_
            R = np.hstack([R, v[:, None]])
        return R

    def _response_rows(self, F, d, kind):
        """Pointwise ``[response | prompt]`` rows: one block per response (chosen then rejected for pairs)."""
        if kind == "pointwise":
            return [F]
        prompt = F[:, 2 * d:]
        return [np.hstack([F[:, :d], prompt]), np.hstack([F[:, d:2 * d], prompt])]

    def _lengths(self, kind, data):
        texts = data.responses if kind == "pointwise" else data.chosen + data.rejected
        n = len(data)
        L = response_token_lengths(texts, self.featurizer_.backbone)
        return [L] if kind == "pointwise" else [L[:n], L[n:]]

    # -- fitting -------------------------------------------------------------------------------
    def fit(self, X, y=None, *, ratings=None):
        """Fit all stages.

        Parameters
        ----------
        X : DataFrame or list of dicts
            Preference pairs (``prompt``/``messages``, ``chosen``, ``rejected``).
        y : ignored
        ratings : DataFrame, optional
            Pointwise rows with rating columns for stage 1 (see the class docstring).

        Returns
        -------
        self
        """
        df = as_frame(X)
        data = read_pairs(df)
        rng = check_random_state(self.random_state)
        frozen = isinstance(self.objectives, FrozenEstimator)
        if frozen and (ratings is not None or self.pair_objective_column is not None):
            raise ValueError("objectives is a FrozenEstimator (prefit stage 1): do not also pass ratings= or "
                             "pair_objective_column.")
        if not frozen and ratings is None and self.pair_objective_column is None:
            raise ValueError("Stage 1 has no data: pass ratings= to fit, set pair_objective_column, or give a "
                             "prefit objectives=FrozenEstimator(MultiObjectiveRegressor(...).fit(...)).")
        if self.cv is not None and (not isinstance(self.cv, numbers.Integral) or self.cv < 2):
            raise ValueError(f"cv must be None or an integer >= 2, got {self.cv!r}.")
        feat = clone(self.featurizer) if self.featurizer is not None else BackboneFeaturizer()
        self.featurizer_ = feat.fit(df)
        d = feat.hidden_size_
        F = feat.transform(df)
        if ratings is not None:
            rdf, rating_y = self._rating_data(ratings)
            rating_feats = feat.transform(rdf)
        else:
            rating_feats, rating_y = None, None
        groups = self._pair_groups(df)
        seed1 = self._seed(rng)
        n = len(df)
        if frozen:
            check_is_fitted(self.objectives)
            mor = self.objectives
        else:
            mor = self._fit_stage1(F, groups, rating_feats, rating_y, np.arange(n), seed1)
        names = [str(s) for s in np.atleast_1d(mor.objective_names_)]
        if len(names) < 2:
            raise ValueError(f"ArmoRM needs at least two stage-1 objectives to gate between; got {len(names)} "
                             f"({names}).")
        lengths = self._lengths("pairs", data)
        if self._derived_verbosity():
            if "verbosity" in names:
                raise ValueError("A stage-1 objective is already named 'verbosity'; pass verbosity='verbosity' "
                                 "to use it instead of the length-derived one.")
            ll = np.log1p(np.concatenate(lengths))
            self.length_mean_, self.length_scale_ = float(ll.mean()), float(ll.std() or 1.0)
            names = names + ["verbosity"]
            v_index = len(names) - 1
        else:
            if self.verbosity not in names:
                raise ValueError(f"verbosity={self.verbosity!r} is neither 'length' nor a stage-1 objective "
                                 f"({names}).")
            v_index = names.index(self.verbosity)
        self.objectives_ = mor
        rows_c, rows_r = self._response_rows(F, d, "pairs")
        if self.cv is not None and groups and not frozen:
            # out-of-fold stage-1 rewards for the pairs the probes were trained on
            Rc, Rr = np.empty((n, len(names))), np.empty((n, len(names)))
            source = np.full(n, -1)
            for j, idx in enumerate(groups.values()):
                source[idx] = j
            folds = StratifiedKFold(self.cv, shuffle=True, random_state=self._seed(rng))
            for train, test in folds.split(np.zeros(n), source):
                part = self._fit_stage1(F, groups, rating_feats, rating_y, train, seed1)
                Rc[test] = self._stage1_rewards(part, rows_c[test], lengths[0][test])
                Rr[test] = self._stage1_rewards(part, rows_r[test], lengths[1][test])
        else:
            Rc = self._stage1_rewards(mor, rows_c, lengths[0])
            Rr = self._stage1_rewards(mor, rows_r, lengths[1])
        dec = clone(self.decorrelator) if self.decorrelator is not None else VerbosityDecorrelator()
        self.decorrelator_ = dec.set_params(verbosity=v_index).fit(np.vstack([Rc, Rr]))
        T = self.decorrelator_.transform_matrix_
        gating = clone(self.gating) if self.gating is not None else GatedScalarizer()
        gating.set_params(transform=T, n_objectives=len(names))
        seed2 = self._seed(rng)
        if gating.random_state is None:
            gating.set_params(random_state=seed2)
        self.gating_ = gating.fit(np.hstack([Rc, Rr, F[:, 2 * d:]]).astype(np.float32))
        self.objective_names_ = np.asarray(names, dtype=object)
        kept = [nm for i, nm in enumerate(names) if not (dec.drop_verbosity and i == v_index)]
        self.gated_names_ = np.asarray(kept, dtype=object)
        return self

    # -- inference -----------------------------------------------------------------------------
    def _inputs(self, X):
        """Per-response gating inputs ``[r | prompt]`` (a list: one entry, or chosen and rejected)."""
        check_is_fitted(self, "gating_")
        df = as_frame(X)
        kind, data = read_texts(df)
        F = self.featurizer_.transform(df)
        d = self.featurizer_.hidden_size_
        rows = self._response_rows(F, d, kind)
        lengths = self._lengths(kind, data) if self._derived_verbosity() else [None] * len(rows)
        prompt = F[:, -d:]
        out = [np.hstack([self._stage1_rewards(self.objectives_, r, L), prompt]).astype(np.float32)
               for r, L in zip(rows, lengths)]
        return kind, out

    def objective_rewards(self, X):
        """Stage-1 rewards (plus verbosity) of pointwise rows as a DataFrame, one column per objective."""
        kind, inputs = self._inputs(X)
        if kind != "pointwise":
            raise ValueError("objective_rewards takes pointwise rows ('prompt' + 'response').")
        k = len(self.objective_names_)
        return pd.DataFrame(inputs[0][:, :k].astype(float), columns=list(self.objective_names_))

    def decision_function(self, X):
        """Scores: ``(n,)`` for pointwise rows, ``(n, 2)`` ``[chosen, rejected]`` for pairs."""
        kind, inputs = self._inputs(X)
        scores = [self.gating_.decision_function(x) for x in inputs]
        return scores[0] if kind == "pointwise" else np.column_stack(scores)

    def predict(self, X):
        """Pointwise rows → reward per row; pairs → P(chosen ≻ rejected)."""
        s = self.decision_function(X)
        if s.ndim == 1:
            return s
        return 1.0 / (1.0 + np.exp(-(s[:, 0] - s[:, 1])))

    def score(self, X, y=None, sample_weight=None):
        """Pairwise accuracy: share of pairs with P(chosen ≻ rejected) > 0.5."""
        p = self.predict(X)
        if len(p) and read_texts(as_frame(X))[0] != "pairs":
            raise ValueError("score needs preference pairs ('prompt', 'chosen', 'rejected').")
        return float(np.average(p > 0.5, weights=sample_weight))

    def explain(self, X, *, as_frame=True):
        """Per-objective rewards, gating weights, coefficients and scores.

        Parameters
        ----------
        X : pointwise rows or preference pairs
        as_frame : bool, default=True
            ``True``: a tidy DataFrame (``row, side, objective, reward,
            gating_weight, coefficient, contribution, score``; ``side`` is
            ``"response"`` or ``"chosen"``/``"rejected"``), where
            ``contribution = reward * coefficient`` sums to ``score`` per
            response. ``False``: the arrays of
            :meth:`GatedScalarizer.explain` (a dict per side for pairs).
        """
        kind, inputs = self._inputs(X)
        sides = ["response"] if kind == "pointwise" else ["chosen", "rejected"]
        if not as_frame:
            arrays = {s: self.gating_.explain(x) for s, x in zip(sides, inputs)}
            return arrays["response"] if kind == "pointwise" else arrays
        frames = []
        for s, x in zip(sides, inputs):
            f = self.gating_.explain_frame(x, list(self.objective_names_), list(self.gated_names_))
            f.insert(1, "side", s)
            frames.append(f)
        out = pd.concat(frames, ignore_index=True).sort_values(["row", "side"], kind="stable")
        return out.reset_index(drop=True)
