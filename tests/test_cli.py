"""python -m rmkit: score and info."""

import json
import os
import re
import subprocess
import sys

import joblib
import numpy as np
import pandas as pd
import pytest
from sklearn.base import BaseEstimator
from sklearn.linear_model import Ridge
from sklearn.pipeline import make_pipeline

import rmkit
from rmkit.__main__ import CLIError, main


@rmkit.register_safe_class
class LengthReward(BaseEstimator):
    """Scores a response by its length; pairs by the logistic of the difference."""

    def __init__(self, weight=0.1, pairs_only=False):
        self.weight = weight
        self.pairs_only = pairs_only

    def fit(self, X=None, y=None):
        self.fitted_ = True
        return self

    def predict(self, X):
        df = pd.DataFrame(X)
        if "chosen" in df.columns:
            diff = self.weight * (df["chosen"].str.len() - df["rejected"].str.len()).to_numpy(float)
            return 1 / (1 + np.exp(-diff))
        if self.pairs_only:
            raise ValueError("this model scores pairs only")
        return self.weight * df["response"].str.len().to_numpy(float)


PAIRS = pd.DataFrame({
    "prompt": ["What is 2+2?", "Name a colour.", "Say hi.", "Count to three."],
    "chosen": ["4", "Blue is a colour.", "Hi there!", "1, 2, 3"],
    "rejected": ["It is five.", "No.", "Hello, how are you today?", "1 2"],
})


def _write_jsonl(path, df):
    df.to_json(path, orient="records", lines=True)
    return path


def _read(path):
    return pd.read_json(path, lines=True) if str(path).endswith(".jsonl") else pd.read_csv(path)


def test_help_and_version():
    out = subprocess.run([sys.executable, "-m", "rmkit", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    assert "score" in out.stdout and "info" in out.stdout
    with pytest.raises(SystemExit) as exc:
        main(["score", "--help"])
    assert exc.value.code == 0


@pytest.mark.slow
def test_import_and_help_do_not_load_torch():
    """The public names load on first use, so the CLI's help is instant."""
    code = ("import sys, rmkit, rmkit.__main__; assert 'torch' not in sys.modules, 'torch imported'; "
            "assert set(rmkit.__all__) <= set(dir(rmkit)); rmkit.ArmoRM; assert 'torch' in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    with pytest.raises(AttributeError, match="no attribute 'NotAnEstimator'"):
        rmkit.NotAnEstimator


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"^rmkit +{re.escape(rmkit.__version__)}$", out, flags=re.M)
    assert str(rmkit.cache_dir()) in out and "device" in out


@pytest.mark.slow
def test_score_pointwise_end_to_end(tmp_path, tiny):
    """A saved featurizer + ridge pipeline, scored by a separate `python -m rmkit` process."""
    rows = pd.DataFrame({"prompt": ["hi", "2+2?", "2+2?", "bye"], "response": ["hello", "4", "5", "see you"],
                         "id": [1, 2, 3, 4]})
    model = make_pipeline(rmkit.BackboneFeaturizer(tiny, cache=False, verbose=1), Ridge())
    model.fit(rows, [1.0, 1.0, 0.0, 0.5])
    rmkit.save(model, tmp_path / "model")
    src, dst = _write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    out = subprocess.run([sys.executable, "-m", "rmkit", "score", "--model", str(tmp_path / "model"),
                          "--input", str(src), "--output", str(dst), "--batch-size", "3"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "score" in out.stderr and "4/4" in out.stderr  # the progress bar
    assert "featurize" not in out.stderr  # one bar for the file: the model's own bars are silenced
    scored = _read(dst)
    assert scored.columns.tolist() == ["prompt", "response", "id", "reward"]
    np.testing.assert_allclose(scored["reward"], model.predict(rows), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_score_pairs_to_csv(tmp_path, capfd, batch_size):
    rmkit.save(LengthReward().fit(), tmp_path / "m")
    src = _write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    assert main(["score", "--model", str(tmp_path / "m"), "--input", str(src), "--output",
                 str(tmp_path / "out.csv"), "--batch-size", str(batch_size), "--quiet"]) == 0
    assert capfd.readouterr().err == ""  # --quiet: no progress bar
    scored = _read(tmp_path / "out.csv")
    lengths = PAIRS[["chosen", "rejected"]].apply(lambda s: s.str.len()).to_numpy(float)
    np.testing.assert_allclose(scored["reward_chosen"], 0.1 * lengths[:, 0])
    np.testing.assert_allclose(scored["reward_rejected"], 0.1 * lengths[:, 1])
    np.testing.assert_allclose(scored["p_chosen"], 1 / (1 + np.exp(-0.1 * (lengths[:, 0] - lengths[:, 1]))))
    assert scored["prompt"].tolist() == PAIRS["prompt"].tolist()


def test_pairs_only_model_and_joblib(tmp_path, capsys):
    joblib.dump(LengthReward(pairs_only=True).fit(), tmp_path / "m.joblib")
    src = _write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    args = ["score", "--model", str(tmp_path / "m.joblib"), "--input", str(src), "--output",
            str(tmp_path / "out.jsonl"), "--quiet"]
    # a pickle runs code when loaded: refused unless the user says they trust it (issue 15, item 7)
    assert main(args) == 1
    assert "--trust-pickle" in capsys.readouterr().err and not (tmp_path / "out.jsonl").exists()
    assert main(args + ["--trust-pickle"]) == 0
    scored = _read(tmp_path / "out.jsonl")
    assert "p_chosen" in scored.columns and not any(c.startswith("reward") for c in scored.columns)


def test_messages_input(tmp_path):
    rmkit.save(LengthReward(weight=1.0).fit(), tmp_path / "m")
    with open(tmp_path / "conv.jsonl", "w") as f:
        for text in ["short", "a longer answer"]:
            messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                        {"role": "user", "content": "and now?"}]
            f.write(json.dumps({"messages": messages, "response": text}) + "\n")
    assert main(["score", "--model", str(tmp_path / "m"), "--input", str(tmp_path / "conv.jsonl"),
                 "--output", str(tmp_path / "out.jsonl"), "--quiet"]) == 0
    scored = pd.read_json(tmp_path / "out.jsonl", lines=True)
    assert scored["reward"].tolist() == [5.0, 15.0]
    assert scored["messages"][0][2]["content"] == "and now?"


@pytest.mark.parametrize("change, message", [
    (dict(output="out.txt"), "Unknown output type 'out.txt'"),
    (dict(model="nowhere"), "No model at"),
    (dict(input="missing.jsonl"), "No input file"),
    (dict(rows=[{"prompt": "hi"}]), "missing the column 'response'"),
    (dict(rows=[{"prompt": "hi", "response": "  "}]), "empty text at row 0"),
    (dict(rows=[{"prompt": "hi", "response": "yo", "reward": 3}]), r"already has column\(s\) \['reward'\]"),
    (dict(batch_size="0"), "--batch-size must be at least 1"),
])
def test_score_errors_are_clear(tmp_path, capsys, change, message):
    rmkit.save(LengthReward().fit(), tmp_path / "m")
    src = _write_jsonl(tmp_path / "in.jsonl", pd.DataFrame(change.get("rows", [{"prompt": "a", "response": "b"}])))
    argv = ["score", "--model", str(tmp_path / change.get("model", "m")),
            "--input", str(tmp_path / change["input"]) if "input" in change else str(src),
            "--output", str(tmp_path / change.get("output", "out.jsonl")),
            "--batch-size", change.get("batch_size", "8"), "--quiet"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("rmkit score: error:") and re.search(message, err), err
    assert not (tmp_path / "out.jsonl").exists()


def test_unsafe_save_is_refused_by_the_cli(tmp_path, capsys):
    path = rmkit.save(LengthReward().fit(), tmp_path / "m")
    manifest = json.loads((path / "rmkit.json").read_text())
    manifest["model"]["__estimator__"]["class"] = "os.system"
    (path / "rmkit.json").write_text(json.dumps(manifest))
    src = _write_jsonl(tmp_path / "in.jsonl", pd.DataFrame([{"prompt": "a", "response": "b"}]))
    assert main(["score", "--model", str(path), "--input", str(src), "--output", str(tmp_path / "o.jsonl")]) == 1
    assert "'os.system'" in capsys.readouterr().err


def test_debug_env_shows_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("RMKIT_DEBUG", "1")
    with pytest.raises(CLIError, match="Unknown output type"):
        main(["score", "--model", str(tmp_path), "--input", os.devnull, "--output", str(tmp_path / "o.txt")])
