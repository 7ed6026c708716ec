import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV

from rmkit import GatedScalarizer
from rmkit.layout import make_frame
from rmkit.model_selection import PromptGroupKFold, prompt_groups

# scikit-learn's check_estimator does not apply to GatedScalarizer: its input is a feature frame with named
# objective and prompt blocks, and it trains on preference pairs (see its Notes).

FAST = dict(hidden_size=16, n_hidden_layers=1, batch_size=64, lr=5e-2, max_epochs=20, validation_fraction=None)


def two_kinds(n, seed, d=6, per_prompt=2):
    """Pairs of two prompt kinds; kind 0 prefers by objective 0, kind 1 by objective 1."""
    rng = np.random.RandomState(seed)
    kind = rng.randint(0, 2, n)
    prompt = rng.normal(size=(n, d))
    prompt[:, 0] += np.where(kind == 0, 3.0, -3.0)
    a, b = rng.normal(size=(n, 2)), rng.normal(size=(n, 2))
    a_wins = (a[np.arange(n), kind] > b[np.arange(n), kind])[:, None]
    chosen, rejected = np.where(a_wins, a, b), np.where(a_wins, b, a)
    frame = make_frame({("chosen", "r", ("a", "b")): chosen, ("rejected", "r", ("a", "b")): rejected,
                        ("prompt", "h", range(d)): prompt,
                        ("prompt", "m", ("group",)): seed * 10**6 + np.arange(n) // per_prompt})
    return frame, kind


def responses(frame, side="chosen"):
    d = sum(c.startswith("prompt:h:") for c in frame.columns)
    return make_frame({("response", "r", ("a", "b")): frame[[f"{side}:r:a", f"{side}:r:b"]].to_numpy(),
                       ("prompt", "h", range(d)): frame.filter(like="prompt:h:").to_numpy()})


@pytest.fixture(scope="module")
def fitted():
    X, _ = two_kinds(400, seed=0)
    return GatedScalarizer(random_state=0, **FAST).fit(X)


def test_gating_learns_per_prompt_weighting(fitted):
    X, kind = two_kinds(600, seed=1)
    acc = fitted.score(X)
    R = X.to_numpy()
    fixed = max(np.mean(R[:, :2] @ [w, 1 - w] > R[:, 2:4] @ [w, 1 - w]) for w in np.linspace(0, 1, 101))
    assert fixed < 0.8 and acc > fixed + 0.12
    gates = fitted.explain(responses(X))["gating_weights"]
    assert gates[kind == 0, 0].mean() > 0.8 and gates[kind == 1, 1].mean() > 0.8


def test_pair_contract_predict_proba_decision_function_and_stock_scorers(fitted):
    X, _ = two_kinds(200, seed=2)
    scores = np.c_[fitted.predict(responses(X, "chosen")), fitted.predict(responses(X, "rejected"))]
    margin = fitted.decision_function(X)
    np.testing.assert_allclose(margin, scores[:, 0] - scores[:, 1], atol=1e-5)
    proba = fitted.predict_proba(X)
    np.testing.assert_allclose(proba[:, 1], 1 / (1 + np.exp(-margin)), atol=1e-6)
    np.testing.assert_allclose(proba.sum(1), 1)
    np.testing.assert_array_equal(fitted.predict(X), (margin > 0).astype(int))
    assert fitted.score(X) == pytest.approx(np.mean(margin > 0))
    from sklearn.metrics import get_scorer

    y = np.r_[np.ones(100), np.zeros(100)].astype(int)  # the second half claims 'rejected' is preferred
    assert get_scorer("accuracy")(fitted, X, y) == pytest.approx(np.mean((margin > 0) == (y == 1)))
    auc = get_scorer("roc_auc")(fitted, X, y)
    from sklearn.metrics import roc_auc_score

    assert auc == pytest.approx(roc_auc_score(y, margin))
    assert get_scorer("neg_log_loss")(fitted, X, y) < 0
    with pytest.raises(ValueError, match="predict_proba needs preference pairs"):
        fitted.predict_proba(responses(X))


def test_gating_weights_and_explanations(fitted):
    X, _ = two_kinds(50, seed=2)
    rows = responses(X)
    out = fitted.explain(rows)
    g = out["gating_weights"]
    assert np.all(g >= 0) and np.allclose(g.sum(axis=1), 1, atol=1e-6)
    np.testing.assert_allclose((out["rewards"] * out["coefficients"]).sum(1), out["score"], atol=1e-5)
    np.testing.assert_allclose(out["score"], fitted.predict(rows), atol=1e-6)
    frame = fitted.explain_frame(rows)
    assert len(frame) == 100 and list(frame["objective"][:2]) == ["a", "b"]
    np.testing.assert_allclose(frame.groupby("row")["contribution"].sum(), out["score"], atol=1e-5)
    np.testing.assert_allclose(frame.groupby("row")["gating_weight"].sum(), 1, atol=1e-6)
    entropy = fitted.gate_entropy(rows)
    assert entropy.shape == (50,) and np.all((entropy >= 0) & (entropy <= np.log(2) + 1e-9))


def test_batch_invariance_seeds_and_global_rng_untouched(fitted):
    X, _ = two_kinds(97, seed=4)
    p = fitted.decision_function(X)
    np.testing.assert_allclose(np.concatenate([fitted.decision_function(X.iloc[i:i + 7]) for i in range(0, 97, 7)]),
                               p, atol=1e-6)
    Xtr, _ = two_kinds(200, seed=0)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = GatedScalarizer(random_state=7, **FAST).fit(Xtr).decision_function(X)
    assert torch.rand(1) == before  # fit does not reseed torch's global generator
    b = GatedScalarizer(random_state=7, **FAST).fit(Xtr).decision_function(X)
    c = GatedScalarizer(random_state=8, **FAST).fit(Xtr).decision_function(X)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    rs = GatedScalarizer(random_state=np.random.RandomState(3), **FAST)
    np.testing.assert_array_equal(clone(rs).fit(Xtr).decision_function(X), clone(rs).fit(Xtr).decision_function(X))


@pytest.mark.slow
def test_early_stopping_splits_by_prompt_and_hyperparameter_search(monkeypatch):
    X, _ = two_kinds(300, seed=5, per_prompt=3)
    from rmkit.model_selection import _validation

    seen = []
    original = _validation.PromptGroupValidSplit.__call__

    def spy(self, dataset, y=None, groups=None):
        train, valid = original(self, dataset, y, groups)  # torch Subsets of the training rows
        seen.append((np.asarray(self.groups)[train.indices], np.asarray(self.groups)[valid.indices]))
        return train, valid

    monkeypatch.setattr(_validation.PromptGroupValidSplit, "__call__", spy)
    net = GatedScalarizer(random_state=0, **{**FAST, "validation_fraction": 0.2, "patience": 2, "max_epochs": 300,
                                             "lr": 0.1}).fit(X)
    assert len(net.history_) < 300 and "valid_loss" in net.history_[-1]
    assert seen and all(not set(tr) & set(va) for tr, va in seen)  # no prompt on both sides
    grid = GridSearchCV(GatedScalarizer(random_state=0, **FAST), {"temperature": [0.5, 3.0], "beta_init": [2.0]},
                        cv=PromptGroupKFold(2))
    grid.fit(X)
    assert np.isfinite(grid.cv_results_["mean_test_score"]).all()
    best = grid.best_estimator_
    assert best.module_.temperature == grid.best_params_["temperature"]
    assert best.get_params()["beta_init"] == 2.0
    groups = prompt_groups(X)
    for train, test in PromptGroupKFold(2).split(X):
        assert not set(groups[train]) & set(groups[test])


def test_params_are_the_models_own_and_weights_matter():
    gate = GatedScalarizer()
    assert len(gate.get_params()) == 15 and "skorch" not in repr(gate)
    X, _ = two_kinds(300, seed=9)
    noisy = X.copy()
    flip = np.arange(300) < 150  # half the pairs with their sides swapped: label noise
    for o in ("a", "b"):
        c, r = X[f"chosen:r:{o}"].to_numpy(), X[f"rejected:r:{o}"].to_numpy()
        noisy[f"chosen:r:{o}"], noisy[f"rejected:r:{o}"] = np.where(flip, r, c), np.where(flip, c, r)
    test, _ = two_kinds(300, seed=10)
    plain = GatedScalarizer(random_state=0, **FAST).fit(noisy)
    weighted = GatedScalarizer(random_state=0, **FAST).fit(noisy, sample_weight=np.where(flip, 0.0, 1.0))
    assert weighted.score(test) > plain.score(test) + 0.1  # zero weight removes the noisy pairs' pull


def test_bad_inputs():
    X, _ = two_kinds(40, seed=6)
    one = make_frame({("chosen", "r", ("a",)): np.zeros(4), ("rejected", "r", ("a",)): np.ones(4),
                      ("prompt", "h", range(2)): np.zeros((4, 2))})
    with pytest.raises(ValueError, match="at least two objectives"):
        GatedScalarizer(**FAST).fit(one)
    same = X.copy()
    same[["rejected:r:a", "rejected:r:b"]] = same[["chosen:r:a", "chosen:r:b"]].to_numpy()
    with pytest.raises(ValueError, match="identical chosen and rejected"):
        GatedScalarizer(**FAST).fit(same)
    with pytest.raises(ValueError, match="temperature"):
        GatedScalarizer(temperature=0, **FAST).fit(X)
    with pytest.raises(NotFittedError):
        GatedScalarizer().predict(X)
    with pytest.raises(TypeError, match="feature frame"):
        GatedScalarizer(**FAST).fit(X.to_numpy())
    with pytest.raises(ValueError, match="needs preference pairs"):
        GatedScalarizer(**FAST).fit(responses(X))
    with pytest.raises(ValueError, match=r"needs the block 'prompt:h'"):
        GatedScalarizer(**FAST).fit(X.drop(columns=[c for c in X.columns if c.startswith("prompt:h")]))
    net = GatedScalarizer(**{**FAST, "max_epochs": 1}).fit(X)
    with pytest.raises(ValueError, match="fitted on the objectives"):
        net.predict(X.rename(columns={"chosen:r:b": "chosen:r:c", "rejected:r:b": "rejected:r:c"}))


# ---------------------------------------------------------------- issue 13: training under accelerate


@pytest.mark.slow
def test_training_under_accelerate_gives_a_plain_savable_net(tmp_path, monkeypatch):
    accelerate = pytest.importorskip("accelerate")
    from skorch import NeuralNet

    import rmkit

    backward_calls = []
    real_backward = accelerate.Accelerator.backward
    monkeypatch.setattr(accelerate.Accelerator, "backward",
                        lambda self, loss, **kw: backward_calls.append(1) or real_backward(self, loss, **kw))

    train, _ = two_kinds(300, seed=0)
    test, kind = two_kinds(200, seed=1)
    plain = GatedScalarizer(max_epochs=40, hidden_size=32, lr=3e-3, random_state=0).fit(train)
    accelerated = GatedScalarizer(max_epochs=40, hidden_size=32, lr=3e-3, random_state=0,
                                  accelerate={"mixed_precision": "no", "cpu": True}).fit(train)
    assert len(backward_calls) >= 40  # every training step went through the accelerator
    assert type(accelerated.net_) is NeuralNet  # AccelerateMixin only while training
    assert accelerated.net_.device == "cpu" and accelerated.history_[-1, "epoch"] >= 1
    # the same task is learned as well as without accelerate
    assert accelerated.score(test) > 0.9 and abs(accelerated.score(test) - plain.score(test)) < 0.05
    again = rmkit.load(rmkit.save(accelerated, tmp_path / "gate"))
    np.testing.assert_allclose(again.predict_proba(test), accelerated.predict_proba(test), rtol=1e-6)
    with pytest.raises(TypeError, match="accelerate must be"):
        GatedScalarizer(max_epochs=1, accelerate="yes").fit(train)


def test_gating_entropy_tells_a_decisive_gate_from_an_even_one(fitted):
    X, kind = two_kinds(300, seed=2)
    h = fitted.gating_entropy(X)
    gates = fitted.explain(responses(X))["gating_weights"]
    np.testing.assert_allclose(h, -(gates * np.log(gates)).sum(1), rtol=1e-6)
    np.testing.assert_allclose(fitted.gating_entropy(responses(X)), h)  # pairs and single responses agree
    assert h.mean() < 0.5 * np.log(2)  # the trained gate picks the objective of each prompt kind
    even = GatedScalarizer(random_state=0, temperature=1e6, **FAST).fit(X)  # softmax of ~0: uniform weights
    np.testing.assert_allclose(even.gating_entropy(X), np.log(2), rtol=1e-4)
