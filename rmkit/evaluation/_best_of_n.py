"""Best-of-N sampling against a proxy reward, scored by a gold reward."""

from __future__ import annotations

import numbers

import numpy as np
import pandas as pd
from sklearn.utils import check_random_state

__all__ = ["best_of_n", "kl_bon"]


def kl_bon(n):
    """KL divergence of best-of-N sampling from the base policy: ``log N - (N - 1) / N``.

    Examples
    --------
    >>> [round(float(k), 3) for k in kl_bon([1, 2, 16])]
    [0.0, 0.193, 1.835]
    """
    n = np.asarray(n, dtype=np.float64)
    if np.any(n < 1):
        raise ValueError("N must be at least 1.")
    return np.log(n) - (n - 1) / n


def _proxy_scores(scores_or_scorer, data):
    """Proxy rewards of the candidate rows of ``data``."""
    if isinstance(scores_or_scorer, str):
        if scores_or_scorer not in data.columns:
            raise ValueError(f"No column {scores_or_scorer!r} in data to use as proxy scores.")
        s = data[scores_or_scorer].to_numpy()
    elif hasattr(scores_or_scorer, "predict"):
        cols = [c for c in ("prompt", "messages", "response") if c in data.columns]
        if "response" not in cols:
            raise ValueError("Scoring with a model needs a 'response' column (and 'prompt' or 'messages') in data.")
        s = scores_or_scorer.predict(data[cols].reset_index(drop=True))
    elif callable(scores_or_scorer):
        s = scores_or_scorer(data.reset_index(drop=True))
    else:
        s = scores_or_scorer
    s = np.asarray(s, dtype=np.float64)
    if s.ndim == 2 and s.shape[1] == 1:
        s = s[:, 0]
    if s.shape != (len(data),):
        raise ValueError(f"The proxy gives {s.shape} scores for {len(data)} candidates; expected one per candidate.")
    if not np.all(np.isfinite(s)):
        raise ValueError("The proxy scores contain NaN or infinite values.")
    return s


def _pick_gold(proxy, gold, n, n_draws, replace, rng):
    """Mean gold of the best-of-n pick over ``n_draws`` draws from one prompt's candidates."""
    m = len(proxy)
    if replace:
        idx = rng.randint(m, size=(n_draws, n))
    else:
        idx = np.argsort(rng.rand(n_draws, m), axis=1)[:, :n]
    s = proxy[idx]
    top = s == s.max(axis=1, keepdims=True)  # ties for the top: the expected gold of a random tie-break
    return float(np.mean((gold[idx] * top).sum(1) / top.sum(1)))


def best_of_n(scores_or_scorer, data, *, gold="gold", group=None, n_values=(1, 2, 4, 8, 16), n_draws=200,
              replace=True, n_boot=1000, confidence=0.95, random_state=None):
    """Gold score of the best-of-N pick by a proxy reward, against N and KL_bon.

    For every prompt, N candidates are drawn at random (``n_draws`` times,
    seeded) from that prompt's candidates; the one with the highest proxy
    reward is picked (ties for the top: the mean gold of the tied, i.e. a
    random tie-break in expectation) and its gold score recorded. The curve
    is the mean over prompts of each prompt's mean picked gold; its interval
    is a percentile bootstrap over prompts (prompts resampled with
    replacement, ``n_boot`` times), and so is the interval of the gain
    ``gold@N - gold@1`` (paired: the same resampled prompts for both).

    A proxy that tracks the gold gives a rising curve; a proxy of pure noise
    a flat one; a proxy that rewards something the gold penalises (say,
    length) a falling one: over-optimisation (Gao et al. 2022).

    Parameters
    ----------
    scores_or_scorer : array-like, str, callable or fitted model
        The proxy reward of each candidate: an array aligned with ``data``;
        the name of a column of ``data``; a callable ``f(candidates) ->
        scores``; or a fitted reward model whose ``predict`` on the pointwise
        rows (``prompt``/``messages`` + ``response``) returns one reward per
        row. Callables and models only see the candidates kept for drawing.
    data : DataFrame
        One row per candidate response, with the gold column and a prompt
        identifier.
    gold : str, default="gold"
        Column holding the gold score. **Candidates whose gold is missing
        (NaN) are excluded from the draws** (and not scored); the number left
        out is reported as ``result.attrs["n_excluded"]``.
    group : str or None, default=None
        Column identifying the prompt; ``None`` uses ``prompt_id`` when
        present, else a hash of the normalised ``prompt``/``messages``
        (:func:`rmkit.model_selection.prompt_groups`).
    n_values : sequence of int, default=(1, 2, 4, 8, 16)
    n_draws : int, default=200
        Random draws of N candidates per prompt and N.
    replace : bool, default=True
        Draw with replacement, so N may exceed a prompt's number of
        candidates (the usual estimator when the pool is small). With
        ``False`` every N must be at most the smallest pool.
    n_boot : int, default=1000
        Bootstrap resamples of the prompts (0 skips the intervals).
    confidence : float, default=0.95
    random_state : int, RandomState or None, default=None

    Returns
    -------
    DataFrame
        One row per N: ``n, kl_bon, gold, gold_low, gold_high, gain,
        gain_low, gain_high`` (``gain`` relative to N = 1 or, without it, to
        the smallest N). ``attrs`` holds ``n_prompts``, ``n_candidates``,
        ``n_excluded``, ``gold``, ``per_prompt`` (prompts x N matrix of mean
        picked gold) and ``prompts``.

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> rng = np.random.default_rng(0)
    >>> data = pd.DataFrame({"prompt_id": np.repeat(np.arange(30), 8), "gold": rng.normal(size=240)})
    >>> res = best_of_n("gold", data, n_values=(1, 4, 16), n_draws=50, random_state=0)  # proxy == gold
    >>> bool(res["gold"].is_monotonic_increasing), res["n"].tolist()
    (True, [1, 4, 16])
    """
    if not isinstance(data, pd.DataFrame):
        data = pd.DataFrame(data)
    if gold not in data.columns:
        raise ValueError(f"data has no gold column {gold!r}; it has {list(data.columns)}.")
    n_values = [int(n) for n in n_values]
    if not n_values or min(n_values) < 1:
        raise ValueError("n_values must be a non-empty sequence of integers >= 1.")
    for name, value, low in (("n_draws", n_draws, 1), ("n_boot", n_boot, 0)):
        if not isinstance(value, numbers.Integral) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}.")
    g = pd.to_numeric(data[gold], errors="coerce").to_numpy(dtype=np.float64)
    keep = np.isfinite(g)
    if isinstance(scores_or_scorer, (np.ndarray, list, tuple, pd.Series)):
        full = np.asarray(scores_or_scorer, dtype=np.float64)
        if full.shape[0] != len(data):
            raise ValueError(f"{full.shape[0]} proxy scores for {len(data)} candidates.")
        scores_or_scorer = full[keep]
    cand = data[keep].reset_index(drop=True)
    if len(cand) == 0:
        raise ValueError(f"No candidate carries a gold score in column {gold!r}.")
    if group is None:
        if "prompt_id" in cand.columns:
            keys = cand["prompt_id"].to_numpy()
        else:
            from rmkit.model_selection import prompt_groups

            keys = prompt_groups(cand)
    else:
        if group not in cand.columns:
            raise ValueError(f"data has no group column {group!r}.")
        keys = cand[group].to_numpy()
    proxy = _proxy_scores(scores_or_scorer, cand)
    gold_v = g[keep]
    prompts, inverse = np.unique(keys, return_inverse=True)
    pools = [np.flatnonzero(inverse == p) for p in range(len(prompts))]
    if not replace and max(n_values) > min(len(p) for p in pools):
        raise ValueError(f"replace=False needs every N <= the smallest pool ({min(len(p) for p in pools)} "
                         f"candidates); got N = {max(n_values)}.")
    rng = check_random_state(random_state)
    per_prompt = np.array([[_pick_gold(proxy[p], gold_v[p], n, n_draws, replace, rng) for n in n_values]
                           for p in pools])
    curve = per_prompt.mean(0)
    base = n_values.index(1) if 1 in n_values else int(np.argmin(n_values))
    gain = curve - curve[base]
    out = pd.DataFrame({"n": n_values, "kl_bon": kl_bon(n_values), "gold": curve})
    alpha = (1 - confidence) / 2
    if n_boot:
        boot = rng.randint(len(pools), size=(n_boot, len(pools)))
        curves = per_prompt[boot].mean(1)  # (n_boot, len(n_values))
        gains = curves - curves[:, [base]]
        out["gold_low"], out["gold_high"] = np.quantile(curves, [alpha, 1 - alpha], axis=0)
        out["gain"] = gain
        out["gain_low"], out["gain_high"] = np.quantile(gains, [alpha, 1 - alpha], axis=0)
    else:
        out["gain"] = gain
    out.attrs.update(n_prompts=len(pools), n_candidates=int(keep.sum()), n_excluded=int((~keep).sum()), gold=gold,
                     per_prompt=per_prompt, prompts=prompts)
    return out
