"""A skorch ``train_split`` that holds out whole prompts."""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import GroupShuffleSplit
from skorch.dataset import ValidSplit, get_len

__all__ = ["PromptGroupValidSplit"]


class PromptGroupValidSplit(ValidSplit):
    """skorch's ``ValidSplit`` grouped by prompt: hold out a share of the *prompts* for validation and early stopping.

    Parameters
    ----------
    fraction : float
        Share of distinct prompts held out.
    groups : array-like of shape (n_rows,)
        Prompt group of each training row.
    random_state : int or None

    Examples
    --------
    >>> import numpy as np
    >>> from skorch.dataset import Dataset
    >>> split = PromptGroupValidSplit(0.25, groups=np.repeat(np.arange(4), 2), random_state=0)
    >>> train, valid = split(Dataset(np.zeros((8, 1), dtype=np.float32)))
    >>> len(train), len(valid)
    (6, 2)
    """

    def __init__(self, fraction, *, groups, random_state=None):
        super().__init__(cv=GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=random_state))
        self.fraction = fraction
        self.groups = groups
        self.random_state = random_state

    def _checked_groups(self, n):
        groups = np.asarray(self.groups)
        if len(groups) != n:
            raise ValueError(f"PromptGroupValidSplit has {len(groups)} group labels for {n} rows.")
        if len(np.unique(groups)) < 2:
            raise ValueError("A validation split by prompt needs at least two distinct prompts; set "
                             "validation_fraction=None to train without one.")
        return groups

    def __call__(self, dataset, y=None, groups=None):
        # skorch's own split, with the bound prompt groups (not stratified: y is a pair target or a rating)
        return super().__call__(dataset, y=None, groups=self._checked_groups(get_len(dataset)))
