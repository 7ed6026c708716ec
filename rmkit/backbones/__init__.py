"""Frozen decoder backbones and the features read from them.

:func:`resolve_backbone` finds a backbone by name (the embedded SmolLM2, a
local folder, a cached hub id); :class:`BackboneFeaturizer` turns prompt +
response text into the last-token hidden state of a chosen layer (ArmoRM's
features), sharing each prompt's forward pass between its responses and
caching results on disk.
"""

from ._featurizer import BackboneFeaturizer, split_feature_blocks
from ._loading import (
                       EMBEDDED_BACKBONE,
                       cache_dir,
                       cpu_has_native_bf16,
                       load_backbone,
                       load_tokenizer,
                       resolve_backbone,
                       resolve_device,
                       resolve_dtype,
                       weights_fingerprint,
)
from ._templating import Encoded, encode_conversation, encode_prompt

__all__ = ["EMBEDDED_BACKBONE", "BackboneFeaturizer", "Encoded", "cache_dir", "cpu_has_native_bf16",
           "encode_conversation", "encode_prompt", "load_backbone", "load_tokenizer", "resolve_backbone",
           "resolve_device", "resolve_dtype", "split_feature_blocks", "weights_fingerprint"]
