"""DMoERM: the outer sparse MoE (a task router) over one CapabilityMoE per task."""

from __future__ import annotations

from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from rmkit.backbones._featurizer import BackboneFeaturizer
from rmkit.base import TextRewardModelMixin
from rmkit.utils._validation import as_frame, infer_kind

from ._capability_moe import CapabilityMoE, capability_list
from ._router import TaskRouter

__all__ = ["DMoERM"]


# ---------------------------------------------------------------------------------------------
# The double layer
# ---------------------------------------------------------------------------------------------


class DMoERM(TextRewardModelMixin, BaseEstimator):
    """Double-layer mixture-of-experts reward model (Quan 2024).

    The outer, sparse layer is a :class:`~rmkit.TaskRouter`: a classifier on
    prompt features picks each prompt's task (top-1). The inner, dense layer
    is one :class:`CapabilityMoE` per task, fitted on that task's pairs only:
    LoRA capability experts and an aggregator MLP over their hidden states.

    Parameters
    ----------
    capabilities : list of str or dict
        The capabilities of every task (see :class:`CapabilityMoE` for where
        their labels come from). For task-specific capability sets compose
        ``TaskRouter({task: CapabilityMoE(...)})`` directly.
    experts, aggregator, labeler, task_finetune, expert_fraction, drop_unlabelled
        Passed to each task's :class:`CapabilityMoE`.
    router : classifier, optional
        Default: standardised logistic regression (see :class:`TaskRouter`).
    featurizer : transformer, optional
        Prompt features for the router. Default: a
        :class:`~rmkit.BackboneFeaturizer` on the experts' backbone.
    task_column : str, default="task"
    min_task_rows : int, default=10
        Tasks with fewer training pairs are an error unless ``fallback``.
    fallback : estimator, optional
        Serves tasks with too few pairs (fitted on all pairs).
    random_state : int or None, default=None
    verbose : int, default=1

    Attributes
    ----------
    router_model_ : TaskRouter
        The fitted two-layer model.
    classes_ : ndarray
        The tasks.
    estimators_ : dict
        ``{task: fitted CapabilityMoE}``.

    Notes
    -----
    ``check_estimator`` does not apply: the input is text with a task column
    and capability labels.

    Examples
    --------
    >>> import pandas as pd
    >>> from sklearn.feature_extraction.text import TfidfVectorizer
    >>> from rmkit import CapabilityAggregator, CapabilityExperts
    >>> from rmkit.testing import tiny_backbone
    >>> from rmkit.datasets import make_preference_pairs
    >>> X = make_preference_pairs(30, random_state=0).rename(columns={"category": "task"})
    >>> X["brevity"] = [1 if len(c) < len(r) else -1 for c, r in zip(X.chosen, X.rejected)]
    >>> model = DMoERM(["brevity"], featurizer=TfidfVectorizer(), random_state=0, verbose=0,
    ...                experts=CapabilityExperts(tiny_backbone(), rank=2, max_epochs=1, verbose=0),
    ...                aggregator=CapabilityAggregator(max_epochs=2)).fit(X)
    >>> model.predict(X).shape, model.routing_accuracy(X)
    ((30,), 1.0)
    >>> rows = X[["prompt", "chosen"]].rename(columns={"chosen": "response"}).head(2)
    >>> list(model.explain(rows).columns)
    ['task', 'task_probability', 'reward', 'brevity']
    """

    def __init__(self, capabilities, *, experts=None, aggregator=None, labeler=None, task_finetune=False,
                 expert_fraction=0.6, drop_unlabelled=False, router=None, featurizer=None, task_column="task",
                 min_task_rows=10, fallback=None, random_state=None, verbose=1):
        self.capabilities = capabilities
        self.experts = experts
        self.aggregator = aggregator
        self.labeler = labeler
        self.task_finetune = task_finetune
        self.expert_fraction = expert_fraction
        self.drop_unlabelled = drop_unlabelled
        self.router = router
        self.featurizer = featurizer
        self.task_column = task_column
        self.min_task_rows = min_task_rows
        self.fallback = fallback
        self.random_state = random_state
        self.verbose = verbose

    def fit(self, X, y=None):
        """Fit the router on the task column and one :class:`CapabilityMoE` per task on its pairs."""
        capability_list(self.capabilities)
        inner = CapabilityMoE(self.capabilities, experts=self.experts, aggregator=self.aggregator,
                              labeler=self.labeler, task_finetune=self.task_finetune,
                              expert_fraction=self.expert_fraction, drop_unlabelled=self.drop_unlabelled,
                              random_state=self.random_state,
                              verbose=self.verbose)
        featurizer = self.featurizer
        if featurizer is None:
            backbone = inner._experts_template().backbone
            featurizer = BackboneFeaturizer(backbone, verbose=self.verbose)
        self.router_model_ = TaskRouter(inner, router=self.router, featurizer=featurizer,
                                        task_column=self.task_column, min_task_rows=self.min_task_rows,
                                        fallback=self.fallback, verbose=self.verbose).fit(X)
        return self

    @property
    def classes_(self):
        check_is_fitted(self, "router_model_")
        return self.router_model_.classes_

    @property
    def estimators_(self):
        check_is_fitted(self, "router_model_")
        return self.router_model_.estimators_

    def _scores(self, X, tasks=None):
        check_is_fitted(self, "router_model_")
        df = as_frame(X)
        kind = infer_kind(df)
        method = "reward_pairs" if kind == "pairs" else "decision_function"
        return kind, self.router_model_.dispatch(method, df, tasks)

    def predict_for_tasks(self, X, tasks):
        """Like ``predict``, with each row's task given instead of routed (labels seen in fit)."""
        kind, s = self._scores(X, tasks)
        return s if kind == "pointwise" else (s[:, 0] > s[:, 1]).astype(int)

    def predict_route(self, X):
        """The task each row is routed to."""
        check_is_fitted(self, "router_model_")
        return self.router_model_.predict_route(X)

    def predict_route_proba(self, X):
        """Router probabilities ``(n, n_tasks)`` in ``classes_`` order."""
        check_is_fitted(self, "router_model_")
        return self.router_model_.predict_route_proba(X)

    def routing_accuracy(self, X, tasks=None):
        """Share of rows routed to their true task (``tasks`` or the task column)."""
        check_is_fitted(self, "router_model_")
        return self.router_model_.routing_accuracy(X, tasks=tasks)

    def explain(self, X):
        """Per pointwise row: routed ``task``, its ``task_probability``, the ``reward`` and each
        capability expert's own reward (NaN for capabilities the routed task's model lacks)."""
        check_is_fitted(self, "router_model_")
        df = as_frame(X)
        proba = self.router_model_.predict_route_proba(df)
        routes = self.router_model_.classes_[proba.argmax(axis=1)]
        parts = self.router_model_.dispatch("explain", df, tasks=routes)
        parts.insert(0, "task_probability", proba.max(axis=1))
        parts.insert(0, "task", routes)
        return parts
