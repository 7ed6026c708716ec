"""rmkit: reward-model recipes (ArmoRM, DMoERM) as scikit-learn estimators.

The public names are imported on first use (PEP 562), so ``import rmkit`` and
``python -m rmkit --help`` do not pay for torch, transformers and skorch
until an estimator is touched.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> private module that defines it
_EXPORTS = {
    "EMBEDDED_BACKBONE": "_backbones",
    "cache_dir": "_backbones",
    "resolve_backbone": "_backbones",
    "BackboneFeaturizer": "_featurizer",
    "split_feature_blocks": "_featurizer",
    "CapabilityExperts": "_experts",
    "LoRAExpertRegressor": "_lora",
    "ArmoRM": "_armorm",
    "VerbosityDecorrelator": "_decorrelation",
    "GatedScalarizer": "_gating",
    "MultiObjectiveRegressor": "_multiobjective",
    "ObjectiveUnion": "_union",
    "PersistenceError": "_persistence",
    "load": "_persistence",
    "register_safe_class": "_persistence",
    "save": "_persistence",
    "write_model_card": "_model_card",
    "CapabilityLabeler": "_judge",
    "JudgeAuthenticationError": "_judge",
    "OpenAIChatBackend": "_judge",
    "TransformersChatBackend": "_judge",
    "TaskRouter": "_router",
    "CapabilityAggregator": "_dmoerm",
    "CapabilityMoE": "_dmoerm",
    "DMoERM": "_dmoerm",
    "RewardEnsemble": "ensemble",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rmkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # static analysers and IDEs see ordinary imports (re-exports)
    from ._armorm import ArmoRM  # noqa: F401
    from ._backbones import EMBEDDED_BACKBONE, cache_dir, resolve_backbone  # noqa: F401
    from ._decorrelation import VerbosityDecorrelator  # noqa: F401
    from ._dmoerm import CapabilityAggregator, CapabilityMoE, DMoERM  # noqa: F401
    from .ensemble import RewardEnsemble  # noqa: F401
    from ._experts import CapabilityExperts  # noqa: F401
    from ._featurizer import BackboneFeaturizer, split_feature_blocks  # noqa: F401
    from ._gating import GatedScalarizer  # noqa: F401
    from ._judge import CapabilityLabeler, JudgeAuthenticationError, OpenAIChatBackend, TransformersChatBackend  # noqa: F401
    from ._lora import LoRAExpertRegressor  # noqa: F401
    from ._multiobjective import MultiObjectiveRegressor  # noqa: F401
    from ._union import ObjectiveUnion  # noqa: F401
    from ._model_card import write_model_card  # noqa: F401
    from ._persistence import PersistenceError, load, register_safe_class, save  # noqa: F401
    from ._router import TaskRouter  # noqa: F401
