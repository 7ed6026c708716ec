"""Featurisation and searches beyond one process, on Ray (``pip install 'rmkit[ray]'``).

- :func:`featurize` shards a dataset over a Ray Data actor pool (one
  backbone per actor, GPUs when present) and writes resumable Parquet shards;
  :func:`load_features` reads them back aligned with the input rows.
- :func:`ray_backend` runs scikit-learn searches (``n_jobs``) on a Ray
  cluster through joblib's Ray backend.

Ray is imported only when one of these runs: ``import rmkit.distributed``
needs neither Ray nor torch.
"""

from ._featurize import FeatureShards, featurize
from ._joblib import ray_backend
from ._shards import IncompleteFeaturesError, load_features

__all__ = ["FeatureShards", "IncompleteFeaturesError", "featurize", "load_features", "ray_backend"]
