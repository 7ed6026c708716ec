"""Prompt groups: a stable id per distinct (normalised) prompt or conversation."""

from __future__ import annotations

import hashlib
import json
import unicodedata

import numpy as np

__all__ = ["prompt_groups", "normalise_text", "GROUP_BITS"]

GROUP_BITS = 53  # ids fit a float64 exactly, so they can travel as a column of a feature frame


def normalise_text(text):
    """Unicode NFKC, case-folded, whitespace collapsed: prompts that differ only in these are one prompt.

    Examples
    --------
    >>> normalise_text("  What is\\n2+2? ") == normalise_text("what is 2+2?")
    True
    """
    return " ".join(unicodedata.normalize("NFKC", str(text)).casefold().split())


def _conversation_key(conversation):
    turns = [(m["role"], normalise_text(m["content"])) for m in conversation if m["role"] != "system"]
    return json.dumps(turns, ensure_ascii=False, separators=(",", ":"))


def group_ids_of_conversations(conversations):
    """One integer id (< 2**53) per conversation; equal prompts get equal ids."""
    out = np.empty(len(conversations), dtype=np.int64)
    for i, conv in enumerate(conversations):
        digest = hashlib.blake2b(_conversation_key(conv).encode("utf-8", "surrogatepass"), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "little") & ((1 << GROUP_BITS) - 1)
    return out


def prompt_groups(X):
    """Prompt group of every row of ``X``: rows that share a prompt share a group.

    ``X`` may be text (a DataFrame or list of dicts with ``prompt`` or
    ``messages``; the system turn is ignored, and the prompt is normalised by
    :func:`normalise_text`) or a feature frame made by an rmkit step (its
    ``prompt:m:group`` column, written by :class:`~rmkit.BackboneFeaturizer`).
    Plain arrays and frames without that column have no prompts: each row is
    its own group.

    Returns
    -------
    ndarray of int64, shape (n_rows,)
        Stable ids: the same prompt gets the same id in every process.

    Examples
    --------
    >>> from rmkit.model_selection import prompt_groups
    >>> g = prompt_groups([{"prompt": "Hi!", "response": "a"}, {"prompt": " hi! ", "response": "b"},
    ...                    {"prompt": "Bye", "response": "c"}])
    >>> bool(g[0] == g[1]), bool(g[0] == g[2])
    (True, False)
    """
    import pandas as pd

    from rmkit.layout import GROUP_COLUMN, is_layout_frame

    if is_layout_frame(X):
        if GROUP_COLUMN not in X.columns:  # a hand-made frame: like an array, each row its own prompt
            return np.arange(len(X), dtype=np.int64)
        return X[GROUP_COLUMN].to_numpy().astype(np.int64)
    if isinstance(X, (pd.DataFrame, list, tuple, dict)):
        from rmkit.utils._validation import as_frame, conversations_of

        df = as_frame(X)
        if "prompt" in df.columns or "messages" in df.columns:
            return group_ids_of_conversations(conversations_of(df))
        if isinstance(X, pd.DataFrame) and not any(isinstance(c, str) for c in df.columns):
            return np.arange(len(df), dtype=np.int64)
        raise ValueError(f"Cannot tell the prompts of X: it has no 'prompt' or 'messages' column "
                         f"(columns: {list(df.columns)[:8]}).")
    return np.arange(len(X), dtype=np.int64)
