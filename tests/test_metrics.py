import numpy as np
import pandas as pd
import pytest
from sklearn.base import BaseEstimator
from sklearn.model_selection import GridSearchCV, KFold

from rmkit.metrics import (
    pairwise_accuracy,
    pairwise_scorer,
    rewardbench_report,
    rewardbench_scores,
)


def test_pairwise_accuracy_counts_ties_as_wrong():
    assert pairwise_accuracy([1.0, 2.0, 3.0, 3.0], [0.0, 2.0, 4.0, 2.9]) == 0.5


@pytest.mark.parametrize("c, r, match", [([1.0], [1.0, 2.0], "differ in length"), ([np.nan], [1.0], "NaN"),
                                         ([], [], "No pairs")])
def test_pairwise_accuracy_rejects_bad_input(c, r, match):
    with pytest.raises(ValueError, match=match):
        pairwise_accuracy(c, r)


def _eval_frame():
    rows = []
    # Chat: subset a (4 pairs, 3 right) and b (2 pairs, 0 right) -> example-weighted 3/6
    rows += [("Chat", "a", 1, 0)] * 3 + [("Chat", "a", 0, 1)] + [("Chat", "b", 0, 1)] * 2
    rows += [("Chat Hard", "c", 1, 0)] * 2                        # 1.0
    rows += [("Safety", "d", 1, 0), ("Safety", "d", 0, 0)]        # 0.5 (tie is wrong)
    rows += [("Reasoning", "e", 1, 0)] * 3 + [("Reasoning", "e", 0, 1)]  # 0.75
    rows += [("Prior", "f", 0, 1)]                                 # 0.0
    rows += [("Extra", "g", 1, 0)]                                 # reported, not weighted
    df = pd.DataFrame(rows, columns=["category", "subset", "c", "r"])
    return df, df.pop("c").to_numpy(float), df.pop("r").to_numpy(float)


def test_rewardbench_scores_follow_the_published_formula():
    df, c, r = _eval_frame()
    s = rewardbench_scores(df, c, r)
    assert s["sections"]["Chat"] == pytest.approx(0.5)
    assert s["sections"]["Safety"] == pytest.approx(0.5)
    expected = (2 * 0.5 + 2 * 1.0 + 2 * 0.5 + 2 * 0.75 + 1 * 0.0) / 9
    assert s["overall"] == pytest.approx(expected)
    assert s["other_sections"] == ["Extra"] and s["missing_sections"] == []
    assert s["subsets"]["b"] == 0.0
    assert 0 < s["overall_stderr"] < 0.2


def test_missing_sections_are_left_out_and_named():
    df, c, r = _eval_frame()
    keep = (df["category"] == "Chat").to_numpy()
    s = rewardbench_scores(df[keep], c[keep], r[keep])
    assert s["overall"] == pytest.approx(0.5)
    assert s["missing_sections"] == ["Chat Hard", "Safety", "Reasoning", "Prior"]


def test_report_and_errors():
    df, c, r = _eval_frame()
    rep = rewardbench_report(df, c, r)
    assert rep.loc[rep.subset == "a", "n"].item() == 4
    assert rep.loc[rep.subset == "a", "stderr"].item() == pytest.approx(np.sqrt(0.75 * 0.25 / 4))
    with pytest.raises(ValueError, match="Lengths differ"):
        rewardbench_scores(df, c[:-1], r)
    with pytest.raises(ValueError, match="missing the column 'subset'"):
        rewardbench_scores(df.drop(columns="subset"), c, r)


class _ThresholdPairModel(BaseEstimator):
    """Predicts P(chosen > rejected) = sigmoid(k * (x0 - x1)); fit does nothing."""

    def __init__(self, k=1.0):
        self.k = k

    def fit(self, X, y=None):
        self.fitted_ = True
        return self

    def predict(self, X):
        X = np.asarray(X)
        return 1 / (1 + np.exp(-self.k * (X[:, 0] - X[:, 1])))


def test_pairwise_scorer_in_grid_search():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 2))
    X[:, 0] += 1.5
    gs = GridSearchCV(_ThresholdPairModel(), {"k": [-1.0, 1.0]}, scoring=pairwise_scorer, cv=KFold(4)).fit(X)
    assert gs.best_params_ == {"k": 1.0}
    assert gs.best_score_ == pytest.approx(np.mean(X[:, 0] > X[:, 1]), abs=0.05)
    with pytest.raises(ValueError, match="P\\(chosen > rejected\\)"):
        pairwise_scorer(_ThresholdPairModel().fit(X), np.full((3, 2), np.nan))


# -- RewardBench 2 format ------------------------------------------------------------------------------

from rmkit.metrics import best_of_n_accuracy, best_of_n_scorer, score_candidates  # noqa: E402


def test_best_of_4_tie_rule():
    chosen = [5.0, 5.0, 5.0, 5.0, 1.0]
    rejected = [[1, 2, 3], [5, 2, 3], [5, 5, 3], [5, 5, 5], [0, 2, 0]]
    credit = best_of_n_accuracy(chosen, rejected, per_row=True)
    np.testing.assert_allclose(credit, [1.0, 1 / 2, 1 / 3, 1 / 4, 0.0])
    assert best_of_n_accuracy(chosen, rejected) == pytest.approx(np.mean([1, 1 / 2, 1 / 3, 1 / 4, 0]))
    # ragged rows and one-element chosen lists
    assert best_of_n_accuracy([[2.0], [1.0]], [[1.0], [0.0, 1.0, 3.0]]) == 0.5


@pytest.mark.parametrize("c, r, match", [([1.0, 2.0], [[0.0]], "2 chosen scores for 1 rows"),
                                         ([[1.0, 2.0]], [[0.0]], "exactly one"), ([1.0], [[]], "no rejected"),
                                         ([np.nan], [[0.0]], "NaN"), ([], [], "No rows")])
def test_best_of_n_accuracy_rejects_bad_input(c, r, match):
    with pytest.raises(ValueError, match=match):
        best_of_n_accuracy(c, r)


class _CountingLengthRM:
    calls = 0

    def predict(self, X):
        type(self).calls += 1
        return X["response"].str.len().to_numpy(float)


def test_score_candidates_scores_all_in_one_call_and_keeps_row_structure():
    rows = pd.DataFrame({"prompt": ["p", "q"], "chosen": ["four", ["xy"]],
                         "rejected": [["a", "bbbbbb", "cc"], ["wxyz"]]})
    _CountingLengthRM.calls = 0
    chosen, rejected = score_candidates(_CountingLengthRM(), rows)
    assert _CountingLengthRM.calls == 1
    assert [c.tolist() for c in chosen] == [[4.0], [2.0]]
    assert [r.tolist() for r in rejected] == [[1.0, 6.0, 2.0], [4.0]]
    assert best_of_n_scorer(_CountingLengthRM(), rows) == 0.0
    with pytest.raises(ValueError, match="non-empty list"):
        score_candidates(_CountingLengthRM(), rows.assign(rejected=[[], ["a"]]))
    with pytest.raises(ValueError, match="missing the column 'rejected'"):
        score_candidates(_CountingLengthRM(), rows.drop(columns=["rejected"]))
