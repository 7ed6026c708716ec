"""The skorch net that trains one adapter, its batching and its keep-the-best callback."""

from __future__ import annotations

import numpy as np
import torch
from skorch import NeuralNet
from skorch.callbacks import Callback

# --------------------------------------------------------------------------- skorch pieces


def pad(seqs):
    """Right-pad token-id or hidden-state sequences; returns ``(values, mask)``."""
    width = max(len(s) for s in seqs)
    first = seqs[0]
    out = first.new_zeros((len(seqs), width, *first.shape[1:]))
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return out, mask


def collate(batch):
    """skorch collate: items are one sequence (pointwise) or a (chosen, rejected) tuple."""
    items, ys = zip(*batch)
    pairs = isinstance(items[0], tuple)
    seqs = [s for it in items for s in it] if pairs else list(items)
    values, mask = pad(seqs)
    if pairs:
        values, mask = values.reshape(len(items), 2, *values.shape[1:]), mask.reshape(len(items), 2, -1)
    key = "trunk" if values.is_floating_point() else "input_ids"
    return {key: values, "mask": mask}, torch.as_tensor(np.asarray(ys, dtype=np.float32))


class KeepBestAdapter(Callback):
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


class AdapterNet(NeuralNet):
    """skorch net over an :class:`ExpertModule`: optimises only the active adapter and its head,
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


def as_items(rows):
    """An object array of items for skorch (keeps tuples and tensors whole)."""
    out = np.empty(len(rows), dtype=object)
    for i, r in enumerate(rows):
        out[i] = r
    return out
