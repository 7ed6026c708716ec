"""The save format's constants and the errors loading raises."""

from __future__ import annotations

FORMAT = "rmkit.save"


FORMAT_VERSION = 1


MANIFEST = "rmkit.json"


TENSORS = "tensors.safetensors"


class PersistenceError(ValueError):
    """A model cannot be saved, or a saved directory cannot be loaded safely.

    The more specific :class:`UnsafeClassError`, :class:`IntegrityError` and
    :class:`BackboneMismatchError` derive from it.

    Examples
    --------
    >>> import tempfile, rmkit
    >>> try:
    ...     rmkit.load(tempfile.mkdtemp())
    ... except rmkit.PersistenceError as exc:
    ...     print("refused:", str(exc).split(": ")[-1])
    refused: it has no rmkit.json.
    """


class UnsafeClassError(PersistenceError):
    """The saved JSON names a class that is not on the load allowlist."""


class IntegrityError(PersistenceError):
    """A saved file is missing, truncated or altered since it was written."""


class BackboneMismatchError(PersistenceError):
    """The backbone found at load time is not the one the model was fitted on."""
