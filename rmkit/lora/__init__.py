"""LoRA reward models on a frozen backbone (DMoERM's experts).

* :class:`LoRAExpertRegressor`: one adapter and a value head, trained on
  pairs (Bradley–Terry) or ratings.
* :class:`CapabilityExperts`: one adapter per capability on one shared
  backbone (and a shared frozen trunk when only the top layers adapt).

Layout: ``_layers`` (where LoRA goes), ``_module`` (the runtime module),
``_net`` (the skorch net that trains one adapter), ``_base`` (what both
estimators share), ``_regressor`` and ``_experts`` (the estimators).
"""

from ._experts import CapabilityExperts
from ._layers import default_target_modules, resolve_lora_layers
from ._regressor import LoRAExpertRegressor

__all__ = ["CapabilityExperts", "LoRAExpertRegressor", "default_target_modules", "resolve_lora_layers"]
