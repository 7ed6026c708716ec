"""RewardEnsemble: K reward models combined by mean, worst case or uncertainty penalty."""

from __future__ import annotations

import numbers

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, clone
from sklearn.utils import check_random_state
from sklearn.utils.metaestimators import _BaseComposition
from sklearn.utils.validation import check_is_fitted

from rmkit.base import TextRewardModelMixin
from rmkit.model_selection import prompt_groups
from rmkit.utils._validation import as_frame, infer_kind, read_pairs, read_pointwise

__all__ = ["COMBINERS", "RewardEnsemble", "combine_rewards"]

COMBINERS = ("mean", "min", "uwo")
_ALIASES = {"wco": "min", "worst_case": "min", "mean_minus_std": "uwo"}


def combine_rewards(Z, combine="mean", lam=1.0):
    """Combine a ``(n_rows, n_members)`` matrix of (standardised) rewards into one reward per row.

    ``"mean"``: the mean over members; ``"min"`` (alias ``"wco"``): the
    smallest member reward (worst-case optimisation, Coste et al. 2023);
    ``"uwo"`` (alias ``"mean_minus_std"``): ``mean - lam * std`` with the
    population standard deviation over members (uncertainty-weighted
    optimisation).

    Examples
    --------
    >>> import numpy as np
    >>> Z = np.array([[1.0, 3.0], [2.0, 2.0]])
    >>> combine_rewards(Z, "mean").tolist(), combine_rewards(Z, "min").tolist()
    ([2.0, 2.0], [1.0, 2.0])
    >>> combine_rewards(Z, "uwo", lam=0.5).tolist()
    [1.5, 2.0]
    """
    Z = np.asarray(Z, dtype=np.float64)
    if Z.ndim != 2:
        raise ValueError(f"Z must be a (n_rows, n_members) matrix; got shape {Z.shape}.")
    how = _ALIASES.get(combine, combine)
    if how == "mean":
        return Z.mean(1)
    if how == "min":
        return Z.min(1)
    if how == "uwo":
        if not isinstance(lam, numbers.Real) or lam < 0:
            raise ValueError(f"lam must be a non-negative number, got {lam!r}.")
        return Z.mean(1) - lam * Z.std(1)
    raise ValueError(f"combine must be one of {COMBINERS} (or the aliases {sorted(_ALIASES)}), got {combine!r}.")


def _grouped_bootstrap(groups, rng):
    """Row indices of a bootstrap resample of the groups (whole groups drawn with replacement)."""
    uniq, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(uniq))]
    drawn = rng.randint(len(uniq), size=len(uniq))
    return np.concatenate([members[g] for g in drawn])


def _conversation_columns(df):
    return [c for c in ("prompt", "messages") if c in df.columns]


def _pair_sides(df):
    """Pointwise frames of the chosen and of the rejected responses of a pairs frame."""
    cols = _conversation_columns(df)
    return (df[cols].assign(response=df["chosen"].to_numpy()).reset_index(drop=True),
            df[cols].assign(response=df["rejected"].to_numpy()).reset_index(drop=True))


def _random_state_params(est):
    return sorted(k for k in est.get_params(deep=True) if k == "random_state" or k.endswith("__random_state"))


class RewardEnsemble(TextRewardModelMixin, _BaseComposition, BaseEstimator):
    """K reward models, one combined reward: mean, worst case (WCO) or ``mean - lam * std`` (UWO).

    A scikit-learn meta-estimator over reward models: any rmkit recipe, or a
    pipeline whose ``fit`` takes preference pairs and whose ``predict`` on
    pointwise rows returns one reward per row. Members come

    * explicitly, ``estimators=[(name, estimator), ...]`` (reachable as
      ``get_params()["name"]`` and ``set_params(name__param=...)``, as in
      :class:`sklearn.ensemble.VotingRegressor`); or
    * from one template ``estimator``, ``n_members`` clones with different
      seeds (every ``random_state`` parameter, nested ones such as
      ``probe__random_state`` included, gets its own seed), or one clone per
      dict of ``param_variations`` (e.g. ``[{"featurizer__layer": 8},
      {"featurizer__layer": 10}]``).

    ``bootstrap=True`` fits every member on its own bootstrap resample of the
    training pairs, grouped by prompt: prompts (hashes of the normalised
    prompt or ``messages``, see :func:`rmkit.model_selection.prompt_groups`) are drawn with
    replacement and carry all their pairs, so pairs sharing a prompt never
    straddle in- and out-of-sample.

    **Standardisation.** Members may reward on different scales (a
    Bradley-Terry logit, a standardised ArmoRM score, a LoRA head). With
    ``standardize=True`` each member's rewards are standardised with the mean
    and standard deviation of its rewards on the training responses (chosen
    and rejected of ``fit``'s pairs) before they are combined, so the mean,
    minimum and spread compare like with like.

    **One featurizer pass.** Members that featurize with a
    :class:`~rmkit.BackboneFeaturizer` of identical parameters and the
    on-disk feature cache (``cache=True``, the default) run the backbone once
    per text: the first member computes and stores the features, the others
    read them (see the featurizer's ``last_stats_["cache_hits"]``). With
    ``cache=False`` every member pays its own pass.

    Parameters
    ----------
    estimators : list of (str, estimator) or None, default=None
        Explicit members. Their own seeds are left as given.
    estimator : estimator or None, default=None
        Template for generated members (when ``estimators`` is None).
    n_members : int, default=5
        Members generated from ``estimator`` when ``param_variations`` is None.
    param_variations : list of dict or None, default=None
        One member per dict, set on a clone of ``estimator`` with ``set_params``.
    bootstrap : bool, default=False
        Fit each member on a prompt-grouped bootstrap resample.
    combine : {"mean", "min", "uwo"}, default="mean"
        ``"min"`` may be written ``"wco"``, ``"uwo"`` ``"mean_minus_std"``.
    lam : float, default=1.0
        Uncertainty penalty of ``"uwo"``.
    standardize : bool, default=True
        Standardise each member's rewards on the training responses first.
    random_state : int, RandomState or None, default=None
        Draws the members' seeds and the bootstrap resamples.

    Attributes
    ----------
    estimators_ : list of estimators
        The fitted members.
    member_names_ : list of str
    reward_mean_, reward_scale_ : ndarray of shape (n_members,)
        Per-member standardisation (zeros and ones when ``standardize=False``).
    member_seeds_ : list of int or None
        Seed given to each generated member (None for explicit members).
    n_train_pairs_ : ndarray of shape (n_members,)
        Pairs each member was fitted on (bootstrap resamples repeat pairs).

    Notes
    -----
    The reward-model contract of rmkit (:mod:`rmkit.base`): ``predict`` on
    pointwise rows returns the combined reward; on preference pairs
    ``predict_proba`` gives P(chosen ≻ rejected) = sigmoid of the combined
    reward margin, ``decision_function`` the margin and ``score`` pairwise
    accuracy (ties count as wrong). Rows are scored independently: results do
    not depend on batch size.

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> from sklearn.base import BaseEstimator
    >>> class LengthRM(BaseEstimator):  # a toy reward model: weight * response length
    ...     def __init__(self, weight=1.0):
    ...         self.weight = weight
    ...     def fit(self, X, y=None):
    ...         return self
    ...     def predict(self, X):
    ...         return self.weight * pd.DataFrame(X)["response"].str.len().to_numpy(float)
    >>> pairs = pd.DataFrame({"prompt": ["q1", "q2"], "chosen": ["long answer", "yes!"], "rejected": ["no", "n"]})
    >>> ens = RewardEnsemble([("a", LengthRM(1.0)), ("b", LengthRM(100.0))], combine="min").fit(pairs)
    >>> rows = pd.DataFrame({"prompt": ["q", "q"], "response": ["short", "much longer"]})
    >>> ens.explain(rows).round(2)  # standardised: the 100x scale of member b disappears
          a     b  combined
    0  0.13  0.13      0.13
    1  1.66  1.66      1.66
    >>> ens.score(pairs)
    1.0
    """

    def __init__(self, estimators=None, *, estimator=None, n_members=5, param_variations=None, bootstrap=False,
                 combine="mean", lam=1.0, standardize=True, random_state=None):
        self.estimators = estimators
        self.estimator = estimator
        self.n_members = n_members
        self.param_variations = param_variations
        self.bootstrap = bootstrap
        self.combine = combine
        self.lam = lam
        self.standardize = standardize
        self.random_state = random_state

    # -- sklearn composition: explicit members are parameters, as in VotingRegressor ------------------

    def get_params(self, deep=True):
        """Parameters, with each explicit member (and its parameters) under its name."""
        if self.estimators is None:
            return super().get_params(deep=deep)
        return self._get_params("estimators", deep=deep)

    def set_params(self, **params):
        """Set parameters; ``name=est`` replaces a member, ``name__param=v`` sets a member's parameter."""
        if self.estimators is None:
            return super().set_params(**params)
        self._set_params("estimators", **params)
        return self

    # -- fitting ---------------------------------------------------------------------------------------

    def _members(self, rng):
        """``[(name, unfitted clone, seed or None)]``."""
        if self.estimators is not None:
            if self.estimator is not None:
                raise ValueError("Give either estimators=[(name, est), ...] or a template estimator=..., not both.")
            if not self.estimators:
                raise ValueError("estimators is empty: an ensemble needs at least one member.")
            names = [n for n, _ in self.estimators]
            self._validate_names(names)
            return [(n, clone(e), None) for n, e in self.estimators]
        if self.estimator is None:
            raise ValueError("RewardEnsemble needs members: estimators=[(name, est), ...] or estimator=template.")
        if self.param_variations is not None:
            variations = list(self.param_variations)
            if not variations or not all(isinstance(v, dict) for v in variations):
                raise ValueError("param_variations must be a non-empty list of dicts of parameters.")
        else:
            if not isinstance(self.n_members, numbers.Integral) or self.n_members < 1:
                raise ValueError(f"n_members must be a positive integer, got {self.n_members!r}.")
            variations = [{}] * int(self.n_members)
            if len(variations) > 1 and not self.bootstrap and not _random_state_params(self.estimator):
                raise ValueError(
                    f"{type(self.estimator).__name__} has no random_state parameter, so {len(variations)} seeded "
                    "members would be identical: use bootstrap=True or param_variations.")
        members = []
        for k, params in enumerate(variations):
            est = clone(self.estimator).set_params(**params)
            seed = int(rng.randint(np.iinfo(np.int32).max))
            seeds = {p: seed for p in _random_state_params(est)}
            members.append((f"member{k}", est.set_params(**seeds), seed if seeds else None))
        return members

    def fit(self, X, y=None, **fit_params):
        """Fit every member on preference pairs (``prompt``/``messages``, ``chosen``, ``rejected``).

        ``fit_params`` are passed to every member's ``fit``.
        """
        df = as_frame(X).reset_index(drop=True)
        read_pairs(df)  # validates: the members are trained on preferences
        _ = combine_rewards(np.zeros((1, 1)), self.combine, self.lam)  # validate combine and lam early
        rng = check_random_state(self.random_state)
        members = self._members(rng)
        groups = prompt_groups(df) if self.bootstrap else None
        chosen, rejected = _pair_sides(df)
        train_responses = pd.concat([chosen, rejected], ignore_index=True)
        fitted, means, scales, sizes = [], [], [], []
        for name, est, _ in members:
            idx = _grouped_bootstrap(groups, rng) if self.bootstrap else np.arange(len(df))
            part = df.iloc[idx].reset_index(drop=True)
            est.fit(part, **fit_params) if y is None else est.fit(part, np.asarray(y)[idx], **fit_params)
            fitted.append(est)
            sizes.append(len(idx))
            if self.standardize:
                r = self._member_rewards(est, name, train_responses)
                sd = float(r.std())
                if not np.isfinite(sd) or sd == 0.0:
                    raise ValueError(f"Member {name!r} gives the same reward to every training response; it "
                                     "cannot be standardised (set standardize=False to combine raw rewards).")
                means.append(float(r.mean()))
                scales.append(sd)
            else:
                means.append(0.0)
                scales.append(1.0)
        self.estimators_ = fitted
        self.member_names_ = [n for n, _, _ in members]
        self.member_seeds_ = [s for _, _, s in members]
        self.reward_mean_ = np.asarray(means)
        self.reward_scale_ = np.asarray(scales)
        self.n_train_pairs_ = np.asarray(sizes)
        return self

    # -- scoring ---------------------------------------------------------------------------------------

    @staticmethod
    def _member_rewards(est, name, rows):
        r = np.asarray(est.predict(rows), dtype=np.float64)
        if r.ndim == 2 and r.shape[1] == 1:
            r = r[:, 0]
        if r.shape != (len(rows),):
            raise ValueError(f"Member {name!r} returned predictions of shape {r.shape} on {len(rows)} pointwise "
                             "rows; an ensemble member must return one reward per row.")
        if not np.all(np.isfinite(r)):
            raise ValueError(f"Member {name!r} returned non-finite rewards.")
        return r

    def member_rewards(self, X, *, standardized=True):
        """``(n_rows, n_members)`` rewards of every member on pointwise rows."""
        check_is_fitted(self, "estimators_")
        df = as_frame(X).reset_index(drop=True)
        read_pointwise(df)
        R = np.column_stack([self._member_rewards(e, n, df) for n, e in zip(self.member_names_, self.estimators_)])
        return (R - self.reward_mean_) / self.reward_scale_ if standardized else R

    def _scores(self, X):
        """Combined rewards: ``(n,)`` for pointwise rows, ``(n, 2)`` ``[chosen, rejected]`` for pairs."""
        df = as_frame(X).reset_index(drop=True)
        if infer_kind(df) == "pairs":
            read_pairs(df, allow_identical=True)
            return "pairs", np.column_stack([self._scores(side)[1] for side in _pair_sides(df)])
        return "pointwise", combine_rewards(self.member_rewards(df), self.combine, self.lam)


    def explain(self, X, *, standardized=True):
        """Each member's reward and the combined reward of pointwise rows, as a DataFrame.

        Columns: one per member (standardised unless ``standardized=False``)
        and ``combined`` (always computed from the standardised rewards).
        """
        df = as_frame(X).reset_index(drop=True)
        Z = self.member_rewards(df)
        out = pd.DataFrame(Z if standardized else Z * self.reward_scale_ + self.reward_mean_,
                           columns=list(self.member_names_))
        out["combined"] = combine_rewards(Z, self.combine, self.lam)
        return out


