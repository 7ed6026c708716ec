import joblib
import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.frozen import FrozenEstimator
from sklearn.model_selection import GridSearchCV, KFold, cross_val_score

from rmkit import (
    ArmoRM,
    BackboneFeaturizer,
    GatedScalarizer,
    MultiObjectiveRegressor,
    VerbosityDecorrelator,
)
from rmkit.datasets import make_preference_pairs
from rmkit.model_selection import PromptGroupKFold

# ArmoRM takes text, so scikit-learn's check_estimator (array inputs) does not apply; its array-level
# components are checked in test_multiobjective.py and test_decorrelation.py.

GATE = dict(hidden_size=16, n_hidden_layers=1, batch_size=32, lr=3e-2, max_epochs=15, validation_fraction=None)


def _side(pairs, side):
    return pairs[["prompt", side]].rename(columns={side: "response"})


@pytest.fixture(scope="module")
def featurizer(tiny, tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("features"))
    return BackboneFeaturizer(tiny, cache=cache, verbose=0, max_length=128)


@pytest.fixture(scope="module")
def pairs():
    return make_preference_pairs(60, random_state=0)


@pytest.fixture(scope="module")
def ratings(pairs):
    """Pointwise rows with three sparse rating columns (NaN = not rated by that source)."""
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


@pytest.mark.slow
def test_end_to_end_contract_on_pairs_and_pointwise(model, pairs):
    assert list(model.objective_names_) == ["math", "safety", "relevance", "verbosity"]
    assert list(model.pipeline_.named_steps) == ["featurizer", "objectives", "decorrelator", "gate"]
    chosen, rejected = model.predict(_side(pairs, "chosen")), model.predict(_side(pairs, "rejected"))
    margin = model.decision_function(pairs)
    np.testing.assert_allclose(margin, chosen - rejected, atol=1e-5)
    np.testing.assert_allclose(model.predict_proba(pairs)[:, 1], 1 / (1 + np.exp(-margin)), atol=1e-6)
    np.testing.assert_array_equal(model.predict(pairs), (margin > 0).astype(int))
    assert model.score(pairs) == np.mean(margin > 0)
    np.testing.assert_allclose(model.reward_pairs(pairs), np.c_[chosen, rejected], atol=1e-5)


def test_recipe_equals_its_pipeline_of_public_parts(model, pairs):
    pipe = model.pipeline_
    np.testing.assert_allclose(pipe.decision_function(pairs), model.decision_function(pairs), atol=1e-6)
    np.testing.assert_allclose(pipe.predict(_side(pairs, "chosen")), model.predict(_side(pairs, "chosen")),
                               atol=1e-6)
    assert pipe.score(pairs) == model.score(pairs)


def test_explanations_sum_to_the_score(model, pairs):
    frame = model.explain(pairs.head(5))
    assert set(frame["side"]) == {"chosen", "rejected"} and len(frame) == 5 * 2 * 4
    per = frame.groupby(["row", "side"])
    np.testing.assert_allclose(per["contribution"].sum(), per["score"].first(), atol=1e-5)
    np.testing.assert_allclose(per["gating_weight"].sum(), 1, atol=1e-6)
    scores = model.reward_pairs(pairs.head(5))
    np.testing.assert_allclose(per["score"].first().unstack()[["chosen", "rejected"]], scores, atol=1e-5)
    arrays = model.explain(pairs.head(5), as_frame=False)
    np.testing.assert_allclose((arrays["chosen"]["rewards"] * arrays["chosen"]["coefficients"]).sum(1),
                               scores[:, 0], atol=1e-5)


def test_decorrelation_applies_to_the_length_objective(model, pairs):
    dec = model.decorrelator_
    assert dec.verbosity_index_ == 3
    assert np.all(dec.spearman_after_[:3] <= dec.threshold + 1e-12)
    rewards = model.objective_rewards(_side(pairs, "chosen"))
    assert list(rewards.columns) == list(model.objective_names_)
    tokens = model.featurizer_.transform(_side(pairs, "chosen"))["response:m:tokens"]
    np.testing.assert_allclose(rewards["verbosity"], (np.log1p(tokens) - dec.length_mean_) / dec.length_scale_,
                               atol=1e-6)
    # the featurizer's token count is the response's own length (+ the template's closing tokens)
    lengths = np.asarray([len(t.encode()) for t in pairs["chosen"]])  # tiny backbone: one token per byte
    assert np.all(np.asarray(tokens) - lengths == (np.asarray(tokens) - lengths)[0])


@pytest.mark.slow
def test_ratings_path_prefit_stage1_and_pairwise_together(featurizer, pairs, ratings):
    kwargs = dict(gating=GatedScalarizer(**GATE), decorrelator=VerbosityDecorrelator(drop_verbosity=True),
                  random_state=0)
    a = ArmoRM(featurizer, **kwargs).fit(pairs, ratings=ratings)
    assert list(a.objective_names_) == ["math_grade", "safety_grade", "other_grade", "verbosity"]
    assert list(a.gated_names_) == ["math_grade", "safety_grade", "other_grade"]
    rated = a.objectives_.named_transformers["rated"].estimator
    assert rated.n_labelled_.tolist() == [40, 40, 40]
    mor = MultiObjectiveRegressor(random_state=rated.random_state).fit(
        clone(featurizer).fit().transform(ratings[["prompt", "response"]]), ratings.iloc[:, 2:])
    b = ArmoRM(featurizer, objectives=FrozenEstimator(mor), **kwargs).fit(pairs)
    np.testing.assert_allclose(b.decision_function(pairs), a.decision_function(pairs), atol=1e-6)
    frame = b.explain(pairs.head(2))  # verbosity is not gated when dropped: its gating weight is missing
    assert frame.loc[frame["objective"] == "verbosity", "gating_weight"].isna().all()
    # a prefit rated stage 1 and pairwise probes under one gate (refused before)
    both = ArmoRM(featurizer, objectives=FrozenEstimator(mor), pair_objective_column="category", cv=2,
                  **kwargs).fit(pairs)
    assert list(both.objective_names_) == ["math_grade", "safety_grade", "other_grade", "math", "safety",
                                           "relevance", "verbosity"]


@pytest.mark.slow
def test_cross_fitting_is_grouped_by_prompt_and_accepts_any_grouped_splitter(featurizer, pairs, monkeypatch):
    from rmkit.model_selection import _split, prompt_groups

    calls = []
    original = _split.PromptGroupKFold.split

    def spy(self, X, y=None, groups=None):
        g = _split.resolve_groups(X, groups)
        for train, test in original(self, X, y, groups):
            calls.append((set(g[train]), set(g[test])))
            yield train, test

    monkeypatch.setattr(_split.PromptGroupKFold, "split", spy)
    model = ArmoRM(featurizer, pair_objective_column="category", gating=GatedScalarizer(**GATE),
                   cv=PromptGroupKFold(3, random_state=1), random_state=0).fit(pairs)
    assert calls and all(not (tr & te) for tr, te in calls)
    assert sum(1 for tr, te in calls if te & set(prompt_groups(pairs))) >= 3  # the cross-fitting folds ran
    with pytest.raises(ValueError, match="without grouping by prompt"):
        ArmoRM(featurizer, pair_objective_column="category", cv=KFold(3)).fit(pairs)
    assert model.score(pairs) > 0.5


def test_model_selection_and_persistence(featurizer, pairs, ratings, tmp_path):
    mor = MultiObjectiveRegressor(random_state=0).fit(
        clone(featurizer).fit().transform(ratings[["prompt", "response"]]), ratings.iloc[:, 2:])
    model = ArmoRM(featurizer, objectives=FrozenEstimator(mor), gating=GatedScalarizer(**GATE), random_state=0)
    assert clone(model).objectives.estimator is mor  # clone keeps the prefit stage 1
    folds = PromptGroupKFold(2)
    scores = cross_val_score(model, pairs, cv=folds)
    manual = [clone(model).fit(pairs.iloc[tr]).score(pairs.iloc[te]) for tr, te in folds.split(pairs)]
    np.testing.assert_allclose(scores, manual)
    grid = GridSearchCV(model, {"gating__temperature": [0.5, 2.0]}, cv=folds).fit(pairs)
    assert grid.best_estimator_.gating_.module_.temperature == grid.best_params_["gating__temperature"]
    fitted = grid.best_estimator_
    path = tmp_path / "armorm.joblib"
    joblib.dump(fitted, path)
    np.testing.assert_array_equal(joblib.load(path).decision_function(pairs), fitted.decision_function(pairs))


@pytest.mark.slow
def test_batch_size_invariance_and_seeds(featurizer, pairs, model):
    p = model.decision_function(pairs)
    other = clone(model).set_params(featurizer=clone(featurizer).set_params(batch_size=1, cache=False))
    other.fit(pairs)  # same seed, features recomputed one text at a time
    np.testing.assert_allclose(other.decision_function(pairs), p, atol=1e-4)
    reseeded = clone(model).set_params(random_state=1).fit(pairs)
    assert not np.allclose(reseeded.decision_function(pairs), p)


def test_bad_inputs(featurizer, pairs, ratings):
    with pytest.raises(ValueError, match="identical chosen and rejected"):
        ArmoRM(featurizer, pair_objective_column="category").fit(pairs.assign(rejected=pairs["chosen"]))
    with pytest.raises(ValueError, match="Stage 1 has no data"):
        ArmoRM(featurizer).fit(pairs)
    with pytest.raises(ValueError, match="0 labelled rows"):
        ArmoRM(featurizer).fit(pairs, ratings=ratings.assign(other_grade=np.nan))
    with pytest.raises(ValueError, match="missing the column 'source'"):
        ArmoRM(featurizer, pair_objective_column="source").fit(pairs)
    with pytest.raises(ValueError, match="rating column"):
        ArmoRM(featurizer, rating_columns=["nope"]).fit(pairs, ratings=ratings)
    with pytest.raises(NotFittedError):
        ArmoRM(featurizer, objectives=FrozenEstimator(MultiObjectiveRegressor())).fit(pairs)
    with pytest.raises(NotFittedError):
        ArmoRM(featurizer).predict(pairs)
