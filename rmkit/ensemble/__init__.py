"""Reward-model ensembles: several members, one combined reward.

:class:`RewardEnsemble` fits K reward models (given explicitly, or built from
one template by seeds, prompt-grouped bootstrap resamples or parameter
variations) and combines their standardised rewards by the mean, the minimum
(worst-case optimisation) or ``mean - lam * std`` (uncertainty-weighted
optimisation). :class:`BradleyTerryProbe` is a linear Bradley–Terry reward
head on :class:`~rmkit.BackboneFeaturizer` features, a cheap member.
"""

from ._ensemble import COMBINERS, RewardEnsemble
from ._probe import BradleyTerryProbe

__all__ = ["COMBINERS", "BradleyTerryProbe", "RewardEnsemble"]
