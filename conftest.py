"""Collection rules for the doctests under ``rmkit/`` (the tests' own fixtures are in ``tests/conftest.py``)."""

import importlib.util

# Doctests that start a server need the ``serve`` extra; without it they are not collected (the GPU
# machine, say, has no uvicorn). CI installs the extra, so there they run.
collect_ignore_glob = []
if importlib.util.find_spec("uvicorn") is None or importlib.util.find_spec("fastapi") is None:
    collect_ignore_glob += ["rmkit/serving/_app.py", "rmkit/serving/_client.py"]
