"""The shared base of the pair-trained heads (gating network, DMoERM aggregator)."""

from __future__ import annotations

import numbers

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from rmkit.backbones._loading import resolve_device
from rmkit.base import RewardModelMixin
from rmkit.layout import read_layout
from rmkit.model_selection import PromptGroupValidSplit, pair_target, resolve_groups

from ._torch import BradleyTerryLoss, seeded_torch, silent_sink, torch_seed


def make_accelerator(accelerate, **defaults):
    """An ``accelerate.Accelerator`` from an estimator's ``accelerate`` parameter (True or a dict of arguments);
    ``defaults`` fill arguments the parameter does not set."""
    try:
        from accelerate import Accelerator
    except ImportError as exc:  # an extra: imported only when asked for
        raise ImportError("accelerate=... needs Hugging Face accelerate: pip install 'rmkit[accelerate]'.") from exc
    if accelerate is not True and not isinstance(accelerate, dict):
        raise TypeError(f"accelerate must be None, False, True or a dict of Accelerator arguments, got {accelerate!r}.")
    return Accelerator(**{**defaults, **({} if accelerate is True else accelerate)})


_ACCELERATED = {}


def accelerated_net_class(base=None):
    """``AccelerateMixin`` (skorch) over ``base`` (default: skorch's ``NeuralNet``), made once per base."""
    from skorch import NeuralNet
    from skorch.hf import AccelerateMixin

    base = NeuralNet if base is None else base
    if base not in _ACCELERATED:
        _ACCELERATED[base] = type(f"Accelerated{base.__name__}", (AccelerateMixin, base), {})
    return _ACCELERATED[base]


class PairwiseNetEstimator(RewardModelMixin, BaseEstimator):
    """Base of the small torch reward models trained Bradley–Terry on preference pairs.

    Subclasses say which blocks of a feature frame they read (``_inputs``)
    and which module scores one response (``_module``). The net sees pairs
    as a tensor of shape ``(n, 2, width)``; its output is ``(n, 2)``.
    Training: AdamW with a cosine schedule, early stopping on a held-out
    share of the *prompts*, per-pair weights, all through skorch.
    """

    _step = "model"

    # -- to implement --------------------------------------------------------------------------
    def _needs(self):  # pragma: no cover
        raise NotImplementedError

    def _inputs(self, lay, X, side):  # pragma: no cover
        """float32 array (n, width) of one response side."""
        raise NotImplementedError

    def _learn_input_stats(self, lay, X):
        """Record statistics of the training inputs (e.g. for standardisation) before the module is built."""

    def _module(self, width):  # pragma: no cover
        raise NotImplementedError

    # -- shared --------------------------------------------------------------------------------
    def _check_common(self):
        if self.validation_fraction is not None and not 0 < self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must be None or in (0, 1), got {self.validation_fraction!r}.")
        for name in ("max_epochs", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}.")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}.")

    def _read(self, X, kind=None):
        return read_layout(X, step=type(self).__name__, need=self._needs(), kind=kind)

    def _net(self, module, groups, seed, accelerate=None):
        from skorch import NeuralNet
        from skorch.callbacks import EarlyStopping, LRScheduler

        callbacks = [("lr_scheduler", LRScheduler(policy="CosineAnnealingLR", T_max=max(1, int(self.max_epochs))))]
        split = None
        if self.validation_fraction:
            split = PromptGroupValidSplit(float(self.validation_fraction), groups=groups, random_state=seed)
            callbacks.append(("early_stopping", EarlyStopping(monitor="valid_loss", patience=self.patience,
                                                              load_best=True, sink=silent_sink)))
        settings = dict(
            module=module, criterion=BradleyTerryLoss, criterion__use_weights=True, optimizer=torch.optim.AdamW,
            lr=self.lr, optimizer__weight_decay=self.weight_decay, max_epochs=int(self.max_epochs),
            batch_size=int(self.batch_size), iterator_train__shuffle=True, train_split=split, callbacks=callbacks,
            verbose=int(self.verbose),
        )
        if accelerate:
            return accelerated_net_class()(accelerator=make_accelerator(accelerate), **settings,
                                           callbacks__print_log__sink="auto" if self.verbose else silent_sink)
        return NeuralNet(device=resolve_device(self.device), **settings)

    def fit(self, X, y=None, *, sample_weight=None, groups=None):
        """Train on preference pairs (a feature frame) with the Bradley–Terry loss.

        Parameters
        ----------
        X : feature frame of preference pairs
        y : array-like of shape (n_pairs,), optional
            1 where the ``chosen`` side is preferred, 0 where ``rejected``
            is (default: all 1).
        sample_weight : array-like of shape (n_pairs,), optional
            Per-pair weights of the loss.
        groups : array-like of shape (n_pairs,), optional
            Prompt groups for the validation split (default: the frame's).

        Returns
        -------
        self
        """
        self._check_common()
        lay = self._read(X, kind="pairs")
        n = len(X)
        if n < 2:
            raise ValueError(f"{type(self).__name__} needs at least 2 pairs, got {n}.")
        target = pair_target(y, n)
        groups = resolve_groups(X, groups)
        w = np.ones(n, dtype=np.float32) if sample_weight is None else np.asarray(sample_weight, dtype=np.float32)
        if w.shape != (n,) or not np.isfinite(w).all() or (w < 0).any():
            raise ValueError(f"sample_weight must hold {n} finite non-negative weights.")
        self._learn_input_stats(lay, X)
        c, r = (self._inputs(lay, X, s) for s in lay.sides)
        if np.array_equal(c, r):
            raise ValueError("Every pair has identical chosen and rejected inputs: there is no preference to learn.")
        swap = (target == 0)[:, None]
        pairs = np.stack([np.where(swap, r, c), np.where(swap, c, r)], axis=1).astype(np.float32)
        seed = torch_seed(self.random_state)
        accelerate = getattr(self, "accelerate", None)  # absent from subclasses saved before it existed
        with seeded_torch(seed):
            net = self._net(self._module(pairs.shape[2]), groups, seed, accelerate)
            net.fit(pairs, w)
        if accelerate:  # AccelerateMixin is for training only: keep a plain net on `device` (saved, loaded as usual)
            trained = net
            net = self._net(trained.module_.to(resolve_device(self.device)), groups, seed).initialize()
            net.history = trained.history
        # training-only settings: the split held this fit's groups; the callbacks hold a schedule and a sink
        net.train_split, net.callbacks = None, None
        self.net_ = net
        self.n_features_in_ = X.shape[1]
        return self

    def _forward(self, rows):
        net = self.net_
        net.module_.eval()
        out = []
        with torch.no_grad():
            for start in range(0, len(rows), 4096):
                x = torch.tensor(rows[start:start + 4096], device=net.device)
                out.append(net.module_(x).float().cpu().numpy())
        return np.concatenate(out).astype(np.float64) if out else np.empty((0,))

    def _scores(self, X):
        check_is_fitted(self, "net_")
        lay = self._read(X)
        sides = [self._inputs(lay, X, s) for s in lay.sides]
        scores = np.column_stack([self._forward(v) for v in sides])
        return lay.kind, (scores[:, 0] if lay.kind == "pointwise" else scores)

    @property
    def module_(self):
        """The trained torch module."""
        check_is_fitted(self, "net_")
        return self.net_.module_

    @property
    def history_(self):
        """skorch's training history (losses per epoch)."""
        check_is_fitted(self, "net_")
        return self.net_.history_
