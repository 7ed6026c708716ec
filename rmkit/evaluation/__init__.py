"""Evaluating reward models the way a policy uses them.

:func:`best_of_n` measures over-optimisation: how the true (gold) quality of
the response a reward model picks among N samples changes as N grows, against
N and against the best-of-N KL divergence :func:`kl_bon`.
"""

from ._best_of_n import best_of_n, kl_bon

__all__ = ["best_of_n", "kl_bon"]
