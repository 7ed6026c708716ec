"""TaskRouter: the sparse outer layer of DMoERM (route each prompt to one task's model)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import sparse
from sklearn.base import BaseEstimator, clone
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted

from rmkit.backbones._featurizer import BackboneFeaturizer, split_feature_blocks
from rmkit.backbones._loading import EMBEDDED_BACKBONE
from rmkit.base import TextInputMixin
from rmkit.metrics import pairwise_accuracy
from rmkit.utils._validation import (
    as_frame,
    check_labels,
    conversations_of,
    infer_kind,
    require_rows,
)

__all__ = ["TaskRouter"]


def _render(conversation):
    return "\n".join(m["content"] for m in conversation)


class TaskRouter(TextInputMixin, BaseEstimator):
    """Route each row to one task's estimator by classifying its prompt (top-1).

    ``fit`` trains a classifier (the router) to predict the task column from
    prompt features, and one inner estimator per task on that task's rows
    only. ``predict`` sends each row to the estimator of its predicted task
    and returns the results in the original row order.

    Parameters
    ----------
    estimators : estimator or dict
        One template, cloned for each task, or ``{task: estimator}`` covering
        every task in the training data.
    router : classifier, optional
        Any scikit-learn classifier on the prompt features. Default: a
        standardising logistic regression.
    featurizer : transformer, optional
        A :class:`~rmkit.BackboneFeaturizer` (its *prompt* block, the hidden
        state at the end of the templated prompt, is used), or any transformer
        of a list of prompt texts (such as ``TfidfVectorizer``; multi-turn
        conversations are joined turn by turn). Default:
        ``BackboneFeaturizer("smollm2-135m-instruct")``.
    task_column : str, default="task"
        Column of ``X`` holding the task labels in ``fit``.
    min_task_rows : int, default=2
        Tasks with fewer training rows are an error, unless ``fallback`` is
        given.
    fallback : estimator, optional
        Fitted on *all* rows and used for every task that has fewer than
        ``min_task_rows`` rows, or that a dict ``estimators`` does not cover.
        The router still learns those tasks.
    verbose : int, default=1
        Passed to the default featurizer (progress bar).

    Attributes
    ----------
    classes_ : ndarray
        The tasks, in the column order of :meth:`predict_route_proba`.
    estimators_ : dict
        ``{task: fitted estimator}`` (the fallback object for fallback tasks).
    router_ : classifier or None
        ``None`` when there was a single task (every row goes to it).
    featurizer_ : transformer
    task_counts_ : dict
        Training rows per task.
    fallback_tasks_ : list
        Tasks served by ``fallback_``.

    Notes
    -----
    ``check_estimator`` does not apply: the input is text with a task column,
    and the output type is whatever the inner estimators return.

    Examples
    --------
    >>> import pandas as pd
    >>> from sklearn.dummy import DummyRegressor
    >>> from sklearn.feature_extraction.text import TfidfVectorizer
    >>> X = pd.DataFrame({"prompt": ["add 2 and 3", "add 4 and 1", "poem on rain", "poem on sun"],
    ...                   "task": ["math", "math", "poetry", "poetry"]})
    >>> y = [1.0, 1.0, 5.0, 5.0]
    >>> model = TaskRouter(DummyRegressor(), featurizer=TfidfVectorizer()).fit(X, y)
    >>> test = pd.DataFrame({"prompt": ["a poem on snow", "add 7 and 8"]})
    >>> model.predict_route(test).tolist(), model.predict(test).tolist()
    (['poetry', 'math'], [5.0, 1.0])
    """

    def __init__(self, estimators, *, router=None, featurizer=None, task_column="task", min_task_rows=2,
                 fallback=None, verbose=1):
        self.estimators = estimators
        self.router = router
        self.featurizer = featurizer
        self.task_column = task_column
        self.min_task_rows = min_task_rows
        self.fallback = fallback
        self.verbose = verbose

    # -- prompt features -------------------------------------------------------------------
    def _make_featurizer(self):
        if self.featurizer is None:
            return BackboneFeaturizer(EMBEDDED_BACKBONE, verbose=self.verbose)
        return clone(self.featurizer)

    def _prompt_features(self, X, fit=False):
        df = as_frame(X)
        require_rows(df, "X")
        convs = conversations_of(df)
        feat = self.featurizer_
        if isinstance(feat, BackboneFeaturizer):
            # The prompt block does not depend on the response; a one-token stand-in keeps the pass short.
            rows = pd.DataFrame({"messages": convs, "response": ["."] * len(convs)})
            if fit:
                feat.fit(rows)
            return split_feature_blocks(feat.transform(rows))["prompt"]
        texts = [_render(c) for c in convs]
        return feat.fit_transform(texts) if fit else feat.transform(texts)

    # -- fit ---------------------------------------------------------------------------------
    def _tasks(self, df):
        if self.task_column not in df.columns:
            raise ValueError(f"X is missing the task column {self.task_column!r}; it has {list(df.columns)}.")
        tasks = df[self.task_column].to_numpy(dtype=object)
        missing = pd.isna(tasks)
        if missing.any():
            raise ValueError(f"The task column {self.task_column!r} has a missing value at row "
                             f"{int(np.argmax(missing))}.")
        check_labels(tasks, self.task_column)  # e.g. 1 and "1" mixed: two tasks that print alike
        return tasks

    # -- parameters: a dict of per-task estimators is reachable as estimators__<task>__<param> --
    def get_params(self, deep=True):
        out = super().get_params(deep=False)
        if not deep:
            return out
        if isinstance(self.estimators, dict):
            for task, est in self.estimators.items():
                out[f"estimators__{task}"] = est
                if hasattr(est, "get_params"):
                    out.update({f"estimators__{task}__{k}": v for k, v in est.get_params(deep=True).items()})
        elif hasattr(self.estimators, "get_params"):
            out.update({f"estimators__{k}": v for k, v in self.estimators.get_params(deep=True).items()})
        for name in ("router", "featurizer", "fallback"):
            est = getattr(self, name)
            if hasattr(est, "get_params"):
                out.update({f"{name}__{k}": v for k, v in est.get_params(deep=True).items()})
        return out

    def set_params(self, **params):
        per_task = {}
        for key in [k for k in params if k.startswith("estimators__") and isinstance(self.estimators, dict)]:
            task_key, _, sub = key[len("estimators__"):].partition("__")
            task = next((t for t in self.estimators if str(t) == task_key), None)
            if task is None:
                raise ValueError(f"Invalid parameter {key!r}: no task {task_key!r} in estimators "
                                 f"({list(self.estimators)}).")
            value = params.pop(key)
            if sub:
                per_task.setdefault(task, {})[sub] = value
            else:
                self.estimators = {**self.estimators, task: value}
        for task, sub in per_task.items():
            self.estimators[task].set_params(**sub)
        return super().set_params(**params) if params else self

    def fit(self, X, y=None, **fit_params):
        """Fit the router on the task column and each task's estimator on its own rows.

        ``fit_params`` (e.g. ``sample_weight``, ``groups``) are sliced by row
        and passed to each task's estimator.
        """
        df = as_frame(X)
        require_rows(df, "X")
        tasks = self._tasks(df)
        if y is not None:
            y = np.asarray(y)
            if len(y) != len(df):
                raise ValueError(f"X has {len(df)} rows but y has {len(y)}.")
        if int(self.min_task_rows) < 1:
            raise ValueError(f"min_task_rows must be >= 1, got {self.min_task_rows!r}.")
        classes = np.asarray(sorted(set(tasks), key=str), dtype=object)
        counts = {t: int((tasks == t).sum()) for t in classes}
        templates = self._templates(classes)
        short = [t for t in classes if counts[t] < int(self.min_task_rows)]
        fallback_tasks = sorted(set(short) | {t for t in classes if templates[t] is None}, key=str)
        if short and self.fallback is None:
            raise ValueError(
                f"Task(s) {short} have fewer than min_task_rows={self.min_task_rows} training rows "
                f"({ {t: counts[t] for t in short} }): add rows, lower min_task_rows, or give a fallback estimator."
            )
        self.featurizer_ = self._make_featurizer()
        feats = self._prompt_features(df, fit=True)
        if len(classes) > 1:
            router = self.router if self.router is not None else make_pipeline(
                StandardScaler(with_mean=not sparse.issparse(feats)), LogisticRegression(max_iter=2000))
            self.router_ = clone(router).fit(feats, tasks)
            learned = list(self.router_.classes_)
            self.classes_ = np.asarray(learned, dtype=object)
        else:
            self.router_ = None
            self.classes_ = classes
        def rows(mask):
            sub = {k: (np.asarray(v)[mask] if hasattr(v, "__len__") and len(v) == len(df) else v)
                   for k, v in fit_params.items()}
            return (df.loc[mask], *(() if y is None else (y[mask],))), sub

        self.fallback_ = None
        if fallback_tasks:
            self.fallback_ = clone(self.fallback)
            args, sub = rows(np.ones(len(df), dtype=bool))
            self.fallback_.fit(*args, **sub)
        self.estimators_ = {}
        for t in self.classes_:
            if t in fallback_tasks:
                self.estimators_[t] = self.fallback_
                continue
            args, sub = rows(tasks == t)
            self.estimators_[t] = clone(templates[t]).fit(*args, **sub)
        self.task_counts_ = counts
        self.fallback_tasks_ = fallback_tasks
        return self

    def _templates(self, classes):
        if isinstance(self.estimators, dict):
            extra = [k for k in self.estimators if k not in set(classes)]
            if extra:
                raise ValueError(f"estimators names task(s) {extra} that no training row has; "
                                 f"tasks are {list(classes)}.")
            missing = [t for t in classes if t not in self.estimators]
            if missing and self.fallback is None:
                raise ValueError(f"estimators has no entry for task(s) {missing}; "
                                 "add them or give a fallback estimator.")
            return {t: self.estimators.get(t) for t in classes}
        if self.estimators is None or not hasattr(self.estimators, "fit"):
            raise TypeError("estimators must be an estimator (cloned per task) or a dict {task: estimator}.")
        return {t: self.estimators for t in classes}

    # -- routing -----------------------------------------------------------------------------
    def predict_route_proba(self, X):
        """Router probabilities, shape ``(n_rows, n_tasks)``, columns in ``classes_`` order."""
        check_is_fitted(self, "estimators_")
        feats = self._prompt_features(X)
        if self.router_ is None:
            return np.ones((len(feats), 1))
        if not hasattr(self.router_, "predict_proba"):
            raise AttributeError(f"The router {type(self.router_).__name__} has no predict_proba.")
        return self.router_.predict_proba(feats)

    def predict_route(self, X):
        """The task each row is sent to (top-1 of the router)."""
        check_is_fitted(self, "estimators_")
        if self.router_ is None:
            return np.asarray([self.classes_[0]] * len(as_frame(X)), dtype=object)
        return np.asarray(self.router_.predict(self._prompt_features(X)), dtype=object)

    def _check_tasks(self, tasks, n, what="tasks"):
        tasks = np.asarray(tasks, dtype=object)
        if tasks.shape != (n,):
            raise ValueError(f"{what} has {tasks.size} entries for {n} rows.")
        known = set(self.classes_)
        unknown = sorted({t for t in tasks if t not in known}, key=str)
        if unknown:
            raise ValueError(f"Unknown task(s) {unknown}: never seen in fit. Known tasks: {list(self.classes_)}.")
        return tasks

    def routing_accuracy(self, X, tasks=None):
        """Share of rows the router sends to their true task (from ``tasks`` or the task column)."""
        df = as_frame(X)
        check_is_fitted(self, "estimators_")
        true = self._tasks(df) if tasks is None else tasks
        true = self._check_tasks(true, len(df))
        return float(np.mean(self.predict_route(df) == true))

    def dispatch(self, method, X, tasks=None):
        """Call ``method`` of each row's task estimator (routed, or by ``tasks``); results in row order."""
        check_is_fitted(self, "estimators_")
        df = as_frame(X)
        require_rows(df, "X")
        routes = self.predict_route(df) if tasks is None else self._check_tasks(tasks, len(df))
        parts, order = [], []
        for t in self.classes_:
            idx = np.flatnonzero(routes == t)
            if idx.size:
                parts.append(getattr(self.estimators_[t], method)(df.iloc[idx]))
                order.append(idx)
        order = np.concatenate(order)
        inverse = np.empty_like(order)
        inverse[order] = np.arange(order.size)
        if isinstance(parts[0], pd.DataFrame):
            out = pd.concat([p.reset_index(drop=True) for p in parts], ignore_index=True).iloc[inverse]
            return out.set_index(df.index)
        return np.concatenate([np.asarray(p) for p in parts])[inverse]

    def predict(self, X):
        """Predict each row with the estimator of the task the router picks."""
        return self.dispatch("predict", X)

    def predict_for_tasks(self, X, tasks):
        """Predict each row with the estimator of a given task (e.g. to evaluate the inner models
        under perfect routing). An unknown task is an error."""
        return self.dispatch("predict", X, tasks)

    def decision_function(self, X):
        """Each row's task estimator's ``decision_function`` (rewards; margins for pairs)."""
        return self.dispatch("decision_function", X)

    def predict_proba(self, X):
        """Each row's task estimator's ``predict_proba`` (P(chosen ≻ rejected) for pairs)."""
        return self.dispatch("predict_proba", X)

    def score(self, X, y=None, sample_weight=None):
        """Pairwise accuracy on preference pairs (inner reward models); otherwise R² of ``predict``."""
        df = as_frame(X)
        if infer_kind(df) == "pairs" and all(hasattr(e, "decision_function") for e in self.estimators_.values()):
            margin = self.decision_function(df)
            return pairwise_accuracy(margin, np.zeros_like(margin), y=y, sample_weight=sample_weight)
        from sklearn.metrics import r2_score

        return float(r2_score(y, self.predict(df), sample_weight=sample_weight))

