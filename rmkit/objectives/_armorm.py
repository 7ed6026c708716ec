"""The ArmoRM recipe: a pipeline of public parts, fitted stage by stage as in the paper."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, clone
from sklearn.frozen import FrozenEstimator
from sklearn.pipeline import Pipeline
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted

from rmkit.backbones._featurizer import BackboneFeaturizer
from rmkit.backbones._loading import load_tokenizer
from rmkit.base import TextRewardModelMixin
from rmkit.layout import read_layout
from rmkit.model_selection import check_prompt_cv, resolve_groups
from rmkit.utils._validation import as_frame, read_pairs, read_pointwise, read_texts

from ._decorrelation import VerbosityDecorrelator
from ._gating import GatedScalarizer
from ._multiobjective import MultiObjectiveRegressor
from ._union import ObjectiveUnion

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


class ArmoRM(TextRewardModelMixin, BaseEstimator):
    """ArmoRM (Wang et al. 2024) from text: multi-objective probes, verbosity decorrelation, gating.

    The fitted model is a scikit-learn ``Pipeline`` of public parts
    (``pipeline_``)::

        featurizer    BackboneFeaturizer           text -> hidden states + prompt feature
        objectives    ObjectiveUnion               stage 1: one reward per objective
          rated         FrozenEstimator(MultiObjectiveRegressor)   ridge on absolute ratings
          pairwise      MultiObjectiveRegressor(cross_fit=cv)      Bradley–Terry probe per source
        decorrelator  VerbosityDecorrelator        r_i - λ_i · verbosity
        gate          GatedScalarizer              stage 2: β Σ softmax(MLP(prompt)/τ)_k r'_k

    ``fit`` runs the paper's stages on two training sets. ``X`` is always the
    preference pairs of stage 2; stage 1 comes from one or both of:

    * rated rows: ``fit(X, ratings=df)`` (pointwise rows with one numeric
      column per objective, NaN = missing), or a prefit
      ``objectives=FrozenEstimator(MultiObjectiveRegressor().fit(...))``
      (scikit-learn's idiom for a part trained on other data; ``clone``
      keeps it fitted, so it is the form for ``cross_val_score`` and
      ``GridSearchCV``);
    * ``pair_objective_column``: a column of ``X`` naming, per pair, the
      source whose Bradley–Terry probe it trains (empty = stage 2 only).

    Pairwise probes fitted on the training pairs would look better on those
    pairs than on new data, so the gate trains on *out-of-fold* rewards
    (cross-fitting with folds grouped by prompt: no pair's prompt is seen by
    the probes that score it), and the final probes use all pairs. Every
    internal split (cross-fitting, the penalty folds of the probes, the
    gate's early-stopping split) is grouped by prompt.

    Parameters
    ----------
    featurizer : BackboneFeaturizer, default=None
        ``None`` uses ``BackboneFeaturizer()`` (the embedded backbone).
    objectives : MultiObjectiveRegressor or FrozenEstimator, default=None
        Template of the stage-1 probes, or a prefit rated stage 1.
    rating_columns : list of str, default=None
        Objective columns of ``ratings``; ``None`` takes every numeric column.
    pair_objective_column : str, default=None
    verbosity : str, default="length"
        ``"length"`` derives the verbosity objective from the response's
        token count; otherwise the name of a stage-1 objective that rates
        verbosity.
    decorrelator : VerbosityDecorrelator, default=None
        Its ``threshold``, ``lambdas`` and ``drop_verbosity`` are used.
    gating : GatedScalarizer, default=None
        Stage-2 hyperparameters (tune them as ``gating__...``).
    cv : int, splitter or None, default=5
        Cross-fitting folds (an int or a prompt-grouped splitter); ``None``
        trains the gate on in-sample rewards.
    random_state : int or None, default=None
        Seeds stage 1, the folds and stage 2 where they have no seed of their own.

    Attributes
    ----------
    pipeline_ : sklearn.pipeline.Pipeline
        The fitted parts; ``featurizer_``, ``objectives_``, ``decorrelator_``
        and ``gating_`` name its steps.
    objective_names_ : ndarray of str
        Stage-1 objectives plus the verbosity objective.
    gated_names_ : ndarray of str
        Objectives after the transform (what the gate weighs).

    Notes
    -----
    The reward-model contract (:mod:`rmkit.base`): ``predict`` on pointwise
    rows is the reward; on pairs ``predict`` is 1 when the chosen side wins,
    ``predict_proba`` P(chosen ≻ rejected), ``decision_function`` the
    margin and ``score`` pairwise accuracy. ``check_estimator`` does not
    apply: the input is text (the array-level parts are checked instead).

    Examples
    --------
    >>> from rmkit import ArmoRM, BackboneFeaturizer, GatedScalarizer
    >>> from rmkit.datasets import make_preference_pairs
    >>> from rmkit.testing import tiny_backbone
    >>> pairs = make_preference_pairs(30, random_state=0)
    >>> model = ArmoRM(BackboneFeaturizer(tiny_backbone(), cache=False, verbose=0),
    ...                pair_objective_column="category", gating=GatedScalarizer(max_epochs=2), cv=None,
    ...                random_state=0).fit(pairs)
    >>> list(model.objective_names_)
    ['math', 'safety', 'relevance', 'verbosity']
    >>> list(model.pipeline_.named_steps)
    ['featurizer', 'objectives', 'decorrelator', 'gate']
    >>> p = model.predict_proba(pairs.head(3))[:, 1]; bool(((p >= 0) & (p <= 1)).all())
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

    # -- data ----------------------------------------------------------------------------------
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

    def _sources(self, df):
        col = self.pair_objective_column
        if col not in df.columns:
            raise ValueError(f"X is missing the column {col!r} named by pair_objective_column.")
        sources = df[col].astype(object).where(df[col].notna(), None).to_numpy()
        if all(s is None for s in sources):
            raise ValueError(f"Column {col!r} names no objective (all values are missing).")
        return sources

    def _probe(self, seed, **params):
        template = self.objectives if isinstance(self.objectives, MultiObjectiveRegressor) else \
            MultiObjectiveRegressor()
        probe = clone(template).set_params(**params)
        if probe.random_state is None:
            probe.set_params(random_state=seed)
        return probe

    # -- fitting -------------------------------------------------------------------------------
    def fit(self, X, y=None, *, ratings=None, sample_weight=None, groups=None):
        """Fit the stages in order: featurize, stage-1 objectives, decorrelation, gate.

        Parameters
        ----------
        X : DataFrame or list of dicts
            Preference pairs (``prompt``/``messages``, ``chosen``, ``rejected``).
        y : array-like of shape (n_pairs,), optional
            1 where the ``chosen`` column is preferred, 0 where ``rejected``
            is (default: all 1).
        ratings : DataFrame, optional
            Pointwise rows with rating columns for stage 1.
        sample_weight : array-like of shape (n_pairs,), optional
            Per-pair weights (probes and gate).
        groups : array-like of shape (n_pairs,), optional
            Prompt groups of the pairs; default: derived from the prompts.

        Returns
        -------
        self
        """
        df = as_frame(X)
        read_pairs(df)
        rng = check_random_state(self.random_state)
        seed1, seed2 = (int(rng.randint(2**31 - 1)) for _ in range(2))
        frozen = isinstance(self.objectives, FrozenEstimator)
        if frozen and ratings is not None:
            raise ValueError("objectives is a FrozenEstimator (a prefit rated stage 1): do not also pass ratings=.")
        if not frozen and ratings is None and self.pair_objective_column is None:
            raise ValueError("Stage 1 has no data: pass ratings= to fit, set pair_objective_column, or give a "
                             "prefit objectives=FrozenEstimator(MultiObjectiveRegressor(...).fit(...)).")
        if self.cv is not None:
            check_prompt_cv(self.cv)  # refuses ungrouped splitters before any work
        cross_fit = self.cv
        groups = resolve_groups(df, groups)

        featurizer = clone(self.featurizer) if self.featurizer is not None else BackboneFeaturizer()
        F = featurizer.fit(df).transform(df)

        members = []
        if frozen:
            check_is_fitted(self.objectives)
            members.append(("rated", self.objectives))
        elif ratings is not None:
            rdf, rating_y = self._rating_data(ratings)
            rated = self._probe(seed1, cross_fit=None).fit(featurizer.transform(rdf), rating_y)
            members.append(("rated", FrozenEstimator(rated)))
        pair_params = {}
        if self.pair_objective_column is not None:
            members.append(("pairwise", self._probe(seed1, cross_fit=cross_fit)))
            pair_params = dict(pairwise__sources=self._sources(df), pairwise__groups=groups,
                               pairwise__sample_weight=sample_weight)
        objectives = ObjectiveUnion(members)
        R = objectives.fit_transform(F, y, **pair_params)

        decorrelator = clone(self.decorrelator) if self.decorrelator is not None else VerbosityDecorrelator()
        decorrelator.set_params(verbosity=self.verbosity)
        Rt = decorrelator.fit(R).transform(R)
        if len(decorrelator.output_names_) < 2:
            raise ValueError(f"ArmoRM needs at least two objectives to gate between; got "
                             f"{list(decorrelator.output_names_)}.")

        gate = clone(self.gating) if self.gating is not None else GatedScalarizer()
        if gate.random_state is None:
            gate.set_params(random_state=seed2)
        gate.fit(Rt, y, sample_weight=sample_weight, groups=groups)

        self.pipeline_ = Pipeline([("featurizer", featurizer), ("objectives", objectives),
                                   ("decorrelator", decorrelator), ("gate", gate)])
        self.objective_names_ = np.asarray(decorrelator.objective_names_, dtype=object)
        self.gated_names_ = np.asarray(decorrelator.output_names_, dtype=object)
        return self

    # -- the fitted parts ----------------------------------------------------------------------
    def _step(self, name):
        check_is_fitted(self, "pipeline_")
        return self.pipeline_.named_steps[name]

    featurizer_ = property(lambda self: self._step("featurizer"), doc="The fitted BackboneFeaturizer.")
    objectives_ = property(lambda self: self._step("objectives"), doc="The fitted stage-1 ObjectiveUnion.")
    decorrelator_ = property(lambda self: self._step("decorrelator"), doc="The fitted VerbosityDecorrelator.")
    gating_ = property(lambda self: self._step("gate"), doc="The fitted GatedScalarizer.")

    # -- inference -----------------------------------------------------------------------------
    def _objective_frame(self, X):
        check_is_fitted(self, "pipeline_")
        df = as_frame(X)
        read_texts(df)
        return self.pipeline_[:2].transform(df)

    def _scores(self, X):
        R = self._objective_frame(X)
        return self.gating_._scores(self.decorrelator_.transform(R))

    def objective_rewards(self, X):
        """Stage-1 rewards (plus verbosity) of pointwise rows: a DataFrame, one column per objective."""
        R = self._objective_frame(X)
        lay = read_layout(R, step="ArmoRM.objective_rewards")
        if lay.kind != "pointwise":
            raise ValueError("objective_rewards takes pointwise rows ('prompt' + 'response').")
        names, (raw,) = self.decorrelator_._frame_rewards(R, lay, fitting=False)
        return pd.DataFrame(raw, columns=names)

    def gating_entropy(self, X):
        """Entropy (nats) of the gate's weights per row's prompt (see :meth:`GatedScalarizer.gating_entropy`)."""
        return self.gating_.gating_entropy(self.decorrelator_.transform(self._objective_frame(X)))

    def explain(self, X, *, as_frame=True):
        """Per-objective rewards, gating weights, coefficients and scores.

        Parameters
        ----------
        X : pointwise rows or preference pairs
        as_frame : bool, default=True
            ``True``: a tidy DataFrame with columns ``row, side, objective,
            reward, gating_weight, coefficient, contribution, score``.
            ``reward`` is the stage-1 reward (before decorrelation),
            ``gating_weight`` the gate's weight on the objective after
            decorrelation (NaN for an objective the gate does not see),
            ``coefficient`` the weight on ``reward`` in the final score
            (``β · T g``: the gate's weights mapped back through the
            decorrelation), and ``contribution = reward * coefficient``, which
            sums to ``score`` per response. ``False``: a dict of arrays per
            side with the same quantities.
        """
        R = self._objective_frame(X)
        lay = read_layout(R, step="ArmoRM.explain")
        dec, gate = self.decorrelator_, self.gating_
        names, raw = dec._frame_rewards(R, lay, fitting=False)
        gated = gate.explain(dec.transform(R))
        gated = {"response": gated} if lay.kind == "pointwise" else gated
        T = dec.transform_matrix_
        kept = list(dec.output_names_)
        arrays, frames = {}, []
        for side, r in zip(lay.sides, raw):
            g = gated[side]
            coef = g["coefficients"] @ T.T
            weights = np.full_like(r, np.nan)
            for j, name in enumerate(kept):
                weights[:, names.index(name)] = g["gating_weights"][:, j]
            arrays[side] = {"rewards": r, "gating_weights": weights, "coefficients": coef, "score": g["score"]}
            n, k = r.shape
            frames.append(pd.DataFrame({
                "row": np.repeat(np.arange(n), k), "side": side, "objective": np.tile(np.asarray(names, object), n),
                "reward": r.reshape(-1), "gating_weight": weights.reshape(-1), "coefficient": coef.reshape(-1),
                "contribution": (r * coef).reshape(-1), "score": np.repeat(g["score"], k)}))
        if not as_frame:
            return arrays["response"] if lay.kind == "pointwise" else arrays
        out = pd.concat(frames, ignore_index=True).sort_values(["row", "side"], kind="stable")
        return out.reset_index(drop=True)
