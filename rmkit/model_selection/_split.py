"""Splitters that never put one prompt on both sides of a split."""

from __future__ import annotations

import numbers

import numpy as np
from sklearn.model_selection import GroupKFold, GroupShuffleSplit
from sklearn.model_selection._split import BaseCrossValidator
from sklearn.utils import check_random_state

from ._groups import prompt_groups

__all__ = ["PromptGroupKFold", "PromptGroupShuffleSplit", "prompt_train_test_split", "check_prompt_cv",
           "resolve_groups"]


def resolve_groups(X, groups=None):
    """``groups`` when given (checked against ``X``'s length), else :func:`prompt_groups` of ``X``."""
    if groups is None:
        return prompt_groups(X)
    groups = np.asarray(groups)
    if groups.ndim != 1 or len(groups) != len(X):
        raise ValueError(f"groups must be one label per row of X ({len(X)} rows), got shape {groups.shape}.")
    return groups


class _Persistable:
    """``rmkit.save`` support for splitters (plain parameters, no fitted state)."""

    def __rmkit_state__(self):
        return dict(vars(self))

    def __rmkit_restore__(self, state):
        vars(self).update(state)


class PromptGroupKFold(_Persistable, BaseCrossValidator):
    """K folds with every prompt in exactly one test fold (grouping derived from ``X``).

    Preference pairs and responses that share a prompt are not independent;
    a split that puts one prompt on both sides lets a model memorise the
    prompt instead of judging the answer. This splitter finds the groups
    itself (:func:`~rmkit.model_selection.prompt_groups`: the prompt text,
    or a feature frame's group column), so ``cv=PromptGroupKFold(5)`` works
    in ``GridSearchCV``, ``cross_val_score`` and ``cross_validate`` without
    passing ``groups``. Passing ``groups`` overrides the derived ones.

    Parameters
    ----------
    n_splits : int, default=5
    shuffle : bool, default=True
        Shuffle the groups before assigning them to folds (the folds are
        then balanced in expectation, not exactly).
    random_state : int, RandomState or None, default=0

    Examples
    --------
    >>> import pandas as pd
    >>> from rmkit.model_selection import PromptGroupKFold, prompt_groups
    >>> X = pd.DataFrame({"prompt": list("aabbccddee"), "response": list("0123456789")})
    >>> folds = list(PromptGroupKFold(n_splits=5).split(X))
    >>> g = prompt_groups(X)
    >>> all(not set(g[tr]) & set(g[te]) for tr, te in folds)
    True
    """

    def __init__(self, n_splits=5, *, shuffle=True, random_state=0):
        self.n_splits = n_splits
        self.shuffle = shuffle
        self.random_state = random_state

    def get_n_splits(self, X=None, y=None, groups=None):
        return int(self.n_splits)

    def split(self, X, y=None, groups=None):
        if not isinstance(self.n_splits, numbers.Integral) or self.n_splits < 2:
            raise ValueError(f"n_splits must be an integer >= 2, got {self.n_splits!r}.")
        groups = resolve_groups(X, groups)
        uniq, inverse = np.unique(groups, return_inverse=True)
        if len(uniq) < self.n_splits:
            raise ValueError(f"Cannot make {self.n_splits} prompt-grouped folds from {len(uniq)} distinct prompts.")
        if self.shuffle:
            order = check_random_state(self.random_state).permutation(len(uniq))
            inverse = order[inverse]
        yield from GroupKFold(n_splits=int(self.n_splits)).split(np.zeros(len(groups)), None, inverse)

    def _iter_test_indices(self, X=None, y=None, groups=None):  # pragma: no cover - split is overridden
        for _, test in self.split(X, y, groups):
            yield test


class PromptGroupShuffleSplit(_Persistable, GroupShuffleSplit):
    """Random train/test splits by prompt; ``test_size`` is a share of prompts.

    Like :class:`sklearn.model_selection.GroupShuffleSplit`, with the groups
    derived from ``X`` when not given.

    Examples
    --------
    >>> import pandas as pd
    >>> from rmkit.model_selection import PromptGroupShuffleSplit
    >>> X = pd.DataFrame({"prompt": list("aabbccdd"), "response": list("01234567")})
    >>> train, test = next(PromptGroupShuffleSplit(test_size=0.25, random_state=0).split(X))
    >>> sorted(set(X.prompt[test])), len(train)
    (['b'], 6)
    """

    def __init__(self, n_splits=1, *, test_size=0.2, train_size=None, random_state=0):
        super().__init__(n_splits=n_splits, test_size=test_size, train_size=train_size, random_state=random_state)

    def split(self, X, y=None, groups=None):
        return super().split(np.zeros(len(X)), y, resolve_groups(X, groups))


def check_prompt_cv(cv, *, default=5, random_state=0):
    """A prompt-grouped splitter from ``cv``: an int (number of folds), a splitter, or None (``default`` folds).

    An ungrouped scikit-learn splitter (``KFold``, ``StratifiedKFold``, ...)
    is refused: on preference data it leaks held-out prompts into training.
    Group-aware splitters (``GroupKFold``, ``GroupShuffleSplit``, ...) are
    accepted and get the prompt groups.
    """
    if cv is None:
        cv = default
    if isinstance(cv, numbers.Integral) and not isinstance(cv, bool):
        return PromptGroupKFold(int(cv), random_state=random_state)
    if isinstance(cv, (PromptGroupKFold, PromptGroupShuffleSplit)):
        return cv
    if hasattr(cv, "split"):
        name = type(cv).__name__
        if "Group" not in name:
            raise ValueError(f"cv={name}(...) splits rows without grouping by prompt, which leaks pairs of held-out "
                             "prompts into training. Use an int, rmkit.model_selection.PromptGroupKFold, or a "
                             "scikit-learn Group* splitter.")
        return cv
    raise ValueError(f"cv must be an int >= 2 or a prompt-grouped splitter, got {cv!r}.")


def prompt_train_test_split(*arrays, test_size=0.2, random_state=0, groups=None):
    """``train_test_split`` by prompt: no prompt of the test part occurs in the train part.

    The first array gives the prompts (text or a feature frame) unless
    ``groups`` is passed. Returns ``train, test`` for each array, like
    :func:`sklearn.model_selection.train_test_split`.

    Examples
    --------
    >>> import pandas as pd
    >>> from rmkit.model_selection import prompt_train_test_split
    >>> X = pd.DataFrame({"prompt": list("aabbccdd"), "response": list("01234567")})
    >>> train, test = prompt_train_test_split(X, test_size=0.5, random_state=0)
    >>> set(train.prompt) & set(test.prompt)
    set()
    """
    if not arrays:
        raise ValueError("prompt_train_test_split needs at least one array.")
    from sklearn.utils import _safe_indexing

    splitter = PromptGroupShuffleSplit(test_size=test_size, random_state=random_state)
    train, test = next(splitter.split(arrays[0], groups=groups))
    out = []
    for a in arrays:
        out += [_safe_indexing(a, train), _safe_indexing(a, test)]
    return out
