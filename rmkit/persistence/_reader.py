"""Rebuilding a model from the JSON nodes and tensors, refusing anything unsafe."""

from __future__ import annotations

import os
import re
import sys
import warnings
from collections import OrderedDict

import numpy as np

from ._allowlist import allowed_class, qualified_name
from ._format import (
    MANIFEST,
    TENSORS,
    BackboneMismatchError,
    IntegrityError,
    PersistenceError,
    UnsafeClassError,
)


def is_bunch(obj):
    bunch = sys.modules.get("sklearn.utils._bunch")
    return bunch is not None and type(obj) is bunch.Bunch


def is_history(obj):
    history = sys.modules.get("skorch.history")
    return history is not None and type(obj) is history.History


# ----------------------------------------------------------------------- reading


def _construct(cls, params, path):
    try:
        return cls(**params)
    except TypeError as exc:  # the same failure as sklearn.base.clone would hit
        raise PersistenceError(
            f"{path}: {qualified_name(cls)} cannot be rebuilt from its get_params() ({exc}); "
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


def backbone_allowed(name, remap):
    """Whether ``load`` may read backbone ``name``, as named by the saved file.

    Allowed: names the caller remapped with ``backbones=`` (their explicit
    choice), the embedded and tiny backbones, Hugging Face hub ids, and folders
    inside rmkit's own cache. Any other folder is named by the file only, so
    it is not read (nor hashed) unless the caller confirms it.
    """
    from rmkit.backbones._loading import EMBEDDED_BACKBONE, cache_dir, looks_like_path

    if name in remap or name in (EMBEDDED_BACKBONE, "rmkit-tiny"):
        return True
    expanded = os.path.expanduser(name)
    if not looks_like_path(name) and not os.path.exists(expanded):
        return True
    return _inside(expanded, cache_dir())


def refuse_backbone(name):
    from rmkit.backbones._loading import cache_dir

    raise BackboneMismatchError(
        f"The save names backbone folder {name!r}, which is outside rmkit's cache ({cache_dir()}); rmkit.load "
        "does not read folders chosen by a file. If you trust this save and that folder, confirm it with "
        f"rmkit.load(..., backbones={{{name!r}: {name!r}}}) (or map it to where the same weights are now)."
    )


class Reader:
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
        elif isinstance(backbone, str) and not backbone_allowed(backbone, self.backbones):
            refuse_backbone(backbone)
        cache = params.get("cache")
        if isinstance(cache, str):
            from rmkit.backbones._loading import cache_dir

            if not _inside(os.path.expanduser(cache), cache_dir()):
                warnings.warn(f"{path}: the saved cache folder {cache!r} is outside rmkit's cache; the loaded "
                              "model uses the default cache instead (set_params(cache=...) to choose one).",
                              stacklevel=4)
                params["cache"] = True
        _check_declared_sizes(params, path)
        return params

    def _destimator(self, body, path):
        from sklearn.base import BaseEstimator

        cls = allowed_class(body.get("class"), "an estimator")
        if not issubclass(cls, BaseEstimator):
            raise UnsafeClassError(f"{path}: {body.get('class')} is not a scikit-learn estimator.")
        obj = _construct(cls, self._params(body["params"], path), path)
        state = dict(vars(obj))
        state.update({k: self.decode(v, f"{path}.{k}") for k, v in body["state"].items()})
        obj.__setstate__(state)
        return obj

    def _dskorch(self, body, path):
        import skorch

        cls = allowed_class(body.get("class"), "a skorch net")
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

        cls = allowed_class(body.get("class"), "a torch module")
        if not issubclass(cls, torch.nn.Module):
            raise UnsafeClassError(f"{path}: {body.get('class')} is not a torch.nn.Module.")
        obj = cls.__new__(cls)
        obj.__setstate__(self._ddict(body["state"], path))
        return obj

    def _dobject(self, body, path):
        cls = allowed_class(body.get("class"), "an object")
        obj = cls.__new__(cls)
        state = self._ddict(body["state"], path)
        if hasattr(obj, "__setstate__"):
            obj.__setstate__(state)
        else:
            obj.__dict__.update(state)
        return obj

    def _dhooked(self, body, path):
        cls = allowed_class(body.get("class"), "an object with __rmkit_restore__")
        if not hasattr(cls, "__rmkit_restore__"):
            raise UnsafeClassError(f"{path}: {body.get('class')} has no __rmkit_restore__ method.")
        params = body.get("params")
        obj = _construct(cls, self._params(params, path), path) if params is not None else cls.__new__(cls)
        obj.__rmkit_restore__(self.decode(body["state"], f"{path}.__rmkit_state__()"))
        return obj

    def _dclass(self, body, path):
        return allowed_class(body, "a class")
