"""Every example script runs end to end on the tiny backbone (the embedded one is for humans)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import requires_data

ROOT = Path(__file__).resolve().parents[1]
TINY = {**os.environ, "RMKIT_EXAMPLES_BACKBONE": "rmkit-tiny", "PYTHONUNBUFFERED": "1"}


def _run(*args, timeout=900):
    out = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=TINY, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_quickstart_fits_scores_explains_and_round_trips():
    out = _run("examples/quickstart.py", "--tiny", "--n", "45")
    assert "held-out pairwise accuracy" in out
    assert "predictions identical = True" in out


@pytest.mark.slow
@requires_data
def test_armorm_example_reports_rewardbench_sections():
    out = _run("examples/armorm.py", "--n-pairs", "80", "--n-ratings", "40", "--n-eval", "60")
    assert "Overall" in out or "overall" in out


@pytest.mark.slow
@requires_data
def test_dmoerm_example_reports_routing_and_pairwise_accuracy():
    out = _run("examples/dmoerm.py", "--n-train", "12", "--n-test", "6", "--epochs", "1", "--dtype", "float32",
               "--max-length", "128")
    assert "routing accuracy" in out.lower() and "pairwise accuracy" in out.lower()


@pytest.mark.slow
def test_gridsearch_example_runs_on_cached_features():
    out = _run("examples/gridsearch_gating.py", "--synthetic", "--n-pairs", "40", "--n-eval", "20")
    assert "best" in out.lower()


@pytest.mark.slow
def test_score_cli_example():
    out = _run("examples/score_jsonl.py")
    assert out.strip()
