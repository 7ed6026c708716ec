import numpy as np
import pandas as pd
import pytest

from rmkit.evaluation import best_of_n, kl_bon


def _candidates(n_prompts=60, per_prompt=12, seed=0):
    """Synthetic candidates: a latent quality q, and a length that long-winded (worse) answers inflate."""
    rng = np.random.default_rng(seed)
    n = n_prompts * per_prompt
    q = rng.normal(size=n)
    length = 200 - 40 * q + rng.normal(scale=10, size=n)  # longer answers are worse here
    return pd.DataFrame({"prompt_id": np.repeat(np.arange(n_prompts), per_prompt),
                         "prompt": np.repeat([f"prompt {i}" for i in range(n_prompts)], per_prompt),
                         "response": ["x" * int(max(1, v)) for v in length], "gold": q, "length": length,
                         "noise": rng.normal(size=n)})


def test_kl_bon_formula():
    np.testing.assert_allclose(kl_bon([1, 4]), [0.0, np.log(4) - 0.75])
    with pytest.raises(ValueError, match="at least 1"):
        kl_bon(0)


def test_proxy_equal_to_gold_rises():
    data = _candidates()
    res = best_of_n("gold", data, n_draws=100, n_boot=300, random_state=0)
    assert res["n"].tolist() == [1, 2, 4, 8, 16]
    np.testing.assert_allclose(res["kl_bon"], kl_bon(res["n"]))
    assert res["gold"].is_monotonic_increasing
    assert res["gain_low"].iloc[-1] > 0.8  # the expected max of 16 normals is ~1.77
    assert (res["gold_low"] <= res["gold"]).all() and (res["gold"] <= res["gold_high"]).all()


def test_pure_noise_proxy_is_flat():
    data = _candidates()
    res = best_of_n(data["noise"].to_numpy(), data, n_draws=100, n_boot=300, random_state=0)
    for _, row in res.iterrows():  # every gain's interval holds 0
        assert row["gain_low"] <= 0 <= row["gain_high"]
    assert abs(res["gain"]).max() < 0.1


def test_length_proxy_while_gold_penalises_length_falls():
    data = _candidates()
    res = best_of_n(lambda df: df["response"].str.len(), data, n_draws=100, n_boot=300, random_state=0)
    assert res["gold"].is_monotonic_decreasing
    assert res["gain_high"].iloc[-1] < -0.8


def test_candidates_without_gold_are_excluded_and_counted():
    data = _candidates(n_prompts=20, per_prompt=6)
    data.loc[data.index % 3 == 0, "gold"] = np.nan  # a third carry no gold
    seen = []

    def scorer(df):
        seen.append(len(df))
        return -df["length"].to_numpy()

    res = best_of_n(scorer, data, n_values=(1, 4), n_draws=20, n_boot=0, random_state=0)
    assert seen == [80] and res.attrs["n_excluded"] == 40 and res.attrs["n_candidates"] == 80
    assert "gold_low" not in res  # n_boot=0: no intervals
    # a precomputed array aligned with the full data is subset the same way
    arr = best_of_n(-data["length"].to_numpy(), data, n_values=(1, 4), n_draws=20, n_boot=0, random_state=0)
    np.testing.assert_allclose(arr["gold"], res["gold"])


class LengthModel:
    def predict(self, X):
        assert list(X.columns) == ["prompt", "response"]
        return X["response"].str.len().to_numpy(float)


def test_fitted_model_as_scorer_and_prompt_hash_groups():
    data = _candidates(n_prompts=15, per_prompt=5).drop(columns=["prompt_id"])
    by_model = best_of_n(LengthModel(), data, n_values=(1, 2, 8), n_draws=30, n_boot=50, random_state=3)
    by_column = best_of_n("length", data.assign(length=data["response"].str.len()), n_values=(1, 2, 8),
                          n_draws=30, n_boot=50, random_state=3)
    assert by_model.attrs["n_prompts"] == 15  # groups from the prompt text
    np.testing.assert_allclose(by_model["gold"], by_column["gold"])


def test_seeded_and_ties_use_the_mean_gold_of_the_tied():
    data = _candidates(n_prompts=10, per_prompt=4)
    a = best_of_n("gold", data, n_draws=30, n_boot=50, random_state=7)
    b = best_of_n("gold", data, n_draws=30, n_boot=50, random_state=7)
    pd.testing.assert_frame_equal(a, b)
    # a constant proxy ties everything: without replacement and N = pool size the pick is the pool's mean gold
    flat = best_of_n(np.zeros(len(data)), data, n_values=(4,), replace=False, n_draws=5, n_boot=0, random_state=0)
    assert flat["gold"].iloc[0] == pytest.approx(data.groupby("prompt_id")["gold"].mean().mean())


def test_errors_name_the_problem():
    data = _candidates(n_prompts=3, per_prompt=4)
    with pytest.raises(ValueError, match="no gold column 'score'"):
        best_of_n("gold", data, gold="score")
    with pytest.raises(ValueError, match="proxy scores for"):
        best_of_n(np.zeros(5), data)
    with pytest.raises(ValueError, match="smallest pool"):
        best_of_n("gold", data, n_values=(1, 8), replace=False)
    with pytest.raises(ValueError, match="No candidate carries a gold score"):
        best_of_n("noise", data.assign(gold=np.nan))
    with pytest.raises(ValueError, match="NaN or infinite"):
        best_of_n(np.full(len(data), np.nan), data)
