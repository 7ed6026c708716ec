"""A LoRA reward model: one adapter and a value head on a frozen backbone."""

from __future__ import annotations

import numpy as np
from sklearn.base import TransformerMixin
from sklearn.utils.validation import check_is_fitted
from torch import nn

from rmkit.backbones._loading import (
    EMBEDDED_BACKBONE,
)
from rmkit.base import RewardModelMixin
from rmkit.layout import make_frame, sides_of
from rmkit.model_selection._groups import group_ids_of_conversations
from rmkit.utils._torch import BradleyTerryLoss, torch_seed
from rmkit.utils._validation import read_pairs, read_pointwise, read_texts

from ._base import LoRABase

__all__ = ["LoRAExpertRegressor"]


def _check_targets(y, n, name="y"):
    y = np.asarray(y, dtype=float).reshape(-1) if y is not None else None
    if y is not None and len(y) != n:
        raise ValueError(f"{name} has {len(y)} values for {n} rows of X.")
    if y is not None and not np.isfinite(y).all():
        bad = int(np.flatnonzero(~np.isfinite(y))[0])
        raise ValueError(f"{name} has a NaN or infinite value at row {bad}; drop unlabeled rows before fit.")
    return y


# --------------------------------------------------------------------------- the estimator


class LoRAExpertRegressor(RewardModelMixin, TransformerMixin, LoRABase):
    """A reward model: a backbone with a LoRA adapter and a value head.

    The reward of a conversation + response is a linear head on the final
    hidden state at the conversation's closing token, with LoRA adapters on
    ``target_modules`` of the chosen ``layers``. Fit on preference pairs
    (``prompt``, ``chosen``, ``rejected``) it minimises the Bradley–Terry loss
    ``-log σ(r_c - r_r - m)`` (``y``, if given, holds the margins ``m``); fit on
    pointwise rows (``prompt``, ``response``) with ratings ``y`` it minimises
    the squared error (ratings are standardised for training and mapped back
    for prediction). Training runs through skorch (progress and early
    stopping are skorch callbacks); the base weights stay frozen.

    Parameters
    ----------
    backbone : str, default="smollm2-135m-instruct"
        Backbone name or folder (see :func:`rmkit.resolve_backbone`). The
        in-process backbone is shared with other estimators: LoRA is injected
        into a view of it, never into it.
    rank, alpha, dropout : int, float, float, default=8, 16, 0.05
        LoRA rank, scaling numerator (scale ``alpha / rank``) and dropout.
    target_modules : list of str or None, default=None
        Module names that get LoRA; ``None`` takes peft's default for the
        architecture (``q_proj``, ``v_proj`` for Llama-style models).
    layers : None, int, float or list of int, default=None
        Decoder layers that get LoRA: all (``None``), the top ``k`` (int),
        the top fraction (float, e.g. ``0.25``) or explicit indices.
    shared_trunk : {"auto", True, False}, default="auto"
        When LoRA leaves the bottom layers alone, compute their output once per
        text and train/score only the top layers on it (``"auto"``: whenever
        possible). Exact: scores equal the full pass within float tolerance.
    lr, weight_decay : float, default=1e-4, 0.0
        AdamW settings for the adapter and head.
    max_epochs, batch_size, accumulation_steps : int, default=3, 8, 1
        Optimiser steps happen every ``accumulation_steps`` batches.
    validation_fraction : float, default=0.0
        If positive, that share of rows is held out; training stops early
        after ``patience`` epochs without a better validation loss and keeps
        the best epoch's adapter.
    patience : int, default=3
    max_length : int or None, default=1024
        Truncation policy of :func:`rmkit.backbones._templating.encode_conversation`.
    random_state : int or None, default=None
        Seeds the LoRA and head initialisation, shuffling and the split.
    device : str, default="auto"
    dtype : str, default="float32"
        Backbone dtype (adapters stay in float32).
    verbose : int, default=1
        skorch's epoch log and truncation warnings; 0 silences them.
    accelerate : bool or dict, default=None
        Train each adapter under Hugging Face ``accelerate`` (skorch's
        ``AccelerateMixin``): ``True`` for ``Accelerator()`` (the processes
        and mixed precision of ``accelerate launch``), or a dict of
        ``Accelerator`` arguments such as ``{"mixed_precision": "bf16"}``.
        ``accumulation_steps`` becomes the accelerator's gradient
        accumulation. Needs the ``accelerate`` extra.
    output : {"hidden", "reward"}, default="hidden"
        What ``transform`` emits per response side (a feature frame): the
        adapted last-token hidden states, or the reward as one objective
        (``{side}:r:reward``) for a gate or an :class:`~rmkit.ObjectiveUnion`.

    Attributes
    ----------
    objective_ : {"bradley_terry", "mse"}
    lora_layers_ : tuple of int
    target_modules_ : list of str
    shared_trunk_ : bool
    hidden_size_ : int
    backbone_fingerprint_ : str
    history_ : skorch History
        Per-epoch ``train_loss`` (and ``valid_loss``).

    Notes
    -----
    The reward-model contract of :mod:`rmkit.base`: ``predict`` on
    pointwise rows returns rewards ``(n,)``; on pairs ``predict_proba``
    gives P(chosen ≻ rejected), ``decision_function`` the margin and
    ``predict`` 1 when the chosen side wins. ``score`` is R² on rated rows
    and pairwise accuracy on pairs. The validation split of early stopping
    holds out whole prompts.

    Pickling (``joblib.dump``) stores the parameters, the LoRA tensors and the
    head (on CPU) and the backbone's name and weight fingerprint, never the
    base weights; the backbone is reloaded on first use after loading, on the
    ``device`` then set. A model saved with ``device="cuda"`` falls back to
    the CPU, with a warning, where CUDA is not available.

    In shared-trunk mode ``fit`` keeps every training text's trunk hidden
    states in memory (``tokens x hidden`` floats per text); for large
    training sets on small machines use ``shared_trunk=False``.

    ``check_estimator`` does not apply: the estimator takes text, not numeric
    arrays.

    Examples
    --------
    >>> from rmkit import LoRAExpertRegressor
    >>> from rmkit.testing import tiny_backbone
    >>> pairs = [{"prompt": "2+2?", "chosen": "4", "rejected": "5"},
    ...          {"prompt": "3+3?", "chosen": "6", "rejected": "7"}]
    >>> rm = LoRAExpertRegressor(tiny_backbone(), rank=2, max_epochs=1, random_state=0, verbose=0).fit(pairs)
    >>> rm.predict_proba(pairs).shape, rm.transform(pairs).shape  # P(chosen ≻ rejected); hidden states per side
    ((2, 2), (2, 129))
    """

    def __init__(self, backbone=EMBEDDED_BACKBONE, *, rank=8, alpha=16, dropout=0.05, target_modules=None,
                 layers=None, shared_trunk="auto", lr=1e-4, weight_decay=0.0, max_epochs=3, batch_size=8,
                 accumulation_steps=1, validation_fraction=0.0, patience=3, max_length=1024, random_state=None,
                 device="auto", dtype="float32", verbose=1, output="hidden",
                 accelerate=None):
        self.accelerate = accelerate
        self.output = output
        self.backbone = backbone
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

    _NAME = "reward"

    def fit(self, X, y=None):
        """Fit on preference pairs (``y``: optional margins) or on rated rows (``y``: ratings).

        Parameters
        ----------
        X : DataFrame, list of dicts or dict of lists
            Pairs (``prompt``/``messages``, ``chosen``, ``rejected``) or
            pointwise rows (``prompt``/``messages``, ``response``).
        y : array-like of shape (n,), optional
            Pairs: non-negative margins ``m`` in ``-log σ(r_c - r_r - m)``.
            Pointwise: the ratings (required, finite).

        Returns
        -------
        self
        """
        self._check_params()
        kind = read_texts(X)[0]
        if kind == "pairs":
            data = read_pairs(X)  # identical chosen/rejected texts are an error
            margins = _check_targets(y, len(data), "y (margins)")
            if margins is not None and (margins < 0).any():
                raise ValueError("Margins y must be non-negative: the chosen response is the better one.")
            self.objective_ = "bradley_terry"
        else:
            data = read_pointwise(X)
            if y is None:
                raise ValueError("Pointwise rows need ratings y; pass preference pairs to fit without y.")
            ratings = _check_targets(y, len(data), "y (ratings)")
            if len(data) < 2 or np.std(ratings) == 0:
                raise ValueError("Ratings y must take at least two distinct values to fit a reward.")
        self._runtime = None
        self._saved_state = None
        self._resolve_architecture()
        module = self._new_module([self._NAME])
        self._runtime = module
        seed = torch_seed(self.random_state)
        groups = group_ids_of_conversations(data.conversations)
        if kind == "pairs":
            n = len(data)
            seqs = self._encode(data.conversations, data.chosen + data.rejected)
            inputs = self._training_inputs(module, seqs)
            items = [(inputs[i], inputs[n + i]) for i in range(n)]
            target = margins if margins is not None else np.zeros(n)
            self.history_ = self._train_adapter(module, self._NAME, items, target, BradleyTerryLoss,
                                                {"use_margin": margins is not None}, seed, groups)
            self.y_mean_, self.y_scale_ = 0.0, 1.0
        else:
            self.objective_ = "mse"
            self.y_mean_, self.y_scale_ = float(np.mean(ratings)), float(np.std(ratings))
            seqs = self._encode(data.conversations, data.responses)
            items = self._training_inputs(module, seqs)
            target = (ratings - self.y_mean_) / self.y_scale_
            self.history_ = self._train_adapter(module, self._NAME, items, target, nn.MSELoss, {}, seed, groups)
        self.input_kind_ = kind
        return self

    def _run(self, X, want_hidden):
        check_is_fitted(self, "objective_")
        kind, data = read_texts(X)
        responses = data.chosen + data.rejected if kind == "pairs" else data.responses
        seqs = self._encode(data.conversations, responses)
        scores, hidden = self._score(seqs, [self._NAME], want_hidden=want_hidden)
        return kind, len(data), scores[0] * self.y_scale_ + self.y_mean_, None if hidden is None else hidden[0]

    def _scores(self, X):
        kind, n, scores, _ = self._run(X, want_hidden=False)
        return kind, (scores if kind == "pointwise" else np.c_[scores[:n], scores[n:]])

    def transform(self, X):
        """A feature frame per response side: the adapted last-token hidden states
        (``output="hidden"``: ``{side}:h:{i}``) or the reward (``output="reward"``: ``{side}:r:reward``),
        with the prompt group id."""
        if self.output not in ("hidden", "reward"):
            raise ValueError(f"output must be 'hidden' or 'reward', got {self.output!r}.")
        kind, data = read_texts(X)
        n = len(data)
        _, _, scores, hidden = self._run(X, want_hidden=self.output == "hidden")
        sides = sides_of(kind)
        if self.output == "hidden":
            blocks = {(side, "h", range(self.hidden_size_)): hidden[j * n:(j + 1) * n] for j, side in enumerate(sides)}
        else:
            blocks = {(side, "r", (self._NAME,)): scores[j * n:(j + 1) * n] for j, side in enumerate(sides)}
        blocks[("prompt", "m", ("group",))] = group_ids_of_conversations(data.conversations).astype(np.float64)
        return make_frame(blocks, index=X.index if hasattr(X, "iloc") else None)

    def score(self, X, y=None, sample_weight=None):
        """Pairwise accuracy on pairs; R² against ``y`` on rated rows."""
        if read_texts(X)[0] == "pairs":
            return super().score(X, y, sample_weight=sample_weight)
        from sklearn.metrics import r2_score

        return float(r2_score(y, self.predict(X), sample_weight=sample_weight))

    def get_feature_names_out(self, input_features=None):
        check_is_fitted(self, "objective_")
        sides = sides_of(self.input_kind_)
        if self.output == "reward":
            names = [f"{side}:r:{self._NAME}" for side in sides]
        else:
            names = [f"{side}:h:{i}" for side in sides for i in range(self.hidden_size_)]
        return np.asarray(names + ["prompt:m:group"], dtype=object)

    def value_head(self):
        """The value head on the adapted last-token hidden state: ``{"weight": (hidden,), "bias": float}``.

        DMoERM starts each capability expert's head from the phase-1 task
        model's (``CapabilityExperts.fit(..., init_head=...)``), as its
        reference code does.

        Returns
        -------
        dict
        """
        check_is_fitted(self, "objective_")
        head = self._module().heads[self._NAME]
        return {"weight": head.weight.detach().float().cpu().numpy().reshape(-1).copy(),
                "bias": float(head.bias.detach().float().cpu().item())}

    def weight_deltas(self):
        """What the adapter adds to each adapted weight: ``{module name: ΔW}``.

        ``ΔW = (alpha / rank) · B A`` as a float32 CPU tensor of the adapted
        linear layer's weight shape, named as in the backbone's decoder
        (``layers.7.self_attn.q_proj``, ...). Adding these to a fresh copy of
        the backbone merges the adapter (DMoERM's phase-1 task model).

        Returns
        -------
        dict of str to torch.Tensor
        """
        from peft.tuners.lora import LoraLayer

        check_is_fitted(self, "objective_")
        base = self._module().base
        return {name: layer.get_delta_weight(self._NAME).detach().float().cpu()
                for name, layer in base.named_modules()
                if isinstance(layer, LoraLayer) and self._NAME in getattr(layer, "lora_A", {})}
