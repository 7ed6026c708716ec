"""rmkit.save / rmkit.load (safetensors + JSON) and joblib round trips."""

import inspect
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import rmkit
from rmkit.backbones._loading import weights_fingerprint
from rmkit.datasets import make_preference_pairs
from rmkit.persistence import (
    BackboneMismatchError,
    IntegrityError,
    PersistenceError,
    UnsafeClassError,
    _api,
    _swap,
)
from rmkit.testing import tiny_backbone


def _manifest(path):
    return json.loads((Path(path) / "rmkit.json").read_text())


def _write_manifest(path, manifest):
    (Path(path) / "rmkit.json").write_text(json.dumps(manifest))


def _ridge_pipeline(seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(40, 5))
    y = X @ rng.normal(size=5) + rng.normal(scale=0.1, size=40)
    return make_pipeline(StandardScaler(), Ridge(alpha=0.5)).fit(X, y), X


# ------------------------------------------------------------------ estimators that exist today


def test_sklearn_pipeline_round_trips_identically(tmp_path):
    model, X = _ridge_pipeline()
    loaded = rmkit.load(rmkit.save(model, tmp_path / "m"))
    assert type(loaded) is type(model) and [n for n, _ in loaded.steps] == ["standardscaler", "ridge"]
    np.testing.assert_array_equal(loaded.predict(X), model.predict(X))
    assert loaded.get_params()["ridge__alpha"] == 0.5
    joblib.dump(model, tmp_path / "m.joblib")
    np.testing.assert_array_equal(joblib.load(tmp_path / "m.joblib").predict(X), model.predict(X))


def test_string_labels_and_probabilities_round_trip(tmp_path):
    X = np.linspace(-2, 2, 30)[:, None]
    y = np.where(X[:, 0] > 0.1, "good", "bad")
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=3.0)).fit(X, y)
    loaded = rmkit.load(rmkit.save(clf, tmp_path / "clf"))
    assert loaded.classes_.tolist() == ["bad", "good"]
    np.testing.assert_array_equal(loaded.predict_proba(X), clf.predict_proba(X))


def test_nothing_is_pickled(tmp_path):
    model, _ = _ridge_pipeline()
    path = rmkit.save(model, tmp_path / "m")
    assert sorted(p.name for p in path.iterdir()) == ["README.md", "rmkit.json", "tensors.safetensors"]
    manifest = _manifest(path)
    assert manifest["format"] == "rmkit.save" and manifest["format_version"] == rmkit.persistence.FORMAT_VERSION
    assert b"pickle" not in (path / "tensors.safetensors").read_bytes()[:200]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o777 & ~umask  # an ordinary folder, not mkdtemp's private one
    assert (path / "tensors.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_featurizer_round_trip_references_backbone(tmp_path, tiny):
    pairs = make_preference_pairs(4, random_state=1)
    feats = rmkit.BackboneFeaturizer(tiny, cache=False, verbose=0, max_length=64).fit(pairs)
    loaded = rmkit.load(rmkit.save(feats, tmp_path / "f"))
    np.testing.assert_array_equal(loaded.transform(pairs), feats.transform(pairs))
    manifest = _manifest(tmp_path / "f")
    assert manifest["backbones"] == [{"name": tiny, "sha256": feats.backbone_fingerprint_}]
    # the weights are referenced, not copied into the save
    assert (tmp_path / "f" / "tensors.safetensors").stat().st_size < 10_000


class _TinyMLP(torch.nn.Module):
    def __init__(self, n_in=3, hidden=8):
        super().__init__()
        self.hidden = torch.nn.Linear(n_in, hidden)
        self.out = torch.nn.Linear(hidden, 1)

    def forward(self, X):
        return self.out(torch.tanh(self.hidden(X)))


def _fit_skorch(seed=0, device="cpu"):
    from skorch import NeuralNetRegressor

    rmkit.register_safe_class(_TinyMLP)
    torch.manual_seed(seed)
    X = np.random.default_rng(seed).normal(size=(32, 3)).astype(np.float32)
    y = X.sum(1, keepdims=True).astype(np.float32)
    net = NeuralNetRegressor(_TinyMLP, module__hidden=6, max_epochs=4, lr=0.05, verbose=0, train_split=None,
                             optimizer=torch.optim.Adam, device=device)
    return net.fit(X, y), X


def test_skorch_net_round_trips_identically(tmp_path):
    net, X = _fit_skorch()
    loaded = rmkit.load(rmkit.save(net, tmp_path / "net"))
    np.testing.assert_array_equal(loaded.predict(X), net.predict(X))
    assert loaded.module_.hidden.out_features == 6 and loaded.optimizer is torch.optim.Adam
    assert [h["train_loss"] for h in loaded.history_] == [h["train_loss"] for h in net.history_]
    joblib.dump(net, tmp_path / "net.joblib")
    np.testing.assert_array_equal(joblib.load(tmp_path / "net.joblib").predict(X), net.predict(X))


def test_model_saved_on_gpu_loads_on_cpu(tmp_path):
    net, X = _fit_skorch()
    path = rmkit.save(net, tmp_path / "net")
    manifest = _manifest(path)  # as a GPU machine would write it
    manifest["model"]["__skorch__"]["params"]["device"] = "cuda:0"
    _write_manifest(path, manifest)
    if torch.cuda.is_available():
        loaded = rmkit.load(path, device="cpu")
    else:
        with pytest.warns(UserWarning, match="not available here; loading it on 'cpu'"):
            loaded = rmkit.load(path)
    assert loaded.device == "cpu"
    np.testing.assert_array_equal(loaded.predict(X), net.predict(X))


def test_shared_objects_stay_shared(tmp_path):
    a = torch.nn.Linear(4, 4)
    model = torch.nn.Sequential(a, torch.nn.ReLU(), torch.nn.Linear(4, 4))
    model[2].weight = a.weight  # tied weights
    loaded = rmkit.load(rmkit.save(model, tmp_path / "tied"))
    assert loaded[0].weight is loaded[2].weight
    x = torch.randn(3, 4)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


@rmkit.register_safe_class
class _Everything(RegressorMixin, BaseEstimator):
    """An estimator holding one of each kind of fitted value rmkit.save writes."""

    def __init__(self, scale=1.0, random_state=None):
        self.scale = scale
        self.random_state = random_state

    def fit(self, X, y=None):
        self.coef_ = np.asfortranarray(np.arange(6.0).reshape(2, 3))
        self.ints_ = np.array([1, -2, 3], dtype=np.int16)
        self.flags_ = np.array([True, False])
        self.half_ = torch.tensor([1.5, -2.25], dtype=torch.bfloat16)
        self.names_ = np.array(["a", "bb"])
        self.objects_ = np.array(["x", None, 3], dtype=object)
        self.nan_ = float("nan")
        self.inf_ = np.float32("-inf")
        self.alpha_ = np.float64(0.25)
        self.pairs_ = {("a", 1): [1, (2, 3)], "n": {4, 5}}
        self.frame_ = pd.DataFrame({"x": [1.0, 2.0], "y": ["u", "v"]}, index=["r1", "r2"])
        self.series_ = pd.Series([1, 2], index=["p", "q"], name="s")
        self.dtype_ = np.dtype("float32")
        self.torch_dtype_ = torch.float16
        self.cols_ = slice(1, None)
        self.rng_ = np.random.RandomState(3)
        return self

    def predict(self, X):
        return np.asarray(X) @ self.coef_[0] * self.scale


def test_every_value_kind_round_trips(tmp_path):
    est = _Everything(scale=2.0).fit(None)
    loaded = rmkit.load(rmkit.save(est, tmp_path / "e"))
    assert loaded.coef_.flags.f_contiguous and np.array_equal(loaded.coef_, est.coef_)
    assert loaded.ints_.dtype == np.int16 and loaded.ints_.tolist() == [1, -2, 3]
    assert loaded.flags_.dtype == bool and loaded.flags_.tolist() == [True, False]
    assert loaded.half_.dtype == torch.bfloat16 and torch.equal(loaded.half_, est.half_)
    assert loaded.names_.dtype == est.names_.dtype and loaded.names_.tolist() == ["a", "bb"]
    assert loaded.objects_.dtype == object and loaded.objects_.tolist() == ["x", None, 3]
    assert np.isnan(loaded.nan_) and loaded.inf_ == -np.inf and type(loaded.inf_) is np.float32
    assert type(loaded.alpha_) is np.float64 and loaded.alpha_ == 0.25
    assert loaded.pairs_ == {("a", 1): [1, (2, 3)], "n": {4, 5}}
    pd.testing.assert_frame_equal(loaded.frame_, est.frame_, check_dtype=False)
    pd.testing.assert_series_equal(loaded.series_, est.series_)
    assert loaded.dtype_ == np.float32 and loaded.torch_dtype_ is torch.float16 and loaded.cols_ == slice(1, None)
    assert loaded.rng_.randint(1000) == est.rng_.randint(1000)
    assert loaded.scale == 2.0


class _Hooked(BaseEstimator):
    """Uses the __rmkit_state__ protocol: stores a derived table instead of its attributes."""

    def __init__(self, offset=0.0):
        self.offset = offset

    def fit(self, X, y=None):
        self.table_ = {"w": np.asarray(X, float).mean(0)}
        self.cache_ = object()  # transient: deliberately not saved
        return self

    def predict(self, X):
        return np.asarray(X, float) @ self.table_["w"] + self.offset

    def __rmkit_state__(self):
        return {"w": self.table_["w"]}

    def __rmkit_restore__(self, state):
        self.table_ = {"w": state["w"]}


def test_state_hooks(tmp_path):
    rmkit.register_safe_class(_Hooked)
    est = _Hooked(offset=1.0).fit(np.eye(3))
    loaded = rmkit.load(rmkit.save(est, tmp_path / "h"))
    assert loaded.offset == 1.0 and not hasattr(loaded, "cache_")
    np.testing.assert_array_equal(loaded.predict(np.eye(3)), est.predict(np.eye(3)))


def test_functions_are_not_saved(tmp_path):
    from sklearn.preprocessing import FunctionTransformer

    with pytest.raises(PersistenceError, match=r"model\.steps\[0\]\[1\]"):
        rmkit.save(make_pipeline(FunctionTransformer(np.log1p), Ridge()), tmp_path / "f")
    est = _Everything(scale=lambda x: x)
    with pytest.raises(PersistenceError, match=r"model\.scale is a function"):
        rmkit.save(est, tmp_path / "g")
    assert not (tmp_path / "g").exists()


def test_unregistered_class_is_not_saved(tmp_path):
    class Local(BaseEstimator):
        pass

    with pytest.raises(PersistenceError, match="register_safe_class"):
        rmkit.save(Local(), tmp_path / "x")


# ------------------------------------------------------------------ refusing unsafe directories


@pytest.mark.parametrize("name", ["os.system", "posix.system", "subprocess.Popen", "builtins.eval",
                                  "rmkit.persistence._writer.Writer", "antigravity.geohash", "shutil.rmtree"])
def test_json_pointing_at_code_is_refused(tmp_path, name):
    model, _ = _ridge_pipeline()
    path = rmkit.save(model, tmp_path / "m")
    manifest = _manifest(path)
    manifest["model"]["__estimator__"]["class"] = name
    _write_manifest(path, manifest)
    imported_before = set(sys.modules)
    with pytest.raises(UnsafeClassError, match=f"names '{name}'.*refuses"):
        rmkit.load(path)
    assert set(sys.modules) == imported_before  # not even imported


def test_code_hidden_in_a_parameter_is_refused(tmp_path):
    model, _ = _ridge_pipeline()
    path = rmkit.save(model, tmp_path / "m")
    text = (path / "rmkit.json").read_text()
    # a class reference where a plain value was, deep inside the pipeline
    text = text.replace('"alpha": 0.5', '"alpha": {"__class__": "os.system"}')
    (path / "rmkit.json").write_text(text)
    with pytest.raises(UnsafeClassError, match="'os.system'"):
        rmkit.load(path)


def test_unknown_tags_are_refused(tmp_path):
    model, _ = _ridge_pipeline()
    path = rmkit.save(model, tmp_path / "m")
    text = (path / "rmkit.json").read_text().replace('"alpha": 0.5', '"alpha": {"__reduce__": ["os.system", "ls"]}')
    (path / "rmkit.json").write_text(text)
    with pytest.raises(IntegrityError, match="unknown tag '__reduce__'"):
        rmkit.load(path)


def test_truncated_safetensors_is_refused(tmp_path):
    model, _ = _ridge_pipeline()
    path = rmkit.save(model, tmp_path / "m")
    data = (path / "tensors.safetensors").read_bytes()
    (path / "tensors.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(IntegrityError, match="truncated"):
        rmkit.load(path)
    # even with the recorded size and hash forged to match, the cut file is not read as a model
    manifest = _manifest(path)
    manifest["tensors"].update(bytes=len(data) // 2, sha256=_swap.sha256(path / "tensors.safetensors"))
    _write_manifest(path, manifest)
    with pytest.raises(IntegrityError, match="not a readable safetensors file"):
        rmkit.load(path)


def test_tampered_safetensors_is_refused(tmp_path):
    model, X = _ridge_pipeline()
    path = rmkit.save(model, tmp_path / "m")
    data = bytearray((path / "tensors.safetensors").read_bytes())
    data[-3] ^= 0xFF  # same size, one weight changed
    (path / "tensors.safetensors").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="SHA-256.*altered"):
        rmkit.load(path)


def test_truncated_json_is_refused(tmp_path):
    model, _ = _ridge_pipeline()
    path = rmkit.save(model, tmp_path / "m")
    text = (path / "rmkit.json").read_text()
    (path / "rmkit.json").write_text(text[: len(text) // 2])
    with pytest.raises(IntegrityError, match="not valid JSON"):
        rmkit.load(path)


@pytest.mark.parametrize("version, hint", [(99, "newer rmkit"), (0, "re-save")])
def test_version_mismatch_is_refused(tmp_path, version, hint):
    model, _ = _ridge_pipeline()
    path = rmkit.save(model, tmp_path / "m")
    manifest = _manifest(path)
    manifest["format_version"] = version
    _write_manifest(path, manifest)
    with pytest.raises(PersistenceError, match=f"version {version}.*reads version 1.*{hint}"):
        rmkit.load(path)


def test_not_a_save_is_refused(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(PersistenceError, match="no rmkit.json"):
        rmkit.load(tmp_path / "d")
    with pytest.raises(FileNotFoundError):
        rmkit.load(tmp_path / "missing")


def test_different_backbone_is_refused(tmp_path):
    folder = tmp_path / "backbone"
    shutil.copytree(tiny_backbone(seed=0), folder)
    pairs = make_preference_pairs(3)
    feats = rmkit.BackboneFeaturizer(str(folder), cache=False, verbose=0, max_length=64).fit(pairs)
    expected = feats.transform(pairs)
    path = rmkit.save(feats, tmp_path / "f")
    # someone replaces the weights behind the same name
    shutil.rmtree(folder)
    shutil.copytree(tiny_backbone(seed=1), folder)
    # a folder outside rmkit's cache, named by the file only, is not read unless the caller confirms it
    with pytest.raises(BackboneMismatchError, match="outside rmkit's cache"):
        rmkit.load(path)
    with pytest.raises(BackboneMismatchError, match="fitted on backbone .*features would not match"):
        rmkit.load(path, backbones={str(folder): str(folder)})
    # pointing the name at the original weights works, and the fingerprint is still checked
    loaded = rmkit.load(path, backbones={str(folder): tiny_backbone(seed=0)})
    assert loaded.backbone == tiny_backbone(seed=0)
    np.testing.assert_allclose(loaded.transform(pairs), expected, rtol=1e-5, atol=1e-6)
    shutil.rmtree(folder)
    with pytest.raises(BackboneMismatchError, match="cannot be loaded here"):
        rmkit.load(path, backbones={str(folder): str(folder)})


# ------------------------------------------------------------------ atomic saves


def _temps(parent):
    return [p for p in Path(parent).iterdir() if ".rmkit-tmp-" in p.name]


def test_interrupted_save_keeps_previous_save(tmp_path, monkeypatch):
    old, X = _ridge_pipeline(seed=0)
    new, _ = _ridge_pipeline(seed=1)
    path = rmkit.save(old, tmp_path / "m")

    def crash(tmp, target):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(_api, "swap_into_place", crash)
    with pytest.raises(KeyboardInterrupt):
        rmkit.save(new, path)
    np.testing.assert_array_equal(rmkit.load(path).predict(X), old.predict(X))
    assert _temps(tmp_path) == []
    monkeypatch.undo()
    rmkit.save(new, path)  # a later save replaces it
    np.testing.assert_array_equal(rmkit.load(path).predict(X), new.predict(X))
    assert _temps(tmp_path) == []


def test_failed_second_rename_puts_the_previous_save_back(tmp_path, monkeypatch):
    old, X = _ridge_pipeline(seed=0)
    new, _ = _ridge_pipeline(seed=1)
    path = rmkit.save(old, tmp_path / "m")
    rmkit.save(new, path)
    np.testing.assert_array_equal(rmkit.load(path).predict(X), new.predict(X))
    real_rename = os.rename

    def fail_second(src, dst):  # the new save cannot be moved in: the previous one is put back
        if ".rmkit-tmp-" in str(src) and not str(src).endswith("-previous"):
            raise OSError("disk full")
        return real_rename(src, dst)

    monkeypatch.setattr(_swap.os, "rename", fail_second)
    with pytest.raises(OSError, match="disk full"):
        rmkit.save(old, path)
    np.testing.assert_array_equal(rmkit.load(path).predict(X), new.predict(X))


@pytest.mark.slow
def test_save_killed_midway_keeps_previous_save(tmp_path):
    old, X = _ridge_pipeline(seed=0)
    path = rmkit.save(old, tmp_path / "m")
    marker = tmp_path / "writing"
    script = textwrap.dedent(f"""
        import time, numpy as np, rmkit
        from rmkit.persistence import _api
        from sklearn.linear_model import Ridge
        real = _api.fsync_file
        def slow(p):
            real(p)
            open({str(marker)!r}, "w").close()
            time.sleep(60)
        _api.fsync_file = slow
        rmkit.save(Ridge().fit(np.eye(3), [1.0, 2.0, 3.0]), {str(path)!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.time() + 60
        while not marker.exists():
            assert proc.poll() is None and time.time() < deadline, "the saving process ended early"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(_temps(tmp_path)) == 1  # its half-written folder, beside the save
    np.testing.assert_array_equal(rmkit.load(path).predict(X), old.predict(X))
    rmkit.save(old, path)  # the next save clears what the dead process left
    assert _temps(tmp_path) == []


def test_refuses_to_replace_other_directories(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "thesis.tex").write_text("precious")
    model, _ = _ridge_pipeline()
    with pytest.raises(PersistenceError, match="not an rmkit save"):
        rmkit.save(model, tmp_path / "docs")
    assert (tmp_path / "docs" / "thesis.tex").read_text() == "precious"


# ------------------------------------------------------------------ every public estimator


def _rewards_and_prompt(n, k=2, d=3, seed=0):
    rng = np.random.RandomState(seed)
    return rng.normal(size=(n, k)), rng.normal(size=(n, k)), rng.normal(size=(n, d))


def _factory_featurizer(tiny):
    pairs = make_preference_pairs(4, random_state=2)
    return rmkit.BackboneFeaturizer(tiny, cache=False, verbose=0, max_length=64).fit(pairs), pairs, "transform"


def _factory_decorrelator(tiny):
    rng = np.random.RandomState(0)
    length = rng.normal(size=50)
    R = np.c_[rng.normal(size=50) + 0.8 * length, length]
    return rmkit.VerbosityDecorrelator(verbosity=-1).fit(R), R, "transform"


def _factory_multiobjective(tiny):
    rng = np.random.RandomState(0)
    X = rng.normal(size=(30, 8))
    y = np.c_[X[:, 0], X[:, 1] - X[:, 2]]
    y[:10, 1] = np.nan
    return rmkit.MultiObjectiveRegressor().fit(X, y), X, "predict"


def _factory_gating(tiny):
    from rmkit.layout import make_frame

    rc, rr, prompt = _rewards_and_prompt(32)
    net = rmkit.GatedScalarizer(max_epochs=2, hidden_size=8, random_state=0)
    pairs = make_frame({("chosen", "r", ("a", "b")): rc, ("rejected", "r", ("a", "b")): rr,
                        ("prompt", "h", range(3)): prompt})
    return net.fit(pairs), make_frame({("response", "r", ("a", "b")): rc, ("prompt", "h", range(3)): prompt}), \
        "predict"


def _factory_armorm(tiny):
    pairs = make_preference_pairs(36, random_state=0)
    feats = rmkit.BackboneFeaturizer(tiny, cache=False, verbose=0)
    model = rmkit.ArmoRM(feats, pair_objective_column="category", cv=None, random_state=0,
                         gating=rmkit.GatedScalarizer(max_epochs=2, hidden_size=8))
    test = make_preference_pairs(6, random_state=1)
    points = pd.DataFrame({"prompt": test["prompt"], "response": test["chosen"]})
    return model.fit(pairs), points, "predict"


_TINY_PAIRS = [{"prompt": "2+2?", "chosen": "4", "rejected": "5"},
               {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}]


def _factory_lora(tiny):
    rm = rmkit.LoRAExpertRegressor(tiny, rank=2, max_epochs=1, random_state=0, verbose=0)
    return rm.fit(_TINY_PAIRS), _TINY_PAIRS, "predict"


def _factory_experts(tiny):
    labels = {"correctness": [1, np.nan], "politeness": [np.nan, 1]}
    experts = rmkit.CapabilityExperts(tiny, rank=2, max_epochs=1, random_state=0, verbose=0)
    return experts.fit(_TINY_PAIRS, labels), _TINY_PAIRS, "transform"


def _factory_router(tiny):
    from sklearn.dummy import DummyRegressor
    from sklearn.feature_extraction.text import TfidfVectorizer

    X = pd.DataFrame({"prompt": ["add 2 and 3", "add 4 and 1", "poem on rain", "poem on sun"],
                      "task": ["math", "math", "poetry", "poetry"]})
    model = rmkit.TaskRouter(DummyRegressor(), featurizer=TfidfVectorizer(), verbose=0)
    return model.fit(X, [1.0, 1.0, 5.0, 5.0]), pd.DataFrame({"prompt": ["a poem on snow", "add 7 and 8"]}), "predict"


def _factory_aggregator(tiny):
    rng = np.random.RandomState(0)
    hc, hr = rng.normal(size=(40, 4)), rng.normal(size=(40, 4))
    from rmkit.layout import make_frame

    agg = rmkit.CapabilityAggregator(hidden_size=8, max_epochs=2, validation_fraction=None, random_state=0)
    pairs = make_frame({("chosen", "h", range(4)): hc, ("rejected", "h", range(4)): hr})
    return agg.fit(pairs), make_frame({("response", "h", range(4)): hc}), "predict"


def _factory_union(tiny):
    from sklearn.frozen import FrozenEstimator

    pairs = make_preference_pairs(24, random_state=0)
    F = rmkit.BackboneFeaturizer(tiny, cache=False, verbose=0).fit_transform(pairs)
    rated = rmkit.MultiObjectiveRegressor().fit(F.filter(regex="^(chosen|prompt):").rename(
        columns=lambda c: c.replace("chosen:", "response:")), np.arange(24.0))
    union = rmkit.ObjectiveUnion([("rated", FrozenEstimator(rated)), ("bt", rmkit.MultiObjectiveRegressor())])
    return union.fit(F), F, "transform"


def _factory_moe(tiny):
    X = pd.DataFrame({"prompt": ["2+2?", "Hi", "3+3?", "Hey", "5+5?", "Yo"],
                      "chosen": ["4", "Hello!", "6", "Hi there!", "10", "Hello."],
                      "rejected": ["5", "Go away.", "7", "Leave.", "11", "No."],
                      "correct": [1, None, 1, None, 1, None], "polite": [None, 1, None, 1, None, 1]})
    experts = rmkit.CapabilityExperts(tiny, rank=2, max_epochs=1, random_state=0, verbose=0)
    moe = rmkit.CapabilityMoE(["correct", "polite"], experts=experts, expert_fraction=0.67, random_state=0,
                              aggregator=rmkit.CapabilityAggregator(max_epochs=2))
    return moe.fit(X), X, "predict"


def _factory_dmoerm(tiny):
    from sklearn.feature_extraction.text import TfidfVectorizer

    X = make_preference_pairs(30, random_state=0).rename(columns={"category": "task"})
    X["brevity"] = [1 if len(c) < len(r) else -1 for c, r in zip(X.chosen, X.rejected)]
    model = rmkit.DMoERM(["brevity"], featurizer=TfidfVectorizer(), random_state=0, verbose=0,
                         experts=rmkit.CapabilityExperts(tiny, rank=2, max_epochs=1, verbose=0),
                         aggregator=rmkit.CapabilityAggregator(max_epochs=2))
    return model.fit(X), X.head(6), "predict"


# Known pickling bugs in the estimators themselves (an EarlyStopping callback with a lambda `sink`
# is built in get_default_callbacks); strict: the test fails once they are fixed, so remove them here.
JOBLIB_BUGS = {}  # name -> reason, for a known pickling bug (strict xfail)

# Public estimators with nothing learned to persist
NOT_PERSISTED = {
    "CapabilityLabeler": "learns nothing: its judge backend (an endpoint or a function) is configuration",
}

FACTORIES = {
    "ArmoRM": _factory_armorm,
    "LoRAExpertRegressor": _factory_lora,
    "CapabilityExperts": _factory_experts,
    "TaskRouter": _factory_router,
    "CapabilityAggregator": _factory_aggregator,
    "DMoERM": _factory_dmoerm,
    "CapabilityMoE": _factory_moe,
    "BackboneFeaturizer": _factory_featurizer,
    "VerbosityDecorrelator": _factory_decorrelator,
    "MultiObjectiveRegressor": _factory_multiobjective,
    "GatedScalarizer": _factory_gating,
    "ObjectiveUnion": _factory_union,
}


def _public_estimators():
    out = []
    for name in rmkit.__all__:
        obj = getattr(rmkit, name, None)
        if inspect.isclass(obj) and issubclass(obj, BaseEstimator):
            out.append(name)
    return sorted(out)


def _output(est, X, method):
    out = getattr(est, method)(X)
    return out.detach().cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out, dtype=float)


def _tensor_digests(*files):
    from safetensors.torch import load_file

    out = set()
    for f in files:
        for t in load_file(str(f)).values():
            if t.numel() >= 64:
                out.add((tuple(t.shape), hash(t.float().numpy().tobytes())))
    return out


_FITTED = {}


def _fitted(name, tiny):
    """Fit once per class; both round trips start from the same fitted estimator."""
    if name not in _FITTED:
        est, X, method = FACTORIES[name](tiny)
        _FITTED[name] = est, X, method, _output(est, X, method)
    return _FITTED[name]


@pytest.mark.parametrize("name", _public_estimators())
@pytest.mark.parametrize("how", ["rmkit", "joblib"])
def test_public_estimator_round_trip(name, how, tiny, tmp_path, request):
    if how == "joblib" and name in JOBLIB_BUGS:
        request.applymarker(pytest.mark.xfail(strict=True, raises=pickle.PicklingError, reason=JOBLIB_BUGS[name]))
    if name in NOT_PERSISTED:
        pytest.skip(NOT_PERSISTED[name])
    if name not in FACTORIES:
        pytest.skip(f"no tiny-data factory for rmkit.{name} in tests/test_persistence.py yet")
    est, X, method, expected = _fitted(name, tiny)
    if how == "rmkit":
        path = rmkit.save(est, tmp_path / name)
        for ref in _manifest(path)["backbones"]:  # referenced by fingerprint, never copied
            assert ref["sha256"] == weights_fingerprint(ref["name"])
            backbone = _tensor_digests(*Path(ref["name"]).glob("*.safetensors"))
            assert not backbone & _tensor_digests(path / "tensors.safetensors"), "backbone weights were copied"
        loaded = rmkit.load(path)
    else:
        joblib.dump(est, tmp_path / f"{name}.joblib")
        loaded = joblib.load(tmp_path / f"{name}.joblib")
    assert type(loaded) is type(est)
    np.testing.assert_array_equal(_output(loaded, X, method), expected)
