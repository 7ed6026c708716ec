"""DMoERM (Quan 2024): a double-layer mixture of reward-model experts.

* Outer, sparse layer: :class:`~rmkit.TaskRouter` classifies each prompt
  into a task and sends it to that task's inner model (top-1).
* Inner, dense layer (:class:`CapabilityMoE`), trained in three phases:

  1. (optional) a task-level LoRA fine-tune on the task's overall preferences;
  2. one LoRA expert per capability, trained on capability-level preference
     labels (from :class:`~rmkit.CapabilityLabeler`, from given label
     columns, or from objective ratings);
  3. :class:`CapabilityAggregator`: an MLP (Linear → PReLU → Linear) over the
     experts' concatenated last-token hidden states, trained with the
     Bradley–Terry loss on the overall preferences while the experts stay
     frozen. Phases 2 and 3 use disjoint shares of the prompts (the paper: 60/40 of the pairs).
"""

from __future__ import annotations

import hashlib
import numbers
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.base import BaseEstimator, clone
from sklearn.utils.validation import check_is_fitted
from torch import nn

from ._backbones import cache_dir, resolve_backbone, weights_fingerprint
from ._data import as_frame, infer_kind, read_pairs
from ._experts import CapabilityExperts
from ._featurizer import BackboneFeaturizer
from ._lora import LoRAExpertRegressor
from ._router import TaskRouter
from ._base import TextRewardModelMixin
from ._skorch import PairwiseNetEstimator, torch_seed
from .model_selection import PromptGroupShuffleSplit, prompt_groups

__all__ = ["AggregatorModule", "CapabilityAggregator", "CapabilityMoE", "DMoERM"]


class AggregatorModule(nn.Module):
    """``score = Linear(PReLU(Linear((h - mean) / scale)))`` for one response's features ``h``.

    Input ``(n, n_features)`` (output ``(n,)``) or pairs ``(n, 2, n_features)``
    (output ``(n, 2)``).
    """

    def __init__(self, n_features, hidden_size=256, mean=None, scale=None):
        super().__init__()
        m = int(n_features)
        self.n_features = m
        self.register_buffer("mean", torch.zeros(m) if mean is None else torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("scale", torch.ones(m) if scale is None else torch.as_tensor(scale, dtype=torch.float32))
        self.mlp = nn.Sequential(nn.Linear(m, int(hidden_size)), nn.PReLU(), nn.Linear(int(hidden_size), 1))

    def forward(self, x):
        return self.mlp((x - self.mean) / self.scale)[..., 0]


class CapabilityAggregator(PairwiseNetEstimator):
    """DMoERM's aggregator: an MLP over the capability experts' hidden states, trained Bradley–Terry.

    It reads the hidden-state blocks ``{side}:h:*`` of a feature frame (the
    output of :class:`~rmkit.CapabilityExperts`: the experts' last-token
    hidden states, concatenated) and gives one reward per response. Inputs
    are standardised with statistics learned in ``fit``; early stopping
    holds out a share of the prompts.

    Parameters
    ----------
    hidden_size : int, default=256
        Width of the hidden layer (Linear → PReLU → Linear).
    lr : float, default=1e-3
        AdamW learning rate.
    weight_decay : float, default=0.01
    max_epochs : int, default=50
    batch_size : int, default=64
    validation_fraction : float or None, default=0.1
        Share of the prompts held out for early stopping (best weights are
        restored); ``None`` trains on all pairs for ``max_epochs``.
    patience : int, default=5
    random_state : int, RandomState or None, default=None
    device : str, default="cpu"
    verbose : int, default=0

    Attributes
    ----------
    n_features_ : int
        Hidden-state features per response.
    mean_, scale_ : ndarray
    net_ : skorch.NeuralNet

    Notes
    -----
    The reward-model contract of :mod:`rmkit._base` (a reward per response;
    margin, preference and accuracy per pair). ``check_estimator`` does not
    apply: training needs a feature frame of preference pairs.

    Examples
    --------
    >>> import numpy as np
    >>> from rmkit.layout import make_frame
    >>> rng = np.random.RandomState(0)
    >>> hc, hr = rng.normal(size=(200, 4)), rng.normal(size=(200, 4))
    >>> better = (hc[:, 0] > hr[:, 0])[:, None]  # the first feature decides
    >>> pairs = make_frame({("chosen", "h", range(4)): np.where(better, hc, hr),
    ...                     ("rejected", "h", range(4)): np.where(better, hr, hc)})
    >>> agg = CapabilityAggregator(hidden_size=8, lr=0.02, max_epochs=15, validation_fraction=None, random_state=0)
    >>> bool(agg.fit(pairs).score(pairs) > 0.9)
    True
    >>> agg.predict(make_frame({("response", "h", range(4)): hc})).shape  # one reward per response
    (200,)
    """

    def __init__(self, *, hidden_size=256, lr=1e-3, weight_decay=0.01, max_epochs=50, batch_size=64,
                 validation_fraction=0.1, patience=5, random_state=None, device="cpu", verbose=0):
        self.hidden_size = hidden_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.max_epochs = max_epochs
        self.batch_size = batch_size
        self.validation_fraction = validation_fraction
        self.patience = patience
        self.random_state = random_state
        self.device = device
        self.verbose = verbose

    def _needs(self):
        return [("side", "h")]

    def _learn_input_stats(self, lay, X):
        both = np.vstack([lay.block(X, s, "h") for s in lay.sides])
        self.feature_names_ = np.asarray(lay.names(lay.sides[0], "h"), dtype=object)
        self.n_features_ = both.shape[1]
        self.mean_ = both.mean(axis=0)
        scale = both.std(axis=0)
        self.scale_ = np.where(scale > 1e-6, scale, 1.0).astype(np.float32)

    def _inputs(self, lay, X, side):
        if hasattr(self, "feature_names_") and lay.names(side, "h") != list(self.feature_names_):
            raise ValueError(f"CapabilityAggregator was fitted on {len(self.feature_names_)} hidden-state features "
                             f"per response; X has {len(lay.names(side, 'h'))} (other experts?).")
        return lay.block(X, side, "h")

    def _module(self, width):
        return AggregatorModule(self.n_features_, hidden_size=self.hidden_size, mean=self.mean_, scale=self.scale_)


# ---------------------------------------------------------------------------------------------
# Phase 1 helper: fold a task-level LoRA adapter into a copy of the backbone
# ---------------------------------------------------------------------------------------------


def merge_task_adapter(task_model, root=None):
    """Write the backbone with ``task_model``'s LoRA adapter merged in; return its folder.

    The capability experts of phase 2 are then trained on this task-tuned
    backbone. The folder is content-addressed (base weights + adapter), so a
    refit with the same adapter reuses it. The shared in-process backbone is
    never modified: the merge happens on a fresh copy of the weights.

    Parameters
    ----------
    task_model : LoRAExpertRegressor
        Fitted.
    root : str or Path, optional
        Parent folder; defaults to ``<rmkit cache>/dmoerm``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_is_fitted(task_model, "objective_")
    deltas = task_model.weight_deltas()
    if not deltas:
        raise RuntimeError("The task model has no LoRA layers to merge.")
    h = hashlib.sha256(weights_fingerprint(task_model.backbone).encode())
    for name in sorted(deltas):
        h.update(name.encode())
        h.update(deltas[name].numpy().tobytes())
    root = Path(root) if root is not None else cache_dir() / "dmoerm"
    target = root / f"task-merged-{h.hexdigest()[:16]}"
    if (target / "config.json").is_file():
        return str(target)
    src = str(resolve_backbone(task_model.backbone))
    lm = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    base = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model
    with torch.no_grad():
        for name, delta in deltas.items():
            base.get_submodule(name).weight += delta
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=root))
    try:
        lm.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


# ---------------------------------------------------------------------------------------------
# The inner, dense layer
# ---------------------------------------------------------------------------------------------


def _capability_list(capabilities):
    if capabilities is None or isinstance(capabilities, (str, bytes)):
        raise TypeError("capabilities must be a list of names or a dict {name: one-line description}.")
    caps = list(capabilities.items()) if isinstance(capabilities, dict) else [(c, None) for c in capabilities]
    if not caps:
        raise ValueError("capabilities is empty: give at least one capability.")
    names = [c[0] for c in caps]
    if not all(isinstance(n, str) and n.strip() for n in names):
        raise ValueError(f"Capability names must be non-empty strings; got {names}.")
    if len(set(names)) != len(names):
        raise ValueError(f"Capability names must be unique; got {names}.")
    return caps


class CapabilityMoE(TextRewardModelMixin, BaseEstimator):
    """One task's dense mixture of capability experts (DMoERM's inner layer).

    Trained in three phases on the preference pairs of one task:

    1. optional (``task_finetune``): a LoRA reward model on the overall
       preferences, merged into a copy of the backbone
       (:func:`merge_task_adapter`) that the experts then build on;
    2. :class:`~rmkit.CapabilityExperts`: one LoRA expert per capability,
       trained with the Bradley–Terry loss on that capability's labels;
    3. :class:`CapabilityAggregator` on the experts' concatenated last-token
       hidden states, trained on the overall preferences with the experts
       frozen.

    Phases 1–2 use a seeded ``expert_fraction`` of the *prompts* and phase 3
    the rest (the paper: 60/40 of the pairs), so the aggregator learns from
    pairs whose prompts the experts never saw.

    Capability labels, per capability ``c``, are read from (first match):

    * a column ``c`` of ``X``: ``+1`` (chosen better on ``c``), ``-1``
      (rejected better), ``NaN`` (no label, e.g. an inconsistent judge);
    * rating columns ``c_chosen`` and ``c_rejected`` (objective ratings of the
      two responses): the sign of their difference, ties as ``NaN``;
    * the ``labeler`` (a :class:`~rmkit.CapabilityLabeler`), run on the
      phase 1–2 pairs only; it must know ``c``.

    Parameters
    ----------
    capabilities : list of str or dict
        Capability names (or ``{name: description}``, the descriptions used
        by a labeler built from them).
    experts : CapabilityExperts, optional
        Template for phase 2 (backbone, LoRA and training settings; once
        given, reachable as ``experts__rank`` etc.). Default:
        ``CapabilityExperts(random_state=random_state)`` on the embedded
        backbone.
    aggregator : CapabilityAggregator, optional
        Template for phase 3. Default:
        ``CapabilityAggregator(random_state=random_state)``.
    labeler : CapabilityLabeler, optional
        Labels capabilities that have no label columns.
    task_finetune : bool or LoRAExpertRegressor, default=False
        Phase 1. ``True`` uses a :class:`~rmkit.LoRAExpertRegressor` with the
        experts' backbone and LoRA/training settings; an estimator is used as
        given (its backbone must be the experts').
    expert_fraction : float, default=0.6
        Share of the pairs for phases 1–2; the rest trains the aggregator.
    drop_unlabelled : bool, default=False
        A capability without any label in the expert split is an error;
        with ``True`` it is left out of this task (with a warning), as when
        tasks have different capability sets.
    random_state : int or None, default=None
        Seeds the split and the default templates.
    verbose : int, default=1

    Attributes
    ----------
    capabilities_ : list of str
        The capabilities with an expert (``dropped_capabilities_``: those
        left out for lack of labels).
    experts_ : CapabilityExperts
    aggregator_ : CapabilityAggregator
    task_model_ : LoRAExpertRegressor or None
        Phase 1's model; ``task_backbone_`` is the merged folder.
    n_labels_ : dict
        Labelled pairs per capability in the expert split.
    labeler_report_ : DataFrame or None
        The labeler's agreement report (see
        :attr:`CapabilityLabeler.last_report_`) when it labelled anything.
    expert_rows_, aggregator_rows_ : ndarray
        Positions of the pairs used by each phase.

    Notes
    -----
    ``check_estimator`` does not apply: the input is text with label columns.

    Examples
    --------
    >>> import pandas as pd
    >>> from rmkit.testing import tiny_backbone
    >>> X = pd.DataFrame({"prompt": ["2+2?", "Hi", "3+3?", "Hey", "5+5?", "Yo"],
    ...                   "chosen": ["4", "Hello!", "6", "Hi there!", "10", "Hello."],
    ...                   "rejected": ["5", "Go away.", "7", "Leave.", "11", "No."],
    ...                   "correct": [1, None, 1, None, 1, None], "polite": [None, 1, None, 1, None, 1]})
    >>> experts = CapabilityExperts(tiny_backbone(), rank=2, max_epochs=1, random_state=0, verbose=0)
    >>> moe = CapabilityMoE(["correct", "polite"], experts=experts, aggregator=CapabilityAggregator(max_epochs=2),
    ...                     expert_fraction=0.67, random_state=0)
    >>> moe.set_params(experts__rank=4).fit(X).predict(X).shape
    (6,)
    >>> list(moe.explain(X[["prompt", "chosen"]].rename(columns={"chosen": "response"})).columns)
    ['reward', 'correct', 'polite']
    """

    def __init__(self, capabilities, *, experts=None, aggregator=None, labeler=None, task_finetune=False,
                 expert_fraction=0.6, drop_unlabelled=False, random_state=None, verbose=1):
        self.capabilities = capabilities
        self.experts = experts
        self.aggregator = aggregator
        self.labeler = labeler
        self.task_finetune = task_finetune
        self.expert_fraction = expert_fraction
        self.drop_unlabelled = drop_unlabelled
        self.random_state = random_state
        self.verbose = verbose

    def _experts_template(self):
        if self.experts is None:
            return CapabilityExperts(random_state=self.random_state, verbose=self.verbose)
        return self.experts

    def _aggregator_template(self):
        if self.aggregator is None:
            return CapabilityAggregator(random_state=self.random_state)
        return self.aggregator

    # -- labels --------------------------------------------------------------------------------
    def _labels(self, df, expert_rows):
        """Labels of the expert split, one column per capability (+1 / -1 / NaN)."""
        caps = _capability_list(self.capabilities)
        sub = df.iloc[expert_rows]
        out, missing = {}, []
        self.labeler_report_ = None
        for name, _ in caps:
            if name in df.columns:
                out[name] = pd.to_numeric(sub[name], errors="coerce").to_numpy(float)
                if sub[name].notna().sum() != np.isfinite(out[name]).sum():
                    raise ValueError(f"Label column {name!r} holds non-numeric values; use +1, -1 or NaN.")
            elif f"{name}_chosen" in df.columns and f"{name}_rejected" in df.columns:
                diff = (pd.to_numeric(sub[f"{name}_chosen"], errors="coerce")
                        - pd.to_numeric(sub[f"{name}_rejected"], errors="coerce")).to_numpy(float)
                out[name] = np.where(diff > 0, 1.0, np.where(diff < 0, -1.0, np.nan))
            else:
                missing.append(name)
        if missing:
            if self.labeler is None:
                raise ValueError(
                    f"No labels for capability(ies) {missing}: give a column per capability (+1 chosen better, "
                    "-1 rejected better, NaN unknown), rating columns '<name>_chosen'/'<name>_rejected', "
                    "or a labeler."
                )
            labeler = clone(self.labeler)
            known = dict(labeler.fit().capabilities_)
            unknown = [m for m in missing if m not in known]
            if unknown:
                raise ValueError(f"The labeler does not judge capability(ies) {unknown}; it knows {list(known)}.")
            labeler.set_params(capabilities={m: known[m] for m in missing}).fit()  # judge only what is missing
            judged = labeler.transform(sub[[c for c in sub.columns if c in ("prompt", "messages", "chosen",
                                                                            "rejected")]])
            self.labeler_report_ = labeler.last_report_
            for m in missing:
                out[m] = judged[m].to_numpy(float)
        labels = pd.DataFrame({name: out[name] for name, _ in caps})
        empty = []
        for name in labels.columns:
            col = labels[name].to_numpy()
            bad = col[~np.isnan(col) & (col != 1) & (col != -1)]
            if bad.size:
                raise ValueError(f"Labels of {name!r} must be +1, -1 or NaN; found {float(bad[0])!r}.")
            if np.isnan(col).all():
                if not self.drop_unlabelled:
                    raise ValueError(f"Capability {name!r} has no label among the {len(col)} pairs of the expert "
                                     f"split (expert_fraction={self.expert_fraction}): its expert cannot be trained "
                                     "(drop_unlabelled=True leaves it out of this task).")
                empty.append(name)
        if len(empty) == labels.shape[1]:
            raise ValueError(f"No capability has a label among the {len(labels)} pairs of the expert split.")
        if empty:
            warnings.warn(f"Capabilities {empty} have no label in this task's expert split: left out.", stacklevel=3)
        self.dropped_capabilities_ = empty
        return labels.drop(columns=empty)

    # -- fit -------------------------------------------------------------------------------------
    def _split(self, df):
        """The phase split by prompt: no prompt of the aggregator's pairs was seen by the experts."""
        f = self.expert_fraction
        if not (isinstance(f, numbers.Real) and 0 < f < 1):
            raise ValueError(f"expert_fraction must lie in (0, 1), got {f!r}.")
        groups = prompt_groups(df)
        n_groups = len(np.unique(groups))
        if n_groups < 2 or int(round(f * n_groups)) < 1 or n_groups - int(round(f * n_groups)) < 1:
            raise ValueError(f"{len(df)} pairs from {n_groups} prompt(s) are too few to split {f:.0%}/{1 - f:.0%} "
                             "by prompt between the experts and the aggregator.")
        split = PromptGroupShuffleSplit(test_size=1 - f, random_state=torch_seed(self.random_state))
        expert_rows, agg_rows = next(split.split(df, groups=groups))
        if len(agg_rows) < 2:
            raise ValueError(f"The aggregator's share of {len(df)} pairs holds {len(agg_rows)} pair(s); it needs 2.")
        return np.sort(expert_rows), np.sort(agg_rows)

    def _task_model(self):
        if self.task_finetune is False or self.task_finetune is None:
            return None
        if self.task_finetune is True:
            keys = ("backbone", "rank", "alpha", "dropout", "target_modules", "layers", "shared_trunk", "lr",
                    "weight_decay", "max_epochs", "batch_size", "max_length", "random_state", "device", "dtype",
                    "verbose")
            params = self._experts_template().get_params(deep=False)
            return LoRAExpertRegressor(**{k: params[k] for k in keys})
        if not hasattr(self.task_finetune, "fit"):
            raise TypeError("task_finetune must be False, True or a LoRAExpertRegressor.")
        return clone(self.task_finetune)

    def fit(self, X, y=None):
        """Run the three phases on the pairs of ``X`` (with capability labels); ``y`` is ignored."""
        df = as_frame(X)
        if len(df) and infer_kind(df) != "pairs":
            raise ValueError("CapabilityMoE trains on preference pairs: X needs 'chosen' and 'rejected' columns.")
        read_pairs(df)
        _capability_list(self.capabilities)  # fails early on an empty or malformed list
        expert_rows, agg_rows = self._split(df)
        labels = self._labels(df, expert_rows)
        text_cols = [c for c in ("prompt", "messages", "chosen", "rejected") if c in df.columns]
        exp_pairs = df.iloc[expert_rows][text_cols].reset_index(drop=True)
        agg_pairs = df.iloc[agg_rows][text_cols].reset_index(drop=True)
        # Phase 1: task-level fine-tune on the overall preferences, folded into the experts' backbone.
        self.task_model_ = self._task_model()
        experts = clone(self._experts_template())
        self.task_backbone_ = None
        if self.task_model_ is not None:
            if self.task_model_.backbone != experts.backbone:
                raise ValueError(f"task_finetune's backbone {self.task_model_.backbone!r} differs from the experts' "
                                 f"{experts.backbone!r}.")
            self.task_model_.fit(exp_pairs)
            self.task_backbone_ = merge_task_adapter(self.task_model_)
            experts.set_params(backbone=self.task_backbone_)
        # Phase 2: one LoRA expert per capability on its labels.
        self.experts_ = experts.set_params(experts=list(labels.columns)).fit(exp_pairs, labels)
        # Phase 3: the aggregator on frozen expert hidden states, on pairs the experts never saw.
        self.aggregator_ = clone(self._aggregator_template()).fit(self.experts_.transform(agg_pairs))
        self.capabilities_ = list(labels.columns)
        self.n_labels_ = dict(self.experts_.n_labels_)
        self.expert_rows_, self.aggregator_rows_ = expert_rows, agg_rows
        return self

    # -- inference -------------------------------------------------------------------------------
    def _scores(self, X):
        check_is_fitted(self, "aggregator_")
        return self.aggregator_._scores(self.experts_.transform(X))

    def explain(self, X):
        """Per pointwise row: the final ``reward`` and each capability expert's own reward."""
        check_is_fitted(self, "aggregator_")
        df = as_frame(X)
        if infer_kind(df) == "pairs":
            raise ValueError("explain scores single responses: pass pointwise rows (prompt + response).")
        rewards = self.experts_.predict(df)
        out = pd.DataFrame(rewards, columns=self.experts_.expert_names_, index=df.index)
        out.insert(0, "reward", self.predict(df))
        return out


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
    >>> from rmkit import CapabilityExperts
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
        _capability_list(self.capabilities)
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
