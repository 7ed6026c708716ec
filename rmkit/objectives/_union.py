"""ObjectiveUnion: several objective providers side by side, one objective matrix out."""

from __future__ import annotations

import inspect

import numpy as np
from sklearn.pipeline import FeatureUnion
from sklearn.utils import Bunch
from sklearn.utils.metadata_routing import _routing_enabled

from rmkit.layout import read_layout

__all__ = ["ObjectiveUnion"]


class ObjectiveUnion(FeatureUnion):
    """Run several objective providers on the same input and join their objectives by name.

    Like scikit-learn's ``FeatureUnion`` (fitting in parallel, metadata
    routing, ``get_params``/``set_params`` of every member as
    ``<member>__<param>``), but it joins *feature frames*: the objective
    blocks ``{side}:r:*`` of all members are concatenated in member order
    (an objective name may occur once), while the blocks that members carry
    through (the prompt block and metadata) are kept once — members that
    emit the same pass-through column must agree on its values.

    So one gate can weigh objectives of any origin: ridge probes on ratings
    (prefit, under ``FrozenEstimator``), Bradley–Terry probes on pairs and
    LoRA capability experts that read the text themselves.

    Fit parameters reach the members through scikit-learn's metadata routing
    when it is enabled. Without it, ``<member>__<param>`` goes to that member
    and an unprefixed parameter goes to every member whose ``fit`` accepts it.

    Parameters
    ----------
    transformer_list : list of (str, transformer)
        Objective providers: each maps the union's input to a feature frame
        with objective blocks.
    n_jobs : int, default=None
    verbose : bool, default=False

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.frozen import FrozenEstimator
    >>> from sklearn.pipeline import make_pipeline
    >>> from rmkit import BackboneFeaturizer, MultiObjectiveRegressor, ObjectiveUnion
    >>> from rmkit.datasets import make_preference_pairs
    >>> from rmkit.testing import tiny_backbone
    >>> feat = BackboneFeaturizer(tiny_backbone(), cache=False, verbose=0)
    >>> pairs = make_preference_pairs(40, random_state=0)
    >>> rated = pairs.rename(columns={"chosen": "response"})[["prompt", "response"]]
    >>> ratings = np.random.RandomState(0).normal(size=(40, 2))
    >>> stage1 = MultiObjectiveRegressor().fit(feat.fit_transform(rated), ratings)  # other data, prefit
    >>> union = ObjectiveUnion([("rated", FrozenEstimator(stage1)), ("bt", MultiObjectiveRegressor())])
    >>> R = make_pipeline(feat, union).fit_transform(pairs, objectiveunion__sources=pairs["category"])
    >>> [c.split(":")[2] for c in R.columns if c.startswith("chosen:r:")]
    ['objective_0', 'objective_1', 'math', 'safety', 'relevance']
    """

    transformer_weights = None  # weights would scale the pass-through blocks too: not offered
    verbose_feature_names_out = False

    def __init__(self, transformer_list, *, n_jobs=None, verbose=False):
        self.transformer_list = transformer_list
        self.n_jobs = n_jobs
        self.verbose = verbose

    def _member_params(self, params):
        names = [n for n, _ in self.transformer_list]
        out = {n: {} for n in names}
        for key, value in params.items():
            member, sep, sub = key.partition("__")
            if sep and member in out:
                out[member][sub] = value
                continue
            takers = {n: _param_key(t, key) for n, t in self.transformer_list if t not in (None, "drop")}
            takers = {n: k for n, k in takers.items() if k is not None}
            if not takers:
                raise TypeError(f"ObjectiveUnion: no member's fit accepts {key!r} (members: {names}).")
            for n, k in takers.items():
                out[n][k] = value
        return Bunch(**{n: Bunch(fit=p, fit_transform=p) for n, p in out.items()})

    def fit_transform(self, X, y=None, **params):
        """Fit every member, transform ``X`` and join the objectives (see the class docstring)."""
        if _routing_enabled():
            return super().fit_transform(X, y, **params)
        from sklearn.pipeline import _fit_transform_one

        self._validate_transformers()
        results = self._parallel_func(X, y, _fit_transform_one, self._member_params(params))
        Xs, transformers = zip(*results)
        self._update_transformer_list(transformers)
        return self._hstack(Xs)

    def fit(self, X, y=None, **params):
        """Fit every member (see :meth:`fit_transform`)."""
        self.fit_transform(X, y, **params)
        return self

    def _hstack(self, Xs):
        objectives, passthrough, owner = {}, {}, {}
        index = None
        for X, (name, _) in zip(Xs, self.transformer_list):
            read_layout(X, step=f"ObjectiveUnion member {name!r}", need=[("side", "r")])
            index = X.index if index is None else index
            for col in X.columns:
                values = X[col]
                if ":r:" in col:
                    if col in objectives:
                        raise ValueError(f"ObjectiveUnion: members {owner[col]!r} and {name!r} both emit the "
                                         f"objective {col.split(':', 2)[2]!r}; rename one (objectives are joined by name).")
                    objectives[col], owner[col] = values.to_numpy(), name
                elif col in passthrough:
                    if not np.allclose(passthrough[col], values.to_numpy(), rtol=1e-4, atol=1e-5, equal_nan=True):
                        raise ValueError(f"ObjectiveUnion: members {owner[col]!r} and {name!r} carry different values "
                                         f"in {col!r} (different featurizers?); give the block to one member only.")
                else:
                    passthrough[col], owner[col] = values.to_numpy(), name
        import pandas as pd

        sides = sorted({c.split(":", 1)[0] for c in objectives}, key=("chosen", "rejected", "response").index)
        order = [c for side in sides for c in objectives if c.startswith(side + ":")]
        return pd.DataFrame({**{c: objectives[c] for c in order}, **passthrough}, index=index)

    def get_feature_names_out(self, input_features=None):
        """Not defined: the output is a feature frame whose columns carry the names."""
        raise AttributeError("ObjectiveUnion outputs a feature frame; read the names from its columns.")



def _param_key(estimator, name):
    """The key under which ``estimator.fit`` takes ``name`` (legacy routing), or None."""
    if type(estimator).__name__ == "FrozenEstimator":
        return None  # a frozen member is not refitted
    if isinstance(estimator, ObjectiveUnion):  # it shares an unprefixed parameter out itself
        members = [t for _, t in estimator.transformer_list if t not in (None, "drop")]
        return name if any(_param_key(t, name) is not None for t in members) else None
    steps = getattr(estimator, "steps", None)
    if steps:  # a Pipeline takes <step>__<param>; offer it to the final step
        inner = _param_key(steps[-1][1], name)
        return None if inner is None else f"{steps[-1][0]}__{inner}"
    params = inspect.signature(estimator.fit).parameters
    return name if name in params else None
