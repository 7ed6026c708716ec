import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr
from sklearn.utils.estimator_checks import parametrize_with_checks

from rmkit import VerbosityDecorrelator
from rmkit.objectives._decorrelation import DEFAULT_LAMBDAS


@parametrize_with_checks([VerbosityDecorrelator(verbosity=-1), VerbosityDecorrelator(verbosity=-1, drop_verbosity=False)])
def test_sklearn_compatible(estimator, check):
    check(estimator)


def _rewards(n=800, seed=0):
    rng = np.random.RandomState(seed)
    length = rng.normal(size=n)
    return pd.DataFrame({
        "helpful": rng.normal(size=n) + 0.9 * length,  # length-biased
        "honest": rng.normal(size=n) + 0.3 * length,
        "concise": rng.normal(size=n) - 0.5 * length,  # already anti-correlated
        "verbosity": length,
    })


@pytest.mark.parametrize("threshold", [0.03, 0.1])
def test_spearman_brought_under_threshold_with_smallest_lambda(threshold):
    R = _rewards()
    dec = VerbosityDecorrelator("verbosity", threshold=threshold).fit(R)
    out = dec.transform(R)
    v = R["verbosity"].to_numpy()
    for i, name in enumerate(["helpful", "honest", "concise"]):
        rho = spearmanr(out[:, i], v).statistic
        assert rho <= threshold + 1e-12
        lam = dec.lambdas_[i]
        if lam > 0:  # the grid value just below does not reach the threshold: λ is the smallest
            prev = DEFAULT_LAMBDAS[np.searchsorted(DEFAULT_LAMBDAS, lam) - 1]
            assert spearmanr(R[name] - prev * v, v).statistic > threshold
    assert dec.lambdas_[0] > dec.lambdas_[1] > 0
    assert dec.lambdas_[2] == 0 and dec.lambdas_[3] == 0  # nothing to remove; verbosity itself untouched
    assert dec.spearman_before_[0] > threshold and np.all(dec.spearman_after_[:3] <= threshold)


def test_transform_matrix_structure_and_drop():
    R = _rewards()
    dec = VerbosityDecorrelator("verbosity", drop_verbosity=False).fit(R)
    T = dec.transform_matrix_
    expected = np.eye(4)
    expected[3, :3] = -dec.lambdas_[:3]
    np.testing.assert_allclose(T, expected)
    np.testing.assert_allclose(dec.transform(R), R.to_numpy() @ T)
    np.testing.assert_allclose(dec.transform(R)[:, 3], R["verbosity"])
    dropped = VerbosityDecorrelator("verbosity").fit(R)  # the default: nothing downstream sees length itself
    assert dropped.drop_verbosity and dropped.transform_matrix_.shape == (4, 3)
    assert list(dropped.get_feature_names_out()) == ["helpful", "honest", "concise"]
    np.testing.assert_allclose(dropped.transform(R), dec.transform(R)[:, :3])


def test_grid_too_short_warns_with_best_effort():
    R = _rewards()
    with pytest.warns(UserWarning, match="extend `lambdas`"):
        dec = VerbosityDecorrelator(-1, lambdas=[0.0, 0.1]).fit(R)
    assert dec.lambdas_[0] == 0.1


@pytest.mark.parametrize("kwargs, R, match", [
    ({"verbosity": -1}, np.random.RandomState(0).normal(size=(20, 1)), "at least two objectives"),
    ({"verbosity": "nope"}, _rewards(), "not a column"),
    ({"verbosity": "length"}, _rewards(), "needs a feature frame with token counts"),
    ({"verbosity": 5}, _rewards(), "index"),
    ({"verbosity": -1}, np.c_[np.arange(10.0), np.ones(10)], "constant"),
    ({"verbosity": -1, "lambdas": [0.5, 0.1]}, _rewards(), "increasing"),
])
def test_bad_inputs(kwargs, R, match):
    with pytest.raises(ValueError, match=match):
        VerbosityDecorrelator(**kwargs).fit(R)


def test_frame_mode_derives_verbosity_from_token_counts_and_carries_the_prompt_block():
    from rmkit.layout import make_frame, read_layout

    rng = np.random.RandomState(0)
    n = 300
    tokens_c, tokens_r = rng.randint(5, 400, size=n), rng.randint(5, 400, size=n)
    lc, lr = np.log1p(tokens_c), np.log1p(tokens_r)
    quality_c, quality_r = rng.normal(size=n) + 0.9 * lc, rng.normal(size=n) + 0.9 * lr  # length-biased
    other_c, other_r = rng.normal(size=n), rng.normal(size=n)
    prompt = rng.normal(size=(n, 3))
    R = make_frame({("chosen", "r", ("quality", "other")): np.c_[quality_c, other_c],
                    ("rejected", "r", ("quality", "other")): np.c_[quality_r, other_r],
                    ("prompt", "h", range(3)): prompt, ("chosen", "m", ("tokens",)): tokens_c,
                    ("rejected", "m", ("tokens",)): tokens_r, ("prompt", "m", ("group",)): np.arange(n)})
    dec = VerbosityDecorrelator(threshold=0.03).fit(R)
    assert list(dec.objective_names_) == ["quality", "other", "verbosity"]
    assert dec.lambdas_[0] > 0 and dec.spearman_after_[0] <= 0.03 < dec.spearman_before_[0]
    out = dec.transform(R)
    lay = read_layout(out, step="test")
    assert lay.names("chosen", "r") == ["quality", "other"]  # verbosity itself is left out by default
    np.testing.assert_allclose(lay.block(out, "prompt", "h", np.float64), prompt)  # carried through
    v = (lc - dec.length_mean_) / dec.length_scale_
    np.testing.assert_allclose(out["chosen:r:quality"], quality_c - dec.lambdas_[0] * v, rtol=1e-6)
    dropped = VerbosityDecorrelator(drop_verbosity=True).fit(R).transform(R)
    assert read_layout(dropped, step="test").names("rejected", "r") == ["quality", "other"]
    with pytest.raises(ValueError, match="token counts"):
        VerbosityDecorrelator().fit(R.drop(columns=["chosen:m:tokens"]))
