"""Pieces shared by rmkit's skorch-based estimators (one training loop: skorch's)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ._backbones import resolve_device

__all__ = ["BradleyTerryLoss", "bradley_terry_loss", "seed_torch", "silent_sink", "skorch_device"]


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
