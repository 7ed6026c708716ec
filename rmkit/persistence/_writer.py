"""Turning a model into JSON-able nodes plus a dict of tensors."""

from __future__ import annotations

import functools
import inspect
import math
import os
import sys
from collections import OrderedDict

import numpy as np

from ._allowlist import check_savable_class
from ._format import PersistenceError
from ._reader import is_bunch, is_history

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


class Writer:
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
            return {"__class__": check_savable_class(obj, path)}

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
        if type(obj) in (dict, OrderedDict) or is_bunch(obj):
            tag = "__odict__" if type(obj) is OrderedDict else "__bunch__" if is_bunch(obj) else "__dict__"
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
        if is_history(obj):
            return {"__history__": self.encode(list(obj), path)}
        if hasattr(type(obj), "__rmkit_state__"):
            return self._encode_hooked(obj, path)
        if _is_skorch_net(obj):
            return self._encode_skorch(obj, path)
        if isinstance(obj, BaseEstimator):
            return self._encode_estimator(obj, path)
        if isinstance(obj, torch.nn.Module):
            name = check_savable_class(type(obj), path)
            return {"__module__": {"class": name, "state": self._encode_state(obj, path)}}
        if inspect.isroutine(obj) or isinstance(obj, functools.partial):
            raise PersistenceError(
                f"{path} is a function ({obj!r}): rmkit.save stores data, never code. Replace it by a "
                "parameter value (a name or number), or save with joblib if you trust every future reader."
            )
        try:
            name = check_savable_class(type(obj), path)
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
            from rmkit.backbones._loading import weights_fingerprint

            fingerprint = weights_fingerprint(backbone)
        name = os.fspath(backbone)
        if self.backbones.setdefault(name, fingerprint) != fingerprint:
            raise PersistenceError(f"{path}: backbone {name!r} appears with two different weight fingerprints.")

    def _encode_estimator(self, obj, path):
        name = check_savable_class(type(obj), path)
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
        name = check_savable_class(type(net), path)
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
        name = check_savable_class(type(obj), path)
        params = _estimator_params(obj) if hasattr(obj, "get_params") else None
        if params is not None:
            self._record_backbone(obj, params, path)
        return {"__hooked__": {
            "class": name,
            "params": None if params is None else {k: self.encode(v, f"{path}.{k}") for k, v in params.items()},
            "state": self.encode(obj.__rmkit_state__(), f"{path}.__rmkit_state__()"),
        }}
