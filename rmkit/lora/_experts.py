"""CapabilityExperts: K named LoRA reward experts on one backbone (DMoERM's inner layer)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.special import expit
from sklearn.base import TransformerMixin
from sklearn.utils.validation import check_is_fitted
from torch import nn

from rmkit.backbones._loading import EMBEDDED_BACKBONE
from rmkit.layout import column, make_frame, sides_of
from rmkit.model_selection._groups import group_ids_of_conversations
from rmkit.utils._torch import BradleyTerryLoss, torch_seed
from rmkit.utils._validation import read_pairs, read_pointwise, read_texts

from ._base import LoRABase

__all__ = ["CapabilityExperts"]


def _read_labels(y, n, experts):
    """Return ``(names, labels)`` with labels a float array ``(n, K)``."""
    if y is None:
        raise ValueError("CapabilityExperts.fit needs y: one label column per capability (NaN = no label).")
    if isinstance(y, dict):
        y = pd.DataFrame(y)
    if isinstance(y, pd.Series):
        y = y.to_frame()
    if isinstance(y, pd.DataFrame):
        if experts is not None:
            missing = [e for e in experts if e not in y.columns]
            if missing:
                raise ValueError(f"y is missing the label column(s) {missing}; it has {list(y.columns)}.")
            y = y[list(experts)]
        names = [str(c) for c in y.columns]
        try:
            values = y.to_numpy(dtype=float)
        except (TypeError, ValueError) as err:
            raise ValueError(f"y must hold numbers (NaN = no label): {err}") from None
    else:
        values = np.asarray(y, dtype=float)
        if values.ndim == 1:
            values = values[:, None]
        if values.ndim != 2:
            raise ValueError(f"y must be 2-dimensional (rows x capabilities), got shape {values.shape}.")
        names = list(experts) if experts is not None else [f"expert_{k}" for k in range(values.shape[1])]
        if len(names) != values.shape[1]:
            raise ValueError(f"experts names {len(names)} capabilities but y has {values.shape[1]} columns.")
    if len(values) != n:
        raise ValueError(f"y has {len(values)} rows for {n} rows of X.")
    if not names:
        raise ValueError("y has no label columns.")
    if len(set(names)) != len(names):
        raise ValueError(f"Capability names must be unique, got {names}.")
    if np.isinf(values).any():
        raise ValueError("y holds infinite values; use NaN for a missing label.")
    return names, values


class CapabilityExperts(TransformerMixin, LoRABase):
    """K named LoRA reward experts sharing one backbone in memory.

    Every expert is a peft LoRA adapter plus a value head on the same base
    model (peft's multi-adapter API: one set of base weights, K small
    adapters). With LoRA on the top layers only (the default: the top
    quarter), the hidden states entering the first adapted layer are
    computed once per text and shared by all experts, in training and in
    scoring (``shared_trunk``), so scoring K experts costs one trunk pass plus
    K passes through the adapted top.

    Labels (``y`` in ``fit``): one column per capability, in a DataFrame (the
    column names name the experts), a dict of arrays, or a 2-D array named by
    ``experts``.

    * Preference pairs: ``+1`` = chosen is better on that capability, ``-1`` =
      rejected is better, ``NaN`` = no label (e.g. an LLM judge that was
      inconsistent when asked twice with positions swapped). Each expert is
      trained with the Bradley–Terry loss on its labelled rows only.
    * Pointwise rows: a rating per capability, ``NaN`` = missing; each
      expert fits its own ratings (standardised) by squared error.

    Parameters
    ----------
    backbone : str, default="smollm2-135m-instruct"
    experts : list of str or None, default=None
        Capabilities to train, in output order; ``None`` takes every column of
        ``y``.
    rank, alpha, dropout, target_modules : see :class:`LoRAExpertRegressor`
        Shared by all experts.
    layers : None, int, float or list of int, default=0.25
        Decoder layers that get LoRA (default: the top quarter).
    shared_trunk : {"auto", True, False}, default="auto"
    lr, weight_decay, max_epochs, batch_size, accumulation_steps, validation_fraction, patience
        Training settings, the same for every expert (see
        :class:`LoRAExpertRegressor`).
    max_length, random_state, device, dtype, verbose
        As in :class:`LoRAExpertRegressor`; expert ``k`` is seeded with
        ``random_state + k``.
    accelerate : bool or dict, default=None
        Train each adapter under Hugging Face ``accelerate`` (skorch's
        ``AccelerateMixin``): ``True`` for ``Accelerator()`` (the processes
        and mixed precision of ``accelerate launch``), or a dict of
        ``Accelerator`` arguments such as ``{"mixed_precision": "bf16"}``.
        ``accumulation_steps`` becomes the accelerator's gradient
        accumulation. Needs the ``accelerate`` extra.
    output : {"hidden", "rewards"}, default="hidden"
        What ``transform`` emits: the experts' last-token hidden states (the
        input of DMoERM's aggregator) or one reward per capability (an
        objective provider: a gate or an :class:`~rmkit.ObjectiveUnion` can
        weigh the capabilities beside linear probes).

    Attributes
    ----------
    expert_names_ : list of str
        Output order of ``predict`` columns and ``transform`` blocks.
    n_experts_ : int
    hidden_size_ : int
    objective_ : {"bradley_terry", "mse"}
    n_labels_ : dict
        Labelled rows used by each expert.
    histories_ : dict of skorch History
        Per-expert training logs.
    lora_layers_, target_modules_, shared_trunk_, backbone_fingerprint_

    Notes
    -----
    ``predict`` returns ``(n, K)``: rewards for pointwise rows,
    P(chosen ≻ rejected) per expert for pairs. ``transform`` returns a
    feature frame (:mod:`rmkit.layout`) that keeps the pair structure: with
    ``output="hidden"`` the blocks ``{side}:h:{expert}.{i}`` (``K * hidden``
    wide per side), with ``output="rewards"`` the objectives
    ``{side}:r:{expert}``; both carry ``prompt:m:group``.

    Saving pickles only the adapters and heads (on CPU) plus the backbone's
    name and fingerprint, like :class:`LoRAExpertRegressor`.

    Examples
    --------
    >>> import numpy as np
    >>> from rmkit import CapabilityExperts
    >>> from rmkit.testing import tiny_backbone
    >>> pairs = [{"prompt": "2+2?", "chosen": "4", "rejected": "5"},
    ...          {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}]
    >>> labels = {"correctness": [1, np.nan], "politeness": [np.nan, 1]}
    >>> experts = CapabilityExperts(tiny_backbone(), rank=2, max_epochs=1, random_state=0, verbose=0)
    >>> experts.fit(pairs, labels).expert_names_
    ['correctness', 'politeness']
    >>> experts.predict(pairs).shape, experts.transform(pairs).shape
    ((2, 2), (2, 257))
    >>> list(experts.set_params(output="rewards").transform(pairs).columns)
    ['chosen:r:correctness', 'chosen:r:politeness', 'rejected:r:correctness', 'rejected:r:politeness', 'prompt:m:group']
    """

    def __init__(self, backbone=EMBEDDED_BACKBONE, *, experts=None, rank=8, alpha=16, dropout=0.05,
                 target_modules=None, layers=0.25, shared_trunk="auto", lr=1e-4, weight_decay=0.0, max_epochs=3,
                 batch_size=8, accumulation_steps=1, validation_fraction=0.0, patience=3, max_length=1024,
                 random_state=None, device="auto", dtype="float32", verbose=1, output="hidden",
                 accelerate=None):
        self.accelerate = accelerate
        self.backbone = backbone
        self.experts = experts
        self.output = output
        self.rank = rank
        self.alpha = alpha
        self.dropout = dropout
        self.target_modules = target_modules
        self.layers = layers
        self.shared_trunk = shared_trunk
        self.lr = lr
        self.weight_decay = weight_decay
        self.max_epochs = max_epochs
        self.batch_size = batch_size
        self.accumulation_steps = accumulation_steps
        self.validation_fraction = validation_fraction
        self.patience = patience
        self.max_length = max_length
        self.random_state = random_state
        self.device = device
        self.dtype = dtype
        self.verbose = verbose

    def _start_heads_from(self, module, init_head):
        import torch

        try:
            weight = np.asarray(init_head["weight"], dtype=np.float32).reshape(-1)
            bias = float(init_head["bias"])
        except (TypeError, KeyError, ValueError) as exc:
            raise ValueError("init_head must be {'weight': array of shape (hidden_size,), 'bias': float}.") from exc
        if weight.shape != (self.hidden_size_,) or not np.isfinite(weight).all() or not np.isfinite(bias):
            raise ValueError(f"init_head['weight'] must hold {self.hidden_size_} finite values (the backbone's "
                             f"hidden size), got shape {weight.shape}.")
        with torch.no_grad():
            for head in module.heads.values():
                head.weight.copy_(torch.from_numpy(weight).reshape(head.weight.shape))
                head.bias.fill_(bias)

    def _adapter_names(self):
        return [f"expert{k}" for k in range(self.n_experts_)]

    def fit(self, X, y=None, *, init_head=None):
        """Train one LoRA expert per label column of ``y`` (see the class docstring for the format).

        Parameters
        ----------
        X : DataFrame, list of dicts or dict of lists
            Preference pairs or pointwise rows.
        y : DataFrame, dict of arrays or array of shape (n, K)
            Pairs: +1 / -1 / NaN per capability; pointwise: ratings / NaN.
        init_head : dict, optional
            ``{"weight": (hidden,), "bias": float}``: the value head every
            expert starts from (default: a random one). DMoERM passes its
            phase-1 task model's :meth:`LoRAExpertRegressor.value_head`.

        Returns
        -------
        self
        """
        self._check_params()
        if self.experts is not None and (isinstance(self.experts, str) or len(self.experts) == 0):
            raise ValueError(f"experts must be a non-empty list of names, got {self.experts!r}.")
        kind = read_texts(X)[0]
        data = read_pairs(X) if kind == "pairs" else read_pointwise(X)
        names, labels = _read_labels(y, len(data), self.experts)
        n = len(data)
        for k, name in enumerate(names):
            col = labels[:, k]
            known = col[~np.isnan(col)]
            if kind == "pairs":
                bad = known[(known != 1) & (known != -1)]
                if bad.size:
                    raise ValueError(f"Pair labels of {name!r} must be +1 (chosen better), -1 (rejected better) "
                                     f"or NaN (no label); found {bad[0]!r}.")
                if known.size == 0:
                    raise ValueError(f"Capability {name!r} has no labelled pair: every value is NaN.")
            elif known.size < 2 or np.std(known) == 0:
                raise ValueError(f"Ratings of {name!r} need at least two distinct non-NaN values.")
        self._runtime = None
        self._saved_state = None
        self.expert_names_ = names
        self.n_experts_ = len(names)
        self._resolve_architecture()
        self.objective_ = "bradley_terry" if kind == "pairs" else "mse"
        adapters = self._adapter_names()
        module = self._new_module(adapters)
        if init_head is not None:
            self._start_heads_from(module, init_head)
        self._runtime = module
        responses = data.chosen + data.rejected if kind == "pairs" else data.responses
        inputs = self._training_inputs(module, self._encode(data.conversations, responses))  # trunk: once per text
        self.histories_, self.n_labels_ = {}, {}
        self.y_mean_, self.y_scale_ = np.zeros(len(names)), np.ones(len(names))
        base_seed = torch_seed(self.random_state)
        groups = group_ids_of_conversations(data.conversations)
        for k, (name, adapter) in enumerate(zip(names, adapters)):
            col = labels[:, k]
            rows = np.flatnonzero(~np.isnan(col))
            seed = None if base_seed is None else int(base_seed) + k
            if kind == "pairs":
                items = [(inputs[i], inputs[n + i]) if col[i] > 0 else (inputs[n + i], inputs[i]) for i in rows]
                history = self._train_adapter(module, adapter, items, np.zeros(len(rows)), BradleyTerryLoss,
                                              {"use_margin": False}, seed, groups[rows])
            else:
                self.y_mean_[k], self.y_scale_[k] = np.mean(col[rows]), np.std(col[rows])
                target = (col[rows] - self.y_mean_[k]) / self.y_scale_[k]
                history = self._train_adapter(module, adapter, [inputs[i] for i in rows], target, nn.MSELoss, {},
                                              seed, groups[rows])
            self.histories_[name] = history
            self.n_labels_[name] = int(len(rows))
        self.input_kind_ = kind
        return self

    def _run(self, X, want_hidden):
        check_is_fitted(self, "expert_names_")
        kind, data = read_texts(X)
        responses = data.chosen + data.rejected if kind == "pairs" else data.responses
        seqs = self._encode(data.conversations, responses)
        scores, hidden = self._score(seqs, self._adapter_names(), want_hidden=want_hidden)
        scores = scores.T * self.y_scale_ + self.y_mean_  # (n_texts, K)
        return kind, data, scores, hidden

    def predict(self, X):
        """Per-expert rewards ``(n, K)`` for pointwise rows; per-expert P(chosen ≻ rejected) for pairs."""
        kind, data, scores, _ = self._run(X, want_hidden=False)
        n = len(data)
        if kind == "pairs":
            return expit(scores[:n] - scores[n:])
        return scores

    def transform(self, X):
        """A feature frame: per response side, the experts' rewards (``output="rewards"``:
        ``{side}:r:{expert}``) or their last-token hidden states (``output="hidden"``:
        ``{side}:h:{expert}.{i}``), with the prompt group id."""
        if self.output not in ("hidden", "rewards"):
            raise ValueError(f"output must be 'hidden' or 'rewards', got {self.output!r}.")
        hidden_out = self.output == "hidden"
        kind, data, scores, hidden = self._run(X, want_hidden=hidden_out)
        n = len(data)
        sides = sides_of(kind)
        if hidden_out:
            flat = hidden.transpose(1, 0, 2).reshape(hidden.shape[1], -1)  # (n_texts, K * hidden)
            names = [f"{e}.{i}" for e in self.expert_names_ for i in range(self.hidden_size_)]
            blocks = {(side, "h", tuple(names)): flat[j * n:(j + 1) * n] for j, side in enumerate(sides)}
        else:
            blocks = {(side, "r", tuple(self.expert_names_)): scores[j * n:(j + 1) * n]
                      for j, side in enumerate(sides)}
        blocks[("prompt", "m", ("group",))] = group_ids_of_conversations(data.conversations).astype(np.float64)
        return make_frame(blocks, index=X.index if isinstance(X, pd.DataFrame) else None)

    def get_feature_names_out(self, input_features=None):
        check_is_fitted(self, "expert_names_")
        sides = sides_of(self.input_kind_)
        if self.output == "rewards":
            names = [column(s, "r", e) for s in sides for e in self.expert_names_]
        else:
            names = [column(s, "h", f"{e}.{i}") for s in sides for e in self.expert_names_
                     for i in range(self.hidden_size_)]
        return np.asarray(names + ["prompt:m:group"], dtype=object)
