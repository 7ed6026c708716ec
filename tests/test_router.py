import numpy as np
import pandas as pd
import pytest
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.dummy import DummyRegressor
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.tree import DecisionTreeClassifier

from rmkit import BackboneFeaturizer
from rmkit.datasets import make_preference_pairs
from rmkit.moe._router import TaskRouter

CODES = {"math": 1.0, "safety": 2.0, "relevance": 3.0}


class Recorder(RegressorMixin, BaseEstimator):
    """Remembers the rows it was fitted on; predicts the code of the task it saw."""

    def fit(self, X, y=None):
        self.tasks_seen_ = set(X["task"])
        self.prompts_seen_ = list(X["prompt"])
        self.y_seen_ = None if y is None else np.asarray(y)
        (task,) = self.tasks_seen_ if len(self.tasks_seen_) == 1 else ("mixed",)
        self.code_ = CODES.get(task, -1.0)
        return self

    def predict(self, X):
        return np.full(len(X), self.code_)


def _data(n, seed):
    return make_preference_pairs(n, random_state=seed).rename(columns={"category": "task"})


def test_routing_recovered_on_separable_prompts(tiny):
    train, test = _data(30, 0), _data(30, 1)
    router = TaskRouter(Recorder(), featurizer=BackboneFeaturizer(tiny, cache=False, verbose=0)).fit(train)
    assert router.routing_accuracy(test) == 1.0
    proba = router.predict_route_proba(test)
    assert proba.shape == (30, 3)
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-5)
    assert list(router.classes_[proba.argmax(1)]) == list(test["task"])


def test_each_inner_model_only_sees_its_task_rows():
    train = _data(30, 0)
    y = np.arange(30.0)
    router = TaskRouter(Recorder(), featurizer=TfidfVectorizer()).fit(train, y)
    assert set(router.estimators_) == set(CODES)
    for task, est in router.estimators_.items():
        mask = (train["task"] == task).to_numpy()
        assert est.tasks_seen_ == {task}
        assert est.prompts_seen_ == list(train.loc[mask, "prompt"])
        np.testing.assert_array_equal(est.y_seen_, y[mask])
    assert router.task_counts_ == {"math": 10, "relevance": 10, "safety": 10}


def test_predict_returns_rows_in_original_order():
    train = _data(30, 0)
    test = _data(30, 2).sample(frac=1.0, random_state=0)  # shuffled, non-contiguous index
    router = TaskRouter(Recorder(), featurizer=TfidfVectorizer()).fit(train)
    pred = router.predict(test)
    np.testing.assert_array_equal(pred, test["task"].map(CODES).to_numpy())
    # Explicit task labels override the router (oracle routing).
    forced = router.predict_for_tasks(test, ["math"] * len(test))
    np.testing.assert_array_equal(forced, np.full(len(test), CODES["math"]))


def test_any_classifier_can_route():
    train, test = _data(30, 0), _data(30, 3)
    router = TaskRouter(Recorder(), router=DecisionTreeClassifier(random_state=0), featurizer=TfidfVectorizer())
    assert router.fit(train).routing_accuracy(test) > 0.9
    assert isinstance(router.router_, DecisionTreeClassifier)


def test_dict_of_estimators_and_fallback():
    train = _data(30, 0)
    y = train["chosen"].str.len().to_numpy(float)
    ests = {"math": DummyRegressor(strategy="constant", constant=-1.0), "safety": Recorder()}
    with pytest.raises(ValueError, match=r"no entry for task\(s\) \['relevance'\]"):
        TaskRouter(ests, featurizer=TfidfVectorizer()).fit(train, y)
    with pytest.raises(ValueError, match="no training row has"):
        TaskRouter({**ests, "relevance": Recorder(), "poetry": Recorder()}, featurizer=TfidfVectorizer()).fit(train, y)
    router = TaskRouter(ests, featurizer=TfidfVectorizer(), fallback=DummyRegressor()).fit(train, y)
    assert router.fallback_tasks_ == ["relevance"]
    test = _data(9, 4)
    pred = router.predict(test)
    np.testing.assert_array_equal(pred[test["task"] == "math"], -1.0)
    np.testing.assert_array_equal(pred[test["task"] == "safety"], CODES["safety"])
    np.testing.assert_allclose(pred[test["task"] == "relevance"], y.mean())  # fallback fitted on all rows


def test_task_with_too_few_rows():
    train = pd.concat([_data(30, 0), _data(3, 5).iloc[[1]].assign(task="rare")], ignore_index=True)
    with pytest.raises(ValueError, match=r"\['rare'\] have fewer than min_task_rows=2"):
        TaskRouter(Recorder(), featurizer=TfidfVectorizer()).fit(train)
    router = TaskRouter(Recorder(), featurizer=TfidfVectorizer(), fallback=Recorder()).fit(train)
    assert router.fallback_tasks_ == ["rare"] and router.estimators_["rare"].tasks_seen_ == set(CODES) | {"rare"}
    assert "rare" in router.classes_


def test_unknown_task_at_predict_is_an_error():
    router = TaskRouter(Recorder(), featurizer=TfidfVectorizer()).fit(_data(30, 0))
    test = _data(6, 1)
    with pytest.raises(ValueError, match=r"Unknown task\(s\) \['poetry'\]: never seen in fit"):
        router.predict_for_tasks(test, ["poetry"] * 6)
    with pytest.raises(ValueError, match=r"Unknown task\(s\) \['poetry'\]"):
        router.routing_accuracy(test.assign(task="poetry"))
    with pytest.raises(ValueError, match="3 entries for 6 rows"):
        router.predict_for_tasks(test, ["math"] * 3)


def test_bad_inputs():
    train = _data(12, 0)
    with pytest.raises(ValueError, match="missing the task column 'task'"):
        TaskRouter(Recorder(), featurizer=TfidfVectorizer()).fit(train.drop(columns="task"))
    with pytest.raises(ValueError, match="missing value at row 2"):
        TaskRouter(Recorder(), featurizer=TfidfVectorizer()).fit(train.assign(task=[*"ab", None, *"c" * 9]))
    with pytest.raises(ValueError, match="12 rows but y has 3"):
        TaskRouter(Recorder(), featurizer=TfidfVectorizer()).fit(train, [1, 2, 3])
    with pytest.raises(TypeError, match="estimators must be"):
        TaskRouter("ridge", featurizer=TfidfVectorizer()).fit(train)
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        TaskRouter(Recorder()).predict(train)


def test_single_task_routes_everything_to_it():
    train = _data(12, 0).assign(task="math")
    router = TaskRouter(Recorder(), featurizer=TfidfVectorizer()).fit(train)
    assert router.router_ is None and list(router.predict_route(train)) == ["math"] * 12
    np.testing.assert_array_equal(router.predict(train), 1.0)
