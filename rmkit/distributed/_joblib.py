"""joblib's Ray backend for scikit-learn searches over rmkit estimators."""

from __future__ import annotations

import contextlib

from ._featurize import require_ray

__all__ = ["ray_backend"]


@contextlib.contextmanager
def ray_backend(address=None, **init_kwargs):
    """Run scikit-learn's parallel work (``n_jobs``) on a Ray cluster.

    Connects to Ray (``ray.init(address, **init_kwargs)``) unless it is
    already running, registers joblib's Ray backend
    (:func:`ray.util.joblib.register_ray`) and makes it the active joblib
    backend inside the block. On exit, Ray is shut down if this call started
    it. ``GridSearchCV(..., n_jobs=-1)`` / ``cross_validate(..., n_jobs=-1)``
    inside the block then fit their candidates as Ray tasks.

    Each Ray worker is a separate process: a search over a whole ``ArmoRM``
    fits a featurizer per process. Compute the features once before the
    search (:func:`rmkit.distributed.featurize`, or ``transform``) and search
    over the stages that take arrays, or give the featurizer a warm on-disk
    cache; see the "Scale out" how-to.

    Parameters
    ----------
    address : str, optional
        The cluster to join (``"auto"``, ``"ray://host:10001"``); ``None``
        starts a local Ray instance when none is running.
    **init_kwargs
        Passed to :func:`ray.init` (``num_cpus``, ``include_dashboard``, ...).

    Examples
    --------
    >>> import joblib
    >>> from rmkit.distributed import ray_backend
    >>> with ray_backend(num_cpus=2, include_dashboard=False):  # doctest: +SKIP
    ...     joblib.Parallel(n_jobs=2)(joblib.delayed(abs)(i) for i in (-1, -2))
    [1, 2]

    (Skipped in the doctests because starting Ray takes several seconds;
    ``tests/test_distributed.py`` runs a ``GridSearchCV`` under it.)
    """
    import joblib

    ray = require_ray()
    from ray.util.joblib import register_ray

    started = False
    if not ray.is_initialized():
        ray.init(address=address, **init_kwargs)
        started = True
    try:
        register_ray()
        with joblib.parallel_backend("ray"):
            yield
    finally:
        if started:
            ray.shutdown()
