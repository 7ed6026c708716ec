import json

import pandas as pd
import pytest

from rmkit import datasets
from rmkit.utils._validation import read_pairs, read_pointwise

from .conftest import requires_data


def test_make_preference_pairs_is_seeded_and_verifiable():
    a, b = datasets.make_preference_pairs(30, random_state=3), datasets.make_preference_pairs(30, random_state=3)
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(datasets.make_preference_pairs(30, random_state=4))
    math = a[a.category == "math"]
    for row in math.itertuples():  # the chosen answer is arithmetically right, the rejected one wrong
        expr, value = row.chosen.rstrip(".").split(" = ")
        assert eval(expr) == int(value)
        assert eval(row.rejected.rstrip(".").split(" = ")[0]) != int(row.rejected.rstrip(".").split(" = ")[1])
    assert a[a.category == "safety"].chosen.str.contains("can't|won't|not able").all()
    read_pairs(a)  # valid input for every estimator


@pytest.mark.parametrize("suffix", ["jsonl", "jsonl.gz", "csv", "parquet"])
def test_load_table_reads_every_supported_format(tmp_path, suffix):
    df = pd.DataFrame({"prompt": ["a", "b"], "response": ["x", "y, z"]})
    path = tmp_path / f"data.{suffix}"
    if suffix.startswith("jsonl"):
        text = "\n".join(json.dumps(r) for r in df.to_dict("records"))
        if suffix.endswith(".gz"):
            import gzip

            with gzip.open(path, "wt") as f:
                f.write(text)
        else:
            path.write_text(text)
    elif suffix == "csv":
        df.to_csv(path, index=False)
    else:
        df.to_parquet(path)
    pd.testing.assert_frame_equal(datasets.load_table(path), df)
    assert read_pointwise(datasets.load_table(path)).responses == ["x", "y, z"]


def test_load_table_errors_name_the_problem(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="Unknown file type"):
        datasets.load_table(tmp_path / "x.txt")


def test_list_of_dicts_and_mixed_kinds():
    assert len(read_pointwise([{"prompt": "p", "response": "r"}])) == 1
    with pytest.raises(ValueError, match="both 'response' and 'chosen'"):
        read_pointwise([{"prompt": "p", "response": "r", "chosen": "c", "rejected": "d"}])
    with pytest.raises(ValueError, match="identical chosen and rejected"):
        read_pairs([{"prompt": "p", "chosen": "same", "rejected": "same"}])
    with pytest.raises(ValueError, match="holds preference pairs"):
        read_pointwise([{"prompt": "p", "chosen": "c", "rejected": "d"}])


@pytest.mark.slow
@requires_data
def test_shared_data_readers():
    ev = datasets.load_eval()
    assert {"subset", "category", "prompt", "chosen", "rejected"} <= set(ev.columns)
    assert "Extra" not in set(ev.category)
    assert "Extra" in set(datasets.load_eval(include_extra=True).category)
    r = datasets.load_ratings(n=50)
    assert len(r) == 50 and r[["gpt4_ref_score_1to10", "autoj_gpt4_rating_1to10"]].isna().any().all()
    p = datasets.load_pairwise(n=20, random_state=1)
    assert len(p) == 20 and (p.chosen != p.rejected).all()
    pd.testing.assert_frame_equal(p, datasets.load_pairwise(n=20, random_state=1))
