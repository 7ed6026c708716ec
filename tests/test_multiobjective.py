import numpy as np
import pandas as pd
import pytest
from sklearn.exceptions import NotFittedError
from sklearn.utils.estimator_checks import parametrize_with_checks

from rmkit import MultiObjectiveRegressor
from rmkit.layout import make_frame, read_layout


@parametrize_with_checks([MultiObjectiveRegressor(random_state=0)], expected_failed_checks=lambda est: {
    "check_sample_weight_equivalence_on_dense_data":
        "the penalty is chosen by cross-validation grouped by prompt; a duplicated row is another group, so "
        "weight 2 and a duplicate land in different folds and may pick a different alpha",
})
def test_sklearn_compatible(estimator, check):
    # on plain arrays every column is a feature (feature frames are tested below)
    check(estimator)


def _linear(rng, n=200, p=6):
    X = rng.normal(size=(n, p))
    w = rng.normal(size=(2, p))
    return X, X @ w.T


def test_nan_masking_fits_each_objective_on_its_labelled_rows():
    rng = np.random.RandomState(0)
    X, Y = _linear(rng)
    Y[:120, 1] = np.nan  # objective 1 labelled on 80 rows only
    mor = MultiObjectiveRegressor().fit(X, Y)
    assert mor.n_labelled_.tolist() == [200, 80]
    Xt, Yt = _linear(np.random.RandomState(0), n=200)  # same weights, same rows
    pred = mor.predict(Xt, original_units=True)
    # the masked rows were neither dropped for objective 0 nor imputed for objective 1:
    # both recover the noise-free linear truth, including on rows objective 1 never saw
    np.testing.assert_allclose(pred[:, 0], Yt[:, 0], atol=0.05)
    np.testing.assert_allclose(pred[:120, 1], Yt[:120, 1], atol=0.05)
    # imputing the missing labels (e.g. with the mean) would have pulled objective 1 towards a constant
    imputed = np.where(np.isnan(Y[:, 1]), np.nanmean(Y[:, 1]), Y[:, 1])
    bad = MultiObjectiveRegressor().fit(X, imputed).predict(Xt, original_units=True)
    assert np.abs(bad[:120] - Yt[:120, 1]).mean() > 10 * np.abs(pred[:120, 1] - Yt[:120, 1]).mean()


def test_label_scaling_maps_back_and_names_come_from_the_frame():
    rng = np.random.RandomState(1)
    X = rng.normal(size=(150, 4))
    y = pd.DataFrame({"quality": 50 + 10 * X[:, 0], "safety": -3 + 0.1 * X[:, 1]})
    mor = MultiObjectiveRegressor().fit(X, y)
    assert list(mor.objective_names_) == ["quality", "safety"]
    z = mor.predict(X)
    assert np.allclose(z.std(axis=0), 1, atol=0.05)  # standardised scale: objectives comparable
    np.testing.assert_allclose(mor.predict(X, original_units=True), y.to_numpy(), atol=0.05)
    frame = mor.predict_frame(X)
    assert list(frame.columns) == ["quality", "safety"] and np.allclose(frame.to_numpy(), z)
    raw = MultiObjectiveRegressor(scale_labels=False).fit(X, y)
    np.testing.assert_allclose(raw.predict(X), y.to_numpy(), atol=0.05)


def test_alpha_chosen_per_objective_by_cv():
    rng = np.random.RandomState(2)
    X = rng.normal(size=(80, 30))
    clean = X[:, 0]
    noise = rng.normal(size=80) * 5 + 0.05 * X[:, 1]  # almost pure noise: wants heavy shrinkage
    mor = MultiObjectiveRegressor().fit(X, np.c_[clean, noise])
    assert mor.alpha_[0] < mor.alpha_[1]
    assert set(mor.alpha_) <= set(np.logspace(-4, 4, 9))


def _pair_frame(rng, n, d, w, prompts=None):
    """Pairs whose preferred side has the larger ``features @ w``; prompts repeat 4 times."""
    a, b, p = rng.normal(size=(n, d)), rng.normal(size=(n, d)), rng.normal(size=(n, d))
    a_wins = (a @ w > b @ w)[:, None]
    groups = np.arange(n) // 4 if prompts is None else prompts
    return make_frame({("chosen", "h", range(d)): np.where(a_wins, a, b),
                       ("rejected", "h", range(d)): np.where(a_wins, b, a), ("prompt", "h", range(d)): p,
                       ("chosen", "m", ("tokens",)): np.full(n, 10.0), ("rejected", "m", ("tokens",)): np.full(n, 9.0),
                       ("prompt", "m", ("group",)): groups})


@pytest.mark.slow
def test_feature_frames_rated_and_pairwise_objectives_keep_pair_structure_and_prompt_block():
    rng = np.random.RandomState(3)
    d = 5
    w = rng.normal(size=d)
    P = _pair_frame(rng, 300, d, w)
    sources = np.where(np.arange(300) % 2, "judge", "other")
    mor = MultiObjectiveRegressor(random_state=0).fit(P, sources=sources)
    assert list(mor.objective_names_) == ["other", "judge"] and set(mor.objective_kinds_) == {"pairwise"}
    test = _pair_frame(rng, 400, d, w)
    out = mor.transform(test)
    lay = read_layout(out, step="test")
    assert lay.kind == "pairs" and lay.names("chosen", "r") == ["other", "judge"]
    assert np.mean(out["chosen:r:judge"] > out["rejected:r:judge"]) > 0.9  # ranks held-out pairs
    np.testing.assert_array_equal(out["prompt:h:0"], test["prompt:h:0"])  # the gate's input travels along
    np.testing.assert_array_equal(out["prompt:m:group"], test["prompt:m:group"])
    assert mor.score(test) > 0.9
    # rated objectives on pointwise rows score the sides of pairs by name
    rows = make_frame({("response", "h", range(d)): rng.normal(size=(100, d)),
                       ("prompt", "h", range(d)): rng.normal(size=(100, d))})
    rated = MultiObjectiveRegressor().fit(rows, pd.DataFrame({"first": rows["response:h:0"]}))
    np.testing.assert_allclose(rated.transform(test)["rejected:r:first"],
                               rated.predict(make_frame({("response", "h", range(d)): test.filter(like="rejected:h:").to_numpy(),
                                                         ("prompt", "h", range(d)): np.zeros((400, d))}))[:, 0])


@pytest.mark.slow
def test_pair_labels_orient_pairs_and_sample_weight_is_used():
    rng = np.random.RandomState(7)
    d = 4
    w = rng.normal(size=d)
    P = _pair_frame(rng, 200, d, w)
    y = np.ones(200, dtype=int)
    y[::2] = 0  # claim the other side is preferred for half the pairs
    swapped = P.copy()
    for i in range(d):
        c, r = P[f"chosen:h:{i}"].to_numpy().copy(), P[f"rejected:h:{i}"].to_numpy().copy()
        swapped[f"chosen:h:{i}"] = np.where(y == 0, r, c)
        swapped[f"rejected:h:{i}"] = np.where(y == 0, c, r)
    a = MultiObjectiveRegressor(random_state=0).fit(P)
    b = MultiObjectiveRegressor(random_state=0).fit(swapped, y)
    np.testing.assert_allclose(a.coef_, b.coef_, rtol=1e-6)  # the same preferences, told by y
    weighted = MultiObjectiveRegressor(random_state=0).fit(P, sample_weight=np.r_[np.ones(100), np.full(100, 5.0)])
    assert not np.allclose(weighted.coef_, a.coef_)


@pytest.mark.slow
def test_cross_fit_gives_out_of_fold_rewards_grouped_by_prompt():
    rng = np.random.RandomState(8)
    d = 6
    P = _pair_frame(rng, 240, d, rng.normal(size=d))
    mor = MultiObjectiveRegressor(cross_fit=4, random_state=0)
    oof = mor.fit_transform(P)
    full = mor.transform(P)
    assert not np.allclose(oof["chosen:r:preference"], full["chosen:r:preference"])
    # every row is scored by a probe fitted without its prompt: reproduce fold by fold
    from rmkit.model_selection import PromptGroupKFold, prompt_groups

    groups = prompt_groups(P)
    seen = np.zeros(len(P), dtype=int)
    for train, test in PromptGroupKFold(4, random_state=np.random.RandomState(0).randint(2**31 - 1)).split(P):
        assert not set(groups[train]) & set(groups[test])
        seen[test] += 1
    assert (seen == 1).all()
    # in-sample rewards look better on the training pairs than out-of-fold ones
    acc = lambda R: np.mean(R["chosen:r:preference"] > R["rejected:r:preference"])  # noqa: E731
    assert acc(full) >= acc(oof)


@pytest.mark.slow
def test_seed_reproduces_pairwise_probe():
    rng = np.random.RandomState(4)
    P = _pair_frame(rng, 60, 4, rng.normal(size=4))
    fit = lambda seed: MultiObjectiveRegressor(random_state=seed).fit(P)  # noqa: E731
    np.testing.assert_array_equal(fit(0).coef_, fit(0).coef_)
    assert not np.array_equal(fit(0).coef_, fit(1).coef_)  # the seed is what fixes the folds and swaps


@pytest.mark.parametrize("bad, match", [
    (lambda X, Y: (X, np.c_[Y[:, 0], np.full(len(Y), np.nan)]), "objective_1.*0 labelled rows"),
    (lambda X, Y: (X[:-1], Y), "different numbers of rows"),
    (lambda X, Y: (X, None), "requires y"),
])
def test_bad_inputs(bad, match):
    X, Y = _linear(np.random.RandomState(5), n=40)
    with pytest.raises(ValueError, match=match):
        MultiObjectiveRegressor().fit(*bad(X, Y))


def test_wrong_layout_is_refused_with_a_clear_error_instead_of_training():
    rng = np.random.RandomState(0)
    P = _pair_frame(rng, 40, 4, rng.normal(size=4))
    with pytest.raises(NotFittedError):
        MultiObjectiveRegressor().predict(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="not rmkit feature blocks"):
        MultiObjectiveRegressor().fit(P.rename(columns={"chosen:h:0": "x"}))
    with pytest.raises(ValueError, match="needs their ratings as y"):
        MultiObjectiveRegressor().fit(make_frame({("response", "h", range(3)): np.zeros((5, 3))}))
    with pytest.raises(ValueError, match="sources= needs a feature frame"):
        MultiObjectiveRegressor().fit(np.zeros((8, 3)), np.arange(8.0), sources=["a"] * 8)
    mor = MultiObjectiveRegressor().fit(P)
    with pytest.raises(ValueError, match="fitted on 4 hidden-state features"):
        mor.transform(_pair_frame(rng, 10, 6, rng.normal(size=6)))  # another backbone's width
    with pytest.raises(ValueError, match="identical"):
        same = P.copy()
        for i in range(4):
            same[f"rejected:h:{i}"] = same[f"chosen:h:{i}"]
        MultiObjectiveRegressor().fit(same)
    with pytest.raises(ValueError, match="all values are missing"):
        MultiObjectiveRegressor().fit(P, sources=[None] * 40)


def test_cross_fit_by_source_accepts_pairs_without_a_source():
    """Pairs with no source (None) are no objective's; the stratified folds must not choke on them (pandas 3)."""
    rng = np.random.RandomState(9)
    P = _pair_frame(rng, 90, 4, rng.normal(size=4))
    sources = np.array(["a", "b", None] * 30, dtype=object)
    oof = MultiObjectiveRegressor(cross_fit=3, random_state=0).fit_transform(P, sources=sources)
    assert [c for c in oof.columns if c.startswith("chosen:r:")] == ["chosen:r:a", "chosen:r:b"]
    assert np.isfinite(oof.filter(like=":r:").to_numpy()).all()
