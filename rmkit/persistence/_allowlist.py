"""The classes :func:`rmkit.load` may rebuild: rmkit's own, curated scikit-learn, skorch and torch classes, and registered ones."""

from __future__ import annotations

import dataclasses
import sys

from ._format import PersistenceError, UnsafeClassError

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


def qualified_name(cls):
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
    _REGISTERED[qualified_name(cls)] = cls
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
    import torch
    from sklearn.base import BaseEstimator

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


# rmkit's subpackages that define classes a save may name (imported before a lookup: ``rmkit`` loads them lazily)
ESTIMATOR_PACKAGES = ("backbones", "ensemble", "judge", "lora", "model_selection", "moe", "objectives")

# Saves written by rmkit 0.1 name classes by their old flat modules (a fixed table, never read from a file).
MOVED_CLASSES = {
    "rmkit._featurizer.BackboneFeaturizer": "rmkit.backbones._featurizer.BackboneFeaturizer",
    "rmkit._judge.CapabilityLabeler": "rmkit.judge._labeler.CapabilityLabeler",
    "rmkit._experts.CapabilityExperts": "rmkit.lora._experts.CapabilityExperts",
    "rmkit._lora._ExpertModule": "rmkit.lora._module.ExpertModule",
    "rmkit._lora._AdapterNet": "rmkit.lora._net.AdapterNet",
    "rmkit._lora.LoRAExpertRegressor": "rmkit.lora._regressor.LoRAExpertRegressor",
    "rmkit._dmoerm.AggregatorModule": "rmkit.moe._aggregator.AggregatorModule",
    "rmkit._dmoerm.CapabilityAggregator": "rmkit.moe._aggregator.CapabilityAggregator",
    "rmkit._dmoerm.CapabilityMoE": "rmkit.moe._capability_moe.CapabilityMoE",
    "rmkit._dmoerm.DMoERM": "rmkit.moe._dmoerm.DMoERM",
    "rmkit._router.TaskRouter": "rmkit.moe._router.TaskRouter",
    "rmkit._armorm.ArmoRM": "rmkit.objectives._armorm.ArmoRM",
    "rmkit._decorrelation.VerbosityDecorrelator": "rmkit.objectives._decorrelation.VerbosityDecorrelator",
    "rmkit._gating.GatingModule": "rmkit.objectives._gating.GatingModule",
    "rmkit._gating.GatedScalarizer": "rmkit.objectives._gating.GatedScalarizer",
    "rmkit._multiobjective.MultiObjectiveRegressor": "rmkit.objectives._multiobjective.MultiObjectiveRegressor",
    "rmkit._union.ObjectiveUnion": "rmkit.objectives._union.ObjectiveUnion",
    "rmkit._skorch.BradleyTerryLoss": "rmkit.utils._torch.BradleyTerryLoss",
}


def _import_rmkit_modules():
    """Import rmkit's own estimator packages (a fixed list)."""
    import importlib

    for package in ESTIMATOR_PACKAGES:
        importlib.import_module(f"rmkit.{package}")


def allowed_class(name, what):
    _register_sklearn()
    name = MOVED_CLASSES.get(name, name) if isinstance(name, str) else name
    cls = _REGISTERED.get(name)
    if cls is None and isinstance(name, str):
        if name.startswith("skorch."):
            import skorch  # noqa: F401  (a dependency; imported so its classes can be found)
        if name.startswith("rmkit."):
            _import_rmkit_modules()
        cls = _lookup(name)
        if cls is not None and (qualified_name(cls) != name or not _builtin_allowed(cls)):
            cls = None
    if cls is None:
        raise UnsafeClassError(
            f"The save names {name!r} as {what}, which is not on rmkit's load allowlist (rmkit's estimators, "
            "common scikit-learn estimators, skorch nets, torch modules). rmkit.load refuses it rather than "
            "import code named by a file. If you trust this directory and that class, import it and call "
            "rmkit.register_safe_class(cls) before loading."
        )
    return cls


def check_savable_class(cls, path):
    name = qualified_name(cls)
    try:
        allowed_class(name, "a class")
    except UnsafeClassError:
        raise PersistenceError(
            f"{path}: class {name} could not be loaded back (it is not on rmkit's load allowlist). "
            "Call rmkit.register_safe_class on it, here and before loading."
        ) from None
    return name
