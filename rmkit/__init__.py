"""rmkit: reward-model recipes (ArmoRM, DMoERM) as scikit-learn estimators."""

from ._backbones import EMBEDDED_BACKBONE, cache_dir, resolve_backbone
from ._featurizer import BackboneFeaturizer, split_feature_blocks
from ._experts import CapabilityExperts
from ._lora import LoRAExpertRegressor
from ._armorm import ArmoRM
from ._decorrelation import VerbosityDecorrelator
from ._gating import GatedScalarizer
from ._multiobjective import MultiObjectiveRegressor
from ._persistence import PersistenceError, load, register_safe_class, save
from ._judge import CapabilityLabeler, JudgeAuthenticationError, OpenAIChatBackend, TransformersChatBackend
from ._router import TaskRouter
from ._dmoerm import CapabilityAggregator, CapabilityMoE, DMoERM

__version__ = "0.1.0"

__all__ = [
    "CapabilityAggregator",
    "CapabilityLabeler",
    "CapabilityMoE",
    "DMoERM",
    "JudgeAuthenticationError",
    "OpenAIChatBackend",
    "TaskRouter",
    "TransformersChatBackend",
    "PersistenceError",
    "load",
    "register_safe_class",
    "save",
    "ArmoRM",
    "GatedScalarizer",
    "MultiObjectiveRegressor",
    "VerbosityDecorrelator",
    "BackboneFeaturizer",
    "CapabilityExperts",
    "LoRAExpertRegressor",
    "EMBEDDED_BACKBONE",
    "cache_dir",
    "resolve_backbone",
    "split_feature_blocks",
]
