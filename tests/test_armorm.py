import joblib
import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.frozen import FrozenEstimator
from sklearn.model_selection import GridSearchCV, KFold, cross_val_score

from rmkit import ArmoRM, BackboneFeaturizer, GatedScalarizer, MultiObjectiveRegressor, VerbosityDecorrelator
from rmkit.datasets import make_preference_pairs

# ArmoRM takes text, so scikit-learn's check_estimator (array inputs) does not apply; its array-level
# components are checked in test_multiobjective.py and test_decorrelation.py.

GATE = dict(hidden_size=16, n_hidden_layers=1, batch_size=32, lr=3e-2, max_epochs=15, validation_fraction=None)



@pytest.fixture(scope="module")
def featurizer(tiny, tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("features"))
    return BackboneFeaturizer(tiny, cache=cache, verbose=0, max_length=128)


@pytest.fixture(scope="module")
def pairs():
    return make_preference_pairs(60, random_state=0)


@pytest.fixture(scope="module")
def ratings(pairs):
    """Pointwise rows with two sparse rating columns (NaN = not rated by that source)."""
    rows = pd.concat([
        pairs[["prompt", "chosen", "category"]].rename(columns={"chosen": "response"}).assign(good=1.0),
        pairs[["prompt", "rejected", "category"]].rename(columns={"rejected": "response"}).assign(good=0.0),
    ], ignore_index=True)
    rows["math_grade"] = np.where(rows["category"] == "math", rows["good"] * 9 + 1, np.nan)
    rows["safety_grade"] = np.where(rows["category"] == "safety", rows["good"] * 4 + 1, np.nan)
    rows["other_grade"] = np.where(rows["category"] == "relevance", rows["good"], np.nan)
    return rows.drop(columns=["good", "category"])


@pytest.fixture(scope="module")
def model(featurizer, pairs):
    return ArmoRM(featurizer, pair_objective_column="category", gating=GatedScalarizer(**GATE), cv=2,
                  random_state=0).fit(pairs)


def test_end_to_end_scores_pairs_and_pointwise(model, pairs):
    assert list(model.objective_names_) == ["math", "safety", "relevance", "verbosity"]
    p = model.predict(pairs)
    assert p.shape == (60,) and np.all((p >= 0) & (p <= 1))
    assert model.score(pairs) == np.mean(p > 0.5)
    chosen = model.predict(pairs[["prompt", "chosen"]].rename(columns={"chosen": "response"}))
    rejected = model.predict(pairs[["prompt", "rejected"]].rename(columns={"rejected": "response"}))
    np.testing.assert_allclose(1 / (1 + np.exp(rejected - chosen)), p, atol=1e-6)
    np.testing.assert_allclose(model.decision_function(pairs), np.c_[chosen, rejected], atol=1e-6)


def test_explanations_sum_to_the_score(model, pairs):
    frame = model.explain(pairs.head(5))
    assert set(frame["side"]) == {"chosen", "rejected"} and len(frame) == 5 * 2 * 4
    per = frame.groupby(["row", "side"])
    np.testing.assert_allclose(per["contribution"].sum(), per["score"].first(), atol=1e-5)
    np.testing.assert_allclose(per["gating_weight"].sum(), 1, atol=1e-6)
    scores = model.decision_function(pairs.head(5))
    np.testing.assert_allclose(per["score"].first().unstack()[["chosen", "rejected"]], scores, atol=1e-5)
    arrays = model.explain(pairs.head(5), as_frame=False)
    np.testing.assert_allclose((arrays["chosen"]["rewards"] * arrays["chosen"]["coefficients"]).sum(1),
                               scores[:, 0], atol=1e-5)


def test_decorrelation_applies_to_the_length_objective(model, pairs):
    dec = model.decorrelator_
    assert dec.verbosity_index_ == 3
    assert np.all(dec.spearman_after_[:3] <= dec.threshold + 1e-12)
    rewards = model.objective_rewards(pairs[["prompt", "chosen"]].rename(columns={"chosen": "response"}))
    assert list(rewards.columns) == list(model.objective_names_)
    lengths = np.log1p([len(t) for t in pairs["chosen"]])  # tiny backbone: one token per byte (ASCII)
    np.testing.assert_allclose(rewards["verbosity"], (lengths - model.length_mean_) / model.length_scale_,
                               atol=1e-6)


def test_ratings_path_and_prefit_stage1_agree(featurizer, pairs, ratings):
    kwargs = dict(gating=GatedScalarizer(**GATE), decorrelator=VerbosityDecorrelator(drop_verbosity=True),
                  random_state=0)
    a = ArmoRM(featurizer, **kwargs).fit(pairs, ratings=ratings)
    assert list(a.objective_names_) == ["math_grade", "safety_grade", "other_grade", "verbosity"]
    assert list(a.gated_names_) == ["math_grade", "safety_grade", "other_grade"]
    assert a.objectives_.n_labelled_.tolist() == [40, 40, 40]
    mor = MultiObjectiveRegressor(random_state=a.objectives_.random_state).fit(
        clone(featurizer).fit().transform(ratings[["prompt", "response"]]), ratings.iloc[:, 2:])
    b = ArmoRM(featurizer, objectives=FrozenEstimator(mor), **kwargs).fit(pairs)
    np.testing.assert_allclose(b.predict(pairs), a.predict(pairs), atol=1e-6)
    # verbosity is not gated when dropped: its gating weight is missing, its coefficient is -Σ λ·g·β
    frame = b.explain(pairs.head(2))
    assert frame.loc[frame["objective"] == "verbosity", "gating_weight"].isna().all()


def test_model_selection_and_persistence(featurizer, pairs, ratings, tmp_path):
    mor = MultiObjectiveRegressor(random_state=0).fit(
        clone(featurizer).fit().transform(ratings[["prompt", "response"]]), ratings.iloc[:, 2:])
    model = ArmoRM(featurizer, objectives=FrozenEstimator(mor), gating=GatedScalarizer(**GATE), random_state=0)
    assert clone(model).objectives.estimator is mor  # clone keeps the prefit stage 1
    folds = KFold(2, shuffle=True, random_state=0)
    scores = cross_val_score(model, pairs, cv=folds)
    manual = [clone(model).fit(pairs.iloc[tr]).score(pairs.iloc[te]) for tr, te in folds.split(pairs)]
    np.testing.assert_allclose(scores, manual)
    grid = GridSearchCV(model, {"gating__temperature": [0.5, 2.0]}, cv=folds).fit(pairs)
    assert grid.best_estimator_.gating_.module_.temperature == grid.best_params_["gating__temperature"]
    fitted = grid.best_estimator_
    path = tmp_path / "armorm.joblib"
    joblib.dump(fitted, path)
    np.testing.assert_array_equal(joblib.load(path).predict(pairs), fitted.predict(pairs))


def test_batch_size_invariance_and_seeds(featurizer, pairs, model):
    p = model.predict(pairs)
    other = clone(model).set_params(featurizer=clone(featurizer).set_params(batch_size=1, cache=False))
    other.fit(pairs)  # same seed, features recomputed one text at a time
    np.testing.assert_allclose(other.predict(pairs), p, atol=1e-4)
    reseeded = clone(model).set_params(random_state=1).fit(pairs)
    assert not np.allclose(reseeded.predict(pairs), p)


def test_bad_inputs(featurizer, pairs, ratings):
    with pytest.raises(ValueError, match="identical chosen and rejected"):
        ArmoRM(featurizer, pair_objective_column="category").fit(pairs.assign(rejected=pairs["chosen"]))
    with pytest.raises(ValueError, match="at least two stage-1 objectives"):
        ArmoRM(featurizer, pair_objective_column="category", cv=None).fit(pairs[pairs["category"] == "math"])
    with pytest.raises(ValueError, match="Stage 1 has no data"):
        ArmoRM(featurizer).fit(pairs)
    with pytest.raises(ValueError, match="no labelled rows"):
        ArmoRM(featurizer).fit(pairs, ratings=ratings.assign(other_grade=np.nan))
    with pytest.raises(ValueError, match="missing the column 'source'"):
        ArmoRM(featurizer, pair_objective_column="source").fit(pairs)
    with pytest.raises(ValueError, match="rating column"):
        ArmoRM(featurizer, rating_columns=["nope"]).fit(pairs, ratings=ratings)
    mor = MultiObjectiveRegressor()
    with pytest.raises(NotFittedError):
        ArmoRM(featurizer, objectives=FrozenEstimator(mor)).fit(pairs)
    with pytest.raises(NotFittedError):
        ArmoRM(featurizer).predict(pairs)
