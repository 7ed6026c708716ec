import sys

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from rmkit import plotting  # noqa: E402
from rmkit.metrics import rewardbench_scores  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _heights(container):
    return [float(p.get_height()) for p in container]


def test_missing_matplotlib_gives_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"pip install 'rmkit\[plot\]'"):
        plotting.plot_rewardbench({"m": {"Chat": 0.5}})


def test_gating_heatmap_averages_per_category():
    rng = np.random.RandomState(0)
    w = rng.dirichlet([1, 1, 1], size=30)
    cats = np.array(["math", "chat", "safety"])[rng.randint(3, size=30)]
    frame = pd.DataFrame(w, columns=["correct", "helpful", "verbosity"])
    ax = plotting.plot_gating_heatmap(frame, cats)
    expected = frame.groupby(cats).mean()
    np.testing.assert_allclose(ax.images[0].get_array(), expected.to_numpy())
    assert [t.get_text() for t in ax.get_yticklabels()] == list(expected.index)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["correct", "helpful", "verbosity"]
    assert len(ax.texts) == expected.size  # one annotation per cell
    assert f"{expected.iloc[0, 0]:.2f}" == ax.texts[0].get_text()


def test_gating_heatmap_aggregated_input_and_errors():
    agg = pd.DataFrame([[0.2, 0.8]], index=["code"], columns=["a", "b"])
    _, ax = plt.subplots()
    assert plotting.plot_gating_heatmap(agg, annotate=False, ax=ax) is ax
    assert len(ax.texts) == 0 and [t.get_text() for t in ax.get_yticklabels()] == ["code"]
    with pytest.raises(ValueError, match="categories has 2 entries for 3 rows"):
        plotting.plot_gating_heatmap(np.ones((3, 2)), ["a", "b"])
    with pytest.raises(ValueError, match="NaN"):
        plotting.plot_gating_heatmap(np.array([[np.nan, 1.0]]))
    with pytest.raises(ValueError, match="3 objective names for 2 weight columns"):
        plotting.plot_gating_heatmap(np.ones((3, 2)), objectives=["a", "b", "c"])


def test_pair_coefficients_bars():
    ax = plotting.plot_pair_coefficients(pd.Series([0.5, -0.25], index=["helpful", "verbose"]),
                                         np.array([0.1, 0.3]), title="pair 7")
    assert _heights(ax.containers[0]) == [0.5, -0.25] and _heights(ax.containers[1]) == [0.1, 0.3]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["helpful", "verbose"]
    assert ax.get_title() == "pair 7"
    # dicts are aligned by name, not by order
    ax = plotting.plot_pair_coefficients({"a": 1.0, "b": 2.0}, {"b": 20.0, "a": 10.0})
    assert _heights(ax.containers[1]) == [10.0, 20.0]
    with pytest.raises(ValueError, match="different objectives"):
        plotting.plot_pair_coefficients({"a": 1.0}, {"b": 1.0})
    with pytest.raises(ValueError, match="chosen has 2 objectives but rejected has 3"):
        plotting.plot_pair_coefficients([1.0, 2.0], [1.0, 2.0, 3.0])
    ax = plotting.plot_pair_coefficients([1.0, 2.0])
    assert len(ax.containers) == 1 and ax.get_xticklabels()[1].get_text() == "objective 1"


def test_decorrelation_reports_spearman():
    rng = np.random.RandomState(1)
    v = rng.normal(size=300)
    before = rng.normal(size=300) + 2 * v
    after = before - 2 * v
    axes = plotting.plot_decorrelation(v, before, after, objective="helpfulness")
    for ax, values in zip(axes, (before, after)):
        rho = spearmanr(values, v).statistic
        assert ax.get_title().endswith(f"{rho:.3f}")
        np.testing.assert_allclose(ax.collections[0].get_offsets(), np.c_[v, values])
        assert ax.get_ylabel() == "helpfulness"
    assert float(axes[0].get_title().split("=")[1]) > 0.8 > abs(float(axes[1].get_title().split("=")[1]))
    with pytest.raises(ValueError, match="after has 2 values but verbosity has 300"):
        plotting.plot_decorrelation(v, before, [1.0, 2.0])


def test_rewardbench_from_scores_with_errorbars(tmp_path):
    df = pd.DataFrame({"category": ["Chat"] * 4 + ["Safety"] * 4, "subset": ["a", "a", "b", "b"] * 2})
    good = rewardbench_scores(df, [1, 1, 1, 0, 1, 1, 0, 0], [0] * 8)
    bad = rewardbench_scores(df, [0, 0, 1, 0, 0, 0, 0, 1], [0] * 8)
    ax = plotting.plot_rewardbench({"good": good, "bad": bad})
    assert [t.get_text() for t in ax.get_xticklabels()] == ["Chat", "Safety", "Overall"]
    bars = [c for c in ax.containers if type(c).__name__ == "BarContainer"]
    np.testing.assert_allclose(_heights(bars[0]), [0.75, 0.5, good["overall"]])
    np.testing.assert_allclose(_heights(bars[1]), [0.25, 0.25, bad["overall"]])
    assert any(type(c).__name__ == "ErrorbarContainer" for c in ax.containers)
    assert ax.get_legend_handles_labels()[1] == ["good", "bad"]
    ax.figure.savefig(tmp_path / "rb.png")
    assert (tmp_path / "rb.png").read_bytes()[:4] == b"\x89PNG"


def test_rewardbench_from_frame_and_section_order():
    frame = pd.DataFrame({"Chat": [0.9, 0.6], "Reasoning": [0.7, np.nan]}, index=["m1", "m2"])
    ax = plotting.plot_rewardbench(frame, sections=["Reasoning", "Chat"])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["Reasoning", "Chat"]
    assert _heights(ax.containers[0]) == [0.7, 0.9]
    assert np.isnan(_heights(ax.containers[1])[0])  # m2 has no Reasoning score: no bar
    with pytest.raises(ValueError, match="non-empty"):
        plotting.plot_rewardbench({})
    with pytest.raises(TypeError, match="must be a dict of section"):
        plotting.plot_rewardbench({"m": 0.5})


def test_best_of_n_curves_from_results(tmp_path):
    from rmkit.evaluation import best_of_n

    rng = np.random.default_rng(0)
    data = pd.DataFrame({"prompt_id": np.repeat(np.arange(20), 6), "gold": rng.normal(size=120)})
    results = {"oracle": best_of_n("gold", data, n_values=(1, 2, 4), n_draws=20, n_boot=50, random_state=0),
               "noise": best_of_n(rng.normal(size=120), data, n_values=(1, 2, 4), n_draws=20, n_boot=50,
                                  random_state=0)}
    ax = plotting.plot_best_of_n(results)
    lines = ax.get_lines()
    assert [ln.get_label() for ln in lines[:2]] == ["oracle", "noise"]
    np.testing.assert_allclose(lines[0].get_ydata(), results["oracle"]["gold"])
    np.testing.assert_allclose(lines[0].get_xdata(), [1, 2, 4])
    assert ax.get_xscale() == "log" and len(ax.collections) == 2  # one bootstrap band per model
    assert lines[-1].get_ydata()[0] == pytest.approx(results["oracle"]["gold"].iloc[0])  # gold@1 baseline
    ax2 = plotting.plot_best_of_n(results, x="kl_bon", intervals=False)
    np.testing.assert_allclose(ax2.get_lines()[1].get_xdata(), results["noise"]["kl_bon"])
    assert len(ax2.collections) == 0
    ax2.figure.savefig(tmp_path / "bon.png")
    assert (tmp_path / "bon.png").stat().st_size > 0
    with pytest.raises(ValueError, match="x must be"):
        plotting.plot_best_of_n(results, x="N")
    with pytest.raises(ValueError, match="has no column 'gold'"):
        plotting.plot_best_of_n({"m": {"n": [1, 2]}})
