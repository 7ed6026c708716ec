import numpy as np
import pytest
from scipy.stats import spearmanr

from rmkit.layout import make_frame
from rmkit.moe._aggregator import CapabilityAggregator


def _pairs_frame(X):
    m = X.shape[1] // 2
    return make_frame({("chosen", "h", range(m)): X[:, :m], ("rejected", "h", range(m)): X[:, m:]})


def _rows_frame(h):
    return make_frame({("response", "h", range(h.shape[1])): h})

# --- phase 3 alone: the aggregator over concatenated expert features ------------------------------


def _mixed_capabilities(n, seed, mix=(0.5, 0.3, 0.2), d=4):
    """Three 'experts' with d-wide hidden states; capability k's reward is a linear read-out of block k and
    the overall reward is a known mix of the capability rewards."""
    rng = np.random.RandomState(seed)
    heads = np.random.RandomState(99).normal(size=(3, d))
    heads /= np.linalg.norm(heads, axis=1, keepdims=True)
    hc, hr = rng.normal(size=(n, 3 * d)), rng.normal(size=(n, 3 * d))

    def caps(h):
        return np.stack([h[:, k * d:(k + 1) * d] @ heads[k] for k in range(3)], axis=1)

    cc, cr = caps(hc), caps(hr)
    oc, orr = cc @ np.asarray(mix), cr @ np.asarray(mix)
    first = oc > orr
    X = np.where(first[:, None], np.hstack([hc, hr]), np.hstack([hr, hc]))
    cap_correct = np.where(first[:, None], cc > cr, cr > cc)  # does capability k alone pick the winner?
    return X, hc, oc, cap_correct


def test_aggregator_learns_a_known_mix_of_capabilities():
    X, _, _, _ = _mixed_capabilities(400, 0)
    Xt, ht, overall, cap_correct = _mixed_capabilities(400, 1)
    agg = CapabilityAggregator(hidden_size=16, lr=0.01, max_epochs=10, validation_fraction=None,
                               random_state=0).fit(_pairs_frame(X))
    acc = agg.score(_pairs_frame(Xt))
    best_single = float(cap_correct.mean(0).max())
    assert acc > 0.9 and acc > best_single + 0.1
    assert spearmanr(agg.predict(_rows_frame(ht)), overall).statistic > 0.9
    # Neutralising an expert's block hurts in proportion to its weight in the mix.
    drops = []
    for k in range(3):
        ablated = ht.copy()
        ablated[:, k * 4:(k + 1) * 4] = agg.mean_[k * 4:(k + 1) * 4]
        drops.append(1 - spearmanr(agg.predict(_rows_frame(ablated)), overall).statistic)
    assert drops[0] > drops[1] > drops[2]


def test_aggregator_is_reproducible_and_batch_invariant():
    X, h, _, _ = _mixed_capabilities(100, 0)
    P = _pairs_frame(X)
    a = CapabilityAggregator(hidden_size=8, max_epochs=3, random_state=0).fit(P)
    b = CapabilityAggregator(hidden_size=8, max_epochs=3, random_state=0).fit(P)
    np.testing.assert_array_equal(a.predict(_rows_frame(h)), b.predict(_rows_frame(h)))
    whole = a.predict(_rows_frame(h))
    parts = np.concatenate([a.predict(_rows_frame(h[:7])), a.predict(_rows_frame(h[7:]))])
    np.testing.assert_allclose(whole, parts, rtol=1e-6, atol=1e-6)
    pair_scores = a.reward_pairs(P)
    assert pair_scores.shape == (100, 2)
    np.testing.assert_allclose(a.predict_proba(P)[:, 1], 1 / (1 + np.exp(pair_scores[:, 1] - pair_scores[:, 0])))


def test_aggregator_bad_inputs():
    X, h, _, _ = _mixed_capabilities(20, 0)
    with pytest.raises(TypeError, match="feature frame"):
        CapabilityAggregator(max_epochs=1).fit(X)
    with pytest.raises(ValueError, match="identical chosen and rejected"):
        CapabilityAggregator(max_epochs=1).fit(_pairs_frame(np.hstack([h, h])))
    with pytest.raises(ValueError, match="needs preference pairs"):
        CapabilityAggregator(max_epochs=1).fit(_rows_frame(h))
    agg = CapabilityAggregator(max_epochs=1, validation_fraction=None).fit(_pairs_frame(X))
    with pytest.raises(ValueError, match="fitted on 12 hidden-state features"):
        agg.predict(_rows_frame(h[:, :5]))
    with pytest.raises(ValueError, match="validation_fraction"):
        CapabilityAggregator(validation_fraction=1.5).fit(_pairs_frame(X))


# --- the inner model and the double layer on the tiny backbone -----------------------------------

from sklearn.feature_extraction.text import TfidfVectorizer  # noqa: E402

from rmkit import BackboneFeaturizer, CapabilityExperts, LoRAExpertRegressor  # noqa: E402
from rmkit.datasets import make_preference_pairs  # noqa: E402
from rmkit.judge._labeler import CapabilityLabeler  # noqa: E402
from rmkit.moe._capability_moe import CapabilityMoE  # noqa: E402
from rmkit.moe._dmoerm import DMoERM  # noqa: E402
from rmkit.moe._task_adapter import merge_task_adapter  # noqa: E402


def _labelled(n=30, seed=0):
    X = make_preference_pairs(n, random_state=seed).rename(columns={"category": "task"})
    X["brevity"] = np.where(X["chosen"].str.len() < X["rejected"].str.len(), 1.0, -1.0)
    X["correctness"] = np.where(X["task"] == "math", 1.0, np.nan)  # only math pairs are labelled
    return X


def _experts(tiny, **kw):
    return CapabilityExperts(tiny, rank=2, max_epochs=1, batch_size=16, max_length=160, random_state=0, verbose=0,
                             **kw)


FAST_AGG = dict(hidden_size=8, max_epochs=2, validation_fraction=None, random_state=0)


def test_moe_phases_use_disjoint_prompt_splits(tiny):
    from rmkit.model_selection import prompt_groups

    X = _labelled(20)
    moe = CapabilityMoE(["brevity", "correctness"], experts=_experts(tiny),
                        aggregator=CapabilityAggregator(**FAST_AGG), random_state=0).fit(X)
    groups = prompt_groups(X)
    n_prompts = len(set(groups))
    assert len(set(groups[moe.expert_rows_])) == round(0.6 * n_prompts)  # the paper's 60/40, by prompt
    assert not set(groups[moe.expert_rows_]) & set(groups[moe.aggregator_rows_])  # no prompt in both phases
    assert len(moe.expert_rows_) + len(moe.aggregator_rows_) == 20
    labelled_math = int((X.iloc[moe.expert_rows_]["task"] == "math").sum())
    assert moe.n_labels_ == {"brevity": len(moe.expert_rows_), "correctness": labelled_math}
    assert moe.aggregator_.n_features_ == 2 * 64  # two experts' hidden states, concatenated
    pointwise = X[["prompt", "chosen"]].rename(columns={"chosen": "response"})
    expl = moe.explain(pointwise)
    assert list(expl.columns) == ["reward", "brevity", "correctness"]
    np.testing.assert_allclose(expl["brevity"], moe.experts_.predict(pointwise)[:, 0], rtol=1e-5)
    pair_p = moe.predict_proba(X)[:, 1]
    rc = moe.predict(pointwise)
    rr = moe.predict(X[["prompt", "rejected"]].rename(columns={"rejected": "response"}))
    np.testing.assert_allclose(pair_p, 1 / (1 + np.exp(rr - rc)), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(moe.predict(X), (rc > rr).astype(int))


def test_moe_labels_from_ratings_and_from_a_judge(tiny):
    X = _labelled(20).drop(columns=["brevity", "correctness"])
    X["length_chosen"], X["length_rejected"] = -X["chosen"].str.len(), -X["rejected"].str.len()

    def judge(messages):  # prefers whichever response mentions a number
        text = messages[-1]["content"]
        a = text.split("[Response A]\n")[1].split("\n\n[Response B]")[0]
        return "A" if any(ch.isdigit() for ch in a) else "B"

    labeler = CapabilityLabeler({"numeric": "gives a number", "length": "is short"}, backend=judge, cache=False,
                                verbose=0)
    moe = CapabilityMoE(["length", "numeric"], experts=_experts(tiny), labeler=labeler,
                        aggregator=CapabilityAggregator(**FAST_AGG), random_state=0).fit(X)
    exp = X.iloc[moe.expert_rows_]
    assert moe.n_labels_["length"] == int((exp["chosen"].str.len() != exp["rejected"].str.len()).sum())
    # The judge is consistent only where exactly one response has a digit.
    one_digit = [any(c.isdigit() for c in a) != any(c.isdigit() for c in b) for a, b in zip(exp.chosen, exp.rejected)]
    assert moe.n_labels_["numeric"] == sum(one_digit) == moe.labeler_report_.loc["numeric", "n_labelled"]
    assert list(moe.labeler_report_.index) == ["numeric"]  # 'length' came from its rating columns, not the judge


def test_moe_bad_inputs(tiny):
    X = _labelled(20)
    kw = dict(experts=_experts(tiny), aggregator=CapabilityAggregator(**FAST_AGG), random_state=0)
    with pytest.raises(ValueError, match="capabilities is empty"):
        CapabilityMoE([], **kw).fit(X)
    with pytest.raises(ValueError, match=r"No labels for capability\(ies\) \['style'\]"):
        CapabilityMoE(["brevity", "style"], **kw).fit(X)
    with pytest.raises(ValueError, match="must be \\+1, -1 or NaN; found 0.0"):
        CapabilityMoE(["brevity"], **kw).fit(X.assign(brevity=0.0))
    with pytest.raises(ValueError, match="'correctness' has no label among the 1[0-9] pairs"):
        CapabilityMoE(["correctness"], **kw).fit(X.assign(correctness=np.nan))
    with pytest.raises(ValueError, match="needs 'chosen' and 'rejected'"):
        CapabilityMoE(["brevity"], **kw).fit(X[["prompt", "chosen"]].rename(columns={"chosen": "response"}))
    with pytest.raises(ValueError, match="expert_fraction must lie in"):
        CapabilityMoE(["brevity"], expert_fraction=1.0, **{k: v for k, v in kw.items()}).fit(X)
    with pytest.raises(ValueError, match="too few to split"):
        CapabilityMoE(["brevity"], **kw).fit(X.head(1))  # one prompt cannot be split by prompt


def test_phase1_merge_reproduces_the_task_adapter(tiny, tmp_path):
    X = _labelled(12)
    rm = LoRAExpertRegressor(tiny, rank=2, layers=2, max_epochs=1, max_length=64, lr=5e-2, random_state=0,
                             verbose=0).fit(X[["prompt", "chosen", "rejected"]])
    folder = merge_task_adapter(rm, root=tmp_path)
    assert merge_task_adapter(rm, root=tmp_path) == folder  # content-addressed: reused
    rows = X[["prompt", "chosen"]].rename(columns={"chosen": "response"})
    merged = BackboneFeaturizer(folder, max_length=64, cache=False, verbose=0).fit().transform(rows)
    base = BackboneFeaturizer(tiny, max_length=64, cache=False, verbose=0).fit().transform(rows)
    merged, base = (F.filter(like="response:h:").to_numpy() for F in (merged, base))
    adapted = rm.transform(rows).filter(like="response:h:").to_numpy()
    np.testing.assert_allclose(merged, adapted, rtol=1e-4, atol=1e-4)
    assert np.abs(merged - base).max() > 1e-3  # the adapter really changed the backbone


def test_moe_task_finetune_builds_experts_on_the_merged_backbone(tiny):
    X = _labelled(20)
    moe = CapabilityMoE(["brevity"], experts=_experts(tiny, layers=2), task_finetune=True,
                        aggregator=CapabilityAggregator(**FAST_AGG), random_state=0).fit(X)
    assert moe.task_model_.rank == 2 and moe.task_model_.layers == 2
    assert moe.experts_.backbone == moe.task_backbone_ != tiny
    assert moe.predict(X).shape == (20,)


def test_dmoerm_routes_and_each_task_model_sees_only_its_rows(tiny, tmp_path):
    X = _labelled(36)
    model = DMoERM(["brevity", "correctness"], experts=_experts(tiny), aggregator=CapabilityAggregator(**FAST_AGG),
                   featurizer=BackboneFeaturizer(tiny, cache=False, verbose=0), random_state=0, verbose=0)
    with pytest.raises(ValueError, match="'correctness' has no label"):  # only math pairs have it
        model.fit(X)
    with pytest.warns(UserWarning, match=r"\['correctness'\] have no label"):
        model.set_params(drop_unlabelled=True).fit(X)  # only the math task gets a correctness expert
    assert set(model.classes_) == {"math", "relevance", "safety"}
    assert {t: m.capabilities_ for t, m in model.estimators_.items()} == {
        "math": ["brevity", "correctness"], "relevance": ["brevity"], "safety": ["brevity"]}
    for task, moe in model.estimators_.items():
        rows = X[X["task"] == task]
        assert len(moe.expert_rows_) + len(moe.aggregator_rows_) == len(rows) == 12
    test = _labelled(15, seed=1)
    assert model.routing_accuracy(test) == 1.0
    rows = test[["prompt", "chosen"]].rename(columns={"chosen": "response"})
    expl = model.explain(rows)
    assert list(expl["task"]) == list(test["task"])
    for task, moe in model.estimators_.items():  # each row scored by its own task's model
        mask = (test["task"] == task).to_numpy()
        np.testing.assert_allclose(expl.loc[mask, "reward"], moe.predict(rows[mask]), rtol=1e-5)
    assert ((expl["task_probability"] > 0.33) & (expl["task_probability"] <= 1)).all()
    is_math = (test["task"] == "math").to_numpy()
    assert expl.loc[is_math, "correctness"].notna().all() and expl.loc[~is_math, "correctness"].isna().all()
    assert model.predict(test).shape == (15,)
    import pickle

    from rmkit import load, save

    save(model, tmp_path / "dmoerm")
    for copy in (pickle.loads(pickle.dumps(model)), load(tmp_path / "dmoerm")):
        np.testing.assert_allclose(copy.predict(test), model.predict(test), rtol=1e-6)
    np.testing.assert_allclose(model.predict_for_tasks(rows, test["task"]), model.predict(rows), rtol=1e-6)
    with pytest.raises(ValueError, match=r"Unknown task\(s\) \['poetry'\]"):
        model.predict_for_tasks(test, ["poetry"] * 15)
    with pytest.raises(ValueError, match=r"Unknown task\(s\) \['poetry'\]"):
        model.routing_accuracy(test.assign(task="poetry"))


def test_dmoerm_bad_inputs(tiny):
    X = _labelled(30)
    kw = dict(experts=_experts(tiny), featurizer=TfidfVectorizer(), random_state=0, verbose=0)
    with pytest.raises(ValueError, match="capabilities is empty"):
        DMoERM([], **kw).fit(X)
    with pytest.raises(ValueError, match=r"No labels for capability\(ies\) \['brevity'\]"):
        DMoERM(["brevity"], **kw).fit(X.drop(columns="brevity"))
    with pytest.raises(ValueError, match="missing the task column 'task'"):
        DMoERM(["brevity"], **kw).fit(X.drop(columns="task"))
    with pytest.raises(ValueError, match=r"fewer than min_task_rows=20"):
        DMoERM(["brevity"], min_task_rows=20, **kw).fit(X)
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        DMoERM(["brevity"], **kw).predict(X)


# ---------------------------------------------------------------- issue 16: the reference code's initialisation


def test_expert_value_heads_start_from_the_phase1_head(tiny):
    X = _labelled(20)
    pointwise = X[["prompt", "chosen"]].rename(columns={"chosen": "response"})
    # lr ~ 0: the experts stay where they started, so their rewards are the task model's
    moe = CapabilityMoE(["brevity", "correctness"], experts=_experts(tiny, layers=2, lr=1e-12), task_finetune=True,
                        aggregator=CapabilityAggregator(**FAST_AGG), random_state=0).fit(X)
    head = moe.task_model_.value_head()
    assert head["weight"].shape == (64,) and np.abs(head["weight"]).sum() > 0
    task_rewards = moe.task_model_.predict(pointwise)
    for k in range(2):
        np.testing.assert_allclose(moe.experts_.predict(pointwise)[:, k], task_rewards, atol=1e-3)
    # without phase 1 the heads are random, one per expert: the experts disagree
    plain = CapabilityMoE(["brevity", "correctness"], experts=_experts(tiny, layers=2, lr=1e-12),
                          aggregator=CapabilityAggregator(**FAST_AGG), random_state=0).fit(X)
    r = plain.experts_.predict(pointwise)
    assert np.abs(r[:, 0] - r[:, 1]).max() > 1e-2
    with pytest.raises(ValueError, match="hidden size"):
        _experts(tiny).fit(X[["prompt", "chosen", "rejected"]], X[["brevity"]], init_head={"weight": [1.0], "bias": 0})


def test_task_descriptions_reach_the_judge(tiny):
    X = _labelled(12).drop(columns=["brevity", "correctness"])
    asked = []

    def judge(messages):
        asked.append(messages[-1]["content"])
        return "A"

    labeler = CapabilityLabeler({"clarity": "is clear"}, backend=judge, cache=False, verbose=0)
    moe = CapabilityMoE({"clarity": "explains each step of the arithmetic"}, experts=_experts(tiny),
                        labeler=labeler, aggregator=CapabilityAggregator(**FAST_AGG), drop_unlabelled=True,
                        random_state=0)
    with pytest.raises(ValueError, match="No capability has a label"):  # "A" in both orders: never consistent
        moe.fit(X)
    assert asked and all("explains each step of the arithmetic" in q and "is clear" not in q for q in asked)
