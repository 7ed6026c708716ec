"""LoRA reward models on a shared backbone, trained through skorch.

The runtime piece is :class:`_ExpertModule`: a *view* of the shared backbone
(new module objects, the same weight tensors, so LoRA injection never touches
the backbone other estimators use), carrying one or more named peft LoRA
adapters and one value head per adapter. :class:`LoRAExpertRegressor` is the
one-adapter estimator; :class:`rmkit.CapabilityExperts` holds K adapters on the
same view.

Shared trunk: when LoRA only touches layers ``first..n-1``, the hidden states
entering layer ``first`` do not depend on the adapter. They are computed once
per text (without gradients) and every adapter runs only the top layers on
them, in training and in scoring.
"""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted
from skorch import NeuralNet
from skorch.callbacks import Callback, EarlyStopping
from torch import nn

from ._backbones import (
    EMBEDDED_BACKBONE,
    load_backbone,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    weights_fingerprint,
)
from ._data import read_pairs, read_pointwise, read_texts
from ._forward import _decoder_layers, _forward
from ._base import RewardModelMixin
from ._skorch import BradleyTerryLoss, seeded_torch, torch_seed
from .layout import make_frame, sides_of
from .model_selection import PromptGroupValidSplit
from .model_selection._groups import group_ids_of_conversations
from ._templating import encode_conversation

__all__ = ["LoRAExpertRegressor"]


# --------------------------------------------------------------------------- model views


def _module_view(module):
    """A new module tree over the same parameter and buffer tensors (no weight copy)."""
    new = copy.copy(module)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._modules = {k: None if m is None else _module_view(m) for k, m in module._modules.items()}
    return new


def _top_view(model, start):
    """``model`` running only ``layers[start:]`` (then its final norm) on ``inputs_embeds``."""
    top = copy.copy(model)
    top._modules = dict(model._modules)
    top._modules["layers"] = nn.ModuleList(list(_decoder_layers(model))[start:])
    return top


def resolve_lora_layers(layers, n_layers):
    """Indices of the decoder layers that get LoRA.

    ``None``: all; an int ``k``: the top ``k``; a float in (0, 1]: that top
    fraction (at least one layer); a list: those indices (negative from the end).

    Examples
    --------
    >>> resolve_lora_layers(0.25, 30)
    (23, 24, 25, 26, 27, 28, 29)
    >>> resolve_lora_layers([0, -1], 4)
    (0, 3)
    """
    if layers is None:
        return tuple(range(n_layers))
    if isinstance(layers, (bool, np.bool_)):
        raise TypeError(f"layers must be None, an int, a float in (0, 1] or a list of ints, not {layers!r}.")
    if isinstance(layers, (int, np.integer)):
        if not 1 <= layers <= n_layers:
            raise ValueError(f"layers={layers} asks for the top {layers} layers of a backbone with {n_layers}.")
        return tuple(range(n_layers - int(layers), n_layers))
    if isinstance(layers, (float, np.floating)):
        if not 0 < layers <= 1:
            raise ValueError(f"A fractional layers must lie in (0, 1], got {layers}.")
        k = max(1, int(layers * n_layers))
        return tuple(range(n_layers - k, n_layers))
    idx = []
    for i in layers:
        if not isinstance(i, (int, np.integer)) or isinstance(i, bool) or not -n_layers <= i < n_layers:
            raise ValueError(f"layers holds {i!r}, not a layer index of a backbone with {n_layers} layers.")
        idx.append(int(i) % n_layers)
    if not idx:
        raise ValueError("layers is an empty list: give at least one layer index.")
    return tuple(sorted(set(idx)))


def default_target_modules(model):
    """peft's default LoRA targets for the backbone's architecture (q/v projections for Llama)."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping

    model_type = getattr(model.config, "model_type", None)
    if model_type not in mapping:
        raise ValueError(f"No default LoRA target modules for model type {model_type!r}: pass target_modules.")
    return list(mapping[model_type])


def _check_target_modules(model, targets, layer_idx):
    layers = _decoder_layers(model)
    names = sorted({n for i in layer_idx for n, m in layers[i].named_modules() if isinstance(m, nn.Linear)})
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        short = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ValueError(f"target_modules {missing} are not linear modules of the adapted layers of this backbone; "
                         f"its layers have {short}.")


# --------------------------------------------------------------------------- runtime module


class _ExpertModule(nn.Module):
    """A backbone view with named LoRA adapters and one value head per adapter.

    ``forward`` scores texts with the active adapter. Input is either token
    ids (full pass) or the trunk's hidden states (shared-trunk pass), with a
    right-padded mask; leading dimensions are kept: ``(B, T)`` gives ``(B,)``
    and pairs ``(B, 2, T)`` give ``(B, 2)``.
    """

    def __init__(self, backbone, names, lora_kwargs, first_layer, seed=None):
        from peft import LoraConfig, get_peft_model

        super().__init__()
        hidden = backbone.config.hidden_size
        self.first_layer = first_layer
        self.heads = nn.ModuleDict()
        peft_model = None
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            for k, name in enumerate(names):
                with seeded_torch(None if seed is None else seed + k):
                    config = LoraConfig(layers_pattern="layers", bias="none", **lora_kwargs)
                    if peft_model is None:
                        peft_model = get_peft_model(_module_view(backbone), config, adapter_name=name)
                    else:
                        peft_model.add_adapter(name, config)
                    head = nn.Linear(hidden, 1)
                    nn.init.normal_(head.weight, std=1.0 / math.sqrt(hidden + 1))
                    nn.init.zeros_(head.bias)
                self.heads[name] = head.to(backbone.device)
        self.peft = peft_model
        # not registered as a submodule: it shares every module with self.peft
        object.__setattr__(self, "_top", _top_view(self.base, first_layer) if first_layer > 0 else None)
        self.activate(names[0])

    @property
    def base(self):
        """The backbone view with LoRA layers injected."""
        return self.peft.base_model.model

    def activate(self, name):
        self.peft.set_adapter(name)
        self.active = name

    @torch.no_grad()
    def trunk(self, input_ids, mask):
        """Hidden states entering the first adapted layer (no adapter below it)."""
        pos = torch.arange(input_ids.shape[-1], device=input_ids.device).expand_as(input_ids)
        return _forward(self.base, self.first_layer, input_ids=input_ids, attention_mask=mask, position_ids=pos)

    def hidden(self, input_ids=None, trunk=None, mask=None):
        """Final-layer hidden state at each text's last real token, shape ``(N, hidden)``."""
        mask = mask.reshape(-1, mask.shape[-1])
        pos = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
        if trunk is not None:
            trunk = trunk.reshape(-1, *trunk.shape[-2:])
            out = self._top(inputs_embeds=trunk, attention_mask=mask, position_ids=pos, use_cache=False)
        else:
            input_ids = input_ids.reshape(-1, input_ids.shape[-1])
            out = self.base(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=False)
        last = mask.sum(-1) - 1  # right padding: the last real token, found from the mask
        return out.last_hidden_state[torch.arange(len(last), device=last.device), last].float()

    def score(self, hidden):
        return self.heads[self.active](hidden).squeeze(-1)

    def forward(self, input_ids=None, trunk=None, mask=None):
        return self.score(self.hidden(input_ids, trunk, mask)).reshape(mask.shape[:-1])


# --------------------------------------------------------------------------- skorch pieces


def _pad(seqs):
    """Right-pad token-id or hidden-state sequences; returns ``(values, mask)``."""
    width = max(len(s) for s in seqs)
    first = seqs[0]
    out = first.new_zeros((len(seqs), width, *first.shape[1:]))
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return out, mask


def _collate(batch):
    """skorch collate: items are one sequence (pointwise) or a (chosen, rejected) tuple."""
    items, ys = zip(*batch)
    pairs = isinstance(items[0], tuple)
    seqs = [s for it in items for s in it] if pairs else list(items)
    values, mask = _pad(seqs)
    if pairs:
        values, mask = values.reshape(len(items), 2, *values.shape[1:]), mask.reshape(len(items), 2, -1)
    key = "trunk" if values.is_floating_point() else "input_ids"
    return {key: values, "mask": mask}, torch.as_tensor(np.asarray(ys, dtype=np.float32))


class _KeepBestAdapter(Callback):
    """Restore the trainable tensors of the epoch with the best validation loss.

    Unlike skorch's ``load_best``, it copies only the adapter and head, never
    the backbone's weights.
    """

    def on_train_begin(self, net, **kwargs):
        self.best_ = None

    def on_epoch_end(self, net, **kwargs):
        if net.history[-1].get("valid_loss_best"):
            self.best_ = {n: p.detach().clone() for n, p in net.get_all_learnable_params()}

    def on_train_end(self, net, **kwargs):
        if self.best_ is not None:
            with torch.no_grad():
                for n, p in net.get_all_learnable_params():
                    p.copy_(self.best_[n])


class _AdapterNet(NeuralNet):
    """skorch net over an :class:`_ExpertModule`: optimises only the active adapter and its head,
    with optional gradient accumulation."""

    def __init__(self, *args, accumulation_steps=1, **kwargs):
        super().__init__(*args, **kwargs)
        self.accumulation_steps = accumulation_steps

    def get_all_learnable_params(self):
        for name, p in self.module_.named_parameters():
            if p.requires_grad:
                yield name, p

    def get_loss(self, y_pred, y_true, X=None, training=False):
        loss = super().get_loss(y_pred, y_true, X=X, training=training)
        return loss / self.accumulation_steps if training else loss

    def train_step(self, batch, **fit_params):
        if self.accumulation_steps == 1:
            return super().train_step(batch, **fit_params)
        step = self.train_step_single(batch, **fit_params)
        self._pending = getattr(self, "_pending", 0) + 1
        if self._pending >= self.accumulation_steps:
            self._apply_accumulated()
        return {"loss": step["loss"] * self.accumulation_steps, "y_pred": step["y_pred"]}

    def _apply_accumulated(self):
        self.optimizer_.step()
        self.optimizer_.zero_grad()
        self._pending = 0

    def run_single_epoch(self, iterator, training, prefix, step_fn, **fit_params):
        super().run_single_epoch(iterator, training, prefix, step_fn, **fit_params)
        if training and getattr(self, "_pending", 0):
            self._apply_accumulated()  # never drop the last partial accumulation


def _as_items(rows):
    """An object array of items for skorch (keeps tuples and tensors whole)."""
    out = np.empty(len(rows), dtype=object)
    for i, r in enumerate(rows):
        out[i] = r
    return out


# --------------------------------------------------------------------------- shared estimator logic


class _LoRABase(BaseEstimator):
    """Parameter checks, tokenisation, training, scoring and pickling shared by the LoRA estimators."""

    _default_layers = None

    # ---- parameters
    def _check_params(self):
        for name in ("rank", "max_epochs", "batch_size", "accumulation_steps", "patience"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}.")
        if not (isinstance(self.alpha, (int, float, np.number)) and self.alpha > 0):
            raise ValueError(f"alpha must be a positive number, got {self.alpha!r}.")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout!r}.")
        if not (isinstance(self.lr, (int, float, np.number)) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}.")
        if not (isinstance(self.weight_decay, (int, float, np.number)) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a non-negative number, got {self.weight_decay!r}.")
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must lie in [0, 1), got {self.validation_fraction!r}.")
        if self.shared_trunk not in ("auto", True, False):
            raise ValueError(f"shared_trunk must be 'auto', True or False, got {self.shared_trunk!r}.")
        if self.max_length is not None and (not isinstance(self.max_length, (int, np.integer)) or self.max_length < 8):
            raise ValueError(f"max_length must be None or an integer >= 8, got {self.max_length!r}.")
        if isinstance(self.target_modules, str):
            raise TypeError("target_modules must be a list of module names such as ['q_proj', 'v_proj'], "
                            f"not the string {self.target_modules!r}.")
        resolve_dtype(self.dtype)

    def _backbone_model(self):
        device = getattr(self, "_fallback_device", None) or self.device  # the parameter itself is never changed
        return load_backbone(self.backbone, dtype=self.dtype, device=device)

    def _resolve_architecture(self):
        """Set the fitted attributes that describe where LoRA goes."""
        model = self._backbone_model()
        n = len(_decoder_layers(model))
        self.n_layers_ = n
        self.lora_layers_ = resolve_lora_layers(self.layers, n)
        targets = list(self.target_modules) if self.target_modules is not None else default_target_modules(model)
        _check_target_modules(model, targets, self.lora_layers_)
        self.target_modules_ = targets
        first = self.lora_layers_[0]
        if self.shared_trunk is True and first == 0:
            raise ValueError("shared_trunk=True needs LoRA on the top layers only, but layers includes layer 0; "
                             "set layers (e.g. 0.25 for the top quarter) or shared_trunk='auto'.")
        self.shared_trunk_ = bool(first > 0 and self.shared_trunk in ("auto", True))
        self.hidden_size_ = int(model.config.hidden_size)
        self.backbone_fingerprint_ = weights_fingerprint(self.backbone)

    def _lora_kwargs(self):
        return dict(r=int(self.rank), lora_alpha=float(self.alpha), lora_dropout=float(self.dropout),
                    target_modules=list(self.target_modules_), layers_to_transform=list(self.lora_layers_))

    def _new_module(self, names):
        seed = torch_seed(self.random_state)
        first = self.lora_layers_[0] if self.shared_trunk_ else 0
        return _ExpertModule(self._backbone_model(), names, self._lora_kwargs(), first, seed=seed)

    # ---- text
    def _encode(self, conversations, responses):
        tokenizer = load_tokenizer(self.backbone)
        n = len(conversations)
        enc = [encode_conversation(tokenizer, conversations[i % n], r, self.max_length)
               for i, r in enumerate(responses)]
        n_trunc = sum(e.truncated for e in enc)
        if n_trunc and self.verbose:
            warnings.warn(f"{n_trunc} of {len(enc)} texts exceeded max_length={self.max_length} and were truncated "
                          "(prompt start first, then response end).", stacklevel=3)
        return [torch.tensor(e.prefix + e.suffix, dtype=torch.long) for e in enc]

    def _order(self, seqs):
        lengths = np.asarray([len(s) for s in seqs])
        order = np.argsort(lengths, kind="stable")
        return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def _trunk_states(self, module, seqs):
        """Trunk hidden states of each sequence, trimmed to its length (computed once, kept on CPU)."""
        out = [None] * len(seqs)
        device = next(module.parameters()).device
        module.eval()
        for batch in self._order(seqs):
            ids, mask = _pad([seqs[i] for i in batch])
            h = module.trunk(ids.to(device), mask.to(device)).cpu()
            for r, i in enumerate(batch):
                out[i] = h[r, : len(seqs[i])].clone()
        return out

    # ---- training
    def _train_adapter(self, module, name, items, y, criterion, criterion_kwargs, seed, groups):
        """Train one adapter; its validation split (early stopping) holds out whole prompts (``groups``)."""
        module.activate(name)
        callbacks = []
        train_split = None
        if self.validation_fraction > 0:
            train_split = PromptGroupValidSplit(self.validation_fraction, groups=groups, random_state=seed)
            callbacks = [("early_stopping", EarlyStopping(monitor="valid_loss", patience=self.patience)),
                         ("keep_best", _KeepBestAdapter())]
        net = _AdapterNet(
            module, criterion=criterion, optimizer=torch.optim.AdamW, lr=self.lr,
            optimizer__weight_decay=self.weight_decay, max_epochs=self.max_epochs, batch_size=self.batch_size,
            accumulation_steps=int(self.accumulation_steps), train_split=train_split, callbacks=callbacks,
            iterator_train__shuffle=True, iterator_train__collate_fn=_collate, iterator_valid__collate_fn=_collate,
            device=resolve_device(self.device), verbose=int(self.verbose),
            **{f"criterion__{k}": v for k, v in criterion_kwargs.items()},
        )
        with seeded_torch(seed):
            net.fit(_as_items(items), np.asarray(y, dtype=np.float32))
        module.eval()
        return net.history

    def _training_inputs(self, module, seqs):
        """What skorch feeds the module for each text: trunk states (shared trunk) or token ids."""
        return self._trunk_states(module, seqs) if self.shared_trunk_ else seqs

    # ---- scoring
    @torch.no_grad()
    def _score(self, seqs, names, *, want_hidden):
        """Scores ``(K, n)`` and, if wanted, hidden states ``(K, n, hidden)`` of every adapter."""
        module = self._module()
        module.eval()
        device = next(module.parameters()).device
        K, n = len(names), len(seqs)
        scores = np.zeros((K, n), dtype=np.float32)
        hidden = np.zeros((K, n, self.hidden_size_), dtype=np.float32) if want_hidden else None
        for batch in self._order(seqs):
            ids, mask = _pad([seqs[i] for i in batch])
            ids, mask = ids.to(device), mask.to(device)
            trunk = module.trunk(ids, mask) if self.shared_trunk_ else None
            for k, name in enumerate(names):
                module.activate(name)
                h = module.hidden(input_ids=None if trunk is not None else ids, trunk=trunk, mask=mask)
                scores[k, batch] = module.score(h).cpu().numpy()
                if want_hidden:
                    hidden[k, batch] = h.cpu().numpy()
        return scores, hidden

    # ---- persistence
    def _module(self):
        """The runtime module, rebuilt from the saved adapter state after unpickling."""
        module = getattr(self, "_runtime", None)
        if module is not None:
            return module
        saved = getattr(self, "_saved_state", None)
        if saved is None:
            raise RuntimeError("This estimator has no adapter state; fit it first.")
        if weights_fingerprint(self.backbone) != self.backbone_fingerprint_:
            raise ValueError(f"The weights of backbone {self.backbone!r} differ from those this model was trained "
                             "on (fingerprint mismatch): the saved adapters do not apply to them.")
        from peft import set_peft_model_state_dict

        self._fallback_device = None
        if str(resolve_device(self.device)).startswith("cuda") and not torch.cuda.is_available():
            warnings.warn(f"This model was saved with device={self.device!r} but CUDA is not available here; "
                          "running it on the CPU (the device parameter is kept).", stacklevel=3)
            self._fallback_device = "cpu"
        names = list(saved["adapters"])
        module = self._new_module(names)
        for name in names:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=FutureWarning)
                result = set_peft_model_state_dict(module.peft, saved["adapters"][name], adapter_name=name)
            if result.unexpected_keys:
                raise ValueError(f"Saved adapter {name!r} does not fit the backbone: unexpected "
                                 f"{list(result.unexpected_keys)[:3]}.")
            module.heads[name].load_state_dict(saved["heads"][name])
        module.activate(names[0])
        module.eval()
        self._runtime = module
        self._saved_state = None
        return module

    def _adapter_state(self):
        """CPU copies of every adapter's LoRA tensors and head: all a saved model holds besides parameters."""
        from peft import get_peft_model_state_dict

        module = self._runtime
        adapters, heads = {}, {}
        for name in module.heads:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=UserWarning)
                sd = get_peft_model_state_dict(module.peft, adapter_name=name, save_embedding_layers=False)
            adapters[name] = {k: v.detach().cpu().clone() for k, v in sd.items()}
            heads[name] = {k: v.detach().cpu().clone() for k, v in module.heads[name].state_dict().items()}
        return {"adapters": adapters, "heads": heads}

    def __getstate__(self):
        state = super().__getstate__()
        if state.get("_runtime") is not None:
            state["_saved_state"] = self._adapter_state()
        state["_runtime"] = None
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._runtime = None

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.string = True
        tags.requires_fit = True
        return tags


def _check_targets(y, n, name="y"):
    y = np.asarray(y, dtype=float).reshape(-1) if y is not None else None
    if y is not None and len(y) != n:
        raise ValueError(f"{name} has {len(y)} values for {n} rows of X.")
    if y is not None and not np.isfinite(y).all():
        bad = int(np.flatnonzero(~np.isfinite(y))[0])
        raise ValueError(f"{name} has a NaN or infinite value at row {bad}; drop unlabeled rows before fit.")
    return y


# --------------------------------------------------------------------------- the estimator


class LoRAExpertRegressor(RewardModelMixin, TransformerMixin, _LoRABase):
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
        Truncation policy of :func:`rmkit._templating.encode_conversation`.
    random_state : int or None, default=None
        Seeds the LoRA and head initialisation, shuffling and the split.
    device : str, default="auto"
    dtype : str, default="float32"
        Backbone dtype (adapters stay in float32).
    verbose : int, default=1
        skorch's epoch log and truncation warnings; 0 silences them.
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
    The reward-model contract of :mod:`rmkit._base`: ``predict`` on
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
                 device="auto", dtype="float32", verbose=1, output="hidden"):
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
