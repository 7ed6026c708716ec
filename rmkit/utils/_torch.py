"""Torch helpers shared by the trainable estimators: the Bradley–Terry loss and seeding."""

from __future__ import annotations

import contextlib
import numbers

import torch
from sklearn.utils import check_random_state
from torch import nn
from torch.nn import functional as F

__all__ = ["BradleyTerryLoss", "torch_seed", "bradley_terry_loss", "seeded_torch", "silent_sink"]


def bradley_terry_loss(chosen, rejected, margin=None, weight=None):
    """Mean negative log-likelihood of ``chosen`` beating ``rejected``: ``-log σ(s_c - s_r - m)``.

    With ``weight``, a weighted mean over pairs.
    """
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    nll = -F.logsigmoid(diff)
    if weight is None:
        return nll.mean()
    return (nll * weight).sum() / weight.sum().clamp_min(1e-12)


class BradleyTerryLoss(nn.Module):
    """skorch criterion for pairwise training.

    ``y_pred`` has shape ``(n, 2)``: the scores of the chosen and the
    rejected response. ``y_true`` is ignored unless ``use_margin`` (it holds
    per-pair margins) or ``use_weights`` (it holds per-pair weights) is set.

    Examples
    --------
    >>> import torch
    >>> loss = BradleyTerryLoss()
    >>> round(float(loss(torch.tensor([[0.0, 0.0]]))), 4)  # log 2
    0.6931
    """

    def __init__(self, use_margin=False, use_weights=False):
        super().__init__()
        if use_margin and use_weights:
            raise ValueError("y_true holds either margins or weights, not both.")
        self.use_margin = use_margin
        self.use_weights = use_weights

    def forward(self, y_pred, y_true=None):
        if y_true is None or not (self.use_margin or self.use_weights):
            return bradley_terry_loss(y_pred[:, 0], y_pred[:, 1])
        y_true = y_true.to(y_pred.dtype).reshape(-1)
        if self.use_margin:
            return bradley_terry_loss(y_pred[:, 0], y_pred[:, 1], margin=y_true)
        return bradley_terry_loss(y_pred[:, 0], y_pred[:, 1], weight=y_true)


def torch_seed(random_state):
    """An int seed for torch from an int or a RandomState (None: None)."""
    if random_state is None:
        return None
    if isinstance(random_state, numbers.Integral):
        return int(random_state)
    return int(check_random_state(random_state).randint(0, 2**31 - 1))


@contextlib.contextmanager
def seeded_torch(seed):
    """Run a block under ``torch.manual_seed(seed)`` without touching the caller's global RNG state."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


def silent_sink(*args, **kwargs):
    """A picklable no-op message sink for skorch callbacks (a lambda would break joblib)."""
