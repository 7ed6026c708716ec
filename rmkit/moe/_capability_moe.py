"""DMoERM's inner dense MoE: capability experts plus aggregator for one task."""

from __future__ import annotations

import numbers
import warnings

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, clone
from sklearn.utils.validation import check_is_fitted

from rmkit.base import TextRewardModelMixin
from rmkit.lora._experts import CapabilityExperts
from rmkit.lora._regressor import LoRAExpertRegressor
from rmkit.model_selection import PromptGroupShuffleSplit, prompt_groups
from rmkit.utils._torch import torch_seed
from rmkit.utils._validation import as_frame, infer_kind, read_pairs

from ._aggregator import CapabilityAggregator
from ._task_adapter import merge_task_adapter

# ---------------------------------------------------------------------------------------------
# The inner, dense layer
# ---------------------------------------------------------------------------------------------


def capability_list(capabilities):
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
        Capability names, or ``{name: description}``: the descriptions are
        what the ``labeler``'s judge is asked about (they replace the
        labeler's own for these capabilities).
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
        caps = capability_list(self.capabilities)
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
            described = {name: text for name, text in caps if text}  # this task's descriptions come first
            unknown = [m for m in missing if m not in known and m not in described]
            if unknown:
                raise ValueError(f"The labeler does not judge capability(ies) {unknown}; it knows {list(known)}. "
                                 "Describe them in capabilities={name: description} to have them judged.")
            # judge only what is missing, with this task's own descriptions where it has them
            labeler.set_params(capabilities={m: described.get(m) or known[m] for m in missing}).fit()
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
        capability_list(self.capabilities)  # fails early on an empty or malformed list
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
        # (each expert's value head starts from the task model's, as in DMoERM's reference code)
        init_head = self.task_model_.value_head() if self.task_model_ is not None else None
        self.experts_ = experts.set_params(experts=list(labels.columns)).fit(exp_pairs, labels, init_head=init_head)
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
