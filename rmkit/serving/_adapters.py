"""Reward functions for trainers (TRL's signature) and helpers shared with the server."""

from __future__ import annotations

import math

__all__ = ["as_reward_function", "reward_function", "rows_from_trainer", "find_backbone", "iter_components"]


def iter_components(model, _seen=None):
    """Yield ``model`` and every estimator/module reachable from it.

    Follows ``get_params(deep=False)`` values and fitted attributes (names
    ending in ``_``), through lists, tuples and dicts.
    """
    seen = set() if _seen is None else _seen
    stack = [model]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or obj is None or isinstance(obj, (str, bytes, int, float, bool)):
            continue
        seen.add(id(obj))
        if isinstance(obj, dict):
            stack.extend(obj.values())
            continue
        if isinstance(obj, (list, tuple)):
            stack.extend(obj)
            continue
        if type(obj).__module__.split(".")[0] in ("numpy", "pandas", "torch"):
            continue  # arrays, frames and tensors hold no estimators
        if not (hasattr(obj, "get_params") or hasattr(obj, "predict") or hasattr(obj, "transform")):
            continue
        yield obj
        try:
            stack.extend(obj.get_params(deep=False).values())
        except Exception:  # not a scikit-learn estimator
            pass
        attrs = getattr(obj, "__dict__", {})
        stack.extend(v for k, v in attrs.items() if k.endswith("_") and not k.startswith("_"))
        if isinstance(attrs.get("steps"), list):  # Pipeline steps are (name, estimator) tuples
            stack.extend(step for _, step in attrs["steps"])


def find_backbone(model):
    """Name of the backbone the model's featurizer uses, or ``None``.

    Examples
    --------
    >>> from rmkit import BackboneFeaturizer
    >>> find_backbone(BackboneFeaturizer("rmkit-tiny"))
    'rmkit-tiny'
    """
    for obj in iter_components(model):
        backbone = getattr(obj, "backbone", None)
        if isinstance(backbone, str) and backbone:
            return backbone
    return None


def _message_list(value, what, i):
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise TypeError(f"{what}[{i}] must be a string or a non-empty list of {{role, content}} messages, "
                        f"not {type(value).__name__}.")
    out = []
    for m in value:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise TypeError(f"{what}[{i}] holds {m!r}, not a {{role, content}} message.")
        content = m["content"]
        if isinstance(content, list):  # multimodal-style [{"type": "text", "text": ...}]
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        out.append({"role": m["role"], "content": content})
    return out


def rows_from_trainer(prompts, completions):
    """Turn TRL-style ``prompts``/``completions`` into ``(messages, response)`` pairs.

    A plain-string prompt becomes one user message; a conversational prompt
    (a list of messages) is used as it is. A conversational completion (a list
    of messages) contributes the text of its assistant messages.

    Examples
    --------
    >>> rows_from_trainer(["2+2?"], [" 4"])
    [([{'role': 'user', 'content': '2+2?'}], ' 4')]
    >>> rows_from_trainer([[{"role": "user", "content": "Hi"}]], [[{"role": "assistant", "content": "Hello"}]])
    [([{'role': 'user', 'content': 'Hi'}], 'Hello')]
    """
    if isinstance(prompts, str) or isinstance(completions, str):
        raise TypeError("prompts and completions must be lists (one entry per completion), not strings.")
    prompts, completions = list(prompts), list(completions)
    if len(prompts) != len(completions):
        raise ValueError(f"Got {len(prompts)} prompts but {len(completions)} completions; they must pair up.")
    rows = []
    for i, (p, c) in enumerate(zip(prompts, completions)):
        messages = [{"role": "user", "content": p}] if isinstance(p, str) else _message_list(p, "prompts", i)
        if isinstance(c, str):
            response = c
        else:
            msgs = _message_list(c, "completions", i)
            texts = [m["content"] for m in msgs if m["role"] == "assistant"]
            if not texts:
                raise ValueError(f"completions[{i}] has no assistant message.")
            response = "".join(texts)
        rows.append((messages, response))
    return rows


def reward_function(model, *, name="rmkit_reward", batch_size=None, empty_reward=None):
    """A reward function with TRL's signature, scoring completions with ``model``.

    Parameters
    ----------
    model : fitted rmkit model
        Anything whose ``predict`` takes pointwise rows (``messages`` +
        ``response``) and returns one reward per row.
    name : str, default="rmkit_reward"
        The function's ``__name__``: trainers log rewards under it (TRL:
        ``rewards/<name>/mean``).
    batch_size : int, optional
        Rows per ``predict`` call (default: all rows of a call at once;
        rewards do not depend on it).
    empty_reward : float, optional
        Reward of an empty (or whitespace-only) completion. By default an
        empty completion raises ``ValueError``, as the model cannot score it.

    Returns
    -------
    callable
        ``f(prompts, completions, **kwargs) -> list[float]``; ``prompts`` and
        ``completions`` are plain strings or conversational message lists
        (see :func:`rows_from_trainer`); other keyword arguments (TRL passes
        ``completion_ids``, ``trainer_state`` and the dataset's columns) are
        ignored.

    Examples
    --------
    >>> import numpy as np
    >>> class Length:  # any model with predict(rows) -> one float per row
    ...     def predict(self, X):
    ...         return np.array([len(r) / 10 for r in X["response"]])
    >>> f = reward_function(Length())
    >>> f.__name__, f(prompts=["Say hi", "Say hi"], completions=["hi", "hello there"])
    ('rmkit_reward', [0.2, 1.1])
    """
    if not hasattr(model, "predict"):
        raise TypeError(f"{type(model).__name__} has no predict method; pass a fitted rmkit model.")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be None or a positive integer, got {batch_size!r}.")
    if empty_reward is not None and not math.isfinite(float(empty_reward)):
        raise ValueError(f"empty_reward must be a finite number or None, got {empty_reward!r}.")

    def rmkit_reward(prompts, completions, **kwargs):
        import numpy as np
        import pandas as pd

        rows = rows_from_trainer(prompts, completions)
        out = [None] * len(rows)
        todo = []
        for i, (messages, response) in enumerate(rows):
            if not response.strip():
                if empty_reward is None:
                    raise ValueError(f"completions[{i}] is empty: the reward model cannot score it. Pass "
                                     "empty_reward=<float> to reward_function to give empty completions a reward.")
                out[i] = float(empty_reward)
            else:
                todo.append(i)
        step = batch_size or max(len(todo), 1)
        for start in range(0, len(todo), step):
            idx = todo[start:start + step]
            frame = pd.DataFrame({"messages": [rows[i][0] for i in idx], "response": [rows[i][1] for i in idx]})
            values = np.asarray(model.predict(frame), dtype=float)
            if values.shape != (len(idx),):
                raise ValueError(f"The model returned rewards of shape {values.shape} for {len(idx)} rows; "
                                 "a reward function needs one float per completion.")
            for i, v in zip(idx, values):
                out[i] = float(v)
        return out

    rmkit_reward.__name__ = rmkit_reward.__qualname__ = str(name)
    rmkit_reward.model = model
    return rmkit_reward


def as_reward_function(model, **kwargs):
    """Alias of :func:`reward_function` (``as_reward_function(model)`` reads well at call sites).

    Examples
    --------
    >>> import numpy as np
    >>> class Const:
    ...     def predict(self, X):
    ...         return np.zeros(len(X))
    >>> as_reward_function(Const(), name="const")(["q"], ["a"])
    [0.0]
    """
    return reward_function(model, **kwargs)
