import copy
import io
import pickle

import joblib
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV

from rmkit import LoRAExpertRegressor
from rmkit.backbones import resolve_device
from rmkit.backbones._loading import load_backbone

WORDS = ["cat", "dog", "sun", "tree", "car", "book", "fish", "bird", "rain", "milk", "star", "shoe"]


def _msgs(text):
    return [{"role": "system", "content": "Hi"}, {"role": "user", "content": text}]


def make_pairs(n, seed=0):
    """Learnable pairs: the chosen response says 'yes', the rejected one 'no'."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        a, b = rng.choice(WORDS, 2, replace=False)
        rows.append({"messages": _msgs(f"Q {a}?"), "chosen": f"yes {a}", "rejected": f"no {b}"})
    return pd.DataFrame(rows)


def make_rated(n, seed=0):
    rng = np.random.default_rng(seed)
    rows, y = [], []
    for i in range(n):
        w = str(rng.choice(WORDS))
        good = i % 2 == 0
        rows.append({"messages": _msgs(f"Q {w}?"), "response": f"{'yes' if good else 'no'} {w}"})
        y.append(8.0 if good else 2.0)
    return pd.DataFrame(rows), np.asarray(y)


def rm(tiny, **kw):
    params = dict(rank=4, alpha=8, dropout=0.0, lr=5e-3, max_epochs=4, batch_size=8, random_state=0, verbose=0)
    params.update(kw)
    return LoRAExpertRegressor(tiny, **params)


@pytest.fixture(scope="module")
def fitted(tiny):
    return rm(tiny).fit(make_pairs(24))


def test_bt_training_lowers_loss_and_raises_accuracy(tiny, fitted):
    test = make_pairs(16, seed=1)
    untrained = rm(tiny, lr=1e-12, max_epochs=1).fit(make_pairs(24))
    losses = fitted.history_[:, "train_loss"]
    assert losses[-1] < 0.5 * losses[0]
    acc_before, acc_after = untrained.score(test), fitted.score(test)
    assert acc_after >= 0.9 and acc_after > acc_before
    p = fitted.predict_proba(test)[:, 1]
    assert p.shape == (16,) and ((p >= 0) & (p <= 1)).all()


def test_mse_fits_learnable_ratings(tiny):
    X, y = make_rated(24)
    model = rm(tiny, max_epochs=6).fit(X, y)
    assert model.objective_ == "mse"
    Xt, yt = make_rated(12, seed=3)
    assert model.score(Xt, yt) > 0.7
    assert abs(model.predict(Xt).mean() - yt.mean()) < 1.5  # predictions are on the ratings' scale


def test_margins_enter_the_loss(tiny):
    X = make_pairs(8)
    plain = rm(tiny, lr=1e-12, max_epochs=1).fit(X)
    margin = rm(tiny, lr=1e-12, max_epochs=1).fit(X, np.full(8, 2.0))
    assert margin.history_[-1, "train_loss"] > plain.history_[-1, "train_loss"] + 0.5
    with pytest.raises(ValueError, match="non-negative"):
        rm(tiny).fit(X, -np.ones(8))


def test_scores_do_not_depend_on_batch_size(tiny, fitted):
    X = make_pairs(10, seed=2)
    reference = fitted.transform(X)
    other = copy.deepcopy(fitted).set_params(batch_size=1)
    np.testing.assert_allclose(other.transform(X), reference, atol=1e-4)
    one = fitted.predict_proba(X.iloc[[3]])[:, 1]
    np.testing.assert_allclose(one, fitted.predict_proba(X)[:, 1][[3]], atol=1e-5)


def test_transform_layout(tiny, fitted):
    X = make_pairs(5, seed=4)
    Z = fitted.transform(X)  # a feature frame: chosen:h:*, rejected:h:*, prompt:m:group
    H = fitted.hidden_size_
    assert Z.shape == (5, 2 * H + 1) and list(Z.columns[[0, H, -1]]) == ["chosen:h:0", "rejected:h:0", "prompt:m:group"]
    chosen = pd.DataFrame({"messages": X["messages"], "response": X["chosen"]})
    np.testing.assert_allclose(Z.filter(like="chosen:h:").to_numpy(),
                               fitted.transform(chosen).filter(like="response:h:").to_numpy(), atol=1e-5)
    rewards = fitted.predict(chosen)
    rejected = fitted.predict(pd.DataFrame({"messages": X["messages"], "response": X["rejected"]}))
    np.testing.assert_allclose(fitted.predict_proba(X)[:, 1], 1 / (1 + np.exp(rejected - rewards)), atol=1e-5)
    np.testing.assert_allclose(fitted.decision_function(X), rewards - rejected, atol=1e-5)
    np.testing.assert_array_equal(fitted.predict(X), (rewards > rejected).astype(int))
    as_objective = fitted.set_params(output="reward")
    try:
        R = as_objective.transform(X)
        np.testing.assert_allclose(R["chosen:r:reward"] - R["rejected:r:reward"], rewards - rejected, atol=1e-5)
    finally:
        fitted.set_params(output="hidden")


def test_shared_trunk_equals_full_pass(tiny):
    X, test = make_pairs(16), make_pairs(8, seed=5)
    trunk = rm(tiny, layers=2, shared_trunk=True).fit(X)
    assert trunk.shared_trunk_ and trunk.lora_layers_ == (2, 3)
    # scoring: the same fitted adapter, with the bottom layers recomputed in a full pass
    full_pass = copy.deepcopy(trunk)
    full_pass.shared_trunk_ = False
    np.testing.assert_allclose(full_pass.transform(test), trunk.transform(test), atol=1e-4)
    # training: a model trained without the shared trunk reaches the same adapter
    full = rm(tiny, layers=2, shared_trunk=False).fit(X)
    assert not full.shared_trunk_
    np.testing.assert_allclose(full.predict_proba(test)[:, 1], trunk.predict_proba(test)[:, 1], atol=1e-4)


def test_lora_never_touches_the_shared_backbone(tiny, fitted):
    base = load_backbone(tiny, device=resolve_device(fitted.device))  # the shared copy on the model's device
    assert type(base.layers[0].self_attn.q_proj) is torch.nn.Linear  # peft injected into a view only
    view = fitted._module().base
    assert type(view.layers[0].self_attn.q_proj) is not torch.nn.Linear
    q_view, q_base = view.layers[0].self_attn.q_proj, base.layers[0].self_attn.q_proj
    assert q_view.base_layer.weight.data_ptr() == q_base.weight.data_ptr()
    assert view.embed_tokens.weight.data_ptr() == base.embed_tokens.weight.data_ptr()


def test_weight_deltas_are_the_low_rank_updates(tiny, fitted):
    from sklearn.exceptions import NotFittedError

    base = load_backbone(tiny, device="cpu")
    deltas = fitted.weight_deltas()
    assert deltas and all(name.startswith("layers.") for name in deltas)
    for name, delta in deltas.items():
        assert delta.shape == base.get_submodule(name).weight.shape
        assert torch.linalg.matrix_rank(delta).item() <= fitted.rank  # B A has rank <= r
    assert max(d.abs().max().item() for d in deltas.values()) > 0  # training moved B away from zero
    with pytest.raises(NotFittedError):
        rm(tiny).weight_deltas()


def test_joblib_roundtrip_keeps_only_adapter_and_head(tiny, fitted, tmp_path):
    X = make_pairs(6, seed=6)
    path = tmp_path / "rm.joblib"
    joblib.dump(fitted, path)
    loaded = joblib.load(path)
    np.testing.assert_array_equal(loaded.predict_proba(X)[:, 1], fitted.predict_proba(X)[:, 1])
    np.testing.assert_array_equal(loaded.transform(X), fitted.transform(X))
    state = fitted.__getstate__()["_saved_state"]
    keys = [k for sd in state["adapters"].values() for k in sd]
    assert keys and all("lora_" in k for k in keys)
    n_saved = sum(t.numel() for sd in state["adapters"].values() for t in sd.values())
    n_base = sum(p.numel() for p in load_backbone(tiny, device="cpu").parameters())
    assert n_saved < n_base / 10


def test_state_saved_with_torch_loads_on_cpu(tiny, fitted):
    X = make_pairs(4, seed=7)
    buf = io.BytesIO()
    torch.save(fitted, buf)
    buf.seek(0)
    loaded = torch.load(buf, map_location="cpu", weights_only=False)
    state = pickle.loads(pickle.dumps(fitted)).__getstate__()["_saved_state"]
    assert all(t.device.type == "cpu" for sd in state["adapters"].values() for t in sd.values())
    # equal on one device; a model fitted on a GPU differs on the CPU by float32 rounding only
    same = resolve_device(fitted.device) == "cpu"
    np.testing.assert_allclose(loaded.set_params(device="cpu").predict_proba(X)[:, 1], fitted.predict_proba(X)[:, 1],
                               rtol=0 if same else 1e-5, atol=0 if same else 1e-6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback of a machine without CUDA")
def test_model_saved_for_cuda_loads_on_a_cpu_only_machine(tiny, fitted):
    X = make_pairs(4, seed=7)
    gpu_params = copy.deepcopy(fitted).set_params(device="cuda")  # as a model fitted on a GPU is saved
    loaded = pickle.loads(pickle.dumps(gpu_params))
    with pytest.warns(UserWarning, match="CUDA is not available"):
        p = loaded.predict_proba(X)[:, 1]
    np.testing.assert_array_equal(p, fitted.predict_proba(X)[:, 1])
    assert loaded.get_params()["device"] == "cuda"  # a parameter is never overwritten (clone/get_params agree)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU to train on")
def test_gpu_trained_model_predicts_on_cpu(tiny, tmp_path):
    X = make_pairs(8)
    gpu = rm(tiny, device="cuda").fit(X)
    joblib.dump(gpu, tmp_path / "gpu.joblib")
    cpu = joblib.load(tmp_path / "gpu.joblib").set_params(device="cpu")
    np.testing.assert_allclose(cpu.predict_proba(X)[:, 1], gpu.predict_proba(X)[:, 1], atol=1e-4)


def test_refused_backbone_with_other_weights(tiny, fitted):
    moved = copy.deepcopy(fitted)
    moved.backbone_fingerprint_ = "0" * 64
    with pytest.raises(ValueError, match="fingerprint"):
        moved.predict(make_pairs(2))


def test_gradient_accumulation_matches_a_larger_batch(tiny):
    X, test = make_pairs(16), make_pairs(6, seed=8)
    big = rm(tiny, batch_size=8, max_epochs=2, validation_fraction=0.0).fit(X)
    acc = rm(tiny, batch_size=4, accumulation_steps=2, max_epochs=2).fit(X)
    np.testing.assert_allclose(acc.predict_proba(test)[:, 1], big.predict_proba(test)[:, 1], atol=2e-3)
    unacc = rm(tiny, batch_size=4, max_epochs=2).fit(X)
    assert np.abs(unacc.predict_proba(test)[:, 1] - big.predict_proba(test)[:, 1]).max() > 1e-3  # the comparison can tell them apart


def test_early_stopping_on_a_validation_split(tiny):
    model = rm(tiny, lr=0.5, max_epochs=12, validation_fraction=0.25, patience=2).fit(make_pairs(16))
    history = model.history_
    assert "valid_loss" in history[-1]
    assert len(history) < 12  # a diverging run stops early
    best = int(np.argmin(history[:, "valid_loss"]))
    assert len(history) == best + 1 + 2


def test_clone_and_grid_search_over_rank_and_lr(tiny):
    base = rm(tiny, max_epochs=1)
    cloned = clone(base)
    assert cloned.get_params() == base.get_params() and not hasattr(cloned, "objective_")
    # scoring=None uses the estimator's score: pairwise accuracy on pairs
    search = GridSearchCV(base, {"rank": [2, 4], "lr": [1e-3, 5e-3]}, cv=2, error_score="raise")
    search.fit(make_pairs(12))
    assert len(search.cv_results_["params"]) == 4
    assert np.isfinite(search.cv_results_["mean_test_score"]).all()
    assert search.best_params_["rank"] in (2, 4)
    assert search.best_estimator_.rank == search.best_params_["rank"]
    assert search.best_estimator_.predict(make_pairs(3, seed=9)).shape == (3,)


def test_bad_inputs_give_clear_errors(tiny):
    X = make_pairs(4)
    same = X.assign(rejected=X["chosen"])
    with pytest.raises(ValueError, match="identical"):
        rm(tiny).fit(same)
    rated, y = make_rated(4)
    y[1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        rm(tiny).fit(rated, y)
    with pytest.raises(ValueError, match="ratings y"):
        rm(tiny).fit(rated)
    with pytest.raises(ValueError, match="rows of X"):
        rm(tiny).fit(rated, np.ones(3))
    with pytest.raises(ValueError, match=r"target_modules \['gate'\]"):
        rm(tiny, target_modules=["gate"]).fit(X)
    with pytest.raises(TypeError, match="list of module names"):
        rm(tiny, target_modules="q_proj").fit(X)
    with pytest.raises(ValueError, match="shared_trunk=True"):
        rm(tiny, shared_trunk=True).fit(X)
    with pytest.raises(ValueError, match="top 9 layers"):
        rm(tiny, layers=9).fit(X)
    with pytest.raises(ValueError, match="rank"):
        rm(tiny, rank=0).fit(X)
    with pytest.raises(NotFittedError):
        rm(tiny).predict(X)


# ---------------------------------------------------------------- issue 13: training under accelerate


@pytest.mark.slow
def test_training_under_accelerate_learns_and_accumulates_gradients(tiny, monkeypatch):
    pytest.importorskip("accelerate")
    import torch

    steps = []
    real_step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **kw: steps.append(1) or real_step(self, *a, **kw))
    X, test = make_pairs(16), make_pairs(8, seed=1)
    model = rm(tiny, batch_size=4, accumulation_steps=2, max_epochs=6, device="cpu",
               accelerate={"cpu": True, "mixed_precision": "no"}).fit(X)
    assert len(steps) == 6 * (16 // 4) // 2  # one optimizer step per two batches: the accelerator accumulates
    losses = model.history_[:, "train_loss"]
    assert losses[-1] < 0.6 * losses[0] and model.score(test) >= 0.85
    reversed_rows = test.iloc[::-1].reset_index(drop=True)  # a plain model afterwards: scores per row, any order
    np.testing.assert_allclose(model.predict_proba(reversed_rows)[::-1], model.predict_proba(test), atol=1e-6)
