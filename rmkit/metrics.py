"""Metrics for reward models: pairwise accuracy and RewardBench-style scores.

RewardBench (Lambert et al. 2024) scores a reward model by the share of pairs
where the chosen response scores strictly higher than the rejected one (ties
count as wrong). Subsets are grouped into sections; a section's score is the
example-weighted mean of its subsets' accuracies, and the overall score is
``(2·Chat + 2·Chat Hard + 2·Safety + 2·Reasoning + 1·Prior) / 9`` over the
sections present.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = [
    "SECTION_WEIGHTS",
    "pairwise_accuracy",
    "pairwise_scorer",
    "rewardbench_report",
    "rewardbench_scores",
]

SECTION_WEIGHTS = {"Chat": 2.0, "Chat Hard": 2.0, "Safety": 2.0, "Reasoning": 2.0, "Prior": 1.0}


def _scores(a, name):
    a = np.asarray(a, dtype=float).reshape(-1)
    if np.isnan(a).any():
        raise ValueError(f"{name} contains NaN scores.")
    return a


def pairwise_accuracy(chosen_scores, rejected_scores):
    """Share of pairs where the chosen response scores strictly higher.

    Examples
    --------
    >>> pairwise_accuracy([2.0, 1.0, 0.5], [1.0, 1.0, 0.7])  # the tie counts as wrong
    0.3333333333333333
    """
    c, r = _scores(chosen_scores, "chosen_scores"), _scores(rejected_scores, "rejected_scores")
    if c.shape != r.shape:
        raise ValueError(f"chosen_scores and rejected_scores differ in length: {c.size} vs {r.size}.")
    if c.size == 0:
        raise ValueError("No pairs to score.")
    return float(np.mean(c > r))


def _correct(eval_df, chosen_scores, rejected_scores):
    c, r = _scores(chosen_scores, "chosen_scores"), _scores(rejected_scores, "rejected_scores")
    if not (len(eval_df) == c.size == r.size):
        raise ValueError(f"Lengths differ: {len(eval_df)} rows, {c.size} chosen and {r.size} rejected scores.")
    for col in ("subset", "category"):
        if col not in eval_df.columns:
            raise ValueError(f"The evaluation data is missing the column '{col}'.")
    return (c > r).astype(float)


def rewardbench_report(eval_df, chosen_scores, rejected_scores):
    """Per-subset accuracy with its standard error and count.

    Returns
    -------
    DataFrame with columns ``category, subset, n, accuracy, stderr``.

    Examples
    --------
    >>> import pandas as pd
    >>> df = pd.DataFrame({"category": ["Chat"] * 4, "subset": ["a", "a", "b", "b"]})
    >>> rewardbench_report(df, [1, 1, 0, 1], [0, 0, 1, 1])[["subset", "n", "accuracy"]]
      subset  n  accuracy
    0      a  2       1.0
    1      b  2       0.0
    """
    correct = _correct(eval_df, chosen_scores, rejected_scores)
    df = pd.DataFrame({"category": eval_df["category"].to_numpy(), "subset": eval_df["subset"].to_numpy(),
                       "correct": correct})
    g = df.groupby(["category", "subset"], sort=True)["correct"]
    out = g.agg(n="size", accuracy="mean").reset_index()
    out["stderr"] = np.sqrt(out["accuracy"] * (1 - out["accuracy"]) / out["n"])
    return out


def rewardbench_scores(eval_df, chosen_scores, rejected_scores):
    """RewardBench-style section and overall scores.

    Parameters
    ----------
    eval_df : DataFrame
        Pairs with ``subset`` and ``category`` columns (RewardBench shape).
    chosen_scores, rejected_scores : array-like of shape (n,)

    Returns
    -------
    dict
        ``sections`` (section -> score), ``section_stderr``, ``overall``,
        ``overall_stderr``, ``subsets`` (subset -> accuracy), ``missing_sections``
        (weighted sections absent from the data, left out of ``overall``) and
        ``other_sections`` (present but outside the weighted five, e.g. "Extra":
        reported, not in ``overall``).

    Examples
    --------
    >>> import pandas as pd
    >>> df = pd.DataFrame({"category": ["Chat", "Chat", "Safety"], "subset": ["a", "b", "c"]})
    >>> s = rewardbench_scores(df, [1, 0, 1], [0, 1, 0])
    >>> s["sections"], round(s["overall"], 3), s["missing_sections"]
    ({'Chat': 0.5, 'Safety': 1.0}, 0.75, ['Chat Hard', 'Reasoning', 'Prior'])
    """
    report = rewardbench_report(eval_df, chosen_scores, rejected_scores)
    sections, errors = {}, {}
    for cat, part in report.groupby("category", sort=False):
        n = part["n"].sum()
        acc = float((part["accuracy"] * part["n"]).sum() / n)
        sections[cat] = acc
        # example-weighted mean of independent subset means
        errors[cat] = float(np.sqrt(((part["n"] / n) ** 2 * part["stderr"] ** 2).sum()))
    weighted = {k: v for k, v in sections.items() if k in SECTION_WEIGHTS}
    ordered = {k: weighted[k] for k in SECTION_WEIGHTS if k in weighted}
    ordered.update({k: v for k, v in sections.items() if k not in SECTION_WEIGHTS})
    total_w = sum(SECTION_WEIGHTS[k] for k in weighted)
    overall = sum(SECTION_WEIGHTS[k] * v for k, v in weighted.items()) / total_w if total_w else float("nan")
    overall_se = (np.sqrt(sum((SECTION_WEIGHTS[k] / total_w) ** 2 * errors[k] ** 2 for k in weighted))
                  if total_w else float("nan"))
    return {
        "overall": float(overall),
        "overall_stderr": float(overall_se),
        "sections": ordered,
        "section_stderr": {k: errors[k] for k in ordered},
        "subsets": dict(zip(report["subset"], report["accuracy"].astype(float))),
        "missing_sections": [k for k in SECTION_WEIGHTS if k not in sections],
        "other_sections": [k for k in sections if k not in SECTION_WEIGHTS],
    }


def pairwise_scorer(estimator, X, y=None):
    """Scorer for ``GridSearchCV`` / ``cross_val_score`` on preference pairs.

    ``estimator.predict(X)`` on pairs returns P(chosen ≻ rejected); the score
    is the share of pairs above 0.5 (ties count as wrong). ``y`` is ignored.

    Examples
    --------
    >>> import numpy as np
    >>> class Fixed:
    ...     def predict(self, X):
    ...         return np.array([0.9, 0.5, 0.2])
    >>> pairwise_scorer(Fixed(), None)
    0.3333333333333333
    """
    p = np.asarray(estimator.predict(X), dtype=float).reshape(-1)
    if np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise ValueError("pairwise_scorer expects predict() on pairs to return P(chosen > rejected) in [0, 1].")
    return float(np.mean(p > 0.5))
