import joblib
import numpy as np
import pandas as pd
import pytest
from sklearn.base import BaseEstimator, clone
from sklearn.pipeline import Pipeline

import rmkit
from rmkit import BackboneFeaturizer, RewardEnsemble
from rmkit.datasets import make_preference_pairs
from rmkit.ensemble import BradleyTerryProbe
from rmkit.ensemble._ensemble import combine_rewards
from rmkit.model_selection import prompt_groups


class LengthRM(BaseEstimator):
    """reward = weight * len(response) + offset; records the prompts it was fitted on."""

    def __init__(self, weight=1.0, offset=0.0):
        self.weight = weight
        self.offset = offset

    def fit(self, X, y=None):
        self.seen_prompts_ = list(pd.DataFrame(X)["prompt"])
        return self

    def predict(self, X):
        return self.weight * pd.DataFrame(X)["response"].str.len().to_numpy(float) + self.offset


class NoisyRM(BaseEstimator):
    """reward = len(response) + seeded noise keyed on the text: members differ only by random_state."""

    def __init__(self, random_state=None):
        self.random_state = random_state

    def fit(self, X, y=None):
        self.fitted_seed_ = self.random_state
        return self

    def predict(self, X):
        resp = pd.DataFrame(X)["response"]
        noise = [np.random.RandomState(abs(hash((r, self.random_state))) % 2**31).normal() for r in resp]
        return resp.str.len().to_numpy(float) + np.asarray(noise)


PAIRS = pd.DataFrame({"prompt": ["a", "b", "c", "d"], "chosen": ["xxxx", "yyyyy", "zz zz", "w w w"],
                      "rejected": ["x", "yy", "z", "ww"]})
ROWS = pd.DataFrame({"prompt": ["a", "a", "b"], "response": ["x", "xxx", "xxxxxxx"]})


def test_combiners_on_known_inputs():
    Z = np.array([[1.0, 2.0, 6.0], [0.0, 0.0, 0.0], [-1.0, 1.0, 3.0]])
    np.testing.assert_allclose(combine_rewards(Z, "mean"), [3.0, 0.0, 1.0])
    np.testing.assert_allclose(combine_rewards(Z, "min"), [1.0, 0.0, -1.0])
    np.testing.assert_allclose(combine_rewards(Z, "wco"), [1.0, 0.0, -1.0])
    std = np.sqrt([((1 - 3) ** 2 + 1 + 9) / 3, 0.0, (4 + 0 + 4) / 3])
    np.testing.assert_allclose(combine_rewards(Z, "uwo", lam=2.0), np.array([3.0, 0.0, 1.0]) - 2 * std)
    with pytest.raises(ValueError, match="combine must be one of"):
        combine_rewards(Z, "median")
    with pytest.raises(ValueError, match="lam"):
        combine_rewards(Z, "uwo", lam=-1)


def test_members_are_standardised_before_combining():
    # Member b rewards on a 100x scale with an offset: standardised, both members agree exactly.
    ens = RewardEnsemble([("a", LengthRM(1.0)), ("b", LengthRM(100.0, offset=7.0))], combine="min").fit(PAIRS)
    ex = ens.explain(ROWS)
    assert list(ex.columns) == ["a", "b", "combined"]
    np.testing.assert_allclose(ex["a"], ex["b"])
    lengths = np.r_[PAIRS["chosen"].str.len(), PAIRS["rejected"].str.len()].astype(float)
    np.testing.assert_allclose(ex["a"], (ROWS["response"].str.len() - lengths.mean()) / lengths.std())
    raw = ens.explain(ROWS, standardized=False)
    np.testing.assert_allclose(raw["b"], 100 * ROWS["response"].str.len() + 7.0)
    # without standardisation the large-scale member dominates the mean
    plain = RewardEnsemble([("a", LengthRM(1.0)), ("b", LengthRM(100.0))], standardize=False).fit(PAIRS)
    np.testing.assert_allclose(plain.predict(ROWS), 50.5 * ROWS["response"].str.len())


def test_uwo_penalises_disagreement():
    ens = RewardEnsemble([("up", LengthRM(1.0)), ("down", LengthRM(-1.0))], combine="uwo", lam=0.5).fit(PAIRS)
    Z = ens.member_rewards(ROWS)
    np.testing.assert_allclose(ens.predict(ROWS), Z.mean(1) - 0.5 * Z.std(1))
    assert ens.set_params(combine="mean").predict(ROWS) == pytest.approx(Z.mean(1))


def test_explicit_members_are_parameters_like_voting_regressor():
    ens = RewardEnsemble([("a", LengthRM(1.0)), ("b", LengthRM(2.0))])
    params = ens.get_params()
    assert params["a"] is ens.estimators[0][1] and params["b__weight"] == 2.0
    ens.set_params(b__weight=5.0, a=LengthRM(3.0))
    assert ens.estimators[1][1].weight == 5.0 and ens.estimators[0][1].weight == 3.0
    cloned = clone(ens)
    assert cloned.get_params()["b__weight"] == 5.0 and cloned.estimators[1][1] is not ens.estimators[1][1]
    with pytest.raises(ValueError, match="not both"):
        RewardEnsemble([("a", LengthRM())], estimator=LengthRM()).fit(PAIRS)


def test_seeded_members_get_distinct_nested_seeds():
    template = Pipeline([("rm", NoisyRM())])
    ens = RewardEnsemble(estimator=template, n_members=4, random_state=0).fit(PAIRS)
    seeds = [m.named_steps["rm"].fitted_seed_ for m in ens.estimators_]
    assert len(set(seeds)) == 4 and seeds == ens.member_seeds_
    again = RewardEnsemble(estimator=template, n_members=4, random_state=0).fit(PAIRS)
    assert again.member_seeds_ == seeds  # reproducible
    assert not np.allclose(ens.member_rewards(ROWS)[:, 0], ens.member_rewards(ROWS)[:, 1])
    with pytest.raises(ValueError, match="no random_state parameter"):
        RewardEnsemble(estimator=LengthRM(), n_members=3).fit(PAIRS)


def test_param_variations_build_one_member_each():
    ens = RewardEnsemble(estimator=LengthRM(), param_variations=[{"weight": 1.0}, {"weight": -2.0}]).fit(PAIRS)
    assert [m.weight for m in ens.estimators_] == [1.0, -2.0]
    assert ens.member_names_ == ["member0", "member1"]


def test_bootstrap_resamples_whole_prompts():
    pairs = pd.DataFrame({"prompt": ["p1"] * 3 + ["P1 "] * 2 + ["p2"] * 4 + ["p3"],
                          "chosen": ["c" * (i + 2) for i in range(10)], "rejected": ["r"] * 10})
    groups = prompt_groups(pairs)
    assert len(set(groups[:5])) == 1  # normalised: case and whitespace do not split a prompt
    sizes = {"p1": 5, "p2": 4, "p3": 1}
    ens = RewardEnsemble(estimator=LengthRM(), n_members=6, bootstrap=True, random_state=1).fit(pairs)
    draws = set()
    for member in ens.estimators_:
        counts = pd.Series([" ".join(p.split()).lower() for p in member.seen_prompts_]).value_counts()
        for prompt, n in counts.items():
            assert n % sizes[prompt] == 0  # a drawn prompt brings all of its pairs
        draws.add(tuple(sorted(counts.items())))
    assert len(draws) > 1  # members see different resamples
    np.testing.assert_array_equal(ens.n_train_pairs_, [len(m.seen_prompts_) for m in ens.estimators_])


def test_pairs_contract_and_errors():
    ens = RewardEnsemble([("a", LengthRM(1.0)), ("b", LengthRM(3.0))]).fit(PAIRS)
    assert ens.reward_pairs(PAIRS).shape == (4, 2)
    s = ens.reward_pairs(PAIRS)
    np.testing.assert_allclose(ens.decision_function(PAIRS), s[:, 0] - s[:, 1])
    np.testing.assert_allclose(ens.predict_proba(PAIRS)[:, 1], 1 / (1 + np.exp(-(s[:, 0] - s[:, 1]))))
    swapped = PAIRS.rename(columns={"chosen": "rejected", "rejected": "chosen"})
    assert ens.score(PAIRS) == 1.0 and ens.score(swapped) == 0.0
    with pytest.raises(ValueError, match="needs preference pairs"):
        ens.predict_proba(ROWS)
    with pytest.raises(ValueError, match="same reward to every training response"):
        RewardEnsemble([("a", LengthRM(0.0))]).fit(PAIRS)


class TwoColumnRM(LengthRM):
    def predict(self, X):
        r = super().predict(X)
        return np.c_[r, r]


def test_member_with_wrong_output_shape_is_named():
    with pytest.raises(ValueError, match="'bad' returned predictions of shape"):
        RewardEnsemble([("bad", TwoColumnRM())]).fit(PAIRS)


# -- with a real (tiny) backbone featurizer --------------------------------------------------------------

@pytest.fixture(scope="module")
def backbone_pairs():
    pairs = make_preference_pairs(24, random_state=0)
    rows = pd.DataFrame({"prompt": list(pairs["prompt"][:6]) * 2,
                         "response": list(pairs["chosen"][:6]) + list(pairs["rejected"][:6])})
    return pairs, rows


def _member(tiny, cache):
    return Pipeline([("featurizer", BackboneFeaturizer(tiny, cache=cache, verbose=0)),
                     ("probe", BradleyTerryProbe(alphas=[10.0], cv=2))])


def test_members_share_one_featurizer_pass(tiny, feature_cache, backbone_pairs):
    pairs, _ = backbone_pairs
    ens = RewardEnsemble(estimator=_member(tiny, feature_cache), n_members=3, random_state=0).fit(pairs)
    # every member's last transform (the standardisation pass over the training responses) came from the cache
    for m in ens.estimators_:
        stats = m.named_steps["featurizer"].last_stats_
        assert stats["cache_hits"] == stats["items"] == 2 * len(pairs)
    new = pd.DataFrame({"prompt": ["What is 3 + 4?"] * 2, "response": ["7.", "It is seven."]})
    ens.predict(new)
    stats = [m.named_steps["featurizer"].last_stats_ for m in ens.estimators_]
    assert stats[0]["cache_hits"] == 0 and stats[0]["real_tokens"] > 0  # the first member runs the backbone
    assert all(s["cache_hits"] == 2 and s["real_tokens"] == 0 for s in stats[1:])  # the others read its features
    seeds = [m.named_steps["probe"].random_state for m in ens.estimators_]
    assert len(set(seeds)) == 3


@pytest.fixture(scope="module")
def fitted_backbone_ensemble(tiny, backbone_pairs):
    pairs, _ = backbone_pairs
    return RewardEnsemble(estimator=_member(tiny, False), n_members=3, bootstrap=True, combine="uwo", lam=0.5,
                          random_state=0).fit(pairs)


@pytest.mark.slow
def test_scores_do_not_depend_on_batch_size(fitted_backbone_ensemble, backbone_pairs):
    _, rows = backbone_pairs
    ens = fitted_backbone_ensemble
    whole = ens.predict(rows)
    one_by_one = np.concatenate([ens.predict(rows.iloc[[i]]) for i in range(len(rows))])
    in_threes = np.concatenate([ens.predict(rows.iloc[i:i + 3]) for i in range(0, len(rows), 3)])
    np.testing.assert_allclose(one_by_one, whole, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(in_threes, whole, rtol=1e-4, atol=1e-4)
    assert np.ptp(whole) > 1e-3  # not trivially constant


def test_persistence_round_trips(fitted_backbone_ensemble, backbone_pairs, tmp_path):
    _, rows = backbone_pairs
    ens = fitted_backbone_ensemble
    expected = ens.explain(rows)
    joblib.dump(ens, tmp_path / "ens.joblib")
    pd.testing.assert_frame_equal(joblib.load(tmp_path / "ens.joblib").explain(rows), expected, rtol=1e-5)
    rmkit.save(ens, tmp_path / "saved")
    loaded = rmkit.load(tmp_path / "saved")
    assert isinstance(loaded, RewardEnsemble) and loaded.get_params()["lam"] == 0.5
    pd.testing.assert_frame_equal(loaded.explain(rows), expected, rtol=1e-5)
    np.testing.assert_array_equal(loaded.n_train_pairs_, ens.n_train_pairs_)


def test_explicit_members_round_trip_through_rmkit_save(tmp_path):
    ens = RewardEnsemble([("a", BradleyTerryProbe(random_state=0))])
    rmkit.save(ens, tmp_path / "unfitted")
    assert rmkit.load(tmp_path / "unfitted").get_params()["a__random_state"] == 0


def test_probe_learns_the_preferred_direction():
    from rmkit.layout import make_frame

    rng = np.random.RandomState(0)
    c, r, p = rng.normal(size=(3, 300, 5))
    c[:, 2] += 1.5
    pairs = make_frame({("chosen", "h", range(5)): c, ("rejected", "h", range(5)): r, ("prompt", "h", range(5)): p,
                        ("prompt", "m", ("group",)): np.arange(300) // 3})
    probe = BradleyTerryProbe(random_state=0).fit(pairs)
    assert np.argmax(probe.coef_) == 2
    assert probe.score(pairs) > 0.8
    rows = make_frame({("response", "h", range(5)): c, ("prompt", "h", range(5)): p})
    np.testing.assert_allclose(probe.decision_function(pairs), probe.predict(rows) - probe.predict(
        make_frame({("response", "h", range(5)): r, ("prompt", "h", range(5)): p})), atol=1e-9)
    with pytest.raises(ValueError, match="needs preference pairs"):
        probe.fit(rows)
    with pytest.raises(TypeError, match="feature frame"):
        probe.predict(c)
