"""The input model shared by every rmkit estimator.

Pointwise rows carry ``prompt`` + ``response``; preference pairs carry
``prompt`` + ``chosen`` + ``rejected``. A ``messages`` column (a list of
``{"role", "content"}`` dicts ending with a user turn) may replace ``prompt``
for multi-turn conversations. Input may be a pandas DataFrame, a list of
dicts or a dict of lists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = ["as_frame", "infer_kind", "PairData", "PointwiseData", "read_pointwise", "read_pairs"]

_ROLES = ("system", "user", "assistant")


def _find_surrogate(data):
    """``(row, column, char)`` of the first lone surrogate in records or columns, else ``None``."""
    records = data if isinstance(data, (list, tuple)) else None
    if records is None:
        cols = {k: (v if isinstance(v, (list, tuple, np.ndarray, pd.Series)) else [v]) for k, v in data.items()}
        records = [dict(zip(cols, vals)) for vals in zip(*cols.values())]
    for i, rec in enumerate(records):
        for col, value in (rec.items() if isinstance(rec, dict) else []):
            stack = [value]
            while stack:
                v = stack.pop()
                if isinstance(v, str):
                    try:
                        v.encode("utf-8")
                    except UnicodeEncodeError as exc:
                        return i, col, exc.start, v[exc.start]
                elif isinstance(v, dict):
                    stack.extend(v.values())
                elif isinstance(v, (list, tuple)):
                    stack.extend(v)
    return None


def frame(data, *, name="X"):
    """``pd.DataFrame(data)`` with a clear error for text that is not valid Unicode."""
    try:
        return pd.DataFrame(data)
    except UnicodeEncodeError:
        hit = _find_surrogate(data)
        if hit is None:
            raise
        row, col, pos, ch = hit
        raise ValueError(
            f"{name}: column {col!r} at row {row} is not valid Unicode: a lone surrogate {ch!r} at character "
            f"{pos} (often a broken JSON \\ud83d-style escape or a mis-decoded file)."
        ) from None


def as_frame(X, *, name="X"):
    """Return ``X`` as a DataFrame without copying a DataFrame input."""
    if isinstance(X, pd.DataFrame):
        return X
    if isinstance(X, dict):
        return frame(X, name=name)
    if isinstance(X, (list, tuple)):
        if len(X) == 0:
            raise ValueError(f"{name} is empty: expected at least one row.")
        if not all(isinstance(r, dict) for r in X):
            raise TypeError(
                f"{name} must be a DataFrame, a list of dicts or a dict of lists; "
                f"got a list containing {type(next(r for r in X if not isinstance(r, dict))).__name__}."
            )
        return frame(list(X), name=name)
    if isinstance(X, np.ndarray):
        raise TypeError(
            f"{name} is a numpy array, but this step needs text: pass a DataFrame with "
            "'prompt' (or 'messages') and 'response', or 'prompt', 'chosen' and 'rejected'."
        )
    raise TypeError(f"{name} must be a DataFrame, a list of dicts or a dict of lists, not {type(X).__name__}.")


def infer_kind(df):
    """Return ``"pairs"`` when ``df`` holds chosen/rejected columns, else ``"pointwise"``."""
    has_pair = "chosen" in df.columns or "rejected" in df.columns
    if has_pair and "response" in df.columns:
        raise ValueError(
            "X has both 'response' and 'chosen'/'rejected' columns: pass pointwise rows "
            "and preference pairs separately."
        )
    return "pairs" if has_pair else "pointwise"


def _check_text(values, column):
    for i, v in enumerate(values):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            raise ValueError(f"Column '{column}' has a missing value (None/NaN) at row {i}.")
        if not isinstance(v, str):
            raise TypeError(f"Column '{column}' must hold strings; row {i} is {type(v).__name__}.")
        if not v.strip():
            raise ValueError(f"Column '{column}' has an empty text at row {i}.")
        _check_unicode(v, f"Column '{column}' at row {i}")
    return list(values)


def _check_unicode(text, where):
    """Refuse lone surrogates (text that no encoder, hence no tokenizer, can take)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"{where} is not valid Unicode: a lone surrogate {text[exc.start]!r} at character {exc.start} "
            "(often a broken JSON \\ud83d-style escape or a mis-decoded file)."
        ) from None


def check_labels(values, column):
    """Refuse a label column that mixes types whose text looks the same (``1`` and ``"1"``).

    Such labels sort and compare inconsistently (scikit-learn's encoders fail
    with an obscure ``TypeError``), and almost always come from a file read
    with different type inference in different places.

    Examples
    --------
    >>> check_labels(["math", "code", "math"], "task")
    ['math', 'code', 'math']
    >>> check_labels([1, "1"], "task")
    Traceback (most recent call last):
    ...
    ValueError: Column 'task' mixes label types int and str that print alike (1 and '1'): use one type for all labels.
    """
    values = list(values)
    seen = {}
    for v in values:
        key = str(v)
        other = seen.setdefault(key, v)
        if type(other) is not type(v) and other != v:
            raise ValueError(
                f"Column '{column}' mixes label types {type(other).__name__} and {type(v).__name__} that print "
                f"alike ({other!r} and {v!r}): use one type for all labels."
            )
    return values


def _check_messages(values):
    out = []
    for i, msgs in enumerate(values):
        if isinstance(msgs, np.ndarray):
            msgs = list(msgs)
        if not isinstance(msgs, (list, tuple)) or len(msgs) == 0:
            raise ValueError(f"Column 'messages' must hold a non-empty list of {{role, content}} dicts; row {i} does not.")
        clean = []
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"messages[{j}] at row {i} must be a dict with 'role' and 'content'.")
            role, content = m["role"], m["content"]
            if role not in _ROLES:
                raise ValueError(f"messages[{j}] at row {i} has unknown role {role!r}; expected one of {_ROLES}.")
            if role == "system" and j != 0:
                raise ValueError(f"Wrong role order at row {i}: a 'system' message may only come first (found at {j}).")
            if not isinstance(content, str) or not content.strip():
                raise ValueError(f"messages[{j}] at row {i} has empty or non-string content.")
            _check_unicode(content, f"messages[{j}] at row {i}")
            clean.append({"role": role, "content": content})
        turns = [m["role"] for m in clean if m["role"] != "system"]
        if not turns or turns[-1] != "user":
            raise ValueError(f"Wrong role order at row {i}: the conversation must end with a 'user' turn.")
        for a, b in zip(turns, turns[1:]):
            if a == b:
                raise ValueError(f"Wrong role order at row {i}: two '{a}' turns in a row; user and assistant must alternate.")
        if turns[0] != "user":
            raise ValueError(f"Wrong role order at row {i}: the first turn after 'system' must be 'user'.")
        out.append(clean)
    return out


def conversations_of(df):
    if "messages" in df.columns:
        if "prompt" in df.columns:
            raise ValueError("X has both 'prompt' and 'messages' columns: give one of them.")
        return _check_messages(df["messages"].tolist())
    if "prompt" not in df.columns:
        raise ValueError(f"X is missing the column 'prompt' (or 'messages'); it has {list(df.columns)}.")
    return [[{"role": "user", "content": p}] for p in _check_text(df["prompt"].tolist(), "prompt")]


@dataclass
class PointwiseData:
    """Validated pointwise rows: one conversation and one response per row."""

    conversations: list
    responses: list

    def __len__(self):
        return len(self.responses)


@dataclass
class PairData:
    """Validated preference pairs: one conversation and two responses per row."""

    conversations: list
    chosen: list
    rejected: list

    def __len__(self):
        return len(self.chosen)


def require_rows(df, name):
    if len(df) == 0:
        raise ValueError(f"{name} is empty: expected at least one row.")


def read_pointwise(X, *, name="X"):
    """Validate pointwise input and return :class:`PointwiseData`."""
    df = as_frame(X, name=name)
    require_rows(df, name)
    if infer_kind(df) == "pairs":
        raise ValueError(f"{name} holds preference pairs ('chosen'/'rejected') where pointwise rows ('response') are expected.")
    if "response" not in df.columns:
        raise ValueError(f"{name} is missing the column 'response'; it has {list(df.columns)}.")
    return PointwiseData(conversations_of(df), _check_text(df["response"].tolist(), "response"))


def read_pairs(X, *, name="X", allow_identical=False):
    """Validate preference pairs and return :class:`PairData`."""
    df = as_frame(X, name=name)
    require_rows(df, name)
    for col in ("chosen", "rejected"):
        if col not in df.columns:
            raise ValueError(f"{name} is missing the column '{col}'; preference pairs need 'chosen' and 'rejected'.")
    convs = conversations_of(df)
    chosen = _check_text(df["chosen"].tolist(), "chosen")
    rejected = _check_text(df["rejected"].tolist(), "rejected")
    if not allow_identical:
        same = [i for i, (c, r) in enumerate(zip(chosen, rejected)) if c == r]
        if same:
            raise ValueError(
                f"{len(same)} pair(s) have identical chosen and rejected texts (first at row {same[0]}): "
                "such pairs carry no preference."
            )
    return PairData(convs, chosen, rejected)


def read_texts(X, *, name="X"):
    """Validate either kind of input; returns ``(kind, data)``."""
    df = as_frame(X, name=name)
    require_rows(df, name)
    if infer_kind(df) == "pairs":
        return "pairs", read_pairs(df, name=name, allow_identical=True)
    return "pointwise", read_pointwise(df, name=name)
