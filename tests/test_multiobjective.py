import numpy as np
import pandas as pd
import pytest
from sklearn.exceptions import NotFittedError
from sklearn.utils.estimator_checks import parametrize_with_checks

from rmkit import MultiObjectiveRegressor


@parametrize_with_checks([MultiObjectiveRegressor(layout="flat", random_state=0)])
def test_sklearn_compatible(estimator, check):
    # layout="pointwise" (the default) reads only the response half of [response | prompt] rows, which
    # the generic checks' arbitrary matrices are not; "flat" is the same estimator on plain features.
    check(estimator)


def _linear(rng, n=200, p=6):
    X = rng.normal(size=(n, p))
    w = rng.normal(size=(2, p))
    return X, X @ w.T


def test_nan_masking_fits_each_objective_on_its_labelled_rows():
    rng = np.random.RandomState(0)
    X, Y = _linear(rng)
    Y[:120, 1] = np.nan  # objective 1 labelled on 80 rows only
    mor = MultiObjectiveRegressor(layout="flat").fit(X, Y)
    assert mor.n_labelled_.tolist() == [200, 80]
    Xt, Yt = _linear(np.random.RandomState(0), n=200)  # same weights, same rows
    pred = mor.predict(Xt, original_units=True)
    # the masked rows were neither dropped for objective 0 nor imputed for objective 1:
    # both recover the noise-free linear truth, including on rows objective 1 never saw
    np.testing.assert_allclose(pred[:, 0], Yt[:, 0], atol=0.05)
    np.testing.assert_allclose(pred[:120, 1], Yt[:120, 1], atol=0.05)
    # imputing the missing labels (e.g. with the mean) would have pulled objective 1 towards a constant
    imputed = np.where(np.isnan(Y[:, 1]), np.nanmean(Y[:, 1]), Y[:, 1])
    bad = MultiObjectiveRegressor(layout="flat").fit(X, imputed).predict(Xt, original_units=True)
    assert np.abs(bad[:120] - Yt[:120, 1]).mean() > 10 * np.abs(pred[:120, 1] - Yt[:120, 1]).mean()


def test_label_scaling_maps_back_and_names_come_from_the_frame():
    rng = np.random.RandomState(1)
    X = rng.normal(size=(150, 4))
    y = pd.DataFrame({"quality": 50 + 10 * X[:, 0], "safety": -3 + 0.1 * X[:, 1]})
    mor = MultiObjectiveRegressor(layout="flat").fit(X, y)
    assert list(mor.objective_names_) == ["quality", "safety"]
    z = mor.predict(X)
    assert np.allclose(z.std(axis=0), 1, atol=0.05)  # standardised scale: objectives comparable
    np.testing.assert_allclose(mor.predict(X, original_units=True), y.to_numpy(), atol=0.05)
    frame = mor.predict_frame(X)
    assert list(frame.columns) == ["quality", "safety"] and np.allclose(frame.to_numpy(), z)
    raw = MultiObjectiveRegressor(layout="flat", scale_labels=False).fit(X, y)
    np.testing.assert_allclose(raw.predict(X), y.to_numpy(), atol=0.05)


def test_alpha_chosen_per_objective_by_cv():
    rng = np.random.RandomState(2)
    X = rng.normal(size=(80, 30))
    clean = X[:, 0]
    noise = rng.normal(size=80) * 5 + 0.05 * X[:, 1]  # almost pure noise: wants heavy shrinkage
    mor = MultiObjectiveRegressor(layout="flat").fit(X, np.c_[clean, noise])
    assert mor.alpha_[0] < mor.alpha_[1]
    assert set(mor.alpha_) <= set(np.logspace(-4, 4, 9))


def test_pairwise_objectives_mix_with_rated_ones():
    rng = np.random.RandomState(3)
    d = 5
    w = rng.normal(size=d)

    def pairs(n):
        a, b, p = rng.normal(size=(n, d)), rng.normal(size=(n, d)), rng.normal(size=(n, d))
        a_wins = (a @ w > b @ w)[:, None]
        return np.hstack([np.where(a_wins, a, b), np.where(a_wins, b, a), p])

    X = rng.normal(size=(100, 2 * d))  # pointwise rows [response | prompt]
    y = pd.DataFrame({"rated": X[:, 0]})
    mor = MultiObjectiveRegressor(random_state=0).fit(X, y, pair_objectives={"judge": pairs(300)})
    assert list(mor.objective_names_) == ["rated", "judge"]
    assert list(mor.objective_kinds_) == ["rating", "pairwise"]
    test = pairs(400)
    chosen = mor.predict(np.hstack([test[:, :d], test[:, 2 * d:]]))
    rejected = mor.predict(np.hstack([test[:, d:2 * d], test[:, 2 * d:]]))
    assert np.mean(chosen[:, 1] > rejected[:, 1]) > 0.9  # the BT probe ranks held-out pairs
    # the prompt block is not used by the heads (it is stage 2's input)
    shuffled = np.hstack([test[:, :d], rng.normal(size=(400, d))])
    np.testing.assert_allclose(mor.predict(shuffled), chosen)


def test_seed_reproduces_pairwise_probe():
    rng = np.random.RandomState(4)
    c, r = rng.normal(size=(60, 4)) + 0.3, rng.normal(size=(60, 4))
    fit = lambda seed: MultiObjectiveRegressor(layout="flat", random_state=seed).fit(  # noqa: E731
        None, pair_objectives={"a": (c, r), "b": (r + 0.1, c)})
    np.testing.assert_array_equal(fit(0).coef_, fit(0).coef_)
    assert not np.array_equal(fit(0).coef_, fit(1).coef_)  # the seed is what fixes the folds and swaps


@pytest.mark.parametrize("bad, match", [
    (lambda X, Y: (X, np.c_[Y[:, 0], np.full(len(Y), np.nan)]), "objective_1.*no labelled rows"),
    (lambda X, Y: (X[:-1], Y), "different numbers of rows"),
    (lambda X, Y: (X, None), "requires y"),
])
def test_bad_inputs(bad, match):
    X, Y = _linear(np.random.RandomState(5), n=40)
    with pytest.raises(ValueError, match=match):
        MultiObjectiveRegressor(layout="flat").fit(*bad(X, Y))


def test_layout_errors_and_unfitted_use():
    X = np.zeros((10, 5))
    with pytest.raises(ValueError, match="even width"):
        MultiObjectiveRegressor().fit(X, np.arange(10.0))
    with pytest.raises(NotFittedError):
        MultiObjectiveRegressor().predict(np.zeros((2, 4)))
    mor = MultiObjectiveRegressor().fit(np.random.RandomState(0).normal(size=(20, 4)), np.arange(20.0))
    with pytest.raises(ValueError, match="features"):
        mor.predict(np.zeros((2, 6)))  # pair features passed where pointwise rows are expected
    with pytest.raises(ValueError, match="multiple of 3"):
        MultiObjectiveRegressor().fit(None, pair_objectives={"x": np.zeros((20, 4))})
    with pytest.raises(ValueError, match="identical"):
        MultiObjectiveRegressor(layout="flat").fit(None, pair_objectives={"x": (np.ones((20, 3)), np.ones((20, 3)))})
    with pytest.raises(ValueError, match="Nothing to fit"):
        MultiObjectiveRegressor().fit(None)
