"""Reward models in the RLHF loop: a scoring server and reward functions for trainers.

* :func:`reward_function` / :func:`as_reward_function`: a callable with TRL's
  reward-function signature that scores completions in-process.
* :func:`create_app`, :func:`serve`, :func:`running_server`: an HTTP server
  (FastAPI + uvicorn, ``pip install 'rmkit[serve]'``) with OpenRLHF's
  ``/get_reward``, structured ``/score``, ``/health`` and ``/metrics``, and
  dynamic batching across concurrent requests. ``rmkit serve MODEL_DIR`` runs
  it from the command line.
* :class:`RewardClient`: an async client (httpx) for that server.
* :func:`split_query` / :class:`QuerySplitter`: how a rendered
  ``prompt + response`` string is split back into messages and a response.

Nothing here imports FastAPI, uvicorn or httpx until it is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "reward_function": "_adapters",
    "as_reward_function": "_adapters",
    "ServeConfig": "_app",
    "create_app": "_app",
    "serve": "_app",
    "running_server": "_app",
    "RewardClient": "_client",
    "RewardServerError": "_client",
    "QuerySplitError": "_queries",
    "QuerySplitter": "_queries",
    "split_query": "_queries",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rmkit.serving' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from ._adapters import as_reward_function, reward_function  # noqa: F401
    from ._app import ServeConfig, create_app, running_server, serve  # noqa: F401
    from ._client import RewardClient, RewardServerError  # noqa: F401
    from ._queries import QuerySplitError, QuerySplitter, split_query  # noqa: F401
