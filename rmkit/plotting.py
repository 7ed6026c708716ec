"""Plots for reward models (needs matplotlib: ``pip install "rmkit[plot]"``).

The functions take plain arrays, dicts and DataFrames (for instance the
output of :meth:`rmkit.GatedScalarizer.explain` or
:func:`rmkit.metrics.rewardbench_scores`) and return the matplotlib Axes
they drew on, so they work with any estimator and compose into larger
figures through their ``ax`` argument. Save a figure with
``ax.figure.savefig("plot.png")`` and free it with
``matplotlib.pyplot.close(ax.figure)``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["plot_best_of_n", "plot_decorrelation", "plot_gating_heatmap", "plot_pair_coefficients",
           "plot_rewardbench"]


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(
            "rmkit.plotting needs matplotlib, which is not installed: pip install 'rmkit[plot]' "
            "(or pip install matplotlib)."
        ) from None
    return plt


def _axes(ax, figsize):
    if ax is not None:
        return ax
    _, ax = _pyplot().subplots(figsize=figsize, layout="constrained")
    return ax


def _finite(values, name):
    a = np.asarray(values, dtype=float)
    if a.size == 0:
        raise ValueError(f"{name} is empty.")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or infinite values.")
    return a


def _named_vector(values, names, what):
    """A 1-D vector and its labels from a dict, a Series or an array (+ ``names``)."""
    if isinstance(values, dict):
        labels, values = list(values), list(values.values())
    elif hasattr(values, "index") and hasattr(values, "to_numpy") and np.ndim(values) == 1:
        labels, values = [str(i) for i in values.index], values.to_numpy()
    else:
        labels = None
    a = _finite(values, what)
    if a.ndim != 1:
        raise ValueError(f"{what} must be one value per objective (1-D), got shape {a.shape}.")
    if names is not None:
        labels = [str(n) for n in names]
    if labels is None:
        labels = [f"objective {i}" for i in range(a.size)]
    if len(labels) != a.size:
        raise ValueError(f"{len(labels)} objective names for {a.size} values in {what}.")
    return a, labels


def plot_gating_heatmap(weights, categories=None, *, objectives=None, ax=None, cmap="viridis", annotate=True):
    """Mean gating weight of each objective per prompt category, as a heatmap.

    Parameters
    ----------
    weights : array-like or DataFrame of shape (n_prompts, n_objectives)
        Gating weights (each row typically sums to 1). DataFrame columns name
        the objectives. With ``categories=None`` the rows are taken as
        already aggregated, one per category (a DataFrame's index names them).
    categories : array-like of shape (n_prompts,), optional
        Category of each prompt; rows are averaged per category.
    objectives : list of str, optional
        Objective names (overrides DataFrame columns).
    ax : matplotlib Axes, optional
    cmap : str, default="viridis"
    annotate : bool, default=True
        Write each mean weight in its cell.

    Returns
    -------
    matplotlib.axes.Axes

    Examples
    --------
    >>> import numpy as np
    >>> w = np.array([[0.9, 0.1], [0.7, 0.3], [0.2, 0.8]])
    >>> ax = plot_gating_heatmap(w, ["math", "math", "chat"], objectives=["correct", "helpful"])
    >>> [t.get_text() for t in ax.get_yticklabels()]
    ['chat', 'math']
    >>> ax.images[0].get_array()[1].tolist()  # math: the mean of its two rows
    [0.8, 0.2]
    """
    import pandas as pd

    if isinstance(weights, pd.DataFrame):
        frame = weights.copy()
    else:
        frame = pd.DataFrame(np.asarray(weights, dtype=float))
    if frame.ndim != 2 or frame.shape[1] == 0:
        raise ValueError(f"weights must be 2-D (prompts x objectives), got shape {frame.shape}.")
    _finite(frame.to_numpy(dtype=float), "weights")
    if objectives is not None:
        if len(objectives) != frame.shape[1]:
            raise ValueError(f"{len(objectives)} objective names for {frame.shape[1]} weight columns.")
        frame.columns = [str(o) for o in objectives]
    if categories is not None:
        categories = np.asarray(categories)
        if categories.shape != (len(frame),):
            raise ValueError(f"categories has {categories.size} entries for {len(frame)} rows of weights.")
        frame = frame.groupby(categories, sort=True).mean()
    values = frame.to_numpy(dtype=float)
    ax = _axes(ax, (1.2 + 0.9 * values.shape[1], 1.0 + 0.45 * values.shape[0]))
    image = ax.imshow(values, cmap=cmap, aspect="auto", vmin=min(0.0, float(values.min())), vmax=max(1e-12, float(values.max())))
    ax.set_xticks(range(values.shape[1]), [str(c) for c in frame.columns], rotation=45, ha="right")
    ax.set_yticks(range(values.shape[0]), [str(i) for i in frame.index])
    ax.set_xlabel("objective")
    ax.set_ylabel("prompt category")
    ax.figure.colorbar(image, ax=ax, label="mean gating weight")
    if annotate:
        mid = values.max() / 2
        for (i, j), v in np.ndenumerate(values):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8, color="black" if v > mid else "white")
    return ax


def plot_pair_coefficients(chosen, rejected=None, *, objectives=None, labels=("chosen", "rejected"), ax=None,
                           title=None):
    """Per-objective coefficients (or contributions) of one pair's two responses, as grouped bars.

    Parameters
    ----------
    chosen : dict, Series or array-like of shape (n_objectives,)
        Values for the chosen response (e.g. a row of the ``coefficients``
        or ``rewards * coefficients`` from an ``explain`` method). Dict keys
        and Series index name the objectives.
    rejected : same as ``chosen``, optional
    objectives : list of str, optional
    labels : tuple of str, default=("chosen", "rejected")
    ax : matplotlib Axes, optional
    title : str, optional

    Returns
    -------
    matplotlib.axes.Axes

    Examples
    --------
    >>> ax = plot_pair_coefficients({"helpful": 0.6, "safe": 0.3, "verbose": -0.1},
    ...                             {"helpful": 0.2, "safe": 0.1, "verbose": 0.4})
    >>> [round(float(p.get_height()), 2) for p in ax.containers[0]]
    [0.6, 0.3, -0.1]
    >>> ax.get_legend_handles_labels()[1]
    ['chosen', 'rejected']
    """
    c, names = _named_vector(chosen, objectives, "chosen")
    series = [(labels[0], c)]
    if rejected is not None:
        r, r_names = _named_vector(rejected, objectives, "rejected")
        if isinstance(chosen, dict) and isinstance(rejected, dict) and objectives is None:
            if set(r_names) != set(names):
                raise ValueError(f"chosen and rejected name different objectives: {names} vs {r_names}.")
            r = np.array([rejected[n] for n in names], dtype=float)
        elif r.size != c.size:
            raise ValueError(f"chosen has {c.size} objectives but rejected has {r.size}.")
        series.append((labels[1], r))
    ax = _axes(ax, (1.5 + 0.8 * len(names), 3.2))
    x = np.arange(len(names))
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=label)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("coefficient")
    if title:
        ax.set_title(title)
    ax.legend()
    return ax


def plot_decorrelation(verbosity, before, after, *, objective="objective", axes=None):
    """Scatter of an objective against verbosity before and after the decorrelating transform.

    Each panel's title gives the Spearman correlation with verbosity, the
    quantity :class:`rmkit.VerbosityDecorrelator` drives below its threshold.

    Parameters
    ----------
    verbosity : array-like of shape (n,)
    before, after : array-like of shape (n,)
        The objective's rewards before and after the transform (a column of
        ``R`` and of ``decorrelator.transform(R)``).
    objective : str, default="objective"
        Name for the axis labels.
    axes : sequence of two matplotlib Axes, optional

    Returns
    -------
    ndarray of two matplotlib Axes

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.RandomState(0)
    >>> v = rng.normal(size=200)
    >>> r = rng.normal(size=200) + v
    >>> axes = plot_decorrelation(v, r, r - 1.0 * v, objective="helpfulness")
    >>> [ax.get_title().split(":")[0] for ax in axes]
    ['before', 'after']
    """
    from scipy.stats import spearmanr

    v = _finite(verbosity, "verbosity").reshape(-1)
    panels = []
    for name, values in (("before", before), ("after", after)):
        a = _finite(values, name).reshape(-1)
        if a.size != v.size:
            raise ValueError(f"{name} has {a.size} values but verbosity has {v.size}.")
        panels.append((name, a))
    if axes is None:
        _, axes = _pyplot().subplots(1, 2, figsize=(8, 3.4), sharex=True, layout="constrained")
    axes = np.asarray(axes).reshape(-1)
    if axes.size != 2:
        raise ValueError(f"axes must hold two Axes, got {axes.size}.")
    for ax, (name, a) in zip(axes, panels):
        rho = spearmanr(a, v).statistic if np.ptp(a) > 0 and np.ptp(v) > 0 else float("nan")
        ax.scatter(v, a, s=6, alpha=0.5)
        ax.set_title(f"{name}: Spearman ρ = {rho:.3f}")
        ax.set_xlabel("verbosity")
        ax.set_ylabel(objective)
    return axes


def _model_scores(name, entry):
    if isinstance(entry, dict) and "sections" in entry:  # rewardbench_scores() output
        values = dict(entry["sections"])
        errors = dict(entry.get("section_stderr") or {})
        if "overall" in entry and np.isfinite(entry["overall"]):
            values["Overall"] = entry["overall"]
            if "overall_stderr" in entry:
                errors["Overall"] = entry["overall_stderr"]
        return values, errors
    if isinstance(entry, dict):
        return dict(entry), {}
    if hasattr(entry, "to_dict"):
        return entry.to_dict(), {}
    raise TypeError(f"Scores of {name!r} must be a dict of section -> score or a rewardbench_scores() result, "
                    f"not {type(entry).__name__}.")


def plot_rewardbench(scores, *, sections=None, ax=None, errorbars=True):
    """RewardBench section scores of several models, as grouped bars.

    Parameters
    ----------
    scores : dict or DataFrame
        ``{model name: {section: score}}``, ``{model name:
        rewardbench_scores(...)}`` (then ``Overall`` and standard errors are
        shown too), or a DataFrame with one row per model and one column per
        section.
    sections : list of str, optional
        Sections to show, in order (default: all, in first-seen order).
    ax : matplotlib Axes, optional
    errorbars : bool, default=True
        Draw ±1 standard error where the scores carry one.

    Returns
    -------
    matplotlib.axes.Axes

    Examples
    --------
    >>> ax = plot_rewardbench({"ArmoRM": {"Chat": 0.9, "Safety": 0.7},
    ...                        "DMoERM": {"Chat": 0.8, "Safety": 0.75}})
    >>> [t.get_text() for t in ax.get_xticklabels()]
    ['Chat', 'Safety']
    >>> [round(float(b.get_height()), 2) for b in ax.containers[1]]
    [0.8, 0.75]
    """
    import pandas as pd

    if isinstance(scores, pd.DataFrame):
        scores = {str(i): row.dropna().to_dict() for i, row in scores.iterrows()}
    if not isinstance(scores, dict) or not scores:
        raise ValueError("scores must be a non-empty dict {model: scores} or a DataFrame (models x sections).")
    models = {str(name): _model_scores(name, entry) for name, entry in scores.items()}
    if sections is None:
        sections = []
        for values, _ in models.values():
            sections += [s for s in values if s not in sections]
    if not sections:
        raise ValueError("No sections to plot.")
    ax = _axes(ax, (1.5 + 0.6 * len(sections) * max(1, len(models)) ** 0.5, 3.4))
    x = np.arange(len(sections))
    width = 0.8 / len(models)
    for i, (name, (values, errors)) in enumerate(models.items()):
        heights = np.array([float(values.get(s, np.nan)) for s in sections])
        err = np.array([float(errors.get(s, np.nan)) for s in sections]) if errorbars and errors else None
        ax.bar(x + (i - (len(models) - 1) / 2) * width, heights, width, label=name,
               yerr=None if err is None or np.isnan(err).all() else np.nan_to_num(err), capsize=2)
    ax.set_xticks(x, sections)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.0)
    ax.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")  # chance on pairs
    ax.legend(fontsize=8)
    return ax


def plot_best_of_n(results, *, x="n", ax=None, intervals=True, baseline=True):
    """Gold score of the best-of-N pick per reward model: gold@N or gold vs KL_bon.

    The over-optimisation picture (Gao et al. 2022): a reward model that
    tracks the gold rises with N; one that is exploited rises, then falls.

    Parameters
    ----------
    results : dict
        ``{model name: rmkit.evaluation.best_of_n(...) result}`` (DataFrames
        with ``n``, ``kl_bon``, ``gold`` and optionally ``gold_low`` /
        ``gold_high``) or ``{name: {"n": [...], "kl_bon": [...], "gold": [...]}}``.
    x : {"n", "kl_bon"}, default="n"
        ``"n"``: N on a log2 axis; ``"kl_bon"``: KL_bon = log N - (N - 1)/N.
    ax : matplotlib Axes, optional
    intervals : bool, default=True
        Shade the bootstrap interval where the results carry one.
    baseline : bool, default=True
        A dashed line at the first model's gold@1 (random choice).

    Returns
    -------
    matplotlib.axes.Axes

    Examples
    --------
    >>> ax = plot_best_of_n({"probe": {"n": [1, 2, 4], "kl_bon": [0, 0.19, 0.64], "gold": [0.3, 0.35, 0.33]},
    ...                      "ensemble": {"n": [1, 2, 4], "kl_bon": [0, 0.19, 0.64], "gold": [0.3, 0.36, 0.4]}},
    ...                     x="kl_bon")
    >>> [line.get_label() for line in ax.get_lines()][:2], ax.get_xlabel()
    (['probe', 'ensemble'], 'KL_bon = log N - (N-1)/N (nats)')
    >>> [round(float(v), 2) for v in ax.get_lines()[1].get_ydata()]
    [0.3, 0.36, 0.4]
    """
    import pandas as pd

    if x not in ("n", "kl_bon"):
        raise ValueError(f"x must be 'n' or 'kl_bon', got {x!r}.")
    if not isinstance(results, dict) or not results:
        raise ValueError("results must be a non-empty dict {model name: best_of_n result}.")
    ax = _axes(ax, (5.5, 3.6))
    first = None
    for name, res in results.items():
        df = res if isinstance(res, pd.DataFrame) else pd.DataFrame(res)
        for col in (x, "gold"):
            if col not in df.columns:
                raise ValueError(f"results[{name!r}] has no column {col!r}.")
        xs, ys = _finite(df[x], f"results[{name!r}][{x!r}]"), _finite(df["gold"], f"results[{name!r}]['gold']")
        (line,) = ax.plot(xs, ys, marker="o", markersize=3, label=str(name))
        if intervals and {"gold_low", "gold_high"} <= set(df.columns):
            ax.fill_between(xs, df["gold_low"].to_numpy(float), df["gold_high"].to_numpy(float),
                            color=line.get_color(), alpha=0.12, linewidth=0)
        if first is None:
            first = ys[0]
    if baseline and first is not None:
        ax.axhline(first, color="grey", linewidth=0.8, linestyle="--")
    if x == "n":
        ax.set_xscale("log", base=2)
        ax.set_xlabel("N (candidates drawn)")
    else:
        ax.set_xlabel("KL_bon = log N - (N-1)/N (nats)")
    ax.set_ylabel("gold score of the pick")
    ax.legend(fontsize=8)
    return ax
