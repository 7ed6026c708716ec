"""rmkit: reward-model recipes (ArmoRM, DMoERM) as scikit-learn estimators."""

from ._backbones import EMBEDDED_BACKBONE, cache_dir, resolve_backbone
from ._featurizer import BackboneFeaturizer, split_feature_blocks

__version__ = "0.1.0"

__all__ = [
    "BackboneFeaturizer",
    "EMBEDDED_BACKBONE",
    "cache_dir",
    "resolve_backbone",
    "split_feature_blocks",
]
