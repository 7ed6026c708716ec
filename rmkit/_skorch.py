"""Pieces shared by rmkit's skorch-based estimators (one training loop: skorch's)."""

from __future__ import annotations

import numbers

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ._backbones import resolve_device

__all__ = ["BradleyTerryLoss", "ValidationMixin", "bradley_terry_loss", "seed_torch", "silent_sink", "skorch_device"]


def bradley_terry_loss(chosen, rejected, margin=None):
    """Mean negative log-likelihood of ``chosen`` beating ``rejected``: ``-log σ(s_c - s_r - m)``."""
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()


class BradleyTerryLoss(nn.Module):
    """skorch criterion for pairwise training.

    The module's output ``y_pred`` has shape ``(n, 2)``: the scores of the
    chosen and the rejected response. ``y_true`` is ignored unless it is a
    float tensor of per-pair margins (used when ``use_margin`` is True).

    Examples
    --------
    >>> import torch
    >>> loss = BradleyTerryLoss()
    >>> round(float(loss(torch.tensor([[0.0, 0.0]]))), 4)  # log 2
    0.6931
    """

    def __init__(self, use_margin=False):
        super().__init__()
        self.use_margin = use_margin

    def forward(self, y_pred, y_true=None):
        margin = None
        if self.use_margin and y_true is not None:
            margin = y_true.to(y_pred.dtype).reshape(-1)
        return bradley_terry_loss(y_pred[:, 0], y_pred[:, 1], margin)


def seed_torch(random_state):
    """Seed torch from an int or a ``numpy`` RandomState (None leaves it alone)."""
    if random_state is None:
        return
    if isinstance(random_state, np.random.RandomState):
        random_state = int(random_state.randint(0, 2**31 - 1))
    torch.manual_seed(int(random_state))


def skorch_device(device):
    """Resolve rmkit's ``device="auto"`` for a skorch ``device`` argument."""
    return resolve_device(device)


def silent_sink(*args, **kwargs):
    """A picklable no-op message sink for skorch callbacks (a lambda would break joblib)."""


class ValidationMixin:
    """Early stopping on a seeded validation split, for skorch nets with ``validation_fraction``,
    ``patience`` and ``random_state`` parameters (no split when ``validation_fraction`` is 0)."""

    def get_default_callbacks(self):
        from skorch.callbacks import EarlyStopping

        callbacks = list(super().get_default_callbacks())
        if self.validation_fraction:
            callbacks.append(("early_stopping", EarlyStopping(monitor="valid_loss", patience=self.patience,
                                                              load_best=True, sink=silent_sink)))
        return callbacks

    def get_split_datasets(self, X, y=None, **fit_params):
        from skorch.dataset import ValidSplit

        dataset = self.get_dataset(X, y)
        if not self.validation_fraction:
            return dataset, None
        seed = self.random_state if isinstance(self.random_state, numbers.Integral) else None
        return ValidSplit(float(self.validation_fraction), random_state=seed)(dataset, y)
