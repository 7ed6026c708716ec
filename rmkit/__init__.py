"""rmkit: reward-model recipes (ArmoRM, DMoERM) as scikit-learn estimators.

The public names are imported on first use (PEP 562), so ``import rmkit`` and
``python -m rmkit --help`` do not pay for torch, transformers and skorch
until an estimator is touched.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the subpackage that exports it
_EXPORTS = {
    "EMBEDDED_BACKBONE": "backbones",
    "cache_dir": "backbones",
    "resolve_backbone": "backbones",
    "BackboneFeaturizer": "backbones",
    "split_feature_blocks": "backbones",
    "CapabilityExperts": "lora",
    "LoRAExpertRegressor": "lora",
    "ArmoRM": "objectives",
    "VerbosityDecorrelator": "objectives",
    "GatedScalarizer": "objectives",
    "MultiObjectiveRegressor": "objectives",
    "ObjectiveUnion": "objectives",
    "PersistenceError": "persistence",
    "load": "persistence",
    "register_safe_class": "persistence",
    "save": "persistence",
    "write_model_card": "persistence",
    "CapabilityLabeler": "judge",
    "JudgeAuthenticationError": "judge",
    "OpenAIChatBackend": "judge",
    "TransformersChatBackend": "judge",
    "TaskRouter": "moe",
    "CapabilityAggregator": "moe",
    "CapabilityMoE": "moe",
    "DMoERM": "moe",
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
    from .backbones import (  # noqa: F401
        EMBEDDED_BACKBONE,
        BackboneFeaturizer,
        cache_dir,
        resolve_backbone,
        split_feature_blocks,
    )
    from .ensemble import RewardEnsemble  # noqa: F401
    from .judge import (  # noqa: F401
        CapabilityLabeler,
        JudgeAuthenticationError,
        OpenAIChatBackend,
        TransformersChatBackend,
    )
    from .lora import CapabilityExperts, LoRAExpertRegressor  # noqa: F401
    from .moe import CapabilityAggregator, CapabilityMoE, DMoERM, TaskRouter  # noqa: F401
    from .objectives import (  # noqa: F401
        ArmoRM,
        GatedScalarizer,
        MultiObjectiveRegressor,
        ObjectiveUnion,
        VerbosityDecorrelator,
    )
    from .persistence import (  # noqa: F401
        PersistenceError,
        load,
        register_safe_class,
        save,
        write_model_card,
    )
