"""Labels for preference pairs, so scikit-learn's stock scorers apply."""

from __future__ import annotations

import numpy as np
from sklearn.utils import check_random_state

__all__ = ["shuffle_pair_sides", "pair_target"]


def pair_target(y, n):
    """Validate a pair target: 1 where the ``chosen`` column holds the preferred response, 0 where
    ``rejected`` does. ``None`` means every pair is ordered chosen-first."""
    if y is None:
        return np.ones(n, dtype=int)
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n:
        raise ValueError(f"y for preference pairs must hold one label per pair ({n}), got shape {y.shape}.")
    if y.dtype.kind == "b":
        return y.astype(int)
    try:
        yf = y.astype(float)
    except (TypeError, ValueError):
        raise ValueError("y for preference pairs must be 1 (the 'chosen' column is preferred) or 0 (the "
                         f"'rejected' column is), got values such as {y[:3].tolist()}.") from None
    if not np.isin(yf, (0.0, 1.0)).all():
        bad = yf[~np.isin(yf, (0.0, 1.0))][:3].tolist()
        raise ValueError("y for preference pairs must be 1 (the 'chosen' column is preferred) or 0 (the "
                         f"'rejected' column is); found {bad}.")
    return yf.astype(int)


def shuffle_pair_sides(pairs, *, fraction=0.5, random_state=0):
    """Swap ``chosen`` and ``rejected`` in a random share of pairs and return the labels.

    rmkit's pairwise models read ``y`` as "1: the ``chosen`` column is
    preferred, 0: the ``rejected`` column is". With both labels present,
    scikit-learn's stock scorers (``"accuracy"``, ``"roc_auc"``,
    ``"neg_log_loss"``) work on pairs as on any binary classification.

    Returns
    -------
    pairs : DataFrame
        A copy with the sides of the swapped rows exchanged.
    y : ndarray of int
        1 for unswapped rows, 0 for swapped rows.

    Examples
    --------
    >>> import pandas as pd
    >>> from rmkit.model_selection import shuffle_pair_sides
    >>> pairs = pd.DataFrame({"prompt": ["a", "b"], "chosen": ["good", "fine"], "rejected": ["bad", "poor"]})
    >>> X, y = shuffle_pair_sides(pairs, fraction=0.5, random_state=0)
    >>> sorted(y.tolist()), X.loc[y == 0, "rejected"].isin(["good", "fine"]).all()
    ([0, 1], np.True_)
    """
    import pandas as pd

    from rmkit.utils._validation import as_frame

    df = as_frame(pairs, name="pairs").copy()
    for col in ("chosen", "rejected"):
        if col not in df.columns:
            raise ValueError(f"pairs is missing the column {col!r}.")
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}.")
    n = len(df)
    swap = np.zeros(n, dtype=bool)
    swap[check_random_state(random_state).permutation(n)[: int(round(fraction * n))]] = True
    chosen = df["chosen"].to_numpy(copy=True)
    rejected = df["rejected"].to_numpy(copy=True)
    df["chosen"] = np.where(swap, rejected, chosen)
    df["rejected"] = np.where(swap, chosen, rejected)
    assert isinstance(df, pd.DataFrame)
    return df, (~swap).astype(int)
