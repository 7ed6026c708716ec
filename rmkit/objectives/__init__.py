"""Objective providers, their decorrelation and the gate that mixes them (ArmoRM).

* :class:`MultiObjectiveRegressor`: ridge heads on absolute ratings (stage 1)
  or Bradley–Terry probes per source on pairs; emits one reward per objective.
* :class:`ObjectiveUnion`: joins several providers' objectives by name.
* :class:`VerbosityDecorrelator`: subtracts λ_i·verbosity from each objective.
* :class:`GatedScalarizer`: the prompt-conditioned gate (stage 2).
* :class:`ArmoRM`: the recipe, a pipeline of the four.
"""

from ._armorm import ArmoRM, response_token_lengths
from ._decorrelation import VerbosityDecorrelator
from ._gating import GatedScalarizer, GatingModule
from ._multiobjective import DEFAULT_ALPHAS, MultiObjectiveRegressor
from ._union import ObjectiveUnion

__all__ = ["DEFAULT_ALPHAS", "ArmoRM", "GatedScalarizer", "GatingModule", "MultiObjectiveRegressor",
           "ObjectiveUnion", "VerbosityDecorrelator", "response_token_lengths"]
