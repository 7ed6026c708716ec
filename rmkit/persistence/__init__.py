"""Saving fitted models as safetensors + JSON, without pickle.

``rmkit.save(model, directory)`` writes two files::

    directory/
        rmkit.json            format version, class names, parameters, small
                              fitted values, backbone references
        tensors.safetensors   every numpy array and torch tensor

and ``rmkit.load(directory)`` rebuilds the model from them. Loading never
unpickles anything and never imports a class named in the JSON unless it is on
the allowlist: rmkit's own estimators and torch modules, a curated set of
scikit-learn classes, skorch nets and callbacks, ``torch.nn`` modules and
``torch.optim`` optimizers, plus what the user registers with
:func:`register_safe_class`.

How an object is written
------------------------
* JSON values (``None``, bools, ints, finite floats, strings) as themselves;
  lists, tuples, sets, dicts, slices, ``nan``/``inf`` with small tags.
* numpy arrays and torch tensors go to the safetensors file (numeric and bool
  dtypes; arrays of strings are written to JSON).
* A scikit-learn style estimator becomes ``{class, params, state}``: ``params``
  from ``get_params(deep=False)`` (nested estimators recursively), ``state``
  the rest of ``__getstate__()`` (the fitted attributes). Loading calls
  ``cls(**params)`` then ``__setstate__(state)``, as unpickling would.
* A skorch ``NeuralNet`` is written the way skorch's own ``save_params`` does
  it: parameters + the ``state_dict`` of each module and criterion + the
  history. Loading re-initialises the net from its parameters and loads the
  state dicts; the optimizer state is not kept (a reloaded net predicts
  identically; continuing training starts a fresh optimizer).
* A ``torch.nn.Module`` is written as its ``__dict__`` (parameters, buffers,
  child modules, plain attributes) and rebuilt with ``cls.__new__`` +
  ``__setstate__``, so its constructor is not called.
* Objects reached twice (tied weights, an estimator in two places) are written
  once and referenced.

The ``__rmkit_state__`` protocol
--------------------------------
A class whose state needs special handling (say, it holds a backbone that
must not be copied into every save) defines::

    def __rmkit_state__(self):
        return {...}            # any value rmkit.save can write

    def __rmkit_restore__(self, state):
        ...                     # called on cls(**self.get_params(deep=False))

``rmkit.save`` then stores the parameters (if the object has ``get_params``)
and the hook's state; ``rmkit.load`` calls ``cls(**params)`` (or
``cls.__new__(cls)`` without ``get_params``) and then
``obj.__rmkit_restore__(state)``. The class itself must be loadable: defined
in rmkit, or registered with :func:`register_safe_class`.

Backbones
---------
Every estimator with a string ``backbone`` parameter that is fitted is
recorded as ``(name, SHA-256 of its weight files)``; the weights themselves
are never copied into the save. ``rmkit.load`` recomputes the fingerprint of
each named backbone and refuses a different one with
:class:`BackboneMismatchError` (``backbones={"old": "new/folder"}`` points a
name at another location holding the same weights).
"""

from ._allowlist import register_safe_class
from ._api import load, save
from ._format import (
           FORMAT_VERSION,
           BackboneMismatchError,
           IntegrityError,
           PersistenceError,
           UnsafeClassError,
)
from ._model_card import read_model_card, write_model_card

__all__ = ["FORMAT_VERSION", "BackboneMismatchError", "IntegrityError", "PersistenceError", "UnsafeClassError",
           "load", "read_model_card", "register_safe_class", "save", "write_model_card"]
