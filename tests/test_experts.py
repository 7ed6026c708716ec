import copy

import joblib
import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from rmkit import CapabilityExperts, LoRAExpertRegressor
from rmkit.backbones import resolve_device
from rmkit.backbones._loading import load_backbone

ANIMALS = ["cat", "dog"]


def _msgs(text):
    return [{"role": "system", "content": "Hi"}, {"role": "user", "content": text}]


def make_capability_pairs(n, seed=0, nan_share=0.0):
    """Responses '<yes|no> <cat|dog>'. 'polarity' prefers yes, 'animal' prefers cat; both judged on every pair."""
    rng = np.random.default_rng(seed)
    rows, pol, ani = [], [], []
    for _ in range(n):
        while True:
            a = (rng.integers(2), rng.integers(2))
            b = (rng.integers(2), rng.integers(2))
            if a[0] != b[0] and a[1] != b[1]:
                break
        text = [f"{'yes' if p else 'no'} {ANIMALS[1 - c]}" for p, c in (a, b)]  # c=1 means cat
        rows.append({"messages": _msgs("Q?"), "chosen": text[0], "rejected": text[1]})
        pol.append(1.0 if a[0] > b[0] else -1.0)
        ani.append(1.0 if a[1] > b[1] else -1.0)
    y = pd.DataFrame({"polarity": pol, "animal": ani})
    if nan_share:
        y = y.mask(rng.random(y.shape) < nan_share)
    return pd.DataFrame(rows), y


def experts(tiny, **kw):
    params = dict(rank=4, alpha=8, dropout=0.0, lr=5e-3, max_epochs=5, batch_size=8, layers=2, random_state=0,
                  verbose=0)
    params.update(kw)
    return CapabilityExperts(tiny, **params)


@pytest.fixture(scope="module")
def fitted(tiny):
    X, y = make_capability_pairs(32, nan_share=0.15)
    return experts(tiny).fit(X, y)


def test_each_expert_learns_its_own_capability(fitted):
    X, y = make_capability_pairs(24, seed=1)
    P = fitted.predict(X)
    assert P.shape == (24, 2) and fitted.expert_names_ == ["polarity", "animal"]
    acc = ((P > 0.5) == (y.to_numpy() > 0)).mean(axis=0)
    assert (acc >= 0.85).all(), acc
    # on this data the two capabilities disagree on about half the pairs, so an expert ignoring its own
    # labels could not pass both
    disagree = y["polarity"] != y["animal"]
    assert disagree.mean() > 0.25
    for name in fitted.expert_names_:
        losses = fitted.histories_[name][:, "train_loss"]
        assert losses[-1] < losses[0]


def test_nan_labels_are_skipped_per_expert(tiny, fitted):
    _, y = make_capability_pairs(32, nan_share=0.15)
    assert fitted.n_labels_ == {name: int(y[name].notna().sum()) for name in y}
    assert fitted.n_labels_["polarity"] < 32


def test_experts_share_one_base_model(tiny, fitted):
    module = fitted._module()
    base = load_backbone(tiny, device=resolve_device(fitted.device))  # the shared copy on the model's device
    view = module.base
    # one peft model holds every adapter; its base weights are the shared backbone's tensors
    assert set(module.peft.peft_config) == {"expert0", "expert1"}
    q = view.layers[3].self_attn.q_proj
    assert set(q.lora_A) == {"expert0", "expert1"}
    assert q.base_layer.weight.data_ptr() == base.layers[3].self_attn.q_proj.weight.data_ptr()
    base_ptrs = {p.data_ptr() for p in base.parameters()}
    frozen = [p for n, p in module.named_parameters() if "lora_" not in n and not n.startswith("heads.")]
    assert len(frozen) == len(list(base.parameters()))
    assert all(p.data_ptr() in base_ptrs for p in frozen)
    lora = [n for n, _ in module.named_parameters() if "lora_" in n]
    assert len(lora) == 2 * 2 * 2 * 2  # experts x layers x (q, v) x (A, B)
    assert len(module.heads) == 2


def test_shared_trunk_scores_equal_full_pass(fitted):
    X, _ = make_capability_pairs(8, seed=2)
    assert fitted.shared_trunk_
    full_pass = copy.deepcopy(fitted)
    full_pass.shared_trunk_ = False
    np.testing.assert_allclose(full_pass.transform(X), fitted.transform(X), atol=1e-4)
    np.testing.assert_allclose(full_pass.predict(X), fitted.predict(X), atol=1e-5)


def test_trunk_training_equals_full_training(tiny):
    X, y = make_capability_pairs(12, seed=3)
    trunk = experts(tiny, max_epochs=2, shared_trunk=True).fit(X, y)
    full = experts(tiny, max_epochs=2, shared_trunk=False).fit(X, y)
    np.testing.assert_allclose(trunk.predict(X), full.predict(X), atol=1e-4)


def test_transform_layout_is_the_aggregator_input(fitted):
    X, _ = make_capability_pairs(5, seed=4)
    K, H = fitted.n_experts_, fitted.hidden_size_
    Z = fitted.transform(X)  # a feature frame: chosen:h:{expert}.{i}, rejected:h:..., prompt:m:group
    assert Z.shape == (5, 2 * K * H + 1) and Z.columns[0] == f"chosen:h:{fitted.expert_names_[0]}.0"
    chosen = pd.DataFrame({"messages": X["messages"], "response": X["chosen"]})
    Zc = fitted.transform(chosen).filter(like="response:h:").to_numpy()
    assert Zc.shape == (5, K * H)
    np.testing.assert_allclose(Z.filter(like="chosen:h:").to_numpy().reshape(5, K, H), Zc.reshape(5, K, H), atol=1e-5)
    # expert blocks differ: each block comes from its own adapter
    assert np.abs(Zc[:, :H] - Zc[:, H:]).max() > 1e-3
    rewards = fitted.predict(chosen)
    assert rewards.shape == (5, K)
    as_objectives = fitted.set_params(output="rewards")
    try:
        R = as_objectives.transform(chosen)
        assert [c for c in R.columns if ":r:" in c] == [f"response:r:{e}" for e in fitted.expert_names_]
        np.testing.assert_allclose(R.filter(like="response:r:").to_numpy(), rewards, rtol=1e-5)
    finally:
        fitted.set_params(output="hidden")


def test_pointwise_ratings_per_capability(tiny):
    rng = np.random.default_rng(0)
    rows, pol, ani = [], [], []
    for _ in range(24):
        p, c = rng.integers(2), rng.integers(2)
        rows.append({"messages": _msgs("Q?"), "response": f"{'yes' if p else 'no'} {ANIMALS[1 - c]}"})
        pol.append(9.0 if p else 1.0)
        ani.append(5.0 if c else 3.0)
    y = pd.DataFrame({"polarity": pol, "animal": ani})
    y.loc[::5, "animal"] = np.nan
    model = experts(tiny, max_epochs=8).fit(pd.DataFrame(rows), y)
    assert model.objective_ == "mse" and model.n_labels_["animal"] < 24
    pred = model.predict(pd.DataFrame(rows))
    for k, name in enumerate(model.expert_names_):
        known = y[name].notna()
        assert np.corrcoef(pred[known, k], y.loc[known, name])[0, 1] > 0.8


def test_joblib_roundtrip(fitted, tmp_path):
    X, _ = make_capability_pairs(6, seed=5)
    joblib.dump(fitted, tmp_path / "experts.joblib")
    loaded = joblib.load(tmp_path / "experts.joblib")
    np.testing.assert_array_equal(loaded.predict(X), fitted.predict(X))
    np.testing.assert_array_equal(loaded.transform(X), fitted.transform(X))
    state = fitted.__getstate__()["_saved_state"]
    assert set(state["adapters"]) == {"expert0", "expert1"}
    assert all("lora_" in k for sd in state["adapters"].values() for k in sd)


def test_label_formats(tiny):
    X, y = make_capability_pairs(8, seed=6)
    as_array = experts(tiny, max_epochs=1, experts=["p", "a"]).fit(X, y.to_numpy())
    assert as_array.expert_names_ == ["p", "a"]
    selected = experts(tiny, max_epochs=1, experts=["animal"]).fit(X, y)
    assert selected.expert_names_ == ["animal"] and selected.predict(X).shape == (8, 1)
    as_dict = experts(tiny, max_epochs=1).fit(X, {"animal": y["animal"].to_numpy()})
    np.testing.assert_allclose(as_dict.predict(X), selected.predict(X), atol=1e-6)
    assert clone(selected).get_params()["experts"] == ["animal"]


def test_bad_labels_give_clear_errors(tiny):
    X, y = make_capability_pairs(6, seed=7)
    with pytest.raises(ValueError, match=r"\+1 \(chosen better\)"):
        experts(tiny).fit(X, y.assign(animal=2.0))
    with pytest.raises(ValueError, match="no labelled pair"):
        experts(tiny).fit(X, y.assign(animal=np.nan))
    with pytest.raises(ValueError, match="missing the label column"):
        experts(tiny, experts=["style"]).fit(X, y)
    with pytest.raises(ValueError, match="rows of X"):
        experts(tiny).fit(X, y.iloc[:4])
    with pytest.raises(ValueError, match="needs y"):
        experts(tiny).fit(X)
    with pytest.raises(ValueError, match="identical"):
        experts(tiny).fit(X.assign(rejected=X["chosen"]), y)
    with pytest.raises(ValueError, match="target_modules"):
        experts(tiny, target_modules=["w_in"]).fit(X, y)
    with pytest.raises(NotFittedError):
        experts(tiny).transform(X)


def test_single_expert_matches_the_regressor(tiny):
    """One expert trained on all-+1 labels is the LoRAExpertRegressor with the same settings."""
    X, _ = make_capability_pairs(8, seed=8)
    one = experts(tiny, max_epochs=2).fit(X, {"r": np.ones(8)})
    reg = LoRAExpertRegressor(tiny, rank=4, alpha=8, dropout=0.0, lr=5e-3, max_epochs=2, batch_size=8, layers=2,
                              random_state=0, verbose=0).fit(X)
    np.testing.assert_allclose(one.predict(X)[:, 0], reg.predict_proba(X)[:, 1], atol=1e-4)
    np.testing.assert_allclose(one.transform(X).to_numpy(), reg.transform(X).to_numpy(), atol=1e-4)
