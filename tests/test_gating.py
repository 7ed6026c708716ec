import numpy as np
import pytest
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV

from rmkit import GatedScalarizer
from rmkit.metrics import pairwise_scorer

# scikit-learn's check_estimator does not apply to GatedScalarizer: its input is a structured
# [rewards | prompt] layout, it trains on preference pairs and has no target y (see its Notes).



FAST = dict(hidden_size=16, n_hidden_layers=1, batch_size=64, lr=5e-2, max_epochs=20, validation_fraction=None)


def two_kinds(n, seed, d=6):
    """Prompts of two kinds; kind 0 prefers by objective 0, kind 1 by objective 1."""
    rng = np.random.RandomState(seed)
    kind = rng.randint(0, 2, n)
    prompt = rng.normal(size=(n, d))
    prompt[:, 0] += np.where(kind == 0, 3.0, -3.0)
    a, b = rng.normal(size=(n, 2)), rng.normal(size=(n, 2))
    a_wins = (a[np.arange(n), kind] > b[np.arange(n), kind])[:, None]
    chosen, rejected = np.where(a_wins, a, b), np.where(a_wins, b, a)
    return np.hstack([chosen, rejected, prompt]).astype(np.float32), kind


@pytest.fixture(scope="module")
def fitted():
    X, _ = two_kinds(400, seed=0)
    return GatedScalarizer(n_objectives=2, random_state=0, **FAST).fit(X)


def test_gating_learns_per_prompt_weighting(fitted):
    X, kind = two_kinds(600, seed=1)
    acc = np.mean(fitted.predict(X) > 0.5)
    fixed = max(np.mean(X[:, :2] @ [w, 1 - w] > X[:, 2:4] @ [w, 1 - w]) for w in np.linspace(0, 1, 101))
    assert fixed < 0.8 and acc > fixed + 0.12
    gates = fitted.explain(np.hstack([X[:, :2], X[:, 4:]]))["gating_weights"]
    assert gates[kind == 0, 0].mean() > 0.8 and gates[kind == 1, 1].mean() > 0.8


def test_gating_weights_and_explanations(fitted):
    X, _ = two_kinds(50, seed=2)
    rows = np.hstack([X[:, :2], X[:, 4:]])
    out = fitted.explain(rows)
    g = out["gating_weights"]
    assert np.all(g >= 0) and np.allclose(g.sum(axis=1), 1, atol=1e-6)
    np.testing.assert_allclose((out["rewards"] * out["coefficients"]).sum(1), out["score"], atol=1e-5)
    np.testing.assert_allclose(out["score"], fitted.predict(rows), atol=1e-6)
    frame = fitted.explain_frame(rows, ["a", "b"])
    assert len(frame) == 100 and list(frame["objective"][:2]) == ["a", "b"]
    np.testing.assert_allclose(frame.groupby("row")["contribution"].sum(), out["score"], atol=1e-5)
    np.testing.assert_allclose(frame.groupby("row")["gating_weight"].sum(), 1, atol=1e-6)


def test_transform_is_used_identically_in_training_and_inference():
    X, _ = two_kinds(200, seed=3)
    T = np.array([[1.0, 0.0, 0.5], [-0.7, 1.0, 0.5]])  # 2 objectives -> 3 gated ones
    with_T = GatedScalarizer(transform=T, random_state=0, **FAST).fit(X)
    # the same net trained on rewards already multiplied by T must be the same model
    XT = np.hstack([X[:, :2] @ T, X[:, 2:4] @ T, X[:, 4:]]).astype(np.float32)
    pre = GatedScalarizer(n_objectives=3, random_state=0, **FAST).fit(XT)
    np.testing.assert_allclose(with_T.predict(X), pre.predict(XT), atol=1e-4)
    rows = np.hstack([X[:, :2], X[:, 4:]])
    out = with_T.explain(rows)
    beta = float(with_T.module_.beta.detach())
    np.testing.assert_allclose(out["score"], beta * (out["gating_weights"] * (out["rewards"] @ T)).sum(1), atol=1e-5)
    np.testing.assert_allclose(out["coefficients"], beta * out["gating_weights"] @ T.T, atol=1e-5)


def test_batch_size_invariance_and_seeds(fitted):
    X, _ = two_kinds(97, seed=4)
    p = fitted.predict(X)
    for bs in (1, 7, 1000):
        fitted.set_params(batch_size=bs)
        np.testing.assert_allclose(fitted.predict(X), p, atol=1e-6)
    fitted.set_params(batch_size=FAST["batch_size"])
    Xtr, _ = two_kinds(200, seed=0)
    a = GatedScalarizer(n_objectives=2, random_state=7, **FAST).fit(Xtr).predict(X)
    b = GatedScalarizer(n_objectives=2, random_state=7, **FAST).fit(Xtr).predict(X)
    c = GatedScalarizer(n_objectives=2, random_state=8, **FAST).fit(Xtr).predict(X)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_early_stopping_and_hyperparameter_search():
    X, _ = two_kinds(300, seed=5)
    net = GatedScalarizer(n_objectives=2, random_state=0, **{**FAST, "validation_fraction": 0.2, "patience": 2,
                                                             "max_epochs": 300, "lr": 0.1}).fit(X)
    assert len(net.history) < 300 and "valid_loss" in net.history[-1]
    grid = GridSearchCV(GatedScalarizer(n_objectives=2, random_state=0, **FAST),
                        {"temperature": [0.5, 3.0], "beta_init": [2.0]}, scoring=pairwise_scorer, cv=2)
    grid.fit(X, np.ones(len(X)))  # y is ignored by the net; the scorer needs one
    assert np.isfinite(grid.cv_results_["mean_test_score"]).all()
    best = grid.best_estimator_
    assert best.module_.temperature == grid.best_params_["temperature"]
    assert best.get_params()["beta_init"] == 2.0


def test_bad_inputs():
    X, _ = two_kinds(40, seed=6)
    with pytest.raises(ValueError, match="at least two objectives"):
        GatedScalarizer(n_objectives=1, **FAST).fit(X)
    with pytest.raises(ValueError, match="n_objectives"):
        GatedScalarizer(**FAST).fit(X)
    same = X.copy()
    same[:, 2:4] = same[:, :2]
    with pytest.raises(ValueError, match="identical chosen and rejected"):
        GatedScalarizer(n_objectives=2, **FAST).fit(same)
    with pytest.raises(ValueError, match="temperature"):
        GatedScalarizer(n_objectives=2, temperature=0, **FAST).fit(X)
    with pytest.raises(NotFittedError):
        GatedScalarizer(n_objectives=2).predict(X)
    net = GatedScalarizer(n_objectives=2, **{**FAST, "max_epochs": 1}).fit(X)
    with pytest.raises(ValueError, match="expected"):
        net.predict(X[:, :-1])  # width matches neither layout
    with pytest.raises(ValueError, match="expected"):
        net.explain(X)  # explain takes single responses
