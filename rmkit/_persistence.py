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

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import math
import os
import re
import shutil
import sys
import tempfile
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np

__all__ = [
    "FORMAT_VERSION",
    "BackboneMismatchError",
    "IntegrityError",
    "PersistenceError",
    "UnsafeClassError",
    "load",
    "register_safe_class",
    "save",
]

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


# --------------------------------------------------------------------- allowlist

_REGISTERED: dict = {}

# scikit-learn classes whose fitted state is plain arrays and values (checked by
# tests/test_persistence.py); anything else can be added by register_safe_class.
_SKLEARN_SAFE = {
    "sklearn.pipeline": ["Pipeline", "FeatureUnion"],
    "sklearn.compose": ["ColumnTransformer", "TransformedTargetRegressor"],
    "sklearn.preprocessing": ["StandardScaler", "MinMaxScaler", "MaxAbsScaler", "RobustScaler", "Normalizer",
                              "PolynomialFeatures", "OneHotEncoder", "OrdinalEncoder", "LabelEncoder",
                              "LabelBinarizer"],
    "sklearn.impute": ["SimpleImputer"],
    "sklearn.decomposition": ["PCA", "TruncatedSVD"],
    "sklearn.linear_model": ["Ridge", "RidgeCV", "RidgeClassifier", "LinearRegression", "LogisticRegression",
                             "Lasso", "ElasticNet"],
    "sklearn.dummy": ["DummyRegressor", "DummyClassifier"],
    "sklearn.frozen": ["FrozenEstimator"],
    "sklearn.multioutput": ["MultiOutputRegressor"],
    "sklearn.cluster": ["KMeans"],
    "sklearn.feature_extraction.text": ["CountVectorizer", "TfidfTransformer", "TfidfVectorizer"],
}
_sklearn_registered = False


def _qualified_name(cls):
    return f"{cls.__module__}.{cls.__qualname__}"


def register_safe_class(cls):
    """Allow :func:`load` to rebuild instances of ``cls`` (usable as a decorator).

    Register only classes you trust: loading calls ``cls(**params)`` with
    parameters read from the saved JSON. rmkit's own estimators, the common
    scikit-learn estimators and transformers, skorch nets and ``torch.nn``
    modules are allowed without registration.

    Examples
    --------
    >>> from sklearn.base import BaseEstimator
    >>> @register_safe_class
    ... class Shift(BaseEstimator):
    ...     def __init__(self, by=1.0):
    ...         self.by = by
    >>> Shift.__name__
    'Shift'
    """
    if not isinstance(cls, type):
        raise TypeError(f"register_safe_class expects a class, got {type(cls).__name__}.")
    _REGISTERED[_qualified_name(cls)] = cls
    return cls


def _register_sklearn():
    global _sklearn_registered
    if _sklearn_registered:
        return
    import importlib

    for module, names in _SKLEARN_SAFE.items():
        mod = importlib.import_module(module)  # fixed names only, never from the JSON
        for name in names:
            register_safe_class(getattr(mod, name))
    _sklearn_registered = True


def _lookup(name):
    """Find an already-imported rmkit/torch/skorch class by its dotted name.

    Reads module and class ``__dict__``s only: no import, no module
    ``__getattr__`` hook, no descriptor runs.
    """
    parts = name.split(".")
    if parts[0] not in ("rmkit", "torch", "skorch"):
        return None
    if not all(p.isidentifier() and not p.startswith("__") for p in parts):
        return None
    for i in range(len(parts) - 1, 0, -1):
        module = sys.modules.get(".".join(parts[:i]))
        if module is None:
            continue
        obj = module
        for attr in parts[i:]:
            obj = vars(obj).get(attr) if hasattr(obj, "__dict__") else None
            if obj is None:
                return None
        return obj if isinstance(obj, type) else None
    return None


def _builtin_allowed(cls):
    """rmkit, skorch and torch classes that are safe to rebuild."""
    from sklearn.base import BaseEstimator
    import torch

    module = cls.__module__
    if module == "rmkit" or module.startswith("rmkit."):
        return (issubclass(cls, (BaseEstimator, torch.nn.Module)) or dataclasses.is_dataclass(cls)
                or hasattr(cls, "__rmkit_restore__"))
    if module.startswith("torch.nn."):
        return issubclass(cls, torch.nn.Module)
    if module.startswith("torch.optim."):
        return issubclass(cls, torch.optim.Optimizer)
    if cls in (torch.utils.data.DataLoader, torch.utils.data.Dataset):
        return True
    if module.startswith("skorch."):
        import skorch
        from skorch.callbacks import Callback
        from skorch.dataset import Dataset, ValidSplit

        if cls.__name__ in _SKORCH_WRITERS:
            return False  # they create folders or files when the net is initialised
        return issubclass(cls, (skorch.NeuralNet, Callback, Dataset, ValidSplit))
    return False


# skorch callbacks with side effects at load time (Checkpoint makes its folder in initialize()),
# refused unless the user registers them with register_safe_class.
_SKORCH_WRITERS = {"Checkpoint", "TrainEndCheckpoint", "LoadInitState", "TensorBoard", "WandbLogger",
                   "NeptuneLogger", "SacredLogger", "MlflowLogger", "ClearMLLogger"}


def _import_rmkit_modules():
    """Import rmkit's own estimator modules (a fixed list: ``rmkit`` loads them lazily)."""
    import importlib

    import rmkit

    for module in sorted(set(rmkit._EXPORTS.values())):
        importlib.import_module(f"rmkit.{module}")


def _allowed_class(name, what):
    _register_sklearn()
    cls = _REGISTERED.get(name)
    if cls is None and isinstance(name, str):
        if name.startswith("skorch."):
            import skorch  # noqa: F401  (a dependency; imported so its classes can be found)
        if name.startswith("rmkit."):
            _import_rmkit_modules()
        cls = _lookup(name)
        if cls is not None and (_qualified_name(cls) != name or not _builtin_allowed(cls)):
            cls = None
    if cls is None:
        raise UnsafeClassError(
            f"The save names {name!r} as {what}, which is not on rmkit's load allowlist (rmkit's estimators, "
            "common scikit-learn estimators, skorch nets, torch modules). rmkit.load refuses it rather than "
            "import code named by a file. If you trust this directory and that class, import it and call "
            "rmkit.register_safe_class(cls) before loading."
        )
    return cls


def _check_savable_class(cls, path):
    name = _qualified_name(cls)
    try:
        _allowed_class(name, "a class")
    except UnsafeClassError:
        raise PersistenceError(
            f"{path}: class {name} could not be loaded back (it is not on rmkit's load allowlist). "
            "Call rmkit.register_safe_class on it, here and before loading."
        ) from None
    return name


# ----------------------------------------------------------------------- writing

_SKORCH_INTERNAL = {"history_", "initialized_", "virtual_params_", "init_context_", "callbacks_", "prefixes_",
                    "cuda_dependent_attributes_", "_modules", "_criteria", "_optimizers"}


def _is_skorch_net(obj):
    skorch = sys.modules.get("skorch")
    return skorch is not None and isinstance(obj, skorch.NeuralNet)


def _estimator_params(obj):
    params = obj.get_params(deep=False)
    # skorch lists its private `_params_to_validate` among the parameters
    return {k: v for k, v in params.items() if not k.startswith("_")}


class _Writer:
    def __init__(self):
        self.tensors = {}
        self.backbones = {}
        self._memo = {}  # id(obj) -> (ref number, obj): keeps identity of shared objects
        self._active = set()

    def _tensor(self, t):
        key = f"t{len(self.tensors)}"
        self.tensors[key] = t.detach().to("cpu").contiguous().clone()
        return key

    def encode(self, obj, path):
        import torch

        if isinstance(obj, np.generic):  # before the Python types: np.float64 subclasses float
            return {"__np_scalar__": {"dtype": obj.dtype.str, "value": self.encode(obj.item(), path)}}
        if obj is None or type(obj) in (bool, str, int):
            return obj
        if type(obj) is float:
            return obj if math.isfinite(obj) else {"__float__": repr(obj)}
        if isinstance(obj, torch.dtype):
            return {"__torch_dtype__": str(obj).removeprefix("torch.")}
        if isinstance(obj, torch.device):
            return {"__torch_device__": str(obj)}
        if isinstance(obj, np.dtype):
            return {"__np_dtype__": obj.str}
        if isinstance(obj, type) and issubclass(obj, np.generic):
            return {"__np_type__": np.dtype(obj).str}
        if isinstance(obj, slice):
            return {"__slice__": [self.encode(v, path) for v in (obj.start, obj.stop, obj.step)]}
        if isinstance(obj, type):
            return {"__class__": _check_savable_class(obj, path)}

        key = id(obj)
        if key in self._memo:
            return {"__ref__": self._memo[key][0]}
        if key in self._active:
            raise PersistenceError(f"{path}: the model refers back to itself here; cycles cannot be saved.")
        self._active.add(key)
        try:
            node = self._encode_container(obj, path)
        finally:
            self._active.discard(key)
        if isinstance(node, dict) and len(node) == 1:
            ((tag, body),) = node.items()
            if tag in ("__ndarray__", "__tensor__", "__estimator__", "__skorch__", "__module__", "__object__",
                       "__hooked__"):
                ref = len(self._memo)
                self._memo[key] = (ref, obj)
                body["id"] = ref
        return node

    def _encode_container(self, obj, path):
        import torch
        from sklearn.base import BaseEstimator

        if type(obj) is list:
            return [self.encode(v, f"{path}[{i}]") for i, v in enumerate(obj)]
        if type(obj) is tuple:
            return {"__tuple__": [self.encode(v, f"{path}[{i}]") for i, v in enumerate(obj)]}
        if type(obj) in (set, frozenset):
            items = list(obj)
            try:
                items = sorted(items)
            except TypeError:
                pass
            return {"__set__": [self.encode(v, path) for v in items]}
        if type(obj) in (dict, OrderedDict) or _is_bunch(obj):
            tag = "__odict__" if type(obj) is OrderedDict else "__bunch__" if _is_bunch(obj) else "__dict__"
            if tag == "__dict__" and all(isinstance(k, str) for k in obj):
                return {tag: {k: self.encode(v, f"{path}[{k!r}]") for k, v in obj.items()}}
            return {tag: [[self.encode(k, path), self.encode(v, f"{path}[{k!r}]")] for k, v in obj.items()]}
        if type(obj) is np.ndarray:
            return self._encode_array(obj, path)
        if isinstance(obj, torch.Tensor):
            return {"__tensor__": {"key": self._tensor(obj), "parameter": isinstance(obj, torch.nn.Parameter),
                                   "requires_grad": bool(obj.requires_grad), "device": str(obj.device)}}
        if isinstance(obj, np.random.RandomState):
            name, keys, pos, has_gauss, cached = obj.get_state()
            return {"__random_state__": [name, self.encode(keys, path), int(pos), int(has_gauss), float(cached)]}
        pd = sys.modules.get("pandas")
        if pd is not None and type(obj) is pd.Series:
            return {"__series__": {"name": self.encode(obj.name, path), "index": self._encode_index(obj.index, path),
                                   "values": self.encode(obj.to_numpy(), path)}}
        if pd is not None and type(obj) is pd.DataFrame:
            return {"__dataframe__": {"columns": self.encode(list(obj.columns), path),
                                      "index": self._encode_index(obj.index, path),
                                      "values": [self.encode(obj[c].to_numpy(), f"{path}[{c!r}]")
                                                 for c in obj.columns]}}
        if _is_history(obj):
            return {"__history__": self.encode(list(obj), path)}
        if hasattr(type(obj), "__rmkit_state__"):
            return self._encode_hooked(obj, path)
        if _is_skorch_net(obj):
            return self._encode_skorch(obj, path)
        if isinstance(obj, BaseEstimator):
            return self._encode_estimator(obj, path)
        if isinstance(obj, torch.nn.Module):
            name = _check_savable_class(type(obj), path)
            return {"__module__": {"class": name, "state": self._encode_state(obj, path)}}
        if inspect.isroutine(obj) or isinstance(obj, functools.partial):
            raise PersistenceError(
                f"{path} is a function ({obj!r}): rmkit.save stores data, never code. Replace it by a "
                "parameter value (a name or number), or save with joblib if you trust every future reader."
            )
        try:
            name = _check_savable_class(type(obj), path)
        except PersistenceError:
            raise PersistenceError(
                f"{path} is a {type(obj).__module__}.{type(obj).__qualname__}, which rmkit.save cannot write. "
                "Register the class with rmkit.register_safe_class, or give it __rmkit_state__/__rmkit_restore__ "
                "hooks."
            ) from None
        return {"__object__": {"class": name, "state": self._encode_state(obj, path)}}

    def _encode_state(self, obj, path):
        state = obj.__getstate__()
        if not isinstance(state, dict):
            raise PersistenceError(f"{path}: {type(obj).__name__}.__getstate__() is not a dict; it cannot be saved.")
        return {k: self.encode(v, f"{path}.{k}") for k, v in state.items()}

    def _encode_array(self, a, path):
        if a.dtype.kind in "biuf":
            native = a.astype(a.dtype.newbyteorder("="), copy=False)
            import torch

            return {"__ndarray__": {"key": self._tensor(torch.from_numpy(np.array(native, order="C"))),
                                    "dtype": a.dtype.str, "order": "F" if a.ndim > 1 and a.flags.f_contiguous
                                    and not a.flags.c_contiguous else "C"}}
        if a.dtype.kind in "OUS":
            return {"__ndarray_items__": {"dtype": a.dtype.str, "shape": list(a.shape),
                                          "items": [self.encode(v, f"{path}[...]") for v in a.ravel().tolist()]}}
        raise PersistenceError(f"{path}: arrays of dtype {a.dtype} cannot be saved.")

    def _encode_index(self, index, path):
        return {"values": self.encode(index.to_numpy(), path), "name": self.encode(index.name, path)}

    def _record_backbone(self, obj, params, path):
        backbone = params.get("backbone")
        if not isinstance(backbone, (str, os.PathLike)):
            return
        fitted = [k for k in vars(obj) if k.endswith("_") and not k.startswith("_")]
        if not fitted:
            return
        fingerprint = getattr(obj, "backbone_fingerprint_", None)
        if fingerprint is None:
            from ._backbones import weights_fingerprint

            fingerprint = weights_fingerprint(backbone)
        name = os.fspath(backbone)
        if self.backbones.setdefault(name, fingerprint) != fingerprint:
            raise PersistenceError(f"{path}: backbone {name!r} appears with two different weight fingerprints.")

    def _encode_estimator(self, obj, path):
        name = _check_savable_class(type(obj), path)
        params = _estimator_params(obj)
        self._record_backbone(obj, params, path)
        state = obj.__getstate__()
        if not isinstance(state, dict):
            raise PersistenceError(f"{path}: {type(obj).__name__}.__getstate__() is not a dict; it cannot be saved.")
        fitted = {k: v for k, v in state.items() if not (k in params and v is params[k])}
        return {"__estimator__": {
            "class": name,
            "params": {k: self.encode(v, f"{path}.{k}") for k, v in params.items()},
            "state": {k: self.encode(v, f"{path}.{k}") for k, v in fitted.items()},
        }}

    def _encode_skorch(self, net, path):
        name = _check_savable_class(type(net), path)
        params = _estimator_params(net)
        self._record_backbone(net, params, path)
        body = {"class": name, "params": {k: self.encode(v, f"{path}.{k}") for k, v in params.items()},
                "initialized": bool(getattr(net, "initialized_", False))}
        if body["initialized"]:
            owned = {f"{n}_" for n in [*net._modules, *net._criteria, *net._optimizers]}
            body["state_dicts"] = {
                n: {k: self.encode(v, f"{path}.{n}_.{k}") for k, v in getattr(net, f"{n}_").state_dict().items()}
                for n in [*net._modules, *net._criteria]
                if hasattr(getattr(net, f"{n}_", None), "state_dict")
            }
            body["history"] = self.encode(list(net.history_), f"{path}.history_")
            body["state"] = {k: self.encode(v, f"{path}.{k}") for k, v in vars(net).items()
                             if k not in params and k not in _SKORCH_INTERNAL and k not in owned
                             and not k.startswith("_")}
        return {"__skorch__": body}

    def _encode_hooked(self, obj, path):
        name = _check_savable_class(type(obj), path)
        params = _estimator_params(obj) if hasattr(obj, "get_params") else None
        if params is not None:
            self._record_backbone(obj, params, path)
        return {"__hooked__": {
            "class": name,
            "params": None if params is None else {k: self.encode(v, f"{path}.{k}") for k, v in params.items()},
            "state": self.encode(obj.__rmkit_state__(), f"{path}.__rmkit_state__()"),
        }}


def _is_bunch(obj):
    bunch = sys.modules.get("sklearn.utils._bunch")
    return bunch is not None and type(obj) is bunch.Bunch


def _is_history(obj):
    history = sys.modules.get("skorch.history")
    return history is not None and type(obj) is history.History


# ----------------------------------------------------------------------- reading


def _construct(cls, params, path):
    try:
        return cls(**params)
    except TypeError as exc:  # the same failure as sklearn.base.clone would hit
        raise PersistenceError(
            f"{path}: {_qualified_name(cls)} cannot be rebuilt from its get_params() ({exc}); "
            "its __init__ must accept every parameter get_params returns, as sklearn.base.clone requires."
        ) from exc


_TAGS = {f"__{t}__" for t in ("float", "np_scalar", "np_dtype", "np_type", "torch_dtype", "torch_device", "slice",
                               "tuple", "set", "dict", "odict", "bunch", "ref", "history", "random_state", "series",
                               "dataframe", "ndarray", "ndarray_items", "tensor", "estimator", "skorch", "module",
                               "object", "hooked", "class")}


_SIZE_NAME = re.compile(r"(size|dim|features|width|units)$")
_COUNT_NAME = re.compile(r"(^n_|^num_|layers$|heads$|rank$|objectives$|experts$)")
_UNBOUNDED = re.compile(r"batch|chunk|max_|min_|epoch|seed|random_state|workers|steps|patience|verbose|length")
MAX_DECLARED_SIZE = 1 << 16   # hidden sizes, feature widths: real backbones stay far below
MAX_DECLARED_COUNT = 1 << 12  # layers, heads, ranks, objectives


def _check_declared_sizes(params, path):
    """Refuse parameters that would make the constructor allocate absurd amounts (a crafted file)."""
    for key, value in params.items():
        if not isinstance(value, int) or isinstance(value, bool):
            continue
        name = key.rsplit("__", 1)[-1]
        if _UNBOUNDED.search(name):
            continue
        limit = MAX_DECLARED_SIZE if _SIZE_NAME.search(name) else MAX_DECLARED_COUNT if _COUNT_NAME.search(name) \
            else None
        if limit is not None and not -1 <= value <= limit:
            raise IntegrityError(f"{MANIFEST} declares {path}.{key} = {value}, beyond the bound {limit} rmkit.load "
                                 "accepts for such a size; the file was crafted or corrupted.")


def _inside(path, root):
    try:
        return os.path.commonpath([os.path.realpath(path), os.path.realpath(root)]) == os.path.realpath(root)
    except ValueError:  # different drives
        return False


def _backbone_allowed(name, remap):
    """Whether ``load`` may read backbone ``name``, as named by the saved file.

    Allowed: names the caller remapped with ``backbones=`` (their explicit
    choice), the embedded and tiny backbones, Hugging Face hub ids, and folders
    inside rmkit's own cache. Any other folder is named by the file only, so
    it is not read (nor hashed) unless the caller confirms it.
    """
    from ._backbones import EMBEDDED_BACKBONE, cache_dir, looks_like_path

    if name in remap or name in (EMBEDDED_BACKBONE, "rmkit-tiny"):
        return True
    expanded = os.path.expanduser(name)
    if not looks_like_path(name) and not os.path.exists(expanded):
        return True
    return _inside(expanded, cache_dir())


def _refuse_backbone(name):
    from ._backbones import cache_dir

    raise BackboneMismatchError(
        f"The save names backbone folder {name!r}, which is outside rmkit's cache ({cache_dir()}); rmkit.load "
        "does not read folders chosen by a file. If you trust this save and that folder, confirm it with "
        f"rmkit.load(..., backbones={{{name!r}: {name!r}}}) (or map it to where the same weights are now)."
    )


class _Reader:
    def __init__(self, tensors, *, device=None, backbones=None):
        self.tensors = tensors
        self.device = device
        self.backbones = backbones or {}
        self.refs = {}

    def _fail(self, path, message):
        raise IntegrityError(f"{MANIFEST} is malformed at {path}: {message}")

    def decode(self, node, path="model"):
        if node is None or isinstance(node, (bool, str, int, float)):
            return node
        if isinstance(node, list):
            return [self.decode(v, f"{path}[{i}]") for i, v in enumerate(node)]
        if not isinstance(node, dict) or len(node) != 1:
            self._fail(path, "expected a value tagged with one '__kind__' key")
        ((tag, body),) = node.items()
        handler = getattr(self, f"_d{tag.strip('_')}", None) if tag in _TAGS else None
        if handler is None:
            self._fail(path, f"unknown tag {tag!r}")
        obj = handler(body, path)
        if isinstance(body, dict) and "id" in body:
            self.refs[body["id"]] = obj
        return obj

    # plain values
    def _dfloat(self, body, path):
        if body not in ("nan", "inf", "-inf"):
            self._fail(path, f"bad float {body!r}")
        return float(body)

    def _dnp_scalar(self, body, path):
        return np.dtype(self._numpy_dtype(body["dtype"], path)).type(self.decode(body["value"], path))

    def _numpy_dtype(self, s, path):
        try:
            dt = np.dtype(s)
        except TypeError:
            self._fail(path, f"bad dtype {s!r}")
        if dt.kind not in "biufOUS":
            self._fail(path, f"unsupported dtype {s!r}")
        return dt

    def _dnp_dtype(self, body, path):
        return self._numpy_dtype(body, path)

    def _dnp_type(self, body, path):
        return self._numpy_dtype(body, path).type

    def _dtorch_dtype(self, body, path):
        import torch

        dt = getattr(torch, str(body), None)
        if not isinstance(dt, torch.dtype):
            self._fail(path, f"bad torch dtype {body!r}")
        return dt

    def _dtorch_device(self, body, path):
        import torch

        return torch.device(self._map_device(str(body)))

    def _dslice(self, body, path):
        return slice(*(self.decode(v, path) for v in body))

    def _dtuple(self, body, path):
        return tuple(self.decode(v, f"{path}[{i}]") for i, v in enumerate(body))

    def _dset(self, body, path):
        return set(self.decode(v, path) for v in body)

    def _ddict(self, body, path):
        if isinstance(body, dict):
            return {k: self.decode(v, f"{path}[{k!r}]") for k, v in body.items()}
        return {self.decode(k, path): self.decode(v, path) for k, v in body}

    def _dodict(self, body, path):
        return OrderedDict((self.decode(k, path), self.decode(v, path)) for k, v in body)

    def _dbunch(self, body, path):
        from sklearn.utils import Bunch

        return Bunch(**self._ddict(body, path))

    def _dref(self, body, path):
        if body not in self.refs:
            self._fail(path, f"reference {body!r} to an object not seen before")
        return self.refs[body]

    def _dhistory(self, body, path):
        from skorch.history import History

        return History(self.decode(body, path))

    def _drandom_state(self, body, path):
        rs = np.random.RandomState()
        name, keys, pos, has_gauss, cached = body
        rs.set_state((str(name), self.decode(keys, path), int(pos), int(has_gauss), float(cached)))
        return rs

    def _dseries(self, body, path):
        import pandas as pd

        return pd.Series(self.decode(body["values"], path), index=self._index(body["index"], path),
                         name=self.decode(body["name"], path))

    def _ddataframe(self, body, path):
        import pandas as pd

        columns = self.decode(body["columns"], path)
        values = [self.decode(v, path) for v in body["values"]]
        df = pd.DataFrame(dict(enumerate(values)), index=self._index(body["index"], path))
        df.columns = columns
        return df

    def _index(self, body, path):
        import pandas as pd

        return pd.Index(self.decode(body["values"], path), name=self.decode(body["name"], path))

    # arrays and tensors
    def _tensor_for(self, key, path):
        if key not in self.tensors:
            raise IntegrityError(f"{path}: tensor {key!r} is missing from {TENSORS}.")
        return self.tensors[key]

    def _dndarray(self, body, path):
        t = self._tensor_for(body["key"], path)
        a = t.numpy().astype(self._numpy_dtype(body["dtype"], path), copy=False)
        return np.asfortranarray(a) if body.get("order") == "F" else a

    def _dndarray_items(self, body, path):
        dt = self._numpy_dtype(body["dtype"], path)
        items = [self.decode(v, path) for v in body["items"]]
        shape = tuple(int(s) for s in body["shape"])
        if dt.kind == "O":
            a = np.empty(len(items), dtype=object)
            a[:] = items
            return a.reshape(shape)
        return np.asarray(items, dtype=dt).reshape(shape)

    def _dtensor(self, body, path):
        import torch

        t = self._tensor_for(body["key"], path)
        if body.get("parameter"):
            return torch.nn.Parameter(t, requires_grad=bool(body.get("requires_grad", True)))
        return t.requires_grad_(bool(body.get("requires_grad", False))) if t.is_floating_point() else t

    # objects
    def _map_device(self, device):
        if self.device is not None:
            return self.device
        if device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                warnings.warn(f"The model was saved on {device!r}, which is not available here; loading it on 'cpu'.",
                              stacklevel=4)
                return "cpu"
        return device

    def _params(self, body, path):
        params = self.decode({"__dict__": body}, path) if isinstance(body, dict) else self._fail(path, "no params")
        if isinstance(params.get("device"), str):
            params["device"] = self._map_device(params["device"])
        backbone = params.get("backbone")
        if isinstance(backbone, str) and backbone in self.backbones:
            params["backbone"] = os.fspath(self.backbones[backbone])
        elif isinstance(backbone, str) and not _backbone_allowed(backbone, self.backbones):
            _refuse_backbone(backbone)
        cache = params.get("cache")
        if isinstance(cache, str):
            from ._backbones import cache_dir

            if not _inside(os.path.expanduser(cache), cache_dir()):
                warnings.warn(f"{path}: the saved cache folder {cache!r} is outside rmkit's cache; the loaded "
                              "model uses the default cache instead (set_params(cache=...) to choose one).",
                              stacklevel=4)
                params["cache"] = True
        _check_declared_sizes(params, path)
        return params

    def _destimator(self, body, path):
        from sklearn.base import BaseEstimator

        cls = _allowed_class(body.get("class"), "an estimator")
        if not issubclass(cls, BaseEstimator):
            raise UnsafeClassError(f"{path}: {body.get('class')} is not a scikit-learn estimator.")
        obj = _construct(cls, self._params(body["params"], path), path)
        state = dict(vars(obj))
        state.update({k: self.decode(v, f"{path}.{k}") for k, v in body["state"].items()})
        obj.__setstate__(state)
        return obj

    def _dskorch(self, body, path):
        import skorch

        cls = _allowed_class(body.get("class"), "a skorch net")
        if not issubclass(cls, skorch.NeuralNet):
            raise UnsafeClassError(f"{path}: {body.get('class')} is not a skorch NeuralNet.")
        net = _construct(cls, self._params(body["params"], path), path)
        if body.get("initialized"):
            from skorch.history import History

            # fitted attributes first: custom initialize_module() methods may read them
            extra = {k: self.decode(v, f"{path}.{k}") for k, v in body["state"].items()}
            net.__dict__.update(extra)
            net.initialize()
            net.__dict__.update(extra)
            for name, sd in body["state_dicts"].items():
                if name not in [*net._modules, *net._criteria]:
                    self._fail(path, f"unknown skorch module {name!r}")
                getattr(net, f"{name}_").load_state_dict(self._ddict(sd, f"{path}.{name}_"))
            net.history_ = History(self.decode(body["history"], f"{path}.history_"))
        return net

    def _dmodule(self, body, path):
        import torch

        cls = _allowed_class(body.get("class"), "a torch module")
        if not issubclass(cls, torch.nn.Module):
            raise UnsafeClassError(f"{path}: {body.get('class')} is not a torch.nn.Module.")
        obj = cls.__new__(cls)
        obj.__setstate__(self._ddict(body["state"], path))
        return obj

    def _dobject(self, body, path):
        cls = _allowed_class(body.get("class"), "an object")
        obj = cls.__new__(cls)
        state = self._ddict(body["state"], path)
        if hasattr(obj, "__setstate__"):
            obj.__setstate__(state)
        else:
            obj.__dict__.update(state)
        return obj

    def _dhooked(self, body, path):
        cls = _allowed_class(body.get("class"), "an object with __rmkit_restore__")
        if not hasattr(cls, "__rmkit_restore__"):
            raise UnsafeClassError(f"{path}: {body.get('class')} has no __rmkit_restore__ method.")
        params = body.get("params")
        obj = _construct(cls, self._params(params, path), path) if params is not None else cls.__new__(cls)
        obj.__rmkit_restore__(self.decode(body["state"], f"{path}.__rmkit_state__()"))
        return obj

    def _dclass(self, body, path):
        return _allowed_class(body, "a class")


# ------------------------------------------------------------------ file handling


def _fsync_file(path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


_TMP_MARK = ".rmkit-tmp-"


def _temp_prefix(target):
    return f".{target.name}{_TMP_MARK}"


def _swap_into_place(tmp, target):
    """Make ``tmp`` the new ``target``; afterwards ``tmp`` holds the previous save (if any).

    Two plain renames (portable): the previous save is first renamed aside to
    ``<tmp>-previous``, then ``tmp`` takes its place; if the second rename
    fails the previous save is put back. Readers never see a mix of the two
    saves (:func:`load` checks the tensors against the manifest it read and
    retries while a save is in flight), and a process killed between the two
    renames leaves the previous save aside, where the next :func:`save` or
    :func:`load` puts it back.
    """
    if not target.exists():
        os.rename(tmp, target)
        return
    aside = tmp.with_name(tmp.name + "-previous")
    os.rename(target, aside)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(aside, target)
        raise
    os.rename(aside, tmp)


def _host_tag():
    """A short tag of this machine: temporary folders of other hosts (or containers) are judged by age."""
    import socket

    return hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:6]


def _temp_in_use(p, target, *, max_age=3600.0):
    """Whether the temporary folder ``p`` may still belong to a running save."""
    import time

    parts = p.name[len(_temp_prefix(target)):].split("-")
    try:
        pid = int(parts[0])
    except ValueError:
        pid = None
    if pid is not None and len(parts) > 2 and parts[1] == _host_tag():
        if pid == os.getpid():
            return True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except OSError:
            return True
        return True
    try:  # another machine or container (its PIDs mean nothing here), or an unknown name: by age
        return time.time() - p.stat().st_mtime < max_age
    except OSError:
        return False


def _remove_stale_temps(target):
    """Clean what saves whose process died left beside ``target``.

    A half-written copy is removed; a previous save left aside by a process
    killed between its two renames is put back when ``target`` is missing
    (it is the last committed save). Folders of live processes are left
    alone. Errors (a read-only parent) are ignored: the temporary folders are
    hidden and never loaded as saves.
    """
    try:
        temps = sorted(target.parent.glob(_temp_prefix(target) + "*"))
    except OSError:
        return
    for p in temps:
        if _temp_in_use(p, target):
            continue
        try:
            if p.name.endswith("-previous") and not target.exists():
                os.rename(p, target)
            else:
                shutil.rmtree(p)
        except OSError:
            pass


def _save_in_flight(target):
    """True while a live process has a temporary folder beside ``target``."""
    try:
        return any(_temp_in_use(p, target) for p in target.parent.glob(_temp_prefix(target) + "*"))
    except OSError:
        return False


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _library_versions():
    import importlib.metadata as md

    out = {}
    for name in ("rmkit", "scikit-learn", "torch", "skorch", "numpy", "safetensors"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def save(model, directory):
    """Save a fitted (or unfitted) model to ``directory`` as safetensors + JSON.

    The save is atomic: everything is written to a temporary folder beside
    ``directory``, flushed to disk, and swapped into place in one step, so an
    interrupted save leaves the previous contents of ``directory`` intact.
    An existing ``directory`` is replaced only if it is empty or an earlier
    rmkit save.

    Parameters
    ----------
    model : estimator
        rmkit estimators, scikit-learn pipelines of them, skorch nets, torch
        modules, or anything built from allowlisted classes (see
        :func:`register_safe_class`).
    directory : str or Path

    Returns
    -------
    Path
        The directory written.

    Raises
    ------
    PersistenceError
        If part of the model cannot be written without pickle (a function, an
        unknown class); the message names the attribute path.

    Examples
    --------
    >>> import numpy as np, tempfile, rmkit
    >>> from sklearn.pipeline import make_pipeline
    >>> from sklearn.preprocessing import StandardScaler
    >>> from sklearn.linear_model import Ridge
    >>> X, y = np.arange(12.0).reshape(6, 2), np.arange(6.0)
    >>> model = make_pipeline(StandardScaler(), Ridge()).fit(X, y)
    >>> path = rmkit.save(model, tempfile.mkdtemp() + "/ridge")
    >>> sorted(p.name for p in path.iterdir())
    ['README.md', 'rmkit.json', 'tensors.safetensors']
    >>> bool(np.array_equal(rmkit.load(path).predict(X), model.predict(X)))
    True
    """
    from safetensors.torch import save_file

    target = Path(directory).expanduser().absolute()
    _remove_stale_temps(target)
    if target.exists():
        if not target.is_dir():
            raise PersistenceError(f"{target} exists and is not a directory.")
        if any(target.iterdir()) and not (target / MANIFEST).is_file():
            raise PersistenceError(f"{target} exists and is not an rmkit save; refusing to replace its contents.")
    writer = _Writer()
    root = writer.encode(model, "model")  # before touching the disk: errors leave everything as it was
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_versions": _library_versions(),
        "class": _qualified_name(type(model)),
        "backbones": [{"name": n, "sha256": fp} for n, fp in writer.backbones.items()],
        "tensors": None,
        "model": root,
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_temp_prefix(target)}{os.getpid()}-{_host_tag()}-", dir=target.parent))
    try:
        umask = _umask()
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a save is an ordinary folder
        tensor_path = tmp / TENSORS
        save_file(writer.tensors, str(tensor_path), metadata={"format": "pt", "producer": FORMAT})
        os.chmod(tensor_path, 0o666 & ~umask)
        _fsync_file(tensor_path)
        manifest["tensors"] = {"file": TENSORS, "bytes": tensor_path.stat().st_size, "sha256": _sha256(tensor_path)}
        text = json.dumps(manifest, indent=1, allow_nan=False)
        with open(tmp / MANIFEST, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        from ._model_card import _save_hook  # README.md model card beside the weights (documentation only)
        _save_hook(tmp, model, manifest)
        _fsync_dir(tmp)
        _swap_into_place(tmp, target)
        _fsync_dir(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the previous save, or a half-written one
    return target


def _read_inside(directory, name):
    """Bytes of ``directory/name``, refusing a symlink or anything that leads outside ``directory``."""
    path = directory / name
    if path.is_symlink() or (path.exists() and os.path.realpath(path.parent) != os.path.realpath(directory)):
        raise PersistenceError(f"{path} is a symbolic link; rmkit.load reads only files inside the save folder.")
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        return f.read()


def _parse_manifest(directory, raw):
    path = directory / MANIFEST

    def refuse_constant(value):
        raise ValueError(f"non-standard JSON constant {value}")

    try:
        manifest = json.loads(raw.decode("utf-8"), parse_constant=refuse_constant)
    except RecursionError:
        raise IntegrityError(f"{path} nests too deeply to be a saved model.") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise IntegrityError(f"{path} is not valid JSON (truncated or edited?): {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PersistenceError(f"{path} is not an rmkit save manifest (no \"format\": \"{FORMAT}\").")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        newer = isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION
        raise PersistenceError(
            f"{directory} uses save format version {version!r}, but this rmkit reads version {FORMAT_VERSION}"
            + (": it was written by a newer rmkit; upgrade rmkit to load it." if newer else
               ": re-save the model with a matching rmkit version.")
        )
    return manifest


def _read_manifest(directory):
    if not directory.is_dir():
        raise FileNotFoundError(f"No saved model at {directory}: the directory does not exist.")
    raw = _read_inside(directory, MANIFEST)
    if raw is None:
        raise PersistenceError(f"{directory} is not an rmkit save: it has no {MANIFEST}.")
    return _parse_manifest(directory, raw)


def _check_tensors(directory, manifest, data):
    from safetensors import SafetensorError
    from safetensors.torch import load as load_bytes

    info = manifest.get("tensors")
    if not isinstance(info, dict) or not isinstance(info.get("bytes"), int) or not isinstance(info.get("sha256"), str):
        raise IntegrityError(f"{directory / MANIFEST} does not record the size and SHA-256 of {TENSORS}.")
    path = directory / TENSORS  # fixed name: the manifest never chooses which file is read
    if data is None:
        raise IntegrityError(f"{path} is missing.")
    if len(data) != info["bytes"]:
        raise IntegrityError(
            f"{path} is {len(data)} bytes but was saved as {info['bytes']} bytes: the file is truncated or altered."
        )
    if hashlib.sha256(data).hexdigest() != info["sha256"]:
        raise IntegrityError(f"{path} does not match the SHA-256 recorded when it was saved: the file was altered "
                             "(tampered with or corrupted).")
    try:
        return load_bytes(data)  # the very bytes that were hashed: no second read that a save could change
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise IntegrityError(f"{path} is not a readable safetensors file: {exc}") from None


def _read_save(directory, *, wait=30.0):
    """``(manifest, tensors)`` of one consistent save at ``directory``.

    A concurrent :func:`save` replaces the folder with two renames; a reader
    that sees the folder missing, or a tensors file that does not match the
    manifest it read, retries while the manifest changes under it or a live
    process is saving there, so it returns the old or the new save, never a
    mix, and raises only for a save that stays broken.
    """
    import time

    directory = Path(directory)
    if _TMP_MARK in directory.name:
        raise PersistenceError(f"{directory} is the temporary folder of an unfinished rmkit.save, not a save.")
    _remove_stale_temps(directory.absolute())
    deadline = time.monotonic() + wait
    delay = 0.01
    while True:
        raw = None
        try:
            if not directory.is_dir():
                raise FileNotFoundError(f"No saved model at {directory}: the directory does not exist.")
            raw = _read_inside(directory, MANIFEST)
            if raw is None:
                raise PersistenceError(f"{directory} is not an rmkit save: it has no {MANIFEST}.")
            manifest = _parse_manifest(directory, raw)
            tensors = _check_tensors(directory, manifest, _read_inside(directory, TENSORS))
            if _read_inside(directory, MANIFEST) == raw:
                return manifest, tensors
            error = None  # the save was replaced while reading: read again
        except (FileNotFoundError, IntegrityError) as exc:
            error = exc
            try:
                changed = raw is not None and _read_inside(directory, MANIFEST) != raw
            except (OSError, PersistenceError):
                changed = True
            if not changed and not _save_in_flight(directory.absolute()):
                raise
        except PersistenceError:
            raise
        except OSError as exc:  # a file vanished between the check and the read: a save in flight?
            error = PersistenceError(f"{directory} cannot be read: {exc}")
            if not _save_in_flight(directory.absolute()):
                raise error from None
        if time.monotonic() > deadline:
            if error is not None:
                raise error
            raise PersistenceError(f"{directory} kept changing for {wait:.0f} s while loading (saves in a loop?).")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def _check_backbones(manifest, remap):
    from ._backbones import weights_fingerprint

    entries = manifest.get("backbones") or []
    if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("name"), str)
                                                and isinstance(e.get("sha256"), str) for e in entries):
        raise IntegrityError(f"{MANIFEST}: 'backbones' must be a list of {{name, sha256}} strings.")
    for entry in entries:
        name, saved = entry.get("name"), entry.get("sha256")
        if not _backbone_allowed(name, remap):
            _refuse_backbone(name)
        where = os.fspath(remap.get(name, name))
        try:
            if os.path.isabs(where) and not os.path.isdir(where):
                raise FileNotFoundError(f"there is no folder {where}")
            current = weights_fingerprint(where)
        except Exception as exc:  # missing folder, broken conversion, ...
            raise BackboneMismatchError(
                f"The model was fitted on backbone {name!r}, which cannot be loaded here ({exc}). "
                f"Pass backbones={{{name!r}: '<folder with the same weights>'}} to rmkit.load."
            ) from exc
        if current != saved:
            raise BackboneMismatchError(
                f"The model was fitted on backbone {name!r} with weights sha256 {str(saved)[:12]}..., but "
                f"{where!r} now has different weights: its features would not match what the "
                "model learned. Point the name at the original weights with "
                f"backbones={{{name!r}: '<folder>'}} or refit the model."
            )


def load(directory, *, device=None, backbones=None, check_backbones=True):
    """Load a model written by :func:`save`; never runs code named by the files.

    Parameters
    ----------
    directory : str or Path
    device : str, optional
        Overrides every ``device`` parameter in the model (e.g. ``"cpu"`` for
        a model saved on a GPU). By default saved devices are kept, except
        that CUDA devices fall back to ``"cpu"`` with a warning when CUDA is
        not available.
    backbones : dict, optional
        Maps backbone names recorded at save time to where the same weights
        are now (their fingerprint is still checked).
    check_backbones : bool, default=True
        Verify that every referenced backbone has the weights the model was
        fitted on.

    Returns
    -------
    The rebuilt model.

    Raises
    ------
    UnsafeClassError
        The JSON names a class that is not on the allowlist.
    IntegrityError
        A file is missing, truncated, not matching its recorded hash, or the
        JSON is malformed.
    BackboneMismatchError
        A referenced backbone has different weights than at save time.
    PersistenceError
        Not an rmkit save, or a different format version (all the errors
        above are PersistenceErrors too).

    Examples
    --------
    >>> import numpy as np, tempfile, rmkit
    >>> from sklearn.linear_model import LogisticRegression
    >>> X, y = np.array([[0.0], [1.0], [2.0], [3.0]]), np.array([0, 0, 1, 1])
    >>> path = rmkit.save(LogisticRegression().fit(X, y), tempfile.mkdtemp() + "/clf")
    >>> rmkit.load(path).predict([[0.2], [2.8]])
    array([0, 1])
    """
    directory = Path(directory).expanduser()
    manifest, tensors = _read_save(directory)
    remap = {str(k): v for k, v in (backbones or {}).items()}
    if check_backbones:
        _check_backbones(manifest, remap)
    reader = _Reader(tensors, device=device, backbones=remap)
    try:
        return reader.decode(manifest.get("model"))
    except PersistenceError:
        raise
    except RecursionError:
        raise IntegrityError(f"{directory / MANIFEST} nests too deeply to be a saved model.") from None
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError, AttributeError, OverflowError,
            MemoryError, AssertionError, OSError) as exc:
        # Whatever a crafted or damaged file makes the rebuilding code raise is reported as one error type.
        raise IntegrityError(f"{directory / MANIFEST} is malformed or describes a model that cannot be rebuilt: "
                             f"{type(exc).__name__}: {exc}") from exc
