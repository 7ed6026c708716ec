"""Reward models composed from public parts: Pipelines, unions, prompt-grouped model selection."""

import joblib
import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone
from sklearn.ensemble import StackingRegressor, VotingRegressor
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import LinearRegression
from sklearn.model_selection import GridSearchCV, cross_val_score, cross_validate
from sklearn.pipeline import Pipeline

import rmkit
from rmkit import (
    ArmoRM,
    BackboneFeaturizer,
    CapabilityExperts,
    GatedScalarizer,
    MultiObjectiveRegressor,
    ObjectiveUnion,
    VerbosityDecorrelator,
)
from rmkit.datasets import make_preference_pairs
from rmkit.layout import read_layout
from rmkit.model_selection import PromptGroupKFold, prompt_groups, shuffle_pair_sides

GATE = dict(hidden_size=16, n_hidden_layers=1, batch_size=32, lr=3e-2, max_epochs=15, validation_fraction=None,
            random_state=0)


def _side(pairs, side):
    return pairs[["prompt", side]].rename(columns={side: "response"})


@pytest.fixture(scope="module")
def featurizer(tiny, tmp_path_factory):
    return BackboneFeaturizer(tiny, cache=str(tmp_path_factory.mktemp("features")), verbose=0, max_length=128)


@pytest.fixture(scope="module")
def pairs():
    return make_preference_pairs(60, random_state=0)


def armorm_pipeline(featurizer, drop_verbosity=True, **gate):
    """The README's ArmoRM as a Pipeline of public parts."""
    return Pipeline([
        ("featurizer", clone(featurizer)),
        ("probes", MultiObjectiveRegressor(cross_fit=2, random_state=0)),
        ("decorrelator", VerbosityDecorrelator(drop_verbosity=drop_verbosity)),
        ("gate", GatedScalarizer(**{**GATE, **gate})),
    ])


@pytest.mark.slow
def test_readme_pipeline_fit_predict_save_load_joblib(featurizer, pairs, tmp_path):
    pipe = armorm_pipeline(featurizer).fit(pairs, probes__sources=pairs["category"])
    assert list(pipe.named_steps["gate"].objective_names_) == ["math", "safety", "relevance"]
    rc, rr = pipe.predict(_side(pairs, "chosen")), pipe.predict(_side(pairs, "rejected"))
    np.testing.assert_allclose(pipe.decision_function(pairs), rc - rr, atol=1e-5)
    assert pipe.score(pairs) == np.mean(rc > rr)
    rmkit.save(pipe, tmp_path / "model")
    loaded = rmkit.load(tmp_path / "model")
    # the loaded featurizer recomputes features (float32, other batches): equal to float32 precision
    np.testing.assert_allclose(loaded.decision_function(pairs), pipe.decision_function(pairs), atol=1e-5)
    joblib.dump(loaded, tmp_path / "model.joblib")
    np.testing.assert_allclose(joblib.load(tmp_path / "model.joblib").predict(_side(pairs, "chosen")), rc, atol=1e-5)


@pytest.mark.slow
def test_stock_scorers_work_on_labelled_pairs(featurizer, pairs):
    X, y = shuffle_pair_sides(pairs, random_state=0)
    cv = PromptGroupKFold(2)
    out = cross_validate(armorm_pipeline(featurizer), X, y, cv=cv, scoring=["accuracy", "roc_auc", "neg_log_loss"],
                         params={"probes__sources": X["category"]}, return_estimator=True)
    for (train, test), est, acc, auc in zip(cv.split(X), out["estimator"], out["test_accuracy"], out["test_roc_auc"]):
        margin = est.decision_function(X.iloc[test])
        assert acc == pytest.approx(np.mean((margin > 0) == (y[test] == 1)))
        from sklearn.metrics import roc_auc_score

        assert auc == pytest.approx(roc_auc_score(y[test], margin))
    assert np.all(out["test_neg_log_loss"] < 0)


@pytest.mark.slow
def test_voting_and_stacking_regressors_accept_rmkit_models(featurizer, pairs):
    a = armorm_pipeline(featurizer, drop_verbosity=False)  # one pairwise objective (no sources) and verbosity
    b = ArmoRM(featurizer, pair_objective_column="category", gating=GatedScalarizer(**GATE), cv=None, random_state=0)
    rows = _side(pairs, "chosen")
    vote = VotingRegressor([("pipeline", a), ("recipe", b)]).fit(pairs, np.ones(len(pairs)))
    members = [e.predict(rows) for e in vote.estimators_]
    np.testing.assert_allclose(vote.predict(rows), np.mean(members, axis=0), atol=1e-6)
    X, y = shuffle_pair_sides(pairs, random_state=1)
    stack = StackingRegressor([("pipeline", a), ("recipe", b)], final_estimator=LinearRegression(),
                              cv=PromptGroupKFold(2)).fit(X, y)
    inner = np.column_stack([e.predict(rows) for e in stack.estimators_])
    np.testing.assert_allclose(stack.predict(rows), stack.final_estimator_.predict(inner), atol=1e-6)


@pytest.mark.slow
def test_probes_and_lora_experts_under_one_prompt_conditioned_gate(tiny, featurizer, pairs, tmp_path):
    rated_rows = pd.concat([_side(pairs, "chosen").assign(quality=1.0), _side(pairs, "rejected").assign(quality=0.0)])
    feat = clone(featurizer).fit()
    rated = MultiObjectiveRegressor(random_state=0).fit(feat.transform(rated_rows[["prompt", "response"]]),
                                                        rated_rows[["quality"]])
    labels = pd.DataFrame({"brevity": np.where(pairs["chosen"].str.len() < pairs["rejected"].str.len(), 1.0, -1.0)})
    experts = CapabilityExperts(tiny, rank=2, max_epochs=1, batch_size=16, max_length=128, random_state=0,
                                verbose=0, output="rewards").fit(pairs[["prompt", "chosen", "rejected"]], labels)
    mixed = Pipeline([
        ("objectives", ObjectiveUnion([
            ("probes", Pipeline([("featurizer", feat), ("stage1", ObjectiveUnion([
                ("ridge", FrozenEstimator(rated)), ("bt", MultiObjectiveRegressor(cross_fit=2, random_state=0))]))])),
            ("lora", FrozenEstimator(experts)),
        ])),
        ("decorrelator", VerbosityDecorrelator()),
        ("gate", GatedScalarizer(**GATE)),
    ])
    mixed.fit(pairs, objectives__sources=pairs["category"])
    gate = mixed.named_steps["gate"]
    assert list(gate.objective_names_) == ["quality", "math", "safety", "relevance", "brevity"]
    rows = _side(pairs, "chosen")
    out = gate.explain(mixed[:-1].transform(rows))
    assert out["gating_weights"].shape == (60, 5)
    np.testing.assert_allclose(out["gating_weights"].sum(1), 1, atol=1e-6)
    np.testing.assert_allclose(out["score"], mixed.predict(rows), atol=1e-5)
    # the LoRA objective is the experts' own reward, carried by name
    R = mixed.named_steps["objectives"].transform(rows)
    np.testing.assert_allclose(R["response:r:brevity"], experts.predict(rows)[:, 0], rtol=1e-5)
    joblib.dump(mixed, tmp_path / "mixed.joblib")
    np.testing.assert_allclose(joblib.load(tmp_path / "mixed.joblib").predict(rows), mixed.predict(rows), atol=1e-5)


@pytest.mark.slow
def test_grouped_cv_and_every_internal_split_keep_prompts_apart(featurizer, pairs, monkeypatch):
    from rmkit.model_selection import _split, _validation

    seen = []
    kfold_split = _split.PromptGroupKFold.split
    valid_call = _validation.PromptGroupValidSplit.__call__

    def spy_kfold(self, X, y=None, groups=None):
        g = _split.resolve_groups(X, groups)
        for train, test in kfold_split(self, X, y, groups):
            seen.append(("kfold", set(g[train]), set(g[test])))
            yield train, test

    def spy_valid(self, dataset, y=None, groups=None):
        train, valid = valid_call(self, dataset, y, groups)  # torch Subsets of the training rows
        g = np.asarray(self.groups)
        seen.append(("validation", set(g[train.indices]), set(g[valid.indices])))
        return train, valid

    monkeypatch.setattr(_split.PromptGroupKFold, "split", spy_kfold)
    monkeypatch.setattr(_validation.PromptGroupValidSplit, "__call__", spy_valid)
    model = ArmoRM(featurizer, pair_objective_column="category", cv=2, random_state=0,
                   gating=GatedScalarizer(**{**GATE, "validation_fraction": 0.25, "patience": 2}))
    scores = cross_val_score(model, pairs, cv=PromptGroupKFold(3))
    assert len(scores) == 3
    groups = prompt_groups(pairs)
    outer = [(tr, te) for kind, tr, te in seen if kind == "kfold" and tr | te == set(groups)]
    assert len(outer) == 3  # the outer split
    assert any(kind == "validation" for kind, _, _ in seen)  # early stopping ran on a prompt split
    assert len(seen) > 3 + 3 * 2  # cross-fitting and the probes' penalty folds inside each fit
    assert all(not (tr & te) for _, tr, te in seen)  # no split anywhere put a prompt on both sides
    grid = GridSearchCV(model, {"gating__temperature": [1.0, 2.0]}, cv=PromptGroupKFold(2)).fit(pairs)
    assert all(not (tr & te) for _, tr, te in seen) and grid.best_score_ > 0


@pytest.mark.slow
def test_grid_search_runs_the_backbone_once_per_text_and_reuses_stage1_fits(tiny, pairs, tmp_path, monkeypatch):
    import rmkit.backbones._featurizer as featurizer_module

    computed = []
    run = featurizer_module.run_prefix_suffix

    def counting(model, prefixes, suffixes, *args, **kwargs):
        computed.append(len(suffixes))
        return run(model, prefixes, suffixes, *args, **kwargs)

    monkeypatch.setattr(featurizer_module, "run_prefix_suffix", counting)
    stage1_fits = []
    fit_transform = MultiObjectiveRegressor.fit_transform

    def counting_fit(self, X, y=None, **params):
        stage1_fits.append(self.alphas)
        return fit_transform(self, X, y, **params)

    monkeypatch.setattr(MultiObjectiveRegressor, "fit_transform", counting_fit)
    BackboneFeaturizer(tiny, cache=False, verbose=0, max_length=128).fit_transform(pairs)
    one_pass = sum(computed)  # what one featurizer pass over the data computes (identical texts run once)
    computed.clear()
    feat = BackboneFeaturizer(tiny, cache=str(tmp_path / "features"), verbose=0, max_length=128)
    pipe = armorm_pipeline(feat)
    pipe.set_params(memory=str(tmp_path / "steps"))
    grid = GridSearchCV(pipe, {"probes__alphas": [None, [0.1, 10.0]], "gate__temperature": [1.0, 2.0]},
                        cv=PromptGroupKFold(2)).fit(pairs, probes__sources=pairs["category"])
    assert sum(computed) == one_pass  # each text through the backbone once, across 4 candidates x 2 folds + refit
    assert len(stage1_fits) == 2 * 2 + 1  # per fold one fit per probe setting (not per gate setting), + refit
    assert grid.best_params_["gate__temperature"] in (1.0, 2.0)


def test_wrong_layout_is_refused_by_name(featurizer, pairs):
    with pytest.raises(ValueError, match=r"GatedScalarizer needs the block 'chosen:r' \(objective rewards\)"):
        Pipeline([("featurizer", clone(featurizer)), ("gate", GatedScalarizer(**GATE))]).fit(pairs)
    feats = clone(featurizer).fit_transform(pairs)
    with pytest.raises(TypeError, match="expects a feature frame with named blocks"):
        GatedScalarizer(**GATE).fit(feats.to_numpy())
    probes = MultiObjectiveRegressor().fit(feats, sources=pairs["category"])
    with pytest.raises(ValueError, match="fitted on 64 hidden-state features per response; X has 32"):
        probes.transform(feats[[c for c in feats.columns if not c.split(":")[2].isdigit() or
                                int(c.split(":")[2]) < 32]])
    assert read_layout(probes.transform(feats), step="test").kind == "pairs"


def test_featurizer_fit_reads_the_config_not_the_weights(tiny, monkeypatch):
    import rmkit.backbones._featurizer as featurizer_module

    def refuse(*args, **kwargs):
        raise AssertionError("fit loaded the weights")

    monkeypatch.setattr(featurizer_module, "load_backbone", refuse)
    f = BackboneFeaturizer(tiny, layer=-2, cache=False).fit()
    assert (f.hidden_size_, f.layer_) == (64, 3)


def test_task_router_parameters_metadata_and_score():
    from sklearn.dummy import DummyRegressor
    from sklearn.feature_extraction.text import TfidfVectorizer

    from rmkit import TaskRouter

    X = pd.DataFrame({"prompt": ["add 2 and 3", "add 4 and 1", "poem on rain", "poem on sun"],
                      "task": ["math", "math", "poetry", "poetry"]})
    y = np.array([1.0, 3.0, 5.0, 9.0])
    router = TaskRouter({"math": DummyRegressor(), "poetry": DummyRegressor()}, featurizer=TfidfVectorizer())
    params = router.get_params()
    assert params["estimators__math__strategy"] == "mean" and "featurizer__lowercase" in params
    router.fit(X, y, sample_weight=np.array([3.0, 1.0, 1.0, 1.0]))  # sliced per task: math's mean is weighted
    np.testing.assert_allclose(router.predict(X), [1.5, 1.5, 7.0, 7.0])
    assert router.score(X, y) == pytest.approx(1 - np.sum((y - [1.5, 1.5, 7, 7]) ** 2) / np.sum((y - 4.5) ** 2))
    router.set_params(estimators__poetry__strategy="constant", estimators__poetry__constant=2.0)
    assert router.estimators["poetry"].strategy == "constant"
    np.testing.assert_allclose(router.fit(X, y).predict(X), [2.0, 2.0, 2.0, 2.0])
    with pytest.raises(ValueError, match="no task 'art'"):
        router.set_params(estimators__art__strategy="mean")
