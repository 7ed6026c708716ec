"""Feature frames: DataFrames whose column names say which block each column belongs to.

A column is named ``"{block}:{kind}:{name}"``:

* ``block``: ``response`` (pointwise rows), ``chosen`` / ``rejected``
  (preference pairs), or ``prompt``;
* ``kind``: ``h`` a hidden-state feature, ``r`` an objective reward, ``m``
  metadata (``{side}:m:tokens`` response length in tokens,
  ``prompt:m:group`` the prompt group id);
* ``name``: the feature index or the objective's name.

A scikit-learn ``ColumnTransformer`` prefix (``"step__chosen:h:0"``) is
tolerated. Every rmkit step reads its blocks by name, so a step given the
wrong data refuses with an error that says what it expected.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = ["BLOCKS", "GROUP_COLUMN", "Layout", "column", "is_layout_frame", "make_frame", "read_layout",
           "select_side", "sides_of"]

BLOCKS = ("response", "chosen", "rejected", "prompt")
KINDS = {"h": "hidden-state features", "r": "objective rewards", "m": "metadata"}
GROUP_COLUMN = "prompt:m:group"
_DOCS = "(see rmkit.layout and docs/concepts/composing.md)"


def column(block, kind, name):
    """The column name of one feature.

    Examples
    --------
    >>> column("chosen", "r", "math")
    'chosen:r:math'
    """
    return f"{block}:{kind}:{name}"


def _parse(col):
    if not isinstance(col, str):
        return None
    head, sep, rest = col.partition(":")
    if not sep:
        return None
    block = head.rsplit("__", 1)[-1]
    kind, sep, name = rest.partition(":")
    if block not in BLOCKS or kind not in KINDS or not sep:
        return None
    return block, kind, name


def is_layout_frame(X):
    """Whether ``X`` is a DataFrame with (any) named blocks made by an rmkit step.

    Examples
    --------
    >>> import pandas as pd
    >>> is_layout_frame(pd.DataFrame({"chosen:h:0": [1.0]})), is_layout_frame(pd.DataFrame({"x": [1.0]}))
    (True, False)
    """
    return isinstance(X, pd.DataFrame) and any(_parse(c) is not None for c in X.columns)


def sides_of(kind):
    """The response sides of an input kind.

    Examples
    --------
    >>> sides_of("pairs"), sides_of("pointwise")
    (('chosen', 'rejected'), ('response',))
    """
    return ("chosen", "rejected") if kind == "pairs" else ("response",)


@dataclass(frozen=True)
class Layout:
    """The blocks of a feature frame, read from its column names (see :func:`read_layout`).

    Attributes
    ----------
    kind : {"pairs", "pointwise"}
    columns : dict
        ``{(block, kind): [column names in order]}``.

    Examples
    --------
    >>> import numpy as np
    >>> F = make_frame({("response", "r", ("a", "b")): np.eye(2)})
    >>> lay = read_layout(F, step="demo")
    >>> lay.sides, lay.names("response", "r"), lay.block(F, "response", "r").shape
    (('response',), ['a', 'b'], (2, 2))
    """

    kind: str
    columns: dict

    @property
    def sides(self):
        return sides_of(self.kind)

    def has(self, block, kind):
        return bool(self.columns.get((block, kind)))

    def names(self, block, kind):
        """Feature or objective names of one block, without the prefix."""
        return [c.split(":", 2)[2] for c in self.columns.get((block, kind), [])]

    def block(self, X, block, kind, dtype=np.float32):
        """The values of one block as an array of shape (n_rows, width)."""
        cols = self.columns.get((block, kind), [])
        if not cols:
            return np.empty((len(X), 0), dtype=dtype)
        return X[cols].to_numpy(dtype=dtype)

    def passthrough(self, X, *, kinds=("h", "m"), blocks=("prompt",), meta=True):
        """The columns a step carries through unchanged: the prompt block and all metadata."""
        keep = [c for (b, k), cols in self.columns.items() for c in cols
                if (b in blocks and k in kinds) or (meta and k == "m")]
        return X[keep]


def read_layout(X, *, step, need=(), kind=None):
    """Parse the layout of ``X`` and check that it holds what ``step`` needs.

    Parameters
    ----------
    X : DataFrame
        A feature frame.
    step : str
        The name of the step, for error messages.
    need : iterable of (block, kind)
        Required blocks; ``"side"`` as block means every response side.
    kind : {"pairs", "pointwise"} or None
        Required input kind.

    Examples
    --------
    >>> import numpy as np
    >>> from rmkit.layout import make_frame, read_layout
    >>> F = make_frame({("response", "r", ("a", "b")): np.zeros((3, 2)), ("prompt", "h", range(4)): np.ones((3, 4))})
    >>> lay = read_layout(F, step="demo", need=[("side", "r"), ("prompt", "h")])
    >>> lay.kind, lay.names("response", "r")
    ('pointwise', ['a', 'b'])
    >>> read_layout(np.zeros((3, 6)), step="demo")
    Traceback (most recent call last):
    ...
    TypeError: demo expects a feature frame with named blocks ...
    """
    if not isinstance(X, pd.DataFrame):
        shape = getattr(X, "shape", None)
        raise TypeError(
            f"{step} expects a feature frame with named blocks (the output of BackboneFeaturizer or of an "
            f"objective step), got {type(X).__name__}{'' if shape is None else f' of shape {shape}'}. Data "
            f"between rmkit steps carries its layout in its column names {_DOCS}."
        )
    columns, unknown = {}, []
    for c in X.columns:
        parsed = _parse(c)
        if parsed is None:
            unknown.append(c)
            continue
        columns.setdefault(parsed[:2], []).append(c)
    if unknown:
        raise ValueError(f"{step}: {len(unknown)} column(s) of X are not rmkit feature blocks (e.g. "
                         f"{unknown[:3]}); expected names like 'chosen:h:0' or 'response:r:helpfulness' {_DOCS}.")
    blocks = {b for b, _ in columns}
    pairs, point = {"chosen", "rejected"} & blocks, "response" in blocks
    if pairs and point:
        raise ValueError(f"{step}: X mixes a 'response' block with 'chosen'/'rejected' blocks.")
    if pairs and pairs != {"chosen", "rejected"}:
        raise ValueError(f"{step}: X has a {sorted(pairs)[0]!r} block without its partner; pairs need both "
                         "'chosen' and 'rejected'.")
    got = "pairs" if pairs else "pointwise"
    lay = Layout(got, columns)
    for side in lay.sides[1:]:
        for k in ("h", "r"):
            if lay.names(side, k) != lay.names(lay.sides[0], k):
                raise ValueError(f"{step}: the {KINDS[k]} of '{side}' and '{lay.sides[0]}' differ in names or order.")
    if kind is not None and got != kind:
        want = "preference pairs (chosen/rejected blocks)" if kind == "pairs" else "pointwise rows (a response block)"
        raise ValueError(f"{step} needs {want}; X holds {got}.")
    for block, k in need:
        targets = lay.sides if block == "side" else (block,)
        for b in targets:
            if not lay.has(b, k):
                have = sorted(f"{bb}:{kk}" for bb, kk in columns)
                raise ValueError(f"{step} needs the block '{b}:{k}' ({KINDS[k]}) but X has only {have}. "
                                 f"Check the order of the steps {_DOCS}.")
    return lay


def make_frame(blocks, index=None):
    """Build a feature frame from ``{(block, kind, names): values}`` (values of shape (n, len(names))).

    DataFrames among the values are appended as they are (e.g. pass-through
    columns of the input).

    Examples
    --------
    >>> import numpy as np
    >>> list(make_frame({("chosen", "r", ("a",)): np.zeros(2), ("prompt", "m", ("group",)): np.arange(2)}).columns)
    ['chosen:r:a', 'prompt:m:group']
    """
    parts = []
    for key, values in blocks.items():
        if isinstance(values, pd.DataFrame):
            parts.append(values.set_axis(index, axis=0) if index is not None else values.reset_index(drop=True))
            continue
        block, kind, names = key
        names = [str(n) for n in names]
        values = np.asarray(values)
        if values.ndim == 1:
            values = values[:, None]
        if values.shape[1] != len(names):
            raise ValueError(f"{block}:{kind} has {values.shape[1]} columns for {len(names)} names.")
        parts.append(pd.DataFrame(values, columns=[column(block, kind, n) for n in names], index=index, copy=False))
    # one consolidated block per dtype: the frame then pickles (and hashes, e.g. for Pipeline(memory=...))
    # the same before and after a round trip through a cache
    out = pd.concat(parts, axis=1).copy() if len(parts) > 1 else parts[0]
    if out.columns.duplicated().any():
        dup = out.columns[out.columns.duplicated()][:3].tolist()
        raise ValueError(f"Duplicate feature columns {dup}: two steps emit the same objective or block.")
    return out


def select_side(X, side):
    """The pointwise frame of one side (``"chosen"`` or ``"rejected"``) of a pairs frame.

    The side's blocks become ``response`` blocks; the prompt block and the
    prompt metadata come along, the other side is dropped.

    Examples
    --------
    >>> import numpy as np
    >>> from rmkit.layout import make_frame, select_side
    >>> P = make_frame({("chosen", "h", range(2)): np.ones((1, 2)), ("rejected", "h", range(2)): np.zeros((1, 2)),
    ...                 ("prompt", "h", range(2)): np.full((1, 2), 5.0)})
    >>> list(select_side(P, "rejected").columns)
    ['response:h:0', 'response:h:1', 'prompt:h:0', 'prompt:h:1']
    """
    lay = read_layout(X, step="select_side", kind="pairs")
    if side not in lay.sides:
        raise ValueError(f"side must be 'chosen' or 'rejected', got {side!r}.")
    keep = [c for (b, _), cols in lay.columns.items() if b in (side, "prompt") for c in cols]
    out = X[keep]
    return out.rename(columns={c: "response" + c[len(side):] for c in keep if c.startswith(side + ":")})
