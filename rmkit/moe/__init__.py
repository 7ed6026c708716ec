"""DMoERM's double-layer mixture of experts (Quan 2024).

* :class:`TaskRouter`: the outer, sparse layer: routes each prompt to its
  task's model (any reward model per task).
* :class:`CapabilityMoE`: the inner, dense layer for one task: capability
  LoRA experts (:class:`rmkit.CapabilityExperts`) and an aggregator.
* :class:`CapabilityAggregator`: the MLP over the experts' hidden states.
* :func:`merge_task_adapter`: phase 1, the task-level fine-tune as a merged
  backbone folder.
* :class:`DMoERM`: the recipe, a router over one ``CapabilityMoE`` per task.
"""

from ._aggregator import AggregatorModule, CapabilityAggregator
from ._capability_moe import CapabilityMoE
from ._dmoerm import DMoERM
from ._router import TaskRouter
from ._task_adapter import merge_task_adapter

__all__ = ["AggregatorModule", "CapabilityAggregator", "CapabilityMoE", "DMoERM", "TaskRouter",
           "merge_task_adapter"]
